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
//! new cache rows, appended to their pages without leaving the GPU. [`Transfers`] counts the
//! waits for the GPU and the bytes moved.
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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::cublas::{result as blas, sys, CudaBlas};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError, LaunchConfig,
    PushKernelArg,
};

use super::cuda_pages::{CudaRows, PagePool};
use super::grid::{self, Grid, FP8_GEMV_ROWS};
use super::nvrtc::Kernels;
use super::{
    Absorbed, AbsorbedRun, Attend, AttentionBlock, Backend, BlockRun, CpuBackend, MlpRun, Product,
    Rotation, View,
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
    /// This crate's kernels, compiled by NVRTC when the backend opens.
    kernels: Kernels,
    /// The pages of every KV cache on this GPU.
    pages: Arc<PagePool>,
    transfers: Arc<Transfers>,
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
    /// FP8 ones too many rows for the FP8 kernel (dequantised to bf16 first).
    fn takes_bf16(&self, m: usize) -> bool {
        match self.data {
            DeviceWeights::F32(_) => false,
            DeviceWeights::Bf16(_) => true,
            DeviceWeights::Fp8 { .. } => m > FP8_GEMV_ROWS,
        }
    }
}

/// Most attention scores (floats) one block of queries holds on the GPU.
const GPU_SCORE_BLOCK: usize = 1 << 26;

enum DeviceWeights {
    F32(CudaSlice<f32>),
    /// bf16 bits.
    Bf16(CudaSlice<u16>),
    /// E4M3FN codes, with one f32 factor per `block` (rows, columns) of them.
    Fp8 {
        codes: CudaSlice<u8>,
        scales: CudaSlice<f32>,
        block: (usize, usize),
    },
}

fn device_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Device(format!("{what}: {e}"))
}

impl CudaBackend {
    /// Opens GPU `ordinal`; `host_threads` are the CPU threads of the host's products.
    pub fn open(ordinal: usize, host_threads: usize) -> Result<Self> {
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
        let kernels = Kernels::load(stream.context())?;
        let transfers = Arc::new(Transfers::default());
        Ok(Self {
            pages: Arc::new(PagePool::new(stream.clone(), transfers.clone())),
            transfers,
            stream,
            blas: Arc::new(Mutex::new(blas)),
            host: CpuBackend::new(host_threads),
            kernels,
            ordinal,
        })
    }

    /// The waits for the GPU and the bytes moved so far.
    pub fn transfers(&self) -> TransferCounts {
        self.transfers.counts()
    }

    /// The GPU's name, as the driver gives it.
    pub fn device_name(&self) -> String {
        self.stream
            .context()
            .name()
            .unwrap_or_else(|e| format!("cuda:{} ({e})", self.ordinal))
    }

    /// `products` in order on the stream, with one upload of their activations (f32, and
    /// rounded to bf16 for the products that multiply bf16), their launches, one download and
    /// one wait: a MoE layer's experts or attention's heads cost one round trip, not one each.
    /// Errors are the driver's or cuBLAS'.
    fn try_linear_grouped(&self, products: &mut [Product<'_, CudaMatrix>]) -> Result<()> {
        let mut inputs = Staged::default();
        let mut at = Vec::with_capacity(products.len());
        let mut outputs = 0;
        for p in products.iter() {
            let x = &p.x[..p.m * p.w.cols];
            at.push((inputs.push(x, p.w.takes_bf16(p.m)), outputs));
            outputs += p.m * p.w.rows;
        }
        if outputs == 0 {
            return Ok(());
        }
        let inputs = self.upload_staged(inputs)?;
        let mut y = self.alloc::<f32>(outputs)?;
        let mut run = Enqueued::default();
        {
            let blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
            let y_p = ptr_mut(&mut y, &self.stream);
            let group: Vec<_> = (products.iter().zip(&at))
                .map(|(p, &(x_at, y_at))| {
                    let x = inputs.at(&self.stream, x_at);
                    (p.w, p.m, x, y_p + (y_at * 4) as u64)
                })
                .collect();
            self.enqueue_products(&blas, &mut run, &group)?;
        }
        let host = self.download(&y, outputs, run)?;
        for (p, &(_, y_at)) in products.iter_mut().zip(&at) {
            let len = p.m * p.w.rows;
            p.out[..len].copy_from_slice(&host[y_at..y_at + len]);
        }
        Ok(())
    }

    /// The MLPs of `runs` in one round trip: one upload of their inputs; every run's `gate_up`
    /// product, `silu_mul` into f32 or bf16 (whichever its `down` takes; one launch for runs
    /// whose rows follow one another), every run's `down` product, with the intermediate
    /// activations left on the GPU; one download. FP8 products of a few rows are one launch
    /// per phase ([`Self::enqueue_products`]).
    fn try_mlp_grouped(&self, runs: &mut [MlpRun<'_, CudaMatrix>]) -> Result<()> {
        let mut inputs = Staged::default();
        // Per run: its input, gate_up output, activation and output offsets.
        let mut at = Vec::with_capacity(runs.len());
        let (mut gate_ups, mut acts, mut acts_bf16, mut outputs) = (0, 0, 0, 0);
        for r in runs.iter() {
            let width = r.down.cols;
            if r.gate_up.rows != 2 * width || r.gate_up.cols != r.down.rows {
                return Err(Error::Device(format!(
                    "an MLP of gate_up {}×{} and down {}×{width} does not chain",
                    r.gate_up.rows, r.gate_up.cols, r.down.rows
                )));
            }
            let x_at = inputs.push(&r.x[..r.m * r.gate_up.cols], r.gate_up.takes_bf16(r.m));
            let act_at = if r.down.takes_bf16(r.m) {
                acts_bf16 += r.m * width;
                Staged::BF16 | (acts_bf16 - r.m * width)
            } else {
                acts += r.m * width;
                acts - r.m * width
            };
            at.push((x_at, gate_ups, act_at, outputs));
            gate_ups += r.m * 2 * width;
            outputs += r.m * r.down.rows;
        }
        if outputs == 0 {
            return Ok(());
        }
        let kernels = &self.kernels;
        let inputs = self.upload_staged(inputs)?;
        let mut gate_up = self.alloc::<f32>(gate_ups)?;
        let mut act = self.alloc::<f32>(acts)?;
        let mut act_bf16 = self.alloc::<u16>(acts_bf16)?;
        let mut y = self.alloc::<f32>(outputs)?;
        let mut run = Enqueued::default();
        {
            let blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
            let gate_up_p = ptr_mut(&mut gate_up, &self.stream);
            let act_p = ptr_mut(&mut act, &self.stream);
            let act_bf16_p = ptr_mut(&mut act_bf16, &self.stream);
            let y_p = ptr_mut(&mut y, &self.stream);
            // Every gate_up product, then every SiLU-and-multiply, then every down product:
            // the FP8 products of each phase are one launch.
            let mut gate_ups = Vec::with_capacity(runs.len());
            let mut downs = Vec::with_capacity(runs.len());
            for (r, &(x_at, gu_at, act_at, y_at)) in runs.iter().zip(&at) {
                let gu = gate_up_p + (gu_at * 4) as u64;
                gate_ups.push((r.gate_up, r.m, inputs.at(&self.stream, x_at), gu));
                let act = if act_at & Staged::BF16 != 0 {
                    Activations {
                        f32: 0,
                        bf16: act_bf16_p + ((act_at & !Staged::BF16) * 2) as u64,
                    }
                } else {
                    Activations {
                        f32: act_p + (act_at * 4) as u64,
                        bf16: 0,
                    }
                };
                downs.push((r.down, r.m, act, y_p + (y_at * 4) as u64));
            }
            self.enqueue_products(&blas, &mut run, &gate_ups)?;
            // SiLU-and-multiply once per span of runs whose rows lie one after another at the
            // same width, in both buffers: the experts of a layer are one span.
            let mut spans: Vec<(CUdeviceptr, Activations, usize, usize)> = Vec::new();
            for (&(_, m, _, gu), &(down, _, act, _)) in gate_ups.iter().zip(&downs) {
                let width = down.cols;
                if m == 0 {
                    continue;
                }
                if let Some((first_gu, first_act, rows, w)) = spans.last_mut() {
                    let follows = |start: CUdeviceptr, next: CUdeviceptr, bytes: usize| {
                        start != 0 && next == start + (*rows * bytes) as u64
                    };
                    if *w == width
                        && follows(*first_gu, gu, 2 * width * 4)
                        && (follows(first_act.f32, act.f32, width * 4)
                            || follows(first_act.bf16, act.bf16, width * 2))
                    {
                        *rows += m;
                        continue;
                    }
                }
                spans.push((gu, act, m, width));
            }
            for (gu, act, rows, width) in spans {
                let (rows_i, cols) = (dim(rows)?, dim(width)?);
                let mut launch = self.stream.launch_builder(&kernels.silu_mul);
                launch
                    .arg(&gu)
                    .arg(&act.f32)
                    .arg(&act.bf16)
                    .arg(&rows_i)
                    .arg(&cols);
                self.transfers.launched();
                // SAFETY: silu_mul(gate_up, out_f32, out_bf16, rows, width) reads rows × 2·width
                // values at `gu` and writes rows × width values to the one output that is not
                // null; the span's runs' slices of the buffers hold them, one after another.
                unsafe { launch.launch(launch_config(grid::elementwise(rows * width))) }
                    .map_err(driver)?;
            }
            self.enqueue_products(&blas, &mut run, &downs)?;
        }
        let host = self.download(&y, outputs, run)?;
        for (r, &(_, _, _, y_at)) in runs.iter_mut().zip(&at) {
            let len = r.m * r.down.rows;
            r.out[..len].copy_from_slice(&host[y_at..y_at + len]);
        }
        Ok(())
    }

    /// Enqueues independent products `(w, m, x, y)` as [`Self::enqueue_product`] does, in as
    /// few launches as their shapes allow: the FP8 ones of at most [`FP8_GEMV_ROWS`] rows
    /// together in one `fp8_gemv_grouped` launch (per [`grid::FP8_GEMV_GROUP`] of them), and
    /// the f32 and bf16 ones of one shape in one batched cuBLAS call (attention's heads, and a
    /// MoE layer's experts where each took as many rows). Their tables go into `run`.
    fn enqueue_products(
        &self,
        blas: &CudaBlas,
        run: &mut Enqueued,
        products: &[(&CudaMatrix, usize, Activations, CUdeviceptr)],
    ) -> Result<()> {
        let mut grouped = Vec::new();
        // Per (bf16, n, k, m): the weights', inputs' and outputs' addresses.
        type Batch = ((bool, usize, usize, usize), Vec<[CUdeviceptr; 3]>);
        let mut batches: Vec<Batch> = Vec::new();
        let mut batch = |key, addresses| match batches.iter_mut().find(|(k, _)| *k == key) {
            Some((_, all)) => all.push(addresses),
            None => batches.push((key, vec![addresses])),
        };
        for &(w, m, x, y) in products {
            if m * w.rows == 0 {
                continue;
            }
            let key = |bf16| (bf16, w.rows, w.cols, m);
            match &w.data {
                DeviceWeights::Fp8 {
                    codes,
                    scales,
                    block,
                } if m <= FP8_GEMV_ROWS => grouped.push(Fp8Product {
                    w: codes.device_ptr(&self.stream).0,
                    scales: scales.device_ptr(&self.stream).0,
                    x: x.f32,
                    y,
                    n: dim(w.rows)?,
                    k: dim(w.cols)?,
                    m: dim(m)?,
                    br: dim(block.0)?,
                    bc: dim(block.1)?,
                }),
                DeviceWeights::F32(wd) => {
                    batch(key(false), [wd.device_ptr(&self.stream).0, x.f32, y])
                }
                DeviceWeights::Bf16(wd) => {
                    batch(key(true), [wd.device_ptr(&self.stream).0, x.bf16, y])
                }
                DeviceWeights::Fp8 { .. } => self.enqueue_product(blas, run, w, m, x, y)?,
            }
        }
        for ((bf16, n, k, m), addresses) in batches {
            let shape = Shape { n, m, k };
            let dtype = if bf16 {
                sys::cudaDataType_t::CUDA_R_16BF
            } else {
                sys::cudaDataType_t::CUDA_R_32F
            };
            self.transfers.launched();
            if let [[w, x, y]] = addresses[..] {
                // SAFETY: `w` holds the n × k weights of `dtype`, `x` m × k activations of it
                // and `y` m × n f32 outputs (the callers' word), all on this stream.
                unsafe { gemm(blas, shape, dtype, w, x, y) }?;
                continue;
            }
            // The weights' addresses, then the inputs', then the outputs'.
            let table: Vec<CUdeviceptr> = (0..3)
                .flat_map(|i| addresses.iter().map(move |a| a[i]))
                .collect();
            let table = self.stream.clone_htod(&table).map_err(driver)?;
            let table_p = table.device_ptr(&self.stream).0;
            // SAFETY: the table lists, for each product, n × k weights of `dtype`, m × k
            // activations of it and m × n f32 outputs (the callers' word), all on this stream.
            unsafe { gemm_batched(blas, shape, dtype, table_p, addresses.len()) }?;
            run.tables.push(table);
        }
        for chunk in grouped.chunks(grid::FP8_GEMV_GROUP) {
            let most_rows = chunk.iter().map(|p| p.n as usize).max().unwrap_or(0);
            let table = self.stream.clone_htod(chunk).map_err(driver)?;
            let table_p = table.device_ptr(&self.stream).0;
            let config = launch_config(grid::fp8_gemv_grouped(most_rows, chunk.len()));
            let mut launch = self.stream.launch_builder(&self.kernels.fp8_gemv_grouped);
            launch.arg(&table_p);
            self.transfers.launched();
            // SAFETY: fp8_gemv_grouped(products) runs fp8_gemv for each entry of the table,
            // one per block row of the grid: each entry's weight, scales, inputs and outputs
            // are buffers of its product's size on this stream, as for fp8_gemv.
            unsafe { launch.launch(config) }.map_err(driver)?;
            run.products.push(table);
        }
        Ok(())
    }

    /// Enqueues `y[m, n] = x[m, k] · wᵀ`, with `x` in f32 or bf16 as [`CudaMatrix::takes_bf16`]
    /// says and `y` in f32; a dequantised FP8 weight it makes goes into `run`, to live until the
    /// stream has run.
    fn enqueue_product(
        &self,
        blas: &CudaBlas,
        run: &mut Enqueued,
        w: &CudaMatrix,
        m: usize,
        x: Activations,
        y: CUdeviceptr,
    ) -> Result<()> {
        let (n, k) = (w.rows, w.cols);
        if m * n == 0 {
            return Ok(());
        }
        let shape = Shape { n, m, k };
        let product = |w: CUdeviceptr, dtype, x: CUdeviceptr| {
            self.transfers.launched();
            // SAFETY: every caller passes `w` with the n × k weights of `dtype`, and `x` with
            // m × k activations of it; `y` has m × n f32 outputs; all on this stream.
            unsafe { gemm(blas, shape, dtype, w, x, y) }
        };
        match &w.data {
            DeviceWeights::F32(wd) => {
                let (wp, _w) = wd.device_ptr(&self.stream);
                product(wp, sys::cudaDataType_t::CUDA_R_32F, x.f32)
            }
            DeviceWeights::Bf16(wd) => {
                let (wp, _w) = wd.device_ptr(&self.stream);
                product(wp, sys::cudaDataType_t::CUDA_R_16BF, x.bf16)
            }
            DeviceWeights::Fp8 {
                codes,
                scales,
                block,
            } if m <= FP8_GEMV_ROWS => self.fp8_gemv(shape, (codes, scales, *block), x.f32, y),
            DeviceWeights::Fp8 {
                codes,
                scales,
                block,
            } => {
                let wide = self.fp8_to_bf16((n, k), (codes, scales, *block))?;
                let (wp, reading) = wide.device_ptr(&self.stream);
                product(wp, sys::cudaDataType_t::CUDA_R_16BF, x.bf16)?;
                drop(reading);
                run.scratch.push(wide);
                Ok(())
            }
        }
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

    /// [`Backend::attend_grouped`] on the GPU: one upload of every sequence's queries, their
    /// attention ([`Self::enqueue_attention`]), one download of every output and one wait.
    fn try_attend_grouped(
        &self,
        heads: usize,
        values: usize,
        scale: f32,
        runs: &mut [Attend<'_, CudaRows>],
    ) -> Result<()> {
        let mut queries = Vec::new();
        let mut outputs = 0;
        for r in runs.iter() {
            queries.extend_from_slice(&r.q[..r.queries * heads * r.rows.width()]);
            outputs += r.queries * heads * values;
        }
        if outputs == 0 {
            return Ok(());
        }
        let q_dev = self.stream.clone_htod(&queries).map_err(driver)?;
        self.transfers.upload(queries.len() * 4);
        let mut o_dev: CudaSlice<f32> = self.stream.alloc_zeros(outputs).map_err(driver)?;
        let sequences: Vec<_> = runs
            .iter()
            .map(|r| (r.queries, r.rows, r.position))
            .collect();
        let shape = (heads, values, scale);
        let q_p = q_dev.device_ptr(&self.stream).0;
        let o_p = o_dev.device_ptr_mut(&self.stream).0;
        let enqueued = self.enqueue_attention(shape, &sequences, q_p, o_p)?;
        let host = self.download(&Some(o_dev), outputs, enqueued)?;
        drop(q_dev);
        let mut at = 0;
        for r in runs.iter_mut() {
            let len = r.queries * heads * values;
            r.out[..len].copy_from_slice(&host[at..at + len]);
            at += len;
        }
        Ok(())
    }

    /// [`Backend::attend_absorbed`] on the GPU in one round trip: one upload of the queries,
    /// [`Self::enqueue_absorbed`], one download.
    fn try_attend_absorbed(
        &self,
        w: &Absorbed<'_, CudaMatrix>,
        q: &[f32],
        runs: &[AbsorbedRun<'_, CudaRows>],
        out: &mut [f32],
    ) -> Result<()> {
        let (h, qk) = (w.uk_t.len(), w.nope + w.rope);
        let n: usize = runs.iter().map(|r| r.queries).sum();
        if n == 0 || h == 0 {
            return Ok(());
        }
        let q_dev = self.stream.clone_htod(&q[..n * h * qk]).map_err(driver)?;
        self.transfers.upload(n * h * qk * 4);
        let sequences: Vec<_> = runs
            .iter()
            .map(|r| (r.queries, r.rows, r.position))
            .collect();
        let mut run = Enqueued::default();
        let q_p = q_dev.device_ptr(&self.stream).0;
        let (result, len) = self.enqueue_absorbed(w, q_p, &sequences, &mut run)?;
        let host = self.download(&result, len, run)?;
        drop(q_dev);
        out[..len].copy_from_slice(&host);
        Ok(())
    }

    /// Enqueues MLA's absorbed attention of `sequences` (`(queries, cache, position)`) from
    /// their rotated queries at `q_p` (`[n, heads, nope + rope]`): per head the no-positional
    /// part (`heads_copy`) through `W_UKᵀ`; the absorbed queries put together (`heads_copy`);
    /// attention ([`Self::enqueue_attention`]); per head the latent output (`heads_copy`)
    /// through `W_UV`; the heads' values into `[n, heads, v]` (`heads_copy`), and through
    /// `o_proj` where the weights have it. Returns the result and its length; what the work
    /// reads goes into `run`.
    fn enqueue_absorbed(
        &self,
        w: &Absorbed<'_, CudaMatrix>,
        q_p: CUdeviceptr,
        sequences: &[(usize, &CudaRows, usize)],
        run: &mut Enqueued,
    ) -> Result<(Option<CudaSlice<f32>>, usize)> {
        let (h, qk, lora, v) = (w.uk_t.len(), w.nope + w.rope, w.lora, w.v);
        let width = lora + w.rope;
        let n: usize = sequences.iter().map(|s| s.0).sum();
        let shapes_agree = w.uv.len() == h
            && w.uk_t.iter().all(|m| (m.rows, m.cols) == (lora, w.nope))
            && w.uv.iter().all(|m| (m.rows, m.cols) == (v, lora))
            && w.o_proj.is_none_or(|o| o.cols == h * v);
        if !shapes_agree {
            return Err(Error::Device(format!(
                "absorbed attention of {h} heads (nope {}, lora {lora}, v {v}) with weights of \
                 other shapes",
                w.nope
            )));
        }
        // Per head, W_UKᵀ q_nope: [h, n, lora].
        let nope = self.heads_inputs(&w.uk_t, n, (q_p, h * qk, qk, 0), w.nope)?;
        let mut absorbed = self.alloc::<f32>(h * n * lora)?;
        let abs_p = ptr_mut(&mut absorbed, &self.stream);
        self.per_head(&w.uk_t, n, &nope, (abs_p, lora), run)?;
        // The absorbed queries [n, h, lora + rope]: [W_UKᵀ q_nope | q_pe] per head.
        let mut q_abs = self.alloc::<f32>(n * h * width)?;
        let q_abs_p = ptr_mut(&mut q_abs, &self.stream);
        let to_q_abs = |col| ((q_abs_p, 0), (h * width, width, col));
        self.heads_copy((abs_p, lora, n * lora, 0), to_q_abs(0), (n, h, lora))?;
        self.heads_copy((q_p, h * qk, qk, w.nope), to_q_abs(lora), (n, h, w.rope))?;
        // Attention: latent outputs [n, h, lora].
        let mut o_lat = self.alloc::<f32>(n * h * lora)?;
        let o_lat_p = ptr_mut(&mut o_lat, &self.stream);
        let attended = self.enqueue_attention((h, lora, w.scale), sequences, q_abs_p, o_lat_p)?;
        run.keep(attended);
        // Per head, W_UV of its latent output: [h, n, v], then [n, h, v].
        let latents = self.heads_inputs(&w.uv, n, (o_lat_p, h * lora, lora, 0), lora)?;
        let mut values = self.alloc::<f32>(h * n * v)?;
        let values_p = ptr_mut(&mut values, &self.stream);
        self.per_head(&w.uv, n, &latents, (values_p, v), run)?;
        // The heads' values [n, h, v], in f32 or bf16 as `o_proj` takes them.
        let bf16 = w.o_proj.is_some_and(|o| o.takes_bf16(n));
        let mut y = self.alloc::<f32>(if bf16 { 0 } else { n * h * v })?;
        let mut y_bf16 = self.alloc::<u16>(if bf16 { n * h * v } else { 0 })?;
        let y_p = ptr_mut(&mut y, &self.stream);
        let y_bf16_p = ptr_mut(&mut y_bf16, &self.stream);
        let layout = (h * v, v, 0);
        self.heads_copy(
            (values_p, v, n * v, 0),
            ((y_p, y_bf16_p), layout),
            (n, h, v),
        )?;
        let result = match w.o_proj {
            Some(o_proj) => {
                let mut projected = self.alloc::<f32>(n * o_proj.rows)?;
                let p = ptr_mut(&mut projected, &self.stream);
                let x = Activations {
                    f32: y_p,
                    bf16: y_bf16_p,
                };
                let blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
                self.enqueue_product(&blas, run, o_proj, n, x, p)?;
                run.floats.extend(y);
                (projected, n * o_proj.rows)
            }
            None => (y, n * h * v),
        };
        run.keep_inputs(nope);
        run.keep_inputs(latents);
        run.floats
            .extend([absorbed, q_abs, o_lat, values].into_iter().flatten());
        run.scratch.extend(y_bf16);
        Ok(result)
    }

    /// [`Backend::attention_block`] on the GPU in one round trip: one upload of the hidden
    /// states, both norms' weights and the step's rotation table; the stacked input product;
    /// q's `rms_norm` and `q_b` product; `rope_rotate` of the queries; the cache rows
    /// (`rms_norm` of the latent, `heads_copy`, `rope_rotate` of the shared key) appended to
    /// each run's pages from the GPU; [`Self::enqueue_absorbed`]; one download and one wait.
    fn try_attention_block(
        &self,
        b: &AttentionBlock<'_, CudaMatrix>,
        x: &[f32],
        rotation: &Rotation,
        runs: &mut [BlockRun<'_, CudaRows>],
        out: &mut [f32],
    ) -> Result<()> {
        let w = &b.attention;
        let (h, qk, lora, rope) = (w.uk_t.len(), w.nope + w.rope, w.lora, w.rope);
        let (width, pairs) = (lora + rope, rope / 2);
        let n: usize = runs.iter().map(|r| r.queries).sum();
        if n == 0 || h == 0 {
            return Ok(());
        }
        let (input, q_b) = (b.input, b.q_b);
        let q_lora = q_b.cols;
        let shapes_agree = input.rows == q_lora + width
            && q_b.rows == h * qk
            && b.q_norm.len() == q_lora
            && b.kv_norm.len() == lora
            && rope % 2 == 0
            && rotation.cos_sin.len() >= n * rope
            && runs.iter().all(|r| r.rows.width() == width);
        if !shapes_agree {
            return Err(Error::Device(format!(
                "an attention block of {h} heads (q_lora {q_lora}, lora {lora}, rope {rope}) \
                 with weights, norms, rotation or caches of other shapes"
            )));
        }
        let mut staged = Staged::default();
        let x_at = staged.push(&x[..n * input.cols], input.takes_bf16(n));
        let q_norm_at = staged.push(b.q_norm, false);
        let kv_norm_at = staged.push(b.kv_norm, false);
        let rotation_at = staged.push(&rotation.cos_sin[..n * rope], false);
        let inputs = self.upload_staged(staged)?;
        let at = |offset| inputs.at(&self.stream, offset).f32;
        let mut run = Enqueued::default();
        // [q_a | kv_a] = x · inputᵀ: [n, q_lora + lora + rope].
        let mut stacked = self.alloc::<f32>(n * input.rows)?;
        let stacked_p = ptr_mut(&mut stacked, &self.stream);
        let blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
        let x_dev = inputs.at(&self.stream, x_at);
        self.enqueue_product(&blas, &mut run, input, n, x_dev, stacked_p)?;
        // The queries: q_b(rms_norm(q_a)), then their rotary columns rotated.
        let bf16 = q_b.takes_bf16(n);
        let mut normed = self.alloc::<f32>(if bf16 { 0 } else { n * q_lora })?;
        let mut normed_bf16 = self.alloc::<u16>(if bf16 { n * q_lora } else { 0 })?;
        let normed_x = Activations {
            f32: ptr_mut(&mut normed, &self.stream),
            bf16: ptr_mut(&mut normed_bf16, &self.stream),
        };
        let norm = (at(q_norm_at), b.eps);
        self.rms_norm((stacked_p, input.rows), norm, normed_x, (n, q_lora))?;
        let mut q = self.alloc::<f32>(n * h * qk)?;
        let q_p = ptr_mut(&mut q, &self.stream);
        self.enqueue_product(&blas, &mut run, q_b, n, normed_x, q_p)?;
        drop(blas);
        let rotation_p = at(rotation_at);
        let angles = (rotation_p, pairs, rotation.interleave);
        self.rope_rotate((q_p, h * qk, qk, w.nope), (n, h), angles)?;
        // The cache rows [n, lora + rope]: the latent normalised, the shared key rotated.
        let mut kv = self.alloc::<f32>(n * width)?;
        let kv_p = ptr_mut(&mut kv, &self.stream);
        let kv_a_p = stacked_p + (q_lora * 4) as u64;
        let mut latent = self.alloc::<f32>(n * lora)?;
        let latent_p = ptr_mut(&mut latent, &self.stream);
        let norm = (at(kv_norm_at), b.eps);
        let into_latent = Activations {
            f32: latent_p,
            bf16: 0,
        };
        self.rms_norm((kv_a_p, input.rows), norm, into_latent, (n, lora))?;
        let kv_layout = (width, 0, 0);
        self.heads_copy((latent_p, lora, 0, 0), ((kv_p, 0), kv_layout), (n, 1, lora))?;
        let k_pe = (kv_a_p, input.rows, 0, lora);
        self.heads_copy(k_pe, ((kv_p, 0), (width, 0, lora)), (n, 1, rope))?;
        self.rope_rotate((kv_p, width, 0, lora), (n, 1), angles)?;
        let mut sequences = Vec::with_capacity(runs.len());
        let mut row = 0;
        for r in runs.iter_mut() {
            let src = kv_p + (row * width * 4) as u64;
            let paged_rows = &self.kernels.paged_rows;
            let table = r
                .rows
                .append_device(&self.stream, paged_rows, src, r.queries)?;
            run.tables.extend(table);
            row += r.queries;
        }
        for r in runs.iter() {
            sequences.push((r.queries, &*r.rows, r.position));
        }
        let (result, len) = self.enqueue_absorbed(w, q_p, &sequences, &mut run)?;
        let host = self.download(&result, len, run)?;
        drop((inputs, stacked, normed, normed_bf16, q, kv, latent));
        out[..len].copy_from_slice(&host);
        Ok(())
    }

    /// Enqueues `rms_norm` of the first `cols` values of `rows` rows at `x` (row stride
    /// `stride`) with the weights at `weight` into `out`'s f32 or bf16 buffer (`[rows, cols]`).
    fn rms_norm(
        &self,
        (x, stride): (CUdeviceptr, usize),
        (weight, eps): (CUdeviceptr, f32),
        out: Activations,
        (rows, cols): (usize, usize),
    ) -> Result<()> {
        let (stride, rows_i, cols_i) = (dim(stride)?, dim(rows)?, dim(cols)?);
        let mut launch = self.stream.launch_builder(&self.kernels.rms_norm);
        launch.arg(&x).arg(&stride).arg(&weight).arg(&eps);
        launch
            .arg(&out.f32)
            .arg(&out.bf16)
            .arg(&rows_i)
            .arg(&cols_i);
        self.transfers.launched();
        // SAFETY: rms_norm(x, stride, weight, eps, out_f32, out_bf16, rows, cols) reads rows
        // rows of `stride` values and `cols` weights, and writes rows × cols values to the
        // output that is not null; the callers' buffers hold them.
        unsafe { launch.launch(launch_config(grid::rms_norm(rows))) }.map_err(driver)?;
        Ok(())
    }

    /// Enqueues `rope_rotate` of columns `col ..` (`2 · pairs` of them) of every (row, head)
    /// of `rows × heads` at `x` (row and head strides given), by the table at `cos_sin`.
    fn rope_rotate(
        &self,
        (x, row, head, col): (CUdeviceptr, usize, usize, usize),
        (rows, heads): (usize, usize),
        (cos_sin, pairs, interleave): (CUdeviceptr, usize, bool),
    ) -> Result<()> {
        let ints = [row, head, col, rows, heads, pairs].map(dim);
        let [row, head, col, rows_i, heads_i, pairs_i] = ints;
        let (row, head, col) = (row?, head?, col?);
        let (rows_i, heads_i, pairs_i) = (rows_i?, heads_i?, pairs_i?);
        let interleave = i32::from(interleave);
        let mut launch = self.stream.launch_builder(&self.kernels.rope_rotate);
        launch.arg(&x).arg(&row).arg(&head).arg(&col);
        launch.arg(&rows_i).arg(&heads_i).arg(&pairs_i);
        launch.arg(&cos_sin).arg(&interleave);
        self.transfers.launched();
        // SAFETY: rope_rotate(x, row, head, col, rows, heads, pairs, cos_sin, interleave)
        // rewrites 2 · pairs values of every (row, head) the strides reach and reads rows ×
        // pairs pairs of cos_sin: the callers' buffers hold them.
        unsafe { launch.launch(launch_config(grid::elementwise(rows * heads * pairs))) }
            .map_err(driver)?;
        Ok(())
    }

    /// The inputs of per-head products with `weights` (`n` rows each): columns `col..` (`cols`
    /// of them) of every head of the activations at `src` (row and head strides given), as
    /// `[heads, n, cols]` in f32 and in bf16, each only where some weight takes it.
    fn heads_inputs(
        &self,
        weights: &[&CudaMatrix],
        n: usize,
        src: (CUdeviceptr, usize, usize, usize),
        cols: usize,
    ) -> Result<HeadInputs> {
        let h = weights.len();
        let bf16 = weights.iter().any(|w| w.takes_bf16(n));
        let wide = weights.iter().any(|w| !w.takes_bf16(n));
        let mut inputs = HeadInputs {
            wide: if wide {
                self.alloc(h * n * cols)?
            } else {
                None
            },
            bf16: if bf16 {
                self.alloc(h * n * cols)?
            } else {
                None
            },
            cols,
        };
        let layout = (cols, n * cols, 0);
        if wide {
            let to = (ptr_mut(&mut inputs.wide, &self.stream), 0);
            self.heads_copy(src, (to, layout), (n, h, cols))?;
        }
        if bf16 {
            let to = (0, ptr_mut(&mut inputs.bf16, &self.stream));
            self.heads_copy(src, (to, layout), (n, h, cols))?;
        }
        Ok(inputs)
    }

    /// Enqueues head `i`'s product with `weights[i]` on its rows of `inputs`, into row block `i`
    /// of `[heads, n, out_width]` at `out.0` (`out.1` = `out_width`).
    fn per_head(
        &self,
        weights: &[&CudaMatrix],
        n: usize,
        inputs: &HeadInputs,
        (out, out_width): (CUdeviceptr, usize),
        run: &mut Enqueued,
    ) -> Result<()> {
        let blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
        let wide = inputs
            .wide
            .as_ref()
            .map_or(0, |d| d.device_ptr(&self.stream).0);
        let bf16 = inputs
            .bf16
            .as_ref()
            .map_or(0, |d| d.device_ptr(&self.stream).0);
        let products: Vec<_> = (weights.iter().enumerate())
            .map(|(head, &w)| {
                let at = head * n * inputs.cols;
                let x = Activations {
                    f32: if wide == 0 { 0 } else { wide + (at * 4) as u64 },
                    bf16: if bf16 == 0 { 0 } else { bf16 + (at * 2) as u64 },
                };
                (w, n, x, out + (head * n * out_width * 4) as u64)
            })
            .collect();
        self.enqueue_products(&blas, run, &products)
    }

    /// [`Backend::linear_norm_linear`] on the GPU in one round trip: one upload of `x` and
    /// the norm's weights, the first product, `rms_norm` into f32 or bf16 as `b` takes it,
    /// the second product, two downloads and one wait.
    fn try_linear_norm_linear(
        &self,
        x: &[f32],
        m: usize,
        (a, b): (&CudaMatrix, &CudaMatrix),
        (norm, eps): (&[f32], f32),
        first: &mut [f32],
        out: &mut [f32],
    ) -> Result<()> {
        let cols = b.cols;
        if m == 0 {
            return Ok(());
        }
        if cols > a.rows || norm.len() != cols {
            return Err(Error::Device(format!(
                "a norm of {} over {cols} of {} columns",
                norm.len(),
                a.rows
            )));
        }
        let mut inputs = Staged::default();
        let x_at = inputs.push(&x[..m * a.cols], a.takes_bf16(m));
        let norm_at = inputs.push(norm, false);
        let inputs = self.upload_staged(inputs)?;
        let mut y = self.alloc::<f32>(m * a.rows)?;
        let bf16 = b.takes_bf16(m);
        let mut normed = self.alloc::<f32>(if bf16 { 0 } else { m * cols })?;
        let mut normed_bf16 = self.alloc::<u16>(if bf16 { m * cols } else { 0 })?;
        let mut z = self.alloc::<f32>(m * b.rows)?;
        let mut run = Enqueued::default();
        let y_p = ptr_mut(&mut y, &self.stream);
        let (n_p, nb_p) = (
            ptr_mut(&mut normed, &self.stream),
            ptr_mut(&mut normed_bf16, &self.stream),
        );
        let blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
        let x = inputs.at(&self.stream, x_at);
        self.enqueue_product(&blas, &mut run, a, m, x, y_p)?;
        let normed_x = Activations {
            f32: n_p,
            bf16: nb_p,
        };
        let norm = (inputs.at(&self.stream, norm_at).f32, eps);
        self.rms_norm((y_p, a.rows), norm, normed_x, (m, cols))?;
        let z_p = ptr_mut(&mut z, &self.stream);
        self.enqueue_product(&blas, &mut run, b, m, normed_x, z_p)?;
        drop(blas);
        if let Some(y) = &y {
            self.stream
                .memcpy_dtoh(y, &mut first[..m * a.rows])
                .map_err(driver)?;
            self.transfers.copied_down(m * a.rows * 4);
        }
        let host = self.download(&z, m * b.rows, run)?;
        out[..m * b.rows].copy_from_slice(&host);
        drop((inputs, y, normed, normed_bf16));
        Ok(())
    }

    /// Enqueues `heads_copy`: `cols` columns of every (row, head) of `rows × heads` from `src`
    /// (address, row stride, head stride, first column) to the f32 or bf16 buffer of `dst`
    /// (whichever address is not 0) at its strides and first column.
    fn heads_copy(
        &self,
        (src, src_row, src_head, src_col): (CUdeviceptr, usize, usize, usize),
        ((dst_f32, dst_bf16), (dst_row, dst_head, dst_col)): (
            (CUdeviceptr, CUdeviceptr),
            (usize, usize, usize),
        ),
        (rows, heads, cols): (usize, usize, usize),
    ) -> Result<()> {
        let ints = [
            src_row, src_head, src_col, dst_row, dst_head, dst_col, rows, heads, cols,
        ]
        .map(dim);
        let [sr, sh, sc, dr, dh, dc, r, h, c] = ints;
        let (sr, sh, sc, dr, dh, dc, r, h, c) = (sr?, sh?, sc?, dr?, dh?, dc?, r?, h?, c?);
        let mut launch = self.stream.launch_builder(&self.kernels.heads_copy);
        launch.arg(&src).arg(&sr).arg(&sh).arg(&sc);
        launch
            .arg(&dst_f32)
            .arg(&dst_bf16)
            .arg(&dr)
            .arg(&dh)
            .arg(&dc);
        launch.arg(&r).arg(&h).arg(&c);
        self.transfers.launched();
        // SAFETY: heads_copy(src, row, head, col, dst_f32, dst_bf16, row, head, col, rows,
        // heads, cols) reads and writes the rows × heads × cols elements the strides reach,
        // which the callers' buffers hold.
        unsafe { launch.launch(launch_config(grid::elementwise(rows * heads * cols))) }
            .map_err(driver)?;
        Ok(())
    }

    /// Enqueues the causal attention of `sequences` (`(queries, cache, position)`), whose
    /// queries lie in order at `q_p` (`[queries, heads, width]` each) and whose outputs go in
    /// order to `o_p` (`[queries, heads, values]` each): per sequence its cache gathered from
    /// its pages (`paged_rows`), then per block of queries the scores in cuBLAS,
    /// `causal_softmax`, and the weighted sum of the latents in cuBLAS. What the work reads
    /// comes back, to live until the stream has run it.
    fn enqueue_attention(
        &self,
        (heads, values, scale): (usize, usize, f32),
        sequences: &[(usize, &CudaRows, usize)],
        mut q_p: CUdeviceptr,
        mut o_p: CUdeviceptr,
    ) -> Result<Enqueued> {
        let mut most_scores = 0;
        for &(queries, rows, position) in sequences {
            let (width, total) = (rows.width(), position + queries);
            if rows.len() < total || values > width {
                return Err(Error::Device(format!(
                    "attention over {} cached rows of {width} for {total} positions and \
                     {values} values",
                    rows.len()
                )));
            }
            let block = (GPU_SCORE_BLOCK / (heads * total).max(1)).clamp(1, queries.max(1));
            most_scores = most_scores.max(block * heads * total);
        }
        let mut run = Enqueued::default();
        let mut scores: CudaSlice<f32> = self
            .stream
            .alloc_zeros(most_scores.max(1))
            .map_err(driver)?;
        let blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
        let scores_p = scores.device_ptr_mut(&self.stream).0;
        for &(queries, rows, position) in sequences.iter().filter(|s| s.0 > 0) {
            let (width, total) = (rows.width(), position + queries);
            let (cache, table) = rows.gather(&self.stream, &self.kernels.paged_rows, total)?;
            let cache_p = cache.device_ptr(&self.stream).0;
            let block = (GPU_SCORE_BLOCK / (heads * total).max(1)).clamp(1, queries);
            let mut start = 0;
            while start < queries {
                let n = block.min(queries - start);
                let (keys, pairs) = (position + start + n, n * heads);
                let q_at = q_p + (start * heads * width * 4) as u64;
                self.transfers.launched();
                // SAFETY: scores[pairs, keys] = q[pairs, width] · cache[keys, width]ᵀ: the
                // buffers hold them (keys <= total rows gathered), all on this stream.
                unsafe {
                    gemm(
                        &blas,
                        Shape {
                            n: keys,
                            m: pairs,
                            k: width,
                        },
                        sys::cudaDataType_t::CUDA_R_32F,
                        cache_p,
                        q_at,
                        scores_p,
                    )?
                };
                let (rows_i, keys_i, heads_i) = (dim(pairs)?, dim(keys)?, dim(heads)?);
                let first = dim(position + start + 1)?;
                let mut launch = self.stream.launch_builder(&self.kernels.causal_softmax);
                launch.arg(&scores_p).arg(&rows_i).arg(&keys_i);
                launch.arg(&heads_i).arg(&first).arg(&scale);
                self.transfers.launched();
                // SAFETY: causal_softmax(scores, rows, cols, heads, first, scale) rewrites
                // rows × cols scores, which `scores` holds.
                unsafe { launch.launch(launch_config(grid::causal_softmax(pairs))) }
                    .map_err(driver)?;
                self.transfers.launched();
                // SAFETY: out[pairs, values] = scores[pairs, keys] · cache[keys, ..values]:
                // the buffers hold them, all on this stream.
                unsafe {
                    gemm_nn(
                        &blas,
                        (values, pairs, keys),
                        (cache_p, width),
                        (scores_p, keys),
                        (o_p + (start * heads * values * 4) as u64, values),
                    )?
                };
                start += n;
            }
            q_p += (queries * heads * width * 4) as u64;
            o_p += (queries * heads * values * 4) as u64;
            run.floats.push(cache);
            run.tables.push(table);
        }
        run.floats.push(scores);
        Ok(run)
    }

    /// Enqueues `y[m, n] = x[m, k] · wᵀ` for an FP8 weight and at most [`FP8_GEMV_ROWS`]
    /// rows, in f32, reading the weight at one byte a value; `x` and `y` are f32 on the GPU.
    fn fp8_gemv(
        &self,
        Shape { n, m, k }: Shape,
        (codes, scales, block): (&CudaSlice<u8>, &CudaSlice<f32>, (usize, usize)),
        x: CUdeviceptr,
        y: CUdeviceptr,
    ) -> Result<()> {
        let kernels = &self.kernels;
        let (rows, cols, m) = (dim(n)?, dim(k)?, dim(m)?);
        let (br, bc) = (dim(block.0)?, dim(block.1)?);
        let (codes_p, _c) = codes.device_ptr(&self.stream);
        let (scales_p, _s) = scales.device_ptr(&self.stream);
        let config = launch_config(grid::fp8_gemv(n));
        let mut launch = self.stream.launch_builder(&kernels.fp8_gemv);
        launch.arg(&codes_p).arg(&scales_p).arg(&x).arg(&y);
        launch.arg(&rows).arg(&cols).arg(&m).arg(&br).arg(&bc);
        self.transfers.launched();
        // SAFETY: fp8_gemv(w, scales, x, y, n, k, m, br, bc) reads n × k codes, the scale grid
        // of their blocks and m × k activations from x, and writes m × n values from y: the
        // caller's buffers hold them.
        unsafe { launch.launch(config) }.map_err(driver)?;
        Ok(())
    }

    /// Enqueues the dequantisation of an FP8 weight `[n, k]` to bf16, into a new buffer.
    fn fp8_to_bf16(
        &self,
        (n, k): (usize, usize),
        (codes, scales, block): (&CudaSlice<u8>, &CudaSlice<f32>, (usize, usize)),
    ) -> Result<CudaSlice<u16>> {
        let mut wide: CudaSlice<u16> = self.stream.alloc_zeros(n * k).map_err(driver)?;
        let kernels = &self.kernels;
        let (rows, cols) = (dim(n)?, dim(k)?);
        let (br, bc) = (dim(block.0)?, dim(block.1)?);
        let config = launch_config(grid::elementwise(n * k));
        let mut launch = self.stream.launch_builder(&kernels.fp8_to_bf16);
        launch.arg(codes).arg(scales).arg(&mut wide);
        launch.arg(&rows).arg(&cols).arg(&br).arg(&bc);
        self.transfers.launched();
        // SAFETY: fp8_to_bf16(w, scales, out, rows, cols, br, bc) reads n × k codes and the
        // scale grid of their blocks, and writes n × k values of `wide`.
        unsafe { launch.launch(config) }.map_err(driver)?;
        Ok(wide)
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
    tables: Vec<CudaSlice<CUdeviceptr>>,
    products: Vec<CudaSlice<Fp8Product>>,
}

impl Enqueued {
    /// Keeps what other enqueued work needs, as long as this.
    fn keep(&mut self, other: Enqueued) {
        self.scratch.extend(other.scratch);
        self.floats.extend(other.floats);
        self.tables.extend(other.tables);
        self.products.extend(other.products);
    }

    /// Keeps per-head inputs until the work that reads them has run.
    fn keep_inputs(&mut self, inputs: HeadInputs) {
        self.floats.extend(inputs.wide);
        self.scratch.extend(inputs.bf16);
    }
}

/// One product of `fp8_gemv_grouped`, laid out as `nvrtc.cu`'s `Fp8Product`: device addresses
/// of the weight's codes and scales, the f32 inputs and outputs, and `fp8_gemv`'s sizes.
#[repr(C)]
#[derive(Clone, Copy)]
struct Fp8Product {
    w: CUdeviceptr,
    scales: CUdeviceptr,
    x: CUdeviceptr,
    y: CUdeviceptr,
    n: i32,
    k: i32,
    m: i32,
    br: i32,
    bc: i32,
}

// SAFETY: plain data in the kernel's C layout (four addresses, five ints), copied as bytes.
unsafe impl cudarc::driver::DeviceRepr for Fp8Product {}

/// The inputs of per-head products, `[heads, n, cols]`, in f32 and in bf16 where some weight
/// takes them so.
struct HeadInputs {
    wide: Option<CudaSlice<f32>>,
    bf16: Option<CudaSlice<u16>>,
    cols: usize,
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

/// `n` weight rows, `m` activation rows, `k` values in each.
#[derive(Clone, Copy)]
struct Shape {
    n: usize,
    m: usize,
    k: usize,
}

/// Row-major `y[m, n] = x[m, k] · w[n, k]ᵀ` with operands of type `operands` and an f32 result
/// accumulated in f32. Read column-major, the row-major buffers are wᵀ (k × n), xᵀ (k × m) and
/// yᵀ (n × m), so this is yᵀ = (wᵀ)ᵀ · xᵀ: cuBLAS' `T, N`.
///
/// # Safety
/// `w`, `x` and `y` point to at least `n·k`, `m·k` and `m·n` values on the handle's stream.
unsafe fn gemm(
    blas: &CudaBlas,
    Shape { n, m, k }: Shape,
    operands: sys::cudaDataType_t,
    w: CUdeviceptr,
    x: CUdeviceptr,
    y: CUdeviceptr,
) -> Result<()> {
    // SAFETY: as the caller vouches.
    unsafe { gemm_f32_out(blas, (true, operands), (n, m, k), (w, k), (x, k), (y, n)) }
}

/// [`gemm`] of `count` products of one shape as one cuBLAS batched call: `table` holds, on the
/// GPU, the weights' addresses, then the inputs', then the outputs' (`count` of each).
///
/// # Safety
/// Each listed weight, input and output holds `n·k`, `m·k` and `m·n` values on the handle's
/// stream, and `table` the `3·count` addresses.
unsafe fn gemm_batched(
    blas: &CudaBlas,
    Shape { n, m, k }: Shape,
    operands: sys::cudaDataType_t,
    table: CUdeviceptr,
    count: usize,
) -> Result<()> {
    let (rows, cols, inner, count_i) = (dim(n)?, dim(m)?, dim(k)?, dim(count)?);
    let at = |i: usize| table + (i * count * 8) as u64;
    let (alpha, beta) = (1.0f32, 0.0f32);
    // SAFETY: the caller vouches for the table and the buffers; alpha and beta live across the
    // call. Read column-major, each product is yᵀ = (wᵀ)ᵀ · xᵀ, as in `gemm`.
    unsafe {
        sys::cublasGemmBatchedEx(
            *blas.handle(),
            sys::cublasOperation_t::CUBLAS_OP_T,
            sys::cublasOperation_t::CUBLAS_OP_N,
            rows,
            cols,
            inner,
            (&alpha) as *const f32 as *const _,
            at(0) as *const *const _,
            operands,
            inner,
            at(1) as *const *const _,
            operands,
            inner,
            (&beta) as *const f32 as *const _,
            at(2) as *const *mut _,
            sys::cudaDataType_t::CUDA_R_32F,
            rows,
            count_i,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .result()
    .map_err(|e| device_error("cuBLAS batched product", e))
}

/// Column-major `c[m, n] = a[m, k] · b[k, n]` in f32 (cuBLAS' `N, N`), each operand with its
/// leading dimension: with row-major buffers, `cᵀ = bᵀ · aᵀ`, i.e. row-major `C[n, m] =
/// B[n, k] · A[k, m]`.
///
/// # Safety
/// The pointers hold the matrices their leading dimensions describe, on the handle's stream.
unsafe fn gemm_nn(
    blas: &CudaBlas,
    (m, n, k): (usize, usize, usize),
    a: (CUdeviceptr, usize),
    b: (CUdeviceptr, usize),
    c: (CUdeviceptr, usize),
) -> Result<()> {
    let f32s = sys::cudaDataType_t::CUDA_R_32F;
    // SAFETY: as the caller vouches.
    unsafe { gemm_f32_out(blas, (false, f32s), (m, n, k), a, b, c) }
}

/// cuBLAS' `gemm_ex` with column-major `c[m, n] = op(a) · b` (`op` transposes `a` when
/// `transpose_a`), operands of one type, an f32 result and f32 accumulation.
///
/// # Safety
/// As [`gemm`] and [`gemm_nn`].
unsafe fn gemm_f32_out(
    blas: &CudaBlas,
    (transpose_a, operands): (bool, sys::cudaDataType_t),
    (m, n, k): (usize, usize, usize),
    (a, lda): (CUdeviceptr, usize),
    (b, ldb): (CUdeviceptr, usize),
    (c, ldc): (CUdeviceptr, usize),
) -> Result<()> {
    let (m, n, k) = (dim(m)?, dim(n)?, dim(k)?);
    let (lda, ldb, ldc) = (dim(lda)?, dim(ldb)?, dim(ldc)?);
    let op_a = if transpose_a {
        sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        sys::cublasOperation_t::CUBLAS_OP_N
    };
    let (alpha, beta) = (1.0f32, 0.0f32);
    // SAFETY: the caller vouches for the buffers; alpha and beta live across the call.
    unsafe {
        blas::gemm_ex(
            *blas.handle(),
            op_a,
            sys::cublasOperation_t::CUBLAS_OP_N,
            m,
            n,
            k,
            (&alpha) as *const f32 as *const _,
            a as *const _,
            operands,
            lda,
            b as *const _,
            operands,
            ldb,
            (&beta) as *const f32 as *const _,
            c as *mut _,
            sys::cudaDataType_t::CUDA_R_32F,
            ldc,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| device_error("cuBLAS product", e))
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

    fn matrix_fp8(&self, blocks: Fp8Blocks) -> CudaMatrix {
        CudaMatrix {
            rows: blocks.rows,
            cols: blocks.cols,
            data: DeviceWeights::Fp8 {
                codes: self.upload(&blocks.codes),
                scales: self.upload(&blocks.scales),
                block: blocks.block,
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
