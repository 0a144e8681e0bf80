//! `moebius bench serve`: a load generator against a running router, with the figures and the
//! definitions of SGLang's `bench_serving` and vLLM's serving benchmark.
//!
//! Every request is a random token-id prompt of `--input-len` tokens asking for exactly
//! `--output-len` tokens (`ignore_eos`, greedy), sent as a streaming `GenerateStream` call, or
//! with `--protocol openai` as a streamed `POST /v1/completions` to the router's HTTP port. Either
//! a closed loop of `--concurrency` requests in flight, or Poisson arrivals at `--request-rate`
//! (seeded), optionally capped by `--concurrency`.
//!
//! Definitions: TTFT is the time from sending a request to the first streamed message that
//! carries tokens (over HTTP: the first event with a choice); ITL is the time between
//! consecutive token-carrying messages; TPOT is
//! `(e2e − TTFT) / (output tokens − 1)`, over the requests with more than one output token;
//! e2e is the time from sending to the end of the stream. Throughputs divide the tokens of the
//! completed requests by the wall time from the first request to the last answer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use moebius_proto::v1::generate_request::Prompt;
use moebius_proto::v1::inference_client::InferenceClient;
use moebius_proto::v1::{FinishReason, GenerateRequest, SamplingParams, TokenIds};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

/// Flags of `moebius bench serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The router's public API, HOST:PORT (or http://HOST:PORT): its gRPC port, or with
    /// `--protocol openai` its HTTP port. Nothing else is contacted.
    #[arg(long, env = "MOEBIUS_ADDR", default_value = "127.0.0.1:50051")]
    addr: String,
    /// `grpc` (moebius.v1.Inference/GenerateStream) or `openai` (streamed POST
    /// /v1/completions of the same token ids, over HTTP/1.1).
    #[arg(long, value_enum, default_value_t = Protocol::Grpc)]
    protocol: Protocol,
    /// Requests to send (the warm-up request is extra and not counted).
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Most requests in flight. Default: 32 without --request-rate, unlimited with it.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Send requests as a Poisson process of this many requests per second (seeded by --seed)
    /// instead of a closed loop.
    #[arg(long)]
    request_rate: Option<f64>,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 64)]
    input_len: usize,
    /// Tokens to generate per request (`max_new_tokens`, with `ignore_eos`).
    #[arg(long, default_value_t = 32)]
    output_len: u32,
    /// Seed of the prompts and of the arrival times.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Prompt token ids are drawn uniformly from 2..VOCAB, which keeps clear of BOS (0) and EOS
    /// (1) and inside the tiny fixtures' vocabulary (448; the demo model's is 4096). Raise it for real models.
    #[arg(long, default_value_t = 400)]
    vocab: u32,
    /// A request that takes longer than this fails (and its stream is dropped).
    #[arg(long, default_value_t = 120)]
    request_timeout_s: u64,
    /// The whole run stops after this long: requests still in flight fail, unsent ones count as
    /// failed.
    #[arg(long, default_value_t = 1800)]
    max_duration_s: u64,
    /// Print one JSON object (progress still goes to stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Protocol {
    Grpc,
    Openai,
}

/// Where requests go.
#[derive(Clone)]
enum Target {
    Grpc(Channel),
    /// The HTTP address, and the model it serves.
    OpenAi {
        addr: String,
        model: String,
    },
}

/// The default closed-loop concurrency.
const DEFAULT_CONCURRENCY: usize = 32;

impl ServeArgs {
    fn validate(&self) -> Result<()> {
        if self.requests == 0 || self.input_len == 0 || self.output_len == 0 {
            bail!("--requests, --input-len and --output-len must be at least 1");
        }
        if self.concurrency == Some(0) {
            bail!("--concurrency must be at least 1");
        }
        if let Some(rate) = self.request_rate {
            if !(rate.is_finite() && rate > 0.0) {
                bail!("--request-rate must be a positive number of requests per second");
            }
        }
        if self.vocab <= 2 {
            bail!("--vocab must be above 2 (ids are drawn from 2..VOCAB)");
        }
        if self.request_timeout_s == 0 || self.max_duration_s == 0 {
            bail!("--request-timeout-s and --max-duration-s must be at least 1");
        }
        Ok(())
    }

    /// In-flight cap: `None` means unlimited.
    fn cap(&self) -> Option<usize> {
        match (self.concurrency, self.request_rate) {
            (Some(c), _) => Some(c),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_CONCURRENCY),
        }
    }
}

/// What one request measured, in seconds.
#[derive(Debug, Default)]
struct Outcome {
    error: Option<String>,
    prompt_tokens: usize,
    output_tokens: usize,
    ttft: f64,
    e2e: f64,
    itl: Vec<f64>,
}

pub fn run(args: ServeArgs) -> Result<()> {
    args.validate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> Result<()> {
    let target = match args.protocol {
        Protocol::Grpc => Target::Grpc(connect(&args.addr).await?),
        Protocol::Openai => {
            let addr = args
                .addr
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_owned();
            let model = super::openai::served_model(&addr)
                .await
                .map_err(|e| anyhow!("cannot reach the OpenAI API at {addr}: {e}"))?;
            Target::OpenAi { addr, model }
        }
    };

    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let prompts: Vec<Vec<u32>> = (0..args.requests)
        .map(|_| {
            (0..args.input_len)
                .map(|_| rng.random_range(2..args.vocab))
                .collect()
        })
        .collect();
    let timeout = Duration::from_secs(args.request_timeout_s);

    // One untimed request: connections, first steps, and a clear error for a wrong address.
    let warm = one_request(target.clone(), request(prompts[0].clone(), 2), timeout).await;
    if let Some(e) = warm.error {
        bail!("the warm-up request to {} failed: {e}", args.addr);
    }

    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let stop_progress = CancellationToken::new();
    let progress = tokio::spawn(progress(
        args.requests,
        done.clone(),
        failed.clone(),
        stop_progress.clone(),
    ));

    let cap = args.cap().map(|c| Arc::new(Semaphore::new(c)));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.max_duration_s);
    let mut next_arrival = started;
    let mut tasks = JoinSet::new();
    let mut outcomes = Vec::with_capacity(args.requests);
    for prompt in prompts {
        if let Some(rate) = args.request_rate {
            // Exponential gaps: 1 − u is in (0, 1], so the logarithm is finite.
            let u: f64 = rng.random();
            next_arrival += Duration::from_secs_f64(-(1.0 - u).ln() / rate);
            tokio::time::sleep_until(next_arrival.min(deadline)).await;
        }
        let permit = match &cap {
            Some(s) => Some(s.clone().acquire_owned().await?),
            None => None,
        };
        let now = Instant::now();
        if now >= deadline {
            outcomes.push(Outcome {
                error: Some(format!(
                    "not sent: --max-duration-s {} reached",
                    args.max_duration_s
                )),
                ..Outcome::default()
            });
            failed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let (target, done, failed) = (target.clone(), done.clone(), failed.clone());
        let left = timeout.min(deadline - now);
        let req = request(prompt, args.output_len);
        tasks.spawn(async move {
            let outcome = one_request(target, req, left).await;
            drop(permit);
            let counter = if outcome.error.is_some() {
                &failed
            } else {
                &done
            };
            counter.fetch_add(1, Ordering::Relaxed);
            outcome
        });
    }
    while let Some(joined) = tasks.join_next().await {
        outcomes.push(joined.map_err(|e| anyhow!("a request task panicked: {e}"))?);
    }
    let duration = started.elapsed().as_secs_f64();
    stop_progress.cancel();
    let _ = progress.await;

    let report = report(&args, &outcomes, duration);
    if args.json {
        println!("{report}");
    } else {
        print_report(&report);
    }
    Ok(())
}

async fn connect(addr: &str) -> Result<Channel> {
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    Endpoint::from_shared(uri)
        .with_context(|| format!("--addr {addr:?} is not an address"))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot connect to the router at {addr}"))
}

/// A greedy streaming request for exactly `max_new_tokens` tokens (`ignore_eos`).
pub(super) fn request(prompt: Vec<u32>, max_new_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids: prompt })),
        max_new_tokens,
        ignore_eos: true,
        sampling: Some(SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        }),
        ..Default::default()
    }
}

/// Sends one streaming request and times it; never fails, an error lands in the outcome.
async fn one_request(target: Target, req: GenerateRequest, timeout: Duration) -> Outcome {
    let prompt_tokens = match &req.prompt {
        Some(Prompt::TokenIds(ids)) => ids.ids.len(),
        _ => 0,
    };
    let mut outcome = Outcome {
        prompt_tokens,
        ..Outcome::default()
    };
    let start = Instant::now();
    let run = async {
        match target {
            Target::Grpc(channel) => stream_tokens(channel, req, start, &mut outcome).await,
            Target::OpenAi { addr, model } => {
                stream_http(&addr, &model, req, start, &mut outcome).await
            }
        }
    };
    let result = tokio::time::timeout(timeout, run).await;
    outcome.e2e = start.elapsed().as_secs_f64();
    outcome.error = match result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(_) => Some(format!("timed out after {timeout:?}")),
    };
    outcome
}

async fn stream_tokens(
    channel: Channel,
    req: GenerateRequest,
    start: Instant,
    outcome: &mut Outcome,
) -> std::result::Result<(), String> {
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    let mut stream = InferenceClient::new(channel)
        .generate_stream(req)
        .await
        .map_err(status)?
        .into_inner();
    let mut last: Option<Instant> = None;
    let mut finish = FinishReason::Unspecified;
    let mut usage = None;
    while let Some(message) = stream.message().await.map_err(status)? {
        if !message.token_ids.is_empty() {
            let now = Instant::now();
            match last {
                None => outcome.ttft = (now - start).as_secs_f64(),
                Some(prev) => outcome.itl.push((now - prev).as_secs_f64()),
            }
            last = Some(now);
            outcome.output_tokens += message.token_ids.len();
        }
        if message.finish_reason != FinishReason::Unspecified as i32 {
            finish = FinishReason::try_from(message.finish_reason).unwrap_or(finish);
        }
        usage = message.usage.or(usage);
    }
    if let Some(u) = usage {
        outcome.prompt_tokens = u.prompt_tokens as usize;
        outcome.output_tokens = outcome.output_tokens.max(u.completion_tokens as usize);
    }
    if last.is_none() {
        return Err("the stream ended without any tokens".into());
    }
    if finish == FinishReason::Unspecified {
        return Err("the stream ended without a finish reason".into());
    }
    Ok(())
}

/// The same request as a streamed OpenAI completion; each event with a choice is a
/// token-carrying message, and the usage chunk gives the token counts.
async fn stream_http(
    addr: &str,
    model: &str,
    req: GenerateRequest,
    start: Instant,
    outcome: &mut Outcome,
) -> std::result::Result<(), String> {
    let prompt = match req.prompt {
        Some(Prompt::TokenIds(ids)) => ids.ids,
        _ => return Err("the benchmark sends token ids".into()),
    };
    let body = json!({
        "model": model,
        "prompt": prompt,
        "max_tokens": req.max_new_tokens,
        "temperature": 0,
        "ignore_eos": req.ignore_eos,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let mut last: Option<Instant> = None;
    let mut finish = None;
    let mut usage = None;
    super::openai::stream_completion(addr, &body, |event| {
        if let Some(choice) = event["choices"].get(0) {
            let now = Instant::now();
            match last {
                None => outcome.ttft = (now - start).as_secs_f64(),
                Some(prev) => outcome.itl.push((now - prev).as_secs_f64()),
            }
            last = Some(now);
            if let Some(f) = choice["finish_reason"].as_str() {
                finish = Some(f.to_owned());
            }
        }
        if event["usage"].is_object() {
            usage = Some((
                event["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
                event["usage"]["completion_tokens"].as_u64().unwrap_or(0),
            ));
        }
    })
    .await?;
    let Some((prompt_tokens, completion_tokens)) = usage else {
        return Err("the stream ended without a usage chunk".into());
    };
    outcome.prompt_tokens = prompt_tokens as usize;
    outcome.output_tokens = completion_tokens as usize;
    if last.is_none() {
        return Err("the stream ended without any tokens".into());
    }
    if finish.is_none() {
        return Err("the stream ended without a finish reason".into());
    }
    Ok(())
}

/// Prints `done/total done, n failed` on stderr every second until cancelled.
async fn progress(
    total: usize,
    done: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                let (d, f) = (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
                eprintln!("{}/{total} done, {f} failed", d + f);
            }
        }
    }
}

fn report(args: &ServeArgs, outcomes: &[Outcome], duration: f64) -> Value {
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.error.is_none()).collect();
    let input: usize = ok.iter().map(|o| o.prompt_tokens).sum();
    let output: usize = ok.iter().map(|o| o.output_tokens).sum();
    let ms = |v: Vec<f64>| Dist::of(&v).scaled(1e3).json();
    let ttft = ok.iter().map(|o| o.ttft).collect();
    let e2e = ok.iter().map(|o| o.e2e).collect();
    let tpot = ok
        .iter()
        .filter(|o| o.output_tokens > 1)
        .map(|o| (o.e2e - o.ttft) / (o.output_tokens - 1) as f64)
        .collect();
    let itl = ok.iter().flat_map(|o| o.itl.iter().copied()).collect();
    let per_s = |x: f64| if duration > 0.0 { x / duration } else { 0.0 };
    json!({
        "addr": args.addr,
        "protocol": format!("{:?}", args.protocol).to_lowercase(),
        "requests": args.requests,
        "concurrency": args.cap(),
        "request_rate": args.request_rate,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "seed": args.seed,
        "completed": ok.len(),
        "failed": outcomes.len() - ok.len(),
        "duration_s": duration,
        "total_input_tokens": input,
        "total_output_tokens": output,
        "request_throughput": per_s(ok.len() as f64),
        "input_tokens_per_s": per_s(input as f64),
        "output_tokens_per_s": per_s(output as f64),
        "ttft_ms": ms(ttft),
        "tpot_ms": ms(tpot),
        "itl_ms": ms(itl),
        "e2e_ms": ms(e2e),
        "first_error": outcomes.iter().find_map(|o| o.error.clone()),
    })
}

fn print_report(r: &Value) {
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let concurrency = r["concurrency"]
        .as_u64()
        .map_or("unlimited".to_string(), |c| c.to_string());
    let rate = r["request_rate"]
        .as_f64()
        .map_or("closed loop".to_string(), |x| {
            format!("{x} req/s (Poisson)")
        });
    println!(
        "router {}: {} requests, concurrency {concurrency}, {rate}",
        r["addr"].as_str().unwrap_or(""),
        r["requests"]
    );
    println!(
        "input {} tokens, output {} tokens per request",
        r["input_len"], r["output_len"]
    );
    println!("completed: {:>10}", r["completed"]);
    println!("failed: {:>13}", r["failed"]);
    println!("duration: {:>14.2} s", f("duration_s"));
    println!("request throughput: {:>8.2} req/s", f("request_throughput"));
    println!("input tokens: {:>14.1} tok/s", f("input_tokens_per_s"));
    println!("output tokens: {:>13.1} tok/s", f("output_tokens_per_s"));
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "ms", "mean", "p50", "p90", "p99", "max"
    );
    for (name, key) in [
        ("TTFT", "ttft_ms"),
        ("TPOT", "tpot_ms"),
        ("ITL", "itl_ms"),
        ("E2E", "e2e_ms"),
    ] {
        let d = &r[key];
        let g = |k: &str| d[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{name:<10} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
            g("mean"),
            g("p50"),
            g("p90"),
            g("p99"),
            g("max")
        );
    }
    if let Some(e) = r["first_error"].as_str() {
        println!("first error: {e}");
    }
}

/// Mean and percentiles of a sample, percentiles interpolated linearly between the closest
/// ranks (numpy's default, which vLLM and SGLang report). An empty sample gives zeros.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Dist {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    /// The largest value: a stall (an epoch switch) shows as one long inter-token gap.
    pub max: f64,
}

impl Dist {
    pub(super) fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            let pos = p / 100.0 * (sorted.len() - 1) as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
        };
        Self {
            mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
            p50: pct(50.0),
            p90: pct(90.0),
            p99: pct(99.0),
            max: sorted[sorted.len() - 1],
        }
    }

    pub(super) fn scaled(self, k: f64) -> Self {
        Self {
            mean: self.mean * k,
            p50: self.p50 * k,
            p90: self.p90 * k,
            p99: self.p99 * k,
            max: self.max * k,
        }
    }

    pub(super) fn json(&self) -> Value {
        json!({"mean": self.mean, "p50": self.p50, "p90": self.p90, "p99": self.p99, "max": self.max})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        // numpy.percentile([1, 2, 3, 4], [50, 90, 99]) == [2.5, 3.7, 3.97]
        let d = Dist::of(&[4.0, 1.0, 3.0, 2.0]);
        assert_eq!(d.mean, 2.5);
        assert!((d.p50 - 2.5).abs() < 1e-12);
        assert!((d.p90 - 3.7).abs() < 1e-12);
        assert!((d.p99 - 3.97).abs() < 1e-12);
        assert_eq!(d.max, 4.0);
        assert_eq!(Dist::of(&[]), Dist::default());
        assert_eq!(Dist::of(&[7.0]).p99, 7.0);
    }

    #[test]
    fn tpot_and_ttft_follow_the_published_definitions() {
        let outcomes = vec![
            Outcome {
                prompt_tokens: 8,
                output_tokens: 5,
                ttft: 0.1,
                e2e: 0.5,
                itl: vec![0.1; 4],
                ..Outcome::default()
            },
            Outcome {
                prompt_tokens: 8,
                output_tokens: 1,
                ttft: 0.2,
                e2e: 0.2,
                ..Outcome::default()
            },
            Outcome {
                error: Some("boom".into()),
                ..Outcome::default()
            },
        ];
        let args = ServeArgs {
            addr: "x".into(),
            protocol: Protocol::Grpc,
            requests: 3,
            concurrency: None,
            request_rate: None,
            input_len: 8,
            output_len: 5,
            seed: 0,
            vocab: 400,
            request_timeout_s: 1,
            max_duration_s: 1,
            json: true,
        };
        let r = report(&args, &outcomes, 2.0);
        assert_eq!(r["completed"], 2);
        assert_eq!(r["failed"], 1);
        assert_eq!(r["concurrency"], 32);
        // TPOT only from the request with more than one token: (0.5 − 0.1) / 4 s.
        assert!((r["tpot_ms"]["mean"].as_f64().unwrap_or(0.0) - 100.0).abs() < 1e-9);
        assert!((r["ttft_ms"]["mean"].as_f64().unwrap_or(0.0) - 150.0).abs() < 1e-9);
        assert!((r["output_tokens_per_s"].as_f64().unwrap_or(0.0) - 3.0).abs() < 1e-9);
        assert_eq!(r["first_error"], "boom");
    }

    #[test]
    fn defaults_validate() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let cli = Cli::try_parse_from(["serve"]).expect("defaults parse");
        cli.serve.validate().expect("defaults validate");
        assert_eq!(cli.serve.cap(), Some(DEFAULT_CONCURRENCY));
    }
}
