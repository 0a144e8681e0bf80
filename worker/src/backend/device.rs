//! Where a process computes, chosen when it starts (`--device`): the host's CPU, or a GPU
//! where the binary is built with the `cuda` feature. [`AnyBackend`] is the one backend type
//! the engine and the service hold; it hands each call to the backend chosen.

use super::{
    Absorbed, AbsorbedRun, Attend, AttentionBlock, Backend, BlockRun, CpuBackend, MlpRun, Product,
    Rotation, Route, Router, RowLogits, ThenRoute, View, Wants,
};
use crate::checkpoint::Fp8Blocks;
use crate::error::Result;

/// Whether a GPU's FP8 products of many rows quantise their activations to FP8 and run on
/// tensor cores (`--fp8-activations`); off, they dequantise the weight to bf16, as DeepSeek's
/// reference inference does by default. The library reads no environment; the binary calls
/// [`use_fp8_activations`] before it opens a backend.
static FP8_ACTIVATIONS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes the GPU backends opened from now on quantise FP8 products' activations (or not).
pub fn use_fp8_activations(on: bool) {
    FP8_ACTIVATIONS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`use_fp8_activations`] asked for FP8 activations.
pub fn fp8_activations() -> bool {
    FP8_ACTIVATIONS.load(std::sync::atomic::Ordering::Relaxed)
}

/// A `--device` value: `cpu`, or `cuda` / `cuda:N` (GPU N, 0 by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("device {s:?} is unknown (cpu, cuda or cuda:N with N a GPU's number)");
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => {
                let n = s.strip_prefix("cuda:").ok_or_else(bad)?;
                n.parse().map(Device::Cuda).map_err(|_| bad())
            }
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The backend of a process: the CPU's, or a GPU's.
#[derive(Debug)]
pub enum AnyBackend {
    Cpu(CpuBackend),
    #[cfg(feature = "cuda")]
    Cuda(super::cuda::CudaBackend),
}

/// A weight matrix of an [`AnyBackend`].
pub enum AnyMatrix {
    Cpu(super::cpu::CpuMatrix),
    #[cfg(feature = "cuda")]
    Cuda(super::cuda::CudaMatrix),
}

/// A cache of an [`AnyBackend`].
pub enum AnyRows {
    Cpu(super::attend::HostRows),
    #[cfg(feature = "cuda")]
    Cuda(super::cuda_pages::CudaRows),
}

impl AnyBackend {
    /// Whether FP8 products of many rows run on a GPU's tensor cores (`--fp8-activations`,
    /// where the GPU has them); never on the CPU.
    pub fn fp8_tensor_cores(&self) -> bool {
        match self {
            AnyBackend::Cpu(_) => false,
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => b.has_fp8_tensor_cores(),
        }
    }

    /// Opens `device`; `threads` are the CPU threads of the products that run on the host
    /// (0: all cores), and `bf16_activations` applies to the CPU's products.
    pub fn open(device: Device, threads: usize, bf16_activations: bool) -> Result<Self> {
        match device {
            Device::Cpu => Ok(AnyBackend::Cpu(
                CpuBackend::new(threads).with_bf16_activations(bf16_activations),
            )),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => super::cuda::CudaBackend::open(n, threads).map(AnyBackend::Cuda),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(crate::Error::Device(format!(
                "{device} needs a moebius built with the cuda feature (cargo build --release --features cuda)"
            ))),
        }
    }
}

impl From<CpuBackend> for AnyBackend {
    fn from(b: CpuBackend) -> Self {
        AnyBackend::Cpu(b)
    }
}

/// `runs` with each matrix as the one device's own, by `pick`.
fn narrow_mlps<'a, M>(
    runs: &'a mut [MlpRun<'_, AnyMatrix>],
    pick: impl Fn(&'a AnyMatrix) -> &'a M,
) -> Vec<MlpRun<'a, M>> {
    runs.iter_mut()
        .map(|r| MlpRun {
            x: r.x,
            m: r.m,
            gate_up: pick(r.gate_up),
            down: pick(r.down),
            out: &mut *r.out,
        })
        .collect()
}

/// `w` with each matrix as the one device's own, by `pick`.
fn narrow_weights<'a, M>(
    w: &Absorbed<'a, AnyMatrix>,
    pick: impl Fn(&'a AnyMatrix) -> &'a M,
) -> Absorbed<'a, M> {
    Absorbed {
        uk_t: w.uk_t.iter().map(|&m| pick(m)).collect(),
        uv: w.uv.iter().map(|&m| pick(m)).collect(),
        o_proj: w.o_proj.map(&pick),
        nope: w.nope,
        rope: w.rope,
        lora: w.lora,
        v: w.v,
        scale: w.scale,
    }
}

/// `w` and `runs` with each matrix and cache as the one device's own, by `pick` and
/// `pick_rows`.
fn narrow_absorbed<'a, M, R>(
    w: &Absorbed<'a, AnyMatrix>,
    runs: &[AbsorbedRun<'a, AnyRows>],
    pick: impl Fn(&'a AnyMatrix) -> &'a M,
    pick_rows: impl Fn(&'a AnyRows) -> &'a R,
) -> (Absorbed<'a, M>, Vec<AbsorbedRun<'a, R>>) {
    let runs = runs
        .iter()
        .map(|r| AbsorbedRun {
            queries: r.queries,
            rows: pick_rows(r.rows),
            position: r.position,
        })
        .collect();
    (narrow_weights(w, pick), runs)
}

/// `block` and `runs` with each matrix and cache as the one device's own, by `pick` and
/// `pick_rows`.
fn narrow_block<'a, M, R>(
    block: &AttentionBlock<'a, AnyMatrix>,
    runs: &'a mut [BlockRun<'_, AnyRows>],
    pick: impl Fn(&'a AnyMatrix) -> &'a M,
    pick_rows: impl Fn(&'a mut AnyRows) -> &'a mut R,
) -> (AttentionBlock<'a, M>, Vec<BlockRun<'a, R>>) {
    let narrowed = AttentionBlock {
        input: pick(block.input),
        q_norm: block.q_norm,
        q_b: pick(block.q_b),
        kv_norm: block.kv_norm,
        eps: block.eps,
        attention: narrow_weights(&block.attention, &pick),
    };
    let runs = runs
        .iter_mut()
        .map(|r| BlockRun {
            queries: r.queries,
            rows: pick_rows(&mut *r.rows),
            position: r.position,
        })
        .collect();
    (narrowed, runs)
}

/// `products` with each matrix as the one device's own, by `pick`.
fn narrow<'a, M>(
    products: &'a mut [Product<'_, AnyMatrix>],
    pick: impl Fn(&'a AnyMatrix) -> &'a M,
) -> Vec<Product<'a, M>> {
    products
        .iter_mut()
        .map(|p| Product {
            x: p.x,
            m: p.m,
            w: pick(p.w),
            out: &mut *p.out,
        })
        .collect()
}

/// A matrix made by one backend reached another: the process mixes devices, which it never
/// does on purpose.
#[cfg(feature = "cuda")]
fn mixed() -> ! {
    panic!("a weight matrix of one device was handed to another")
}

/// The one device's own matrix of an [`AnyMatrix`].
macro_rules! matrix_of {
    ($m:expr, $variant:ident) => {
        match $m {
            AnyMatrix::$variant(m) => m,
            #[cfg(feature = "cuda")]
            #[allow(unreachable_patterns)]
            _ => mixed(),
        }
    };
}

/// The one device's own rows of an [`AnyRows`], by `pick`.
macro_rules! rows_of {
    ($rows:expr, $variant:ident) => {
        match $rows {
            AnyRows::$variant(r) => r,
            #[cfg(feature = "cuda")]
            #[allow(unreachable_patterns)]
            _ => mixed(),
        }
    };
}

impl Backend for AnyBackend {
    type Matrix = AnyMatrix;
    type Rows = AnyRows;

    fn kv_cache_memory(&self) -> Option<usize> {
        match self {
            AnyBackend::Cpu(b) => b.kv_cache_memory(),
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => b.kv_cache_memory(),
        }
    }

    fn new_rows(&self, width: usize) -> AnyRows {
        match self {
            AnyBackend::Cpu(b) => AnyRows::Cpu(b.new_rows(width)),
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => AnyRows::Cuda(b.new_rows(width)),
        }
    }

    fn append_rows(&self, rows: &mut AnyRows, data: &[f32]) {
        match self {
            AnyBackend::Cpu(b) => b.append_rows(rows_of!(rows, Cpu), data),
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => b.append_rows(rows_of!(rows, Cuda), data),
        }
    }

    fn truncate_rows(&self, rows: &mut AnyRows, len: usize) {
        match self {
            AnyBackend::Cpu(b) => b.truncate_rows(rows_of!(rows, Cpu), len),
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => b.truncate_rows(rows_of!(rows, Cuda), len),
        }
    }

    fn rows_bytes(&self, rows: &AnyRows) -> usize {
        match self {
            AnyBackend::Cpu(b) => b.rows_bytes(rows_of!(rows, Cpu)),
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => b.rows_bytes(rows_of!(rows, Cuda)),
        }
    }

    fn read_rows<'a>(&self, rows: &'a AnyRows, len: usize) -> std::borrow::Cow<'a, [f32]> {
        match self {
            AnyBackend::Cpu(b) => b.read_rows(rows_of!(rows, Cpu), len),
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => b.read_rows(rows_of!(rows, Cuda), len),
        }
    }

    fn attend_grouped(
        &self,
        heads: usize,
        values: usize,
        scale: f32,
        runs: &mut [Attend<'_, AnyRows>],
    ) {
        macro_rules! forward {
            ($b:expr, $variant:ident) => {{
                let mut inner: Vec<Attend<'_, _>> = runs
                    .iter_mut()
                    .map(|r| Attend {
                        q: r.q,
                        queries: r.queries,
                        rows: rows_of!(r.rows, $variant),
                        position: r.position,
                        out: &mut *r.out,
                    })
                    .collect();
                $b.attend_grouped(heads, values, scale, &mut inner)
            }};
        }
        match self {
            AnyBackend::Cpu(b) => forward!(b, Cpu),
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => forward!(b, Cuda),
        }
    }

    fn attend_rows(
        &self,
        q: &[f32],
        queries: usize,
        heads: usize,
        rows: &AnyRows,
        position: usize,
        values: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        match self {
            AnyBackend::Cpu(b) => b.attend_rows(
                q,
                queries,
                heads,
                rows_of!(rows, Cpu),
                position,
                values,
                scale,
                out,
            ),
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => b.attend_rows(
                q,
                queries,
                heads,
                rows_of!(rows, Cuda),
                position,
                values,
                scale,
                out,
            ),
        }
    }

    fn route(&self, router: &Router<'_, AnyMatrix>, x: &[f32], n: usize) -> Vec<Route> {
        match self {
            AnyBackend::Cpu(b) => {
                b.route(&router.with_weight(matrix_of!(router.weight, Cpu)), x, n)
            }
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => {
                b.route(&router.with_weight(matrix_of!(router.weight, Cuda)), x, n)
            }
        }
    }

    fn lm_head(&self, x: &[f32], w: &AnyMatrix, wants: &[Wants]) -> Vec<RowLogits> {
        match self {
            AnyBackend::Cpu(b) => b.lm_head(x, matrix_of!(w, Cpu), wants),
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => b.lm_head(x, matrix_of!(w, Cuda), wants),
        }
    }

    fn expands_attention(&self) -> bool {
        match self {
            AnyBackend::Cpu(b) => b.expands_attention(),
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => b.expands_attention(),
        }
    }

    fn mlp_grouped(&self, runs: &mut [MlpRun<'_, AnyMatrix>]) {
        match self {
            AnyBackend::Cpu(b) => b.mlp_grouped(&mut narrow_mlps(runs, |w| matrix_of!(w, Cpu))),
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => b.mlp_grouped(&mut narrow_mlps(runs, |w| matrix_of!(w, Cuda))),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            AnyBackend::Cpu(b) => b.name(),
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => b.name(),
        }
    }

    fn matrix(&self, rows: usize, cols: usize, data: Vec<f32>) -> AnyMatrix {
        match self {
            AnyBackend::Cpu(b) => AnyMatrix::Cpu(b.matrix(rows, cols, data)),
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => AnyMatrix::Cuda(b.matrix(rows, cols, data)),
        }
    }

    fn matrix_bf16(&self, rows: usize, cols: usize, bits: Vec<u16>) -> AnyMatrix {
        match self {
            AnyBackend::Cpu(b) => AnyMatrix::Cpu(b.matrix_bf16(rows, cols, bits)),
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => AnyMatrix::Cuda(b.matrix_bf16(rows, cols, bits)),
        }
    }

    fn matrix_fp8(&self, blocks: Fp8Blocks) -> AnyMatrix {
        match self {
            AnyBackend::Cpu(b) => AnyMatrix::Cpu(b.matrix_fp8(blocks)),
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => AnyMatrix::Cuda(b.matrix_fp8(blocks)),
        }
    }

    fn shape(&self, w: &AnyMatrix) -> (usize, usize) {
        match (self, w) {
            (AnyBackend::Cpu(b), AnyMatrix::Cpu(w)) => b.shape(w),
            #[cfg(feature = "cuda")]
            (AnyBackend::Cuda(b), AnyMatrix::Cuda(w)) => b.shape(w),
            #[cfg(feature = "cuda")]
            _ => mixed(),
        }
    }

    fn matrix_bytes(&self, w: &AnyMatrix) -> usize {
        match (self, w) {
            (AnyBackend::Cpu(b), AnyMatrix::Cpu(w)) => b.matrix_bytes(w),
            #[cfg(feature = "cuda")]
            (AnyBackend::Cuda(b), AnyMatrix::Cuda(w)) => b.matrix_bytes(w),
            #[cfg(feature = "cuda")]
            _ => mixed(),
        }
    }

    fn linear(&self, x: &[f32], m: usize, w: &AnyMatrix, out: &mut [f32]) {
        match (self, w) {
            (AnyBackend::Cpu(b), AnyMatrix::Cpu(w)) => b.linear(x, m, w, out),
            #[cfg(feature = "cuda")]
            (AnyBackend::Cuda(b), AnyMatrix::Cuda(w)) => b.linear(x, m, w, out),
            #[cfg(feature = "cuda")]
            _ => mixed(),
        }
    }

    fn linear_norm_linear(
        &self,
        x: &[f32],
        m: usize,
        weights: (&AnyMatrix, &AnyMatrix),
        norm: (&[f32], f32),
        first: &mut [f32],
        out: &mut [f32],
    ) {
        match (self, weights) {
            (AnyBackend::Cpu(be), (AnyMatrix::Cpu(a), AnyMatrix::Cpu(b))) => {
                be.linear_norm_linear(x, m, (a, b), norm, first, out)
            }
            #[cfg(feature = "cuda")]
            (AnyBackend::Cuda(be), (AnyMatrix::Cuda(a), AnyMatrix::Cuda(b))) => {
                be.linear_norm_linear(x, m, (a, b), norm, first, out)
            }
            #[cfg(feature = "cuda")]
            _ => mixed(),
        }
    }

    fn attend_absorbed(
        &self,
        w: &Absorbed<'_, AnyMatrix>,
        q: &[f32],
        runs: &[AbsorbedRun<'_, AnyRows>],
        out: &mut [f32],
    ) {
        match self {
            AnyBackend::Cpu(b) => {
                let (w, runs) =
                    narrow_absorbed(w, runs, |m| matrix_of!(m, Cpu), |r| rows_of!(r, Cpu));
                b.attend_absorbed(&w, q, &runs, out)
            }
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => {
                let (w, runs) =
                    narrow_absorbed(w, runs, |m| matrix_of!(m, Cuda), |r| rows_of!(r, Cuda));
                b.attend_absorbed(&w, q, &runs, out)
            }
        }
    }

    fn attention_block(
        &self,
        block: &AttentionBlock<'_, AnyMatrix>,
        x: &[f32],
        rotation: &Rotation,
        runs: &mut [BlockRun<'_, AnyRows>],
        out: &mut [f32],
    ) {
        match self {
            AnyBackend::Cpu(b) => {
                let (block, mut runs) =
                    narrow_block(block, runs, |m| matrix_of!(m, Cpu), |r| rows_of!(r, Cpu));
                b.attention_block(&block, x, rotation, &mut runs, out)
            }
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => {
                let (block, mut runs) =
                    narrow_block(block, runs, |m| matrix_of!(m, Cuda), |r| rows_of!(r, Cuda));
                b.attention_block(&block, x, rotation, &mut runs, out)
            }
        }
    }

    fn attention_block_routed(
        &self,
        block: &AttentionBlock<'_, AnyMatrix>,
        x: &[f32],
        rotation: &Rotation,
        runs: &mut [BlockRun<'_, AnyRows>],
        then: &ThenRoute<'_, AnyMatrix>,
        residual: &mut [f32],
        normed: &mut [f32],
    ) -> Vec<Route> {
        match self {
            AnyBackend::Cpu(b) => {
                let (block, mut runs) =
                    narrow_block(block, runs, |m| matrix_of!(m, Cpu), |r| rows_of!(r, Cpu));
                let then = ThenRoute {
                    norm: then.norm,
                    eps: then.eps,
                    router: then.router.with_weight(matrix_of!(then.router.weight, Cpu)),
                };
                b.attention_block_routed(&block, x, rotation, &mut runs, &then, residual, normed)
            }
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => {
                let (block, mut runs) =
                    narrow_block(block, runs, |m| matrix_of!(m, Cuda), |r| rows_of!(r, Cuda));
                let then = ThenRoute {
                    norm: then.norm,
                    eps: then.eps,
                    router: then
                        .router
                        .with_weight(matrix_of!(then.router.weight, Cuda)),
                };
                b.attention_block_routed(&block, x, rotation, &mut runs, &then, residual, normed)
            }
        }
    }

    fn linear_grouped(&self, products: &mut [Product<'_, AnyMatrix>]) {
        match self {
            AnyBackend::Cpu(b) => b.linear_grouped(&mut narrow(products, |w| matrix_of!(w, Cpu))),
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => b.linear_grouped(&mut narrow(products, |w| matrix_of!(w, Cuda))),
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
        match self {
            AnyBackend::Cpu(be) => be.matmul_nt(m, n, k, a, b, out, out_stride),
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(be) => be.matmul_nt(m, n, k, a, b, out, out_stride),
        }
    }

    fn map_tasks<T: Send, F: Fn(usize) -> T + Sync>(&self, n: usize, f: F) -> Vec<T> {
        match self {
            AnyBackend::Cpu(b) => b.map_tasks(n, f),
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => b.map_tasks(n, f),
        }
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
        match self {
            AnyBackend::Cpu(be) => be.matmul_nn(m, n, k, a, b, out, out_stride),
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(be) => be.matmul_nn(m, n, k, a, b, out, out_stride),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_bad_ones_are_named() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU"] {
            let e = bad.parse::<Device>().unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_gpu_without_the_cuda_feature_says_how_to_build_one() {
        let e = AnyBackend::open(Device::Cuda(0), 1, false).unwrap_err();
        assert_eq!(e.kind(), "device");
        assert!(e.to_string().contains("--features cuda"), "{e}");
    }
}
