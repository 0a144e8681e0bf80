//! The LM head's logits as each row's sampler needs them: all of them, or only the best few
//! and the log-sum-exp (greedy decoding, top-k sampling, the reported alternatives), which a
//! backend that computes the logits on a device can reduce there; or none, for a prefill chunk
//! that does not end its prompt.

use super::{top_k, Backend};

/// What the sampler of a row needs of its logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wants {
    /// No logits: the row samples nothing (a prefill chunk that does not end its prompt).
    Nothing,
    /// Every logit.
    All,
    /// The `k` best logits and the log-sum-exp of all; a backend may give all instead.
    Best(usize),
}

/// One row's logits, as [`Backend::lm_head`](super::Backend::lm_head) gives them.
#[derive(Debug, Clone, PartialEq)]
pub enum RowLogits {
    Nothing,
    All(Vec<f32>),
    Best(BestLogits),
}

/// A row's best logits, best first (ties to the lower token id), and `ln Σ exp(logit)` over
/// the whole vocabulary.
#[derive(Debug, Clone, PartialEq)]
pub struct BestLogits {
    pub ids: Vec<u32>,
    pub values: Vec<f32>,
    pub log_sum: f32,
}

impl BestLogits {
    /// The best `k` of `logits` and their log-sum-exp, as [`log_sum_exp`] and [`top_k`] give
    /// them: what a backend that reduces on a device computes, for its tests.
    pub fn of(logits: &[f32], k: usize) -> Self {
        let ids = top_k(logits, k);
        Self {
            values: ids.iter().map(|&i| logits[i]).collect(),
            ids: ids.into_iter().map(|i| i as u32).collect(),
            log_sum: log_sum_exp(logits),
        }
    }
}

/// `ln Σ exp(v)` in f32, from the largest value, as transformers' `log_softmax` computes it.
pub fn log_sum_exp(values: &[f32]) -> f32 {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = values.iter().map(|v| (v - max).exp()).sum();
    sum.ln() + max
}

/// [`Backend::lm_head`](super::Backend::lm_head) on the host's terms: one product of the rows
/// that want logits, and every logit of each.
pub fn lm_head_by_parts<B: Backend + ?Sized>(
    backend: &B,
    x: &[f32],
    w: &B::Matrix,
    wants: &[Wants],
) -> Vec<RowLogits> {
    let (vocab, hidden) = backend.shape(w);
    let rows: Vec<usize> = (0..wants.len())
        .filter(|&r| wants[r] != Wants::Nothing)
        .collect();
    let mut gathered = Vec::with_capacity(rows.len() * hidden);
    for &r in &rows {
        gathered.extend_from_slice(&x[r * hidden..(r + 1) * hidden]);
    }
    let mut logits = vec![0.0; rows.len() * vocab];
    if !rows.is_empty() {
        backend.linear(&gathered, rows.len(), w, &mut logits);
    }
    let mut out = vec![RowLogits::Nothing; wants.len()];
    for (&r, row) in rows.iter().zip(logits.chunks_exact(vocab.max(1))) {
        out[r] = RowLogits::All(row.to_vec());
    }
    out
}
