//! How the CUDA backend launches the kernels of `nvrtc.cu`: each kernel's grid and block
//! shape. Not behind the `cuda` feature, so that the tests that run those kernels on the CPU
//! (`tests/nvrtc_kernels.rs`) launch them exactly as the backend does.

use crate::config::TopkMethod;

/// Activation rows `fp8_gemv` takes at once; more go through `fp8_to_bf16` and cuBLAS.
pub const FP8_GEMV_ROWS: usize = 8;

/// Threads of a `fp8_gemv` block: 8 warps, one weight row each.
pub const FP8_GEMV_THREADS: u32 = 256;

/// Threads of a block of the element-wise kernels, which loop over their values with the
/// grid's stride.
pub const ELEMENTWISE_THREADS: u32 = 256;

/// Most blocks of an element-wise launch: beyond it each thread takes more values.
const ELEMENTWISE_BLOCKS: usize = 65_535;

/// A launch's shape: blocks in the grid and threads in a block, as `(x, y, z)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub blocks: (u32, u32, u32),
    pub threads: (u32, u32, u32),
}

/// `fp8_gemv` over a weight of `n` rows: one warp per row.
pub fn fp8_gemv(n: usize) -> Grid {
    let warps = (FP8_GEMV_THREADS / 32) as usize;
    Grid {
        blocks: (blocks(n.div_ceil(warps)), 1, 1),
        threads: (FP8_GEMV_THREADS, 1, 1),
    }
}

/// Most products of one `fp8_gemv_grouped` launch: the grid's y extent.
pub const FP8_GEMV_GROUP: usize = 65_535;

/// `fp8_gemv_grouped` over `products` products (at most [`FP8_GEMV_GROUP`]) of at most
/// `most_rows` weight rows: `fp8_gemv`'s blocks for the most rows, one row of them a product.
pub fn fp8_gemv_grouped(most_rows: usize, products: usize) -> Grid {
    Grid {
        blocks: (fp8_gemv(most_rows).blocks.0, blocks(products), 1),
        threads: (FP8_GEMV_THREADS, 1, 1),
    }
}

/// An element-wise kernel over `len` values, with a grid-stride loop.
pub fn elementwise(len: usize) -> Grid {
    let blocks = len
        .div_ceil(ELEMENTWISE_THREADS as usize)
        .clamp(1, ELEMENTWISE_BLOCKS);
    Grid {
        blocks: (blocks as u32, 1, 1),
        threads: (ELEMENTWISE_THREADS, 1, 1),
    }
}

/// Threads of a block of the kernels that take a row a block (`causal_softmax`, `rms_norm`,
/// `gate_route`, `logits_best`).
pub const ROW_THREADS: u32 = 256;

/// A kernel over `rows` rows, one block per row.
fn per_row(rows: usize) -> Grid {
    Grid {
        blocks: (blocks(rows), 1, 1),
        threads: (ROW_THREADS, 1, 1),
    }
}

/// Most parts (sequences, or blocks of one's queries) of one `causal_softmax` launch: the
/// grid's y extent.
pub const SOFTMAX_PARTS: usize = 65_535;

/// `causal_softmax` over `parts` parts (at most [`SOFTMAX_PARTS`]) of at most `most_rows` rows
/// of scores: a part per row of the grid's blocks, a block per row of scores with the grid's
/// stride beyond the most blocks of a launch.
pub fn causal_softmax(most_rows: usize, parts: usize) -> Grid {
    Grid {
        blocks: (
            most_rows.clamp(1, ELEMENTWISE_BLOCKS) as u32,
            blocks(parts),
            1,
        ),
        threads: (ROW_THREADS, 1, 1),
    }
}

/// `rms_norm` over `rows` rows: one block per row.
pub fn rms_norm(rows: usize) -> Grid {
    per_row(rows)
}

/// `gate_route` over `rows` rows of a gate's logits: one block per row.
pub fn gate_route(rows: usize) -> Grid {
    per_row(rows)
}

/// Most experts and groups of experts `gate_route` takes (nvrtc.cu's `ROUTE_MAX_EXPERTS` and
/// `ROUTE_MAX_GROUPS`: its shared arrays); a gate beyond them routes on the host.
pub const ROUTE_MAX_EXPERTS: usize = 1024;
pub const ROUTE_MAX_GROUPS: usize = 64;

/// `gate_route`'s code for a routing method (nvrtc.cu's `ROUTE_*`).
pub fn gate_route_method(method: TopkMethod) -> i32 {
    match method {
        TopkMethod::Greedy => 0,
        TopkMethod::GroupLimitedGreedy => 1,
        TopkMethod::NoauxTc => 2,
    }
}

/// `logits_best` over `rows` rows of logits: one block per row.
pub fn logits_best(rows: usize) -> Grid {
    per_row(rows)
}

/// Most best logits a row takes from `logits_best` (it reads the row once per one of them):
/// more than any greedy sampler and the API's alternatives (20) need; a top-k sampler of more
/// takes every logit.
pub const LOGITS_BEST_MAX: usize = 32;

/// Columns of an activation block that `quantize_fp8_rows` gives one scale: DeepSeek-V3's
/// 1 × 128.
pub const FP8_ACTIVATION_BLOCK: usize = 128;

/// `quantize_fp8_rows` over `rows` rows of `k` values: a block of 128 threads per block of
/// columns and row, with the grid's stride over rows beyond the grid's y extent.
pub fn quantize_fp8_rows(rows: usize, k: usize) -> Grid {
    Grid {
        blocks: (
            blocks(k.div_ceil(FP8_ACTIVATION_BLOCK)),
            rows.clamp(1, ELEMENTWISE_BLOCKS) as u32,
            1,
        ),
        threads: (FP8_ACTIVATION_BLOCK as u32, 1, 1),
    }
}

/// Rows of a page of a paged KV cache: the unit the caches grow and shrink by, and the block
/// of the rank's KV cache budget.
pub const PAGE_ROWS: usize = 16;

/// Threads of a `paged_rows` block, which copies one row at a time.
pub const PAGED_ROWS_THREADS: u32 = 128;

/// `paged_rows` over `rows` rows: a block per row, with the grid's stride beyond the most
/// blocks of a launch.
pub fn paged_rows(rows: usize) -> Grid {
    Grid {
        blocks: (rows.clamp(1, ELEMENTWISE_BLOCKS) as u32, 1, 1),
        threads: (PAGED_ROWS_THREADS, 1, 1),
    }
}

fn blocks(n: usize) -> u32 {
    u32::try_from(n.max(1)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_cover_their_work() {
        assert_eq!(fp8_gemv(1).blocks, (1, 1, 1));
        assert_eq!(fp8_gemv(8).blocks, (1, 1, 1));
        assert_eq!(fp8_gemv(9).blocks, (2, 1, 1));
        assert_eq!(fp8_gemv_grouped(9, 3).blocks, (2, 3, 1));
        assert_eq!(elementwise(0).blocks, (1, 1, 1));
        assert_eq!(elementwise(257).blocks, (2, 1, 1));
        assert_eq!(elementwise(usize::MAX / 2).blocks, (65_535, 1, 1));
        assert_eq!(paged_rows(0).blocks, (1, 1, 1));
        assert_eq!(paged_rows(70_000).blocks, (65_535, 1, 1));
        assert_eq!(causal_softmax(0, 3).blocks, (1, 3, 1));
        assert_eq!(causal_softmax(70_000, 2).blocks, (65_535, 2, 1));
    }
}
