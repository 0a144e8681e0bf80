//! The model's `config.json`, read into one struct for both DeepSeek-V3 and V2.
//!
//! Real checkpoints spell RoPE two ways: the legacy `rope_theta` + `rope_scaling` (with `type`
//! or `rope_type`) that DeepSeek ships, and transformers v5's `rope_parameters`. Both are read.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// Which of the supported architectures a checkpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `DeepseekV3ForCausalLM`: sigmoid scores with a correction bias, top-2-sum group scores.
    V3,
    /// `DeepseekV2ForCausalLM`: softmax scores, greedy or group-limited greedy by group max.
    V2,
}

/// How the routed experts are chosen for a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    /// V3 `noaux_tc`: sigmoid + bias, groups ranked by the sum of their top-2 scores.
    NoauxTc,
    /// V2 `greedy`: plain top-k of the softmax.
    Greedy,
    /// V2 `group_limited_greedy`: groups ranked by their best score.
    GroupLimitedGreedy,
}

/// RoPE frequencies and the scale they imply for attention.
#[derive(Debug, Clone, PartialEq)]
pub enum Rope {
    Default {
        theta: f64,
    },
    Yarn {
        theta: f64,
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        attention_factor: Option<f64>,
        truncate: bool,
    },
}

/// Everything the model needs from `config.json`, validated.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub topk_method: TopkMethod,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
    pub first_k_dense_replace: usize,
    /// Every `moe_layer_freq`-th layer past the dense ones is MoE (1 for all released models).
    pub moe_layer_freq: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub rms_norm_eps: f32,
    pub max_position_embeddings: usize,
    pub rope: Rope,
    /// RoPE acts on interleaved pairs `(x0, x1), (x2, x3)…` rather than on the two halves.
    pub rope_interleave: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// FP8 block size `[rows, cols]` when the checkpoint is block-quantised.
    pub fp8_block: Option<[usize; 2]>,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    moe_intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    n_routed_experts: Option<usize>,
    n_shared_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    topk_method: Option<String>,
    norm_topk_prob: Option<bool>,
    routed_scaling_factor: Option<f32>,
    scoring_func: Option<String>,
    first_k_dense_replace: Option<usize>,
    moe_layer_freq: Option<usize>,
    q_lora_rank: Option<usize>,
    kv_lora_rank: usize,
    qk_nope_head_dim: usize,
    qk_rope_head_dim: usize,
    v_head_dim: usize,
    rms_norm_eps: Option<f32>,
    max_position_embeddings: usize,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    rope_interleave: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    quantization_config: Option<Value>,
}

impl ModelConfig {
    /// Reads and validates `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        if !path.is_file() {
            return Err(Error::MissingFile { path });
        }
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let head: Value = serde_json::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        let architecture = architecture_of(&head)?;
        let raw: Raw = serde_json::from_value(head).map_err(|e| Error::Config(e.to_string()))?;
        let _ = (&raw.architectures, &raw.model_type);
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(Error::Config(format!(
                    "hidden_act {act:?} is not supported (silu is)"
                )));
            }
        }
        let topk_method = match architecture {
            Architecture::V3 => {
                if let Some(f) = raw.scoring_func.as_deref() {
                    if f != "sigmoid" {
                        return Err(Error::Config(format!(
                            "scoring_func {f:?} is not supported for DeepSeek-V3 (sigmoid is)"
                        )));
                    }
                }
                TopkMethod::NoauxTc
            }
            Architecture::V2 => match raw.topk_method.as_deref().unwrap_or("greedy") {
                "greedy" => TopkMethod::Greedy,
                "group_limited_greedy" => TopkMethod::GroupLimitedGreedy,
                other => {
                    return Err(Error::Config(format!(
                        "topk_method {other:?} is not supported for DeepSeek-V2 (greedy, group_limited_greedy are)"
                    )))
                }
            },
        };
        let rope = parse_rope(&raw)?;
        let config = ModelConfig {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            moe_intermediate_size: raw.moe_intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            n_routed_experts: raw.n_routed_experts.unwrap_or(0),
            n_shared_experts: raw.n_shared_experts.unwrap_or(0),
            num_experts_per_tok: raw.num_experts_per_tok.unwrap_or(0),
            n_group: raw.n_group.unwrap_or(1),
            topk_group: raw.topk_group.unwrap_or(1),
            topk_method,
            norm_topk_prob: raw
                .norm_topk_prob
                .unwrap_or(architecture == Architecture::V3),
            routed_scaling_factor: raw.routed_scaling_factor.unwrap_or(1.0),
            first_k_dense_replace: raw.first_k_dense_replace.unwrap_or(0),
            moe_layer_freq: raw.moe_layer_freq.unwrap_or(1),
            q_lora_rank: raw.q_lora_rank,
            kv_lora_rank: raw.kv_lora_rank,
            qk_nope_head_dim: raw.qk_nope_head_dim,
            qk_rope_head_dim: raw.qk_rope_head_dim,
            v_head_dim: raw.v_head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings: raw.max_position_embeddings,
            rope,
            rope_interleave: match architecture {
                Architecture::V3 => raw.rope_interleave.unwrap_or(true),
                // V2 rotates interleaved pairs as complex numbers.
                Architecture::V2 => true,
            },
            attention_bias: raw.attention_bias.unwrap_or(false),
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            bos_token_id: token_ids(raw.bos_token_id.as_ref(), "bos_token_id")?
                .first()
                .copied(),
            eos_token_ids: token_ids(raw.eos_token_id.as_ref(), "eos_token_id")?,
            fp8_block: fp8_block(raw.quantization_config.as_ref())?,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the relations between fields that the model relies on.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(Error::Config(m));
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
            ("moe_layer_freq", self.moe_layer_freq),
        ];
        for (name, value) in positive {
            if value == 0 {
                return fail(format!("{name} must be positive"));
            }
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return fail(format!(
                "qk_rope_head_dim {} must be even",
                self.qk_rope_head_dim
            ));
        }
        if self.q_lora_rank == Some(0) {
            return fail("q_lora_rank must be positive or null".into());
        }
        if self.has_moe_layers() {
            let e = self.n_routed_experts;
            if e == 0 || self.num_experts_per_tok == 0 || self.num_experts_per_tok > e {
                return fail(format!(
                    "num_experts_per_tok {} must be between 1 and n_routed_experts {e}",
                    self.num_experts_per_tok
                ));
            }
            if self.n_group == 0 || !e.is_multiple_of(self.n_group) {
                return fail(format!(
                    "n_group {} must divide n_routed_experts {e}",
                    self.n_group
                ));
            }
            if self.topk_group == 0 || self.topk_group > self.n_group {
                return fail(format!(
                    "topk_group {} must be between 1 and n_group {}",
                    self.topk_group, self.n_group
                ));
            }
            let per_group = e / self.n_group;
            if self.topk_method == TopkMethod::NoauxTc && per_group < 2 && self.n_group > 1 {
                return fail(format!(
                    "each of the {} groups needs at least 2 experts",
                    self.n_group
                ));
            }
            if self.num_experts_per_tok > self.topk_group * per_group {
                return fail(format!(
                    "num_experts_per_tok {} exceeds the experts of topk_group {} groups",
                    self.num_experts_per_tok, self.topk_group
                ));
            }
            if self.moe_intermediate_size == 0 {
                return fail("moe_intermediate_size must be positive".into());
            }
        }
        for &id in &self.eos_token_ids {
            if id as usize >= self.vocab_size {
                return fail(format!(
                    "eos_token_id {id} is outside the vocabulary of {}",
                    self.vocab_size
                ));
            }
        }
        Ok(())
    }

    /// Whether layer `layer` has a MoE block (else a dense MLP).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.n_routed_experts > 0
            && layer >= self.first_k_dense_replace
            && (layer - self.first_k_dense_replace).is_multiple_of(self.moe_layer_freq)
    }

    /// Whether any layer is a MoE layer.
    pub fn has_moe_layers(&self) -> bool {
        self.moe_layer_count() > 0
    }

    /// Number of MoE layers (what a placement and the expert load count layers among).
    pub fn moe_layer_count(&self) -> usize {
        (0..self.num_hidden_layers)
            .filter(|&l| self.is_moe_layer(l))
            .count()
    }

    /// Query/key head width: the no-position part plus the rotary part.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// The softmax scale of attention, with YaRN's `mscale_all_dim` correction when present.
    pub fn softmax_scale(&self) -> f32 {
        let mut scale = (self.qk_head_dim() as f64).powf(-0.5);
        if let Rope::Yarn {
            factor,
            mscale_all_dim: Some(m),
            ..
        } = self.rope
        {
            if m != 0.0 {
                let ms = yarn_mscale(factor, m);
                scale *= ms * ms;
            }
        }
        scale as f32
    }
}

/// YaRN's magnitude correction for a context stretched by `scale`.
pub(crate) fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

fn architecture_of(head: &Value) -> Result<Architecture> {
    let arch = head
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str);
    match arch {
        Some("DeepseekV3ForCausalLM") => Ok(Architecture::V3),
        Some("DeepseekV2ForCausalLM") => Ok(Architecture::V2),
        Some(other) => Err(Error::UnsupportedArchitecture(other.to_string())),
        None => match head.get("model_type").and_then(Value::as_str) {
            Some("deepseek_v3") => Ok(Architecture::V3),
            Some("deepseek_v2") => Ok(Architecture::V2),
            Some(other) => Err(Error::UnsupportedArchitecture(other.to_string())),
            None => Err(Error::Config(
                "neither architectures nor model_type is set".into(),
            )),
        },
    }
}

fn parse_rope(raw: &Raw) -> Result<Rope> {
    // v5 `rope_parameters` carries rope_theta inside; legacy keeps it at the top level.
    let params = raw
        .rope_parameters
        .as_ref()
        .or(raw.rope_scaling.as_ref())
        .filter(|v| !v.is_null());
    let num = |key: &str| params.and_then(|p| p.get(key)).and_then(Value::as_f64);
    let theta = num("rope_theta").or(raw.rope_theta).unwrap_or(10_000.0);
    let kind = params
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match kind {
        "default" => Ok(Rope::Default { theta }),
        "yarn" => {
            let original = num("original_max_position_embeddings").ok_or_else(|| {
                Error::Config("yarn rope needs original_max_position_embeddings".into())
            })? as usize;
            let factor = num("factor")
                .unwrap_or(raw.max_position_embeddings as f64 / original.max(1) as f64);
            let truncate = params
                .and_then(|p| p.get("truncate"))
                .and_then(Value::as_bool)
                .unwrap_or(true);
            Ok(Rope::Yarn {
                theta,
                factor,
                original_max_position_embeddings: original,
                beta_fast: num("beta_fast").filter(|b| *b != 0.0).unwrap_or(32.0),
                beta_slow: num("beta_slow").filter(|b| *b != 0.0).unwrap_or(1.0),
                mscale: num("mscale"),
                mscale_all_dim: num("mscale_all_dim"),
                attention_factor: num("attention_factor"),
                truncate,
            })
        }
        other => Err(Error::Config(format!(
            "rope type {other:?} is not supported (default, yarn are)"
        ))),
    }
}

fn token_ids(value: Option<&Value>, field: &str) -> Result<Vec<u32>> {
    let as_id = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| Error::Config(format!("{field} must be a token id or a list of them")))
    };
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(as_id).collect(),
        Some(v) => Ok(vec![as_id(v)?]),
    }
}

fn fp8_block(value: Option<&Value>) -> Result<Option<[usize; 2]>> {
    let Some(q) = value else { return Ok(None) };
    match q.get("quant_method").and_then(Value::as_str) {
        Some("fp8") => {}
        Some(other) => {
            return Err(Error::Config(format!(
                "quantization {other:?} is not supported (fp8 is)"
            )))
        }
        None => return Ok(None),
    }
    let block = q.get("weight_block_size").and_then(Value::as_array);
    match block.map(|b| b.iter().filter_map(Value::as_u64).collect::<Vec<_>>()) {
        None => Ok(Some([128, 128])),
        Some(b) if b.len() == 2 && b[0] > 0 && b[1] > 0 => Ok(Some([b[0] as usize, b[1] as usize])),
        Some(_) => Err(Error::Config(
            "weight_block_size must be two positive integers".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V3: &str = r#"{
        "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 100, "hidden_size": 16,
        "intermediate_size": 32, "moe_intermediate_size": 8, "num_hidden_layers": 2,
        "num_attention_heads": 2, "n_routed_experts": 8, "n_shared_experts": 1,
        "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1,
        "q_lora_rank": 8, "kv_lora_rank": 8, "qk_nope_head_dim": 4, "qk_rope_head_dim": 4,
        "v_head_dim": 4, "max_position_embeddings": 64, "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "eos_token_id": 1, "bos_token_id": 0
    }"#;

    #[test]
    fn reads_a_v3_config_with_legacy_yarn() {
        let c = ModelConfig::from_json(V3).unwrap();
        assert_eq!(c.architecture, Architecture::V3);
        assert_eq!(c.topk_method, TopkMethod::NoauxTc);
        assert!(c.norm_topk_prob && c.rope_interleave);
        assert!(matches!(c.rope, Rope::Yarn { factor, .. } if factor == 40.0));
        // 8^-0.5 * (0.1 ln 40 + 1)^2
        let expected = (8f64).powf(-0.5) * (0.1 * 40f64.ln() + 1.0).powi(2);
        assert!((c.softmax_scale() as f64 - expected).abs() < 1e-6);
        assert_eq!(c.eos_token_ids, vec![1]);
        assert!(!c.is_moe_layer(0) && c.is_moe_layer(1));
    }

    #[test]
    fn names_an_unsupported_architecture() {
        let text = V3.replace("DeepseekV3ForCausalLM", "LlamaForCausalLM");
        let err = ModelConfig::from_json(&text).unwrap_err();
        assert_eq!(err.kind(), "unsupported_architecture");
        assert!(err.to_string().contains("LlamaForCausalLM"));
    }

    #[test]
    fn rejects_groups_that_do_not_divide_the_experts() {
        let text = V3.replace("\"n_group\": 2", "\"n_group\": 3");
        let err = ModelConfig::from_json(&text).unwrap_err();
        assert!(
            err.to_string()
                .contains("n_group 3 must divide n_routed_experts 8"),
            "{err}"
        );
    }
}
