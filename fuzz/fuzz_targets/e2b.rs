#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| flint_supervisor::fuzzing::e2b(data));
