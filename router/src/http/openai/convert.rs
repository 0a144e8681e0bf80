//! OpenAI requests into `moebius.v1` requests: every field checked, with a 400 that names it.

use moebius_proto::v1::generate_request::Prompt as ProtoPrompt;
use moebius_proto::v1::{
    Chat, ChatMessage as ProtoMessage, GenerateRequest, SamplingParams, TokenIds,
};

use super::error::ApiError;
use super::wire::{ChatRequest, Common, CompletionRequest, Content, Prompt};
use crate::limits::{MAX_STOPS, MAX_STOP_BYTES, MAX_TOP_LOGPROBS};

/// Tokens a completion makes when `max_tokens` is not given (OpenAI's default).
const DEFAULT_COMPLETION_TOKENS: u32 = 16;
/// A chat without `max_tokens` runs to the end of the model's context, or this many tokens.
const DEFAULT_CHAT_TOKENS: u32 = 4096;

/// What the response needs to know of the request.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub stream: bool,
    pub include_usage: bool,
    /// Logprobs asked for, with how many alternatives.
    pub logprobs: Option<u32>,
}

pub fn completion(request: CompletionRequest) -> Result<(GenerateRequest, Shape), ApiError> {
    refuse_unsupported(&request.common)?;
    if request.echo {
        return Err(ApiError::field(
            "echo",
            "echoing the prompt is not supported",
        ));
    }
    if request.suffix.is_some() {
        return Err(ApiError::field(
            "suffix",
            "insertion with a suffix is not supported",
        ));
    }
    if request.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::field("best_of", "only 1 is supported"));
    }
    let prompt = match request.prompt {
        None => return Err(ApiError::field("prompt", "is required")),
        Some(Prompt::Text(text)) => ProtoPrompt::Text(non_empty_text(text)?),
        Some(Prompt::Ids(ids)) => ProtoPrompt::TokenIds(TokenIds {
            ids: non_empty_ids(ids)?,
        }),
        Some(Prompt::Texts(mut texts)) if texts.len() == 1 => {
            ProtoPrompt::Text(non_empty_text(texts.remove(0))?)
        }
        Some(Prompt::Batches(mut batches)) if batches.len() == 1 => {
            ProtoPrompt::TokenIds(TokenIds {
                ids: non_empty_ids(batches.remove(0))?,
            })
        }
        Some(_) => {
            return Err(ApiError::field(
                "prompt",
                "send one prompt per request (a list of several is not supported)",
            ))
        }
    };
    if let Some(n) = request.logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
        return Err(ApiError::field(
            "logprobs",
            format!("must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"),
        ));
    }
    let max_tokens = request.common.max_tokens;
    let shape = shape(&request.common, request.logprobs);
    let proto = generate(
        request.common,
        prompt,
        max_tokens,
        DEFAULT_COMPLETION_TOKENS,
        false,
        request.logprobs,
    )?;
    Ok((proto, shape))
}

pub fn chat(request: ChatRequest) -> Result<(GenerateRequest, Shape), ApiError> {
    refuse_unsupported(&request.common)?;
    let Some(messages) = request.messages else {
        return Err(ApiError::field("messages", "is required"));
    };
    if messages.is_empty() {
        return Err(ApiError::field(
            "messages",
            "must hold at least one message",
        ));
    }
    let messages = messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_deref() {
                Some(r @ ("system" | "user" | "assistant" | "tool")) => r.to_owned(),
                // OpenAI's newer name for the system prompt.
                Some("developer") => "system".to_owned(),
                Some(other) => {
                    return Err(ApiError::field(
                        &format!("messages[{i}].role"),
                        format!(
                            "must be system, developer, user, assistant or tool, got {other:?}"
                        ),
                    ))
                }
                None => {
                    return Err(ApiError::field(
                        &format!("messages[{i}].role"),
                        "is required",
                    ))
                }
            };
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(text)) => text,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.into_iter().enumerate() {
                        match (part.kind.as_str(), part.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(ApiError::field(
                                    &format!("messages[{i}].content[{j}]"),
                                    format!("only text parts are supported, got {kind:?}"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            let tool_calls_json = m
                .tool_calls
                .filter(|c| !c.is_null())
                .map(|c| c.to_string())
                .unwrap_or_default();
            Ok(ProtoMessage {
                role,
                content,
                tool_calls_json,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let top = match (request.logprobs, request.top_logprobs) {
        (_, Some(n)) if n > MAX_TOP_LOGPROBS => {
            return Err(ApiError::field(
                "top_logprobs",
                format!("must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"),
            ))
        }
        (false, Some(n)) if n > 0 => {
            return Err(ApiError::field("top_logprobs", "needs logprobs: true"))
        }
        (true, n) => Some(n.unwrap_or(0)),
        (false, _) => None,
    };
    let max_tokens = request.max_completion_tokens.or(request.common.max_tokens);
    let param = if request.max_completion_tokens.is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    if max_tokens == Some(0) {
        return Err(ApiError::field(param, "must be at least 1"));
    }
    let shape = shape(&request.common, top);
    let proto = generate(
        request.common,
        ProtoPrompt::Chat(Chat { messages }),
        max_tokens,
        DEFAULT_CHAT_TOKENS,
        max_tokens.is_none(),
        top,
    )?;
    Ok((proto, shape))
}

fn non_empty_text(text: String) -> Result<String, ApiError> {
    if text.is_empty() {
        return Err(ApiError::field("prompt", "is empty"));
    }
    Ok(text)
}

fn non_empty_ids(ids: Vec<u32>) -> Result<Vec<u32>, ApiError> {
    if ids.is_empty() {
        return Err(ApiError::field("prompt", "is an empty list of token ids"));
    }
    Ok(ids)
}

fn shape(common: &Common, logprobs: Option<u32>) -> Shape {
    Shape {
        stream: common.stream,
        include_usage: common
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
        logprobs,
    }
}

/// Fields whose effect Moebius does not implement: refused unless neutral.
fn refuse_unsupported(common: &Common) -> Result<(), ApiError> {
    if common.n.is_some_and(|n| n != 1) {
        return Err(ApiError::field(
            "n",
            "only 1 choice per request is supported; send several requests",
        ));
    }
    for (name, value) in [
        ("presence_penalty", common.presence_penalty),
        ("frequency_penalty", common.frequency_penalty),
    ] {
        if value.is_some_and(|v| v != 0.0) {
            return Err(ApiError::field(name, "is not supported (only 0)"));
        }
    }
    if common.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(ApiError::field("logit_bias", "is not supported"));
    }
    if common.stream_options.is_some() && !common.stream {
        return Err(ApiError::field(
            "stream_options",
            "is only allowed with stream: true",
        ));
    }
    Ok(())
}

/// The `moebius.v1` request: sampling, stopping and logprobs checked and translated.
fn generate(
    common: Common,
    prompt: ProtoPrompt,
    max_tokens: Option<u32>,
    default_tokens: u32,
    clamp: bool,
    logprobs: Option<u32>,
) -> Result<GenerateRequest, ApiError> {
    if max_tokens == Some(0) {
        return Err(ApiError::field("max_tokens", "must be at least 1"));
    }
    // OpenAI samples at temperature 1 unless told otherwise.
    let temperature = common.temperature.unwrap_or(1.0);
    if !temperature.is_finite() || !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::field(
            "temperature",
            format!("must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = common.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::field(
            "top_p",
            format!("must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = match common.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => u32::try_from(k).unwrap_or(u32::MAX),
        Some(k) => {
            return Err(ApiError::field(
                "top_k",
                format!("must be -1 or 0 (off) or a positive count, got {k}"),
            ))
        }
    };
    let seed = match common.seed {
        None => None,
        Some(s) if s >= 0 => Some(s as u64),
        Some(s) => return Err(ApiError::field("seed", format!("must be >= 0, got {s}"))),
    };
    let stop = common.stop.map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > MAX_STOPS {
        return Err(ApiError::field(
            "stop",
            format!("at most {MAX_STOPS} stop strings, got {}", stop.len()),
        ));
    }
    for (i, s) in stop.iter().enumerate() {
        if s.is_empty() || s.len() > MAX_STOP_BYTES {
            return Err(ApiError::field(
                &format!("stop[{i}]"),
                format!("must be 1 to {MAX_STOP_BYTES} bytes long"),
            ));
        }
    }
    Ok(GenerateRequest {
        prompt: Some(prompt),
        max_new_tokens: max_tokens.unwrap_or(default_tokens),
        clamp_max_new_tokens: clamp,
        sampling: Some(SamplingParams {
            temperature,
            top_p,
            top_k,
            seed,
        }),
        stop,
        ignore_eos: common.ignore_eos,
        logprobs: logprobs.is_some(),
        top_logprobs: logprobs.unwrap_or(0),
        ..GenerateRequest::default()
    })
}
