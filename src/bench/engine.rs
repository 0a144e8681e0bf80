//! `moebius bench engine`: prefill and decode throughput of one rank on a checkpoint, and how
//! close decode comes to the memory-bandwidth limit of reading the weights once per step. The
//! rank is an engine thread running the loop every worker runs; step times are read off the
//! arrival of the tokens each step makes. The bandwidth is the best of three reads of a buffer
//! far larger than the caches on every core: a plain sum, the f32 matrix-vector product, and the
//! best packed bf16 product this CPU has (whatever `--kernels` forces for the run itself).

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
    let model = LoadedModel::open_with(&args.model, backend)?;
    let load_s = started.elapsed().as_secs_f64();
    let bandwidth = read_bandwidth_gbs()
        .max(gemv_bandwidth_gbs(&model))
        .max(bf16_gemv_bandwidth_gbs());
    let expert_bytes = model.rank_models(1)?[0]
        .experts
        .bytes(&*model.shared.backend);
    let step_bytes = decode_bytes_per_step(&model, expert_bytes);
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let mut rows = Vec::new();
    warm_up(&model, args.prompt_len, args.threads, &mut rng)?;
    for &batch in &args.batch {
        let engine = one_rank(&model, batch * args.prompt_len, args.threads)?;
        let mut prefill = Vec::with_capacity(args.repeats);
        let mut decode = Vec::with_capacity(args.repeats);
        for _ in 0..args.repeats {
            let (prefill_s, decode_s) = measure(&engine, &model, &args, batch, &mut rng)?;
            prefill.push((batch * args.prompt_len) as f64 / prefill_s);
            decode.push((batch * args.decode_tokens) as f64 / decode_s);
        }
        let decode_tok_s = median(&mut decode);
        rows.push(json!({
            "batch": batch, "prompt_len": args.prompt_len, "decode_tokens": args.decode_tokens,
            "repeats": args.repeats,
            "prefill_tok_s": median(&mut prefill), "decode_tok_s": decode_tok_s,
            "decode_step_ms": batch as f64 * 1e3 / decode_tok_s,
        }));
    }
    let ceiling = bandwidth * 1e9 / step_bytes as f64;
    let report = json!({
        "model": args.model.display().to_string(),
        "threads": args.threads,
        "kernels": moebius_worker::backend::kernels::active().name(),
        "bf16_activations": args.bf16_activations,
        "device": args.device.to_string(),
        "repeats": args.repeats,
        "load_s": load_s,
        "weights_bytes": model.shared.bytes() + expert_bytes,
        "decode_bytes_per_step": step_bytes,
        "read_bandwidth_gb_s": bandwidth,
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
            "decode reads {:.1} MB of weights per step; memory read bandwidth {bandwidth:.1} GB/s -> batch-1 ceiling {ceiling:.1} tok/s",
            step_bytes as f64 / 1e6
        );
        println!(
            "{:>6} {:>14} {:>14} {:>16}",
            "batch", "prefill tok/s", "decode tok/s", "decode step ms"
        );
        for r in report["results"].as_array().into_iter().flatten() {
            println!(
                "{:>6} {:>14.1} {:>14.1} {:>16.2}",
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
fn measure(
    engine: &EngineHandle,
    model: &LoadedModel,
    args: &EngineArgs,
    batch: usize,
    rng: &mut rand::rngs::StdRng,
) -> Result<(f64, f64)> {
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
    for (index, event) in rx {
        event.map_err(|e| anyhow!("a benchmark sequence failed: {e}"))?;
        let k = made[index];
        made[index] += 1;
        done_at[k] += 1;
        if done_at[k] == batch {
            step_end[k] = started.elapsed().as_secs_f64();
        }
    }
    if made.iter().any(|&m| m != tokens) {
        bail!("a benchmark sequence ended early: {made:?} of {tokens} tokens");
    }
    Ok((step_end[0], step_end[tokens - 1] - step_end[1]))
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

/// Sustained read bandwidth of this machine in GB/s: sums a buffer far larger than the caches
/// with every core, the way decode streams its weights.
fn read_bandwidth_gbs() -> f64 {
    let len = 256 << 20; // 1 GiB of f32
    let data = vec![1.0f32; len];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let total: f32 = std::thread::scope(|s| {
            let chunks = data.chunks(len.div_ceil(threads));
            let handles: Vec<_> = chunks.map(|c| s.spawn(move || lane_sum(c))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        std::hint::black_box(total);
        best = best.max((len * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Read bandwidth that the backend's own matrix-vector product reaches on a 256 MiB weight:
/// the practical roofline of a batch-1 decode step on this machine.
fn gemv_bandwidth_gbs(model: &LoadedModel) -> f64 {
    use moebius_worker::backend::Backend;
    let (rows, cols) = (16384, 4096);
    let backend = &*model.shared.backend;
    let w = backend.matrix(rows, cols, vec![0.5; rows * cols]);
    let x = vec![1.0f32; cols];
    let mut out = vec![0.0f32; rows];
    let mut best = 0.0f64;
    for _ in 0..5 {
        let t = Instant::now();
        backend.linear(&x, 1, &w, &mut out);
        std::hint::black_box(&out);
        best = best.max((rows * cols * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Read bandwidth of the best packed bf16 product this CPU has on a 256 MiB weight, on every
/// core: the weights of a decode step are bf16, so this is how fast they can stream, whichever
/// family `--kernels` forces for the rest of the run.
fn bf16_gemv_bandwidth_gbs() -> f64 {
    use moebius_worker::backend::{kernels, packed};
    let (rows, cols) = (16384, 8192);
    let w = packed::PackedBf16::pack(rows, cols, &vec![0x3f00; rows * cols]);
    let x = vec![1.0f32; cols];
    let mut out = vec![0.0f32; rows];
    let mut best = 0.0f64;
    for _ in 0..5 {
        let t = Instant::now();
        packed::matmul_with(kernels::Family::best(), &x, 1, &w, &mut out, true);
        std::hint::black_box(&out);
        best = best.max(w.bytes() as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Sums with sixteen independent accumulators so the loop vectorises and is bound by memory,
/// not by the latency of one chain of additions.
fn lane_sum(data: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let chunks = data.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (l, v) in lanes.iter_mut().zip(chunk) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + tail
}
