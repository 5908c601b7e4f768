//! Fuzz target `record`: a thin wrapper over [`twin_fuzz::record`], which says what it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| twin_fuzz::record(data));
