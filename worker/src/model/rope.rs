//! Rotary position embedding for the `qk_rope_head_dim` part of queries and keys, with the
//! default and the YaRN frequency schedules, as transformers computes them.

use crate::backend::Rotation;
use crate::config::{yarn_mscale, ModelConfig, Rope};

/// Inverse frequencies and the magnitude factor that multiplies cos and sin.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f32>,
    /// YaRN's attention factor; 1 for the default schedule.
    attention_factor: f32,
    interleave: bool,
}

impl RotaryEmbedding {
    pub fn new(config: &ModelConfig) -> Self {
        let dim = config.qk_rope_head_dim;
        let half = dim / 2;
        let base_freq = |theta: f64| -> Vec<f64> {
            (0..half)
                .map(|i| 1.0 / theta.powf((2 * i) as f64 / dim as f64))
                .collect()
        };
        let (inv_freq, attention_factor) = match config.rope {
            Rope::Default { theta } => (base_freq(theta), 1.0),
            Rope::Yarn {
                theta,
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                attention_factor,
                truncate,
            } => {
                let attention_factor = attention_factor.unwrap_or(match (mscale, mscale_all_dim) {
                    (Some(m), Some(a)) if m != 0.0 && a != 0.0 => {
                        yarn_mscale(factor, m) / yarn_mscale(factor, a)
                    }
                    _ => yarn_mscale(factor, 1.0),
                });
                let correction_dim = |rotations: f64| {
                    dim as f64
                        * (original_max_position_embeddings as f64
                            / (rotations * 2.0 * std::f64::consts::PI))
                            .ln()
                        / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
                if truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let high = high.min(dim as f64 - 1.0);
                let span = if low == high { 0.001 } else { high - low };
                let extrapolation = base_freq(theta);
                let inv = extrapolation
                    .iter()
                    .enumerate()
                    .map(|(i, &extra)| {
                        let ramp = ((i as f64 - low) / span).clamp(0.0, 1.0);
                        let extra_weight = 1.0 - ramp;
                        (extra / factor) * (1.0 - extra_weight) + extra * extra_weight
                    })
                    .collect();
                (inv, attention_factor)
            }
        };
        Self {
            inv_freq: inv_freq.into_iter().map(|f| f as f32).collect(),
            attention_factor: attention_factor as f32,
            interleave: config.rope_interleave,
        }
    }

    /// The angles of rows at `positions`, as the table the backends rotate by.
    pub fn rotation(&self, positions: &[usize]) -> Rotation {
        let mut cos_sin = Vec::with_capacity(positions.len() * self.inv_freq.len() * 2);
        for &position in positions {
            let pos = position as f32;
            for &f in &self.inv_freq {
                let angle = pos * f;
                cos_sin.push(angle.cos() * self.attention_factor);
                cos_sin.push(angle.sin() * self.attention_factor);
            }
        }
        Rotation {
            cos_sin,
            interleave: self.interleave,
        }
    }

    /// Rotates one head's rotary slice `x` (length `qk_rope_head_dim`) to `position`.
    ///
    /// Interleaved checkpoints rotate pairs `(x[2i], x[2i+1])`; the others rotate
    /// `(x[i], x[i + d/2])`. Both only ever meet their own kind in a dot product, so the
    /// layout of the result does not matter beyond being the same for queries and keys.
    pub fn rotate(&self, x: &mut [f32], position: usize) {
        self.rotation(&[position]).apply(0, x);
    }
}
