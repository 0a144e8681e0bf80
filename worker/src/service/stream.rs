//! One `Worker.Generate` response stream: engine events in, `GenerateResponse` messages out,
//! with incremental detokenisation, stop strings, the client's deadline, and cancellation of
//! the sequence when the client goes away (the stream, and with it the receiver the engine
//! sends to, is dropped). A resubmitted request's stream starts from what its client already
//! has: the earlier tokens count in the usage and in the text a stop string is looked for in.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use futures::stream::{self, BoxStream, StreamExt};
use moebius_proto::v1 as pb;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;

use crate::engine::{FinishReason, SequenceEvent, TokenEvent};
use crate::error::Error;
use crate::service::grpc::status_from_error;
use crate::tokenizer::Tokenizer;

/// Holds one admitted request's place: dropping it (the stream ended, or the client left)
/// frees its admission slot.
pub struct Admission {
    in_flight: Arc<AtomicU32>,
}

impl Admission {
    /// Takes a slot if fewer than `capacity` requests are in flight.
    pub fn try_new(in_flight: &Arc<AtomicU32>, capacity: u32) -> Option<Self> {
        in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < capacity).then_some(n + 1)
            })
            .ok()?;
        Some(Self {
            in_flight: in_flight.clone(),
        })
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the stream needs besides the events.
pub struct StreamSpec {
    pub request_id: String,
    pub prompt_tokens: usize,
    pub logprobs: bool,
    pub top_logprobs: bool,
    pub stop: Vec<String>,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub deadline: Option<(Instant, std::time::Duration)>,
    /// Tokens the client of a resubmitted request already has (empty for a new request).
    pub generated: Vec<u32>,
    /// Text the client of a resubmitted request already has.
    pub sent_text: String,
    /// The request's span on this worker; its phases are child spans.
    pub span: tracing::Span,
}

struct State {
    events: UnboundedReceiver<SequenceEvent>,
    /// Held for its `Drop`: the request's admission slot is free when the stream ends.
    _admission: Admission,
    spec: StreamSpec,
    generated: Vec<u32>,
    /// Text already sent; always a prefix of the decoded text so far (when decoding is
    /// prefix-stable, which it is except for rare clean-up rules).
    sent: String,
    done: bool,
    /// The phase the request is in, as a child span of the request's: `prefill` (waiting for
    /// a place in a step, then the prompt) until the first token, `decode` after it.
    phase: tracing::Span,
    decoding: bool,
}

/// The response stream of one admitted request.
pub fn response_stream(
    events: UnboundedReceiver<SequenceEvent>,
    admission: Admission,
    mut spec: StreamSpec,
) -> BoxStream<'static, Result<pb::GenerateResponse, tonic::Status>> {
    let phase = tracing::info_span!(parent: &spec.span, "prefill");
    let state = State {
        phase,
        decoding: false,
        events,
        _admission: admission,
        generated: std::mem::take(&mut spec.generated),
        sent: std::mem::take(&mut spec.sent_text),
        spec,
        done: false,
    };
    stream::unfold(state, |mut state| async move {
        if state.done {
            return None;
        }
        let item = state.next().await;
        Some((item, state))
    })
    .boxed()
}

impl State {
    async fn next(&mut self) -> Result<pb::GenerateResponse, tonic::Status> {
        let first = match self.spec.deadline {
            Some((at, after)) => tokio::select! {
                e = self.events.recv() => e,
                () = tokio::time::sleep_until(at) => {
                    self.done = true;
                    // The engine drops the sequence before its next step.
                    self.events.close();
                    return Err(status_from_error(Error::DeadlineExceeded(after)));
                }
            },
            None => self.events.recv().await,
        };
        let mut batch = Vec::new();
        let mut next = first;
        loop {
            match next {
                None => {
                    self.done = true;
                    return Err(status_from_error(Error::Unavailable(
                        "the engine dropped the request".into(),
                    )));
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Err(status_from_error(e));
                }
                Some(Ok(event)) => {
                    let last = event.finish.is_some();
                    batch.push(event);
                    if last {
                        break;
                    }
                }
            }
            // Send everything already made in one message.
            match self.events.try_recv() {
                Ok(e) => next = Some(e),
                Err(_) => break,
            }
        }
        Ok(self.message(batch))
    }

    fn message(&mut self, batch: Vec<TokenEvent>) -> pb::GenerateResponse {
        if !self.decoding {
            self.decoding = true;
            self.phase = tracing::info_span!(parent: &self.spec.span, "decode");
        }
        let mut out = pb::GenerateResponse {
            request_id: self.spec.request_id.clone(),
            ..Default::default()
        };
        let mut finish = None;
        let text_of = |id: u32| {
            self.spec
                .tokenizer
                .as_ref()
                .map(|tokenizer| tokenizer.token_text(id))
        };
        for event in batch {
            self.generated.push(event.token);
            out.token_ids.push(event.token);
            if self.spec.logprobs {
                out.logprobs.push(event.logprob);
                out.tokens.extend(text_of(event.token));
            }
            if self.spec.top_logprobs {
                out.top_logprobs.push(pb::TopLogprobs {
                    token_ids: event.top_logprobs.iter().map(|t| t.0).collect(),
                    logprobs: event.top_logprobs.iter().map(|t| t.1).collect(),
                    tokens: event
                        .top_logprobs
                        .iter()
                        .filter_map(|t| text_of(t.0))
                        .collect(),
                });
            }
            finish = event.finish;
        }
        if let Some(tokenizer) = &self.spec.tokenizer {
            match tokenizer.decode(&self.generated) {
                Ok(text) => {
                    let (delta, stopped) = self.delta(&text, finish.is_some());
                    out.text = delta;
                    if stopped {
                        finish = Some(FinishReason::Stop);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot decode generated tokens"),
            }
        }
        if let Some(finish) = finish {
            self.done = true;
            // The engine may still hold the sequence (a stop string): free it now.
            self.events.close();
            out.finish_reason = finish_reason(finish) as i32;
            out.usage = Some(pb::Usage {
                prompt_tokens: self.spec.prompt_tokens as u32,
                completion_tokens: self.generated.len() as u32,
            });
        }
        out
    }

    /// The new text to send given all text decoded so far, and whether a stop string ended
    /// it. Holds back an incomplete UTF-8 character and a suffix that may begin a stop string,
    /// unless this is the last message.
    fn delta(&mut self, text: &str, last: bool) -> (String, bool) {
        let (mut end, stopped) = match earliest_stop(text, &self.spec.stop) {
            Some(at) => (at, true),
            None => (text.len(), false),
        };
        if !stopped && !last {
            if text.ends_with('\u{FFFD}') {
                end = text.trim_end_matches('\u{FFFD}').len();
            }
            end -= partial_stop_suffix(&text[..end], &self.spec.stop);
        }
        let start = common_prefix(&self.sent, text);
        if start < self.sent.len() {
            // Decoding was not prefix-stable; what was sent stays sent.
            tracing::debug!("detokenisation changed already-sent text");
        }
        let delta = if end > start {
            text[start..end].to_string()
        } else {
            String::new()
        };
        self.sent = text[..end.max(start)].to_string();
        (delta, stopped)
    }
}

/// Byte offset of the earliest stop string in `text`.
fn earliest_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// Length of the longest suffix of `text` that is a proper prefix of a stop string.
fn partial_stop_suffix(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for stop in stops {
        for (i, _) in stop.char_indices().skip(1) {
            if i > best && text.ends_with(&stop[..i]) {
                best = i;
            }
        }
    }
    best
}

/// Length of the common prefix of `a` and `b`, on a character boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}

fn finish_reason(f: FinishReason) -> pb::FinishReason {
    match f {
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Eos => pb::FinishReason::Eos,
        FinishReason::Stop => pb::FinishReason::Stop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_found_and_partials_held_back() {
        let stops = vec!["END".to_string(), "xyz".to_string()];
        assert_eq!(earliest_stop("abc END xyz", &stops), Some(4));
        assert_eq!(earliest_stop("abc", &stops), None);
        assert_eq!(partial_stop_suffix("abc EN", &stops), 2);
        assert_eq!(partial_stop_suffix("abc x", &stops), 1);
        assert_eq!(partial_stop_suffix("abc", &stops), 0);
        assert_eq!(common_prefix("héllo", "hélp"), 4);
        assert_eq!(common_prefix("ab", "abc"), 2);
    }

    #[test]
    fn admission_is_bounded_and_released_on_drop() {
        let n = Arc::new(AtomicU32::new(0));
        let a = Admission::try_new(&n, 2).expect("first");
        let b = Admission::try_new(&n, 2).expect("second");
        assert!(Admission::try_new(&n, 2).is_none());
        drop(a);
        assert!(Admission::try_new(&n, 2).is_some());
        drop(b);
        assert_eq!(n.load(Ordering::Relaxed), 0);
    }
}
