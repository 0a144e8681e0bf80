//! The router's Prometheus metrics, and [`Meter`]: one request's measurements from admission
//! to its last message.
//!
//! Latencies follow the definitions vLLM and SGLang publish: time to first token from the
//! request's arrival to its first token; inter-token latency, every gap between two messages
//! that carry tokens; time per output token, per request, `(end - first token) / (tokens - 1)`.

use std::sync::Arc;
use std::time::Duration;

use moebius_proto::v1::GenerateResponse;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::time::Instant;
use tonic::Code;

/// A finished request's outcome and gRPC code.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
    code: String,
}

/// The router's metrics; clones share their values.
#[derive(Debug, Clone)]
pub struct RouterMetrics {
    requests: Family<Outcome, Counter>,
    request_seconds: Histogram,
    ttft_seconds: Histogram,
    tpot_seconds: Histogram,
    itl_seconds: Histogram,
    prompt_tokens: Counter,
    generated_tokens: Counter,
    in_flight: Gauge,
    pub(crate) admission_refusals: Counter,
    pub(crate) retries: Counter,
    pub(crate) migrations: Counter,
    pub(crate) routable_workers: Gauge,
}

impl Default for RouterMetrics {
    fn default() -> Self {
        // From 1 ms to about 65 s, doubling.
        let latency = || Histogram::new(exponential_buckets(0.001, 2.0, 17));
        Self {
            requests: Family::default(),
            request_seconds: latency(),
            ttft_seconds: latency(),
            tpot_seconds: latency(),
            itl_seconds: latency(),
            prompt_tokens: Counter::default(),
            generated_tokens: Counter::default(),
            in_flight: Gauge::default(),
            admission_refusals: Counter::default(),
            retries: Counter::default(),
            migrations: Counter::default(),
            routable_workers: Gauge::default(),
        }
    }
}

impl RouterMetrics {
    /// Metrics registered into `registry` under `router_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry;
        r.register(
            "router_requests",
            "Finished requests, by outcome (ok, error) and gRPC status code",
            m.requests.clone(),
        );
        r.register(
            "router_request_duration_seconds",
            "Duration of a request, from its arrival to its last message",
            m.request_seconds.clone(),
        );
        r.register(
            "router_time_to_first_token_seconds",
            "Time from a request's arrival to its first token",
            m.ttft_seconds.clone(),
        );
        r.register(
            "router_time_per_output_token_seconds",
            "Per request: time from the first token to the last over the tokens after the first",
            m.tpot_seconds.clone(),
        );
        r.register(
            "router_inter_token_latency_seconds",
            "Every gap between two consecutive tokens of a request as the router passes them on (0 between tokens that travel in one message)",
            m.itl_seconds.clone(),
        );
        r.register(
            "router_prompt_tokens",
            "Prompt tokens of finished requests, as the workers counted them",
            m.prompt_tokens.clone(),
        );
        r.register(
            "router_generated_tokens",
            "Tokens sent to clients",
            m.generated_tokens.clone(),
        );
        r.register(
            "router_requests_in_flight",
            "Requests admitted and not finished",
            m.in_flight.clone(),
        );
        r.register(
            "router_admission_refusals",
            "Requests refused with RESOURCE_EXHAUSTED because every worker was full",
            m.admission_refusals.clone(),
        );
        r.register(
            "router_retries",
            "Requests tried on another worker after a full one refused them",
            m.retries.clone(),
        );
        r.register(
            "router_migrations",
            "Requests resubmitted to another worker after losing theirs",
            m.migrations.clone(),
        );
        r.register(
            "router_routable_workers",
            "Workers the router sends new requests to (in the active epoch, registered, not draining)",
            m.routable_workers.clone(),
        );
        m
    }

    /// Starts measuring a request that arrived at `started`.
    pub(crate) fn meter(self: &Arc<Self>, started: Instant) -> Meter {
        self.in_flight.inc();
        Meter {
            metrics: Arc::clone(self),
            started,
            first_token: None,
            last_token: None,
            tokens: 0,
            prompt_tokens: None,
            finished: false,
            span: None,
        }
    }
}

/// One request's measurements. Dropped without [`finish`](Meter::finish), the request counts
/// as `CANCELLED` (its client went away).
#[derive(Debug)]
pub(crate) struct Meter {
    metrics: Arc<RouterMetrics>,
    started: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    tokens: u64,
    prompt_tokens: Option<u64>,
    finished: bool,
    /// The request's span, where the usage and the outcome are recorded at the end.
    span: Option<tracing::Span>,
}

impl Meter {
    /// Records the usage and the outcome in `span` too.
    pub fn trace(&mut self, span: tracing::Span) {
        self.span = Some(span);
    }

    /// A message on its way to the client.
    pub fn message(&mut self, message: &GenerateResponse) {
        if let Some(usage) = &message.usage {
            let prompt = u64::from(usage.prompt_tokens);
            self.metrics.prompt_tokens.inc_by(prompt);
            self.prompt_tokens = Some(prompt);
        }
        let n = message.token_ids.len() as u64;
        if n == 0 {
            return;
        }
        let now = Instant::now();
        match self.last_token {
            None => {
                self.metrics
                    .ttft_seconds
                    .observe(seconds(now - self.started));
                self.first_token = Some(now);
            }
            Some(last) => self.metrics.itl_seconds.observe(seconds(now - last)),
        }
        // A worker that is ahead of its stream sends the tokens it has made in one message: the
        // tokens after the first reach the client with it, with no gap. One gap per token keeps
        // the count at a request's tokens less one, however they were grouped.
        for _ in 1..n {
            self.metrics.itl_seconds.observe(0.0);
        }
        self.last_token = Some(now);
        self.tokens += n;
        self.metrics.generated_tokens.inc_by(n);
    }

    /// The request ended with `code` (`Code::Ok` when it completed).
    pub fn finish(mut self, code: Code) {
        self.record(code);
    }

    /// The request failed with `status`, which is handed back.
    pub fn fail(self, status: tonic::Status) -> tonic::Status {
        self.finish(status.code());
        status
    }

    fn record(&mut self, code: Code) {
        if self.finished {
            return;
        }
        self.finished = true;
        let m = &self.metrics;
        m.in_flight.dec();
        m.request_seconds.observe(seconds(self.started.elapsed()));
        if let (Some(first), Some(last)) = (self.first_token, self.last_token) {
            if self.tokens > 1 {
                m.tpot_seconds
                    .observe(seconds(last - first) / (self.tokens - 1) as f64);
            }
        }
        if code == Code::ResourceExhausted {
            m.admission_refusals.inc();
        }
        let outcome = Outcome {
            outcome: if code == Code::Ok { "ok" } else { "error" },
            code: code_name(code),
        };
        m.requests.get_or_create(&outcome).inc();
        if let Some(span) = &self.span {
            span.record("gen_ai.usage.output_tokens", self.tokens);
            if let Some(prompt) = self.prompt_tokens {
                span.record("gen_ai.usage.input_tokens", prompt);
            }
            span.record("rpc.grpc.status_code", code as i32);
            // The access log: one line per request, at info (off under the default filter).
            tracing::info!(
                parent: span,
                code = %outcome.code,
                output_tokens = self.tokens,
                seconds = self.started.elapsed().as_secs_f64(),
                "request finished"
            );
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.record(Code::Cancelled);
    }
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The code's name as gRPC writes it: `OK`, `INVALID_ARGUMENT`, ...
fn code_name(code: Code) -> String {
    let mut name = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_token_after_the_first_is_one_inter_token_gap_however_messages_group_them() {
        let mut registry = Registry::default();
        let metrics = Arc::new(RouterMetrics::register(&mut registry));
        let mut meter = metrics.meter(Instant::now());
        for tokens in [vec![1, 2, 3], vec![4], vec![5, 6]] {
            meter.message(&GenerateResponse {
                token_ids: tokens,
                ..Default::default()
            });
        }
        meter.finish(Code::Ok);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        let count = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}_count ")))
                .unwrap_or_else(|| panic!("no {name}_count in\n{text}"))
                .to_string()
        };
        assert_eq!(count("router_inter_token_latency_seconds"), "5");
        assert_eq!(count("router_time_to_first_token_seconds"), "1");
    }

    #[test]
    fn code_names_are_grpc_names() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
    }
}
