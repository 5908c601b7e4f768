//! Fuzz target `job_spec`: a thin wrapper over [`twin_fuzz::job_spec`], which says what it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| twin_fuzz::job_spec(data));
