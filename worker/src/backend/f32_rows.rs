//! f32 weights against a few activation rows: decode with f32 or f16 checkpoints, and the
//! per-head matrices attention gathers from an FP8 `kv_b_proj`. `gemm` packs its right-hand
//! side for every product, which with few rows costs far more than the product: 23 ms for 4 rows
//! of a 2048×7168 weight on a Zen 4, where 1 row takes 3.3 ms. Here each pair of weight rows is
//! read straight from the row-major weight, once per group of [`GROUP`] activation rows, and
//! multiplied with accumulators in vector registers (AVX-512, or AVX2 and FMA; a plain loop
//! elsewhere).

use rayon::prelude::*;

use super::blocks::Block;
use super::kernels::{self, Family};

/// Most activation rows this path takes; more go to `gemm`, whose packing then pays.
pub const MAX_ROWS: usize = 16;

/// Activation rows multiplied with each pair of weight rows at once.
const GROUP: usize = 4;

/// Weight rows per task when the product is split over threads.
const TASK_ROWS: usize = 64;

/// `out[m, rows] = x[m, cols] · wᵀ` for a row-major f32 `w` (`rows × cols`) and `m <=`
/// [`MAX_ROWS`], with the active kernel family's instructions; `parallel` spreads tasks of
/// weight rows over rayon's threads.
pub fn matmul(
    x: &[f32],
    m: usize,
    w: &[f32],
    (rows, cols): (usize, usize),
    out: &mut [f32],
    parallel: bool,
) {
    assert!(m <= MAX_ROWS, "f32_rows: {m} rows");
    assert!(x.len() >= m * cols && w.len() >= rows * cols && out.len() >= m * rows);
    if m == 0 || rows == 0 {
        return;
    }
    let family = kernels::active();
    let block = Block::new(out, rows);
    let task = |t: usize| {
        let (first, last) = (t * TASK_ROWS, rows.min((t + 1) * TASK_ROWS));
        // SAFETY: the task writes out[i][first..last] for i < m, which no other task touches;
        // the asserts above keep every read inside x and w; the family is the active one.
        unsafe { weight_rows(family, x, m, w, cols, first..last, block) };
    };
    let tasks = rows.div_ceil(TASK_ROWS);
    if parallel && tasks > 1 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// Weight rows `range` against the `m` rows of `x`, into those columns of `out`.
///
/// # Safety
/// The CPU runs `family`'s instructions; `x` holds `m` rows and `w` the range's rows of `cols`
/// values; the range's columns of `m` rows of `out` are this call's alone.
unsafe fn weight_rows(
    family: Family,
    x: &[f32],
    m: usize,
    w: &[f32],
    cols: usize,
    range: std::ops::Range<usize>,
    out: Block,
) {
    // SAFETY: the caller's contract.
    unsafe {
        match family {
            #[cfg(target_arch = "x86_64")]
            Family::Avx512Bf16 | Family::Avx512 => rows_avx512(x, m, w, cols, range, out),
            #[cfg(target_arch = "x86_64")]
            Family::Avx2 => rows_avx2(x, m, w, cols, range, out),
            _ => rows_portable(x, m, w, cols, range, out),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512(
    x: &[f32],
    m: usize,
    w: &[f32],
    cols: usize,
    range: std::ops::Range<usize>,
    out: Block,
) {
    let tiles: Tiles = (
        tile_avx512::<1>,
        tile_avx512::<2>,
        tile_avx512::<3>,
        tile_avx512::<4>,
    );
    // SAFETY: the caller's contract; the tiles' instructions are this function's.
    unsafe { rows_with(x, m, w, cols, range, out, tiles) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2(
    x: &[f32],
    m: usize,
    w: &[f32],
    cols: usize,
    range: std::ops::Range<usize>,
    out: Block,
) {
    let tiles: Tiles = (
        tile_avx2::<1>,
        tile_avx2::<2>,
        tile_avx2::<3>,
        tile_avx2::<4>,
    );
    // SAFETY: the caller's contract; the tiles' instructions are this function's.
    unsafe { rows_with(x, m, w, cols, range, out, tiles) }
}

unsafe fn rows_portable(
    x: &[f32],
    m: usize,
    w: &[f32],
    cols: usize,
    range: std::ops::Range<usize>,
    out: Block,
) {
    let tiles: Tiles = (tile::<1>, tile::<2>, tile::<3>, tile::<4>);
    // SAFETY: the caller's contract.
    unsafe { rows_with(x, m, w, cols, range, out, tiles) }
}

/// A tile: `I` rows of `x` (`cols` apart) against two weight rows of `cols` values.
type Tile<const I: usize> = unsafe fn(&[f32], usize, &[f32], &[f32]) -> [[f32; 2]; I];

/// A family's tiles for 1 to [`GROUP`] activation rows.
type Tiles = (Tile<1>, Tile<2>, Tile<3>, Tile<4>);

/// The schedule: pairs of weight rows (and a last single one) against groups of up to
/// [`GROUP`] activation rows, with a family's tiles.
///
/// # Safety
/// As [`weight_rows`]; the tiles' instructions are the CPU's.
#[inline(always)]
unsafe fn rows_with(
    x: &[f32],
    m: usize,
    w: &[f32],
    cols: usize,
    range: std::ops::Range<usize>,
    out: Block,
    (one, two, three, four): Tiles,
) {
    let row = |r: usize| &w[r * cols..(r + 1) * cols];
    let mut r = range.start;
    while r < range.end {
        let pair = range.end - r >= 2;
        let (w0, w1) = (row(r), if pair { row(r + 1) } else { row(r) });
        let mut i = 0;
        while i < m {
            let n = GROUP.min(m - i);
            let xi = &x[i * cols..];
            // SAFETY: xi holds n rows of cols values; the tiles run on this CPU.
            let sums = unsafe {
                match n {
                    4 => four(xi, cols, w0, w1),
                    3 => pad(three(xi, cols, w0, w1)),
                    2 => pad(two(xi, cols, w0, w1)),
                    _ => pad(one(xi, cols, w0, w1)),
                }
            };
            for (g, [s0, s1]) in sums.iter().take(n).enumerate() {
                // SAFETY: row i + g < m and columns r, r + 1 < range.end of `out` are this
                // call's (the caller's contract).
                unsafe {
                    *out.ptr().add((i + g) * out.stride() + r) = *s0;
                    if pair {
                        *out.ptr().add((i + g) * out.stride() + r + 1) = *s1;
                    }
                }
            }
            i += n;
        }
        r += if pair { 2 } else { 1 };
    }
}

/// `I` sums padded to [`GROUP`].
#[inline(always)]
fn pad<const I: usize>(sums: [[f32; 2]; I]) -> [[f32; 2]; GROUP] {
    let mut all = [[0.0; 2]; GROUP];
    all[..I].copy_from_slice(&sums);
    all
}

/// `x[i] · w0` and `x[i] · w1` for the `I` rows of `x` (`cols` values each, `cols` apart), in
/// plain Rust with eight lane-wise accumulators per sum.
///
/// # Safety
/// None: the slices' bounds are checked; `unsafe` for the [`Tile`] signature.
unsafe fn tile<const I: usize>(x: &[f32], cols: usize, w0: &[f32], w1: &[f32]) -> [[f32; 2]; I] {
    const L: usize = 8;
    let mut acc = [[[0.0f32; L]; 2]; I];
    let chunks = cols / L;
    for c in 0..chunks {
        let (a, b) = (&w0[c * L..(c + 1) * L], &w1[c * L..(c + 1) * L]);
        for (i, acc) in acc.iter_mut().enumerate() {
            let xv = &x[i * cols + c * L..i * cols + (c + 1) * L];
            for l in 0..L {
                acc[0][l] += a[l] * xv[l];
                acc[1][l] += b[l] * xv[l];
            }
        }
    }
    let mut sums = [[0.0f32; 2]; I];
    for (i, (s, acc)) in sums.iter_mut().zip(&acc).enumerate() {
        for (j, lanes) in acc.iter().enumerate() {
            s[j] = lanes.iter().sum();
        }
        for c in chunks * L..cols {
            s[0] += w0[c] * x[i * cols + c];
            s[1] += w1[c] * x[i * cols + c];
        }
    }
    sums
}

/// [`tile`] with AVX-512F, its accumulators in registers.
///
/// # Safety
/// The CPU supports AVX-512F; `x` holds `I` rows of `cols` values, `cols` apart, and `w0` and
/// `w1` `cols` values each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const I: usize>(
    x: &[f32],
    cols: usize,
    w0: &[f32],
    w1: &[f32],
) -> [[f32; 2]; I] {
    use std::arch::x86_64::*;
    debug_assert!(x.len() >= I * cols && w0.len() >= cols && w1.len() >= cols);
    let chunks = cols / 16;
    let mut sums = [[0.0f32; 2]; I];
    // SAFETY: chunk c reads values 16c..16c + 16 <= cols of each row; the tail is indexed.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; I];
        let (p0, p1, px) = (w0.as_ptr(), w1.as_ptr(), x.as_ptr());
        for c in 0..chunks {
            let a = _mm512_loadu_ps(p0.add(16 * c));
            let b = _mm512_loadu_ps(p1.add(16 * c));
            for (i, acc) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(px.add(i * cols + 16 * c));
                acc[0] = _mm512_fmadd_ps(a, xv, acc[0]);
                acc[1] = _mm512_fmadd_ps(b, xv, acc[1]);
            }
        }
        for (i, (s, acc)) in sums.iter_mut().zip(&acc).enumerate() {
            s[0] = _mm512_reduce_add_ps(acc[0]);
            s[1] = _mm512_reduce_add_ps(acc[1]);
            for c in chunks * 16..cols {
                s[0] = w0[c].mul_add(x[i * cols + c], s[0]);
                s[1] = w1[c].mul_add(x[i * cols + c], s[1]);
            }
        }
    }
    sums
}

/// [`tile`] with AVX2 and FMA, its accumulators in registers.
///
/// # Safety
/// As [`tile_avx512`], with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const I: usize>(
    x: &[f32],
    cols: usize,
    w0: &[f32],
    w1: &[f32],
) -> [[f32; 2]; I] {
    use std::arch::x86_64::*;
    debug_assert!(x.len() >= I * cols && w0.len() >= cols && w1.len() >= cols);
    let chunks = cols / 8;
    let mut sums = [[0.0f32; 2]; I];
    // SAFETY: as tile_avx512's, 8 values a chunk.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; I];
        let (p0, p1, px) = (w0.as_ptr(), w1.as_ptr(), x.as_ptr());
        for c in 0..chunks {
            let a = _mm256_loadu_ps(p0.add(8 * c));
            let b = _mm256_loadu_ps(p1.add(8 * c));
            for (i, acc) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(px.add(i * cols + 8 * c));
                acc[0] = _mm256_fmadd_ps(a, xv, acc[0]);
                acc[1] = _mm256_fmadd_ps(b, xv, acc[1]);
            }
        }
        for (i, (s, acc)) in sums.iter_mut().zip(&acc).enumerate() {
            for (j, v) in acc.iter().enumerate() {
                let mut lanes = [0.0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *v);
                s[j] = lanes.iter().sum();
            }
            for c in chunks * 8..cols {
                s[0] = w0[c].mul_add(x[i * cols + c], s[0]);
                s[1] = w1[c].mul_add(x[i * cols + c], s[1]);
            }
        }
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row count this path takes, an odd number of weight rows (a last single row) and
    /// columns that leave a tail after the vector chunks, with each family this CPU has.
    #[test]
    fn products_follow_the_plain_sum() {
        let (rows, cols) = (131usize, 301usize);
        let value = |i: usize| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * 2.0;
        let w: Vec<f32> = (0..rows * cols).map(value).collect();
        for m in 1..=MAX_ROWS {
            let x: Vec<f32> = (0..m * cols).map(|i| value(i + 17)).collect();
            for family in Family::supported_here() {
                let mut out = vec![f32::NAN; m * rows];
                let block = Block::new(&mut out, rows);
                // SAFETY: the whole output is this call's; the family is supported here.
                unsafe { weight_rows(family, &x, m, &w, cols, 0..rows, block) };
                for i in 0..m {
                    for r in 0..rows {
                        let want: f64 = (0..cols)
                            .map(|c| f64::from(x[i * cols + c]) * f64::from(w[r * cols + c]))
                            .sum();
                        let got = f64::from(out[i * rows + r]);
                        assert!(
                            (got - want).abs() < 1e-4,
                            "{} m={m} out[{i}][{r}] = {got}, want {want}",
                            family.name()
                        );
                    }
                }
            }
        }
        // Through the entry point, split over threads.
        let x: Vec<f32> = (0..5 * cols).map(value).collect();
        let (mut split, mut alone) = (vec![0.0; 5 * rows], vec![0.0; 5 * rows]);
        matmul(&x, 5, &w, (rows, cols), &mut split, true);
        matmul(&x, 5, &w, (rows, cols), &mut alone, false);
        assert_eq!(split, alone);
    }
}
