//! The worker's internal gRPC service (`moebius.v1.Worker`): request conversion and
//! validation against the model, admission control, and the one mapping from [`Error`] to
//! `tonic::Status`.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::mpsc;

use futures::stream::BoxStream;
use moebius_proto::deadline::parse_grpc_timeout;
use moebius_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::config::ModelConfig;
use crate::engine::thread::not_in_epoch;
use crate::engine::{EngineHandle, GenerateRequest, Phase, SamplingParams};
use crate::error::{Error, Result};
use crate::model::LoadWindow;
use crate::service::stream::{response_stream, Admission, StreamSpec};
use crate::tokenizer::Tokenizer;
use moebius_coordinator::telemetry::{adopt_trace_context, record_trace_id};

/// Maps a worker error to the gRPC status a client sees. The only place that does.
pub fn status_from_error(error: Error) -> Status {
    let message = error.to_string();
    match error {
        Error::InvalidRequest(_) => Status::invalid_argument(message),
        Error::Overloaded(_) => Status::resource_exhausted(message),
        Error::DeadlineExceeded(_) => Status::deadline_exceeded(message),
        Error::Unavailable(_) | Error::Comm(_) | Error::PeerFailed { .. } | Error::Store(_) => {
            Status::unavailable(message)
        }
        Error::Io { .. }
        | Error::MissingFile { .. }
        | Error::Safetensors { .. }
        | Error::MissingTensor { .. }
        | Error::TensorShape { .. }
        | Error::UnsupportedDtype { .. }
        | Error::Config(_)
        | Error::UnsupportedArchitecture(_)
        | Error::Tokenizer(_)
        | Error::Placement(_)
        | Error::Serve(_)
        | Error::Device(_) => Status::internal(message),
    }
}

/// A request checked against the model, with what the response stream needs.
#[derive(Debug)]
pub struct Prepared {
    pub request: GenerateRequest,
    pub stop: Vec<String>,
    pub logprobs: bool,
    /// The text a resubmitted request's client already has.
    pub resumed_text: String,
}

/// Turns the public request (and, for a resubmitted one, what its client already has) into
/// the engine's, tokenising text and checking every field against the model; errors are
/// [`Error::InvalidRequest`] naming the field.
pub fn prepare(
    proto: pb::GenerateRequest,
    resume: Option<pb::Resume>,
    config: &ModelConfig,
    tokenizer: Option<&Tokenizer>,
) -> Result<Prepared> {
    use pb::generate_request::Prompt;
    let bad = |m: String| Error::InvalidRequest(m);
    let prompt = match proto.prompt {
        None => return Err(bad("prompt: set prompt.text or prompt.token_ids".into())),
        Some(Prompt::Text(text)) => {
            if text.is_empty() {
                return Err(bad("prompt.text is empty".into()));
            }
            let Some(tokenizer) = tokenizer else {
                return Err(bad(
                    "prompt.text: this model has no tokenizer.json; send prompt.token_ids".into(),
                ));
            };
            tokenizer
                .encode(&text)
                .map_err(|e| bad(format!("prompt.text cannot be tokenised: {e}")))?
        }
        Some(Prompt::TokenIds(ids)) => {
            if ids.ids.is_empty() {
                return Err(bad("prompt.token_ids is empty".into()));
            }
            ids.ids
        }
        Some(Prompt::Chat(chat)) => {
            let Some(tokenizer) = tokenizer else {
                return Err(bad(
                    "prompt.chat: this model has no tokenizer.json; send prompt.token_ids".into(),
                ));
            };
            tokenizer.encode_chat(&chat_messages(chat)?)?
        }
    };
    let sampling = proto.sampling.unwrap_or_default();
    let room = config.max_position_embeddings.saturating_sub(prompt.len());
    let max_new_tokens = match proto.max_new_tokens as usize {
        n if proto.clamp_max_new_tokens && n > room && room > 0 => room,
        n => n,
    };
    let request = GenerateRequest {
        max_new_tokens,
        sampling: SamplingParams {
            temperature: sampling.temperature,
            // proto3 has no "unset" for a float: 0 means the default, 1.
            top_p: if sampling.top_p == 0.0 {
                1.0
            } else {
                sampling.top_p
            },
            top_k: sampling.top_k as usize,
            seed: sampling.seed,
        },
        ignore_eos: proto.ignore_eos,
        stop_token_ids: proto.stop_token_ids,
        top_logprobs: proto.top_logprobs as usize,
        prompt,
        generated: resume
            .as_ref()
            .map(|r| r.token_ids.clone())
            .unwrap_or_default(),
    };
    request.validate(config)?;
    let room = config.max_position_embeddings - request.prompt.len();
    if max_new_tokens > room {
        return Err(bad(format!(
            "max_new_tokens {max_new_tokens} is more than the {room} positions left after the \
             prompt of {} tokens (the model's maximum is {})",
            request.prompt.len(),
            config.max_position_embeddings
        )));
    }
    if let Some(i) = proto.stop.iter().position(String::is_empty) {
        return Err(bad(format!("stop[{i}] is empty")));
    }
    if !proto.stop.is_empty() && tokenizer.is_none() {
        return Err(bad(
            "stop: this model has no tokenizer.json to match stop strings; use stop_token_ids"
                .into(),
        ));
    }
    Ok(Prepared {
        request,
        stop: proto.stop,
        logprobs: proto.logprobs,
        resumed_text: resume.map(|r| r.text).unwrap_or_default(),
    })
}

/// A conversation as the chat template reads it: objects with `role`, `content` and, where
/// given, `tool_calls`.
fn chat_messages(chat: pb::Chat) -> Result<Vec<serde_json::Value>> {
    if chat.messages.is_empty() {
        return Err(Error::InvalidRequest(
            "prompt.chat.messages is empty".into(),
        ));
    }
    chat.messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            if m.role.is_empty() {
                return Err(Error::InvalidRequest(format!(
                    "prompt.chat.messages[{i}].role is empty"
                )));
            }
            let mut message = serde_json::json!({"role": m.role, "content": m.content});
            if !m.tool_calls_json.is_empty() {
                let calls: serde_json::Value =
                    serde_json::from_str(&m.tool_calls_json).map_err(|e| {
                        Error::InvalidRequest(format!(
                            "prompt.chat.messages[{i}].tool_calls_json is not JSON: {e}"
                        ))
                    })?;
                message["tool_calls"] = calls;
            }
            Ok(message)
        })
        .collect()
}

/// The `moebius.v1.Worker` service of one worker.
#[derive(Clone)]
pub struct WorkerService {
    inner: Arc<Inner>,
}

struct Inner {
    id: String,
    config: ModelConfig,
    tokenizer: Option<Arc<Tokenizer>>,
    engine: Arc<EngineHandle>,
    capacity: u32,
    in_flight: Arc<AtomicU32>,
    /// Cleared at shutdown: new requests are refused while in-flight ones drain.
    accepting: AtomicBool,
    /// The recent expert load, as last sampled.
    load: Arc<Mutex<LoadWindow>>,
}

impl WorkerService {
    pub fn new(
        id: String,
        config: ModelConfig,
        tokenizer: Option<Arc<Tokenizer>>,
        engine: Arc<EngineHandle>,
        capacity: u32,
        load: Arc<Mutex<LoadWindow>>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                id,
                config,
                tokenizer,
                engine,
                capacity,
                in_flight: Arc::new(AtomicU32::new(0)),
                accepting: AtomicBool::new(true),
                load,
            }),
        }
    }

    /// Refuses new requests from now on (the first phase of shutdown).
    pub fn stop_accepting(&self) {
        self.inner.accepting.store(false, Ordering::Release);
    }

    /// Requests admitted and not yet finished.
    pub fn in_flight(&self) -> u32 {
        self.inner.in_flight.load(Ordering::Acquire)
    }

    fn start(&self, request: Request<pb::WorkerGenerateRequest>) -> Result<GenerateStream> {
        let inner = &*self.inner;
        if !inner.accepting.load(Ordering::Acquire) {
            return Err(Error::Unavailable("worker is shutting down".into()));
        }
        let timeout = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let deadline = timeout.map(|t| (tokio::time::Instant::now() + t, t));
        let span = tracing::info_span!(
            "worker_generate",
            moebius.worker = %inner.id,
            request_id = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            gen_ai.usage.input_tokens = tracing::field::Empty,
        );
        adopt_trace_context(&span, request.metadata());
        record_trace_id(&span);
        let pb::WorkerGenerateRequest { request, resume } = request.into_inner();
        let proto = request.ok_or_else(|| Error::InvalidRequest("request is missing".into()))?;
        let request_id = proto.request_id.clone();
        let top_logprobs = proto.top_logprobs > 0;
        let prepared = prepare(proto, resume, &inner.config, inner.tokenizer.as_deref())?;
        if inner.engine.status().borrow().phase == Phase::Detached {
            return Err(not_in_epoch());
        }
        let admission = Admission::try_new(&inner.in_flight, inner.capacity).ok_or_else(|| {
            Error::Overloaded(format!(
                "worker {} has {} requests in flight, its capacity; retry later or elsewhere",
                inner.id, inner.capacity
            ))
        })?;
        let prompt_tokens = prepared.request.prompt.len();
        span.record("request_id", request_id.as_str());
        span.record("gen_ai.usage.input_tokens", prompt_tokens);
        let generated = prepared.request.generated.clone();
        let (events, rx) = mpsc::unbounded_channel();
        inner.engine.submit(prepared.request, Box::new(events))?;
        Ok(response_stream(
            rx,
            admission,
            StreamSpec {
                request_id,
                prompt_tokens,
                logprobs: prepared.logprobs,
                top_logprobs,
                stop: prepared.stop,
                tokenizer: inner.tokenizer.clone(),
                deadline,
                generated,
                sent_text: prepared.resumed_text,
                span,
            },
        ))
    }
}

type GenerateStream = BoxStream<'static, Result<pb::GenerateResponse, Status>>;

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<pb::WorkerGenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        self.start(request)
            .map(Response::new)
            .map_err(status_from_error)
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let inner = &*self.inner;
        let s = inner.engine.status().borrow().clone();
        let in_flight = inner.in_flight.load(Ordering::Acquire) as usize;
        let (load, window) = inner
            .load
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .counts();
        Ok(Response::new(pb::StatusResponse {
            worker_id: inner.id.clone(),
            epoch: s.epoch,
            rank: s.rank,
            active_sequences: s.active as u32,
            queued_requests: in_flight.saturating_sub(s.active) as u32,
            steps: s.stats.steps,
            max_batch: s.stats.max_batch as u32,
            expert_slots: s.expert_slots.first().cloned().unwrap_or_default(),
            expert_bytes: s.expert_bytes,
            layer_slots: s
                .expert_slots
                .iter()
                .map(|l| pb::LayerExperts { experts: l.clone() })
                .collect(),
            expert_load: load
                .into_iter()
                .map(|tokens| pb::LayerLoad { tokens })
                .collect(),
            load_window_seconds: window.as_secs_f64(),
            slots_loaded: s.reload.loaded as u32,
            slots_kept: s.reload.reused as u32,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_documented_codes() {
        let code = |e| status_from_error(e).code();
        assert_eq!(
            code(Error::InvalidRequest("x".into())),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            code(Error::Overloaded("x".into())),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(code(Error::Comm("x".into())), tonic::Code::Unavailable);
        assert_eq!(
            code(Error::DeadlineExceeded(std::time::Duration::from_secs(1))),
            tonic::Code::DeadlineExceeded
        );
    }
}
