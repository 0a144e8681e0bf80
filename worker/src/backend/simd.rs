//! The one kernel no maintained crate offers: a dot product of f32 activations with bf16
//! weights, accumulated in f32, vectorised for the CPU it runs on (AVX-512, AVX2+FMA, or
//! portable code), chosen at run time.

use super::bf16_to_f32;

/// Lanes of independent accumulators: lets the compiler keep one vector register per group
/// of lanes instead of one serial chain of additions.
const LANES: usize = 16;

/// `Σ x[i] · w[i]` with `w` as bf16 bits; `x` and `w` have the same length.
pub fn dot_bf16(x: &[f32], w: &[u16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { dot_avx512(x, w) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { dot_avx2(x, w) };
        }
    }
    dot_portable(x, w)
}

/// `out[i] = x_i · w` for the `out.len()` rows of `x`, each as long as `w` (bf16 bits): the
/// weight row is widened once per group of four input rows.
pub fn dot_rows_bf16(x: &[f32], w: &[u16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { rows_avx512(x, w, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { rows_avx2(x, w, out) };
        }
    }
    rows_portable(x, w, out)
}

#[inline(always)]
fn rows_portable(x: &[f32], w: &[u16], out: &mut [f32]) {
    let cols = w.len();
    let full = cols / LANES * LANES;
    let m = out.len();
    let mut i = 0;
    while i + 4 <= m {
        let xr: [&[f32]; 4] = std::array::from_fn(|g| &x[(i + g) * cols..(i + g + 1) * cols]);
        let mut acc = [[0.0f32; LANES]; 4];
        for c in (0..full).step_by(LANES) {
            let mut wide = [0.0f32; LANES];
            for (d, &b) in wide.iter_mut().zip(&w[c..c + LANES]) {
                *d = bf16_to_f32(b);
            }
            for (a, row) in acc.iter_mut().zip(&xr) {
                for ((a, xv), wv) in a.iter_mut().zip(&row[c..c + LANES]).zip(&wide) {
                    *a = xv.mul_add(*wv, *a);
                }
            }
        }
        for (g, (a, row)) in acc.iter().zip(&xr).enumerate() {
            let tail: f32 = row[full..]
                .iter()
                .zip(&w[full..])
                .map(|(v, &b)| v * bf16_to_f32(b))
                .sum();
            out[i + g] = a.iter().sum::<f32>() + tail;
        }
        i += 4;
    }
    for (j, o) in out.iter_mut().enumerate().skip(i) {
        *o = dot_portable(&x[j * cols..(j + 1) * cols], w);
    }
}

/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512(x: &[f32], w: &[u16], out: &mut [f32]) {
    rows_portable(x, w, out)
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2(x: &[f32], w: &[u16], out: &mut [f32]) {
    rows_portable(x, w, out)
}

#[inline(always)]
fn dot_portable(x: &[f32], w: &[u16]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let xs = x.chunks_exact(LANES);
    let ws = w.chunks_exact(LANES);
    let tail: f32 = xs
        .remainder()
        .iter()
        .zip(ws.remainder())
        .map(|(a, &b)| a * bf16_to_f32(b))
        .sum();
    for (xc, wc) in xs.zip(ws) {
        for ((a, xv), &wv) in acc.iter_mut().zip(xc).zip(wc) {
            *a = xv.mul_add(bf16_to_f32(wv), *a);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(x: &[f32], w: &[u16]) -> f32 {
    dot_portable(x, w)
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(x: &[f32], w: &[u16]) -> f32 {
    dot_portable(x, w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_groups_match_single_dots() {
        for (m, n) in [(1, 33), (4, 64), (5, 100), (9, 17), (12, 1024)] {
            let x: Vec<f32> = (0..m * n).map(|i| (i as f32 * 0.13).sin()).collect();
            let w: Vec<u16> = (0..n)
                .map(|i| half::bf16::from_f32((i as f32 * 0.7).cos()).to_bits())
                .collect();
            let mut out = vec![f32::NAN; m];
            dot_rows_bf16(&x, &w, &mut out);
            for (i, o) in out.iter().enumerate() {
                let want = dot_portable(&x[i * n..(i + 1) * n], &w);
                assert!(
                    (o - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "m={m} n={n} row {i}: {o} vs {want}"
                );
            }
        }
    }

    #[test]
    fn every_path_matches_the_definition() {
        for n in [0, 1, 15, 16, 17, 100, 1024] {
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let w: Vec<u16> = (0..n)
                .map(|i| half::bf16::from_f32((i as f32 * 0.11).cos()).to_bits())
                .collect();
            let exact: f64 = x
                .iter()
                .zip(&w)
                .map(|(a, &b)| f64::from(*a) * f64::from(bf16_to_f32(b)))
                .sum();
            for got in [dot_bf16(&x, &w), dot_portable(&x, &w)] {
                assert!(
                    (f64::from(got) - exact).abs() < 1e-4 * (1.0 + exact.abs()),
                    "n={n}: {got} vs {exact}"
                );
            }
        }
    }
}
