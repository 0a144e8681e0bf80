//! The MoE block: the gate, this rank's routed experts, and the expert-parallel exchange.
//!
//! Every rank runs [`MoeLayer::forward`] in lock-step, also with zero rows. Rows travel to the
//! ranks holding their experts (dispatch), each rank runs its experts on what it received, the
//! outputs travel back (combine), and the source rank sums them in top-k order, so the result
//! does not depend on the placement or the number of ranks beyond float rounding.

use std::borrow::Cow;
use std::sync::Arc;

use crate::backend::{Backend, Route, Router};
use crate::comm::Communicator;
use crate::config::{ModelConfig, TopkMethod};
use crate::error::{Error, Result};
use crate::metrics::{ExchangeMetrics, WorkerMetrics};
use crate::model::exchange::{self, Dispatch};
use crate::model::linear::{Linear, Loader, Mlp};
use crate::model::load::ExpertLoad;

/// The gate of one MoE layer (replicated on every rank).
pub struct Gate<B: Backend> {
    weight: Linear<B>,
    /// V3's `e_score_correction_bias`: moves selection only, never the weights.
    correction_bias: Option<Vec<f32>>,
    method: TopkMethod,
    hidden: usize,
    experts: usize,
    top_k: usize,
    n_group: usize,
    topk_group: usize,
    norm_topk_prob: bool,
    scaling: f32,
}

impl<B: Backend> Gate<B> {
    pub fn load(loader: &Loader<B>, prefix: &str, config: &ModelConfig) -> Result<Self> {
        let e = config.n_routed_experts;
        let weight = loader.linear(&[(&format!("{prefix}.gate"), e)], config.hidden_size, false)?;
        let correction_bias = match config.topk_method {
            TopkMethod::NoauxTc => {
                Some(loader.vector(&format!("{prefix}.gate.e_score_correction_bias"), e)?)
            }
            _ => None,
        };
        Ok(Self {
            weight,
            correction_bias,
            method: config.topk_method,
            hidden: config.hidden_size,
            experts: e,
            top_k: config.num_experts_per_tok,
            n_group: config.n_group,
            topk_group: config.topk_group,
            norm_topk_prob: config.norm_topk_prob,
            scaling: config.routed_scaling_factor,
        })
    }

    pub fn bytes(&self, backend: &B) -> usize {
        self.weight.bytes(backend) + self.correction_bias.as_ref().map_or(0, |b| b.len() * 4)
    }

    /// The gate as the backend routes with it.
    pub fn router(&self) -> Router<'_, B::Matrix> {
        Router {
            weight: &self.weight.weight,
            correction_bias: self.correction_bias.as_deref(),
            method: self.method,
            experts: self.experts,
            top_k: self.top_k,
            n_group: self.n_group,
            topk_group: self.topk_group,
            norm_topk_prob: self.norm_topk_prob,
            scaling: self.scaling,
        }
    }
}

/// One MoE layer on one rank: the replicated gate and shared experts, and this rank's slots.
pub struct MoeLayer<'a, B: Backend> {
    pub gate: &'a Gate<B>,
    pub shared: Option<&'a Mlp<B>>,
    /// This rank's routed experts, one per physical slot, with the logical expert each holds.
    pub slots: &'a [(usize, Arc<Mlp<B>>)],
    /// Where to count the tokens routed to each logical expert, and this layer's index among
    /// the MoE layers.
    pub load: Option<(&'a ExpertLoad, usize)>,
    /// Where the exchange is timed and its bytes counted, if anywhere.
    pub metrics: Option<&'a WorkerMetrics>,
}

/// Where each logical expert lives: `(rank, slot)` replicas, from the placement.
pub type Replicas = [Vec<(usize, usize)>];

impl<B: Backend> MoeLayer<'_, B> {
    /// One all-to-all, measured in `which` of the metrics: the bytes this rank sends to
    /// others and the time until everything arrived.
    fn exchange(
        &self,
        comm: &mut dyn Communicator,
        send: Vec<Vec<u8>>,
        which: impl Fn(&WorkerMetrics) -> &ExchangeMetrics,
    ) -> Result<Vec<Vec<u8>>> {
        let Some(metrics) = self.metrics else {
            return comm.all_to_all_v(send);
        };
        let me = comm.rank();
        let bytes: usize = send
            .iter()
            .enumerate()
            .filter(|&(r, _)| r != me)
            .map(|(_, m)| m.len())
            .sum();
        let started = std::time::Instant::now();
        let received = comm.all_to_all_v(send)?;
        let meter = which(metrics);
        meter.seconds.observe(started.elapsed().as_secs_f64());
        meter.bytes.inc_by(bytes as u64);
        Ok(received)
    }

    /// Runs the MoE block on `n` rows of `x` (normalised hidden states) and adds its output to
    /// `residual`; `routes` are the gate's of `x` where the backend gave them already
    /// ([`Backend::attention_block_routed`]), else the gate routes here.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        backend: &B,
        comm: &mut dyn Communicator,
        replicas: &Replicas,
        x: &[f32],
        n: usize,
        residual: &mut [f32],
        routes: Option<Vec<Route>>,
    ) -> Result<()> {
        let hidden = self.gate.hidden;
        let world = comm.world_size();
        let routes = routes.unwrap_or_else(|| backend.route(&self.gate.router(), x, n));
        if let Some((load, layer)) = self.load {
            let mut tokens = vec![0u32; self.gate.experts];
            for &e in routes.iter().flat_map(|r| &r.experts) {
                tokens[e] += 1;
            }
            load.add(layer, &tokens);
        }

        // Dispatch: per destination rank, the (slot, row) pairs it must compute.
        let mut outgoing: Vec<Vec<(u32, usize)>> = vec![Vec::new(); world];
        // For each (row, k): (destination rank, entry index there).
        let mut sent_to = Vec::with_capacity(n * self.gate.top_k);
        for (row, route) in routes.iter().enumerate() {
            for (k, &expert) in route.experts.iter().enumerate() {
                let copies = &replicas[expert];
                let (rank, slot) = copies[(row + k) % copies.len()];
                sent_to.push((rank, outgoing[rank].len()));
                outgoing[rank].push((slot as u32, row));
            }
        }
        let messages = outgoing
            .iter()
            .map(|entries| exchange::encode_dispatch(entries, x, hidden))
            .collect();
        let received = self.exchange(comm, messages, |m| &m.dispatch)?;

        // Compute: group every received row by slot, run each expert once.
        let incoming: Vec<Dispatch> = received
            .iter()
            .enumerate()
            .map(|(src, bytes)| Dispatch::decode(bytes, hidden, src))
            .collect::<Result<_>>()?;
        let mut by_slot: Vec<Vec<(usize, usize)>> = vec![Vec::new(); self.slots.len()];
        for (src, m) in incoming.iter().enumerate() {
            for (i, &slot) in m.slots.iter().enumerate() {
                let members = by_slot.get_mut(slot as usize).ok_or_else(|| {
                    Error::Comm(format!(
                        "rank {src} sent a row for slot {slot}, but this rank holds {} slots; are the ranks on different placements?",
                        self.slots.len()
                    ))
                })?;
                members.push((src, i));
            }
        }
        // This rank's experts and the shared experts, as one group (see Backend::mlp_grouped).
        let active: Vec<usize> = (0..self.slots.len())
            .filter(|&s| !by_slot[s].is_empty())
            .collect();
        let inputs: Vec<Vec<f32>> = active
            .iter()
            .map(|&s| {
                let mut rows = Vec::with_capacity(by_slot[s].len() * hidden);
                for &(src, i) in &by_slot[s] {
                    rows.extend_from_slice(incoming[src].row(i));
                }
                rows
            })
            .collect();
        let mut runs: Vec<(&Mlp<B>, &[f32], usize)> = active
            .iter()
            .zip(&inputs)
            .map(|(&s, rows)| (&*self.slots[s].1, &rows[..], by_slot[s].len()))
            .collect();
        if let Some(shared) = self.shared {
            runs.push((shared, x, n));
        }
        let mut outputs = Mlp::forward_grouped(backend, &runs);
        let shared_out = match self.shared {
            Some(_) => outputs.pop(),
            None => None,
        };
        let mut replies: Vec<Vec<u8>> = incoming
            .iter()
            .map(|m| exchange::reply_buffer(m.slots.len(), hidden))
            .collect();
        for (&slot, out) in active.iter().zip(&outputs) {
            for (&(src, i), o) in by_slot[slot].iter().zip(out.chunks_exact(hidden)) {
                exchange::put_row(&mut replies[src], i, o);
            }
        }
        drop(incoming);
        drop(received);

        // Combine: outputs travel back; sum them in top-k order.
        let returned = self.exchange(comm, replies, |m| &m.combine)?;
        let returned: Vec<Cow<[f32]>> = returned.iter().map(|b| exchange::f32_view(b)).collect();
        let mut routed = vec![0.0f32; hidden];
        for (row, route) in routes.iter().enumerate() {
            routed.fill(0.0);
            for (k, &w) in route.weights.iter().enumerate() {
                let (rank, entry) = sent_to[row * route.weights.len() + k];
                let out = returned[rank]
                    .get(entry * hidden..(entry + 1) * hidden)
                    .ok_or_else(|| {
                        Error::Comm(format!("rank {rank} returned too few expert outputs"))
                    })?;
                for (acc, o) in routed.iter_mut().zip(out) {
                    *acc += w * o;
                }
            }
            let res = &mut residual[row * hidden..(row + 1) * hidden];
            for (r, v) in res.iter_mut().zip(&routed) {
                *r += v;
            }
        }
        if let Some(out) = shared_out {
            // transformers adds the shared experts to the routed sum before the residual.
            for (r, v) in residual.iter_mut().zip(&out) {
                *r += v;
            }
        }
        Ok(())
    }
}
