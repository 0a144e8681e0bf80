//! `moebius bench products`: the backend's products with a weight as the engine calls them
//! (activations from the host and back), at the weight shapes and activation rows given, in the
//! weight dtype given: the median time of each, its TFLOP/s, and the weight bytes it read per
//! second. Each run takes the next of enough copies of the weight (256 MiB in all) that it
//! comes from memory, not from a cache, as in a decode step. On a GPU this is what `scripts/gpu_check.sh` sets against cuBLAS' own peak measured
//! in the same run; on a CPU, what a kernel family reaches beside the bandwidth of
//! `bench engine`.

use std::time::Instant;

use anyhow::Result;
use clap::{Args, ValueEnum};
use moebius_worker::backend::{AnyBackend, Backend, Device};
use moebius_worker::checkpoint::Fp8Blocks;
use serde_json::json;

use crate::cmd::UsageError;

#[derive(Args, Debug)]
pub struct ProductsArgs {
    /// Weight shapes, `OUTxIN` (rows × columns: out and in features), comma-separated.
    #[arg(
        long,
        default_value = "1024x1024,1024x512,32000x1024",
        value_delimiter = ','
    )]
    shapes: Vec<String>,
    /// Activation rows of each product, comma-separated: 1 is a decode step's, more a prefill's.
    #[arg(long, default_value = "1,16,256", value_delimiter = ',')]
    rows: Vec<usize>,
    /// The weights' dtype: bf16, f32, or fp8 (E4M3FN in 128×128 blocks, as DeepSeek-V3).
    #[arg(long, value_enum, default_value_t = WeightDtype::Bf16)]
    dtype: WeightDtype,
    /// Where the products run: cpu, or cuda / cuda:N (a moebius built with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// CPU threads for products (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Timed runs of each product, after one untimed; the median is reported.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum WeightDtype {
    Bf16,
    F32,
    Fp8,
}

/// Bytes of weight copies a run cycles through: past a CPU's last-level cache and a GPU's L2.
const COLD_BYTES: usize = 256 << 20;
/// At most this many copies of one weight.
const MAX_COPIES: usize = 64;

/// FP8 block side, as DeepSeek-V3's checkpoints have it.
const FP8_BLOCK: usize = 128;

pub fn run(args: ProductsArgs) -> Result<()> {
    if args.repeats == 0 || args.rows.contains(&0) {
        let why = "--repeats and every --rows must be at least 1";
        return Err(UsageError(why.into()).into());
    }
    let shapes = args
        .shapes
        .iter()
        .map(|s| parse_shape(s))
        .collect::<Result<Vec<_>>>()?;
    let backend = AnyBackend::open(args.device, args.threads, false)?;
    let mut results = Vec::new();
    for &(out, inputs) in &shapes {
        // Copies enough to leave the caches between two runs on the same one, as a decode
        // step's weights do: each run takes the next.
        let first = weight(&backend, args.dtype, out, inputs);
        let bytes = backend.matrix_bytes(&first);
        let copies = COLD_BYTES.div_ceil(bytes.max(1)).clamp(1, MAX_COPIES);
        let weights: Vec<_> = std::iter::once(first)
            .chain((1..copies).map(|_| weight(&backend, args.dtype, out, inputs)))
            .collect();
        for &m in &args.rows {
            let x: Vec<f32> = (0..m * inputs).map(|i| value(i, 7)).collect();
            let mut y = vec![0.0f32; m * out];
            backend.linear(&x, m, &weights[copies - 1], &mut y);
            let mut times: Vec<f64> = (0..args.repeats)
                .map(|run| {
                    let w = &weights[run % copies];
                    let t = Instant::now();
                    backend.linear(&x, m, w, &mut y);
                    std::hint::black_box(&y);
                    t.elapsed().as_secs_f64()
                })
                .collect();
            times.sort_by(f64::total_cmp);
            let seconds = times[times.len() / 2];
            results.push(json!({
                "rows": m, "out": out, "in": inputs, "seconds": seconds,
                "tflop_s": 2.0 * (m * out * inputs) as f64 / seconds / 1e12,
                "weight_gb_s": bytes as f64 / seconds / 1e9,
            }));
        }
    }
    let report = json!({
        "device": args.device.to_string(),
        "kernels": moebius_worker::backend::kernels::active().name(),
        "dtype": format!("{:?}", args.dtype).to_lowercase(),
        "fp8_tensor_cores": backend.fp8_tensor_cores(),
        "repeats": args.repeats,
        "results": results,
    });
    if args.json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "{} weights on {} (median of {}; activations from the host and back)",
        report["dtype"].as_str().unwrap_or("?"),
        args.device,
        args.repeats
    );
    println!(
        "{:>6} {:>12} {:>12} {:>10} {:>12}",
        "rows", "weight", "time us", "TFLOP/s", "weight GB/s"
    );
    for r in &results {
        println!(
            "{:>6} {:>12} {:>12.1} {:>10.3} {:>12.1}",
            r["rows"].as_u64().unwrap_or(0),
            format!("{}x{}", r["out"], r["in"]),
            r["seconds"].as_f64().unwrap_or(0.0) * 1e6,
            r["tflop_s"].as_f64().unwrap_or(0.0),
            r["weight_gb_s"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}

/// `OUTxIN` as (out, in), both at least 1.
fn parse_shape(s: &str) -> Result<(usize, usize)> {
    let parsed = s
        .split_once('x')
        .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)));
    match parsed {
        Some((out, inputs)) if out > 0 && inputs > 0 => Ok((out, inputs)),
        _ => Err(UsageError(format!(
            "--shapes: {s:?} is not OUTxIN with both at least 1 (e.g. 1024x512)"
        ))
        .into()),
    }
}

/// A weight `[out, inputs]` of deterministic values in `dtype`, on the backend.
fn weight(
    backend: &AnyBackend,
    dtype: WeightDtype,
    out: usize,
    inputs: usize,
) -> <AnyBackend as Backend>::Matrix {
    let values = || (0..out * inputs).map(|i| value(i, 1) * 0.05);
    match dtype {
        WeightDtype::F32 => backend.matrix(out, inputs, values().collect()),
        WeightDtype::Bf16 => backend.matrix_bf16(
            out,
            inputs,
            values()
                .map(|v| half::bf16::from_f32(v).to_bits())
                .collect(),
        ),
        WeightDtype::Fp8 => {
            // Codes of magnitude up to 2^-1 with either sign (never the NaN codes 0x7f, 0xff).
            let codes = (0..out * inputs).map(|i| (i * 37 % 0x38) as u8 | ((i & 1) << 7) as u8);
            let blocks = out.div_ceil(FP8_BLOCK) * inputs.div_ceil(FP8_BLOCK);
            backend.matrix_fp8(Fp8Blocks {
                rows: out,
                cols: inputs,
                codes: codes.collect(),
                scales: vec![0.1; blocks],
                block: (FP8_BLOCK, FP8_BLOCK),
            })
        }
    }
}

/// A value in [-1, 1) that varies with `i`, without a random-number generator.
fn value(i: usize, salt: usize) -> f32 {
    ((i * 7919 + salt * 104_729) % 2003) as f32 / 1001.5 - 1.0
}
