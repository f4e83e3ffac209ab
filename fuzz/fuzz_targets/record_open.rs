#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| piivault::fuzz::record_open(data));
