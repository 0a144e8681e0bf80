//! A request's `moebius.v1` messages as OpenAI responses: one JSON object, or server-sent
//! events (one chunk per message, a usage chunk when asked, then `data: [DONE]`).

use std::convert::Infallible;
use std::time::Duration;

use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use moebius_proto::v1::{FinishReason, GenerateResponse};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::convert::Shape;
use super::error::ApiError;
use super::wire::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatLogprobs, Completion, CompletionChoice,
    CompletionLogprobs, Delta, TokenLogprob, Usage,
};
use super::{unix_now, Parts};
use crate::request::merge;

/// Events buffered for a slow client.
const EVENT_BUFFER: usize = 16;

pub async fn completion(parts: Parts, shape: Shape, model: String) -> Response {
    respond(parts, Writer::new(Kind::Completion, shape, model)).await
}

pub async fn chat(parts: Parts, shape: Shape, model: String) -> Response {
    respond(parts, Writer::new(Kind::Chat, shape, model)).await
}

async fn respond(mut parts: Parts, mut writer: Writer) -> Response {
    if writer.shape.stream {
        return stream(parts, writer);
    }
    let mut whole = GenerateResponse::default();
    while let Some(part) = parts.next().await {
        match part {
            Ok(part) => {
                if whole.request_id.is_empty() {
                    whole.request_id.clone_from(&part.request_id);
                }
                merge(&mut whole, part);
            }
            Err(status) => return ApiError::from_status(&status).into_response(),
        }
    }
    writer.id(&whole.request_id);
    (
        [(header::CONTENT_TYPE, "application/json")],
        writer.whole(&whole),
    )
        .into_response()
}

/// Streams the chunks from a task that stops, dropping the request's stream (which cancels
/// the sequence on its worker), as soon as the client goes away.
fn stream(mut parts: Parts, mut writer: Writer) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(EVENT_BUFFER);
    tokio::spawn(async move {
        let send = |data: &str| {
            let tx = tx.clone();
            let event = Event::default().data(data);
            async move { tx.send(Ok(event)).await.is_ok() }
        };
        let mut usage = None;
        loop {
            let next = tokio::select! {
                () = tx.closed() => return,
                next = parts.next() => next,
            };
            match next {
                None => break,
                Some(Ok(part)) => {
                    writer.id(&part.request_id);
                    if let Some(u) = part.usage {
                        usage = Some(Usage::new(u.prompt_tokens, u.completion_tokens));
                    }
                    for chunk in writer.chunks(&part) {
                        if !send(&chunk).await {
                            return;
                        }
                    }
                }
                Some(Err(status)) => {
                    send(&ApiError::from_status(&status).body().to_string()).await;
                    break;
                }
            }
        }
        if let (true, Some(usage)) = (writer.shape.include_usage, usage) {
            if !send(&writer.usage_chunk(usage)).await {
                return;
            }
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

/// Writes one request's responses in its endpoint's format.
struct Writer {
    kind: Kind,
    shape: Shape,
    model: String,
    created: u64,
    id: String,
    /// Chat streams open with a chunk that names the role.
    opened: bool,
    /// Bytes of completion text so far (`text_offset` of the legacy logprobs).
    offset: usize,
}

impl Writer {
    fn new(kind: Kind, shape: Shape, model: String) -> Self {
        Self {
            kind,
            shape,
            model,
            created: unix_now(),
            id: String::new(),
            opened: false,
            offset: 0,
        }
    }

    fn id(&mut self, request_id: &str) {
        if self.id.is_empty() {
            let prefix = match self.kind {
                Kind::Completion => "cmpl",
                Kind::Chat => "chatcmpl",
            };
            self.id = format!("{prefix}-{request_id}");
        }
    }

    /// `usage` of a stream chunk: `null` on each when usage is asked for, else absent.
    fn chunk_usage(&self) -> Option<Option<Usage>> {
        self.shape.include_usage.then_some(None)
    }

    fn whole(&mut self, whole: &GenerateResponse) -> String {
        let usage = whole
            .usage
            .map(|u| Usage::new(u.prompt_tokens, u.completion_tokens));
        let finish = finish_reason(whole.finish_reason);
        match self.kind {
            Kind::Completion => json(&Completion {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: vec![CompletionChoice {
                    index: 0,
                    text: whole.text.clone(),
                    logprobs: self.completion_logprobs(whole),
                    finish_reason: finish,
                }],
                usage: Some(usage),
            }),
            Kind::Chat => json(&ChatCompletion {
                id: self.id.clone(),
                object: "chat.completion",
                created: self.created,
                model: self.model.clone(),
                choices: vec![ChatChoice {
                    index: 0,
                    message: Some(AssistantMessage {
                        role: "assistant",
                        content: whole.text.clone(),
                    }),
                    delta: None,
                    logprobs: self.chat_logprobs(whole),
                    finish_reason: finish,
                }],
                usage: Some(usage),
            }),
        }
    }

    /// The stream chunks of one message.
    fn chunks(&mut self, part: &GenerateResponse) -> Vec<String> {
        let finish = finish_reason(part.finish_reason);
        match self.kind {
            Kind::Completion => vec![json(&Completion {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: vec![CompletionChoice {
                    index: 0,
                    text: part.text.clone(),
                    logprobs: self.completion_logprobs(part),
                    finish_reason: finish,
                }],
                usage: self.chunk_usage(),
            })],
            Kind::Chat => {
                let mut chunks = Vec::new();
                if !self.opened {
                    self.opened = true;
                    chunks.push(self.chat_chunk(
                        Delta {
                            role: Some("assistant"),
                            content: Some(String::new()),
                        },
                        None,
                        None,
                    ));
                }
                let logprobs = self.chat_logprobs(part);
                chunks.push(self.chat_chunk(
                    Delta {
                        role: None,
                        content: Some(part.text.clone()),
                    },
                    logprobs,
                    finish,
                ));
                chunks
            }
        }
    }

    fn chat_chunk(
        &self,
        delta: Delta,
        logprobs: Option<ChatLogprobs>,
        finish: Option<&'static str>,
    ) -> String {
        json(&ChatCompletion {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChatChoice {
                index: 0,
                message: None,
                delta: Some(delta),
                logprobs,
                finish_reason: finish,
            }],
            usage: self.chunk_usage(),
        })
    }

    /// The last chunk of a stream whose client asked for usage: no choices.
    fn usage_chunk(&self, usage: Usage) -> String {
        match self.kind {
            Kind::Completion => json(&Completion {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: Vec::new(),
                usage: Some(Some(usage)),
            }),
            Kind::Chat => json(&ChatCompletion {
                id: self.id.clone(),
                object: "chat.completion.chunk",
                created: self.created,
                model: self.model.clone(),
                choices: Vec::new(),
                usage: Some(Some(usage)),
            }),
        }
    }

    fn completion_logprobs(&mut self, part: &GenerateResponse) -> Option<CompletionLogprobs> {
        self.shape.logprobs?;
        let mut out = CompletionLogprobs::default();
        for (i, &logprob) in part.logprobs.iter().enumerate() {
            let token = token_text(part, i);
            out.text_offset.push(self.offset);
            self.offset += token.len();
            out.tokens.push(token);
            out.token_logprobs.push(logprob);
            let top = alternatives(part, i)
                .map(|(text, lp)| (text, Value::from(lp)))
                .collect();
            out.top_logprobs.push(top);
        }
        Some(out)
    }

    fn chat_logprobs(&self, part: &GenerateResponse) -> Option<ChatLogprobs> {
        self.shape.logprobs?;
        let content = part
            .logprobs
            .iter()
            .enumerate()
            .map(|(i, &logprob)| {
                let token = token_text(part, i);
                let top = alternatives(part, i)
                    .map(|(text, lp)| TokenLogprob {
                        bytes: text.as_bytes().to_vec(),
                        token: text,
                        logprob: lp,
                        top_logprobs: None,
                    })
                    .collect();
                TokenLogprob {
                    bytes: token.as_bytes().to_vec(),
                    token,
                    logprob,
                    top_logprobs: Some(top),
                }
            })
            .collect();
        Some(ChatLogprobs { content })
    }
}

/// The text of the `i`th token of a message, or its id where the model has no tokenizer.
fn token_text(part: &GenerateResponse, i: usize) -> String {
    text_or_id(&part.tokens, &part.token_ids, i)
}

/// The most likely tokens at the `i`th position of a message: (text, logprob), best first.
fn alternatives(part: &GenerateResponse, i: usize) -> impl Iterator<Item = (String, f32)> + '_ {
    part.top_logprobs.get(i).into_iter().flat_map(|alts| {
        alts.logprobs
            .iter()
            .enumerate()
            .map(|(j, &lp)| (text_or_id(&alts.tokens, &alts.token_ids, j), lp))
    })
}

/// `texts[i]`, or `token_id:N` where the worker sent no text (a model without a tokenizer).
fn text_or_id(texts: &[String], ids: &[u32], i: usize) -> String {
    texts
        .get(i)
        .cloned()
        .unwrap_or_else(|| format!("token_id:{}", ids.get(i).unwrap_or(&0)))
}

fn finish_reason(reason: i32) -> Option<&'static str> {
    match FinishReason::try_from(reason) {
        Ok(FinishReason::Length) => Some("length"),
        Ok(FinishReason::Eos | FinishReason::Stop) => Some("stop"),
        Ok(FinishReason::Cancelled) => Some("abort"),
        _ => None,
    }
}

/// A response or chunk as JSON text, written straight from its struct (once per token when
/// streaming).
fn json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}
