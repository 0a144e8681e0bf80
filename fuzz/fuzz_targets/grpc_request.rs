#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| moebius_router::fuzz::grpc_request(data));
