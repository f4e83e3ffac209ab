#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| piivault::fuzz::audit_decode(data));
