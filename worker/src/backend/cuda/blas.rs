//! cuBLAS' products in the backend's row-major terms: one product, a batch of one shape, and
//! products of many shapes in one call (attention's, cuBLAS 12.5 and later).

use cudarc::cublas::{result as blas, sys, CudaBlas};
use cudarc::driver::sys::CUdeviceptr;

use super::{device_error, dim};
use crate::error::Result;

/// `n` weight rows, `m` activation rows, `k` values in each.
#[derive(Clone, Copy)]
pub(super) struct Shape {
    pub(super) n: usize,
    pub(super) m: usize,
    pub(super) k: usize,
}

/// Row-major `y[m, n] = x[m, k] · w[n, k]ᵀ` with operands of type `operands` and an f32 result
/// accumulated in f32. Read column-major, the row-major buffers are wᵀ (k × n), xᵀ (k × m) and
/// yᵀ (n × m), so this is yᵀ = (wᵀ)ᵀ · xᵀ: cuBLAS' `T, N`.
///
/// # Safety
/// `w`, `x` and `y` point to at least `n·k`, `m·k` and `m·n` values on the handle's stream.
pub(super) unsafe fn gemm(
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
pub(super) unsafe fn gemm_batched(
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

/// cuBLAS' `gemm_ex` with column-major `c[m, n] = op(a) · b` (`op` transposes `a` when
/// `transpose_a`), operands of one type, an f32 result and f32 accumulation.
///
/// # Safety
/// The pointers hold the matrices their leading dimensions describe, on the handle's stream.
pub(super) unsafe fn gemm_f32_out(
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

/// One f32 product of [`gemm_grouped`], column-major as [`gemm_f32_out`] takes it: `c[m, n] =
/// op(a) · b`, each operand with its leading dimension.
#[derive(Clone, Copy)]
pub(super) struct Problem {
    pub(super) transpose_a: bool,
    pub(super) mnk: (usize, usize, usize),
    pub(super) a: (CUdeviceptr, usize),
    pub(super) b: (CUdeviceptr, usize),
    pub(super) c: (CUdeviceptr, usize),
}

impl Problem {
    /// [`gemm`]'s row-major `y[m, n] = x[m, k] · w[n, k]ᵀ`, in f32.
    pub(super) fn nt(
        Shape { n, m, k }: Shape,
        w: CUdeviceptr,
        x: CUdeviceptr,
        y: CUdeviceptr,
    ) -> Self {
        Self {
            transpose_a: true,
            mnk: (n, m, k),
            a: (w, k),
            b: (x, k),
            c: (y, n),
        }
    }

    /// Column-major `c[m, n] = a[m, k] · b[k, n]` (cuBLAS' `N, N`): with row-major buffers,
    /// `cᵀ = bᵀ · aᵀ`, i.e. row-major `C[n, m] = B[n, k] · A[k, m]`.
    pub(super) fn nn(
        mnk: (usize, usize, usize),
        a: (CUdeviceptr, usize),
        b: (CUdeviceptr, usize),
        c: (CUdeviceptr, usize),
    ) -> Self {
        Self {
            transpose_a: false,
            mnk,
            a,
            b,
            c,
        }
    }
}

/// The first cuBLAS with `cublasGemmGroupedBatchedEx`: 12.5 (`cublasGetVersion`'s number).
pub(super) const GROUPED_SINCE: i32 = 120_500;

/// `cublasGetVersion` of the library behind `blas`.
pub(super) fn version(blas: &CudaBlas) -> Result<i32> {
    let mut version = 0;
    // SAFETY: the handle is live, and `version` an int to write.
    unsafe { sys::cublasGetVersion_v2(*blas.handle(), &mut version) }
        .result()
        .map_err(|e| device_error("cuBLAS version", e))?;
    Ok(version)
}

/// `problems`, each of its own shape, in one `cublasGemmGroupedBatchedEx` (cuBLAS 12.5 and
/// later): a group of one product each; `table` holds, on the GPU, the `a` addresses, then the
/// `b`, then the `c` (`problems.len()` of each).
///
/// # Safety
/// Each problem's operands hold the matrices their shapes and leading dimensions describe, on
/// the handle's stream, and `table` their addresses; the library is cuBLAS 12.5 or later.
pub(super) unsafe fn gemm_grouped(
    blas: &CudaBlas,
    problems: &[Problem],
    table: CUdeviceptr,
) -> Result<()> {
    let count = problems.len();
    let op = |transpose| {
        if transpose {
            sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let transa: Vec<_> = problems.iter().map(|p| op(p.transpose_a)).collect();
    let transb = vec![sys::cublasOperation_t::CUBLAS_OP_N; count];
    let ints = |f: fn(&Problem) -> usize| -> Result<Vec<i32>> {
        problems.iter().map(|p| dim(f(p))).collect()
    };
    let (m, n, k) = (ints(|p| p.mnk.0)?, ints(|p| p.mnk.1)?, ints(|p| p.mnk.2)?);
    let (lda, ldb, ldc) = (ints(|p| p.a.1)?, ints(|p| p.b.1)?, ints(|p| p.c.1)?);
    let (alpha, beta) = (vec![1.0f32; count], vec![0.0f32; count]);
    let sizes = vec![1i32; count];
    let at = |i: usize| table + (i * count * 8) as u64;
    let f32s = sys::cudaDataType_t::CUDA_R_32F;
    // SAFETY: the caller vouches for the table and the operands; the host arrays hold one
    // entry per group and live across the call.
    unsafe {
        sys::cublasGemmGroupedBatchedEx(
            *blas.handle(),
            transa.as_ptr(),
            transb.as_ptr(),
            m.as_ptr(),
            n.as_ptr(),
            k.as_ptr(),
            alpha.as_ptr() as *const _,
            at(0) as *const *const _,
            f32s,
            lda.as_ptr(),
            at(1) as *const *const _,
            f32s,
            ldb.as_ptr(),
            beta.as_ptr() as *const _,
            at(2) as *const *mut _,
            f32s,
            ldc.as_ptr(),
            dim(count)?,
            sizes.as_ptr(),
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        )
    }
    .result()
    .map_err(|e| device_error("cuBLAS grouped product", e))
}
