//! Fuzz the NBD request parser, validation and reply encoders (see
//! tessera_gateway::nbd::fuzz).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tessera_gateway::nbd::fuzz::requests(data);
});
