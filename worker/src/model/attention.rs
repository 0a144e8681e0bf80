//! Multi-head latent attention (MLA) over a compressed KV cache.
//!
//! The cache keeps, per position, what MLA needs and nothing more: the normalised latent
//! `c` (`kv_lora_rank` values) and the rotated shared key `k_pe` (`qk_rope_head_dim` values).
//! Each sequence of a step attends in whichever of MLA's two forms costs less for it, as
//! DeepSeek's and vLLM's inference do:
//!
//! - absorbed (decode, short chunks after a long prefix): `kv_b_proj` is folded into the query
//!   and the output, `q_nope·(W_UK c) = (W_UKᵀ q_nope)·c` and `Σ p·(W_UV c) = W_UV (Σ p·c)`, so a
//!   step costs its own tokens' projections plus one pass over the latents, never a
//!   re-expansion of the prefix; but the scores run over `kv_lora_rank + qk_rope_head_dim`
//!   values per head;
//! - expanded (prefill): the cached latents are expanded once into per-head keys and values,
//!   and every query attends over `qk_head_dim` values per head, a third as many.

use crate::backend::attend::{causal_softmax, QUERY_BLOCK};
use crate::backend::{
    add_bias, rms_norm, Absorbed, AbsorbedRun, AttentionBlock, Backend, BlockRun, Rotation, Route,
    ThenRoute, View,
};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::linear::{Linear, Loader, Weight};

/// One layer's attention weights.
pub struct Attention<B: Backend> {
    input: InputProjection<B>,
    /// Outputs of q's first projection: `q_lora_rank`, or every head's query.
    q_width: usize,
    /// q's low-rank second half (`q_a_layernorm`, `q_b_proj`); `None` when `q_proj` is direct.
    q_b: Option<(Vec<f32>, Linear<B>)>,
    kv_a_norm: Vec<f32>,
    /// `kv_b_proj` (per head, `nope` rows of `W_UK` then `v` rows of `W_UV`), for expanded
    /// attention.
    kv_b: Linear<B>,
    /// The same weights per head for absorbed attention: `W_UKᵀ` (`[lora, nope]`) and `W_UV`
    /// (`[v, lora]`), each a linear layer of its own, so that decode reads them in the
    /// checkpoint's precision through the backend's products.
    uk_t: Vec<B::Matrix>,
    uv: Vec<B::Matrix>,
    o_proj: Linear<B>,
    heads: usize,
    nope: usize,
    rope: usize,
    v: usize,
    lora: usize,
    eps: f32,
    scale: f32,
}

/// The products that read the hidden state: q's first (`q_proj` or `q_a_proj`) and
/// `kv_a_proj_with_mqa`. They are one product where their biases agree: a decode step is bound
/// by reading weights, and every product it splits over the cores costs a fork and a join.
enum InputProjection<B: Backend> {
    /// q's rows, then kv_a's.
    Stacked(Linear<B>),
    Apart {
        q: Linear<B>,
        kv_a: Linear<B>,
    },
}

/// The rows of one sequence in a batch: where they are, where they start, and its cache (`R`:
/// the backend's [`Backend::Rows`]).
pub struct Segment<'a, R> {
    /// First row of the sequence in the batch.
    pub row: usize,
    /// Number of new tokens.
    pub len: usize,
    /// Position of the first new token (= the cache's length before this step).
    pub position: usize,
    /// This layer's cache rows `[position, kv_lora_rank + qk_rope_head_dim]`, grown in place.
    pub cache: &'a mut R,
}

impl<B: Backend> Attention<B> {
    pub fn load(loader: &Loader<B>, prefix: &str, config: &ModelConfig) -> Result<Self> {
        let hidden = config.hidden_size;
        let heads = config.num_attention_heads;
        let qk = config.qk_head_dim();
        let bias = config.attention_bias;
        let lora = config.kv_lora_rank;
        let kv_a = (
            format!("{prefix}.kv_a_proj_with_mqa"),
            lora + config.qk_rope_head_dim,
        );
        // transformers gives q_proj no bias, q_a_proj and kv_a_proj_with_mqa `attention_bias`.
        let (q_first, q_bias, q_b) = match config.q_lora_rank {
            None => ((format!("{prefix}.q_proj"), heads * qk), false, None),
            Some(rank) => {
                let norm = loader.vector(&format!("{prefix}.q_a_layernorm.weight"), rank)?;
                let b =
                    loader.linear(&[(&format!("{prefix}.q_b_proj"), heads * qk)], rank, false)?;
                ((format!("{prefix}.q_a_proj"), rank), bias, Some((norm, b)))
            }
        };
        let input = if q_bias == bias {
            InputProjection::Stacked(loader.linear(
                &[(&q_first.0, q_first.1), (&kv_a.0, kv_a.1)],
                hidden,
                bias,
            )?)
        } else {
            InputProjection::Apart {
                q: loader.linear(&[(&q_first.0, q_first.1)], hidden, q_bias)?,
                kv_a: loader.linear(&[(&kv_a.0, kv_a.1)], hidden, bias)?,
            }
        };
        let kv_a_norm = loader.vector(&format!("{prefix}.kv_a_layernorm.weight"), lora)?;
        let (nope, v) = (config.qk_nope_head_dim, config.v_head_dim);
        let kv_b_rows = heads * (nope + v);
        let kv_b = loader.weight(&format!("{prefix}.kv_b_proj.weight"), kv_b_rows, lora)?;
        let b = loader.backend;
        // Every head gathers from the whole weight: an FP8 one is dequantised once for all.
        let dequantised;
        let heads_of = match &kv_b {
            Weight::Fp8(blocks) => {
                dequantised = Weight::F32(blocks.dequantize());
                &dequantised
            }
            stored => stored,
        };
        let uk_t = (0..heads)
            .map(|h| heads_of.gather(b, lora, nope, |r, c| (h * (nope + v) + c) * lora + r))
            .collect();
        let uv = (0..heads)
            .map(|h| heads_of.gather(b, v, lora, |r, c| (h * (nope + v) + nope + r) * lora + c))
            .collect();
        let kv_b = Linear {
            weight: kv_b.matrix(b, kv_b_rows, lora),
            bias: None,
            out_features: kv_b_rows,
        };
        let o_proj = loader.linear(
            &[(&format!("{prefix}.o_proj"), hidden)],
            heads * config.v_head_dim,
            bias,
        )?;
        Ok(Self {
            input,
            q_width: q_first.1,
            q_b,
            kv_a_norm,
            kv_b,
            uk_t,
            uv,
            o_proj,
            heads,
            nope: config.qk_nope_head_dim,
            rope: config.qk_rope_head_dim,
            v: config.v_head_dim,
            lora,
            eps: config.rms_norm_eps,
            scale: config.softmax_scale(),
        })
    }

    /// Width of one cached position.
    pub fn cache_width(&self) -> usize {
        self.lora + self.rope
    }

    /// Bytes of this layer's weights.
    pub fn bytes(&self, backend: &B) -> usize {
        let input = match &self.input {
            InputProjection::Stacked(l) => l.bytes(backend),
            InputProjection::Apart { q, kv_a } => q.bytes(backend) + kv_a.bytes(backend),
        };
        let q_b = self
            .q_b
            .as_ref()
            .map_or(0, |(norm, b)| norm.len() * 4 + b.bytes(backend));
        let absorbed: usize = (self.uk_t.iter().chain(&self.uv))
            .map(|m| backend.matrix_bytes(m))
            .sum();
        input
            + q_b
            + self.kv_a_norm.len() * 4
            + self.kv_b.bytes(backend)
            + absorbed
            + self.o_proj.bytes(backend)
    }

    /// Bytes of the weights a decode step reads: all but `kv_b_proj` whole, which only expanded
    /// attention (prefill) reads.
    pub fn decode_bytes(&self, backend: &B) -> usize {
        self.bytes(backend) - self.kv_b.bytes(backend)
    }

    /// Attention for all rows of `x` (`n` rows, already normalised), sequence by sequence, with
    /// `rotation` a row per batch row; appends the new positions to each segment's cache and
    /// writes `n × hidden` into `out`.
    pub fn forward(
        &self,
        backend: &B,
        rotation: &Rotation,
        x: &[f32],
        n: usize,
        segments: &mut [Segment<B::Rows>],
        out: &mut [f32],
    ) {
        if n == 0 {
            return;
        }
        let (h, qk, width) = (self.heads, self.nope + self.rope, self.cache_width());
        if let Some(block) = self.whole_block(backend, segments) {
            // Every row attends absorbed and nothing has a bias before o_proj: the whole block
            // is one call, which a backend may run in one round trip.
            backend.attention_block(&block, x, rotation, &mut block_runs(segments), out);
            if let Some(bias) = &self.o_proj.bias {
                add_bias(&mut out[..n * self.o_proj.out_features], bias);
            }
            return;
        }

        // Queries [n, h, qk] and the new cache rows [n, lora + rope], then rotated.
        let (mut q, mut kv) = self.project(backend, x, n);
        for (row, q_row) in q.chunks_exact_mut(h * qk).enumerate() {
            for head in q_row.chunks_exact_mut(qk) {
                rotation.apply(row, &mut head[self.nope..]);
            }
        }

        // New cache rows: latent normalised, key rotated.
        for (row, kv_row) in kv.chunks_exact_mut(width).enumerate() {
            let (latent, k_pe) = kv_row.split_at_mut(self.lora);
            rms_norm(latent, &self.kv_a_norm, self.eps);
            rotation.apply(row, k_pe);
        }

        // Each sequence appends its rows to its cache and attends over all of it; [n, h, v].
        for seg in segments.iter_mut() {
            let rows = &kv[seg.row * width..(seg.row + seg.len) * width];
            backend.append_rows(seg.cache, rows);
        }
        let mut attn = vec![0.0; n * h * self.v];
        type Segments<'s, 'a, R> = Vec<&'s Segment<'a, R>>;
        let (expanded, absorbed): (Segments<B::Rows>, Segments<B::Rows>) = segments
            .iter()
            .partition(|seg| backend.expands_attention() && self.expands(seg));
        if expanded.is_empty() {
            // Every row attends absorbed: o_proj goes with the heads' values.
            self.attend_absorbed(backend, &absorbed, &q, Some(&self.o_proj.weight), out);
            if let Some(bias) = &self.o_proj.bias {
                add_bias(&mut out[..n * self.o_proj.out_features], bias);
            }
            return;
        }
        for seg in expanded {
            self.attend_expanded(backend, seg, &q, &mut attn);
        }
        self.attend_absorbed(backend, &absorbed, &q, None, &mut attn);
        self.o_proj.forward(backend, &attn, n, out);
    }

    /// [`Self::forward`] and what follows it in a MoE layer in one call
    /// ([`Backend::attention_block_routed`]): the output added to `residual`, `normed` the
    /// residual through `then`'s norm, and the gate's routes of it. `None`, with nothing done,
    /// where the step cannot take the whole block as one call or `o_proj` has a bias (which
    /// comes before the residual).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_then_route(
        &self,
        backend: &B,
        rotation: &Rotation,
        x: &[f32],
        segments: &mut [Segment<B::Rows>],
        then: &ThenRoute<'_, B::Matrix>,
        residual: &mut [f32],
        normed: &mut [f32],
    ) -> Option<Vec<Route>> {
        if self.o_proj.bias.is_some() || segments.iter().all(|s| s.len == 0) {
            return None;
        }
        let block = self.whole_block(backend, segments)?;
        let mut runs = block_runs(segments);
        Some(backend.attention_block_routed(&block, x, rotation, &mut runs, then, residual, normed))
    }

    /// The weights of the whole block where every row of the step attends absorbed and it has
    /// no bias before `o_proj` ([`Self::block`]).
    fn whole_block<R>(
        &self,
        backend: &B,
        segments: &[Segment<R>],
    ) -> Option<AttentionBlock<'_, B::Matrix>> {
        let expands = backend.expands_attention() && segments.iter().any(|s| self.expands(s));
        if expands {
            None
        } else {
            self.block()
        }
    }

    /// The weights of the whole block ([`Backend::attention_block`]), where its products before
    /// `o_proj` are q's low-rank pair and `kv_a_proj_with_mqa`, stacked and without biases.
    fn block(&self) -> Option<AttentionBlock<'_, B::Matrix>> {
        match (&self.input, &self.q_b) {
            (InputProjection::Stacked(input), Some((q_norm, q_b)))
                if input.bias.is_none() && q_b.bias.is_none() =>
            {
                Some(AttentionBlock {
                    input: &input.weight,
                    q_norm,
                    q_b: &q_b.weight,
                    kv_norm: &self.kv_a_norm,
                    eps: self.eps,
                    attention: self.absorbed(Some(&self.o_proj.weight)),
                })
            }
            _ => None,
        }
    }

    /// The weights of absorbed attention, through `o_proj` where given.
    fn absorbed<'s>(&'s self, o_proj: Option<&'s B::Matrix>) -> Absorbed<'s, B::Matrix> {
        Absorbed {
            uk_t: self.uk_t.iter().collect(),
            uv: self.uv.iter().collect(),
            o_proj,
            nope: self.nope,
            rope: self.rope,
            lora: self.lora,
            v: self.v,
            scale: self.scale,
        }
    }

    /// The queries `[n, heads, qk]` and the new cache rows `[n, lora + rope]` of `x`, before
    /// their norm and rotation: q's first projection beside `kv_a_proj_with_mqa`, then q's
    /// RMSNorm and second projection where it is low-rank (one call where neither has a bias,
    /// which a backend may run in one round trip).
    fn project(&self, backend: &B, x: &[f32], n: usize) -> (Vec<f32>, Vec<f32>) {
        let (h, qk, width) = (self.heads, self.nope + self.rope, self.cache_width());
        if let (InputProjection::Stacked(both), Some((norm, b))) = (&self.input, &self.q_b) {
            if both.bias.is_none() && b.bias.is_none() {
                let mut stacked = vec![0.0; n * both.out_features];
                let mut q = vec![0.0; n * h * qk];
                let weights = (&both.weight, &b.weight);
                let norm = (&norm[..], self.eps);
                backend.linear_norm_linear(x, n, weights, norm, &mut stacked, &mut q);
                let kv = (stacked.chunks_exact(both.out_features))
                    .flat_map(|row| &row[self.q_width..])
                    .copied()
                    .collect();
                return (q, kv);
            }
        }
        let mut first = vec![0.0; n * self.q_width];
        let mut kv = vec![0.0; n * width];
        match &self.input {
            InputProjection::Stacked(both) => {
                let mut out = vec![0.0; n * both.out_features];
                both.forward(backend, x, n, &mut out);
                let rows = out.chunks_exact(both.out_features);
                let split = first
                    .chunks_exact_mut(self.q_width)
                    .zip(kv.chunks_exact_mut(width));
                for (row, (q_row, kv_row)) in rows.zip(split) {
                    q_row.copy_from_slice(&row[..self.q_width]);
                    kv_row.copy_from_slice(&row[self.q_width..]);
                }
            }
            InputProjection::Apart { q, kv_a } => {
                q.forward(backend, x, n, &mut first);
                kv_a.forward(backend, x, n, &mut kv);
            }
        }
        let q = match &self.q_b {
            None => first,
            Some((norm, b)) => {
                rms_norm(&mut first, norm, self.eps);
                let mut q = vec![0.0; n * h * qk];
                b.forward(backend, &first, n, &mut q);
                q
            }
        };
        (q, kv)
    }

    /// Whether `seg` costs fewer multiply-adds expanded than absorbed.
    fn expands<R>(&self, seg: &Segment<R>) -> bool {
        let (h, qk, lora) = (self.heads, self.nope + self.rope, self.lora);
        let (len, total) = (seg.len, seg.position + seg.len);
        // Keys a query row sees on average, with causal blocks of QUERY_BLOCK rows.
        let keys = seg.position + len.min(QUERY_BLOCK) / 2 + len / 2;
        let absorbed = len * h * (keys * (self.cache_width() + lora) + lora * (self.nope + self.v));
        let expanded = total * h * (self.nope + self.v) * lora + len * h * keys * (qk + self.v);
        expanded < absorbed
    }

    /// Expanded attention of one sequence: keys and values of every position from its latents,
    /// then ordinary causal attention, heads as parallel tasks; writes its rows of `attn`.
    fn attend_expanded(&self, backend: &B, seg: &Segment<B::Rows>, q: &[f32], attn: &mut [f32]) {
        let (h, qk, width) = (self.heads, self.nope + self.rope, self.cache_width());
        let (nope, v) = (self.nope, self.v);
        let kv_width = nope + v;
        let total = seg.position + seg.len;
        let cache = backend.read_rows(seg.cache, total);
        // [total, h, nope + v]: per head, W_UK c then W_UV c.
        let latents: Vec<f32> = cache[..total * width]
            .chunks_exact(width)
            .flat_map(|row| &row[..self.lora])
            .copied()
            .collect();
        let mut kv = vec![0.0; total * h * kv_width];
        self.kv_b.forward(backend, &latents, total, &mut kv);
        let heads = backend.map_tasks(h, |head| {
            // This head's keys, [total, nope + rope]: its own k_nope and the shared k_pe.
            let mut keys = vec![0.0; total * qk];
            for (t, key) in keys.chunks_exact_mut(qk).enumerate() {
                let at = (t * h + head) * kv_width;
                key[..nope].copy_from_slice(&kv[at..at + nope]);
                key[nope..].copy_from_slice(&cache[t * width + self.lora..(t + 1) * width]);
            }
            let mut out = vec![0.0; seg.len * v];
            let mut scores = Vec::new();
            let mut start = 0;
            while start < seg.len {
                let rows = QUERY_BLOCK.min(seg.len - start);
                let visible = seg.position + start + rows;
                scores.clear();
                scores.resize(rows * visible, 0.0);
                backend.matmul_nt(
                    rows,
                    visible,
                    qk,
                    View {
                        data: &q[((seg.row + start) * h + head) * qk..],
                        row_stride: h * qk,
                    },
                    View {
                        data: &keys,
                        row_stride: qk,
                    },
                    &mut scores,
                    visible,
                );
                for (i, row) in scores.chunks_exact_mut(visible).enumerate() {
                    causal_softmax(row, seg.position + start + i + 1, self.scale);
                }
                backend.matmul_nn(
                    rows,
                    v,
                    visible,
                    View {
                        data: &scores,
                        row_stride: visible,
                    },
                    View {
                        data: &kv[head * kv_width + nope..],
                        row_stride: h * kv_width,
                    },
                    &mut out[start * v..],
                    v,
                );
                start += rows;
            }
            out
        });
        for (head, out) in heads.iter().enumerate() {
            for (i, o) in out.chunks_exact(v).enumerate() {
                let at = ((seg.row + i) * h + head) * v;
                attn[at..at + v].copy_from_slice(o);
            }
        }
    }

    /// Absorbed attention of `segments` (their rows gathered into one batch, so decode steps of
    /// many sequences share each product); writes their rows of `attn` (`[rows, heads · v]`),
    /// or with `o_proj`, where the segments are every row of the batch in order, every row
    /// through it (`[rows, hidden]`, without its bias).
    fn attend_absorbed(
        &self,
        backend: &B,
        segments: &[&Segment<B::Rows>],
        q: &[f32],
        o_proj: Option<&B::Matrix>,
        attn: &mut [f32],
    ) {
        let (h, qk) = (self.heads, self.nope + self.rope);
        let n: usize = segments.iter().map(|seg| seg.len).sum();
        if n == 0 {
            return;
        }
        let mut q_rows = Vec::with_capacity(n * h * qk);
        for seg in segments {
            q_rows.extend_from_slice(&q[seg.row * h * qk..(seg.row + seg.len) * h * qk]);
        }
        let runs: Vec<AbsorbedRun<'_, B::Rows>> = segments
            .iter()
            .map(|seg| AbsorbedRun {
                queries: seg.len,
                rows: &*seg.cache,
                position: seg.position,
            })
            .collect();
        let weights = self.absorbed(o_proj);
        if o_proj.is_some() {
            backend.attend_absorbed(&weights, &q_rows, &runs, attn);
            return;
        }
        let width = h * self.v;
        let mut out = vec![0.0; n * width];
        backend.attend_absorbed(&weights, &q_rows, &runs, &mut out);
        let mut rows = out.chunks_exact(width);
        for seg in segments {
            for (row, got) in attn[seg.row * width..(seg.row + seg.len) * width]
                .chunks_exact_mut(width)
                .zip(&mut rows)
            {
                row.copy_from_slice(got);
            }
        }
    }
}

/// The runs of [`Backend::attention_block`]: each segment's rows, cache and position.
fn block_runs<'s, R>(segments: &'s mut [Segment<'_, R>]) -> Vec<BlockRun<'s, R>> {
    segments
        .iter_mut()
        .map(|seg| BlockRun {
            queries: seg.len,
            rows: &mut *seg.cache,
            position: seg.position,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuBackend;
    use crate::checkpoint::Checkpoint;
    use crate::model::rope::RotaryEmbedding;

    /// Layer 0's attention of a fixture with q_lora (tiny-v3) and one without (tiny-v3-yarn).
    fn layer(name: &str) -> (ModelConfig, Attention<CpuBackend>, CpuBackend) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures")
            .join(name);
        let config = ModelConfig::from_dir(&dir).expect("fixture config");
        let checkpoint = Checkpoint::open(&dir).expect("fixture checkpoint");
        let backend = CpuBackend::new(1);
        let loader = Loader {
            checkpoint: &checkpoint,
            backend: &backend,
        };
        let attention =
            Attention::load(&loader, "model.layers.0.self_attn", &config).expect("layer loads");
        (config, attention, backend)
    }

    #[test]
    fn expanded_and_absorbed_forms_agree_after_a_cached_prefix() {
        for name in ["tiny-v3", "tiny-v3-yarn"] {
            let (config, attention, backend) = layer(name);
            let (h, qk, width) = (
                attention.heads,
                attention.nope + attention.rope,
                attention.cache_width(),
            );
            let rope = RotaryEmbedding::new(&config);
            // A cached prefix of 37 positions and 45 new rows (two query blocks and a bit),
            // with queries and cache rows as the layer would make them (rotated keys).
            let (position, len) = (37, 45);
            let value = |i: usize| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * 2.0;
            let mut cache: Vec<f32> = (0..(position + len) * width).map(value).collect();
            for (t, row) in cache.chunks_exact_mut(width).enumerate() {
                rope.rotate(&mut row[attention.lora..], t);
            }
            let q: Vec<f32> = (0..len * h * qk).map(|i| value(i + 13)).collect();
            let mut rows = backend.new_rows(width);
            backend.append_rows(&mut rows, &cache);
            let seg = Segment {
                row: 0,
                len,
                position,
                cache: &mut rows,
            };
            let mut expanded = vec![f32::NAN; len * h * attention.v];
            attention.attend_expanded(&backend, &seg, &q, &mut expanded);
            let mut absorbed = vec![f32::NAN; len * h * attention.v];
            attention.attend_absorbed(&backend, &[&seg], &q, None, &mut absorbed);
            let worst = expanded
                .iter()
                .zip(&absorbed)
                .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-5, "{name}: the forms differ by {worst}");
        }
    }

    #[test]
    fn prefill_expands_and_decode_stays_absorbed() {
        let (_, attention, _) = layer("tiny-v3");
        let mut cache = ();
        let mut expands = |position, len| {
            attention.expands(&Segment {
                row: 0,
                len,
                position,
                cache: &mut cache,
            })
        };
        assert!(expands(0, 128));
        assert!(!expands(127, 1));
        assert!(!expands(4000, 2));
    }
}
