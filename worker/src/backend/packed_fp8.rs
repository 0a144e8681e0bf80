//! Block-quantised FP8 weights on the CPU, at one byte a value: DeepSeek-V3's checkpoints as
//! released, in a quarter of the memory their f32 widening took.
//!
//! The E4M3FN codes lie in [`super::packed`]'s panels, one byte where the bf16 matrices have
//! two. A task turns the codes of one panel and one block of columns into bf16 (exactly:
//! every E4M3FN value is a bf16 value) in a buffer of its own, runs the bf16 panel kernels of
//! the active family on it, and adds the result times the block's scale: `Σ_c x_c · fp8(w_c) ·
//! s = s · Σ_c x_c · fp8(w_c)` over a block's columns, since one scale covers them. The panels
//! of a task share one band of block rows, since the blocks' rows are a multiple of a panel's.
//!
//! On x86-64 and aarch64, a product of a few rows (decode: at most [`direct_rows`]) reads the
//! codes straight into registers instead, where the conversion pass would cost more than the
//! product: each code becomes the f32 `fp8(code) · 2^-120` in three integer instructions (its
//! sign and its seven low bits moved to the f32's sign and to the top of its exponent and
//! mantissa, which is exact for every E4M3FN value, subnormals included), each activation is
//! scaled by 2^64 as it is broadcast, so that no product is subnormal, and each block's sums are
//! multiplied by `scale · 2^56`. The powers of two cancel exactly; the sums are those of the
//! dequantised weight but for the order of their additions.

use super::blocks::Block;
use super::kernels::{self, Family};

/// The activations' factor in products that read codes into registers: see the module doc.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const X_FACTOR: f32 = 18_446_744_073_709_551_616.0; // 2^64

/// The factor of each block's scale there: 2^120 / 2^64.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const SCALE_FACTOR: f32 = 72_057_594_037_927_936.0; // 2^56

/// Bytes ahead of the codes being read that the direct kernels prefetch.
#[cfg(target_arch = "x86_64")]
const PREFETCH_BYTES: usize = 8192;

/// Activation rows up to which `family` multiplies FP8 codes in registers; 0 where it has no
/// such kernel (products then widen each panel to bf16 first).
pub fn direct_rows(family: Family) -> usize {
    match family {
        #[cfg(target_arch = "x86_64")]
        Family::Avx512Bf16 | Family::Avx512 => 4,
        #[cfg(target_arch = "x86_64")]
        Family::Avx2 => 4,
        #[cfg(target_arch = "aarch64")]
        Family::Neon => 2,
        _ => 0,
    }
}
#[cfg(target_arch = "x86_64")]
use super::packed::lane_masks;
use super::packed::{
    for_panels, matmul_grouped_with, pack_panels, panel_product, Product, Weights, PANEL,
};
use crate::checkpoint::Fp8Blocks;

/// An FP8 matrix in panels, with its block scales.
#[derive(Debug)]
pub struct PackedFp8 {
    rows: usize,
    cols: usize,
    codes: Vec<u8>,
    /// Row-major `[rows / br, cols / bc]` (rounded up).
    scales: Vec<f32>,
    block: (usize, usize),
}

impl PackedFp8 {
    /// Packs `w`; gives it back when its blocks do not fit the panels (block rows not a
    /// multiple of [`PANEL`], or block columns odd), for the caller to dequantise instead.
    pub fn pack(w: Fp8Blocks) -> Result<Self, Fp8Blocks> {
        let (br, bc) = w.block;
        if br == 0 || bc == 0 || br % PANEL != 0 || bc % 2 != 0 {
            return Err(w);
        }
        assert_eq!(
            w.scales.len(),
            w.rows.div_ceil(br) * w.cols.div_ceil(bc),
            "fp8 weight: one scale per block"
        );
        Ok(Self {
            rows: w.rows,
            cols: w.cols,
            codes: pack_panels(w.rows, w.cols, &w.codes),
            scales: w.scales,
            block: w.block,
        })
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes held: codes (padding included) and scales.
    pub fn bytes(&self) -> usize {
        self.codes.len() + self.scales.len() * 4
    }

    /// The codes of panel `p`.
    fn panel(&self, p: usize) -> &[u8] {
        let len = self.cols.div_ceil(2) * 2 * PANEL;
        &self.codes[p * len..(p + 1) * len]
    }
}

/// `out[m, rows] = x[m, cols] · wᵀ` in f32, with the active kernels; `parallel` spreads tasks
/// over rayon's threads.
pub fn matmul(x: &[f32], m: usize, w: &PackedFp8, out: &mut [f32], parallel: bool) {
    matmul_with(kernels::active(), x, m, w, out, parallel);
}

/// [`matmul`] with the kernels of `family`, which this CPU must support.
pub fn matmul_with(
    family: Family,
    x: &[f32],
    m: usize,
    w: &PackedFp8,
    out: &mut [f32],
    parallel: bool,
) {
    let w = Weights::Fp8(w);
    matmul_grouped_with(family, &mut [Product { x, m, w, out }], parallel);
}

/// One task of a product (see [`super::blocks::run_grouped`]): `im` rows of `x` against the
/// output columns `j0..j0 + jn` of `w`, into `block`. The family's instructions must be
/// present.
pub(super) fn task(
    family: Family,
    x: &[f32],
    im: usize,
    w: &PackedFp8,
    j0: usize,
    jn: usize,
    block: Block,
) {
    let k = w.cols;
    let (br, bc) = w.block;
    let col_blocks = k.div_ceil(bc);
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    if im <= direct_rows(family) {
        for_panels(j0, jn, |p, col, cols| {
            let scales = &w.scales[(p * PANEL / br) * col_blocks..][..col_blocks];
            // SAFETY: x holds im rows of k values and the panel k.div_ceil(2) pairs of PANEL
            // codes; the output's im rows and `cols` columns from `col` are the task's own; the
            // caller vouches for the family.
            unsafe {
                direct_rows_product(
                    family,
                    x,
                    im,
                    k,
                    w.panel(p),
                    bc,
                    scales,
                    block.offset(0, col),
                    cols,
                )
            };
        });
        return;
    }
    // The rows of x, block of columns by block of columns, each contiguous: x itself for one
    // row (decode) or one block.
    let by_block: std::borrow::Cow<[f32]> = if im == 1 || col_blocks == 1 {
        std::borrow::Cow::Borrowed(&x[..im * k])
    } else {
        let mut by_block = Vec::with_capacity(im * k);
        for cb in 0..col_blocks {
            let (c0, c1) = (cb * bc, k.min((cb + 1) * bc));
            for row in x.chunks_exact(k).take(im) {
                by_block.extend_from_slice(&row[c0..c1]);
            }
        }
        std::borrow::Cow::Owned(by_block)
    };
    let mut wide = vec![0u16; bc * PANEL];
    let mut part = vec![0.0f32; im * PANEL];
    for_panels(j0, jn, |p, col, cols| {
        let out = block.offset(0, col);
        let scales = &w.scales[(p * PANEL / br) * col_blocks..][..col_blocks];
        let codes = w.panel(p);
        for (cb, &scale) in scales.iter().enumerate() {
            let (c0, c1) = (cb * bc, k.min((cb + 1) * bc));
            let width = c1 - c0;
            let pairs = width.div_ceil(2);
            let block_codes = &codes[c0 * PANEL..(c0 / 2 + pairs) * 2 * PANEL];
            widen(block_codes, &mut wide[..block_codes.len()]);
            // SAFETY: `by_block` holds the block's im rows of `width` values from im · c0 on,
            // `wide` its `pairs` pairs of PANEL rows, and `part` im rows of PANEL values, this
            // closure's own; the caller vouches for the family.
            unsafe {
                panel_product(
                    family,
                    &by_block[im * c0..im * c1],
                    im,
                    width,
                    &wide,
                    Block::new(&mut part, PANEL),
                    cols,
                );
            }
            for (r, sums) in part.chunks_exact(PANEL).enumerate() {
                for (j, &v) in sums[..cols].iter().enumerate() {
                    // SAFETY: row r < im and column j < cols of `out`, which the task's caller
                    // lends it alone.
                    unsafe {
                        let o = out.ptr().add(r * out.stride() + j);
                        *o = if cb == 0 { scale * v } else { *o + scale * v };
                    }
                }
            }
        }
    });
}

/// `im` (at most [`direct_rows`]) rows of `x` (`k` values each; the kernels scale each by
/// [`X_FACTOR`] as they broadcast it)
/// against one panel of codes, with the codes read into registers; into the first `cols`
/// columns of `im` rows of `out`.
///
/// # Safety
/// The CPU runs `family`'s instructions and `im <= direct_rows(family)`; `x.len() >= im * k`;
/// the panel holds `k.div_ceil(2)` pairs of [`PANEL`] codes; `scales` has one factor per block
/// of `bc` (even) columns; `cols <= PANEL`; those values of `out` are lent to this call alone.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn direct_rows_product(
    family: Family,
    x: &[f32],
    im: usize,
    k: usize,
    panel: &[u8],
    bc: usize,
    scales: &[f32],
    out: Block,
    cols: usize,
) {
    debug_assert!(x.len() >= im * k && panel.len() >= k.div_ceil(2) * 2 * PANEL);
    debug_assert!(bc.is_multiple_of(2) && scales.len() == k.div_ceil(bc) && cols <= PANEL);
    // SAFETY: the caller's contract is each kernel's.
    unsafe {
        match (family, im) {
            #[cfg(target_arch = "x86_64")]
            (Family::Avx512Bf16 | Family::Avx512, 1) => {
                direct_avx512::<1>(x, k, panel, bc, scales, out, cols)
            }
            #[cfg(target_arch = "x86_64")]
            (Family::Avx512Bf16 | Family::Avx512, 2) => {
                direct_avx512::<2>(x, k, panel, bc, scales, out, cols)
            }
            #[cfg(target_arch = "x86_64")]
            (Family::Avx512Bf16 | Family::Avx512, 3) => {
                direct_avx512::<3>(x, k, panel, bc, scales, out, cols)
            }
            #[cfg(target_arch = "x86_64")]
            (Family::Avx512Bf16 | Family::Avx512, 4) => {
                direct_avx512::<4>(x, k, panel, bc, scales, out, cols)
            }
            #[cfg(target_arch = "x86_64")]
            (Family::Avx2, 1) => direct_avx2::<1>(x, k, panel, bc, scales, out, cols),
            #[cfg(target_arch = "x86_64")]
            (Family::Avx2, 2) => direct_avx2::<2>(x, k, panel, bc, scales, out, cols),
            #[cfg(target_arch = "x86_64")]
            (Family::Avx2, 3) => direct_avx2_rows::<3>(x, k, panel, bc, scales, out, cols),
            #[cfg(target_arch = "x86_64")]
            (Family::Avx2, 4) => direct_avx2_rows::<4>(x, k, panel, bc, scales, out, cols),
            #[cfg(target_arch = "aarch64")]
            (Family::Neon, 1) => direct_neon::<1>(x, k, panel, bc, scales, out, cols),
            #[cfg(target_arch = "aarch64")]
            (Family::Neon, 2) => direct_neon::<2>(x, k, panel, bc, scales, out, cols),
            _ => unreachable!("no direct FP8 kernel for {im} rows of {}", family.name()),
        }
    }
}

/// For each 32-bit lane holding an even column's code in bits 0-7 (`SHIFT` 24) or an odd
/// column's in bits 8-15 (`SHIFT` 16): the f32 `fp8(code) · 2^-120`. The shift puts the code at
/// the top; the arithmetic shift by 4 lays its seven low bits over the f32's exponent and
/// mantissa from bit 20 and copies the sign down over bits 27-30, which the mask clears.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn e4m3_lanes_avx512<const SHIFT: u32>(
    v: std::arch::x86_64::__m512i,
    keep: std::arch::x86_64::__m512i,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    _mm512_castsi512_ps(_mm512_and_si512(
        _mm512_srai_epi32::<4>(_mm512_slli_epi32::<SHIFT>(v)),
        keep,
    ))
}

/// [`direct_rows_product`] for `R` rows with AVX-512F: a pair of columns for 16 matrix rows is
/// one 32-byte load widened to 16 lanes, then each column's codes to f32 in registers.
///
/// # Safety
/// As [`direct_rows_product`], with AVX-512F and `R` rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn direct_avx512<const R: usize>(
    x: &[f32],
    k: usize,
    panel: &[u8],
    bc: usize,
    scales: &[f32],
    out: Block,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let rows: [&[f32]; R] = std::array::from_fn(|r| &x[r * k..(r + 1) * k]);
    let keep = _mm512_set1_epi32(0x87F0_0000_u32 as i32);
    let pairs = k / 2;
    let p = panel.as_ptr();
    // SAFETY: pair c < k / 2 reads codes c · 64..c · 64 + 64 of the panel and x[r][2c + 1] <
    // k; the odd tail reads pair k / 2, which exists when k is odd, and x[r][k - 1]. Stores
    // are masked to `cols` columns of the R rows of `out`, the caller's loan.
    unsafe {
        let load =
            |at: usize| _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.add(at) as *const __m256i));
        let mut total = [[_mm512_setzero_ps(); 2]; R];
        for (cb, &scale) in scales.iter().enumerate() {
            let (first, last) = (cb * bc / 2, ((cb + 1) * bc / 2).min(pairs));
            let mut acc = [[_mm512_setzero_ps(); 4]; R];
            for c in first..last {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(c * 64 + PREFETCH_BYTES) as *const i8);
                let (v0, v1) = (load(c * 64), load(c * 64 + 32));
                let (e0, e1) = (
                    e4m3_lanes_avx512::<24>(v0, keep),
                    e4m3_lanes_avx512::<24>(v1, keep),
                );
                let (o0, o1) = (
                    e4m3_lanes_avx512::<16>(v0, keep),
                    e4m3_lanes_avx512::<16>(v1, keep),
                );
                for r in 0..R {
                    let xe = _mm512_set1_ps(*rows[r].get_unchecked(2 * c) * X_FACTOR);
                    let xo = _mm512_set1_ps(*rows[r].get_unchecked(2 * c + 1) * X_FACTOR);
                    acc[r][0] = _mm512_fmadd_ps(xe, e0, acc[r][0]);
                    acc[r][1] = _mm512_fmadd_ps(xe, e1, acc[r][1]);
                    acc[r][2] = _mm512_fmadd_ps(xo, o0, acc[r][2]);
                    acc[r][3] = _mm512_fmadd_ps(xo, o1, acc[r][3]);
                }
            }
            if k % 2 == 1 && last == pairs && (cb + 1) * bc >= k {
                let (v0, v1) = (load(pairs * 64), load(pairs * 64 + 32));
                let (e0, e1) = (
                    e4m3_lanes_avx512::<24>(v0, keep),
                    e4m3_lanes_avx512::<24>(v1, keep),
                );
                for r in 0..R {
                    let xe = _mm512_set1_ps(rows[r][k - 1] * X_FACTOR);
                    acc[r][0] = _mm512_fmadd_ps(xe, e0, acc[r][0]);
                    acc[r][1] = _mm512_fmadd_ps(xe, e1, acc[r][1]);
                }
            }
            let factor = _mm512_set1_ps(scale * SCALE_FACTOR);
            for r in 0..R {
                let (lo, hi) = (
                    _mm512_add_ps(acc[r][0], acc[r][2]),
                    _mm512_add_ps(acc[r][1], acc[r][3]),
                );
                total[r][0] = _mm512_fmadd_ps(lo, factor, total[r][0]);
                total[r][1] = _mm512_fmadd_ps(hi, factor, total[r][1]);
            }
        }
        let (m0, m1) = lane_masks(cols);
        for (r, t) in total.iter().enumerate() {
            let o = out.ptr().add(r * out.stride());
            _mm512_mask_storeu_ps(o, m0, t[0]);
            _mm512_mask_storeu_ps(o.add(16), m1, t[1]);
        }
    }
}

/// [`e4m3_lanes_avx512`] on 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn e4m3_lanes_avx2<const SHIFT: i32>(
    v: std::arch::x86_64::__m256i,
    keep: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    _mm256_castsi256_ps(_mm256_and_si256(
        _mm256_srai_epi32::<4>(_mm256_slli_epi32::<SHIFT>(v)),
        keep,
    ))
}

/// [`direct_rows_product`] for `R` (3 or 4) rows with AVX2 and FMA: as [`direct_avx2`], but with
/// the even and odd columns in one accumulator and each block's sums added to `out` in memory,
/// so that four rows' accumulators still fit in 16 registers.
///
/// # Safety
/// As [`direct_rows_product`], with AVX2, FMA and `R` rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn direct_avx2_rows<const R: usize>(
    x: &[f32],
    k: usize,
    panel: &[u8],
    bc: usize,
    scales: &[f32],
    out: Block,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let rows: [&[f32]; R] = std::array::from_fn(|r| &x[r * k..(r + 1) * k]);
    let keep = _mm256_set1_epi32(0x87F0_0000_u32 as i32);
    let pairs = k / 2;
    let p = panel.as_ptr();
    // SAFETY: as direct_avx2's; the block sums go to a buffer of the panel's 32 columns, copied
    // to the first `cols` columns of `out` at the end.
    unsafe {
        let load = |at: usize| _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(at) as *const __m128i));
        let mut sums = [[0.0f32; PANEL]; R];
        for half in 0..2 {
            let first_col = half * 16;
            if first_col >= cols {
                break;
            }
            let base = half * 32;
            for (cb, &scale) in scales.iter().enumerate() {
                let (first, last) = (cb * bc / 2, ((cb + 1) * bc / 2).min(pairs));
                let mut acc = [[_mm256_setzero_ps(); 2]; R];
                for c in first..last {
                    _mm_prefetch::<_MM_HINT_T0>(
                        p.wrapping_add(c * 64 + base + PREFETCH_BYTES) as *const i8
                    );
                    let (v0, v1) = (load(c * 64 + base), load(c * 64 + base + 16));
                    let (e0, e1) = (
                        e4m3_lanes_avx2::<24>(v0, keep),
                        e4m3_lanes_avx2::<24>(v1, keep),
                    );
                    let (o0, o1) = (
                        e4m3_lanes_avx2::<16>(v0, keep),
                        e4m3_lanes_avx2::<16>(v1, keep),
                    );
                    for r in 0..R {
                        let xe = _mm256_set1_ps(*rows[r].get_unchecked(2 * c) * X_FACTOR);
                        let xo = _mm256_set1_ps(*rows[r].get_unchecked(2 * c + 1) * X_FACTOR);
                        acc[r][0] = _mm256_fmadd_ps(xo, o0, _mm256_fmadd_ps(xe, e0, acc[r][0]));
                        acc[r][1] = _mm256_fmadd_ps(xo, o1, _mm256_fmadd_ps(xe, e1, acc[r][1]));
                    }
                }
                if k % 2 == 1 && last == pairs && (cb + 1) * bc >= k {
                    let (v0, v1) = (load(pairs * 64 + base), load(pairs * 64 + base + 16));
                    let (e0, e1) = (
                        e4m3_lanes_avx2::<24>(v0, keep),
                        e4m3_lanes_avx2::<24>(v1, keep),
                    );
                    for r in 0..R {
                        let xe = _mm256_set1_ps(rows[r][k - 1] * X_FACTOR);
                        acc[r][0] = _mm256_fmadd_ps(xe, e0, acc[r][0]);
                        acc[r][1] = _mm256_fmadd_ps(xe, e1, acc[r][1]);
                    }
                }
                let factor = _mm256_set1_ps(scale * SCALE_FACTOR);
                for (sums, acc) in sums.iter_mut().zip(&acc) {
                    for (v, a) in acc.iter().enumerate() {
                        let at = sums.as_mut_ptr().add(first_col + 8 * v);
                        _mm256_storeu_ps(at, _mm256_fmadd_ps(*a, factor, _mm256_loadu_ps(at)));
                    }
                }
            }
        }
        for (r, sums) in sums.iter().enumerate() {
            let o = out.ptr().add(r * out.stride());
            std::ptr::copy_nonoverlapping(sums.as_ptr(), o, cols);
        }
    }
}

/// [`direct_rows_product`] for `R` (1 or 2) rows with AVX2 and FMA: each half of the panel (16
/// matrix rows) in a pass of its own, so that the accumulators fit in 16 registers.
///
/// # Safety
/// As [`direct_rows_product`], with AVX2, FMA and `R` rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn direct_avx2<const R: usize>(
    x: &[f32],
    k: usize,
    panel: &[u8],
    bc: usize,
    scales: &[f32],
    out: Block,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let rows: [&[f32]; R] = std::array::from_fn(|r| &x[r * k..(r + 1) * k]);
    let keep = _mm256_set1_epi32(0x87F0_0000_u32 as i32);
    let pairs = k / 2;
    let p = panel.as_ptr();
    // SAFETY: as direct_avx512's; each half reads its 32 bytes of every pair; stores write
    // only the first `cols` columns, in whole vectors where all 8 are wanted and value by value
    // otherwise.
    unsafe {
        let load = |at: usize| _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(at) as *const __m128i));
        for half in 0..2 {
            let first_col = half * 16;
            if first_col >= cols {
                break;
            }
            let base = half * 32;
            let mut total = [[_mm256_setzero_ps(); 2]; R];
            for (cb, &scale) in scales.iter().enumerate() {
                let (first, last) = (cb * bc / 2, ((cb + 1) * bc / 2).min(pairs));
                let mut acc = [[_mm256_setzero_ps(); 4]; R];
                for c in first..last {
                    _mm_prefetch::<_MM_HINT_T0>(
                        p.wrapping_add(c * 64 + base + PREFETCH_BYTES) as *const i8
                    );
                    let (v0, v1) = (load(c * 64 + base), load(c * 64 + base + 16));
                    let (e0, e1) = (
                        e4m3_lanes_avx2::<24>(v0, keep),
                        e4m3_lanes_avx2::<24>(v1, keep),
                    );
                    let (o0, o1) = (
                        e4m3_lanes_avx2::<16>(v0, keep),
                        e4m3_lanes_avx2::<16>(v1, keep),
                    );
                    for r in 0..R {
                        let xe = _mm256_set1_ps(*rows[r].get_unchecked(2 * c) * X_FACTOR);
                        let xo = _mm256_set1_ps(*rows[r].get_unchecked(2 * c + 1) * X_FACTOR);
                        acc[r][0] = _mm256_fmadd_ps(xe, e0, acc[r][0]);
                        acc[r][1] = _mm256_fmadd_ps(xe, e1, acc[r][1]);
                        acc[r][2] = _mm256_fmadd_ps(xo, o0, acc[r][2]);
                        acc[r][3] = _mm256_fmadd_ps(xo, o1, acc[r][3]);
                    }
                }
                if k % 2 == 1 && last == pairs && (cb + 1) * bc >= k {
                    let (v0, v1) = (load(pairs * 64 + base), load(pairs * 64 + base + 16));
                    let (e0, e1) = (
                        e4m3_lanes_avx2::<24>(v0, keep),
                        e4m3_lanes_avx2::<24>(v1, keep),
                    );
                    for r in 0..R {
                        let xe = _mm256_set1_ps(rows[r][k - 1] * X_FACTOR);
                        acc[r][0] = _mm256_fmadd_ps(xe, e0, acc[r][0]);
                        acc[r][1] = _mm256_fmadd_ps(xe, e1, acc[r][1]);
                    }
                }
                let factor = _mm256_set1_ps(scale * SCALE_FACTOR);
                for r in 0..R {
                    let (lo, hi) = (
                        _mm256_add_ps(acc[r][0], acc[r][2]),
                        _mm256_add_ps(acc[r][1], acc[r][3]),
                    );
                    total[r][0] = _mm256_fmadd_ps(lo, factor, total[r][0]);
                    total[r][1] = _mm256_fmadd_ps(hi, factor, total[r][1]);
                }
            }
            let width = (cols - first_col).min(16);
            for (r, t) in total.iter().enumerate() {
                let o = out.ptr().add(r * out.stride() + first_col);
                let mut lanes = [0.0f32; 16];
                _mm256_storeu_ps(lanes.as_mut_ptr(), t[0]);
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8), t[1]);
                std::ptr::copy_nonoverlapping(lanes.as_ptr(), o, width);
            }
        }
    }
}

/// [`direct_rows_product`] for `R` (1 or 2) rows with NEON: as [`direct_avx2`], on 4-lane
/// vectors, each half of the panel in a pass of its own.
///
/// # Safety
/// As [`direct_rows_product`], with `R` rows.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn direct_neon<const R: usize>(
    x: &[f32],
    k: usize,
    panel: &[u8],
    bc: usize,
    scales: &[f32],
    out: Block,
    cols: usize,
) {
    use std::arch::aarch64::*;
    let rows: [&[f32]; R] = std::array::from_fn(|r| &x[r * k..(r + 1) * k]);
    let pairs = k / 2;
    let p = panel.as_ptr();
    // SAFETY: as direct_avx512's; each half reads its 32 bytes of every pair, 8 bytes (4 matrix
    // rows, both columns) a vector; stores write only the first `cols` columns.
    unsafe {
        let keep = vdupq_n_u32(0x87F0_0000);
        // Four matrix rows' codes of a pair, each lane `even | odd << 8`.
        let load = |at: usize| vmovl_u16(vld1_u16(p.add(at) as *const u16));
        let even = |v: uint32x4_t| {
            vreinterpretq_f32_u32(vandq_u32(
                vreinterpretq_u32_s32(vshrq_n_s32::<4>(vreinterpretq_s32_u32(vshlq_n_u32::<24>(
                    v,
                )))),
                keep,
            ))
        };
        let odd = |v: uint32x4_t| {
            vreinterpretq_f32_u32(vandq_u32(
                vreinterpretq_u32_s32(vshrq_n_s32::<4>(vreinterpretq_s32_u32(vshlq_n_u32::<16>(
                    v,
                )))),
                keep,
            ))
        };
        for half in 0..2 {
            let first_col = half * 16;
            if first_col >= cols {
                break;
            }
            let base = half * 32;
            let mut total = [[vdupq_n_f32(0.0); 4]; R];
            for (cb, &scale) in scales.iter().enumerate() {
                let (first, last) = (cb * bc / 2, ((cb + 1) * bc / 2).min(pairs));
                let mut acc = [[vdupq_n_f32(0.0); 8]; R];
                for c in first..last {
                    let xe: [float32x4_t; R] = std::array::from_fn(|r| {
                        vdupq_n_f32(*rows[r].get_unchecked(2 * c) * X_FACTOR)
                    });
                    let xo: [float32x4_t; R] = std::array::from_fn(|r| {
                        vdupq_n_f32(*rows[r].get_unchecked(2 * c + 1) * X_FACTOR)
                    });
                    for v in 0..4 {
                        let lanes = load(c * 64 + base + 8 * v);
                        let (e, o) = (even(lanes), odd(lanes));
                        for r in 0..R {
                            acc[r][v] = vfmaq_f32(acc[r][v], e, xe[r]);
                            acc[r][4 + v] = vfmaq_f32(acc[r][4 + v], o, xo[r]);
                        }
                    }
                }
                if k % 2 == 1 && last == pairs && (cb + 1) * bc >= k {
                    for (acc, row) in acc.iter_mut().zip(&rows) {
                        let xe = vdupq_n_f32(row[k - 1] * X_FACTOR);
                        for (v, a) in acc[..4].iter_mut().enumerate() {
                            *a = vfmaq_f32(*a, even(load(pairs * 64 + base + 8 * v)), xe);
                        }
                    }
                }
                let factor = vdupq_n_f32(scale * SCALE_FACTOR);
                for r in 0..R {
                    for v in 0..4 {
                        let sum = vaddq_f32(acc[r][v], acc[r][4 + v]);
                        total[r][v] = vfmaq_f32(total[r][v], sum, factor);
                    }
                }
            }
            let width = (cols - first_col).min(16);
            for (r, t) in total.iter().enumerate() {
                let o = out.ptr().add(r * out.stride() + first_col);
                let mut lanes = [0.0f32; 16];
                for (v, vector) in t.iter().enumerate() {
                    vst1q_f32(lanes.as_mut_ptr().add(4 * v), *vector);
                }
                std::ptr::copy_nonoverlapping(lanes.as_ptr(), o, width);
            }
        }
    }
}

/// The bf16 bits of `codes` into `out` (as long).
fn widen(codes: &[u8], out: &mut [u16]) {
    #[allow(unused_mut)] // only x86-64 has a vector version
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present; the slices are as long as each other.
        done = unsafe { widen_avx2(codes, out) };
    }
    for (w, &c) in out[done..].iter_mut().zip(&codes[done..]) {
        *w = BF16_OF_E4M3FN[usize::from(c)];
    }
}

/// [`widen`], 32 codes at a time, each code's two bf16 bytes computed apart: for a normal
/// code (exponent e > 0, mantissa m) the high byte is `0x3C + (code & 0x7f) >> 4` (e + 120
/// over the top bit of m) and the low byte `m << 4` with e's low bit; subnormal codes (e = 0)
/// and NaN take theirs from 8-entry tables; the sign goes onto the high byte.
///
/// Returns how many codes it did: all but the last `len % 32`.
///
/// # Safety
/// AVX2; `out.len() == codes.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn widen_avx2(codes: &[u8], out: &mut [u16]) -> usize {
    use std::arch::x86_64::*;
    debug_assert_eq!(codes.len(), out.len());
    let chunks = codes.len() / 32;
    // SAFETY: chunk i reads codes 32 i..32 i + 32 and writes out 32 i..32 i + 32, in bounds
    // for i < chunks.
    unsafe {
        let byte = |v: u8| _mm256_set1_epi8(v as i8);
        // By mantissa, for exponent 0: man · 2^-9 in bf16; in both 128-bit lanes (vpshufb
        // looks up within a lane).
        let sub_hi = _mm256_broadcastsi128_si256(_mm_setr_epi8(
            0, 0x3B, 0x3B, 0x3B, 0x3C, 0x3C, 0x3C, 0x3C, 0, 0, 0, 0, 0, 0, 0, 0,
        ));
        let sub_lo = _mm256_broadcastsi128_si256(_mm_setr_epi8(
            0,
            0,
            0x80u8 as i8,
            0xC0u8 as i8,
            0,
            0x20,
            0x40,
            0x60,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ));
        for i in 0..chunks {
            let c = _mm256_loadu_si256(codes.as_ptr().add(32 * i) as *const __m256i);
            let mag = _mm256_and_si256(c, byte(0x7f));
            let man = _mm256_and_si256(c, byte(0x07));
            let hi = _mm256_add_epi8(
                _mm256_and_si256(_mm256_srli_epi16(mag, 4), byte(0x0f)),
                byte(0x3C),
            );
            let lo = _mm256_and_si256(_mm256_slli_epi16(mag, 4), byte(0xf0));
            let subnormal =
                _mm256_cmpeq_epi8(_mm256_and_si256(c, byte(0x78)), _mm256_setzero_si256());
            let nan = _mm256_cmpeq_epi8(mag, byte(0x7f));
            let hi = _mm256_blendv_epi8(hi, _mm256_shuffle_epi8(sub_hi, man), subnormal);
            let lo = _mm256_blendv_epi8(lo, _mm256_shuffle_epi8(sub_lo, man), subnormal);
            let hi = _mm256_or_si256(
                _mm256_blendv_epi8(hi, byte(0x7f), nan),
                _mm256_and_si256(c, byte(0x80)),
            );
            let lo = _mm256_blendv_epi8(lo, byte(0xC0), nan);
            // Per lane: codes 0-7 and 16-23, then 8-15 and 24-31; put them in order.
            let (first, second) = (_mm256_unpacklo_epi8(lo, hi), _mm256_unpackhi_epi8(lo, hi));
            let o = out.as_mut_ptr().add(32 * i) as *mut __m256i;
            _mm256_storeu_si256(o, _mm256_permute2x128_si256::<0x20>(first, second));
            _mm256_storeu_si256(o.add(1), _mm256_permute2x128_si256::<0x31>(first, second));
        }
    }
    chunks * 32
}

/// The bf16 bits of every E4M3FN code: exact, since bf16 has E4M3FN's exponents and more
/// mantissa bits (NaN codes give a NaN).
static BF16_OF_E4M3FN: [u16; 256] = bf16_table();

const fn bf16_table() -> [u16; 256] {
    let mut table = [0u16; 256];
    let mut code = 0;
    while code < 256 {
        let (exp, man) = ((code >> 3) & 15, code & 7);
        let magnitude: u16 = if exp == 15 && man == 7 {
            0x7fc0
        } else if exp == 0 {
            // man / 8 · 2^-6 = man · 2^-9: normalised, 2^(e - 9) · (man / 2^e) for man's top bit e.
            match man {
                0 => 0,
                1 => 118 << 7,
                2 | 3 => (119 << 7) | (((man as u16) & 1) << 6),
                _ => (120 << 7) | (((man as u16) & 3) << 5),
            }
        } else {
            // 2^(exp - 7) · (1 + man / 8): bf16 exponent exp - 7 + 127, mantissa man at the top.
            ((exp as u16 + 120) << 7) | ((man as u16) << 4)
        };
        table[code] = magnitude | if code & 128 != 0 { 0x8000 } else { 0 };
        code += 1;
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::bf16_to_f32;

    #[test]
    fn the_bf16_table_holds_every_code_exactly() {
        for code in 0..=255u8 {
            let (exp, man) = (i32::from((code >> 3) & 15), f32::from(code & 7));
            let magnitude = match (exp, man) {
                (15, 7.0) => f32::NAN,
                (0, _) => man / 8.0 * 2f32.powi(-6),
                _ => (1.0 + man / 8.0) * 2f32.powi(exp - 7),
            };
            let want = if code & 128 != 0 {
                -magnitude
            } else {
                magnitude
            };
            let got = bf16_to_f32(BF16_OF_E4M3FN[usize::from(code)]);
            assert!(
                got == want || (got.is_nan() && want.is_nan()),
                "code {code:#04x}: {got} against {want}"
            );
        }
    }

    /// The packed product equals the product with the dequantised weight, for shapes with
    /// partial blocks and panels, odd columns, and each kernel family this CPU has.
    #[test]
    fn the_product_follows_the_dequantised_weight() {
        let (rows, cols, block) = (200usize, 301usize, (64usize, 128usize));
        let codes: Vec<u8> = (0..rows * cols)
            .map(|i| (i * 37 % 0x77) as u8 | (((i / 3) & 1) << 7) as u8)
            .collect();
        let scale_count = rows.div_ceil(block.0) * cols.div_ceil(block.1);
        let scales: Vec<f32> = (0..scale_count).map(|i| 0.01 * (i + 1) as f32).collect();
        let w = Fp8Blocks {
            rows,
            cols,
            codes,
            scales,
            block,
        };
        let dense = w.dequantize();
        let packed = PackedFp8::pack(w).expect("blocks fit the panels");
        for m in [1, 2, 3, 4, 5, 30] {
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * 2.0)
                .collect();
            let want: Vec<f32> = (0..m * rows)
                .map(|i| {
                    let (r, o) = (i / rows, i % rows);
                    let xr = &x[r * cols..(r + 1) * cols];
                    let wo = &dense[o * cols..(o + 1) * cols];
                    xr.iter().zip(wo).map(|(a, b)| a * b).sum()
                })
                .collect();
            for family in Family::supported_here() {
                let mut out = vec![f32::NAN; m * rows];
                matmul_with(family, &x, m, &packed, &mut out, true);
                let worst = out
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
                    .fold(0.0f32, f32::max);
                assert!(worst < 1e-4, "{} m={m}: off by {worst}", family.name());
            }
        }
    }

    #[test]
    fn widening_agrees_with_the_table_at_every_position() {
        let codes: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).chain(0..45).collect();
        let mut out = vec![0u16; codes.len()];
        widen(&codes, &mut out);
        for (i, (&c, &w)) in codes.iter().zip(&out).enumerate() {
            assert_eq!(w, BF16_OF_E4M3FN[usize::from(c)], "code {c:#04x} at {i}");
        }
    }

    #[test]
    fn blocks_that_split_a_panel_are_given_back() {
        let w = Fp8Blocks {
            rows: 2,
            cols: 2,
            codes: vec![0x38; 4],
            scales: vec![1.0; 2],
            block: (1, 2),
        };
        assert_eq!(PackedFp8::pack(w.clone()).err(), Some(w));
    }
}
