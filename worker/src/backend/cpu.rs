//! The CPU backend: f32 weights and activation products through the `gemm` crate (f32 weights
//! against at most 16 rows through [`super::f32_rows`]), bf16 and FP8 weights through the packed
//! kernels of [`super::packed`] and [`super::packed_fp8`]; `f32` accumulation, both cores for
//! products big enough to pay for the fork.
//!
//! Weights a checkpoint stores as bf16 stay bf16 in memory: a decode step is bound by the bytes
//! of weights it reads, so half the bytes is nearly twice the speed. `gemm` has no bf16
//! operands, hence the packed kernels.

use gemm::Parallelism;
use rayon::prelude::*;

use super::attend::{attend_host, HostRows};
use super::blocks::STREAM_ROWS;
use super::f32_rows;
use super::packed::{self, PackedBf16, Weights};
use super::packed_fp8::{self, PackedFp8};
use super::{mlp_by_products, silu_mul, Backend, MlpRun, Product, View};
use crate::checkpoint::Fp8Blocks;

/// Products with fewer multiply-adds than this run on one thread. A decode step's products
/// (one row) are bound by reading their weights, and one core alone does not draw the memory
/// bandwidth that two do: splitting every product from 512 KiB of bf16 weights up (the bound was
/// 1 << 22) took batch-1 decode of the bench model from 44 to 52-62 tok/s on a 2-core Xeon.
const PARALLEL_MIN_FLOPS: usize = 1 << 18;

thread_local! {
    /// Set while this thread runs one of [`Backend::map_tasks`]'s tasks: the tasks already keep
    /// every thread busy, so products inside them run on their own thread.
    static IN_TASK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Products with more input rows than this (prefill-sized) round activations to bf16 when the
/// backend is asked to; decode steps, bound by reading the weights, keep f32 either way.
const BF16_MIN_ROWS: usize = 8;

/// A weight matrix in host memory.
#[derive(Debug)]
pub struct CpuMatrix {
    rows: usize,
    cols: usize,
    data: Storage,
}

#[derive(Debug)]
enum Storage {
    F32(Vec<f32>),
    /// bf16, packed for [`packed`]'s kernels, which widen it to f32 in registers.
    Bf16(PackedBf16),
    /// Block-quantised FP8, packed for [`packed_fp8`].
    Fp8(PackedFp8),
}

/// Runs the model on the host CPU.
#[derive(Debug, Clone, Default)]
pub struct CpuBackend {
    threads: usize,
    /// Round activations to bf16 in products with bf16 weights and many rows (prefill), where
    /// the CPU has AVX512-BF16; see [`super::packed`].
    bf16_activations: bool,
}

impl CpuBackend {
    /// A backend that uses `threads` threads for large products (0: all cores).
    pub fn new(threads: usize) -> Self {
        Self {
            threads,
            bf16_activations: false,
        }
    }

    /// Opts into bf16 activations for prefill-sized products with bf16 weights (faster, less
    /// precise); kernels without AVX512-BF16 keep f32, and say so once on stderr.
    pub fn with_bf16_activations(mut self, on: bool) -> Self {
        self.bf16_activations = on;
        let family = super::kernels::active();
        if on && !family.has_bf16_activations() {
            static TOLD: std::sync::Once = std::sync::Once::new();
            TOLD.call_once(|| {
                eprintln!(
                    "moebius: bf16 activations need AVX512-BF16 and the {} kernels run here; \
                     products keep f32 activations",
                    family.name()
                );
            });
        }
        self
    }

    /// Whether a product of `m × n × k` multiply-adds should be split over the threads.
    fn parallel(&self, m: usize, n: usize, k: usize) -> bool {
        self.threads != 1
            && m.saturating_mul(n).saturating_mul(k) >= PARALLEL_MIN_FLOPS
            && !IN_TASK.get()
    }

    fn parallelism(&self, m: usize, n: usize, k: usize) -> Parallelism {
        if self.parallel(m, n, k) {
            Parallelism::Rayon(self.threads)
        } else {
            Parallelism::None
        }
    }

    /// The one place that calls into `gemm`: checks every extent against its slice first, so a
    /// wrong shape is a panic with a message rather than an out-of-bounds read.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        out: &mut [f32],
        out_rs: usize,
        lhs: &[f32],
        lhs_rs: usize,
        lhs_cs: usize,
        rhs: &[f32],
        rhs_rs: usize,
        rhs_cs: usize,
    ) {
        if m == 0 || n == 0 {
            return;
        }
        let extent =
            |rows: usize, rs: usize, cols: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs + 1;
        assert!(
            out.len() >= extent(m, out_rs, n, 1),
            "gemm: output too small"
        );
        if k == 0 {
            for row in 0..m {
                out[row * out_rs..row * out_rs + n].fill(0.0);
            }
            return;
        }
        assert!(
            lhs.len() >= extent(m, lhs_rs, k, lhs_cs),
            "gemm: lhs too small"
        );
        assert!(
            rhs.len() >= extent(k, rhs_rs, n, rhs_cs),
            "gemm: rhs too small"
        );
        // SAFETY: the asserts above keep every index gemm touches inside the three slices;
        // `out` is borrowed mutably, so it aliases neither input.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr(),
                1,
                out_rs as isize,
                false,
                lhs.as_ptr(),
                lhs_cs as isize,
                lhs_rs as isize,
                rhs.as_ptr(),
                rhs_cs as isize,
                rhs_rs as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                self.parallelism(m, n, k),
            );
        }
    }
}

impl Backend for CpuBackend {
    type Matrix = CpuMatrix;
    type Rows = HostRows;

    fn new_rows(&self, width: usize) -> HostRows {
        HostRows::new(width)
    }

    fn append_rows(&self, rows: &mut HostRows, data: &[f32]) {
        rows.append(data);
    }

    fn truncate_rows(&self, rows: &mut HostRows, len: usize) {
        rows.truncate(len);
    }

    fn rows_bytes(&self, rows: &HostRows) -> usize {
        rows.bytes()
    }

    fn read_rows<'a>(&self, rows: &'a HostRows, len: usize) -> std::borrow::Cow<'a, [f32]> {
        std::borrow::Cow::Borrowed(&rows.values()[..len * rows.width()])
    }

    fn attend_rows(
        &self,
        q: &[f32],
        queries: usize,
        heads: usize,
        rows: &HostRows,
        position: usize,
        values: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        let (cache, width) = (rows.values(), rows.width());
        attend_host(
            self, q, queries, heads, cache, width, position, values, scale, out,
        );
    }

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn matrix(&self, rows: usize, cols: usize, data: Vec<f32>) -> CpuMatrix {
        assert_eq!(
            data.len(),
            rows * cols,
            "matrix data does not match its shape"
        );
        CpuMatrix {
            rows,
            cols,
            data: Storage::F32(data),
        }
    }

    fn matrix_bf16(&self, rows: usize, cols: usize, bits: Vec<u16>) -> CpuMatrix {
        assert_eq!(
            bits.len(),
            rows * cols,
            "matrix data does not match its shape"
        );
        CpuMatrix {
            rows,
            cols,
            data: Storage::Bf16(PackedBf16::pack(rows, cols, &bits)),
        }
    }

    fn matrix_fp8(&self, blocks: Fp8Blocks) -> CpuMatrix {
        let (rows, cols) = (blocks.rows, blocks.cols);
        assert_eq!(
            blocks.codes.len(),
            rows * cols,
            "matrix data does not match its shape"
        );
        let data = match PackedFp8::pack(blocks) {
            Ok(packed) => Storage::Fp8(packed),
            // Blocks that split a panel: dequantised, as the checkpoint reads them.
            Err(blocks) => Storage::F32(blocks.dequantize()),
        };
        CpuMatrix { rows, cols, data }
    }

    fn shape(&self, w: &CpuMatrix) -> (usize, usize) {
        (w.rows, w.cols)
    }

    fn matrix_bytes(&self, w: &CpuMatrix) -> usize {
        match &w.data {
            Storage::F32(d) => d.len() * 4,
            Storage::Bf16(p) => p.bytes(),
            Storage::Fp8(p) => p.bytes(),
        }
    }

    fn linear(&self, x: &[f32], m: usize, w: &CpuMatrix, out: &mut [f32]) {
        // out[m, rows] = x[m, cols] · wᵀ; wᵀ[c, r] = w[r * cols + c].
        match &w.data {
            Storage::F32(data) if m <= f32_rows::MAX_ROWS => {
                let parallel = self.parallel(m, w.rows, w.cols);
                f32_rows::matmul(x, m, data, (w.rows, w.cols), out, parallel)
            }
            Storage::F32(data) => self.gemm(
                m, w.rows, w.cols, out, w.rows, x, w.cols, 1, data, 1, w.cols,
            ),
            Storage::Bf16(packed) => {
                let parallel = self.parallel(m, w.rows, w.cols);
                let rounded = self.bf16_activations
                    && m > BF16_MIN_ROWS
                    && packed::matmul_bf16(x, m, packed, out, parallel).is_some();
                if !rounded {
                    packed::matmul(x, m, packed, out, parallel);
                }
            }
            Storage::Fp8(packed) => {
                packed_fp8::matmul(x, m, packed, out, self.parallel(m, w.rows, w.cols))
            }
        }
    }

    fn linear_grouped(&self, products: &mut [Product<'_, CpuMatrix>]) {
        // Products of packed bf16 or FP8 weights with f32 activations are one set of tasks;
        // others (f32 weights, activations rounded to bf16) run one by one.
        let mut grouped = Vec::with_capacity(products.len());
        let mut flops = 0usize;
        for p in products.iter_mut() {
            match &p.w.data {
                Storage::Bf16(w) if !(self.bf16_activations && p.m > BF16_MIN_ROWS) => {
                    flops += p.m * p.w.rows * p.w.cols;
                    grouped.push(packed::Product {
                        x: p.x,
                        m: p.m,
                        w: Weights::Bf16(w),
                        out: &mut *p.out,
                    });
                }
                Storage::Fp8(w) => {
                    flops += p.m * p.w.rows * p.w.cols;
                    grouped.push(packed::Product {
                        x: p.x,
                        m: p.m,
                        w: Weights::Fp8(w),
                        out: &mut *p.out,
                    });
                }
                _ => self.linear(p.x, p.m, p.w, p.out),
            }
        }
        let parallel = self.parallel(flops, 1, 1);
        packed::matmul_grouped(&mut grouped, parallel);
    }

    /// Decode-sized runs (at most [`STREAM_ROWS`] rows each) as two grouped products, each
    /// balanced over the threads; prefill-sized ones each on one thread, where an expert with
    /// many rows keeps its activations in L2, the largest first so that the last task to start
    /// is a small one.
    fn mlp_grouped(&self, runs: &mut [MlpRun<'_, CpuMatrix>]) {
        if runs.iter().all(|r| r.m <= STREAM_ROWS) {
            return mlp_by_products(self, runs);
        }
        let mut order: Vec<usize> = (0..runs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(runs[i].m));
        // Each task writes its own run's output; the locks only hand the borrows over.
        let runs: Vec<std::sync::Mutex<&mut MlpRun<'_, CpuMatrix>>> =
            runs.iter_mut().map(std::sync::Mutex::new).collect();
        self.map_tasks(order.len(), |t| {
            let mut run = runs[order[t]]
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let r = &mut **run;
            let width = r.down.cols;
            let mut gate_up = vec![0.0; r.m * 2 * width];
            self.linear(r.x, r.m, r.gate_up, &mut gate_up);
            let mut act = vec![0.0; r.m * width];
            silu_mul(&gate_up, width, &mut act);
            self.linear(&act, r.m, r.down, r.out);
        });
    }

    fn map_tasks<T: Send, F: Fn(usize) -> T + Sync>(&self, n: usize, f: F) -> Vec<T> {
        if self.threads == 1 || n < 2 {
            (0..n).map(f).collect()
        } else {
            let task = |i| {
                let outer = IN_TASK.replace(true);
                let value = f(i);
                IN_TASK.set(outer);
                value
            };
            (0..n).into_par_iter().map(task).collect()
        }
    }

    fn matmul_nt(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: View,
        b: View,
        out: &mut [f32],
        out_stride: usize,
    ) {
        self.gemm(
            m,
            n,
            k,
            out,
            out_stride,
            a.data,
            a.row_stride,
            1,
            b.data,
            1,
            b.row_stride,
        );
    }

    fn matmul_nn(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: View,
        b: View,
        out: &mut [f32],
        out_stride: usize,
    ) {
        self.gemm(
            m,
            n,
            k,
            out,
            out_stride,
            a.data,
            a.row_stride,
            1,
            b.data,
            b.row_stride,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::bf16_to_f32;

    fn naive(x: &[f32], m: usize, w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * rows];
        for i in 0..m {
            for r in 0..rows {
                out[i * rows + r] = (0..cols).map(|c| x[i * cols + c] * w[r * cols + c]).sum();
            }
        }
        out
    }

    #[test]
    fn linear_matches_the_definition_for_many_shapes() {
        let b = CpuBackend::new(0);
        for &(m, rows, cols) in &[
            (1, 3, 5),
            (4, 7, 2),
            (16, 64, 96),
            (33, 130, 257),
            (1, 512, 1024),
        ] {
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
                .collect();
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 7.0)
                .collect();
            let expected = naive(&x, m, &w, rows, cols);
            let mut out = vec![f32::NAN; m * rows];
            b.linear(&x, m, &b.matrix(rows, cols, w), &mut out);
            for (o, e) in out.iter().zip(&expected) {
                assert!(
                    (o - e).abs() <= 1e-4 * (1.0 + e.abs()),
                    "{m}x{rows}x{cols}: {o} vs {e}"
                );
            }
        }
    }

    #[test]
    fn bf16_weights_give_the_products_of_their_f32_values() {
        let b = CpuBackend::new(0);
        for &(m, rows, cols) in &[(1, 3, 5), (2, 70, 1500), (16, 300, 256), (40, 33, 64)] {
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
                .collect();
            let bits: Vec<u16> = (0..rows * cols)
                .map(|i| half::bf16::from_f32(((i * 5 % 11) as f32 - 5.0) / 7.0).to_bits())
                .collect();
            let w: Vec<f32> = bits.iter().map(|&v| bf16_to_f32(v)).collect();
            let expected = naive(&x, m, &w, rows, cols);
            let mut out = vec![f32::NAN; m * rows];
            let matrix = b.matrix_bf16(rows, cols, bits);
            // Two bytes a value, rows padded to whole panels and columns to whole pairs.
            let padded = rows.div_ceil(packed::PANEL) * packed::PANEL * cols.div_ceil(2) * 2;
            assert_eq!(b.matrix_bytes(&matrix), padded * 2);
            b.linear(&x, m, &matrix, &mut out);
            for (o, e) in out.iter().zip(&expected) {
                assert!(
                    (o - e).abs() <= 1e-4 * (1.0 + e.abs()),
                    "{m}x{rows}x{cols}: {o} vs {e}"
                );
            }
        }
    }

    #[test]
    fn grouped_products_of_bf16_and_f32_weights_equal_their_linears() {
        let b = CpuBackend::new(0);
        let shapes = [(1, 256, 64, true), (3, 70, 33, false), (20, 45, 100, true)];
        let made: Vec<(Vec<f32>, CpuMatrix)> = shapes
            .iter()
            .map(|&(m, n, k, bf16)| {
                let x = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
                let bits: Vec<u16> = (0..n * k)
                    .map(|i| half::bf16::from_f32((i % 5) as f32 / 4.0).to_bits())
                    .collect();
                let w = if bf16 {
                    b.matrix_bf16(n, k, bits)
                } else {
                    b.matrix(n, k, bits.iter().map(|&v| bf16_to_f32(v)).collect())
                };
                (x, w)
            })
            .collect();
        let mut outs: Vec<Vec<f32>> = shapes
            .iter()
            .map(|&(m, n, _, _)| vec![f32::NAN; m * n])
            .collect();
        let mut products: Vec<Product<CpuMatrix>> = made
            .iter()
            .zip(&shapes)
            .zip(&mut outs)
            .map(|(((x, w), &(m, ..)), out)| Product { x, m, w, out })
            .collect();
        b.linear_grouped(&mut products);
        for (((x, w), &(m, n, ..)), got) in made.iter().zip(&shapes).zip(&outs) {
            let mut want = vec![f32::NAN; m * n];
            b.linear(x, m, w, &mut want);
            assert_eq!(got, &want, "{m}x{n}");
        }
    }

    #[test]
    fn strided_products_read_and_write_only_their_views() {
        let b = CpuBackend::new(1);
        // a: 2x2 inside rows of 3; b: 3x2 (n=3, k=2) inside rows of 4.
        let a = [1.0, 2.0, 99.0, 3.0, 4.0, 99.0];
        let bm = [
            1.0, 0.0, 99.0, 99.0, 0.0, 1.0, 99.0, 99.0, 1.0, 1.0, 99.0, 99.0,
        ];
        let mut out = [-1.0; 8];
        b.matmul_nt(
            2,
            3,
            2,
            View {
                data: &a,
                row_stride: 3,
            },
            View {
                data: &bm,
                row_stride: 4,
            },
            &mut out,
            4,
        );
        assert_eq!(out, [1.0, 2.0, 3.0, -1.0, 3.0, 4.0, 7.0, -1.0]);
        // a[2,2] · c[2,3], c inside rows of 4.
        let c = [1.0, 0.0, 2.0, 99.0, 0.0, 1.0, 3.0, 99.0];
        let mut out = [0.0; 6];
        b.matmul_nn(
            2,
            3,
            2,
            View {
                data: &a,
                row_stride: 3,
            },
            View {
                data: &c,
                row_stride: 4,
            },
            &mut out,
            3,
        );
        assert_eq!(out, [1.0, 2.0, 8.0, 3.0, 4.0, 18.0]);
    }
}
