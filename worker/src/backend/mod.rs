//! Compute backends: where the model's matrix products and element-wise kernels run.
//!
//! The model is written against [`Backend`]; the CPU backend ([`cpu::CpuBackend`]) runs
//! everything today. The CUDA backend (feature `cuda`; cudarc, cuBLAS) implements the same trait
//! with device-resident [`Backend::Matrix`]es and leaves the model code as it is.
//!
//! - [`attend`]: absorbed attention over a cache on the host (the CPU's, and the reference);
//! - [`cpu`]: the CPU backend: `gemm` for f32 weights and activation products ([`f32_rows`]
//!   for f32 weights against few rows), [`packed`] for bf16 weights;
//! - [`packed`]: bf16 matrices in panels of column pairs, and their AVX-512 kernels (f32 or bf16
//!   activations), AVX2 and NEON kernels (f32 activations) and a portable fallback;
//! - [`packed_fp8`]: block-quantised FP8 weights at one byte a value, through the bf16 kernels;
//! - [`blocks`]: how those kernels split a product into tasks, and each task's output block;
//! - `cuda` (feature `cuda`): weights in GPU memory, their products in cuBLAS and, for FP8
//!   weights, in `nvrtc`'s kernels (compiled at run time);
//! - `cuda_pages` (feature `cuda`): the GPU's KV caches, in pages of a pool every sequence
//!   shares;
//! - [`grid`]: the launch shape of each CUDA kernel;
//! - [`f32_rows`]: f32 weights against a few activation rows, where `gemm`'s packing costs most;
//! - [`device`]: the `--device` a process runs on, and [`AnyBackend`], the backend it chose;
//! - [`logits`]: the LM head's logits as a row's sampler needs them (all, or the best few);
//! - [`routing`]: a MoE gate's routing (sigmoid or softmax, group-limited top-k, weights);
//! - [`kernels`]: which kernel family runs (AVX512-BF16, AVX-512, AVX2, NEON, portable): the best
//!   the CPU has, or one the binary forces.

pub mod attend;
pub mod blocks;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod cuda_pages;
pub mod device;
pub mod f32_rows;
pub mod grid;
pub mod kernels;
pub mod logits;
#[cfg(feature = "cuda")]
pub mod nvrtc;
pub mod packed;
pub mod packed_fp8;
pub mod routing;

pub use cpu::CpuBackend;
pub use device::{AnyBackend, Device};
pub use logits::{BestLogits, RowLogits, Wants};
pub use routing::{Route, Router};

use crate::checkpoint::Fp8Blocks;

/// A dense row-major view with explicit strides, for products on activations and caches.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    /// Distance between consecutive rows, in elements.
    pub row_stride: usize,
}

/// One of the independent products of [`Backend::linear_grouped`]:
/// `out[m, rows] = x[m, cols] · wᵀ`.
pub struct Product<'a, M> {
    pub x: &'a [f32],
    pub m: usize,
    pub w: &'a M,
    pub out: &'a mut [f32],
}

/// One gated MLP of [`Backend::mlp_grouped`]: `out[m, hidden] = down(silu(gate) · up)` with
/// `[gate | up] = x[m, hidden] · gate_upᵀ`; `gate_up` is `[2·width, hidden]` (gate rows above up
/// rows) and `down` is `[hidden, width]`.
pub struct MlpRun<'a, M> {
    pub x: &'a [f32],
    pub m: usize,
    pub gate_up: &'a M,
    pub down: &'a M,
    pub out: &'a mut [f32],
}

/// One sequence's part of [`Backend::attend_grouped`]: `queries` rows of `q`
/// (`[queries, heads, width]`, query `i` at position `position + i`) over its cache `rows`, into
/// `out` (`[queries, heads, values]`).
pub struct Attend<'a, R> {
    pub q: &'a [f32],
    pub queries: usize,
    pub rows: &'a R,
    pub position: usize,
    pub out: &'a mut [f32],
}

/// The per-head weights of MLA's absorbed attention, and its shape: `uk_t[h]` is head `h`'s
/// `W_UKᵀ` (`[lora, nope]`), `uv[h]` its `W_UV` (`[v, lora]`); scores are scaled by `scale`.
/// With `o_proj` (`[hidden, heads · v]`), the heads' values go through it too.
pub struct Absorbed<'a, M> {
    pub uk_t: Vec<&'a M>,
    pub uv: Vec<&'a M>,
    pub o_proj: Option<&'a M>,
    pub nope: usize,
    pub rope: usize,
    pub lora: usize,
    pub v: usize,
    pub scale: f32,
}

/// One sequence of [`Backend::attend_absorbed`]: its next `queries` rows of the batch, from
/// position `position`, over its cache `rows`.
pub struct AbsorbedRun<'a, R> {
    pub queries: usize,
    pub rows: &'a R,
    pub position: usize,
}

/// The rotary embedding of a step's rows as a table: row `r`'s pairs of `(cos, sin)` at
/// `cos_sin[r * pairs * 2..]`, with YaRN's attention factor in them; each pair rotates
/// `(x[2i], x[2i + 1])` of a head's rotary slice where `interleave`, `(x[i], x[i + pairs])`
/// otherwise. Computed once per step on the host (`RotaryEmbedding::rotation`) and applied
/// where the queries and keys are.
#[derive(Debug, Clone, PartialEq)]
pub struct Rotation {
    pub cos_sin: Vec<f32>,
    pub interleave: bool,
}

impl Rotation {
    /// Rotates one head's rotary slice `x` (two values a pair) by row `row`'s angles.
    pub fn apply(&self, row: usize, x: &mut [f32]) {
        let pairs = x.len() / 2;
        let angles = &self.cos_sin[row * pairs * 2..(row + 1) * pairs * 2];
        for (i, pair) in angles.chunks_exact(2).enumerate() {
            let (cos, sin) = (pair[0], pair[1]);
            let (a, b) = if self.interleave {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + pairs)
            };
            let (x1, x2) = (x[a], x[b]);
            x[a] = x1 * cos - x2 * sin;
            x[b] = x2 * cos + x1 * sin;
        }
    }
}

/// MLA's attention block without biases, for [`Backend::attention_block`]: `input` is
/// `q_a_proj` stacked above `kv_a_proj_with_mqa` (`[q_lora + lora + rope, hidden]`), `q_norm`
/// is `q_a_layernorm`'s weights, `q_b` is `q_b_proj` (`[heads · (nope + rope), q_lora]`),
/// `kv_norm` is `kv_a_layernorm`'s, both norms with `eps`; `attention` is the absorbed
/// attention after them, through `o_proj` where it has it.
pub struct AttentionBlock<'a, M> {
    pub input: &'a M,
    pub q_norm: &'a [f32],
    pub q_b: &'a M,
    pub kv_norm: &'a [f32],
    pub eps: f32,
    pub attention: Absorbed<'a, M>,
}

/// One sequence of [`Backend::attention_block`]: its next `queries` rows of the batch, from
/// position `position`; their cache rows are appended to `rows`.
pub struct BlockRun<'a, R> {
    pub queries: usize,
    pub rows: &'a mut R,
    pub position: usize,
}

/// What follows an attention block in a MoE layer, for [`Backend::attention_block_routed`]:
/// the post-attention RMSNorm's weights and `eps`, and the layer's gate.
pub struct ThenRoute<'a, M> {
    pub norm: &'a [f32],
    pub eps: f32,
    pub router: Router<'a, M>,
}

/// What the model needs from a compute device.
///
/// Weights are uploaded once as [`Backend::Matrix`]; activations are host slices of `f32`
/// in row-major order. All products accumulate in `f32`.
pub trait Backend: Send + Sync + 'static {
    /// A weight matrix `[rows, cols]` (PyTorch's `[out_features, in_features]`) on the device.
    type Matrix: Send + Sync;

    /// One layer's KV cache of one sequence where the backend keeps it: rows of one width,
    /// appended as the sequence grows.
    type Rows: Send + Sync;

    /// Short name for logs and benchmarks.
    fn name(&self) -> &'static str;

    /// Takes ownership of a row-major `[rows, cols]` weight.
    fn matrix(&self, rows: usize, cols: usize, data: Vec<f32>) -> Self::Matrix;

    /// Takes a row-major `[rows, cols]` weight stored as bf16 bits. A backend may keep it at two
    /// bytes a value (products still accumulate in f32); the default widens it to f32.
    fn matrix_bf16(&self, rows: usize, cols: usize, bits: Vec<u16>) -> Self::Matrix {
        self.matrix(rows, cols, bits.iter().map(|&b| bf16_to_f32(b)).collect())
    }

    /// Takes a block-quantised FP8 weight as stored. A backend may keep it at one byte a value
    /// with its block scales; the default dequantises it to f32, exactly as the checkpoint
    /// reads it ([`Checkpoint::load_f32`](crate::checkpoint::Checkpoint::load_f32)).
    fn matrix_fp8(&self, blocks: Fp8Blocks) -> Self::Matrix {
        self.matrix(blocks.rows, blocks.cols, blocks.dequantize())
    }

    /// `(rows, cols)` of a matrix.
    fn shape(&self, w: &Self::Matrix) -> (usize, usize);

    /// Bytes the matrix occupies on the device.
    fn matrix_bytes(&self, w: &Self::Matrix) -> usize;

    /// `out[m, rows] = x[m, cols] · wᵀ`: a linear layer without bias.
    fn linear(&self, x: &[f32], m: usize, w: &Self::Matrix, out: &mut [f32]);

    /// Independent products as one batch: an attention layer's heads, a MoE layer's experts. A
    /// backend may run them as one grouped launch, so that many small products cost what one
    /// large one does; the default runs them one by one.
    fn linear_grouped(&self, products: &mut [Product<'_, Self::Matrix>]) {
        for p in products {
            self.linear(p.x, p.m, p.w, p.out);
        }
    }

    /// Gated MLPs without biases, each on its own rows: a MoE layer's experts and shared experts.
    /// A backend may keep the intermediate activations where the products run; the default runs
    /// every `gate_up` as one group, SiLU-and-multiply on the host, then every `down` as one
    /// group ([`mlp_by_products`]).
    fn mlp_grouped(&self, runs: &mut [MlpRun<'_, Self::Matrix>]) {
        mlp_by_products(self, runs);
    }

    /// Bytes of memory a rank's KV caches may take on this device when no budget is given,
    /// measured now (after the weights are in place); `None`: the device cannot tell.
    fn kv_cache_memory(&self) -> Option<usize> {
        None
    }

    /// `first[m, a_rows] = x · aᵀ`, then `out[m, b_rows] = rms_norm(first[.., ..b_cols]) · bᵀ`
    /// with the norm's weights and epsilon: MLA's query path (`q_a_proj` stacked above
    /// `kv_a_proj_with_mqa`, `q_a_layernorm`, `q_b_proj`). A backend may keep the intermediate
    /// where it runs; the default runs both products with the norm on the host.
    fn linear_norm_linear(
        &self,
        x: &[f32],
        m: usize,
        (a, b): (&Self::Matrix, &Self::Matrix),
        (norm, eps): (&[f32], f32),
        first: &mut [f32],
        out: &mut [f32],
    ) {
        self.linear(x, m, a, first);
        let (rows, cols) = (self.shape(a).0, self.shape(b).1);
        let mut normed: Vec<f32> = (first[..m * rows].chunks_exact(rows))
            .flat_map(|row| &row[..cols])
            .copied()
            .collect();
        rms_norm(&mut normed, norm, eps);
        self.linear(&normed, m, b, out);
    }

    /// An empty cache of rows `width` values wide.
    fn new_rows(&self, width: usize) -> Self::Rows;

    /// Appends whole rows: `data.len()` is a multiple of the width.
    fn append_rows(&self, rows: &mut Self::Rows, data: &[f32]);

    /// Keeps the first `len` rows (a step that failed takes back what it appended).
    fn truncate_rows(&self, rows: &mut Self::Rows, len: usize);

    /// Bytes the rows hold.
    fn rows_bytes(&self, rows: &Self::Rows) -> usize;

    /// The first `len` rows, on the host (expanded attention expands them).
    fn read_rows<'a>(&self, rows: &'a Self::Rows, len: usize) -> std::borrow::Cow<'a, [f32]>;

    /// MLA's absorbed attention over a cache: `queries` rows of `q` (`[queries, heads, width]`,
    /// query `i` at position `position + i`) attend causally over `rows` (keys: whole rows;
    /// values: their first `values` columns) with scores scaled by `scale`; writes
    /// `[queries, heads, values]` into `out`. [`attend::attend_host`] is the reference.
    #[allow(clippy::too_many_arguments)]
    fn attend_rows(
        &self,
        q: &[f32],
        queries: usize,
        heads: usize,
        rows: &Self::Rows,
        position: usize,
        values: usize,
        scale: f32,
        out: &mut [f32],
    );

    /// [`Backend::attend_rows`] of several sequences, each over its own cache, with the same
    /// heads, values and scale: a step's sequences in absorbed form. A backend may run them as
    /// one round trip; the default attends one after another.
    fn attend_grouped(
        &self,
        heads: usize,
        values: usize,
        scale: f32,
        runs: &mut [Attend<'_, Self::Rows>],
    ) {
        for r in runs {
            let out = &mut *r.out;
            self.attend_rows(
                r.q, r.queries, heads, r.rows, r.position, values, scale, out,
            );
        }
    }

    /// MLA's absorbed attention of a step's sequences from their rotated queries `q`
    /// (`[n, heads, nope + rope]`, the runs' rows in order): per head the absorbed query
    /// `[W_UKᵀ q_nope | q_pe]`, attention over each sequence's cache, and `W_UV` of the result,
    /// into `out` (`[n, heads, v]`; or `[n, hidden]` through `o_proj` where the weights have
    /// it). A backend may keep it all where it runs; the default runs
    /// it as grouped products and [`Backend::attend_grouped`] ([`attend::absorbed_by_parts`]).
    fn attend_absorbed(
        &self,
        weights: &Absorbed<'_, Self::Matrix>,
        q: &[f32],
        runs: &[AbsorbedRun<'_, Self::Rows>],
        out: &mut [f32],
    ) {
        attend::absorbed_by_parts(self, weights, q, runs, out);
    }

    /// MLA's whole attention block for a step whose sequences all attend absorbed: from the
    /// normalised hidden states `x` (`[n, hidden]`, the runs' rows in order) the queries
    /// (`input`, `q_norm`, `q_b`) and the new cache rows (`input`'s last `lora + rope`
    /// columns, the latent through `kv_norm`), both rotated by `rotation` (a row per batch
    /// row); the rows appended to each run's cache; then [`Backend::attend_absorbed`] into
    /// `out`. A backend may run it all in one round trip; the default runs it by parts
    /// ([`attend::block_by_parts`]).
    fn attention_block(
        &self,
        block: &AttentionBlock<'_, Self::Matrix>,
        x: &[f32],
        rotation: &Rotation,
        runs: &mut [BlockRun<'_, Self::Rows>],
        out: &mut [f32],
    ) {
        attend::block_by_parts(self, block, x, rotation, runs, out);
    }

    /// Routes `n` rows of `x` (normalised hidden states) through a MoE gate: its logits
    /// `x · weightᵀ`, then [`Router::route_row`] of each row. A backend may route where the
    /// logits are and return only the routes; the default routes on the host
    /// ([`routing::route_by_parts`]).
    fn route(&self, router: &Router<'_, Self::Matrix>, x: &[f32], n: usize) -> Vec<Route> {
        routing::route_by_parts(self, router, x, n)
    }

    /// The LM head `x · wᵀ` of one row of `x` per entry of `wants`, each row's logits as its
    /// sampler wants them: none, all, or the best `k` and the log-sum-exp. A backend may give
    /// all where the best were asked for; the default gives all ([`logits::lm_head_by_parts`]),
    /// and one that computes them on a device may reduce them there.
    fn lm_head(&self, x: &[f32], w: &Self::Matrix, wants: &[Wants]) -> Vec<RowLogits> {
        logits::lm_head_by_parts(self, x, w, wants)
    }

    /// [`Backend::attention_block`] and what follows it in a MoE layer: the block's output
    /// added to `residual` (`[n, hidden]`), `normed` the residual through the post-attention
    /// RMSNorm, and the gate's routes of `normed` ([`Backend::route`]). A backend may run it all
    /// in one round trip; the default runs the parts ([`routing::block_then_route_by_parts`]).
    #[allow(clippy::too_many_arguments)]
    fn attention_block_routed(
        &self,
        block: &AttentionBlock<'_, Self::Matrix>,
        x: &[f32],
        rotation: &Rotation,
        runs: &mut [BlockRun<'_, Self::Rows>],
        then: &ThenRoute<'_, Self::Matrix>,
        residual: &mut [f32],
        normed: &mut [f32],
    ) -> Vec<Route> {
        routing::block_then_route_by_parts(self, block, x, rotation, runs, then, residual, normed)
    }

    /// Whether a sequence may take MLA's expanded form, prefill's cheaper one on the host, which
    /// reads its cache back ([`Backend::read_rows`]). A backend that keeps the cache on a device
    /// says no, and every sequence attends absorbed there.
    fn expands_attention(&self) -> bool {
        true
    }

    /// `out[m, n] (row stride out_stride) = a[m, k] · b[n, k]ᵀ`, for attention over caches.
    fn matmul_nt(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: View,
        b: View,
        out: &mut [f32],
        out_stride: usize,
    );

    /// `f(0), …, f(n - 1)` in order of index, as independent tasks the backend may run
    /// concurrently (each task may use the backend itself): the MoE layer's experts.
    fn map_tasks<T: Send, F: Fn(usize) -> T + Sync>(&self, n: usize, f: F) -> Vec<T> {
        (0..n).map(f).collect()
    }

    /// `out[m, n] (row stride out_stride) = a[m, k] · b[k, n]`.
    fn matmul_nn(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: View,
        b: View,
        out: &mut [f32],
        out_stride: usize,
    );
}

/// [`Backend::mlp_grouped`] as two groups of products ([`Backend::linear_grouped`]) with
/// SiLU-and-multiply between them on the host.
pub fn mlp_by_products<B: Backend + ?Sized>(backend: &B, runs: &mut [MlpRun<'_, B::Matrix>]) {
    let mut gate_up: Vec<Vec<f32>> = runs
        .iter()
        .map(|r| vec![0.0; r.m * backend.shape(r.gate_up).0])
        .collect();
    let mut products: Vec<Product<'_, B::Matrix>> = runs
        .iter()
        .zip(&mut gate_up)
        .map(|(r, out)| Product {
            x: r.x,
            m: r.m,
            w: r.gate_up,
            out,
        })
        .collect();
    backend.linear_grouped(&mut products);
    let acts: Vec<Vec<f32>> = runs
        .iter()
        .zip(&gate_up)
        .map(|(r, gate_up)| {
            let width = backend.shape(r.down).1;
            let mut act = vec![0.0; r.m * width];
            silu_mul(gate_up, width, &mut act);
            act
        })
        .collect();
    let mut products: Vec<Product<'_, B::Matrix>> = runs
        .iter_mut()
        .zip(&acts)
        .map(|(r, act)| Product {
            x: act,
            m: r.m,
            w: r.down,
            out: &mut *r.out,
        })
        .collect();
    backend.linear_grouped(&mut products);
}

/// The f32 value of bf16 bits (exact: bf16 is the top half of an f32).
#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// RMSNorm of each `weight.len()`-wide row of `x`, in place, as transformers computes it.
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    let width = weight.len();
    for row in x.chunks_exact_mut(width) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = w * (*v * inv);
        }
    }
}

/// For rows laid out `[gate (width) | up (width)]`, writes `silu(gate) * up` into `out`.
pub fn silu_mul(gate_up: &[f32], width: usize, out: &mut [f32]) {
    for (row, o) in gate_up
        .chunks_exact(2 * width)
        .zip(out.chunks_exact_mut(width))
    {
        let (gate, up) = row.split_at(width);
        for ((o, g), u) in o.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    }
}

/// Numerically stable softmax of `x`, in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// Indices of the `k` largest values, largest first; ties go to the lower index.
pub fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    let cmp = |a: &usize, b: &usize| values[*b].total_cmp(&values[*a]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx
}

/// Adds `bias` to each `bias.len()`-wide row of `x`.
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}
