//! The memory bandwidth a batch-1 decode step can use: the best of three reads of buffers far
//! larger than the caches on every core (a plain sum, the backend's f32 matrix-vector product,
//! and the best packed bf16 product this CPU has, whatever `--kernels` forces for the run).
//!
//! A shared machine's bandwidth moves from one second to the next (on a 2-core cloud VM, reads
//! of 34 GB/s with bursts to 52), so the engine benchmark measures it again around every timed
//! pass and holds each pass against the bandwidth of its own moment. The buffers are made once,
//! so that a measurement reads memory instead of faulting pages in.

use std::time::Instant;

use moebius_worker::backend::device::AnyMatrix;
use moebius_worker::backend::{kernels, packed, AnyBackend, Backend};

/// Floats of the plain read: 1 GiB.
const READ_LEN: usize = 256 << 20;
/// The f32 product's matrix: 256 MiB.
const GEMV_SHAPE: (usize, usize) = (16384, 4096);
/// The bf16 product's matrix: 256 MiB.
const BF16_SHAPE: (usize, usize) = (16384, 8192);

pub struct Roofline<'a> {
    backend: &'a AnyBackend,
    data: Vec<f32>,
    gemv: AnyMatrix,
    bf16: packed::PackedBf16,
    x: Vec<f32>,
    out: Vec<f32>,
}

impl<'a> Roofline<'a> {
    /// The buffers of the three reads, with `backend`'s matrix for the f32 product.
    pub fn new(backend: &'a AnyBackend) -> Self {
        let (rows, cols) = GEMV_SHAPE;
        let gemv = backend.matrix(rows, cols, vec![0.5; rows * cols]);
        let (rows, cols) = BF16_SHAPE;
        let bf16 = packed::PackedBf16::pack(rows, cols, &vec![0x3f00; rows * cols]);
        Self {
            backend,
            data: vec![1.0; READ_LEN],
            gemv,
            bf16,
            x: vec![1.0; GEMV_SHAPE.1.max(BF16_SHAPE.1)],
            out: vec![0.0; GEMV_SHAPE.0.max(BF16_SHAPE.0)],
        }
    }

    /// The bandwidth now, in GB/s: the best of the three reads.
    pub fn measure(&mut self) -> f64 {
        self.read().max(self.gemv()).max(self.bf16())
    }

    /// Sums the buffer with every core, the way decode streams its weights; best of 3.
    fn read(&self) -> f64 {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        best_of(3, self.data.len() * 4, || {
            let total: f32 = std::thread::scope(|s| {
                let chunks = self.data.chunks(self.data.len().div_ceil(threads));
                let handles: Vec<_> = chunks.map(|c| s.spawn(move || lane_sum(c))).collect();
                handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
            });
            std::hint::black_box(total);
        })
    }

    /// The backend's own matrix-vector product: the practical roofline of a decode step on
    /// this device; best of 5.
    fn gemv(&mut self) -> f64 {
        let (rows, cols) = GEMV_SHAPE;
        let (backend, w) = (self.backend, &self.gemv);
        let (x, out) = (&self.x[..cols], &mut self.out[..rows]);
        best_of(5, rows * cols * 4, || {
            backend.linear(x, 1, w, out);
            std::hint::black_box(&*out);
        })
    }

    /// The best packed bf16 product this CPU has: the weights of a decode step are bf16, so
    /// this is how fast they can stream; best of 5.
    fn bf16(&mut self) -> f64 {
        let (rows, cols) = BF16_SHAPE;
        let (w, x, out) = (&self.bf16, &self.x[..cols], &mut self.out[..rows]);
        best_of(5, w.bytes(), || {
            packed::matmul_with(kernels::Family::best(), x, 1, w, out, true);
            std::hint::black_box(&*out);
        })
    }
}

/// The best GB/s of `passes` runs of `read`, each reading `bytes`.
fn best_of(passes: usize, bytes: usize, mut read: impl FnMut()) -> f64 {
    (0..passes)
        .map(|_| {
            let t = Instant::now();
            read();
            bytes as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
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
