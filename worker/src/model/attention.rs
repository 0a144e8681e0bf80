//! Multi-head latent attention (MLA) over a compressed KV cache.
//!
//! The cache keeps, per position, what MLA needs and nothing more: the normalised latent
//! `c` (`kv_lora_rank` values) and the rotated shared key `k_pe` (`qk_rope_head_dim` values).
//! `kv_b_proj` is absorbed into the query and the output, as DeepSeek's inference does:
//! `q_nope·(W_UK c) = (W_UKᵀ q_nope)·c` and `Σ p·(W_UV c) = W_UV (Σ p·c)`, so a decode step
//! costs one token's projections plus a pass over the latents, never a re-expansion of the
//! whole prefix.

use crate::backend::{rms_norm, softmax, Backend, View};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::linear::{Linear, Loader};
use crate::model::rope::RotaryEmbedding;

/// Upper bound on the attention scores held at once (floats), to bound memory in long prefills.
const SCORE_BLOCK: usize = 1 << 22;

/// Query rows per block in a prefill: a block attends only to the keys up to its last row, so
/// smaller blocks skip more of the causally masked scores; this many keeps the products large.
const QUERY_BLOCK: usize = 32;

/// One layer's attention weights.
pub struct Attention<B: Backend> {
    q: QueryProjection<B>,
    kv_a: Linear<B>,
    kv_a_norm: Vec<f32>,
    /// `kv_b_proj` on the host: per head, `nope` rows of `W_UK` then `v` rows of `W_UV`.
    kv_b: Vec<f32>,
    o_proj: Linear<B>,
    heads: usize,
    nope: usize,
    rope: usize,
    v: usize,
    lora: usize,
    eps: f32,
    scale: f32,
}

enum QueryProjection<B: Backend> {
    Direct(Linear<B>),
    LowRank {
        a: Linear<B>,
        norm: Vec<f32>,
        b: Linear<B>,
    },
}

/// The rows of one sequence in a batch: where they are, where they start, and its cache.
pub struct Segment<'a> {
    /// First row of the sequence in the batch.
    pub row: usize,
    /// Number of new tokens.
    pub len: usize,
    /// Position of the first new token (= the cache's length before this step).
    pub position: usize,
    /// This layer's cache rows `[position, kv_lora_rank + qk_rope_head_dim]`, grown in place.
    pub cache: &'a mut Vec<f32>,
}

impl<B: Backend> Attention<B> {
    pub fn load(loader: &Loader<B>, prefix: &str, config: &ModelConfig) -> Result<Self> {
        let hidden = config.hidden_size;
        let heads = config.num_attention_heads;
        let qk = config.qk_head_dim();
        let bias = config.attention_bias;
        let q = match config.q_lora_rank {
            None => QueryProjection::Direct(loader.linear(
                &[(&format!("{prefix}.q_proj"), heads * qk)],
                hidden,
                false,
            )?),
            Some(rank) => QueryProjection::LowRank {
                a: loader.linear(&[(&format!("{prefix}.q_a_proj"), rank)], hidden, bias)?,
                norm: loader.vector(&format!("{prefix}.q_a_layernorm.weight"), rank)?,
                b: loader.linear(&[(&format!("{prefix}.q_b_proj"), heads * qk)], rank, false)?,
            },
        };
        let lora = config.kv_lora_rank;
        let kv_a = loader.linear(
            &[(
                &format!("{prefix}.kv_a_proj_with_mqa"),
                lora + config.qk_rope_head_dim,
            )],
            hidden,
            bias,
        )?;
        let kv_a_norm = loader.vector(&format!("{prefix}.kv_a_layernorm.weight"), lora)?;
        let kv_b = loader.host_matrix(
            &format!("{prefix}.kv_b_proj.weight"),
            heads * (config.qk_nope_head_dim + config.v_head_dim),
            lora,
        )?;
        let o_proj = loader.linear(
            &[(&format!("{prefix}.o_proj"), hidden)],
            heads * config.v_head_dim,
            bias,
        )?;
        Ok(Self {
            q,
            kv_a,
            kv_a_norm,
            kv_b,
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
        let q = match &self.q {
            QueryProjection::Direct(l) => l.bytes(backend),
            QueryProjection::LowRank { a, norm, b } => {
                a.bytes(backend) + norm.len() * 4 + b.bytes(backend)
            }
        };
        q + self.kv_a.bytes(backend)
            + self.kv_a_norm.len() * 4
            + self.kv_b.len() * 4
            + self.o_proj.bytes(backend)
    }

    /// Attention for all rows of `x` (`n` rows, already normalised), sequence by sequence;
    /// appends the new positions to each segment's cache and writes `n × hidden` into `out`.
    pub fn forward(
        &self,
        backend: &B,
        rope: &RotaryEmbedding,
        x: &[f32],
        n: usize,
        segments: &mut [Segment],
        out: &mut [f32],
    ) {
        if n == 0 {
            return;
        }
        let (h, qk, width) = (self.heads, self.nope + self.rope, self.cache_width());
        let positions = row_positions(segments, n);

        // Queries: [n, h, qk], rotary part rotated.
        let mut q = vec![0.0; n * h * qk];
        match &self.q {
            QueryProjection::Direct(proj) => proj.forward(backend, x, n, &mut q),
            QueryProjection::LowRank { a, norm, b } => {
                let mut low = vec![0.0; n * a.out_features];
                a.forward(backend, x, n, &mut low);
                rms_norm(&mut low, norm, self.eps);
                b.forward(backend, &low, n, &mut q);
            }
        }
        for (row, &pos) in q.chunks_exact_mut(h * qk).zip(&positions) {
            for head in row.chunks_exact_mut(qk) {
                rope.rotate(&mut head[self.nope..], pos);
            }
        }

        // New cache rows: [n, lora + rope], latent normalised, key rotated.
        let mut kv = vec![0.0; n * width];
        self.kv_a.forward(backend, x, n, &mut kv);
        for (row, &pos) in kv.chunks_exact_mut(width).zip(&positions) {
            let (latent, k_pe) = row.split_at_mut(self.lora);
            rms_norm(latent, &self.kv_a_norm, self.eps);
            rope.rotate(k_pe, pos);
        }

        // Absorbed queries: [n, h, lora + rope] = [W_UKᵀ q_nope | q_pe] per head.
        let mut q_abs = vec![0.0; n * h * width];
        let per_head = (self.nope + self.v) * self.lora;
        for head in 0..h {
            backend.matmul_nn(
                n,
                self.lora,
                self.nope,
                View {
                    data: &q[head * qk..],
                    row_stride: h * qk,
                },
                View {
                    data: &self.kv_b[head * per_head..],
                    row_stride: self.lora,
                },
                &mut q_abs[head * width..],
                h * width,
            );
        }
        for (abs_row, q_row) in q_abs
            .chunks_exact_mut(h * width)
            .zip(q.chunks_exact(h * qk))
        {
            for (a, qh) in abs_row.chunks_exact_mut(width).zip(q_row.chunks_exact(qk)) {
                a[self.lora..].copy_from_slice(&qh[self.nope..]);
            }
        }

        // Per sequence: append to the cache, attend over it; latent outputs [n, h, lora].
        let mut o_lat = vec![0.0; n * h * self.lora];
        for seg in segments.iter_mut() {
            seg.cache
                .extend_from_slice(&kv[seg.row * width..(seg.row + seg.len) * width]);
            self.attend(backend, seg, &q_abs, &mut o_lat);
        }

        // Values: per head, W_UV · o_lat → [n, h, v]; then the output projection.
        let mut attn = vec![0.0; n * h * self.v];
        for head in 0..h {
            backend.matmul_nt(
                n,
                self.v,
                self.lora,
                View {
                    data: &o_lat[head * self.lora..],
                    row_stride: h * self.lora,
                },
                View {
                    data: &self.kv_b[head * per_head + self.nope * self.lora..],
                    row_stride: self.lora,
                },
                &mut attn[head * self.v..],
                h * self.v,
            );
        }
        self.o_proj.forward(backend, &attn, n, out);
    }

    /// Causal attention of one sequence's new rows over its whole cache.
    fn attend(&self, backend: &B, seg: &Segment, q_abs: &[f32], o_lat: &mut [f32]) {
        let (h, width) = (self.heads, self.cache_width());
        let total = seg.position + seg.len;
        let block = (SCORE_BLOCK / (h * total).max(1)).clamp(1, QUERY_BLOCK);
        let mut scores = Vec::new();
        let mut start = 0;
        while start < seg.len {
            let rows = block.min(seg.len - start);
            let first = seg.row + start;
            // Keys needed by this block: positions up to the block's last query.
            let keys = seg.position + start + rows;
            scores.clear();
            scores.resize(rows * h * keys, 0.0);
            backend.matmul_nt(
                rows * h,
                keys,
                width,
                View {
                    data: &q_abs[first * h * width..],
                    row_stride: width,
                },
                View {
                    data: seg.cache,
                    row_stride: width,
                },
                &mut scores,
                keys,
            );
            for (i, row_scores) in scores.chunks_exact_mut(h * keys).enumerate() {
                let visible = seg.position + start + i + 1;
                for head_scores in row_scores.chunks_exact_mut(keys) {
                    let (live, masked) = head_scores.split_at_mut(visible);
                    live.iter_mut().for_each(|s| *s *= self.scale);
                    softmax(live);
                    masked.fill(0.0);
                }
            }
            backend.matmul_nn(
                rows * h,
                self.lora,
                keys,
                View {
                    data: &scores,
                    row_stride: keys,
                },
                View {
                    data: seg.cache,
                    row_stride: width,
                },
                &mut o_lat[first * h * self.lora..],
                self.lora,
            );
            start += rows;
        }
    }
}

/// The position of every batch row, from the segments that cover them.
fn row_positions(segments: &[Segment], n: usize) -> Vec<usize> {
    let mut positions = vec![0; n];
    for seg in segments {
        for (i, p) in positions[seg.row..seg.row + seg.len].iter_mut().enumerate() {
            *p = seg.position + i;
        }
    }
    positions
}
