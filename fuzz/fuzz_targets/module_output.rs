//! Fuzz target `module_output`: a thin wrapper over [`twin_fuzz::module_output`], which says what it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| twin_fuzz::module_output(data));
