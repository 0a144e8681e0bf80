//! Products of f32 activations with bf16 weights on AVX-512, for any number of input rows.
//!
//! Each 16-value chunk of a weight row is widened to f32 in a register (bf16 is the top half
//! of an f32, so this is exact) and multiplied in f32: nothing is rounded, and no widened copy
//! of the matrix is ever written to memory. A register tile holds the dot products of `MR`
//! activation rows with `NR` weight rows; [`super::blocks`] splits the product into tasks.

/// Whether this CPU can run [`matmul`].
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Register tile for two or more activation rows: 4 × 4 accumulators, 4 activation vectors and
/// 4 widened weight vectors, 24 of the 32 vector registers.
const MR: usize = 4;
const NR: usize = 4;

/// Register tile for one activation row (decode): more weight rows at once, for more
/// independent accumulation chains and more loads in flight.
const NR_ONE: usize = 8;

/// `out[m, n] = x[m, k] · w[n, k]ᵀ` with `w` as bf16 bits, in f32; `None` when the CPU lacks
/// AVX-512 (the caller then takes another path). `parallel` spreads tasks over rayon's threads.
pub fn matmul(
    x: &[f32],
    m: usize,
    w: &[u16],
    n: usize,
    k: usize,
    out: &mut [f32],
    parallel: bool,
) -> Option<()> {
    if !available() {
        return None;
    }
    assert!(x.len() >= m * k, "widen_gemm: x too small");
    assert!(w.len() >= n * k, "widen_gemm: w too small");
    assert!(out.len() >= m * n, "widen_gemm: out too small");
    if m == 0 || n == 0 {
        return Some(());
    }
    if k == 0 {
        out[..m * n].fill(0.0);
        return Some(());
    }
    let align = if m == 1 { NR_ONE } else { NR };
    super::blocks::run(m, n, k, 2, align, parallel, out, |i0, im, j0, jn, part| {
        // SAFETY: `available()` checked the CPU features; the block's rows of `x` and `w` hold
        // im and jn rows of k values, and `part` im × jn values, as the kernel requires.
        unsafe { task_kernel(&x[i0 * k..], im, &w[j0 * k..], jn, k, part) }
    });
    Some(())
}

/// `part[i, j] = x_i · w_j` for all `m` rows of `x` and the `tn` rows of `w`.
///
/// # Safety
/// The CPU must support AVX-512F, AVX-512BW and AVX-512VL; `x.len() >= m * k`,
/// `w.len() >= tn * k`, `part.len() >= m * tn`, `k > 0`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn task_kernel(x: &[f32], m: usize, w: &[u16], tn: usize, k: usize, part: &mut [f32]) {
    // SAFETY (for every call below): rows i..i+im of x and j..j+jn of w exist, and the tile
    // writes only part[(i + r) * tn + j + q] for r < im, q < jn.
    unsafe {
        if m == 1 {
            let mut j = 0;
            while j < tn {
                let jn = (tn - j).min(NR_ONE);
                tile::<1, NR_ONE>(x, 0, 1, w, j, jn, k, part, tn);
                j += jn;
            }
            return;
        }
        let mut i = 0;
        while i < m {
            let im = (m - i).min(MR);
            let mut j = 0;
            while j < tn {
                let jn = (tn - j).min(NR);
                match im {
                    4 => tile::<4, NR>(x, i, im, w, j, jn, k, part, tn),
                    3 => tile::<3, NR>(x, i, im, w, j, jn, k, part, tn),
                    2 => tile::<2, NR>(x, i, im, w, j, jn, k, part, tn),
                    _ => tile::<1, NR>(x, i, im, w, j, jn, k, part, tn),
                }
                j += jn;
            }
            i += im;
        }
    }
}

/// One register tile: rows `i..i + im` of `x` (`im <= R`) against rows `j..j + jn` of `w`
/// (`jn <= C`); edge tiles repeat their last row, computed and not stored.
///
/// # Safety
/// As [`task_kernel`], and `im >= 1`, `jn >= 1`, rows `i + im - 1` of `x` and `j + jn - 1` of
/// `w` exist, and `part` has room for row `i + im - 1`, column `j + jn - 1` at stride `tn`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const R: usize, const C: usize>(
    x: &[f32],
    i: usize,
    im: usize,
    w: &[u16],
    j: usize,
    jn: usize,
    k: usize,
    part: &mut [f32],
    tn: usize,
) {
    use std::arch::x86_64::*;
    let full = k / 16;
    let tail = k % 16;
    let xr: [*const f32; R] = std::array::from_fn(|r| x[(i + r.min(im - 1)) * k..].as_ptr());
    let wr: [*const u16; C] = std::array::from_fn(|q| w[(j + q.min(jn - 1)) * k..].as_ptr());
    // SAFETY: every pointer starts a row of k values; chunk c < full reads values
    // c * 16..c * 16 + 16 < k, and the tail chunk is masked to the k % 16 values left.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        for c in 0..full {
            let xv: [__m512; R] = std::array::from_fn(|r| _mm512_loadu_ps(xr[r].add(c * 16)));
            for q in 0..C {
                let bits = _mm256_loadu_si256(wr[q].add(c * 16) as *const __m256i);
                let wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
                for r in 0..R {
                    acc[r][q] = _mm512_fmadd_ps(xv[r], wv, acc[r][q]);
                }
            }
        }
        if tail > 0 {
            let mask: __mmask16 = (1u16 << tail) - 1;
            let at = full * 16;
            let xv: [__m512; R] =
                std::array::from_fn(|r| _mm512_maskz_loadu_ps(mask, xr[r].add(at)));
            for q in 0..C {
                let bits = _mm256_maskz_loadu_epi16(mask, wr[q].add(at) as *const i16);
                let wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
                for r in 0..R {
                    acc[r][q] = _mm512_fmadd_ps(xv[r], wv, acc[r][q]);
                }
            }
        }
        for r in 0..im {
            for q in 0..jn {
                part[(i + r) * tn + j + q] = _mm512_reduce_add_ps(acc[r][q]);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn task_kernel(_: &[f32], _: usize, _: &[u16], _: usize, _: usize, _: &mut [f32]) {
    unreachable!("available() is false off x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_definition_for_every_edge() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        // m covers the 1-row tile and every remainder of MR; n every remainder of NR and
        // NR_ONE and several tasks; k a chunk tail, an exact chunk and less than one chunk.
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 13, 37),
            (1, 300, 1024),
            (2, 5, 16),
            (3, 7, 33),
            (5, 9, 100),
            (7, 70, 15),
            (12, 130, 1024),
            (33, 41, 700),
        ] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
                .collect();
            let w: Vec<u16> = (0..n * k)
                .map(|i| half::bf16::from_f32(((i * 5 % 11) as f32 - 5.0) / 7.0).to_bits())
                .collect();
            for parallel in [false, true] {
                let mut out = vec![f32::NAN; m * n];
                matmul(&x, m, &w, n, k, &mut out, parallel).expect("available");
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|c| {
                                f64::from(x[i * k + c])
                                    * half::bf16::from_bits(w[j * k + c]).to_f64()
                            })
                            .sum();
                        let got = f64::from(out[i * n + j]);
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{m}x{n}x{k} [{i},{j}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
