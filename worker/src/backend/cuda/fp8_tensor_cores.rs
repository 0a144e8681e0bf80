//! FP8 products on tensor cores (Hopper, cuBLASLt 12.9 and later): a block-quantised weight
//! (one scale per 128 × 128 block) by activations quantised on the GPU in DeepSeek-V3's 1 × 128
//! blocks (`quantize_fp8_rows`), cuBLASLt applying both scales. The backend checks them against
//! its bf16 products when it opens ([`super::CudaBackend::open`]); where cuBLASLt cannot (an
//! older GPU or library) or disagrees, FP8 products of many rows dequantise the weight to bf16
//! instead.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, CudaStream};

use super::blas::Shape;
use super::{device_error, CudaBackend, CudaMatrix, DeviceWeights};
use crate::backend::{Backend, Product};
use crate::checkpoint::Fp8Blocks;
use crate::error::Result;

/// cuBLASLt's first version with block-scaled FP8 on Hopper.
const BLOCK_SCALES_SINCE: usize = 120_900;

/// `CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F` and `…_BLK128x128_32F`: CUDA 12.9's values, which
/// the CUDA 12.8 bindings this crate builds against do not name.
const SCALE_VEC128_32F: i32 = 4;
const SCALE_BLK128X128_32F: i32 = 5;

/// NVIDIA's advice for Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

/// A cuBLASLt handle and its workspace on one GPU.
pub(super) struct Fp8TensorCores {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
}

// SAFETY: the handle is used by one thread at a time (the backend's products run on its one
// stream, under its cuBLAS lock), and cuBLASLt handles may move between threads.
unsafe impl Send for Fp8TensorCores {}
// SAFETY: as above.
unsafe impl Sync for Fp8TensorCores {}

impl Drop for Fp8TensorCores {
    fn drop(&mut self) {
        // SAFETY: the handle is live and dropped once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

impl Fp8TensorCores {
    /// cuBLASLt's block-scaled FP8 products where this GPU (compute capability 9.x) and the
    /// library (12.9 or later) have them; why not otherwise.
    pub(super) fn open(stream: &Arc<CudaStream>) -> std::result::Result<Self, String> {
        use cudarc::driver::sys::CUdevice_attribute as attribute;
        let ctx = stream.context();
        let capability = |a| ctx.attribute(a).map_err(|e| e.to_string());
        let major = capability(attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = capability(attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        if major != 9 {
            return Err(format!(
                "compute capability {major}.{minor}: cuBLASLt's block scales are Hopper's (9.x)"
            ));
        }
        // SAFETY: only tries to load the library by name.
        if !unsafe { sys::is_culib_present() } {
            return Err("cuBLASLt (libcublasLt.so, CUDA 12) is not on the library path".into());
        }
        // SAFETY: a plain query of the loaded library.
        let version = unsafe { sys::cublasLtGetVersion() };
        if version < BLOCK_SCALES_SINCE {
            return Err(format!(
                "cuBLASLt {version} has no block-scaled FP8 (12.9, {BLOCK_SCALES_SINCE}, has)"
            ));
        }
        let handle = lt::create_handle().map_err(|e| e.to_string())?;
        // SAFETY: a workspace cuBLASLt may write to as it likes; never read here.
        let workspace = match unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) } {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: the handle is live and dropped once.
                let _ = unsafe { lt::destroy_handle(handle) };
                return Err(e.to_string());
            }
        };
        Ok(Self { handle, workspace })
    }

    /// Enqueues row-major `y[m, n] = x[m, k] · w[n, k]ᵀ` in f32, `w` E4M3FN with one scale per
    /// 128 × 128 block (`[ceil(n / 128), ceil(k / 128)]`, as the checkpoint has them), `x`
    /// E4M3FN with one per 1 × 128 (`[m, ceil(k / 128)]`, as `quantize_fp8_rows` writes them).
    ///
    /// # Safety
    /// The addresses hold those buffers on `stream`, and `y` m × n f32 values.
    pub(super) unsafe fn matmul(
        &self,
        stream: &Arc<CudaStream>,
        Shape { n, m, k }: Shape,
        (w, w_scales): (CUdeviceptr, CUdeviceptr),
        (x, x_scales): (CUdeviceptr, CUdeviceptr),
        y: CUdeviceptr,
    ) -> Result<()> {
        let fail =
            |e: cudarc::cublaslt::result::CublasError| device_error("cuBLASLt FP8 product", e);
        let desc = Desc::new(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F).map_err(fail)?;
        let transpose = cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T;
        let keep = cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N;
        use sys::cublasLtMatmulDescAttributes_t as at;
        // SAFETY: each value lives across its call and has the size the attribute takes.
        unsafe {
            desc.set(at::CUBLASLT_MATMUL_DESC_TRANSA, &transpose)?;
            desc.set(at::CUBLASLT_MATMUL_DESC_TRANSB, &keep)?;
            desc.set(at::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &w_scales)?;
            desc.set(at::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &x_scales)?;
            desc.set(at::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &SCALE_BLK128X128_32F)?;
            desc.set(at::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &SCALE_VEC128_32F)?;
        }
        // Column-major: the weight is k × n (taken transposed), the activations k × m, the
        // result n × m, which is row-major [m, n].
        let e4m3 = sys::cudaDataType::CUDA_R_8F_E4M3;
        let f32s = sys::cudaDataType::CUDA_R_32F;
        let a = Layout::new(e4m3, k, n).map_err(fail)?;
        let b = Layout::new(e4m3, k, m).map_err(fail)?;
        let d = Layout::new(f32s, n, m).map_err(fail)?;
        let preference = Preference::new(WORKSPACE_BYTES).map_err(fail)?;
        // SAFETY: every descriptor is live.
        let heuristic = unsafe {
            lt::get_matmul_algo_heuristic(self.handle, desc.0, a.0, b.0, d.0, d.0, preference.0)
        }
        .map_err(fail)?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (workspace, _reading) = cudarc::driver::DevicePtr::device_ptr(&self.workspace, stream);
        // SAFETY: the caller vouches for the buffers; the descriptors, scalars and workspace
        // live across the call, which only enqueues on `stream`.
        unsafe {
            lt::matmul(
                self.handle,
                desc.0,
                (&alpha) as *const f32 as *const c_void,
                (&beta) as *const f32 as *const c_void,
                w as *const c_void,
                a.0,
                x as *const c_void,
                b.0,
                y as *const c_void,
                d.0,
                y as *mut c_void,
                d.0,
                &heuristic.algo,
                workspace as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(fail)
    }
}

impl CudaBackend {
    /// Takes cuBLASLt's FP8 products on tensor cores where `wanted`, the GPU and library have
    /// them and they agree with the bf16 products on a test product; says which it chose in
    /// the log.
    pub(super) fn with_fp8_tensor_cores(mut self, wanted: bool) -> Self {
        if !wanted {
            return self;
        }
        let chosen = Fp8TensorCores::open(&self.stream).and_then(|cores| {
            self.fp8_tensor_cores = Some(cores);
            self.check_fp8_tensor_cores()
                .inspect_err(|_| self.fp8_tensor_cores = None)
        });
        match chosen {
            Ok(off) => tracing::info!(
                gpu = self.ordinal,
                "FP8 products of many rows on tensor cores (cuBLASLt's block scales; {off:.1e} \
                 of the largest value off the bf16 products on a test product)"
            ),
            Err(why) => tracing::warn!(
                gpu = self.ordinal,
                "--fp8-activations: FP8 products of many rows dequantise their weight to bf16 \
                 instead: {why}"
            ),
        }
        self
    }

    /// Runs one FP8 product of 16 rows on tensor cores and by the bf16 path, and returns how
    /// far apart they are (relative to the largest value), or why the tensor cores will not
    /// do: an error, or more than 5% apart (activations rounded to FP8 are 6% apart at worst,
    /// and less on a sum).
    fn check_fp8_tensor_cores(&self) -> std::result::Result<f32, String> {
        let (n, k, m) = (256, 384, 16);
        // A fixed pseudo-random weight and input (xorshift), every FP8 code finite.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let codes: Vec<u8> = (0..n * k)
            .map(|_| (next() % 0x7e) as u8 | (next() as u8 & 0x80))
            .collect();
        let scales: Vec<f32> = (0..(n / 128) * (k / 128))
            .map(|_| 1e-3 + (next() % 1000) as f32 * 1e-6)
            .collect();
        let x: Vec<f32> = (0..m * k)
            .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let blocks = Fp8Blocks {
            rows: n,
            cols: k,
            codes,
            scales,
            block: (128, 128),
        };
        let on_cores = self.matrix_fp8(blocks.clone());
        let mut by_bf16 = self.matrix_fp8(blocks);
        if let DeviceWeights::Fp8 { tensor_cores, .. } = &mut by_bf16.data {
            *tensor_cores = false;
        }
        let product = |w: &CudaMatrix| -> std::result::Result<Vec<f32>, String> {
            let mut y = vec![0.0f32; m * n];
            self.try_linear_grouped(&mut [Product {
                x: &x,
                m,
                w,
                out: &mut y,
            }])
            .map_err(|e| e.to_string())?;
            Ok(y)
        };
        let (got, want) = (product(&on_cores)?, product(&by_bf16)?);
        let largest = want
            .iter()
            .fold(0.0f32, |a, v| a.max(v.abs()))
            .max(f32::MIN_POSITIVE);
        let off = got
            .iter()
            .zip(&want)
            .fold(0.0f32, |a, (g, w)| a.max((g - w).abs()))
            / largest;
        if off.is_finite() && off <= 0.05 {
            Ok(off)
        } else {
            Err(format!(
                "cuBLASLt's FP8 products are {off:.1e} of the largest value off the bf16 ones"
            ))
        }
    }
}

/// A matmul descriptor, destroyed when dropped.
struct Desc(sys::cublasLtMatmulDesc_t);

impl Desc {
    fn new(compute: sys::cublasComputeType_t) -> std::result::Result<Self, lt::CublasError> {
        lt::create_matmul_desc(compute, sys::cudaDataType::CUDA_R_32F).map(Self)
    }

    /// # Safety
    /// `T` is the type the attribute takes.
    unsafe fn set<T>(
        &self,
        attribute: sys::cublasLtMatmulDescAttributes_t,
        value: &T,
    ) -> Result<()> {
        let size = std::mem::size_of::<T>();
        // SAFETY: the caller vouches for the type; the value lives across the call.
        unsafe {
            lt::set_matmul_desc_attribute(
                self.0,
                attribute,
                value as *const T as *const c_void,
                size,
            )
        }
        .map_err(|e| device_error("cuBLASLt FP8 product", e))
    }
}

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: live, and destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}

/// A column-major `rows × cols` matrix layout (leading dimension `rows`), destroyed when
/// dropped.
struct Layout(sys::cublasLtMatrixLayout_t);

impl Layout {
    fn new(
        dtype: sys::cudaDataType,
        rows: usize,
        cols: usize,
    ) -> std::result::Result<Self, lt::CublasError> {
        lt::create_matrix_layout(dtype, rows as u64, cols as u64, rows as i64).map(Self)
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: live, and destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}

/// A matmul preference with its workspace bound, destroyed when dropped.
struct Preference(sys::cublasLtMatmulPreference_t);

impl Preference {
    fn new(workspace: usize) -> std::result::Result<Self, lt::CublasError> {
        let preference = Self(lt::create_matmul_pref()?);
        // SAFETY: the attribute takes a size_t, which lives across the call.
        unsafe {
            lt::set_matmul_pref_attribute(
                preference.0,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&workspace) as *const usize as *const c_void,
                std::mem::size_of::<usize>(),
            )
        }?;
        Ok(preference)
    }
}

impl Drop for Preference {
    fn drop(&mut self) {
        // SAFETY: live, and destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}
