//! What the router does to a request without the model: the checks it can make, request ids,
//! the deadline, and folding a worker's stream into one unary response.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use moebius_proto::deadline::parse_grpc_timeout;
use moebius_proto::v1::{FinishReason, GenerateRequest, GenerateResponse};
use tonic::metadata::MetadataMap;

use crate::error::RouterError;

/// Checks what the router can check without the model; the worker checks the rest
/// (vocabulary, context length, stop strings) and answers `INVALID_ARGUMENT` itself.
pub(crate) fn validate(request: &GenerateRequest) -> Result<(), RouterError> {
    let invalid = |message: String| Err(RouterError::InvalidRequest(message));
    if request.prompt.is_none() {
        return invalid("prompt: set text, token_ids or chat".into());
    }
    if let Some((field, message)) = crate::limits::over_limit(request) {
        return invalid(format!("{field}: {message}"));
    }
    if request.max_new_tokens == 0 {
        return invalid("max_new_tokens: must be at least 1".into());
    }
    if let Some(sampling) = &request.sampling {
        let temperature = sampling.temperature;
        if !temperature.is_finite() || temperature < 0.0 {
            return invalid(format!(
                "sampling.temperature: must be finite and >= 0 (0 is greedy), got {temperature}"
            ));
        }
        let top_p = sampling.top_p;
        // 0 is proto3's "unset", meaning 1.
        if top_p.is_nan() || !(0.0..=1.0).contains(&top_p) {
            return invalid(format!(
                "sampling.top_p: must be in (0, 1] (0 means unset, i.e. 1), got {top_p}"
            ));
        }
    }
    Ok(())
}

/// Makes request ids for requests that came without one: unique within this process and,
/// through a random prefix, across routers.
#[derive(Debug)]
pub(crate) struct RequestIds {
    prefix: u32,
    next: AtomicU64,
}

impl RequestIds {
    pub fn new() -> Self {
        // The std hasher's per-process random keys are a dependency-free source of randomness.
        let prefix = RandomState::new().build_hasher().finish() as u32;
        Self {
            prefix,
            next: AtomicU64::new(1),
        }
    }

    /// A random number (seeds for sampled requests that came without one).
    pub fn random(&self) -> u64 {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(self.next.fetch_add(1, Ordering::Relaxed));
        hasher.finish()
    }

    /// Fills `request_id` when the client left it empty.
    pub fn fill(&self, request: &mut GenerateRequest) {
        if request.request_id.is_empty() {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            request.request_id = format!("rt-{:08x}-{n}", self.prefix);
        }
    }
}

/// How much earlier than the client's deadline the router gives up, so that its own
/// `DEADLINE_EXCEEDED` reaches the client before tonic's server-side timeout, which answers a
/// less helpful `CANCELLED`.
const DEADLINE_MARGIN: Duration = Duration::from_millis(5);

/// The time this request may take: the client's `grpc-timeout` (less a small margin) and the
/// router's own cap, whichever is shorter.
pub(crate) fn time_limit(metadata: &MetadataMap, cap: Option<Duration>) -> Option<Duration> {
    let client = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map(|t| t.saturating_sub(DEADLINE_MARGIN));
    match (client, cap) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Appends one streamed message to the unary response being built: tokens, text and logprobs
/// concatenate; the finish reason and usage come from the last message that carries them.
pub(crate) fn merge(into: &mut GenerateResponse, part: GenerateResponse) {
    into.token_ids.extend(part.token_ids);
    into.text.push_str(&part.text);
    into.logprobs.extend(part.logprobs);
    into.tokens.extend(part.tokens);
    into.top_logprobs.extend(part.top_logprobs);
    if part.finish_reason != FinishReason::Unspecified as i32 {
        into.finish_reason = part.finish_reason;
    }
    if part.usage.is_some() {
        into.usage = part.usage;
    }
}

#[cfg(test)]
mod tests {
    use moebius_proto::v1::{generate_request::Prompt, SamplingParams, TokenIds, Usage};

    use super::*;

    fn request() -> GenerateRequest {
        GenerateRequest {
            prompt: Some(Prompt::TokenIds(TokenIds { ids: vec![1, 2] })),
            max_new_tokens: 4,
            ..GenerateRequest::default()
        }
    }

    #[test]
    fn validation_names_the_field() {
        assert!(validate(&request()).is_ok());
        let sampling = |temperature, top_p| {
            Some(SamplingParams {
                temperature,
                top_p,
                ..SamplingParams::default()
            })
        };
        let cases = [
            (
                GenerateRequest {
                    prompt: None,
                    ..request()
                },
                "prompt",
            ),
            (
                GenerateRequest {
                    max_new_tokens: 0,
                    ..request()
                },
                "max_new_tokens",
            ),
            (
                GenerateRequest {
                    sampling: sampling(-1.0, 0.0),
                    ..request()
                },
                "sampling.temperature",
            ),
            (
                GenerateRequest {
                    sampling: sampling(f32::NAN, 0.0),
                    ..request()
                },
                "sampling.temperature",
            ),
            (
                GenerateRequest {
                    sampling: sampling(1.0, 1.5),
                    ..request()
                },
                "sampling.top_p",
            ),
            (
                GenerateRequest {
                    sampling: sampling(1.0, -0.1),
                    ..request()
                },
                "sampling.top_p",
            ),
        ];
        for (request, field) in cases {
            let err = validate(&request).expect_err(field);
            assert!(err.to_string().starts_with(field), "{err}");
        }
        let ok = GenerateRequest {
            sampling: sampling(0.7, 0.9),
            ..request()
        };
        assert!(validate(&ok).is_ok());
    }

    #[test]
    fn request_ids_are_filled_once() {
        let ids = RequestIds::new();
        let (mut a, mut b) = (request(), request());
        ids.fill(&mut a);
        ids.fill(&mut b);
        assert!(!a.request_id.is_empty());
        assert_ne!(a.request_id, b.request_id);
        let mut mine = GenerateRequest {
            request_id: "mine".into(),
            ..request()
        };
        ids.fill(&mut mine);
        assert_eq!(mine.request_id, "mine");
    }

    #[test]
    fn grpc_timeouts() {
        let mut metadata = MetadataMap::new();
        assert_eq!(time_limit(&metadata, None), None);
        metadata.insert("grpc-timeout", "1S".parse().expect("ascii"));
        assert_eq!(
            time_limit(&metadata, None),
            Some(Duration::from_millis(995))
        );
        assert_eq!(
            time_limit(&metadata, Some(Duration::from_millis(10))),
            Some(Duration::from_millis(10))
        );
    }

    #[test]
    fn merge_concatenates() {
        let mut whole = GenerateResponse::default();
        merge(
            &mut whole,
            GenerateResponse {
                token_ids: vec![1],
                text: "a".into(),
                logprobs: vec![-0.5],
                ..Default::default()
            },
        );
        merge(
            &mut whole,
            GenerateResponse {
                token_ids: vec![2, 3],
                text: "bc".into(),
                logprobs: vec![-1.0, -2.0],
                finish_reason: FinishReason::Length as i32,
                usage: Some(Usage {
                    prompt_tokens: 2,
                    completion_tokens: 3,
                }),
                ..Default::default()
            },
        );
        assert_eq!(whole.token_ids, [1, 2, 3]);
        assert_eq!(whole.text, "abc");
        assert_eq!(whole.logprobs, [-0.5, -1.0, -2.0]);
        assert_eq!(whole.finish_reason, FinishReason::Length as i32);
        assert_eq!(whole.usage.map(|u| u.completion_tokens), Some(3));
    }
}
