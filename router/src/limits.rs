//! The limits on what one request may ask, shared by the gRPC and the HTTP API, with the
//! check that names the field over its limit (`INVALID_ARGUMENT` / 400). The size of a whole
//! message is bounded apart from these, by [`RouterConfig::max_request_bytes`]
//! (`--max-request-bytes`), and a prompt longer than the model's context is refused by the
//! worker, which knows the context.
//!
//! [`RouterConfig::max_request_bytes`]: crate::RouterConfig::max_request_bytes

use moebius_proto::v1::generate_request::Prompt;
use moebius_proto::v1::GenerateRequest;

/// Longest client-chosen `request_id`, in bytes of printable ASCII: it is logged, traced and
/// echoed in every response.
pub const MAX_REQUEST_ID_BYTES: usize = 128;
/// Most stop strings in one request.
pub const MAX_STOPS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;
/// Most stop token ids in one request.
pub const MAX_STOP_TOKEN_IDS: usize = 64;
/// Most alternatives per token in `top_logprobs`.
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Most messages in one chat.
pub const MAX_CHAT_MESSAGES: usize = 1024;
/// The default bound on one request message, gRPC or HTTP: 4 MiB, tonic's and axum's default.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4 << 20;

/// The first limit `request` is over, as `(field, message)`.
pub(crate) fn over_limit(request: &GenerateRequest) -> Option<(&'static str, String)> {
    let id = &request.request_id;
    if id.len() > MAX_REQUEST_ID_BYTES || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Some((
            "request_id",
            format!(
                "must be at most {MAX_REQUEST_ID_BYTES} bytes of printable ASCII without spaces \
                 (got {} bytes)",
                id.len()
            ),
        ));
    }
    if request.stop.len() > MAX_STOPS {
        return Some((
            "stop",
            format!(
                "at most {MAX_STOPS} stop strings, got {}",
                request.stop.len()
            ),
        ));
    }
    if let Some(s) = request
        .stop
        .iter()
        .find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Some((
            "stop",
            format!(
                "each stop string must be 1 to {MAX_STOP_BYTES} bytes long, got {}",
                s.len()
            ),
        ));
    }
    if request.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
        return Some((
            "stop_token_ids",
            format!(
                "at most {MAX_STOP_TOKEN_IDS} ids, got {}",
                request.stop_token_ids.len()
            ),
        ));
    }
    if request.top_logprobs > MAX_TOP_LOGPROBS {
        return Some((
            "top_logprobs",
            format!(
                "must be between 0 and {MAX_TOP_LOGPROBS}, got {}",
                request.top_logprobs
            ),
        ));
    }
    if let Some(Prompt::Chat(chat)) = &request.prompt {
        if chat.messages.len() > MAX_CHAT_MESSAGES {
            return Some((
                "chat.messages",
                format!(
                    "at most {MAX_CHAT_MESSAGES} messages, got {}",
                    chat.messages.len()
                ),
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use moebius_proto::v1::{Chat, ChatMessage};

    use super::*;

    #[test]
    fn each_limit_names_its_field() {
        let ok = GenerateRequest {
            request_id: "a".repeat(MAX_REQUEST_ID_BYTES),
            stop: vec!["x".repeat(MAX_STOP_BYTES); MAX_STOPS],
            stop_token_ids: vec![1; MAX_STOP_TOKEN_IDS],
            top_logprobs: MAX_TOP_LOGPROBS,
            ..GenerateRequest::default()
        };
        assert_eq!(over_limit(&ok), None);
        let cases = [
            (
                "request_id",
                GenerateRequest {
                    request_id: "a".repeat(MAX_REQUEST_ID_BYTES + 1),
                    ..ok.clone()
                },
            ),
            (
                "request_id",
                GenerateRequest {
                    request_id: "a b".into(),
                    ..ok.clone()
                },
            ),
            (
                "request_id",
                GenerateRequest {
                    request_id: "é".into(),
                    ..ok.clone()
                },
            ),
            (
                "stop",
                GenerateRequest {
                    stop: vec!["x".into(); MAX_STOPS + 1],
                    ..ok.clone()
                },
            ),
            (
                "stop",
                GenerateRequest {
                    stop: vec![String::new()],
                    ..ok.clone()
                },
            ),
            (
                "stop",
                GenerateRequest {
                    stop: vec!["x".repeat(MAX_STOP_BYTES + 1)],
                    ..ok.clone()
                },
            ),
            (
                "stop_token_ids",
                GenerateRequest {
                    stop_token_ids: vec![1; MAX_STOP_TOKEN_IDS + 1],
                    ..ok.clone()
                },
            ),
            (
                "top_logprobs",
                GenerateRequest {
                    top_logprobs: MAX_TOP_LOGPROBS + 1,
                    ..ok.clone()
                },
            ),
            (
                "chat.messages",
                GenerateRequest {
                    prompt: Some(Prompt::Chat(Chat {
                        messages: vec![ChatMessage::default(); MAX_CHAT_MESSAGES + 1],
                    })),
                    ..ok.clone()
                },
            ),
        ];
        for (field, request) in cases {
            assert_eq!(over_limit(&request).map(|(f, _)| f), Some(field));
        }
    }
}
