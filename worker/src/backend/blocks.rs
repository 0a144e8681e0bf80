//! How the hand-written kernels split `out[m, n] = x[m, k] · w[n, k]ᵀ` into tasks: blocks of
//! weight rows small enough to stay in L2 while activation rows pass over them, and, when there
//! are many activation rows, blocks of those too, so that a task's activations also stay in L2
//! instead of streaming from L3 once per block of weights. Tasks spread over rayon's threads.

use rayon::prelude::*;

/// Weight bytes per task: a quarter of a core's L2.
const WEIGHT_BYTES: usize = 64 << 10;

/// Activation bytes per task once there are many rows: another quarter of a core's L2.
const ACTIVATION_BYTES: usize = 256 << 10;

/// Runs `kernel(i0, im, j0, jn, part)` over blocks that cover `[m, n]`, where `part` is the
/// block's `im × jn` output, row-major; then writes every block into `out` (`m × n`).
/// `align` is the kernel's register tile width: weight blocks are a multiple of it.
pub fn run<F>(
    m: usize,
    n: usize,
    k: usize,
    weight_bytes: usize,
    align: usize,
    parallel: bool,
    out: &mut [f32],
    kernel: F,
) where
    F: Fn(usize, usize, usize, usize, &mut [f32]) + Sync,
{
    if m == 0 || n == 0 {
        return;
    }
    let k = k.max(1);
    let bn = (WEIGHT_BYTES / (weight_bytes * k)).max(1).div_ceil(align) * align;
    let bm = (ACTIVATION_BYTES / (4 * k)).max(8).min(m);
    let (mb, nb) = (m.div_ceil(bm), n.div_ceil(bn));
    let task = |t: usize| -> Vec<f32> {
        let (i0, j0) = (t / nb * bm, t % nb * bn);
        let (im, jn) = (bm.min(m - i0), bn.min(n - j0));
        let mut part = vec![0.0f32; im * jn];
        kernel(i0, im, j0, jn, &mut part);
        part
    };
    let parts: Vec<Vec<f32>> = if parallel {
        (0..mb * nb).into_par_iter().map(task).collect()
    } else {
        (0..mb * nb).map(task).collect()
    };
    for (t, part) in parts.iter().enumerate() {
        let (i0, j0) = (t / nb * bm, t % nb * bn);
        let jn = bn.min(n - j0);
        for (r, row) in part.chunks_exact(jn).enumerate() {
            let at = (i0 + r) * n + j0;
            out[at..at + jn].copy_from_slice(row);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_the_output_once() {
        for &(m, n, k) in &[(1, 1, 1), (5, 300, 64), (700, 33, 1024), (3000, 70, 4096)] {
            for parallel in [false, true] {
                let mut out = vec![0.0f32; m * n];
                run(m, n, k, 2, 4, parallel, &mut out, |i0, im, j0, jn, part| {
                    for r in 0..im {
                        for c in 0..jn {
                            part[r * jn + c] = ((i0 + r) * n + j0 + c) as f32;
                        }
                    }
                });
                for (at, v) in out.iter().enumerate() {
                    assert_eq!(*v, at as f32, "{m}x{n}x{k} at {at}");
                }
            }
        }
    }
}
