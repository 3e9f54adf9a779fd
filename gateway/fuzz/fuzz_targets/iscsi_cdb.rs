//! Fuzz the iSCSI CDB decoder and the pure SCSI answer builders; see
//! tessera_gateway::iscsi::fuzz.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tessera_gateway::iscsi::fuzz::cdb(data);
});
