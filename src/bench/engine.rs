//! `moebius bench engine`: prefill and decode throughput of one rank on a checkpoint, and how
//! close decode comes to the memory-bandwidth limit of reading the weights once per step. The
//! rank is an engine thread running the loop every worker runs; step times are read off the
//! arrival of the tokens each step makes. The bandwidth ([`Roofline`]) is measured before and
//! after every timed pass, and each batch-1 pass is held against the mean of the two: the
//! reported `decode_ceiling_ratio` is the median of those ratios.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use moebius_worker::backend::{AnyBackend, Device};
use moebius_worker::comm::local_group;
use moebius_worker::engine::{
    EngineHandle, EngineOptions, GenerateRequest, Installation, LoadedModel, OnGroupFailure, Tagged,
};
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::roofline::Roofline;

#[derive(Args, Debug)]
pub struct EngineArgs {
    /// Checkpoint directory.
    #[arg(long, env = "MOEBIUS_MODEL")]
    model: PathBuf,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Decode steps timed after the prefill.
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Batch sizes to measure, comma-separated.
    #[arg(long, default_value = "1,16", value_delimiter = ',')]
    batch: Vec<usize>,
    /// CPU threads for products (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Random prompt seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Times each batch is measured (fresh prompts each time); the median is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Round activations to bf16 in prefill-sized products with bf16 weights (AVX512-BF16),
    /// as PyTorch's bf16 path does; less precise than the default f32 activations.
    #[arg(long)]
    bf16_activations: bool,
    /// Where the products run: cpu, or cuda / cuda:N (GPU N; a moebius built with
    /// `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: EngineArgs) -> Result<()> {
    if args.prompt_len == 0
        || args.decode_tokens == 0
        || args.repeats == 0
        || args.batch.contains(&0)
    {
        bail!("--prompt-len, --decode-tokens, --repeats and every --batch must be at least 1");
    }
    let started = Instant::now();
    let backend = AnyBackend::open(args.device, args.threads, args.bf16_activations)?;
    let fp8_tensor_cores = backend.fp8_tensor_cores();
    let model = LoadedModel::open_with(&args.model, backend)?;
    let load_s = started.elapsed().as_secs_f64();
    let mut roofline = Roofline::new(&model.shared.backend);
    let expert_bytes = model.rank_models(1)?[0]
        .experts
        .bytes(&*model.shared.backend);
    let step_bytes = decode_bytes_per_step(&model, expert_bytes);
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let mut rows = Vec::new();
    let mut bandwidths = Vec::new();
    warm_up(&model, args.prompt_len, args.threads, &mut rng)?;
    for &batch in &args.batch {
        let engine = one_rank(&model, batch * args.prompt_len, args.threads)?;
        let mut prefill = Vec::with_capacity(args.repeats);
        let mut decode = Vec::with_capacity(args.repeats);
        let mut of_ceiling = Vec::with_capacity(args.repeats);
        let (mut waits, mut moved, mut launches) = (Vec::new(), Vec::new(), Vec::new());
        let mut before = roofline.measure();
        bandwidths.push(before);
        for _ in 0..args.repeats {
            let Run {
                prefill_s,
                decode_s,
                gpu,
            } = measure(&engine, &model, &args, batch, &mut rng)?;
            if let Some(gpu) = gpu {
                waits.push(gpu.waits);
                moved.push(gpu.bytes);
                launches.push(gpu.launches);
            }
            let after = roofline.measure();
            bandwidths.push(after);
            let tok_s = (batch * args.decode_tokens) as f64 / decode_s;
            let ceiling = (before + after) / 2.0 * 1e9 / step_bytes as f64;
            prefill.push((batch * args.prompt_len) as f64 / prefill_s);
            decode.push(tok_s);
            of_ceiling.push(tok_s / ceiling);
            before = after;
        }
        let decode_tok_s = median(&mut decode);
        let mut row = json!({
            "batch": batch, "prompt_len": args.prompt_len, "decode_tokens": args.decode_tokens,
            "repeats": args.repeats,
            "prefill_tok_s": median(&mut prefill), "decode_tok_s": decode_tok_s,
            "decode_step_ms": batch as f64 * 1e3 / decode_tok_s,
        });
        if batch == 1 {
            row["decode_ceiling_ratio"] = json!(median(&mut of_ceiling));
        }
        if !waits.is_empty() {
            row["gpu_waits_per_decode_step"] = json!(median(&mut waits));
            row["gpu_mb_moved_per_decode_step"] = json!(median(&mut moved) / 1e6);
            row["gpu_launches_per_decode_step"] = json!(median(&mut launches));
        }
        rows.push(row);
    }
    let bandwidth = median(&mut bandwidths.clone());
    let ceiling = bandwidth * 1e9 / step_bytes as f64;
    let report = json!({
        "model": args.model.display().to_string(),
        "threads": args.threads,
        "kernels": moebius_worker::backend::kernels::active().name(),
        "bf16_activations": args.bf16_activations,
        "fp8_tensor_cores": fp8_tensor_cores,
        "device": args.device.to_string(),
        "repeats": args.repeats,
        "load_s": load_s,
        "weights_bytes": model.shared.bytes() + expert_bytes,
        "decode_bytes_per_step": step_bytes,
        "read_bandwidth_gb_s": bandwidth,
        "read_bandwidth_samples_gb_s": bandwidths,
        "batch1_decode_ceiling_tok_s": ceiling,
        "results": rows,
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "model {} loaded in {load_s:.1}s; {} kernels",
            args.model.display(),
            moebius_worker::backend::kernels::active().name()
        );
        println!(
            "decode reads {:.1} MB of weights per step; memory read bandwidth {bandwidth:.1} GB/s (median of {} measurements) -> batch-1 ceiling {ceiling:.1} tok/s",
            step_bytes as f64 / 1e6,
            bandwidths.len()
        );
        println!(
            "{:>6} {:>14} {:>14} {:>16} {:>16} {:>16} {:>18}",
            "batch",
            "prefill tok/s",
            "decode tok/s",
            "decode step ms",
            "decode/ceiling",
            "GPU waits/step",
            "GPU launches/step"
        );
        for r in report["results"].as_array().into_iter().flatten() {
            let of_ceiling = r["decode_ceiling_ratio"]
                .as_f64()
                .map_or(String::new(), |v| format!("{v:.2}"));
            let count = |key: &str| r[key].as_f64().map_or(String::new(), |v| format!("{v:.0}"));
            let (waits, launches) = (
                count("gpu_waits_per_decode_step"),
                count("gpu_launches_per_decode_step"),
            );
            println!(
                "{:>6} {:>14.1} {:>14.1} {:>16.2} {of_ceiling:>16} {waits:>16} {launches:>18}",
                r["batch"],
                r["prefill_tok_s"].as_f64().unwrap_or(0.0),
                r["decode_tok_s"].as_f64().unwrap_or(0.0),
                r["decode_step_ms"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}

/// An engine thread for a group of one rank holding every expert, stepping.
fn one_rank(model: &LoadedModel, token_budget: usize, threads: usize) -> Result<EngineHandle> {
    let rank = model.rank_models(1)?.pop().context("one rank")?;
    let comm = local_group(1).pop().context("one end")?;
    let engine = EngineHandle::spawn(EngineOptions {
        token_budget,
        kv_cache_tokens: None,
        on_group_failure: OnGroupFailure::Fail,
        metrics: None,
        threads,
    })?;
    // Commands are handled in order: the requests that follow find the model installed.
    drop(engine.install(Installation {
        epoch: 1,
        rank: 0,
        model: rank,
        comm: Box::new(comm),
        reload: Default::default(),
    }));
    engine.resume(1)?;
    Ok(engine)
}

/// One pass over `batch` fresh random prompts on an idle engine: the prefill step's seconds and
/// the seconds of `decode_tokens` decode steps (after one untimed decode step). Token `k` of
/// every sequence comes out of step `k + 1`, so a step ends when its token of the last
/// sequence arrives. Runs the sequences to their end, so the engine is idle again afterwards.
/// One run of `batch` sequences.
struct Run {
    /// Seconds to the first token.
    prefill_s: f64,
    /// Seconds of the decode steps after the second token.
    decode_s: f64,
    /// On a GPU, per decode step: counted as the steps' tokens arrive here, so the count may
    /// take in a step's worth more or less.
    gpu: Option<GpuPerStep>,
}

/// The waits for the GPU, the bytes moved to and from it and the kernels launched, per decode
/// step.
struct GpuPerStep {
    waits: f64,
    bytes: f64,
    launches: f64,
}

fn measure(
    engine: &EngineHandle,
    model: &LoadedModel,
    args: &EngineArgs,
    batch: usize,
    rng: &mut rand::rngs::StdRng,
) -> Result<Run> {
    let vocab = model.config.vocab_size as u32;
    let tokens = args.decode_tokens + 2;
    let (tx, rx) = mpsc::channel();
    let started = Instant::now();
    for index in 0..batch {
        let prompt = (0..args.prompt_len)
            .map(|_| rng.random_range(0..vocab))
            .collect();
        let request = GenerateRequest {
            ignore_eos: true,
            ..GenerateRequest::greedy(prompt, tokens)
        };
        let sink = Tagged {
            index,
            tx: tx.clone(),
        };
        engine.submit(request, Box::new(sink))?;
    }
    drop(tx);
    let mut made = vec![0usize; batch];
    let mut done_at = vec![0usize; tokens];
    let mut step_end = vec![0.0f64; tokens];
    let mut gpu_at = vec![None; tokens];
    for (index, event) in rx {
        event.map_err(|e| anyhow!("a benchmark sequence failed: {e}"))?;
        let k = made[index];
        made[index] += 1;
        done_at[k] += 1;
        if done_at[k] == batch {
            step_end[k] = started.elapsed().as_secs_f64();
            gpu_at[k] = gpu_transfers(&model.shared.backend);
        }
    }
    if made.iter().any(|&m| m != tokens) {
        bail!("a benchmark sequence ended early: {made:?} of {tokens} tokens");
    }
    let gpu = match (gpu_at[1], gpu_at[tokens - 1]) {
        (Some(t0), Some(t1)) => {
            let steps = (tokens - 2) as f64;
            let per_step = |a: u64, b: u64| (b - a) as f64 / steps;
            Some(GpuPerStep {
                waits: per_step(t0.waits, t1.waits),
                bytes: per_step(t0.uploaded + t0.downloaded, t1.uploaded + t1.downloaded),
                launches: per_step(t0.launches, t1.launches),
            })
        }
        _ => None,
    };
    Ok(Run {
        prefill_s: step_end[0],
        decode_s: step_end[tokens - 1] - step_end[1],
        gpu,
    })
}

/// A GPU backend's waits, bytes moved and launches so far; `None` on the CPU.
fn gpu_transfers(backend: &AnyBackend) -> Option<GpuCounts> {
    match backend {
        #[cfg(feature = "cuda")]
        AnyBackend::Cuda(gpu) => {
            let t = gpu.transfers();
            Some(GpuCounts {
                waits: t.waits,
                uploaded: t.uploaded,
                downloaded: t.downloaded,
                launches: t.launches,
            })
        }
        AnyBackend::Cpu(_) => None,
    }
}

/// [`gpu_transfers`]' counts, in a build with or without the GPU backend.
#[derive(Debug, Clone, Copy)]
struct GpuCounts {
    waits: u64,
    uploaded: u64,
    downloaded: u64,
    launches: u64,
}

/// The median of `values` (the mean of the middle two for an even count).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// One untimed prefill and decode step, so page faults and thread-pool start-up are not timed.
fn warm_up(
    model: &LoadedModel,
    prompt_len: usize,
    threads: usize,
    rng: &mut rand::rngs::StdRng,
) -> Result<()> {
    let engine = one_rank(model, prompt_len, threads)?;
    let prompt = (0..prompt_len)
        .map(|_| rng.random_range(0..model.config.vocab_size as u32))
        .collect();
    let (tx, rx) = mpsc::channel();
    engine.submit(
        GenerateRequest::greedy(prompt, 2),
        Box::new(Tagged { index: 0, tx }),
    )?;
    for (_, event) in rx {
        event.map_err(|e| anyhow!("the warm-up sequence failed: {e}"))?;
    }
    engine.stop();
    Ok(())
}

/// Weight bytes one batch-1 decode step must read: the replicated weights decode reads (see
/// `SharedWeights::decode_bytes`), plus `top_k` experts per MoE layer.
fn decode_bytes_per_step(model: &LoadedModel, all_expert_bytes: usize) -> usize {
    let c = &model.config;
    let moe_layers = (0..c.num_hidden_layers)
        .filter(|&l| c.is_moe_layer(l))
        .count();
    let per_layer_expert = all_expert_bytes / (moe_layers * c.n_routed_experts).max(1);
    model.shared.decode_bytes() + moe_layers * c.num_experts_per_tok * per_layer_expert
}
