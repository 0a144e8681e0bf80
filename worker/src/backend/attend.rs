//! Attention over a sequence's cache of latents on the host, in MLA's absorbed form: the CPU
//! backend's [`Backend::attend_rows`](super::Backend::attend_rows), and the reference the
//! other backends are checked against.

use super::{softmax, Backend, View};

/// Upper bound on the attention scores held at once (floats), to bound memory in long prefills.
pub const SCORE_BLOCK: usize = 1 << 22;

/// Query rows per block in a prefill: a block attends only to the keys up to its last row, so
/// smaller blocks skip more of the causally masked scores; this many keeps the products large.
pub const QUERY_BLOCK: usize = 32;

/// Causal attention of `queries` rows of `q` (`[queries, heads, width]`, query `i` at position
/// `position + i`) over the rows of `cache` (`[.., width]`: keys are whole rows, values their
/// first `values` columns), scores scaled by `scale`; writes `[queries, heads, values]` into
/// `out`. The products run on `backend`.
#[allow(clippy::too_many_arguments)]
pub fn attend_host<B: Backend + ?Sized>(
    backend: &B,
    q: &[f32],
    queries: usize,
    heads: usize,
    cache: &[f32],
    width: usize,
    position: usize,
    values: usize,
    scale: f32,
    out: &mut [f32],
) {
    let total = position + queries;
    let block = (SCORE_BLOCK / (heads * total).max(1)).clamp(1, QUERY_BLOCK);
    let mut start = 0;
    while start < queries {
        let rows = block.min(queries - start);
        // Keys needed by this block: positions up to the block's last query.
        let keys = position + start + rows;
        // Scores [pairs, keys] as (cache · qᵀ)ᵀ: with the right operand row-major, `gemm`
        // runs this 2-4 times faster than q · cacheᵀ, whose operands are both read along
        // their rows (16 heads over 150-4000 keys, on a Zen 4).
        let pairs = rows * heads;
        let q_t = transpose(
            &q[start * heads * width..(start * heads + pairs) * width],
            width,
        );
        let mut scores_t = vec![0.0; keys * pairs];
        backend.matmul_nn(
            keys,
            pairs,
            width,
            View {
                data: cache,
                row_stride: width,
            },
            View {
                data: &q_t,
                row_stride: pairs,
            },
            &mut scores_t,
            pairs,
        );
        let mut scores = transpose(&scores_t, pairs);
        for (i, row_scores) in scores.chunks_exact_mut(heads * keys).enumerate() {
            for head_scores in row_scores.chunks_exact_mut(keys) {
                causal_softmax(head_scores, position + start + i + 1, scale);
            }
        }
        backend.matmul_nn(
            pairs,
            values,
            keys,
            View {
                data: &scores,
                row_stride: keys,
            },
            View {
                data: cache,
                row_stride: width,
            },
            &mut out[start * heads * values..],
            values,
        );
        start += rows;
    }
}

/// Softmax of the first `visible` scores of `row`, scaled by `scale`; the rest (future
/// positions) are set to zero.
pub fn causal_softmax(row: &mut [f32], visible: usize, scale: f32) {
    let (live, masked) = row.split_at_mut(visible);
    live.iter_mut().for_each(|s| *s *= scale);
    softmax(live);
    masked.fill(0.0);
}

/// The transpose of a row-major matrix of `cols` columns.
fn transpose(m: &[f32], cols: usize) -> Vec<f32> {
    let rows = m.len() / cols;
    let mut t = vec![0.0; m.len()];
    for (r, row) in m.chunks_exact(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            t[c * rows + r] = v;
        }
    }
    t
}

/// A cache of rows in host memory.
#[derive(Debug, Clone, Default)]
pub struct HostRows {
    data: Vec<f32>,
    width: usize,
}

impl HostRows {
    pub fn new(width: usize) -> Self {
        Self {
            data: Vec::new(),
            width,
        }
    }

    pub fn append(&mut self, rows: &[f32]) {
        debug_assert!(self.width > 0 && rows.len().is_multiple_of(self.width));
        self.data.extend_from_slice(rows);
    }

    pub fn truncate(&mut self, len: usize) {
        self.data.truncate(len * self.width);
    }

    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }

    /// Every row, `width` values each.
    pub fn values(&self) -> &[f32] {
        &self.data
    }

    pub fn width(&self) -> usize {
        self.width
    }
}
