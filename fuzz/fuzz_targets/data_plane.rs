#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| moebius_worker::fuzz::data_plane(data));
