//! Attention over a sequence's cache of latents on the host, in MLA's absorbed form: the CPU
//! backend's [`Backend::attend_rows`](super::Backend::attend_rows), and the reference the
//! other backends are checked against; and the absorbed attention of a step's sequences from
//! their queries, by parts ([`absorbed_by_parts`]), and of a whole attention block from its
//! hidden states ([`block_by_parts`]).

use super::{
    rms_norm, softmax, Absorbed, AbsorbedRun, Attend, AttentionBlock, Backend, BlockRun, Product,
    Rotation, View,
};

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

/// [`Backend::attend_absorbed`] as grouped products and [`Backend::attend_grouped`], with the
/// absorbed queries and the heads' outputs arranged on the host: the default, which the CPU
/// backend runs.
pub fn absorbed_by_parts<B: Backend + ?Sized>(
    backend: &B,
    w: &Absorbed<'_, B::Matrix>,
    q: &[f32],
    runs: &[AbsorbedRun<'_, B::Rows>],
    out: &mut [f32],
) {
    let (h, qk, width, lora) = (w.uk_t.len(), w.nope + w.rope, w.lora + w.rope, w.lora);
    let n: usize = runs.iter().map(|r| r.queries).sum();
    if n == 0 {
        return;
    }
    // Absorbed queries: [n, h, lora + rope] = [W_UKᵀ q_nope | q_pe] per head.
    let q_nope: Vec<Vec<f32>> = (0..h)
        .map(|head| {
            (q.chunks_exact(qk).skip(head).step_by(h))
                .flat_map(|q| &q[..w.nope])
                .copied()
                .collect()
        })
        .collect();
    let absorbed = per_head(backend, &w.uk_t, &q_nope, n, lora);
    let mut q_abs = vec![0.0; n * h * width];
    for (i, (abs_row, q_row)) in q_abs
        .chunks_exact_mut(h * width)
        .zip(q.chunks_exact(h * qk))
        .enumerate()
    {
        let heads = abs_row.chunks_exact_mut(width).zip(q_row.chunks_exact(qk));
        for (head, (a, qh)) in heads.enumerate() {
            let (latent, pe) = a.split_at_mut(lora);
            latent.copy_from_slice(&absorbed[head][i * lora..(i + 1) * lora]);
            pe.copy_from_slice(&qh[w.nope..]);
        }
    }

    // Per sequence, over its cache; latent outputs [n, h, lora].
    let mut o_lat = vec![0.0; n * h * lora];
    let mut attends = Vec::with_capacity(runs.len());
    let (mut queries, mut outs) = (&q_abs[..], &mut o_lat[..]);
    for r in runs {
        let (q, rest) = queries.split_at(r.queries * h * width);
        let (o, more) = std::mem::take(&mut outs).split_at_mut(r.queries * h * lora);
        (queries, outs) = (rest, more);
        attends.push(Attend {
            q,
            queries: r.queries,
            rows: r.rows,
            position: r.position,
            out: o,
        });
    }
    backend.attend_grouped(h, lora, w.scale, &mut attends);
    drop(attends);

    let o_heads: Vec<Vec<f32>> = (0..h)
        .map(|head| {
            (o_lat.chunks_exact(lora).skip(head).step_by(h))
                .flatten()
                .copied()
                .collect()
        })
        .collect();
    let values = per_head(backend, &w.uv, &o_heads, n, w.v);
    let mut attn = vec![0.0; if w.o_proj.is_some() { n * h * w.v } else { 0 }];
    let heads_out = if w.o_proj.is_some() {
        &mut attn[..]
    } else {
        &mut out[..n * h * w.v]
    };
    for (i, row) in heads_out.chunks_exact_mut(h * w.v).enumerate() {
        for (head, o) in row.chunks_exact_mut(w.v).enumerate() {
            o.copy_from_slice(&values[head][i * w.v..(i + 1) * w.v]);
        }
    }
    if let Some(o_proj) = w.o_proj {
        backend.linear(&attn, n, o_proj, out);
    }
}

/// [`Backend::attention_block`] by parts: [`Backend::linear_norm_linear`] for the queries and
/// the cache rows, their norm and rotation on the host, [`Backend::append_rows`] per run, then
/// [`Backend::attend_absorbed`].
pub fn block_by_parts<B: Backend + ?Sized>(
    backend: &B,
    b: &AttentionBlock<'_, B::Matrix>,
    x: &[f32],
    rotation: &Rotation,
    runs: &mut [BlockRun<'_, B::Rows>],
    out: &mut [f32],
) {
    let w = &b.attention;
    let (h, qk, width) = (w.uk_t.len(), w.nope + w.rope, w.lora + w.rope);
    let n: usize = runs.iter().map(|r| r.queries).sum();
    if n == 0 {
        return;
    }
    let stacked_width = backend.shape(b.input).0;
    let mut stacked = vec![0.0; n * stacked_width];
    let mut q = vec![0.0; n * h * qk];
    let norm = (b.q_norm, b.eps);
    backend.linear_norm_linear(x, n, (b.input, b.q_b), norm, &mut stacked, &mut q);
    for (row, q_row) in q.chunks_exact_mut(h * qk).enumerate() {
        for head in q_row.chunks_exact_mut(qk) {
            rotation.apply(row, &mut head[w.nope..]);
        }
    }
    // The new cache rows: the latent normalised, the shared key rotated.
    let mut kv: Vec<f32> = (stacked.chunks_exact(stacked_width))
        .flat_map(|row| &row[stacked_width - width..])
        .copied()
        .collect();
    for (row, kv_row) in kv.chunks_exact_mut(width).enumerate() {
        let (latent, k_pe) = kv_row.split_at_mut(w.lora);
        rms_norm(latent, b.kv_norm, b.eps);
        rotation.apply(row, k_pe);
    }
    let mut at = 0;
    for r in runs.iter_mut() {
        backend.append_rows(r.rows, &kv[at * width..(at + r.queries) * width]);
        at += r.queries;
    }
    let absorbed: Vec<AbsorbedRun<'_, B::Rows>> = runs
        .iter()
        .map(|r| AbsorbedRun {
            queries: r.queries,
            rows: &*r.rows,
            position: r.position,
        })
        .collect();
    backend.attend_absorbed(w, &q, &absorbed, out);
}

/// `xs[head] · weights[head]ᵀ` for every head (`n` rows each, `out_width` outputs), as one
/// grouped product: sixteen products of 32 KiB cost about what one of 512 KiB does.
fn per_head<B: Backend + ?Sized>(
    backend: &B,
    weights: &[&B::Matrix],
    xs: &[Vec<f32>],
    n: usize,
    out_width: usize,
) -> Vec<Vec<f32>> {
    let mut outs = vec![vec![0.0; n * out_width]; weights.len()];
    let mut products: Vec<Product<'_, B::Matrix>> = (weights.iter().zip(xs).zip(&mut outs))
        .map(|((&w, x), out)| Product { x, m: n, w, out })
        .collect();
    backend.linear_grouped(&mut products);
    outs
}
