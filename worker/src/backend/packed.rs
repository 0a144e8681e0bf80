//! bf16 weight matrices packed for register-tiled products, and those products.
//!
//! A `[rows, cols]` bf16 matrix is kept as panels of [`PANEL`] rows. Inside a panel the values
//! go by column pairs: for pair `c`, the 32 rows' `(w[r][2c], w[r][2c + 1])` side by side, 128
//! bytes. One 64-byte load then holds a pair for 16 rows, which is the layout both kernels
//! want:
//!
//! - f32 activations (the default): each pair is widened to two f32 vectors in registers (bf16
//!   is the top half of an f32, so exactly) and multiplied by the broadcast activations, with
//!   a tile of up to 8 rows × 32 outputs in accumulators. Nothing is rounded and no widened copy
//!   of the matrix is written; there are no horizontal sums.
//! - bf16 activations (opt-in, AVX512-BF16): the activations are rounded to bf16 as PyTorch's
//!   bf16 path does, and `vdpbf16ps` multiplies a broadcast activation pair with 16 rows' pairs.
//!
//! Rows past the matrix and the odd column of the last pair are stored as zeros. Both kernels
//! need AVX-512. With AVX2 and FMA, the f32 kernel's idea runs on 8-lane vectors: one or two
//! rows (decode) take the whole panel in one pass; a few rows take each half of it (16 rows of
//! the matrix) in tiles of up to 4 rows × 16 outputs, since 16 registers hold no more; many rows
//! (prefill) widen each half panel to f32 once and multiply that in tiles of 6 rows. On aarch64,
//! NEON runs the AVX2 scheme on 4-lane vectors. Other CPUs run a portable loop over the same
//! layout. [`super::kernels`] says which family runs;
//! [`super::blocks`] splits a product into tasks.

use super::bf16_to_f32;
use super::blocks::Block;
use super::kernels::{self, Family};
use super::packed_fp8::{self, PackedFp8};

/// Rows per panel: two 16-lane vectors.
pub const PANEL: usize = 32;

/// Rows of activations per full register tile.
#[cfg(target_arch = "x86_64")]
const MR: usize = 8;

/// How far ahead of the pair being multiplied the kernels prefetch weights, in bf16 values
/// (8 KiB; past a panel's end that is the next panel). With few activation rows a panel is
/// multiplied faster than the hardware prefetcher brings it from memory: on experts of 8–16
/// rows and cold weights this doubled the throughput (2 threads, 168 -> 430 GFLOP/s at 12 rows).
const PREFETCH: usize = 4096;

/// A bf16 matrix in panels.
#[derive(Debug)]
pub struct PackedBf16 {
    rows: usize,
    cols: usize,
    /// Column pairs: `cols.div_ceil(2)`.
    pairs: usize,
    data: Vec<u16>,
}

impl PackedBf16 {
    /// Packs a row-major `[rows, cols]` matrix of bf16 bits.
    pub fn pack(rows: usize, cols: usize, bits: &[u16]) -> Self {
        assert_eq!(
            bits.len(),
            rows * cols,
            "matrix data does not match its shape"
        );
        Self {
            rows,
            cols,
            pairs: cols.div_ceil(2),
            data: pack_panels(rows, cols, bits),
        }
    }

    /// Bytes held, padding included.
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }

    /// The values of panel `p`.
    fn panel(&self, p: usize) -> &[u16] {
        let len = self.pairs * 2 * PANEL;
        &self.data[p * len..(p + 1) * len]
    }
}

/// A row-major `[rows, cols]` matrix in panels of [`PANEL`] rows by column pairs (the layout
/// above), padded with zeros; for bf16 bits, or FP8 codes ([`super::packed_fp8`]).
pub(super) fn pack_panels<T: Copy + Default>(rows: usize, cols: usize, values: &[T]) -> Vec<T> {
    let pairs = cols.div_ceil(2);
    let panels = rows.div_ceil(PANEL);
    // Written in order, so that the new pages are touched once each and front to back.
    let mut data = Vec::with_capacity(panels * pairs * 2 * PANEL);
    for p in 0..panels {
        let panel_rows: Vec<&[T]> = (p * PANEL..rows.min((p + 1) * PANEL))
            .map(|r| &values[r * cols..(r + 1) * cols])
            .collect();
        for c in 0..pairs {
            for row in &panel_rows {
                data.push(row[2 * c]);
                data.push(row.get(2 * c + 1).copied().unwrap_or_default());
            }
            data.resize(data.len() + 2 * (PANEL - panel_rows.len()), T::default());
        }
    }
    data
}

/// Whether the active kernels can multiply with bf16 activations (AVX512-BF16).
pub fn bf16_available() -> bool {
    kernels::active().has_bf16_activations()
}

/// `out[m, rows] = x[m, cols] · wᵀ` in f32, with the active kernels. `parallel` spreads tasks
/// over rayon's threads.
pub fn matmul(x: &[f32], m: usize, w: &PackedBf16, out: &mut [f32], parallel: bool) {
    matmul_with(kernels::active(), x, m, w, out, parallel);
}

/// [`matmul`] with the kernels of `family`, which this CPU must support.
pub fn matmul_with(
    family: Family,
    x: &[f32],
    m: usize,
    w: &PackedBf16,
    out: &mut [f32],
    parallel: bool,
) {
    let w = Weights::Bf16(w);
    matmul_grouped_with(family, &mut [Product { x, m, w, out }], parallel);
}

/// The weights of a product: bf16 panels, or FP8 ones ([`super::packed_fp8`]).
#[derive(Debug, Clone, Copy)]
pub enum Weights<'a> {
    Bf16(&'a PackedBf16),
    Fp8(&'a PackedFp8),
}

impl Weights<'_> {
    /// `(rows, cols)`.
    fn shape(self) -> (usize, usize) {
        match self {
            Weights::Bf16(w) => (w.rows, w.cols),
            Weights::Fp8(w) => w.shape(),
        }
    }

    /// Bytes of one value.
    fn value_bytes(self) -> usize {
        match self {
            Weights::Bf16(_) => 2,
            Weights::Fp8(_) => 1,
        }
    }
}

/// One of the products of [`matmul_grouped`]: `out[m, rows] = x[m, cols] · wᵀ`.
pub struct Product<'a> {
    pub x: &'a [f32],
    pub m: usize,
    pub w: Weights<'a>,
    pub out: &'a mut [f32],
}

/// Independent products as one set of tasks (see [`super::blocks::run_grouped`]), with the
/// active kernels.
pub fn matmul_grouped(products: &mut [Product], parallel: bool) {
    matmul_grouped_with(kernels::active(), products, parallel);
}

/// [`matmul_grouped`] with the kernels of `family`, which this CPU must support.
pub fn matmul_grouped_with(family: Family, products: &mut [Product], parallel: bool) {
    assert!(
        family.supported(),
        "packed matmul: this CPU cannot run the {} kernels",
        family.name()
    );
    let inputs: Vec<(&[f32], Weights)> = products.iter().map(|p| (p.x, p.w)).collect();
    let blocks: Vec<super::blocks::Product> = products
        .iter_mut()
        .map(|p| {
            let (n, k) = p.w.shape();
            assert!(p.x.len() >= p.m * k, "packed matmul: x too small");
            assert!(p.out.len() >= p.m * n, "packed matmul: out too small");
            super::blocks::Product {
                m: p.m,
                n,
                k,
                weight_bytes: p.w.value_bytes(),
                out: Block::new(p.out, n),
            }
        })
        .collect();
    super::blocks::run_grouped(&blocks, PANEL, parallel, |g, i0, im, j0, jn, block| {
        let (x, w) = inputs[g];
        let k = w.shape().1;
        let x = &x[i0 * k..(i0 + im) * k];
        match w {
            Weights::Bf16(w) => for_panels(j0, jn, |p, col, cols| {
                // SAFETY: `x` holds im rows of k values and the panel `pairs` pairs of 32
                // rows; `out` has im rows of `cols` values that belong to this task alone
                // (blocks::run); the family's instructions are present (asserted above).
                unsafe { panel_product(family, x, im, k, w.panel(p), block.offset(0, col), cols) };
            }),
            Weights::Fp8(w) => packed_fp8::task(family, x, im, w, j0, jn, block),
        }
    });
}

/// `im` rows of `x` (`k` values each) against one panel (`k.div_ceil(2)` pairs), into the
/// first `cols` columns of `im` rows of `out`, with the kernels of `family`.
///
/// # Safety
/// The CPU runs `family`'s instructions; `x.len() >= im * k`; the panel holds
/// `k.div_ceil(2)` pairs of [`PANEL`] rows; `cols <= PANEL`; those values of `out` are lent to
/// this call alone.
pub(super) unsafe fn panel_product(
    family: Family,
    x: &[f32],
    im: usize,
    k: usize,
    panel: &[u16],
    out: Block,
    cols: usize,
) {
    // SAFETY: the caller's contract is each kernel's.
    unsafe {
        match family {
            #[cfg(target_arch = "x86_64")]
            Family::Avx512Bf16 | Family::Avx512 => {
                f32_rows(x, im, k, panel, k.div_ceil(2), out, cols)
            }
            #[cfg(target_arch = "x86_64")]
            Family::Avx2 => f32_rows_avx2(x, im, k, panel, out, cols),
            #[cfg(target_arch = "aarch64")]
            Family::Neon => f32_rows_neon(x, im, k, panel, out, cols),
            _ => portable_rows(x, im, k, panel, out, cols),
        }
    }
}

/// `out[m, rows] = bf16(x)[m, cols] · wᵀ`, accumulated in f32; `None` (and nothing written)
/// when the CPU lacks AVX512-BF16.
pub fn matmul_bf16(
    x: &[f32],
    m: usize,
    w: &PackedBf16,
    out: &mut [f32],
    parallel: bool,
) -> Option<()> {
    if !bf16_available() {
        return None;
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, m, w, out, parallel);
        None
    }
    #[cfg(target_arch = "x86_64")]
    {
        let (n, k) = (w.rows, w.cols);
        assert!(x.len() >= m * k, "packed matmul: x too small");
        assert!(out.len() >= m * n, "packed matmul: out too small");
        // Activations as bf16 rows of whole pairs, the odd last column padded with zero.
        let kp = w.pairs * 2;
        let mut xb = vec![0u16; m * kp];
        for (src, dst) in x[..m * k]
            .chunks_exact(k.max(1))
            .zip(xb.chunks_exact_mut(kp.max(1)))
        {
            // SAFETY: AVX512-BF16 is present; `dst` is at least as long as `src`.
            unsafe { round_row(src, dst) };
        }
        super::blocks::run(m, n, k, 2, PANEL, parallel, out, |i0, im, j0, jn, block| {
            for_panels(j0, jn, |p, col, cols| {
                // SAFETY: AVX512-BF16 is present; `xb` holds im rows of kp = 2 · pairs values
                // from row i0 and the panel `pairs` pairs of 32 rows; the block's im rows of
                // `cols` values from `col` on belong to this task alone (blocks::run).
                unsafe {
                    bf16_rows(
                        &xb[i0 * kp..(i0 + im) * kp],
                        im,
                        w.pairs,
                        w.panel(p),
                        block.offset(0, col),
                        cols,
                    )
                };
            });
        });
        Some(())
    }
}

/// Calls `f(panel, first column in the block, columns)` for the panels that cover the block of
/// output columns `j0..j0 + jn` (`j0` is a multiple of [`PANEL`]).
pub(super) fn for_panels(j0: usize, jn: usize, mut f: impl FnMut(usize, usize, usize)) {
    let mut col = 0;
    while col < jn {
        let cols = PANEL.min(jn - col);
        f((j0 + col) / PANEL, col, cols);
        col += cols;
    }
}

/// All `m` rows of `x` against one panel, into the first `cols` columns of `m` rows of `out`,
/// in tiles of [`MR`] rows and then the remainder.
///
/// # Safety
/// The CPU must support AVX-512F; `x.len() >= m * k`; `panel.len() >= pairs * 2 * PANEL` with
/// `pairs == k.div_ceil(2)`; `cols <= PANEL`; those `m × cols` values of `out` are writable and
/// nothing else accesses them during the call.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn f32_rows(
    x: &[f32],
    m: usize,
    k: usize,
    panel: &[u16],
    pairs: usize,
    out: Block,
    cols: usize,
) {
    debug_assert!(panel.len() >= pairs * 2 * PANEL);
    let mut i = 0;
    // SAFETY (every call): rows i..i + R of x exist and the tile writes rows i..i + R of out.
    unsafe {
        while m - i >= MR {
            f32_tile::<MR, false>(&x[i * k..], k, panel, out.offset(i, 0), cols);
            i += MR;
        }
        while m - i >= 4 {
            f32_tile::<4, true>(&x[i * k..], k, panel, out.offset(i, 0), cols);
            i += 4;
        }
        match m - i {
            3 => f32_tile::<3, true>(&x[i * k..], k, panel, out.offset(i, 0), cols),
            2 => f32_tile::<2, true>(&x[i * k..], k, panel, out.offset(i, 0), cols),
            1 => f32_tile::<1, true>(&x[i * k..], k, panel, out.offset(i, 0), cols),
            _ => {}
        }
    }
}

/// `R` rows of `x` against one panel. With `SPLIT`, even and odd columns accumulate apart
/// (four chains per row instead of two), which keeps the FMA units busy when `R` is small.
///
/// # Safety
/// As [`f32_rows`], for `R` rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn f32_tile<const R: usize, const SPLIT: bool>(
    x: &[f32],
    k: usize,
    panel: &[u16],
    out: Block,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let rows: [&[f32]; R] = std::array::from_fn(|r| &x[r * k..(r + 1) * k]);
    // SAFETY: pair c < k / 2 reads x[r][2c + 1] < k and panel values c * 64..c * 64 + 64 <
    // pairs * 64; the odd tail reads x[r][k - 1] and pair k / 2 of the panel, which exists
    // when k is odd. Stores are masked to `cols` columns of each of the R rows of `out`, which
    // the caller lends this call alone.
    unsafe {
        let high = _mm512_set1_epi32(0xFFFF_0000_u32 as i32);
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        let p = panel.as_ptr();
        for c in 0..k / 2 {
            let ahead = p.wrapping_add(c * 64 + PREFETCH) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(ahead);
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
            let v0 = _mm512_loadu_si512(p.add(c * 64) as *const _);
            let v1 = _mm512_loadu_si512(p.add(c * 64 + 32) as *const _);
            let e0 = _mm512_castsi512_ps(_mm512_slli_epi32(v0, 16));
            let e1 = _mm512_castsi512_ps(_mm512_slli_epi32(v1, 16));
            let o0 = _mm512_castsi512_ps(_mm512_and_si512(v0, high));
            let o1 = _mm512_castsi512_ps(_mm512_and_si512(v1, high));
            for r in 0..R {
                let xe = _mm512_set1_ps(*rows[r].get_unchecked(2 * c));
                let xo = _mm512_set1_ps(*rows[r].get_unchecked(2 * c + 1));
                acc[r][0] = _mm512_fmadd_ps(xe, e0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(xe, e1, acc[r][1]);
                let (a, b) = if SPLIT { (2, 3) } else { (0, 1) };
                acc[r][a] = _mm512_fmadd_ps(xo, o0, acc[r][a]);
                acc[r][b] = _mm512_fmadd_ps(xo, o1, acc[r][b]);
            }
        }
        if k % 2 == 1 {
            let c = k / 2;
            let v0 = _mm512_loadu_si512(p.add(c * 64) as *const _);
            let v1 = _mm512_loadu_si512(p.add(c * 64 + 32) as *const _);
            let e0 = _mm512_castsi512_ps(_mm512_slli_epi32(v0, 16));
            let e1 = _mm512_castsi512_ps(_mm512_slli_epi32(v1, 16));
            for r in 0..R {
                let xe = _mm512_set1_ps(rows[r][k - 1]);
                acc[r][0] = _mm512_fmadd_ps(xe, e0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(xe, e1, acc[r][1]);
            }
        }
        let (m0, m1) = lane_masks(cols);
        for (r, a) in acc.iter().enumerate() {
            let (lo, hi) = if SPLIT {
                (_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3]))
            } else {
                (a[0], a[1])
            };
            let o = out.ptr().add(r * out.stride());
            _mm512_mask_storeu_ps(o, m0, lo);
            _mm512_mask_storeu_ps(o.add(16), m1, hi);
        }
    }
}

/// The schedule of the AVX2 and NEON kernels for a few rows: each half of the panel (16 rows of
/// the matrix, `$per_half` vectors, 16 output columns) in tiles of 4 activation rows, then the
/// remainder, with even and odd columns apart for 1-2 rows. Expands inside the caller's
/// `unsafe` block, with the tile's contract.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! by_half_panels {
    ($tile:ident, $per_half:literal, $x:expr, $m:expr, $k:expr, $panel:expr, $out:expr, $cols:expr) => {{
        let (x, m, k, panel, out, cols) = ($x, $m, $k, $panel, $out, $cols);
        for half in 0..2 {
            let first = half * 16;
            if first >= cols {
                break;
            }
            let width = (cols - first).min(16);
            let v0 = $per_half * half;
            let out = out.offset(0, first);
            let x = |i: usize| &x[i * k..];
            let mut i = 0;
            while m - i >= 4 {
                $tile::<4, $per_half, false>(x(i), k, panel, v0, out.offset(i, 0), width);
                i += 4;
            }
            match m - i {
                3 => $tile::<3, $per_half, false>(x(i), k, panel, v0, out.offset(i, 0), width),
                2 => $tile::<2, $per_half, true>(x(i), k, panel, v0, out.offset(i, 0), width),
                1 => $tile::<1, $per_half, true>(x(i), k, panel, v0, out.offset(i, 0), width),
                _ => {}
            }
        }
    }};
}

/// From this many activation rows on, the AVX2 kernel widens each half panel to f32 once
/// and multiplies that ([`f32_rows_avx2_widened`]).
#[cfg(target_arch = "x86_64")]
const AVX2_WIDEN_ROWS: usize = 24;

/// All `m` rows of `x` against one panel with AVX2 and FMA. One or two rows (decode) take the
/// whole panel in one pass, which reads it front to back once; a few more take each half of the
/// panel (16 rows of the matrix, 16 output columns) in tiles of 4 rows and then the remainder,
/// since 16 registers hold no larger tile with the widening in the loop; from
/// [`AVX2_WIDEN_ROWS`] rows on, [`f32_rows_avx2_widened`] widens the panel once instead.
///
/// # Safety
/// The CPU must support AVX2 and FMA; otherwise as [`f32_rows`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn f32_rows_avx2(x: &[f32], m: usize, k: usize, panel: &[u16], out: Block, cols: usize) {
    // SAFETY (every call): rows i..i + R of x exist, the tile writes rows i..i + R of out, and
    // vectors v0..v0 + V cover columns 8 v0..8 v0 + width of the `cols` this call owns.
    unsafe {
        match m {
            1 => return f32_tile_avx2::<1, 4, true>(x, k, panel, 0, out, cols),
            2 => return f32_tile_avx2::<2, 4, false>(x, k, panel, 0, out, cols),
            _ if m >= AVX2_WIDEN_ROWS => return f32_rows_avx2_widened(x, m, k, panel, out, cols),
            _ => {}
        }
        by_half_panels!(f32_tile_avx2, 2, x, m, k, panel, out, cols);
    }
}

/// [`f32_rows_avx2`] for many rows: each half of the panel is widened to f32 once, into a
/// buffer of the thread (`k × 16` values, in L2), and then multiplied in tiles of 6 rows × 16
/// outputs. Without the widening in the inner loop, the tile takes 12 of the 16 registers for
/// accumulators and every other instruction there is a load or an FMA.
///
/// # Safety
/// As [`f32_rows_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn f32_rows_avx2_widened(
    x: &[f32],
    m: usize,
    k: usize,
    panel: &[u16],
    out: Block,
    cols: usize,
) {
    thread_local! {
        static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    WIDE.with_borrow_mut(|wide| {
        wide.resize(k.div_ceil(2) * 2 * 16, 0.0);
        // SAFETY (every call): the panel holds k.div_ceil(2) pairs, `wide` 16 values for each
        // of their columns; rows i..i + R of x exist, and the tile writes rows i..i + R of the
        // `width` columns from `first` on, which the caller lends this call.
        unsafe {
            for half in 0..2 {
                let first = half * 16;
                if first >= cols {
                    break;
                }
                let width = (cols - first).min(16);
                widen_half_avx2(panel, half, k, wide);
                let out = out.offset(0, first);
                let x = |i: usize| &x[i * k..];
                let mut i = 0;
                while m - i >= 6 {
                    wide_tile_avx2::<6>(x(i), k, wide, out.offset(i, 0), width);
                    i += 6;
                }
                match m - i {
                    5 => wide_tile_avx2::<5>(x(i), k, wide, out.offset(i, 0), width),
                    4 => wide_tile_avx2::<4>(x(i), k, wide, out.offset(i, 0), width),
                    3 => wide_tile_avx2::<3>(x(i), k, wide, out.offset(i, 0), width),
                    2 => wide_tile_avx2::<2>(x(i), k, wide, out.offset(i, 0), width),
                    1 => wide_tile_avx2::<1>(x(i), k, wide, out.offset(i, 0), width),
                    _ => {}
                }
            }
        }
    });
}

/// Widens half `half` of a panel (16 rows of the matrix) to f32: `wide[c * 16 + j]` is the
/// weight of row j of the half at column c.
///
/// # Safety
/// AVX2; the panel holds `k.div_ceil(2)` pairs; `wide.len() >= k.div_ceil(2) * 32`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn widen_half_avx2(panel: &[u16], half: usize, k: usize, wide: &mut [f32]) {
    use std::arch::x86_64::*;
    // SAFETY: pair c < k.div_ceil(2) reads panel values c * 64 + 32 half .. + 32 and writes
    // wide values 32 c .. 32 c + 32, all in bounds by the contract.
    unsafe {
        let high = _mm256_set1_epi32(0xFFFF_0000_u32 as i32);
        let p = panel.as_ptr().add(32 * half);
        let w = wide.as_mut_ptr();
        for c in 0..k.div_ceil(2) {
            let v0 = _mm256_loadu_si256(p.add(c * 64) as *const __m256i);
            let v1 = _mm256_loadu_si256(p.add(c * 64 + 16) as *const __m256i);
            let d = w.add(c * 32);
            _mm256_storeu_ps(d, _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)));
            _mm256_storeu_ps(d.add(8), _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16)));
            _mm256_storeu_ps(d.add(16), _mm256_castsi256_ps(_mm256_and_si256(v0, high)));
            _mm256_storeu_ps(d.add(24), _mm256_castsi256_ps(_mm256_and_si256(v1, high)));
        }
    }
}

/// `R` rows of `x` against a widened half panel, into the first `width` columns of `R` rows of
/// `out`.
///
/// # Safety
/// AVX2 and FMA; `x` holds `R` rows of `k` values; `wide` holds `k` columns of 16 values;
/// `width <= 16`; those values of `out` are lent to this call alone.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn wide_tile_avx2<const R: usize>(
    x: &[f32],
    k: usize,
    wide: &[f32],
    out: Block,
    width: usize,
) {
    use std::arch::x86_64::*;
    let rows: [&[f32]; R] = std::array::from_fn(|r| &x[r * k..(r + 1) * k]);
    // SAFETY: column c < k reads x[r][c] and wide values 16 c .. 16 c + 16; each row's `width`
    // results go to the row of `out` lent to this call.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let w = wide.as_ptr();
        for c in 0..k {
            let w0 = _mm256_loadu_ps(w.add(c * 16));
            let w1 = _mm256_loadu_ps(w.add(c * 16 + 8));
            for r in 0..R {
                let b = _mm256_set1_ps(*rows[r].get_unchecked(c));
                acc[r][0] = _mm256_fmadd_ps(b, w0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(b, w1, acc[r][1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let mut lanes = [0.0f32; 16];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[1]);
            out.row(r, width).copy_from_slice(&lanes[..width]);
        }
    }
}

/// `R` rows of `x` against `V` 8-row vectors of one panel from vector `v0` on (its matrix rows
/// 8 v0..8 (v0 + V)), into the first `width` columns of `R` rows of `out`. With `SPLIT`, even
/// and odd columns accumulate apart (twice the chains per row), which keeps the FMA units busy
/// when `R` is small (decode).
///
/// # Safety
/// As [`f32_rows_avx2`], for `R` rows, `v0 + V <= 4` and `width <= 8 V` columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn f32_tile_avx2<const R: usize, const V: usize, const SPLIT: bool>(
    x: &[f32],
    k: usize,
    panel: &[u16],
    v0: usize,
    out: Block,
    width: usize,
) {
    use std::arch::x86_64::*;
    let rows: [&[f32]; R] = std::array::from_fn(|r| &x[r * k..(r + 1) * k]);
    let odd = |v: usize| if SPLIT { V + v } else { v };
    // SAFETY: pair c < k / 2 reads x[r][2c + 1] < k and panel values c * 64 + 16 v0 ..
    // + 16 V <= c * 64 + 64 <= pairs * 64; the odd tail reads x[r][k - 1] and pair k / 2 of
    // the panel, which exists when k is odd. Each row's `width` results are copied into the
    // row of `out` that the caller lends this call alone.
    unsafe {
        let high = _mm256_set1_epi32(0xFFFF_0000_u32 as i32);
        let mut acc = [[_mm256_setzero_ps(); 8]; R];
        let p = panel.as_ptr().add(16 * v0);
        for c in 0..k / 2 {
            let ahead = p.wrapping_add(c * 64 + PREFETCH) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(ahead);
            if V > 2 {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
            }
            let xe: [__m256; R] =
                std::array::from_fn(|r| _mm256_set1_ps(*rows[r].get_unchecked(2 * c)));
            let xo: [__m256; R] =
                std::array::from_fn(|r| _mm256_set1_ps(*rows[r].get_unchecked(2 * c + 1)));
            for v in 0..V {
                let w = _mm256_loadu_si256(p.add(c * 64 + 16 * v) as *const __m256i);
                let e = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
                let o = _mm256_castsi256_ps(_mm256_and_si256(w, high));
                for r in 0..R {
                    acc[r][v] = _mm256_fmadd_ps(xe[r], e, acc[r][v]);
                    acc[r][odd(v)] = _mm256_fmadd_ps(xo[r], o, acc[r][odd(v)]);
                }
            }
        }
        if k % 2 == 1 {
            let c = k / 2;
            for v in 0..V {
                let w = _mm256_loadu_si256(p.add(c * 64 + 16 * v) as *const __m256i);
                let e = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
                for (acc, row) in acc.iter_mut().zip(&rows) {
                    acc[v] = _mm256_fmadd_ps(_mm256_set1_ps(row[k - 1]), e, acc[v]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let mut lanes = [0.0f32; 32];
            for v in 0..V {
                let sum = if SPLIT {
                    _mm256_add_ps(acc[v], acc[V + v])
                } else {
                    acc[v]
                };
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8 * v), sum);
            }
            out.row(r, width).copy_from_slice(&lanes[..width]);
        }
    }
}

/// All `m` rows of `x` against one panel with aarch64 NEON: as [`f32_rows_avx2`] on 4-lane
/// vectors. One or two rows take the whole panel (eight vectors of 4 matrix rows) in one pass;
/// more rows take each half of it in tiles of 4 rows (16 accumulators of the 32 registers).
///
/// # Safety
/// The CPU must support NEON; otherwise as [`f32_rows`].
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn f32_rows_neon(x: &[f32], m: usize, k: usize, panel: &[u16], out: Block, cols: usize) {
    // SAFETY (every call): rows i..i + R of x exist, the tile writes rows i..i + R of out, and
    // vectors v0..v0 + V cover columns 4 v0..4 v0 + width of the `cols` this call owns.
    unsafe {
        match m {
            1 => return f32_tile_neon::<1, 8, true>(x, k, panel, 0, out, cols),
            2 => return f32_tile_neon::<2, 8, false>(x, k, panel, 0, out, cols),
            _ => {}
        }
        by_half_panels!(f32_tile_neon, 4, x, m, k, panel, out, cols);
    }
}

/// `R` rows of `x` against `V` 4-row vectors of one panel from vector `v0` on (its matrix rows
/// 4 v0..4 (v0 + V)), into the first `width` columns of `R` rows of `out`; `SPLIT` as in
/// [`f32_tile_avx2`].
///
/// # Safety
/// As [`f32_rows_neon`], for `R` rows, `v0 + V <= 8` and `width <= 4 V` columns.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
#[inline]
unsafe fn f32_tile_neon<const R: usize, const V: usize, const SPLIT: bool>(
    x: &[f32],
    k: usize,
    panel: &[u16],
    v0: usize,
    out: Block,
    width: usize,
) {
    use std::arch::aarch64::*;
    let rows: [&[f32]; R] = std::array::from_fn(|r| &x[r * k..(r + 1) * k]);
    let odd = |v: usize| if SPLIT { V + v } else { v };
    // SAFETY: pair c < k / 2 reads x[r][2c + 1] < k and panel values c * 64 + 8 v0 .. + 8 V
    // <= c * 64 + 64 <= pairs * 64; the odd tail reads x[r][k - 1] and pair k / 2 of the panel,
    // which exists when k is odd. Each row's `width` results are copied into the row of `out`
    // that the caller lends this call alone.
    unsafe {
        let high = vdupq_n_u32(0xFFFF_0000);
        let mut acc = [[vdupq_n_f32(0.0); 16]; R];
        let p = panel.as_ptr().add(8 * v0);
        for c in 0..k / 2 {
            let ahead = p.wrapping_add(c * 64 + PREFETCH);
            // SAFETY: a prefetch is a hint that never faults, whatever the address.
            std::arch::asm!("prfm pldl1keep, [{0}]", in(reg) ahead, options(nostack, readonly, preserves_flags));
            if V > 4 {
                std::arch::asm!("prfm pldl1keep, [{0}]", in(reg) ahead.wrapping_add(32), options(nostack, readonly, preserves_flags));
            }
            let xe: [float32x4_t; R] =
                std::array::from_fn(|r| vdupq_n_f32(*rows[r].get_unchecked(2 * c)));
            let xo: [float32x4_t; R] =
                std::array::from_fn(|r| vdupq_n_f32(*rows[r].get_unchecked(2 * c + 1)));
            for v in 0..V {
                let w = vld1q_u32(p.add(c * 64 + 8 * v) as *const u32);
                let e = vreinterpretq_f32_u32(vshlq_n_u32::<16>(w));
                let o = vreinterpretq_f32_u32(vandq_u32(w, high));
                for r in 0..R {
                    acc[r][v] = vfmaq_f32(acc[r][v], e, xe[r]);
                    acc[r][odd(v)] = vfmaq_f32(acc[r][odd(v)], o, xo[r]);
                }
            }
        }
        if k % 2 == 1 {
            let c = k / 2;
            for v in 0..V {
                let w = vld1q_u32(p.add(c * 64 + 8 * v) as *const u32);
                let e = vreinterpretq_f32_u32(vshlq_n_u32::<16>(w));
                for (acc, row) in acc.iter_mut().zip(&rows) {
                    acc[v] = vfmaq_f32(acc[v], e, vdupq_n_f32(row[k - 1]));
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let mut lanes = [0.0f32; 32];
            for v in 0..V {
                let sum = if SPLIT {
                    vaddq_f32(acc[v], acc[V + v])
                } else {
                    acc[v]
                };
                vst1q_f32(lanes.as_mut_ptr().add(4 * v), sum);
            }
            out.row(r, width).copy_from_slice(&lanes[..width]);
        }
    }
}

/// Store masks for the two 16-lane halves of a panel's first `cols` columns.
#[cfg(target_arch = "x86_64")]
pub(super) fn lane_masks(cols: usize) -> (u16, u16) {
    let bits = |n: usize| if n >= 16 { u16::MAX } else { (1u16 << n) - 1 };
    (bits(cols.min(16)), bits(cols.saturating_sub(16)))
}

/// All `m` bf16 rows of `xb` (`2 · pairs` values each) against one panel.
///
/// # Safety
/// The CPU must support AVX-512F and AVX512-BF16; `xb.len() >= m * 2 * pairs`;
/// `panel.len() >= pairs * 2 * PANEL`; `cols <= PANEL`; the first `cols` values of `m` rows of
/// `out` are writable and nothing else accesses them during the call.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16_rows(xb: &[u16], m: usize, pairs: usize, panel: &[u16], out: Block, cols: usize) {
    let kp = 2 * pairs;
    let mut i = 0;
    // SAFETY (every call): rows i..i + R of xb exist and the tile writes rows i..i + R of out.
    unsafe {
        while m - i >= MR {
            bf16_tile::<MR>(&xb[i * kp..], pairs, panel, out.offset(i, 0), cols);
            i += MR;
        }
        while m - i >= 4 {
            bf16_tile::<4>(&xb[i * kp..], pairs, panel, out.offset(i, 0), cols);
            i += 4;
        }
        match m - i {
            3 => bf16_tile::<3>(&xb[i * kp..], pairs, panel, out.offset(i, 0), cols),
            2 => bf16_tile::<2>(&xb[i * kp..], pairs, panel, out.offset(i, 0), cols),
            1 => bf16_tile::<1>(&xb[i * kp..], pairs, panel, out.offset(i, 0), cols),
            _ => {}
        }
    }
}

/// `R` bf16 rows against one panel with `vdpbf16ps`.
///
/// # Safety
/// As [`bf16_rows`], for `R` rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn bf16_tile<const R: usize>(
    xb: &[u16],
    pairs: usize,
    panel: &[u16],
    out: Block,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let kp = 2 * pairs;
    let rows: [*const u16; R] = std::array::from_fn(|r| xb[r * kp..(r + 1) * kp].as_ptr());
    // SAFETY: pair c < pairs reads xb[r][2c..2c + 2] < kp and panel values c * 64..c * 64 + 64;
    // stores are masked to `cols` columns of each of the R rows of `out`, lent to this call.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let p = panel.as_ptr();
        for c in 0..pairs {
            let ahead = p.wrapping_add(c * 64 + PREFETCH) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(ahead);
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
            let v0: __m512bh = std::mem::transmute(_mm512_loadu_si512(p.add(c * 64) as *const _));
            let v1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(p.add(c * 64 + 32) as *const _));
            for r in 0..R {
                let pair = (rows[r].add(2 * c) as *const i32).read_unaligned();
                let xv: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xv, v0);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xv, v1);
            }
        }
        let (m0, m1) = lane_masks(cols);
        for (r, a) in acc.iter().enumerate() {
            let o = out.ptr().add(r * out.stride());
            _mm512_mask_storeu_ps(o, m0, a[0]);
            _mm512_mask_storeu_ps(o.add(16), m1, a[1]);
        }
    }
}

/// Rounds `src` to bf16 (to nearest, ties to even, as PyTorch rounds) into the start of `dst`.
///
/// # Safety
/// The CPU must support AVX-512F and AVX512-BF16; `dst.len() >= src.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn round_row(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let chunks = src.chunks_exact(16);
    let tail = chunks.remainder();
    let done = src.len() - tail.len();
    for (c, chunk) in chunks.enumerate() {
        // SAFETY: the chunk holds 16 values, and dst has room for them at c * 16.
        unsafe {
            let v = _mm512_loadu_ps(chunk.as_ptr());
            let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
            _mm256_storeu_si256(dst.as_mut_ptr().add(c * 16) as *mut __m256i, b);
        }
    }
    for (d, s) in dst[done..].iter_mut().zip(tail) {
        *d = half::bf16::from_f32(*s).to_bits();
    }
}

/// The same product as [`f32_rows`] in portable code, for CPUs with none of the kernels above.
/// Written for the compiler to vectorise with the baseline's vectors (SSE2 on x86-64, NEON on
/// aarch64): each column pair is widened once into fixed-size arrays of 32 even and 32 odd
/// weights, which every row then multiplies lane by lane.
///
/// # Safety
/// The first `cols` values of `m` rows of `out` are writable and nothing else accesses them
/// during the call.
unsafe fn portable_rows(x: &[f32], m: usize, k: usize, panel: &[u16], out: Block, cols: usize) {
    /// Rows multiplied together per pass over the panel: the panel is read once per 4 rows.
    const ROWS: usize = 4;
    let mut r0 = 0;
    while r0 < m {
        let rows = ROWS.min(m - r0);
        let mut acc = [[0.0f32; PANEL]; ROWS];
        let mut even = [0.0f32; PANEL];
        let mut odd = [0.0f32; PANEL];
        for (c, pair) in panel
            .chunks_exact(2 * PANEL)
            .take(k.div_ceil(2))
            .enumerate()
        {
            for (j, w) in pair.chunks_exact(2).enumerate() {
                even[j] = bf16_to_f32(w[0]);
                odd[j] = bf16_to_f32(w[1]);
            }
            for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                let row = &x[(r0 + r) * k..(r0 + r + 1) * k];
                let xe = row[2 * c];
                let xo = row.get(2 * c + 1).copied().unwrap_or(0.0);
                for j in 0..PANEL {
                    acc[j] += xe * even[j] + xo * odd[j];
                }
            }
        }
        for (r, acc) in acc.iter().enumerate().take(rows) {
            // SAFETY: the caller lends these `cols` values of row r0 + r to this call.
            unsafe { out.row(r0 + r, cols) }.copy_from_slice(&acc[..cols]);
        }
        r0 += rows;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(m: usize, n: usize, k: usize) -> (Vec<f32>, Vec<u16>) {
        let x = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let w = (0..n * k)
            .map(|i| half::bf16::from_f32(((i * 5 % 11) as f32 - 5.0) / 7.0).to_bits())
            .collect();
        (x, w)
    }

    /// Every tile height (8, 4, 3, 2, 1 and their sums), partial panels, odd and tiny `k`,
    /// and several tasks.
    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (1, 33, 37),
        (2, 5, 16),
        (3, 64, 33),
        (5, 9, 100),
        (7, 70, 15),
        (8, 32, 2),
        (12, 130, 1024),
        (15, 41, 700),
        (33, 300, 64),
        // Enough rows for the widened AVX2 path, with an odd k and a part of a panel.
        (29, 45, 33),
        (61, 20, 257),
    ];

    #[test]
    fn f32_activations_give_the_exact_product_in_every_family_this_cpu_has() {
        let families = Family::supported_here();
        eprintln!(
            "kernel families checked here: {:?}",
            families.iter().map(|f| f.name()).collect::<Vec<_>>()
        );
        for family in families {
            for &(m, n, k) in SHAPES {
                check_f32_product(family, m, n, k);
            }
        }
    }

    fn check_f32_product(family: Family, m: usize, n: usize, k: usize) {
        {
            let (x, bits) = inputs(m, n, k);
            let w = PackedBf16::pack(n, k, &bits);
            for parallel in [false, true] {
                let mut out = vec![f32::NAN; m * n];
                matmul_with(family, &x, m, &w, &mut out, parallel);
                let mut portable = vec![f32::NAN; m * n];
                let whole = Block::new(&mut portable, n);
                for p in 0..n.div_ceil(PANEL) {
                    let cols = PANEL.min(n - p * PANEL);
                    // SAFETY: each panel's columns of the m rows lie inside `portable`.
                    unsafe {
                        portable_rows(&x, m, k, w.panel(p), whole.offset(0, p * PANEL), cols)
                    };
                }
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|c| {
                                f64::from(x[i * k + c]) * f64::from(bf16_to_f32(bits[j * k + c]))
                            })
                            .sum();
                        for (what, got) in [
                            ("kernel", out[i * n + j]),
                            ("portable", portable[i * n + j]),
                        ] {
                            assert!(
                                (f64::from(got) - want).abs() < 1e-4 * (1.0 + want.abs()),
                                "{} {what} {m}x{n}x{k} [{i},{j}]: {got} vs {want}",
                                family.name()
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn grouped_products_equal_the_products_one_by_one_in_every_family() {
        // Decode-sized and prefill-sized products of different shapes and weights (bf16, FP8)
        // in one group.
        let shapes = [
            (1, 256, 64),
            (1, 64, 256),
            (2, 33, 37),
            (12, 130, 1024),
            (61, 20, 257),
        ];
        // Every other weight FP8 (codes from the bf16 bits' low byte, NaN codes avoided).
        let made: Vec<(Vec<f32>, Result<PackedBf16, PackedFp8>)> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(m, n, k))| {
                let (x, bits) = inputs(m, n, k);
                if i % 2 == 0 {
                    return (x, Ok(PackedBf16::pack(n, k, &bits)));
                }
                let block = (64, 128);
                let fp8 = crate::checkpoint::Fp8Blocks {
                    rows: n,
                    cols: k,
                    codes: bits.iter().map(|&b| (b as u8) & 0xf7).collect(),
                    scales: (0..n.div_ceil(block.0) * k.div_ceil(block.1))
                        .map(|i| 0.5 + i as f32)
                        .collect(),
                    block,
                };
                (x, Err(PackedFp8::pack(fp8).expect("blocks fit")))
            })
            .collect();
        fn weights(w: &Result<PackedBf16, PackedFp8>) -> Weights<'_> {
            match w {
                Ok(w) => Weights::Bf16(w),
                Err(w) => Weights::Fp8(w),
            }
        }
        for family in Family::supported_here() {
            for parallel in [false, true] {
                let mut outs: Vec<Vec<f32>> = shapes
                    .iter()
                    .map(|&(m, n, _)| vec![f32::NAN; m * n])
                    .collect();
                let mut products: Vec<Product> = made
                    .iter()
                    .zip(&shapes)
                    .zip(&mut outs)
                    .map(|(((x, w), &(m, _, _)), out)| Product {
                        x,
                        m,
                        w: weights(w),
                        out,
                    })
                    .collect();
                matmul_grouped_with(family, &mut products, parallel);
                for (((x, w), &(m, n, k)), got) in made.iter().zip(&shapes).zip(&outs) {
                    let mut want = vec![f32::NAN; m * n];
                    match w {
                        Ok(w) => matmul_with(family, x, m, w, &mut want, false),
                        Err(w) => packed_fp8::matmul_with(family, x, m, w, &mut want, false),
                    }
                    // Each output is one task's sum over k, whatever the blocks: bit for bit.
                    assert_eq!(got, &want, "{} {m}x{n}x{k}", family.name());
                }
            }
        }
    }

    #[test]
    fn bf16_activations_give_the_product_of_the_rounded_values() {
        if !bf16_available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for &(m, n, k) in SHAPES {
            let (x, bits) = inputs(m, n, k);
            let w = PackedBf16::pack(n, k, &bits);
            let mut out = vec![f32::NAN; m * n];
            matmul_bf16(&x, m, &w, &mut out, true).expect("available");
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|c| {
                            half::bf16::from_f32(x[i * k + c]).to_f64()
                                * half::bf16::from_bits(bits[j * k + c]).to_f64()
                        })
                        .sum();
                    let got = f64::from(out[i * n + j]);
                    assert!(
                        (got - want).abs() < 1e-3 * (1.0 + want.abs()),
                        "{m}x{n}x{k} [{i},{j}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn packing_pads_rows_and_the_odd_column_with_zeros() {
        let bits: Vec<u16> = (1..=6).collect(); // 2 rows × 3 columns
        let w = PackedBf16::pack(2, 3, &bits);
        assert_eq!(w.bytes(), PANEL * 4 * 2);
        let p = w.panel(0);
        // Pair 0: rows 0 and 1 hold (1, 2) and (4, 5); pair 1: (3, 0) and (6, 0).
        assert_eq!(&p[..4], &[1, 2, 4, 5]);
        assert_eq!(&p[2 * PANEL..2 * PANEL + 4], &[3, 0, 6, 0]);
        assert!(p[4..2 * PANEL].iter().all(|&v| v == 0));
    }
}
