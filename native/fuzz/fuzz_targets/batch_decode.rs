#![no_main]
//! See `snakepit_telemetry_fuzz::fuzz_batch` for what this target decodes and checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| snakepit_telemetry_fuzz::fuzz_batch(data));
