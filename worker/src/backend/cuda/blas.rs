//! cuBLAS' products in the backend's row-major terms: one product, a batch of one shape, and the
//! activation-by-activation products of attention.

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

/// Column-major `c[m, n] = a[m, k] · b[k, n]` in f32 (cuBLAS' `N, N`), each operand with its
/// leading dimension: with row-major buffers, `cᵀ = bᵀ · aᵀ`, i.e. row-major `C[n, m] =
/// B[n, k] · A[k, m]`.
///
/// # Safety
/// The pointers hold the matrices their leading dimensions describe, on the handle's stream.
pub(super) unsafe fn gemm_nn(
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
