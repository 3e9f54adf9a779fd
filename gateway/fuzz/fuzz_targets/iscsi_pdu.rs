//! Fuzz the iSCSI PDU parser and full-feature session; see
//! tessera_gateway::iscsi::fuzz.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tessera_gateway::iscsi::fuzz::pdu(data);
});
