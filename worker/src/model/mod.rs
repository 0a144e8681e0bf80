//! The DeepSeek-V3/V2 model on one rank.
//!
//! - [`linear`]: linear layers, the gated MLP, the checkpoint loader;
//! - [`rope`]: rotary embeddings (default and YaRN);
//! - [`attention`]: MLA over the compressed per-sequence cache;
//! - [`moe`]: the gate, routed experts and the expert-parallel exchange;
//! - [`load`]: the tokens routed to each expert, counted for the balancer;
//! - [`exchange`]: the wire format of that exchange, written once and read in place.
//!
//! The weights are split the way ranks share them: [`SharedWeights`] (embeddings, attention,
//! dense MLPs, gates, shared experts, LM head) are the same on every rank and can be shared
//! between the ranks of one process; [`RankExperts`] are this rank's slots only.

pub mod attention;
pub mod exchange;
pub mod linear;
pub mod load;
pub mod moe;
pub mod rope;

use std::sync::Arc;

use moebius_coordinator::Placement;

use crate::backend::{rms_norm, Backend, RowLogits, ThenRoute, Wants};
use crate::checkpoint::Checkpoint;
use crate::comm::Communicator;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::metrics::WorkerMetrics;
use attention::{Attention, Segment};
use linear::{Linear, Loader, Mlp};
pub use load::{ExpertLoad, LoadWindow};
use moe::{Gate, MoeLayer};
use rope::RotaryEmbedding;

/// The feed-forward part of a layer, without the routed experts.
enum FeedForward<B: Backend> {
    Dense(Mlp<B>),
    Moe {
        gate: Gate<B>,
        shared: Option<Mlp<B>>,
    },
}

struct Layer<B: Backend> {
    input_norm: Vec<f32>,
    post_attention_norm: Vec<f32>,
    attention: Attention<B>,
    ffn: FeedForward<B>,
}

/// The weights every rank holds.
pub struct SharedWeights<B: Backend> {
    pub config: ModelConfig,
    pub backend: Arc<B>,
    embed: Vec<f32>,
    layers: Vec<Layer<B>>,
    norm: Vec<f32>,
    lm_head: Linear<B>,
    rope: RotaryEmbedding,
}

impl<B: Backend> SharedWeights<B> {
    /// Reads every replicated tensor from `checkpoint`.
    pub fn load(checkpoint: &Checkpoint, config: &ModelConfig, backend: Arc<B>) -> Result<Self> {
        let loader = Loader {
            checkpoint,
            backend: &*backend,
        };
        let (hidden, vocab) = (config.hidden_size, config.vocab_size);
        let embed = loader.host_matrix("model.embed_tokens.weight", vocab, hidden)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let ffn = if config.is_moe_layer(l) {
                let shared = (config.n_shared_experts > 0)
                    .then(|| {
                        let width = config.moe_intermediate_size * config.n_shared_experts;
                        Mlp::load(
                            &loader,
                            &format!("{p}.mlp.shared_experts"),
                            hidden,
                            width,
                            config.mlp_bias,
                        )
                    })
                    .transpose()?;
                FeedForward::Moe {
                    gate: Gate::load(&loader, &format!("{p}.mlp"), config)?,
                    shared,
                }
            } else {
                FeedForward::Dense(Mlp::load(
                    &loader,
                    &format!("{p}.mlp"),
                    hidden,
                    config.intermediate_size,
                    config.mlp_bias,
                )?)
            };
            layers.push(Layer {
                input_norm: loader.vector(&format!("{p}.input_layernorm.weight"), hidden)?,
                post_attention_norm: loader
                    .vector(&format!("{p}.post_attention_layernorm.weight"), hidden)?,
                attention: Attention::load(&loader, &format!("{p}.self_attn"), config)?,
                ffn,
            });
        }
        let lm_head = if config.tie_word_embeddings && !checkpoint.contains("lm_head.weight") {
            Linear {
                weight: backend.matrix(vocab, hidden, embed.clone()),
                bias: None,
                out_features: vocab,
            }
        } else {
            loader.linear(&[("lm_head", vocab)], hidden, false)?
        };
        Ok(Self {
            config: config.clone(),
            norm: loader.vector("model.norm.weight", hidden)?,
            rope: RotaryEmbedding::new(config),
            embed,
            layers,
            lm_head,
            backend,
        })
    }

    /// Bytes of the replicated weights.
    pub fn bytes(&self) -> usize {
        let b = &*self.backend;
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let ffn = match &l.ffn {
                    FeedForward::Dense(m) => m.bytes(b),
                    FeedForward::Moe { gate, shared } => {
                        gate.bytes(b) + shared.as_ref().map_or(0, |s| s.bytes(b))
                    }
                };
                (l.input_norm.len() + l.post_attention_norm.len()) * 4 + l.attention.bytes(b) + ffn
            })
            .sum();
        self.embed.len() * 4 + layers + self.norm.len() * 4 + self.lm_head.bytes(b)
    }

    /// Bytes of the replicated weights that a decode step of one row reads: all but the
    /// embedding table (one row of it) and what only prefill reads.
    pub fn decode_bytes(&self) -> usize {
        let b = &*self.backend;
        let prefill_only: usize = self
            .layers
            .iter()
            .map(|l| l.attention.bytes(b) - l.attention.decode_bytes(b))
            .sum();
        self.bytes() - self.embed.len() * 4 + self.config.hidden_size * 4 - prefill_only
    }
}

/// One rank's routed experts: for every layer, one MLP per physical slot with the logical
/// expert it holds. The MLPs are shared (`Arc`), so that the experts of a new epoch that this
/// rank already holds are taken over instead of read again.
pub struct RankExperts<B: Backend> {
    /// `layers[l]` is empty for dense layers.
    layers: Vec<Vec<(usize, Arc<Mlp<B>>)>>,
}

// Cloning shares the MLPs; the backend itself need not be `Clone`.
impl<B: Backend> Clone for RankExperts<B> {
    fn clone(&self) -> Self {
        Self {
            layers: self.layers.clone(),
        }
    }
}

/// How a rank's experts were obtained for an epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpertReload {
    /// Slots read from the checkpoint.
    pub loaded: usize,
    /// Slots whose weights were in memory already: kept from the previous epoch of this rank,
    /// or a second slot of the same expert.
    pub reused: usize,
}

impl<B: Backend> RankExperts<B> {
    /// Reads the experts of `rank` in `placement` for every MoE layer, taking over the ones
    /// `previous` already holds.
    pub fn load(
        checkpoint: &Checkpoint,
        config: &ModelConfig,
        backend: &B,
        placement: &Placement,
        rank: usize,
        previous: Option<&RankExperts<B>>,
    ) -> Result<(Self, ExpertReload)> {
        let loader = Loader {
            checkpoint,
            backend,
        };
        let mut reload = ExpertReload::default();
        let mut moe = 0;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            if !config.is_moe_layer(l) {
                layers.push(Vec::new());
                continue;
            }
            let held = previous.and_then(|p| p.layers.get(l));
            let mut slots: Vec<(usize, Arc<Mlp<B>>)> = Vec::new();
            for &e in placement.slots(moe, rank) {
                let in_memory = slots
                    .iter()
                    .chain(held.into_iter().flatten())
                    .find(|(x, _)| *x == e);
                if let Some((_, mlp)) = in_memory {
                    reload.reused += 1;
                    let mlp = mlp.clone();
                    slots.push((e, mlp));
                    continue;
                }
                let prefix = format!("model.layers.{l}.mlp.experts.{e}");
                let mlp = Mlp::load(
                    &loader,
                    &prefix,
                    config.hidden_size,
                    config.moe_intermediate_size,
                    config.mlp_bias,
                )?;
                reload.loaded += 1;
                slots.push((e, Arc::new(mlp)));
            }
            layers.push(slots);
            moe += 1;
        }
        Ok((Self { layers }, reload))
    }

    /// Bytes of this rank's expert weights.
    pub fn bytes(&self, backend: &B) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(_, m)| m.bytes(backend))
            .sum()
    }

    /// The logical expert of each slot, for every MoE layer.
    pub fn slots(&self) -> Vec<Vec<usize>> {
        self.layers
            .iter()
            .filter(|l| !l.is_empty())
            .map(|l| l.iter().map(|(e, _)| *e).collect())
            .collect()
    }

    /// Whether slot `slot` of layer `layer` shares its weights with `other`'s (a test of
    /// reuse).
    pub fn shares_slot(&self, other: &Self, layer: usize, slot: usize) -> bool {
        match (
            self.layers.get(layer).and_then(|l| l.get(slot)),
            other.layers.get(layer).and_then(|l| l.get(slot)),
        ) {
            (Some((_, a)), Some((_, b))) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// A sequence's compressed KV cache: per layer, `[len, kv_lora_rank + qk_rope_head_dim]`.
///
/// A step appends its rows layer by layer and commits them (`len`) only when the whole forward
/// pass succeeded; [`rollback`](Self::rollback) drops what a failed step appended.
pub struct KvCache<B: Backend> {
    /// Each layer's rows, where the backend keeps them.
    layers: Vec<B::Rows>,
    len: usize,
    backend: Arc<B>,
}

impl<B: Backend> KvCache<B> {
    /// Drops the rows of a step that did not complete, so that the step can be redone.
    pub fn rollback(&mut self) {
        for layer in &mut self.layers {
            self.backend.truncate_rows(layer, self.len);
        }
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| self.backend.rows_bytes(l)).sum()
    }
}

/// One sequence's part of a step: its new tokens, its cache, and what its sampler needs of
/// the logits of its last token.
pub struct StepInput<'a, B: Backend> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache<B>,
    pub wants: Wants,
}

/// The model as one rank of an EP group runs it.
pub struct Model<B: Backend> {
    pub shared: Arc<SharedWeights<B>>,
    pub experts: RankExperts<B>,
    /// For every layer (empty for dense ones), each logical expert's `(rank, slot)` replicas.
    replicas: Vec<Vec<Vec<(usize, usize)>>>,
    /// For every layer, its index among the MoE layers.
    moe_index: Vec<Option<usize>>,
    /// Where the tokens routed by this rank's own sequences are counted.
    load: Arc<ExpertLoad>,
    /// Where the MoE exchange is timed and its bytes counted, if anywhere.
    metrics: Option<WorkerMetrics>,
    rank: usize,
}

/// What [`Model::build`] takes besides the shared weights and the checkpoint.
pub struct RankSpec<'a, B: Backend> {
    pub placement: &'a Placement,
    pub rank: usize,
    /// The experts this rank held in the previous epoch, to take over where they stay.
    pub previous: Option<&'a RankExperts<B>>,
    /// Load counters that outlive the epoch; fresh ones when `None`.
    pub load: Option<Arc<ExpertLoad>>,
    /// Where the MoE exchange is measured, if anywhere.
    pub metrics: Option<WorkerMetrics>,
}

impl<B: Backend> Model<B> {
    /// Builds rank `rank` of `placement` on top of the shared weights, loading its experts.
    pub fn new(
        shared: Arc<SharedWeights<B>>,
        checkpoint: &Checkpoint,
        placement: &Placement,
        rank: usize,
    ) -> Result<Self> {
        let spec = RankSpec {
            placement,
            rank,
            previous: None,
            load: None,
            metrics: None,
        };
        Ok(Self::build(shared, checkpoint, spec)?.0)
    }

    /// Builds a rank as [`new`](Self::new) does, taking over the experts `spec.previous`
    /// holds, and says how many were read and how many taken over.
    pub fn build(
        shared: Arc<SharedWeights<B>>,
        checkpoint: &Checkpoint,
        spec: RankSpec<B>,
    ) -> Result<(Self, ExpertReload)> {
        let RankSpec {
            placement,
            rank,
            previous,
            load,
            metrics,
        } = spec;
        let config = &shared.config;
        let moe_layers = config.moe_layer_count();
        placement.validate_for(moe_layers)?;
        if placement.num_experts != config.n_routed_experts {
            return Err(Error::Config(format!(
                "the placement is for {} experts, the model has {}",
                placement.num_experts, config.n_routed_experts
            )));
        }
        if rank >= placement.num_ranks() {
            return Err(Error::Config(format!(
                "rank {rank} is not in a placement of {} ranks",
                placement.num_ranks()
            )));
        }
        let load = match load {
            Some(l) if l.layers() == moe_layers && l.experts() == config.n_routed_experts => l,
            Some(_) => {
                return Err(Error::Config(
                    "the load counters were made for another model".into(),
                ))
            }
            None => Arc::new(ExpertLoad::new(moe_layers, config.n_routed_experts)),
        };
        let (experts, reload) = RankExperts::load(
            checkpoint,
            config,
            &*shared.backend,
            placement,
            rank,
            previous,
        )?;
        let mut moe_index = Vec::with_capacity(config.num_hidden_layers);
        let mut replicas = Vec::with_capacity(config.num_hidden_layers);
        let mut next = 0;
        for l in 0..config.num_hidden_layers {
            if config.is_moe_layer(l) {
                moe_index.push(Some(next));
                replicas.push(placement.replicas(next));
                next += 1;
            } else {
                moe_index.push(None);
                replicas.push(Vec::new());
            }
        }
        let model = Self {
            replicas,
            moe_index,
            load,
            metrics,
            rank,
            shared,
            experts,
        };
        Ok((model, reload))
    }

    /// The counters of the tokens this rank's sequences route to each expert.
    pub fn load(&self) -> &Arc<ExpertLoad> {
        &self.load
    }

    pub fn config(&self) -> &ModelConfig {
        &self.shared.config
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Bytes one cached token takes over all layers.
    pub fn kv_bytes_per_token(&self) -> usize {
        let cfg = &self.shared.config;
        self.shared.layers.len()
            * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
            * std::mem::size_of::<f32>()
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> &B {
        &self.shared.backend
    }

    /// A new, empty cache for a sequence.
    pub fn new_cache(&self) -> KvCache<B> {
        let cfg = &self.shared.config;
        let backend = self.shared.backend.clone();
        let width = cfg.kv_lora_rank + cfg.qk_rope_head_dim;
        KvCache {
            layers: (0..self.shared.layers.len())
                .map(|_| backend.new_rows(width))
                .collect(),
            len: 0,
            backend,
        }
    }

    /// Runs one step over all `inputs` (each sequence's new tokens appended to its cache) and
    /// returns the logits of each input's last token, as much of them as the input wants
    /// ([`Backend::lm_head`]). Every rank of the group calls this once per step, with no inputs
    /// when it has none.
    pub fn forward(
        &self,
        inputs: &mut [StepInput<B>],
        comm: &mut dyn Communicator,
    ) -> Result<Vec<RowLogits>> {
        let w = &*self.shared;
        let b = &*w.backend;
        let cfg = &w.config;
        let hidden = cfg.hidden_size;
        let n: usize = inputs.iter().map(|i| i.tokens.len()).sum();
        for input in inputs.iter() {
            if input.cache.layers.len() != w.layers.len() {
                return Err(Error::InvalidRequest(
                    "the cache was made for another model".into(),
                ));
            }
            if let Some(&bad) = input.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(Error::InvalidRequest(format!(
                    "token id {bad} is outside the vocabulary (size {})",
                    cfg.vocab_size
                )));
            }
            if input.cache.len + input.tokens.len() > cfg.max_position_embeddings {
                return Err(Error::InvalidRequest(format!(
                    "{} positions exceed the model's maximum of {}",
                    input.cache.len + input.tokens.len(),
                    cfg.max_position_embeddings
                )));
            }
        }

        let mut x = Vec::with_capacity(n * hidden);
        for input in inputs.iter() {
            for &t in input.tokens {
                x.extend_from_slice(&w.embed[t as usize * hidden..(t as usize + 1) * hidden]);
            }
        }
        let mut normed = vec![0.0; n * hidden];
        let mut out = vec![0.0; n * hidden];
        // Every layer rotates the same positions: their angles once per step.
        let positions: Vec<usize> = (inputs.iter())
            .flat_map(|input| input.cache.len..input.cache.len + input.tokens.len())
            .collect();
        let rotation = w.rope.rotation(&positions);
        for (l, layer) in w.layers.iter().enumerate() {
            normed.copy_from_slice(&x);
            rms_norm(&mut normed, &layer.input_norm, cfg.rms_norm_eps);
            let mut row = 0;
            let mut segments: Vec<Segment<B::Rows>> = inputs
                .iter_mut()
                .map(|input| {
                    let seg = Segment {
                        row,
                        len: input.tokens.len(),
                        position: input.cache.len,
                        cache: &mut input.cache.layers[l],
                    };
                    row += input.tokens.len();
                    seg
                })
                .collect();
            // A MoE layer's gate may route with the attention block, in one call to the backend;
            // either way `out` ends up holding the post-attention norm of the residual.
            let routes = match &layer.ffn {
                FeedForward::Moe { gate, .. } => {
                    let then = ThenRoute {
                        norm: &layer.post_attention_norm,
                        eps: cfg.rms_norm_eps,
                        router: gate.router(),
                    };
                    let attention = &layer.attention;
                    attention.forward_then_route(
                        b,
                        &rotation,
                        &normed,
                        &mut segments,
                        &then,
                        &mut x,
                        &mut out,
                    )
                }
                FeedForward::Dense(_) => None,
            };
            if routes.is_none() {
                layer
                    .attention
                    .forward(b, &rotation, &normed, n, &mut segments, &mut out);
                add_into(&mut x, &out);
                out.copy_from_slice(&x);
                rms_norm(&mut out, &layer.post_attention_norm, cfg.rms_norm_eps);
            }
            match &layer.ffn {
                FeedForward::Dense(mlp) => {
                    mlp.forward(b, &out, n, &mut normed);
                    add_into(&mut x, &normed);
                }
                FeedForward::Moe { gate, shared } => {
                    let moe = MoeLayer {
                        gate,
                        shared: shared.as_ref(),
                        slots: &self.experts.layers[l],
                        load: self.moe_index[l].map(|m| (&*self.load, m)),
                        metrics: self.metrics.as_ref(),
                    };
                    moe.forward(b, comm, &self.replicas[l], &out, n, &mut x, routes)?;
                }
            }
        }
        for input in inputs.iter_mut() {
            input.cache.len += input.tokens.len();
        }

        // Logits of each input's last row.
        let mut last = Vec::with_capacity(inputs.len() * hidden);
        let mut end = 0;
        for input in inputs.iter() {
            end += input.tokens.len();
            if end > 0 && !input.tokens.is_empty() {
                last.extend_from_slice(&x[(end - 1) * hidden..end * hidden]);
            } else {
                return Err(Error::InvalidRequest("a step input has no tokens".into()));
            }
        }
        rms_norm(&mut last, &w.norm, cfg.rms_norm_eps);
        // The LM head has no bias (it loads without one, or is the embedding).
        let wants: Vec<Wants> = inputs.iter().map(|input| input.wants).collect();
        Ok(b.lm_head(&last, &w.lm_head.weight, &wants))
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
