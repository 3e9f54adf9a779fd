//! Fuzz the iSCSI login negotiation (text keys, CHAP, operational keys; see
//! tessera_gateway::iscsi::fuzz).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tessera_gateway::iscsi::fuzz::login(data);
});
