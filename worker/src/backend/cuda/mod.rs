//! The CUDA backend (feature `cuda`), first steps: weights live in GPU memory in their
//! checkpoint precision (bf16 stays bf16, f32 stays f32, FP8 stays FP8) and every product with a
//! weight runs on the GPU; activations cross to the GPU and back for each product, or for each
//! group of products ([`Backend::linear_grouped`]: one upload, the launches, one download). A
//! group of gated MLPs ([`Backend::mlp_grouped`], a MoE layer's experts) is one round trip too:
//! SiLU-and-multiply runs on the GPU and the intermediate activations stay there. Within a
//! round trip, independent products take as few launches as their shapes allow: FP8 ones of a
//! few rows one `fp8_gemv_grouped`, f32 or bf16 ones of one shape one batched cuBLAS call. Each
//! sequence's cache of latents lives in GPU memory, in pages of a pool that every sequence and
//! layer share ([`super::cuda_pages`]), and attention over it runs there in MLA's absorbed form,
//! for all the sequences of a step and from their rotated queries to the heads' values in one
//! round trip ([`Backend::attend_absorbed`]): the per-head products and the cache's scores and
//! weighted sums in cuBLAS, the causal softmax and the heads' rearrangements in kernels of this
//! crate. Where the model allows, the whole attention block is that one round trip
//! ([`Backend::attention_block`]): from the hidden states through the input products, both
//! RMSNorms and the rotary embedding (by a table of angles the host computes per step) to the
//! new cache rows, appended to their pages without leaving the GPU. A MoE gate routes on the
//! GPU ([`Backend::route`]): its product and the routing in one round trip, from which only
//! each row's experts and weights come back; so does the LM head ([`Backend::lm_head`]), from
//! which a greedy or top-k row gets its best few logits and their log-sum-exp, not the whole
//! vocabulary's. [`Transfers`] counts the waits for the GPU and the bytes moved.
//!
//! cudarc loads the CUDA libraries when first used (`dynamic-loading`), so this module builds
//! and lints on machines without CUDA; [`CudaBackend::open`] is where a missing driver, device,
//! cuBLAS or NVRTC shows, as an [`Error::Device`] that names it.
//!
//! bf16 weights multiply bf16 activations (rounded on the host, or by `silu_mul` on the GPU)
//! with f32 accumulation and f32 output, as PyTorch's bf16 path does; f32 weights multiply f32
//! activations. Block-quantised FP8 weights stay FP8 with their scales: products of up to
//! [`FP8_GEMV_ROWS`] rows (decode) read them at one byte a value in a kernel of this crate
//! ([`super::nvrtc`]), in f32; larger ones dequantise the weight to bf16 on the GPU first and run
//! as the bf16 weights do.
//!
//! - this module: the backend, its weights and buffers, and [`Backend`] for it;
//! - `products`: products with a weight and gated MLPs, in groups;
//! - `attention`: absorbed attention over the paged caches;
//! - `block`: the query path and the whole attention block in one round trip;
//! - `routing`: a MoE gate's product and routing in one round trip;
//! - `logits`: the LM head, and each row's best logits where its sampler needs no more;
//! - `blas`: cuBLAS' products in row-major terms;
//! - `fp8_tensor_cores`: FP8 products on Hopper's tensor cores through cuBLASLt
//!   (`--fp8-activations`), and the check of them when the backend opens.

mod attention;
mod blas;
mod block;
mod fp8_tensor_cores;
mod logits;
mod products;
mod routing;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError, LaunchConfig,
};

use attention::{HeadInputs, SoftmaxPart};
use fp8_tensor_cores::Fp8TensorCores;
use products::Fp8Product;

use super::cuda_pages::{CudaRows, PagePool};
use super::grid::{Grid, FP8_GEMV_ROWS};
use super::nvrtc::Kernels;
use super::{
    Absorbed, AbsorbedRun, Attend, AttentionBlock, Backend, BlockRun, CpuBackend, MlpRun, Product,
    Rotation, Route, Router, RowLogits, ThenRoute, View, Wants,
};
use crate::checkpoint::Fp8Blocks;
use crate::error::{Error, Result};

/// Runs the products with weights on one GPU.
pub struct CudaBackend {
    stream: Arc<CudaStream>,
    /// One cuBLAS handle, used by one thread at a time: ranks of one process share the backend.
    blas: Arc<Mutex<CudaBlas>>,
    /// Products of activations by activations that the model asks for on the host
    /// (`matmul_nt`, `matmul_nn`): none while every sequence attends absorbed on the GPU.
    host: CpuBackend,
    /// This crate's kernels, compiled by NVRTC when the backend opens (boxed: a function
    /// handle each, and the backend is moved about).
    kernels: Box<Kernels>,
    /// The pages of every KV cache on this GPU.
    pages: Arc<PagePool>,
    transfers: Arc<Transfers>,
    /// Whether cuBLAS has grouped products of many shapes (12.5 and later): attention's
    /// sequences then take one call for all their scores and one for all their sums.
    grouped_gemm: bool,
    /// FP8 products of many rows on tensor cores, where `--fp8-activations` asks for them, the
    /// GPU and cuBLASLt have them and they agree with the bf16 products (checked when the
    /// backend opens).
    fp8_tensor_cores: Option<Fp8TensorCores>,
    ordinal: usize,
}

/// How often a backend waited for its GPU, the bytes of activations and cache rows it moved
/// to and from it, and the kernels it launched (its own and cuBLAS' products): what a step
/// costs beyond the kernels' own work.
#[derive(Debug, Default)]
pub struct Transfers {
    waits: AtomicU64,
    uploaded: AtomicU64,
    downloaded: AtomicU64,
    launches: AtomicU64,
}

impl Transfers {
    pub fn counts(&self) -> TransferCounts {
        TransferCounts {
            waits: self.waits.load(Ordering::Relaxed),
            uploaded: self.uploaded.load(Ordering::Relaxed),
            downloaded: self.downloaded.load(Ordering::Relaxed),
            launches: self.launches.load(Ordering::Relaxed),
        }
    }

    /// A kernel launched, or a cuBLAS product (which launches one or more).
    pub fn launched(&self) {
        self.launches.fetch_add(1, Ordering::Relaxed);
    }

    pub fn upload(&self, bytes: usize) {
        self.uploaded.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// A download of `bytes` and the wait for it.
    fn download(&self, bytes: usize) {
        self.copied_down(bytes);
        self.waits.fetch_add(1, Ordering::Relaxed);
    }

    /// A download of `bytes` that a later wait covers.
    fn copied_down(&self, bytes: usize) {
        self.downloaded.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// [`Transfers`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransferCounts {
    pub waits: u64,
    pub uploaded: u64,
    pub downloaded: u64,
    pub launches: u64,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("ordinal", &self.ordinal)
            .finish_non_exhaustive()
    }
}

/// A weight matrix in GPU memory.
pub struct CudaMatrix {
    rows: usize,
    cols: usize,
    data: DeviceWeights,
}

impl CudaMatrix {
    /// Whether a product of `m` rows with this weight takes bf16 activations: bf16 weights, and
    /// FP8 ones too many rows for the FP8 kernel (dequantised to bf16 first) unless they go to
    /// the tensor cores (which take f32 activations and quantise them on the GPU).
    fn takes_bf16(&self, m: usize) -> bool {
        match self.data {
            DeviceWeights::F32(_) => false,
            DeviceWeights::Bf16(_) => true,
            DeviceWeights::Fp8 { tensor_cores, .. } => m > FP8_GEMV_ROWS && !tensor_cores,
        }
    }
}

enum DeviceWeights {
    F32(CudaSlice<f32>),
    /// bf16 bits.
    Bf16(CudaSlice<u16>),
    /// E4M3FN codes, with one f32 factor per `block` (rows, columns) of them; products of
    /// many rows on tensor cores where `tensor_cores`.
    Fp8 {
        codes: CudaSlice<u8>,
        scales: CudaSlice<f32>,
        block: (usize, usize),
        tensor_cores: bool,
    },
}

fn device_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Device(format!("{what}: {e}"))
}

impl CudaBackend {
    /// Opens GPU `ordinal`; `host_threads` are the CPU threads of the host's products. FP8
    /// products quantise their activations where `--fp8-activations` asked
    /// ([`super::device::fp8_activations`]).
    pub fn open(ordinal: usize, host_threads: usize) -> Result<Self> {
        Self::open_with(ordinal, host_threads, super::device::fp8_activations())
    }

    /// [`Self::open`], with FP8 activations for FP8 products of many rows where
    /// `fp8_activations` and the GPU has them ([`Self::has_fp8_tensor_cores`]).
    pub fn open_with(ordinal: usize, host_threads: usize, fp8_activations: bool) -> Result<Self> {
        // SAFETY: both only try to load the libraries by name, which runs their initialisers
        // as any use of them would.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::Device(
                "no CUDA driver here: libcuda.so is not on the library path".into(),
            ));
        }
        // SAFETY: as above.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::Device(
                "cuBLAS (libcublas.so, CUDA 12) is not on the library path".into(),
            ));
        }
        let count = CudaContext::device_count().map_err(|e| device_error("the CUDA driver", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Device(format!(
                "cuda:{ordinal} does not exist: this machine has {count} CUDA device(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| device_error("opening the GPU", e))?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| device_error("cuBLAS", e))?;
        let kernels = Box::new(Kernels::load(stream.context())?);
        let grouped_gemm = blas::version(&blas)? >= blas::GROUPED_SINCE;
        let transfers = Arc::new(Transfers::default());
        let backend = Self {
            pages: Arc::new(PagePool::new(stream.clone(), transfers.clone())),
            transfers,
            stream,
            blas: Arc::new(Mutex::new(blas)),
            host: CpuBackend::new(host_threads),
            kernels,
            grouped_gemm,
            fp8_tensor_cores: None,
            ordinal,
        };
        backend.self_test()?;
        Ok(backend.with_fp8_tensor_cores(fp8_activations))
    }

    /// A small query path on the GPU (a cuBLAS product, the `rms_norm` kernel, a product)
    /// against the same on the host, so that a GPU whose launches fail or whose results are
    /// wrong stops the backend from opening, with the reason, rather than failing the first
    /// step of a cluster it would have joined.
    fn self_test(&self) -> Result<()> {
        let (m, k) = (2, 16);
        let value = |i: usize, salt: usize| ((i * 7 + salt) % 13) as f32 / 8.0 - 0.75;
        let values =
            |len: usize, salt: usize| (0..len).map(|i| value(i, salt)).collect::<Vec<f32>>();
        let (a, b, x, norm) = (
            values(k * k, 1),
            values(k * k, 2),
            values(m * k, 3),
            values(k, 4),
        );
        let on_gpu = |data: &[f32]| -> Result<CudaMatrix> {
            let data = DeviceWeights::F32(self.stream.clone_htod(data).map_err(driver)?);
            Ok(CudaMatrix {
                rows: k,
                cols: k,
                data,
            })
        };
        let (mut first, mut got) = (vec![0.0f32; m * k], vec![0.0f32; m * k]);
        let (mut host_first, mut want) = (first.clone(), got.clone());
        let weights = (on_gpu(&a)?, on_gpu(&b)?);
        let failed = |why: String| {
            Error::Device(format!("cuda:{} failed its self-test: {why}", self.ordinal))
        };
        self.try_linear_norm_linear(
            &x,
            m,
            (&weights.0, &weights.1),
            (&norm, 1e-6),
            &mut first,
            &mut got,
        )
        .map_err(|e| match e {
            Error::Device(why) => failed(why),
            e => failed(e.to_string()),
        })?;
        let host = (self.host.matrix(k, k, a), self.host.matrix(k, k, b));
        let norm = (&norm[..], 1e-6);
        self.host
            .linear_norm_linear(&x, m, (&host.0, &host.1), norm, &mut host_first, &mut want);
        let off = got
            .iter()
            .zip(&want)
            .fold(0.0f32, |a, (g, w)| a.max((g - w).abs()));
        if off.is_nan() || off > 1e-3 {
            return Err(failed(format!("its results are {off} off the CPU's")));
        }
        Ok(())
    }

    /// The waits for the GPU and the bytes moved so far.
    pub fn transfers(&self) -> TransferCounts {
        self.transfers.counts()
    }

    /// Whether FP8 products of many rows run on tensor cores (cuBLASLt's block scales, checked
    /// when the backend opened), not through a bf16 copy of the weight.
    pub fn has_fp8_tensor_cores(&self) -> bool {
        self.fp8_tensor_cores.is_some()
    }

    /// Whether cuBLAS takes products of many shapes in one call (12.5 and later), so that a
    /// step's attention costs the same launches whatever its number of sequences.
    pub fn groups_products_of_many_shapes(&self) -> bool {
        self.grouped_gemm
    }

    /// The GPU's name, as the driver gives it.
    pub fn device_name(&self) -> String {
        self.stream
            .context()
            .name()
            .unwrap_or_else(|e| format!("cuda:{} ({e})", self.ordinal))
    }

    /// A new buffer of `len` values on the GPU; `None` for none.
    fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<Option<CudaSlice<T>>> {
        if len == 0 {
            return Ok(None);
        }
        self.stream.alloc_zeros(len).map(Some).map_err(driver)
    }

    /// Copies the first `len` values of `y` to the host once the stream has run everything
    /// enqueued before, then lets `run`'s buffers go.
    fn download(&self, y: &Option<CudaSlice<f32>>, len: usize, run: Enqueued) -> Result<Vec<f32>> {
        let mut host = vec![0.0f32; len];
        if let Some(y) = y {
            self.stream.memcpy_dtoh(y, &mut host).map_err(driver)?;
        }
        self.stream.synchronize().map_err(driver)?;
        self.transfers.download(len * 4);
        drop(run);
        Ok(host)
    }

    /// Uploads staged activations, counted.
    fn upload_staged(&self, inputs: Staged) -> Result<Uploaded> {
        self.transfers
            .upload(inputs.wide.len() * 4 + inputs.bf16.len() * 2);
        inputs.upload(&self.stream)
    }

    /// Uploads `data`, or stops the process with the driver's reason: the trait that asks for
    /// a weight has no error path, and a rank without its weights cannot serve.
    fn upload<T: cudarc::driver::DeviceRepr>(&self, data: &[T]) -> CudaSlice<T> {
        self.stream
            .clone_htod(data)
            .unwrap_or_else(|e| panic!("cuda:{}: uploading a weight: {e}", self.ordinal))
    }
}

fn launch_config(grid: Grid) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid.blocks,
        block_dim: grid.threads,
        shared_mem_bytes: 0,
    }
}

/// A size as the kernels' and cuBLAS' `int`.
fn dim(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Device(format!("{v} > i32::MAX")))
}

/// Activations on the host, gathered for one upload: f32 values, and bf16 bits for products
/// that multiply bf16.
#[derive(Default)]
struct Staged {
    wide: Vec<f32>,
    bf16: Vec<u16>,
}

impl Staged {
    /// Marks an offset into the bf16 buffer, where offsets of both buffers share one `usize`.
    const BF16: usize = 1 << (usize::BITS - 1);

    /// Appends `x`, rounded to bf16 when `bf16`; returns its offset (with [`Self::BF16`]).
    fn push(&mut self, x: &[f32], bf16: bool) -> usize {
        if bf16 {
            self.bf16
                .extend(x.iter().map(|&v| half::bf16::from_f32(v).to_bits()));
            Self::BF16 | (self.bf16.len() - x.len())
        } else {
            self.wide.extend_from_slice(x);
            self.wide.len() - x.len()
        }
    }

    fn upload(self, stream: &Arc<CudaStream>) -> Result<Uploaded> {
        Ok(Uploaded {
            wide: upload_activations(stream, &self.wide)?,
            bf16: upload_activations(stream, &self.bf16)?,
        })
    }
}

/// [`Staged`] activations on the GPU.
struct Uploaded {
    wide: Option<CudaSlice<f32>>,
    bf16: Option<CudaSlice<u16>>,
}

impl Uploaded {
    /// The activations at offset `at` of [`Staged::push`].
    fn at(&self, stream: &Arc<CudaStream>, at: usize) -> Activations {
        if at & Staged::BF16 != 0 {
            let base = self.bf16.as_ref().map_or(0, |d| d.device_ptr(stream).0);
            Activations {
                f32: 0,
                bf16: base + ((at & !Staged::BF16) * 2) as u64,
            }
        } else {
            let base = self.wide.as_ref().map_or(0, |d| d.device_ptr(stream).0);
            Activations {
                f32: base + (at * 4) as u64,
                bf16: 0,
            }
        }
    }
}

/// A product's activations on the GPU: f32 or bf16, whichever its weight takes (the other is
/// null).
#[derive(Clone, Copy)]
struct Activations {
    f32: CUdeviceptr,
    bf16: CUdeviceptr,
}

/// What the work enqueued on the stream needs until it has run.
#[derive(Default)]
struct Enqueued {
    scratch: Vec<CudaSlice<u16>>,
    floats: Vec<CudaSlice<f32>>,
    bytes: Vec<CudaSlice<u8>>,
    tables: Vec<CudaSlice<CUdeviceptr>>,
    products: Vec<CudaSlice<Fp8Product>>,
    softmax: Vec<CudaSlice<SoftmaxPart>>,
}

impl Enqueued {
    /// Keeps what other enqueued work needs, as long as this.
    fn keep(&mut self, other: Enqueued) {
        self.scratch.extend(other.scratch);
        self.floats.extend(other.floats);
        self.bytes.extend(other.bytes);
        self.tables.extend(other.tables);
        self.products.extend(other.products);
        self.softmax.extend(other.softmax);
    }

    /// Keeps per-head inputs until the work that reads them has run.
    fn keep_inputs(&mut self, inputs: HeadInputs) {
        self.floats.extend(inputs.wide);
        self.scratch.extend(inputs.bf16);
    }
}

/// Activations on the GPU; `None` for none.
fn upload_activations<T: cudarc::driver::DeviceRepr>(
    stream: &Arc<CudaStream>,
    x: &[T],
) -> Result<Option<CudaSlice<T>>> {
    if x.is_empty() {
        return Ok(None);
    }
    stream.clone_htod(x).map(Some).map_err(driver)
}

/// The device address of an optional buffer (0 for none), for writing. Everything runs on one
/// stream, whose order is the only order the buffers need, so the access guard goes at once.
fn ptr_mut<T>(buffer: &mut Option<CudaSlice<T>>, stream: &Arc<CudaStream>) -> CUdeviceptr {
    buffer.as_mut().map_or(0, |d| d.device_ptr_mut(stream).0)
}

fn driver(e: DriverError) -> Error {
    device_error("CUDA driver", e)
}

impl Backend for CudaBackend {
    type Matrix = CudaMatrix;
    type Rows = CudaRows;

    /// 80% of the GPU's free memory: the rest is for activations, attention's gathered cache
    /// and scores, cuBLAS, and a part-filled arena of pages per row width.
    fn kv_cache_memory(&self) -> Option<usize> {
        match self.stream.context().mem_get_info() {
            Ok((free, _)) => Some(free / 10 * 8),
            Err(e) => {
                tracing::warn!(gpu = self.ordinal, "cannot read the free GPU memory: {e}");
                None
            }
        }
    }

    fn new_rows(&self, width: usize) -> CudaRows {
        CudaRows::new(self.pages.clone(), width)
    }

    fn append_rows(&self, rows: &mut CudaRows, data: &[f32]) {
        if let Err(e) = rows.append(&self.stream, &self.kernels.paged_rows, data) {
            panic!("cuda:{}: caching rows: {e}", self.ordinal);
        }
    }

    fn truncate_rows(&self, rows: &mut CudaRows, len: usize) {
        rows.truncate(len);
    }

    fn rows_bytes(&self, rows: &CudaRows) -> usize {
        rows.bytes()
    }

    fn read_rows<'a>(&self, rows: &'a CudaRows, len: usize) -> std::borrow::Cow<'a, [f32]> {
        let mut host = vec![0.0f32; len * rows.width()];
        if len > 0 {
            let read = rows
                .gather(&self.stream, &self.kernels.paged_rows, len)
                .and_then(|(flat, table)| {
                    self.stream.memcpy_dtoh(&flat, &mut host).map_err(driver)?;
                    self.stream.synchronize().map_err(driver)?;
                    self.transfers.download(host.len() * 4);
                    drop((flat, table));
                    Ok(())
                });
            if let Err(e) = read {
                panic!("cuda:{}: reading cached rows: {e}", self.ordinal);
            }
        }
        std::borrow::Cow::Owned(host)
    }

    fn attend_rows(
        &self,
        q: &[f32],
        queries: usize,
        heads: usize,
        rows: &CudaRows,
        position: usize,
        values: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        let run = Attend {
            q,
            queries,
            rows,
            position,
            out,
        };
        self.attend_grouped(heads, values, scale, &mut [run]);
    }

    fn attend_grouped(
        &self,
        heads: usize,
        values: usize,
        scale: f32,
        runs: &mut [Attend<'_, CudaRows>],
    ) {
        if let Err(e) = self.try_attend_grouped(heads, values, scale, runs) {
            panic!("cuda:{}: attention: {e}", self.ordinal);
        }
    }

    fn linear_norm_linear(
        &self,
        x: &[f32],
        m: usize,
        weights: (&CudaMatrix, &CudaMatrix),
        norm: (&[f32], f32),
        first: &mut [f32],
        out: &mut [f32],
    ) {
        if let Err(e) = self.try_linear_norm_linear(x, m, weights, norm, first, out) {
            panic!(
                "cuda:{}: a product, its norm and a product: {e}",
                self.ordinal
            );
        }
    }

    fn attend_absorbed(
        &self,
        weights: &Absorbed<'_, CudaMatrix>,
        q: &[f32],
        runs: &[AbsorbedRun<'_, CudaRows>],
        out: &mut [f32],
    ) {
        if let Err(e) = self.try_attend_absorbed(weights, q, runs, out) {
            panic!("cuda:{}: absorbed attention: {e}", self.ordinal);
        }
    }

    fn attention_block(
        &self,
        block: &AttentionBlock<'_, CudaMatrix>,
        x: &[f32],
        rotation: &Rotation,
        runs: &mut [BlockRun<'_, CudaRows>],
        out: &mut [f32],
    ) {
        if let Err(e) = self.try_attention_block(block, x, rotation, runs, out) {
            panic!("cuda:{}: an attention block: {e}", self.ordinal);
        }
    }

    fn route(&self, router: &Router<'_, CudaMatrix>, x: &[f32], n: usize) -> Vec<Route> {
        self.try_route(router, x, n)
            .unwrap_or_else(|e| panic!("cuda:{}: a MoE gate: {e}", self.ordinal))
    }

    fn lm_head(&self, x: &[f32], w: &CudaMatrix, wants: &[Wants]) -> Vec<RowLogits> {
        assert!(x.len() >= wants.len() * w.cols, "cuda lm_head: x too small");
        self.try_lm_head(x, w, wants)
            .unwrap_or_else(|e| panic!("cuda:{}: the LM head: {e}", self.ordinal))
    }

    fn attention_block_routed(
        &self,
        block: &AttentionBlock<'_, CudaMatrix>,
        x: &[f32],
        rotation: &Rotation,
        runs: &mut [BlockRun<'_, CudaRows>],
        then: &ThenRoute<'_, CudaMatrix>,
        residual: &mut [f32],
        normed: &mut [f32],
    ) -> Vec<Route> {
        let routed =
            self.try_attention_block_routed(block, x, rotation, runs, then, residual, normed);
        routed
            .unwrap_or_else(|e| panic!("cuda:{}: an attention block and a gate: {e}", self.ordinal))
    }

    fn expands_attention(&self) -> bool {
        false
    }

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn matrix(&self, rows: usize, cols: usize, data: Vec<f32>) -> CudaMatrix {
        CudaMatrix {
            rows,
            cols,
            data: DeviceWeights::F32(self.upload(&data)),
        }
    }

    fn matrix_bf16(&self, rows: usize, cols: usize, bits: Vec<u16>) -> CudaMatrix {
        CudaMatrix {
            rows,
            cols,
            data: DeviceWeights::Bf16(self.upload(&bits)),
        }
    }

    /// An FP8 weight; its products of many rows go to the tensor cores where the backend has
    /// them and the weight has DeepSeek's 128 × 128 blocks and sizes cuBLASLt takes (multiples
    /// of 16).
    fn matrix_fp8(&self, blocks: Fp8Blocks) -> CudaMatrix {
        let tensor_cores = self.fp8_tensor_cores.is_some()
            && blocks.block == (128, 128)
            && blocks.rows.is_multiple_of(16)
            && blocks.cols.is_multiple_of(16);
        CudaMatrix {
            rows: blocks.rows,
            cols: blocks.cols,
            data: DeviceWeights::Fp8 {
                codes: self.upload(&blocks.codes),
                scales: self.upload(&blocks.scales),
                block: blocks.block,
                tensor_cores,
            },
        }
    }

    fn shape(&self, w: &CudaMatrix) -> (usize, usize) {
        (w.rows, w.cols)
    }

    fn matrix_bytes(&self, w: &CudaMatrix) -> usize {
        match &w.data {
            DeviceWeights::F32(d) => d.len() * 4,
            DeviceWeights::Bf16(d) => d.len() * 2,
            DeviceWeights::Fp8 { codes, scales, .. } => codes.len() + scales.len() * 4,
        }
    }

    fn linear(&self, x: &[f32], m: usize, w: &CudaMatrix, out: &mut [f32]) {
        if m == 0 || w.rows == 0 {
            return;
        }
        self.linear_grouped(&mut [Product { x, m, w, out }]);
    }

    fn linear_grouped(&self, products: &mut [Product<'_, CudaMatrix>]) {
        for p in products.iter() {
            assert!(p.x.len() >= p.m * p.w.cols, "cuda linear: x too small");
            assert!(p.out.len() >= p.m * p.w.rows, "cuda linear: out too small");
        }
        if let Err(e) = self.try_linear_grouped(products) {
            // The trait has no error path: a GPU that fails mid-step stops the process with
            // the driver's reason rather than returning wrong numbers.
            panic!("cuda:{}: {e}", self.ordinal);
        }
    }

    fn mlp_grouped(&self, runs: &mut [MlpRun<'_, CudaMatrix>]) {
        for r in runs.iter() {
            assert!(r.x.len() >= r.m * r.gate_up.cols, "cuda mlp: x too small");
            assert!(r.out.len() >= r.m * r.down.rows, "cuda mlp: out too small");
        }
        if let Err(e) = self.try_mlp_grouped(runs) {
            panic!("cuda:{}: {e}", self.ordinal);
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
        self.host.matmul_nt(m, n, k, a, b, out, out_stride);
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
        self.host.matmul_nn(m, n, k, a, b, out, out_stride);
    }
}
