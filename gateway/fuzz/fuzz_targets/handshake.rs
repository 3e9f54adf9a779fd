//! Fuzz the NBD handshake state machine (see tessera_gateway::nbd::fuzz).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tessera_gateway::nbd::fuzz::handshake(data);
});
