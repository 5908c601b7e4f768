//! Fuzz target `safetensors_header`: a thin wrapper over [`twin_fuzz::safetensors_header`], which says what it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| twin_fuzz::safetensors_header(data));
