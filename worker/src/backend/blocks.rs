//! How the hand-written kernels split `out[m, n] = x[m, k] · w[n, k]ᵀ` into tasks: blocks of
//! weight rows small enough to stay in L2 while activation rows pass over them, and, when there
//! are many activation rows, blocks of those too, so that a task's activations also stay in L2
//! instead of streaming from L3 once per block of weights. Tasks spread over rayon's threads and
//! write their blocks straight into the output: a copy through a per-task buffer cost a fifth
//! of the product.

use rayon::prelude::*;

/// Weight bytes per task: a quarter of a core's L2.
const WEIGHT_BYTES: usize = 64 << 10;

/// Activation bytes per task once there are many rows: another quarter of a core's L2.
const ACTIVATION_BYTES: usize = 256 << 10;

/// Products of at most this many activation rows (decode) read each weight once: their weight
/// blocks need not fit in L2, and fewer, longer blocks stream better.
pub(super) const STREAM_ROWS: usize = 2;

/// Tasks per thread for such products, of equal weight bytes: enough that a thread that started
/// late (woken for the product) or ran slower still finds work to steal near the end. Batch-1
/// decode of the bench model with 16 against 4, medians of 8 alternating rounds on a 2-core
/// Zen 4 with the avx2 kernels: 90.3 against 90.6 tok/s, and 1.04 times the uneven blocks
/// that came before (within the machine's noise).
const STREAM_TASKS: usize = 16;

/// A block of a row-major output: rows at a stride, from a first value on. Blocks handed to
/// different tasks never share a value, so each task writes its own through [`Block::row`] or
/// through raw stores while [`run`] holds the `&mut` borrow of the whole output.
#[derive(Debug, Clone, Copy)]
pub struct Block {
    ptr: *mut f32,
    stride: usize,
}

// SAFETY: a Block is a pointer into an output that `run` (or a test) borrows mutably for as long
// as its tasks run; each task writes only its own block, so sharing the pointer is sound.
unsafe impl Send for Block {}
// SAFETY: as above; a Block itself has no interior state.
unsafe impl Sync for Block {}

impl Block {
    /// The whole of `out`, with rows `stride` values apart.
    pub fn new(out: &mut [f32], stride: usize) -> Self {
        Self {
            ptr: out.as_mut_ptr(),
            stride,
        }
    }

    /// The block whose first value is `rows` rows down and `cols` columns right of this one's.
    pub fn offset(self, rows: usize, cols: usize) -> Self {
        Self {
            ptr: self.ptr.wrapping_add(rows * self.stride + cols),
            stride: self.stride,
        }
    }

    /// Distance between rows, in values.
    pub fn stride(self) -> usize {
        self.stride
    }

    /// The first value.
    pub fn ptr(self) -> *mut f32 {
        self.ptr
    }

    /// The first `len` values of row `r`.
    ///
    /// # Safety
    /// They lie inside the output the block was made from, and nothing else reads or writes them
    /// while the slice lives.
    pub unsafe fn row<'a>(self, r: usize, len: usize) -> &'a mut [f32] {
        // SAFETY: the caller guarantees the range is inside the output and not aliased.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r * self.stride), len) }
    }
}

/// One product `out[m, n] = x[m, k] · w[n, k]ᵀ` of a group that [`run_grouped`] splits: its
/// extents, the bytes of one weight value, and its output.
#[derive(Debug, Clone, Copy)]
pub struct Product {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub weight_bytes: usize,
    pub out: Block,
}

/// Runs `kernel(i0, im, j0, jn, block)` over blocks that cover `out` (`m × n`, row-major),
/// where `block` starts at `out[i0 * n + j0]` and the kernel writes its `im × jn` values there.
/// `align` is the kernel's register tile width: weight blocks are a multiple of it.
#[allow(clippy::too_many_arguments)]
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
    F: Fn(usize, usize, usize, usize, Block) + Sync,
{
    if m == 0 || n == 0 {
        return;
    }
    assert!(out.len() >= m * n, "blocks: output too small");
    let product = Product {
        m,
        n,
        k,
        weight_bytes,
        out: Block::new(out, n),
    };
    run_grouped(&[product], align, parallel, |_, i0, im, j0, jn, block| {
        kernel(i0, im, j0, jn, block)
    });
}

/// [`run`] for independent products at once, as one set of tasks: `kernel(g, i0, im, j0, jn,
/// block)` computes a block of product `g`. The weights of decode-sized products (at most
/// [`STREAM_ROWS`] rows) are cut into [`STREAM_TASKS`] tasks per thread of equal bytes, across
/// the products' boundaries, so that many small products (an attention layer's heads, a MoE
/// layer's experts) stream like one large one, with one fork.
///
/// Each product's `out` must have `m` rows of at least `n` values at its stride, written by
/// nothing else while this runs.
pub fn run_grouped<F>(products: &[Product], align: usize, parallel: bool, kernel: F)
where
    F: Fn(usize, usize, usize, usize, usize, Block) + Sync,
{
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    // Pieces `(product, first row, rows, first weight row, weight rows)`; a task is a run of
    // consecutive pieces.
    let mut pieces: Vec<[usize; 5]> = Vec::new();
    let mut tasks: Vec<std::ops::Range<usize>> = Vec::new();
    let live = |p: &&Product| p.m > 0 && p.n > 0;
    // Decode-sized products: their weight rows cut into tasks of equal bytes across product
    // boundaries. Tasks of uneven size (an expert's 2 MiB in blocks of 1.75 and 0.25) left one
    // thread waiting for the other's last block at the end of every product.
    let streamed: Vec<(usize, &Product)> = products
        .iter()
        .enumerate()
        .filter(|(_, p)| live(p) && p.m <= STREAM_ROWS)
        .collect();
    let streamed_bytes: usize = streamed
        .iter()
        .map(|(_, p)| p.n * p.k * p.weight_bytes)
        .sum();
    let per_task = streamed_bytes
        .div_ceil(STREAM_TASKS * threads)
        .max(WEIGHT_BYTES);
    let mut filled = 0;
    for &(g, p) in &streamed {
        let row_bytes = (p.weight_bytes * p.k).max(1);
        let mut j0 = 0;
        while j0 < p.n {
            let rows = (per_task - filled).div_ceil(row_bytes).div_ceil(align) * align;
            let jn = rows.max(align).min(p.n - j0);
            pieces.push([g, 0, p.m, j0, jn]);
            filled += jn * row_bytes;
            j0 += jn;
            if filled >= per_task {
                tasks.push(tasks.last().map_or(0, |t| t.end)..pieces.len());
                filled = 0;
            }
        }
    }
    if filled > 0 {
        tasks.push(tasks.last().map_or(0, |t| t.end)..pieces.len());
    }
    // Larger products: a block of weight rows that stays in L2 while a block of activation rows
    // small enough for L2 passes over it, one task each.
    for (g, p) in products.iter().enumerate() {
        if !live(&p) || p.m <= STREAM_ROWS {
            continue;
        }
        let k = p.k.max(1);
        let bn = (WEIGHT_BYTES / (p.weight_bytes * k)).max(1).div_ceil(align) * align;
        let bm = (ACTIVATION_BYTES / (4 * k)).max(8).min(p.m);
        for i0 in (0..p.m).step_by(bm) {
            for j0 in (0..p.n).step_by(bn) {
                pieces.push([g, i0, bm.min(p.m - i0), j0, bn.min(p.n - j0)]);
                tasks.push(pieces.len() - 1..pieces.len());
            }
        }
    }
    let task = |t: &std::ops::Range<usize>| {
        for &[g, i0, im, j0, jn] in &pieces[t.clone()] {
            kernel(g, i0, im, j0, jn, products[g].out.offset(i0, j0));
        }
    };
    if parallel && tasks.len() > 1 {
        tasks.par_iter().for_each(task);
    } else {
        tasks.iter().for_each(task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_blocks_cover_every_output_once() {
        let shapes = [
            (1, 256, 64),
            (2, 1000, 300),
            (1, 1, 1),
            (0, 5, 5),
            (700, 33, 1024),
        ];
        let mut outs: Vec<Vec<f32>> = shapes.iter().map(|&(m, n, _)| vec![0.0; m * n]).collect();
        let products: Vec<Product> = shapes
            .iter()
            .zip(&mut outs)
            .map(|(&(m, n, k), out)| Product {
                m,
                n,
                k,
                weight_bytes: 2,
                out: Block::new(out, n),
            })
            .collect();
        for parallel in [false, true] {
            run_grouped(&products, 32, parallel, |g, i0, im, j0, jn, block| {
                for r in 0..im {
                    // SAFETY: the block's rows hold jn values of this task's own.
                    let row = unsafe { block.row(r, jn) };
                    for (c, v) in row.iter_mut().enumerate() {
                        *v += ((i0 + r) * shapes[g].1 + j0 + c + g) as f32;
                    }
                }
            });
        }
        for (g, out) in outs.iter().enumerate() {
            for (at, v) in out.iter().enumerate() {
                assert_eq!(*v, 2.0 * (at + g) as f32, "product {g} at {at}");
            }
        }
    }

    #[test]
    fn blocks_cover_the_output_once() {
        for &(m, n, k) in &[(1, 1, 1), (5, 300, 64), (700, 33, 1024), (3000, 70, 4096)] {
            for parallel in [false, true] {
                let mut out = vec![0.0f32; m * n];
                run(
                    m,
                    n,
                    k,
                    2,
                    4,
                    parallel,
                    &mut out,
                    |i0, im, j0, jn, block| {
                        for r in 0..im {
                            // SAFETY: the block's rows hold jn values of this task's own.
                            let row = unsafe { block.row(r, jn) };
                            for (c, v) in row.iter_mut().enumerate() {
                                *v += ((i0 + r) * n + j0 + c) as f32;
                            }
                        }
                    },
                );
                for (at, v) in out.iter().enumerate() {
                    assert_eq!(*v, at as f32, "{m}x{n}x{k} at {at}");
                }
            }
        }
    }
}
