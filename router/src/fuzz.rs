//! Entry points of the fuzz targets (`fuzz/`, run with `cargo fuzz`) and of their replay in
//! the tests: the checks a request meets before any worker sees it, fed arbitrary bytes. Each
//! must return without a panic; a refusal is the expected outcome for most inputs.

use moebius_proto::v1::GenerateRequest;
use prost::Message;

/// A gRPC `GenerateRequest` message: decoded, then validated as the router validates it.
pub fn grpc_request(bytes: &[u8]) {
    if let Ok(request) = GenerateRequest::decode(bytes) {
        let _ = crate::request::validate(&request);
    }
}

/// An OpenAI-API body, as `/v1/completions` and `/v1/chat/completions` read it.
pub fn openai_body(bytes: &[u8]) {
    crate::http::openai::decode_untrusted(bytes);
}
