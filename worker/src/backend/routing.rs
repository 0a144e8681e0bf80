//! A MoE gate's routing: from the gate's logits to each row's experts and their weights, as
//! transformers' DeepSeek V2 and V3 routers compute them. [`Router::route_row`] is the
//! reference; [`Backend::route`](super::Backend::route) may run it where the logits are, and
//! [`Backend::attention_block_routed`](super::Backend::attention_block_routed) with the
//! attention block before it.

use super::{rms_norm, softmax, top_k, AttentionBlock, Backend, BlockRun, Rotation, ThenRoute};
use crate::config::TopkMethod;

/// One MoE layer's gate: its weight (`[experts, hidden]`) and how it picks experts.
pub struct Router<'a, M> {
    pub weight: &'a M,
    /// V3's `e_score_correction_bias`: moves selection only, never the weights.
    pub correction_bias: Option<&'a [f32]>,
    pub method: TopkMethod,
    pub experts: usize,
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub scaling: f32,
}

/// The routing decision for one row: logical experts and their weights, in top-k order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Route {
    pub experts: Vec<usize>,
    pub weights: Vec<f32>,
}

impl<'a, M> Router<'a, M> {
    /// The same router with `weight` for its weight (the same matrix as another backend holds
    /// it).
    pub fn with_weight<N>(&self, weight: &'a N) -> Router<'a, N> {
        Router {
            weight,
            correction_bias: self.correction_bias,
            method: self.method,
            experts: self.experts,
            top_k: self.top_k,
            n_group: self.n_group,
            topk_group: self.topk_group,
            norm_topk_prob: self.norm_topk_prob,
            scaling: self.scaling,
        }
    }

    /// The route of one row of logits (`experts` of them).
    pub fn route_row(&self, logits: &[f32]) -> Route {
        let per_group = self.experts / self.n_group;
        match self.method {
            TopkMethod::NoauxTc => {
                let scores: Vec<f32> = logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect();
                let bias = self.correction_bias.unwrap_or(&[]);
                let mut choice: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
                let group_scores: Vec<f32> = choice
                    .chunks_exact(per_group)
                    .map(|g| top_k(g, 2.min(g.len())).iter().map(|&i| g[i]).sum())
                    .collect();
                mask_groups(
                    &mut choice,
                    &group_scores,
                    self.topk_group,
                    per_group,
                    f32::NEG_INFINITY,
                );
                let experts = top_k(&choice, self.top_k);
                let mut weights: Vec<f32> = experts.iter().map(|&e| scores[e]).collect();
                if self.norm_topk_prob {
                    let sum = weights.iter().sum::<f32>() + 1e-20;
                    weights.iter_mut().for_each(|w| *w /= sum);
                }
                weights.iter_mut().for_each(|w| *w *= self.scaling);
                Route { experts, weights }
            }
            TopkMethod::Greedy | TopkMethod::GroupLimitedGreedy => {
                let mut scores = logits.to_vec();
                softmax(&mut scores);
                if self.method == TopkMethod::GroupLimitedGreedy {
                    let group_scores: Vec<f32> = scores
                        .chunks_exact(per_group)
                        .map(|g| g.iter().copied().fold(f32::NEG_INFINITY, f32::max))
                        .collect();
                    mask_groups(&mut scores, &group_scores, self.topk_group, per_group, 0.0);
                }
                let experts = top_k(&scores, self.top_k);
                // transformers' V2 router always scales and never renormalises.
                let weights = experts.iter().map(|&e| scores[e] * self.scaling).collect();
                Route { experts, weights }
            }
        }
    }
}

/// [`Backend::route`](super::Backend::route) on the host: the gate's product, then each block
/// of rows routed as a parallel task.
pub fn route_by_parts<B: Backend + ?Sized>(
    backend: &B,
    router: &Router<'_, B::Matrix>,
    x: &[f32],
    n: usize,
) -> Vec<Route> {
    const ROWS_PER_TASK: usize = 64;
    let mut logits = vec![0.0; n * router.experts];
    backend.linear(x, n, router.weight, &mut logits);
    let block = ROWS_PER_TASK * router.experts;
    backend
        .map_tasks(logits.len().div_ceil(block), |t| {
            let end = ((t + 1) * block).min(logits.len());
            logits[t * block..end]
                .chunks_exact(router.experts)
                .map(|l| router.route_row(l))
                .collect::<Vec<_>>()
        })
        .into_iter()
        .flatten()
        .collect()
}

/// [`Backend::attention_block_routed`](super::Backend::attention_block_routed) by its parts:
/// the attention block, the residual's sum and norm on the host, then
/// [`Backend::route`](super::Backend::route): the model's own order, so the result does not
/// change.
#[allow(clippy::too_many_arguments)]
pub fn block_then_route_by_parts<B: Backend + ?Sized>(
    backend: &B,
    block: &AttentionBlock<'_, B::Matrix>,
    x: &[f32],
    rotation: &Rotation,
    runs: &mut [BlockRun<'_, B::Rows>],
    then: &ThenRoute<'_, B::Matrix>,
    residual: &mut [f32],
    normed: &mut [f32],
) -> Vec<Route> {
    let n: usize = runs.iter().map(|r| r.queries).sum();
    // `normed` holds the block's output until it holds the normalised residual.
    backend.attention_block(block, x, rotation, runs, normed);
    for (r, o) in residual.iter_mut().zip(normed.iter()) {
        *r += o;
    }
    normed.copy_from_slice(residual);
    rms_norm(normed, then.norm, then.eps);
    backend.route(&then.router, normed, n)
}

/// Keeps the `keep` best groups of `scores` and sets every other entry to `fill`.
fn mask_groups(scores: &mut [f32], group_scores: &[f32], keep: usize, per_group: usize, fill: f32) {
    let kept = top_k(group_scores, keep);
    for (g, chunk) in scores.chunks_exact_mut(per_group).enumerate() {
        if !kept.contains(&g) {
            chunk.fill(fill);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_breaks_ties_towards_the_lower_index() {
        assert_eq!(top_k(&[0.5, 0.9, 0.5, 0.1], 3), vec![1, 0, 2]);
    }

    #[test]
    fn masked_groups_are_filled() {
        let mut s = vec![1.0, 2.0, 5.0, 0.0, 3.0, 3.0];
        mask_groups(&mut s, &[2.0, 5.0, 3.0], 2, 2, -1.0);
        assert_eq!(s, vec![-1.0, -1.0, 5.0, 0.0, 3.0, 3.0]);
    }
}
