//! Read bandwidth of the packed bf16 matrix-vector product (one activation row, as in a decode
//! step) per kernel family, on the shapes of the bench model's products and on one large
//! matrix, on one thread and on all of them; best of 5 passes over enough copies of each
//! matrix to leave the caches.
//!
//!     cargo run --release -p moebius-worker --example gemv_bandwidth [families]
//!
//! `families` is a comma-separated list of `--kernels` names (default: every family this CPU
//! has). It runs inside a thread pool of its own, as an engine thread does.

use std::time::Instant;

use moebius_worker::backend::{kernels::Family, packed};

/// (rows, cols, copies): an expert's projections, an attention projection, the LM head, and
/// one 256 MiB matrix.
const SHAPES: [(usize, usize, usize); 5] = [
    (512, 1024, 200),
    (1024, 512, 200),
    (1536, 384, 200),
    (32000, 1024, 4),
    (16384, 8192, 1),
];

fn main() {
    let families: Vec<Family> = match std::env::args().nth(1) {
        Some(list) => list
            .split(',')
            .map(|name| match Family::parse(name) {
                Some(f) if f.supported() => f,
                _ => {
                    eprintln!("gemv_bandwidth: this CPU cannot run kernels named {name}");
                    std::process::exit(2);
                }
            })
            .collect(),
        None => Family::supported_here(),
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .build()
        .expect("a thread pool");
    pool.install(|| measure(&families));
}

fn measure(families: &[Family]) {
    println!("family      shape          threads  GB/s");
    for (rows, cols, copies) in SHAPES {
        let weights: Vec<_> = (0..copies)
            .map(|i| packed::PackedBf16::pack(rows, cols, &vec![0x3f00 + i as u16; rows * cols]))
            .collect();
        let x = vec![1.0f32; cols];
        let mut out = vec![0.0f32; rows];
        for &family in families {
            for parallel in [false, true] {
                let mut best = 0.0f64;
                for _ in 0..5 {
                    let t = Instant::now();
                    for w in &weights {
                        packed::matmul_with(family, &x, 1, w, &mut out, parallel);
                    }
                    let bytes = weights.iter().map(|w| w.bytes()).sum::<usize>();
                    best = best.max(bytes as f64 / t.elapsed().as_secs_f64() / 1e9);
                }
                let threads = if parallel { "all" } else { "one" };
                println!(
                    "{:<11} {:<14} {threads:>7}  {best:.1}",
                    family.name(),
                    format!("{rows}x{cols}")
                );
            }
        }
    }
}
