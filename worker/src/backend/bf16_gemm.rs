//! An opt-in product for prefill-sized inputs with bf16 weights: the activations are rounded to
//! bf16 too and multiplied with AVX512-BF16's `vdpbf16ps` (two bf16 products per f32 lane per
//! instruction, accumulated in f32), as PyTorch's bf16 CPU path does. It trades the f32 precision
//! of the activations for about twice the multiply throughput of f32; the default path keeps f32.

/// Whether this CPU can run [`matmul`].
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Register tile of the kernel: activation rows × weight rows, one accumulator each.
const MR: usize = 4;
const NR: usize = 4;

/// `out[m, n] = bf16(x)[m, k] · w[n, k]ᵀ` with `w` as bf16 bits; `None` when the CPU lacks
/// AVX512-BF16 (the caller then takes the f32 path).
pub fn matmul(
    x: &[f32],
    m: usize,
    w: &[u16],
    n: usize,
    k: usize,
    out: &mut [f32],
    parallel: bool,
) -> Option<()> {
    if !available() || m == 0 || n == 0 {
        return if available() { Some(()) } else { None };
    }
    // Activations as bf16 rows padded to a whole number of 32-value chunks with zeros.
    let kp = k.div_ceil(32) * 32;
    let mut xb = vec![0u16; m * kp];
    for (src, dst) in x.chunks_exact(k).zip(xb.chunks_exact_mut(kp)) {
        // SAFETY: `available()` checked the CPU features; `dst` is at least as long as `src`.
        unsafe { round_row(src, dst) };
    }
    super::blocks::run(m, n, k, 2, NR, parallel, out, |i0, im, j0, jn, part| {
        // SAFETY: `available()` checked the CPU features; the block's rows of `xb` hold im rows
        // of `kp` values and those of `w` jn rows of `k` values; `part` is im × jn.
        unsafe { kernel(&xb[i0 * kp..], im, kp, &w[j0 * k..], jn, k, part) }
    });
    Some(())
}

/// Rounds `src` to bf16 (to nearest, ties to even, as PyTorch rounds) into the start of `dst`.
///
/// # Safety
/// The CPU must support AVX-512F and AVX512-BF16; `dst.len() >= src.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
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

#[cfg(not(target_arch = "x86_64"))]
unsafe fn round_row(_: &[f32], _: &mut [u16]) {
    unreachable!("available() is false off x86_64")
}

/// `part[i, j] = xb_i · w_j` for `m` activation rows (bf16, padded to `kp`) and `nr` weight
/// rows (bf16, `k` each), in `MR` × `NR` register tiles.
///
/// # Safety
/// The CPU must support AVX-512F, AVX-512BW and AVX512-BF16; `xb.len() >= m * kp`,
/// `w.len() >= nr * k`, `part.len() >= m * nr`, and `kp` is `k` rounded up to a multiple of 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn kernel(
    xb: &[u16],
    m: usize,
    kp: usize,
    w: &[u16],
    nr: usize,
    k: usize,
    part: &mut [f32],
) {
    use std::arch::x86_64::*;
    let chunks = kp / 32;
    let tail = k % 32;
    // The last chunk of a weight row reads only its `tail` values (when k is not a multiple of 32).
    let last_mask: __mmask32 = if tail == 0 {
        u32::MAX
    } else {
        (1u32 << tail) - 1
    };
    let wload = |row: *const u16, c: usize| -> __m512bh {
        let mask = if c + 1 == chunks { last_mask } else { u32::MAX };
        // SAFETY: the masked load touches only the `k` values of the row.
        unsafe {
            std::mem::transmute(_mm512_maskz_loadu_epi16(
                mask,
                row.add(c * 32) as *const i16,
            ))
        }
    };
    // SAFETY: the caller guarantees the CPU features and the slice sizes; every pointer below
    // stays inside `xb` (row i, chunk c < kp / 32) or `w` (row < nr, masked to its k values).
    unsafe {
        let mut j = 0;
        while j < nr {
            // NR weight rows (the last group may repeat its final row, computed and not stored).
            let jn = (nr - j).min(NR);
            let wr: [*const u16; NR] =
                std::array::from_fn(|q| w.as_ptr().add((j + q.min(jn - 1)) * k));
            let mut i = 0;
            while i < m {
                // MR activation rows (likewise repeating the final one at the edge).
                let im = (m - i).min(MR);
                let xr: [*const u16; MR] =
                    std::array::from_fn(|r| xb.as_ptr().add((i + r.min(im - 1)) * kp));
                let mut acc = [[_mm512_setzero_ps(); NR]; MR];
                for c in 0..chunks {
                    let xv: [__m512bh; MR] = std::array::from_fn(|r| {
                        std::mem::transmute(_mm512_loadu_si512(xr[r].add(c * 32) as *const _))
                    });
                    for q in 0..NR {
                        let wv = wload(wr[q], c);
                        for r in 0..MR {
                            acc[r][q] = _mm512_dpbf16_ps(acc[r][q], xv[r], wv);
                        }
                    }
                }
                for r in 0..im {
                    for q in 0..jn {
                        part[(i + r) * nr + j + q] = _mm512_reduce_add_ps(acc[r][q]);
                    }
                }
                i += im;
            }
            j += jn;
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(_: &[u16], _: usize, _: usize, _: &[u16], _: usize, _: usize, _: &mut [f32]) {
    unreachable!("available() is false off x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_product_of_the_rounded_values() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 33), (17, 21, 64), (40, 70, 1000)] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
                .collect();
            let w: Vec<u16> = (0..n * k)
                .map(|i| half::bf16::from_f32(((i * 5 % 11) as f32 - 5.0) / 7.0).to_bits())
                .collect();
            let mut out = vec![f32::NAN; m * n];
            matmul(&x, m, &w, n, k, &mut out, true).expect("available");
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|c| {
                            let xr = half::bf16::from_f32(x[i * k + c]).to_f64();
                            xr * half::bf16::from_bits(w[j * k + c]).to_f64()
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
}
