//! The CUDA backend (feature `cuda`), first steps: weights live in GPU memory in their
//! checkpoint precision (bf16 stays bf16, f32 stays f32, FP8 stays FP8) and every product with a
//! weight runs on the GPU; activations cross to the GPU and back for each product, or for each
//! group of products ([`Backend::linear_grouped`]: one upload, the launches, one download), and
//! the products of attention over the KV cache (activations by activations) run on the host's
//! CPU backend.
//!
//! cudarc loads the CUDA libraries when first used (`dynamic-loading`), so this module builds
//! and lints on machines without CUDA; [`CudaBackend::open`] is where a missing driver or device
//! shows, as an [`Error::Device`] that names it.
//!
//! bf16 weights multiply bf16 activations (rounded on the host) with f32 accumulation and f32
//! output, as PyTorch's bf16 path does; f32 weights multiply f32 activations. Block-quantised
//! FP8 weights stay FP8 with their scales: products of up to [`FP8_GEMV_ROWS`] rows (decode)
//! read them at one byte a value in a kernel of this crate ([`super::nvrtc`]), in f32; larger
//! ones dequantise the weight to bf16 on the GPU first and run as the bf16 weights do.

use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::{result as blas, sys, CudaBlas};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError, LaunchConfig,
    PushKernelArg,
};

use super::grid::{self, Grid, FP8_GEMV_ROWS};
use super::nvrtc::Kernels;
use super::{Backend, CpuBackend, Product, View};
use crate::checkpoint::Fp8Blocks;
use crate::error::{Error, Result};

/// Runs the products with weights on one GPU.
pub struct CudaBackend {
    stream: Arc<CudaStream>,
    /// One cuBLAS handle, used by one thread at a time: ranks of one process share the backend.
    blas: Arc<Mutex<CudaBlas>>,
    /// Attention over the caches, on the host.
    host: CpuBackend,
    /// This crate's kernels, compiled when the first FP8 weight arrives.
    kernels: OnceLock<std::result::Result<Kernels, String>>,
    ordinal: usize,
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
        Ok(Self {
            stream,
            blas: Arc::new(Mutex::new(blas)),
            host: CpuBackend::new(host_threads),
            kernels: OnceLock::new(),
            ordinal,
        })
    }

    /// The GPU's name, as the driver gives it.
    pub fn device_name(&self) -> String {
        self.stream
            .context()
            .name()
            .unwrap_or_else(|e| format!("cuda:{} ({e})", self.ordinal))
    }

    /// This crate's kernels, compiled on first use.
    fn kernels(&self) -> Result<&Kernels> {
        self.kernels
            .get_or_init(|| Kernels::load(self.stream.context()).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| Error::Device(e.clone()))
    }

    /// `products` in order on the stream, with one upload of their activations (f32, and
    /// rounded to bf16 for the products that multiply bf16), their launches, one download and
    /// one wait: a MoE layer's experts or attention's heads cost one round trip, not one each.
    /// Errors are the driver's or cuBLAS'.
    fn try_linear_grouped(&self, products: &mut [Product<'_, CudaMatrix>]) -> Result<()> {
        // Where each product's activations and outputs lie in the shared buffers.
        let (mut wide_x, mut bf16_x) = (Vec::new(), Vec::new());
        let mut at = Vec::with_capacity(products.len());
        let mut outputs = 0;
        for p in products.iter() {
            let x = &p.x[..p.m * p.w.cols];
            let x_at = if p.w.takes_bf16(p.m) {
                bf16_x.extend(x.iter().map(|&v| half::bf16::from_f32(v).to_bits()));
                bf16_x.len() - x.len()
            } else {
                wide_x.extend_from_slice(x);
                wide_x.len() - x.len()
            };
            at.push((x_at, outputs));
            outputs += p.m * p.w.rows;
        }
        if outputs == 0 {
            return Ok(());
        }
        let wide_x = self.upload_activations(&wide_x)?;
        let bf16_x = self.upload_activations(&bf16_x)?;
        let mut y: CudaSlice<f32> = self.stream.alloc_zeros(outputs).map_err(driver)?;
        // Dequantised FP8 weights, kept until the products that read them have run.
        let mut scratch: Vec<CudaSlice<u16>> = Vec::new();
        {
            let blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
            let (yp, _y) = y.device_ptr_mut(&self.stream);
            let wide = wide_x.as_ref().map(|d| d.device_ptr(&self.stream));
            let bf16 = bf16_x.as_ref().map(|d| d.device_ptr(&self.stream));
            let (wide_p, bf16_p) = (
                wide.as_ref().map_or(0, |d| d.0),
                bf16.as_ref().map_or(0, |d| d.0),
            );
            for (p, &(x_at, y_at)) in products.iter().zip(&at) {
                let (n, k, m) = (p.w.rows, p.w.cols, p.m);
                if m * n == 0 {
                    continue;
                }
                let shape = Shape { n, m, k };
                let y = yp + (y_at * 4) as u64;
                let (x_f32, x_bf16) = (wide_p + (x_at * 4) as u64, bf16_p + (x_at * 2) as u64);
                let product = |w: CUdeviceptr, dtype, x: CUdeviceptr| {
                    // SAFETY: every caller passes `w` with the n × k weights of `dtype`, and
                    // `x` with m × k activations of it; `y` has m × n f32 outputs; all on this
                    // stream.
                    unsafe { gemm(&blas, shape, dtype, w, x, y) }
                };
                match &p.w.data {
                    DeviceWeights::F32(wd) => {
                        let (wp, _w) = wd.device_ptr(&self.stream);
                        product(wp, sys::cudaDataType_t::CUDA_R_32F, x_f32)?;
                    }
                    DeviceWeights::Bf16(wd) => {
                        let (wp, _w) = wd.device_ptr(&self.stream);
                        product(wp, sys::cudaDataType_t::CUDA_R_16BF, x_bf16)?;
                    }
                    DeviceWeights::Fp8 {
                        codes,
                        scales,
                        block,
                    } if m <= FP8_GEMV_ROWS => {
                        self.fp8_gemv(shape, (codes, scales, *block), x_f32, y)?;
                    }
                    DeviceWeights::Fp8 {
                        codes,
                        scales,
                        block,
                    } => {
                        let wide = self.fp8_to_bf16((n, k), (codes, scales, *block))?;
                        let (wp, reading) = wide.device_ptr(&self.stream);
                        product(wp, sys::cudaDataType_t::CUDA_R_16BF, x_bf16)?;
                        drop(reading);
                        scratch.push(wide);
                    }
                }
            }
        }
        let mut host = vec![0.0f32; outputs];
        self.stream.memcpy_dtoh(&y, &mut host).map_err(driver)?;
        self.stream.synchronize().map_err(driver)?;
        drop(scratch);
        for (p, &(_, y_at)) in products.iter_mut().zip(&at) {
            let len = p.m * p.w.rows;
            p.out[..len].copy_from_slice(&host[y_at..y_at + len]);
        }
        Ok(())
    }

    /// Activations on the GPU; `None` for none.
    fn upload_activations<T: cudarc::driver::DeviceRepr>(
        &self,
        x: &[T],
    ) -> Result<Option<CudaSlice<T>>> {
        if x.is_empty() {
            return Ok(None);
        }
        self.stream.clone_htod(x).map(Some).map_err(driver)
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
        let kernels = self.kernels()?;
        let (rows, cols, m) = (dim(n)?, dim(k)?, dim(m)?);
        let (br, bc) = (dim(block.0)?, dim(block.1)?);
        let (codes_p, _c) = codes.device_ptr(&self.stream);
        let (scales_p, _s) = scales.device_ptr(&self.stream);
        let config = launch_config(grid::fp8_gemv(n));
        let mut launch = self.stream.launch_builder(&kernels.fp8_gemv);
        launch.arg(&codes_p).arg(&scales_p).arg(&x).arg(&y);
        launch.arg(&rows).arg(&cols).arg(&m).arg(&br).arg(&bc);
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
        let kernels = self.kernels()?;
        let (rows, cols) = (dim(n)?, dim(k)?);
        let (br, bc) = (dim(block.0)?, dim(block.1)?);
        let config = launch_config(grid::elementwise(n * k));
        let mut launch = self.stream.launch_builder(&kernels.fp8_to_bf16);
        launch.arg(codes).arg(scales).arg(&mut wide);
        launch.arg(&rows).arg(&cols).arg(&br).arg(&bc);
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
    let (n, m, k) = (dim(n)?, dim(m)?, dim(k)?);
    let (alpha, beta) = (1.0f32, 0.0f32);
    // SAFETY: the caller vouches for the buffers; alpha and beta live across the call.
    unsafe {
        blas::gemm_ex(
            *blas.handle(),
            sys::cublasOperation_t::CUBLAS_OP_T,
            sys::cublasOperation_t::CUBLAS_OP_N,
            n,
            m,
            k,
            (&alpha) as *const f32 as *const _,
            w as *const _,
            operands,
            k,
            x as *const _,
            operands,
            k,
            (&beta) as *const f32 as *const _,
            y as *mut _,
            sys::cudaDataType_t::CUDA_R_32F,
            n,
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
