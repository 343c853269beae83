//! Model configuration: `config.json` as published with Hugging Face checkpoints, and as
//! saved by current transformers versions, for the architectures the engine runs.
//!
//! - DeepSeek-V2 / V2-Lite (`deepseek_v2`) and DeepSeek-V3 (`deepseek_v3`): Multi-head
//!   Latent Attention, MoE with shared experts, YaRN RoPE (DeepSeek-V2, arXiv:2405.04434;
//!   DeepSeek-V3, arXiv:2412.19437).
//! - The R1 distills: Qwen2 (`qwen2`) and Llama (`llama`, with llama3 RoPE scaling).
//!
//! Published checkpoints spell RoPE scaling `rope_scaling` (with `type` or `rope_type`);
//! transformers 5 writes `rope_parameters` (with `rope_type`, and sometimes `rope_theta`
//! inside it). Both are accepted and mean the same. Every error names the file and the
//! field.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// A configuration problem: the file, the field and what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}: field `{field}`: {reason}")]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// The field (dotted for nested fields).
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

/// The architectures the engine implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// DeepSeek-V2 and V2-Lite.
    DeepseekV2,
    /// DeepSeek-V3 (and R1).
    DeepseekV3,
    /// Qwen2 (DeepSeek-R1-Distill-Qwen).
    Qwen2,
    /// Llama (DeepSeek-R1-Distill-Llama).
    Llama,
}

/// RoPE frequency scaling.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Linear position interpolation.
    Linear {
        /// Scale factor.
        factor: f64,
    },
    /// YaRN (Peng et al., 2023), with DeepSeek's `mscale` terms.
    Yarn {
        /// Context extension factor.
        factor: f64,
        /// Context length the model was pre-trained with.
        original_max_position_embeddings: usize,
        /// High-frequency boundary (rotations).
        beta_fast: f64,
        /// Low-frequency boundary (rotations).
        beta_slow: f64,
        /// Attention temperature term for the rotary embedding.
        mscale: f64,
        /// Attention temperature term applied to all dimensions (the softmax scale).
        mscale_all_dim: f64,
    },
    /// Llama 3.x frequency-dependent scaling.
    Llama3 {
        /// Scale factor.
        factor: f64,
        /// Low-frequency factor.
        low_freq_factor: f64,
        /// High-frequency factor.
        high_freq_factor: f64,
        /// Context length the model was pre-trained with.
        original_max_position_embeddings: usize,
    },
}

/// Multi-head Latent Attention dimensions (DeepSeek).
#[derive(Clone, Debug, PartialEq)]
pub struct MlaConfig {
    /// Rank of the query compression; `None` projects queries directly (V2-Lite).
    pub q_lora_rank: Option<usize>,
    /// Rank of the compressed key/value latent (what the decode cache holds).
    pub kv_lora_rank: usize,
    /// Per-head query/key dimension without RoPE.
    pub qk_nope_head_dim: usize,
    /// Per-head query/key dimension with RoPE (the key part is shared by all heads).
    pub qk_rope_head_dim: usize,
    /// Per-head value dimension.
    pub v_head_dim: usize,
}

/// How routed experts are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopkMethod {
    /// Top-k over all experts (`greedy`).
    Greedy,
    /// Top-k within the best `topk_group` groups, groups scored by their best expert (V2).
    GroupLimitedGreedy,
    /// V3: groups scored by the sum of their top-2 bias-corrected scores; experts chosen by
    /// bias-corrected score, weighted by the uncorrected one.
    NoauxTc,
}

/// How router logits become scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoringFunc {
    /// Softmax over experts (V2).
    Softmax,
    /// Independent sigmoids (V3).
    Sigmoid,
}

/// Mixture-of-experts settings (DeepSeek).
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    /// Routed experts.
    pub n_routed_experts: usize,
    /// Shared experts (always active), fused as one MLP of `n_shared × moe_intermediate`.
    pub n_shared_experts: usize,
    /// Experts per token.
    pub num_experts_per_tok: usize,
    /// Hidden size of one expert.
    pub moe_intermediate_size: usize,
    /// The first `first_k_dense_replace` layers are dense.
    pub first_k_dense_replace: usize,
    /// Every `moe_layer_freq`-th layer after those is MoE.
    pub moe_layer_freq: usize,
    /// Expert selection.
    pub topk_method: TopkMethod,
    /// Score function.
    pub scoring_func: ScoringFunc,
    /// Expert groups.
    pub n_group: usize,
    /// Groups kept per token.
    pub topk_group: usize,
    /// Renormalise the chosen experts' weights to sum to one.
    pub norm_topk_prob: bool,
    /// Multiplier of the routed experts' output.
    pub routed_scaling_factor: f64,
}

/// A parsed, validated model configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Architecture.
    pub arch: Arch,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Dense MLP hidden size.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); equals the attention heads for MLA.
    pub num_key_value_heads: usize,
    /// Per-head dimension (Qwen2/Llama).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Longest context.
    pub max_position_embeddings: usize,
    /// The output projection shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Q/K/V projections carry a bias (Qwen2; Llama's `attention_bias`).
    pub attention_bias: bool,
    /// MLA dimensions (DeepSeek only).
    pub mla: Option<MlaConfig>,
    /// MoE settings (DeepSeek only).
    pub moe: Option<MoeConfig>,
    /// Begin-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens.
    pub eos_token_ids: Vec<u32>,
}

struct Fields<'a> {
    file: &'a Path,
    obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn err(&self, field: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    fn get(&self, field: &str) -> Option<&'a Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn usize(&self, field: &str) -> Result<usize, ConfigError> {
        self.opt_usize(field)?
            .ok_or_else(|| self.err(field, "missing"))
    }

    fn opt_usize(&self, field: &str) -> Result<Option<usize>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                self.err(field, format!("expected a non-negative integer, found {v}"))
            }),
        }
    }

    fn f64_or(&self, field: &str, default: f64) -> Result<f64, ConfigError> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(field, format!("expected a number, found {v}"))),
        }
    }

    fn bool_or(&self, field: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(field, format!("expected true or false, found {v}"))),
        }
    }

    fn str_or(&self, field: &str, default: &'a str) -> Result<&'a str, ConfigError> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_str()
                .ok_or_else(|| self.err(field, format!("expected a string, found {v}"))),
        }
    }

    fn positive(&self, field: &str) -> Result<usize, ConfigError> {
        let n = self.usize(field)?;
        if n == 0 {
            return Err(self.err(field, "must be positive"));
        }
        Ok(n)
    }
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<ModelConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            field: "(file)".into(),
            reason: format!("cannot read: {e}"),
        })?;
        ModelConfig::from_json(&text, path)
    }

    /// Parses and validates the text of a `config.json` (`file` is used in errors).
    pub fn from_json(text: &str, file: &Path) -> Result<ModelConfig, ConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|e| ConfigError {
            file: file.to_path_buf(),
            field: "(file)".into(),
            reason: format!("not valid JSON: {e}"),
        })?;
        let Value::Object(obj) = &value else {
            return Err(ConfigError {
                file: file.to_path_buf(),
                field: "(file)".into(),
                reason: "expected a JSON object".into(),
            });
        };
        let f = Fields { file, obj };
        let model_type = f.str_or("model_type", "")?;
        let arch = match model_type {
            "deepseek_v2" => Arch::DeepseekV2,
            "deepseek_v3" => Arch::DeepseekV3,
            "qwen2" => Arch::Qwen2,
            "llama" => Arch::Llama,
            "" => return Err(f.err("model_type", "missing")),
            other => {
                return Err(f.err(
                    "model_type",
                    format!(
                        "{other:?} is not supported (deepseek_v2, deepseek_v3, qwen2, llama are)"
                    ),
                ))
            }
        };
        let hidden_size = f.positive("hidden_size")?;
        let num_attention_heads = f.positive("num_attention_heads")?;
        let num_key_value_heads = f
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(f.err(
                "num_key_value_heads",
                format!(
                    "{num_key_value_heads} must divide num_attention_heads ({num_attention_heads})"
                ),
            ));
        }
        let deepseek = matches!(arch, Arch::DeepseekV2 | Arch::DeepseekV3);
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) if !deepseek => d,
            _ => {
                if hidden_size % num_attention_heads != 0 && !deepseek {
                    return Err(f.err(
                        "hidden_size",
                        "must be a multiple of num_attention_heads (or set head_dim)",
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        let (rope_theta, rope_scaling) = rope(&f)?;
        let mla = if deepseek {
            Some(MlaConfig {
                q_lora_rank: f.opt_usize("q_lora_rank")?,
                kv_lora_rank: f.positive("kv_lora_rank")?,
                qk_nope_head_dim: f.positive("qk_nope_head_dim")?,
                qk_rope_head_dim: f.positive("qk_rope_head_dim")?,
                v_head_dim: f.positive("v_head_dim")?,
            })
        } else {
            None
        };
        if let Some(m) = &mla {
            if m.qk_rope_head_dim % 2 != 0 {
                return Err(f.err("qk_rope_head_dim", "must be even"));
            }
        }
        let moe = if deepseek && f.opt_usize("n_routed_experts")?.is_some() {
            let default_method = if arch == Arch::DeepseekV3 {
                "noaux_tc"
            } else {
                "greedy"
            };
            let topk_method = match f.str_or("topk_method", default_method)? {
                "greedy" => TopkMethod::Greedy,
                "group_limited_greedy" => TopkMethod::GroupLimitedGreedy,
                "noaux_tc" => TopkMethod::NoauxTc,
                other => {
                    return Err(f.err(
                        "topk_method",
                        format!("{other:?} is not one of greedy, group_limited_greedy, noaux_tc"),
                    ))
                }
            };
            let default_scoring = if arch == Arch::DeepseekV3 {
                "sigmoid"
            } else {
                "softmax"
            };
            let scoring_func = match f.str_or("scoring_func", default_scoring)? {
                "softmax" => ScoringFunc::Softmax,
                "sigmoid" => ScoringFunc::Sigmoid,
                other => {
                    return Err(f.err(
                        "scoring_func",
                        format!("{other:?} is not softmax or sigmoid"),
                    ))
                }
            };
            let n_routed_experts = f.positive("n_routed_experts")?;
            let num_experts_per_tok = f.positive("num_experts_per_tok")?;
            let n_group = f.opt_usize("n_group")?.unwrap_or(1).max(1);
            let topk_group = f.opt_usize("topk_group")?.unwrap_or(n_group).max(1);
            if num_experts_per_tok > n_routed_experts {
                return Err(f.err(
                    "num_experts_per_tok",
                    format!(
                        "{num_experts_per_tok} is more than n_routed_experts ({n_routed_experts})"
                    ),
                ));
            }
            if n_routed_experts % n_group != 0 {
                return Err(f.err(
                    "n_group",
                    format!("{n_group} groups do not divide {n_routed_experts} experts"),
                ));
            }
            if topk_group > n_group {
                return Err(f.err(
                    "topk_group",
                    format!("{topk_group} is more than n_group ({n_group})"),
                ));
            }
            Some(MoeConfig {
                n_routed_experts,
                n_shared_experts: f.opt_usize("n_shared_experts")?.unwrap_or(0),
                num_experts_per_tok,
                moe_intermediate_size: f.positive("moe_intermediate_size")?,
                first_k_dense_replace: f.opt_usize("first_k_dense_replace")?.unwrap_or(0),
                moe_layer_freq: f.opt_usize("moe_layer_freq")?.unwrap_or(1).max(1),
                topk_method,
                scoring_func,
                n_group,
                topk_group,
                norm_topk_prob: f.bool_or("norm_topk_prob", false)?,
                routed_scaling_factor: f.f64_or("routed_scaling_factor", 1.0)?,
            })
        } else {
            None
        };
        let eos_token_ids = token_ids(f.get("eos_token_id"))
            .ok_or_else(|| f.err("eos_token_id", "expected a token id or a list of them"))?;
        Ok(ModelConfig {
            arch,
            vocab_size: f.positive("vocab_size")?,
            hidden_size,
            intermediate_size: f.positive("intermediate_size")?,
            num_hidden_layers: f.positive("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            attention_bias: match arch {
                Arch::Qwen2 => true,
                _ => f.bool_or("attention_bias", false)?,
            },
            mla,
            moe,
            bos_token_id: f.opt_usize("bos_token_id")?.map(|n| n as u32),
            eos_token_ids,
        })
    }

    /// Whether decoder layer `i` is a MoE layer.
    pub fn is_moe_layer(&self, i: usize) -> bool {
        match &self.moe {
            Some(m) => i >= m.first_k_dense_replace && i.is_multiple_of(m.moe_layer_freq),
            None => false,
        }
    }
}

/// Token ids as configs write them: absent, one id, or a list. `None` if malformed.
pub fn token_ids(v: Option<&Value>) -> Option<Vec<u32>> {
    match v {
        None | Some(Value::Null) => Some(Vec::new()),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(|n| vec![n]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect(),
        Some(_) => None,
    }
}

fn rope(f: &Fields<'_>) -> Result<(f64, RopeScaling), ConfigError> {
    // transformers 5: `rope_parameters` (may hold rope_theta); published: `rope_scaling`.
    let (field, params) = match (f.get("rope_parameters"), f.get("rope_scaling")) {
        (Some(p), _) => ("rope_parameters", Some(p)),
        (None, Some(s)) => ("rope_scaling", Some(s)),
        (None, None) => ("rope_scaling", None),
    };
    let mut theta = f.f64_or("rope_theta", 10_000.0)?;
    let Some(params) = params else {
        return Ok((theta, RopeScaling::None));
    };
    let Value::Object(p) = params else {
        return Err(f.err(field, format!("expected an object, found {params}")));
    };
    let sub = Fields {
        file: f.file,
        obj: p,
    };
    let named = |name: &str| format!("{field}.{name}");
    let num = |name: &str, default: Option<f64>| -> Result<f64, ConfigError> {
        match (sub.get(name), default) {
            (Some(v), _) => v
                .as_f64()
                .ok_or_else(|| f.err(&named(name), format!("expected a number, found {v}"))),
            (None, Some(d)) => Ok(d),
            (None, None) => Err(f.err(&named(name), "missing")),
        }
    };
    if sub.get("rope_theta").is_some() {
        theta = num("rope_theta", None)?;
    }
    let kind = match (sub.get("rope_type"), sub.get("type")) {
        (Some(Value::String(s)), _) | (None, Some(Value::String(s))) => s.as_str(),
        (None, None) => "default",
        _ => return Err(f.err(&named("rope_type"), "expected a string")),
    };
    let orig = |default: Option<usize>| -> Result<usize, ConfigError> {
        match sub.get("original_max_position_embeddings") {
            Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
                f.err(
                    &named("original_max_position_embeddings"),
                    "expected an integer",
                )
            }),
            None => {
                default.ok_or_else(|| f.err(&named("original_max_position_embeddings"), "missing"))
            }
        }
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: num("factor", None)?,
        },
        "yarn" => RopeScaling::Yarn {
            factor: num("factor", None)?,
            original_max_position_embeddings: orig(None)?,
            beta_fast: num("beta_fast", Some(32.0))?,
            beta_slow: num("beta_slow", Some(1.0))?,
            mscale: num("mscale", Some(1.0))?,
            mscale_all_dim: num("mscale_all_dim", Some(0.0))?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor", None)?,
            low_freq_factor: num("low_freq_factor", None)?,
            high_freq_factor: num("high_freq_factor", None)?,
            original_max_position_embeddings: orig(None)?,
        },
        other => {
            return Err(f.err(
                &named("rope_type"),
                format!("{other:?} is not supported (default, linear, yarn, llama3 are)"),
            ))
        }
    };
    Ok((theta, scaling))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2_lite() -> Value {
        serde_json::json!({
            "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
            "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
            "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 10944,
            "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 1408,
            "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
            "norm_topk_prob": false, "num_attention_heads": 16, "num_experts_per_tok": 6,
            "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": null,
            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
            "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"},
            "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
            "tie_word_embeddings": false, "topk_group": 1, "topk_method": "greedy",
            "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 102400
        })
    }

    fn parse(v: &Value) -> Result<ModelConfig, ConfigError> {
        ModelConfig::from_json(&v.to_string(), Path::new("config.json"))
    }

    #[test]
    fn published_v2_lite_config_parses() {
        let c = parse(&v2_lite()).expect("valid");
        assert_eq!(c.arch, Arch::DeepseekV2);
        let mla = c.mla.as_ref().expect("mla");
        assert_eq!(mla.q_lora_rank, None);
        assert_eq!(mla.kv_lora_rank, 512);
        let moe = c.moe.as_ref().expect("moe");
        assert_eq!(moe.topk_method, TopkMethod::Greedy);
        assert_eq!(moe.scoring_func, ScoringFunc::Softmax);
        assert!(!c.is_moe_layer(0) && c.is_moe_layer(1));
        assert!(
            matches!(c.rope_scaling, RopeScaling::Yarn { factor, mscale_all_dim, .. } if factor == 40.0 && mscale_all_dim == 0.707)
        );
        assert_eq!(c.eos_token_ids, vec![100001]);
    }

    #[test]
    fn rope_parameters_of_transformers_5_mean_the_same_as_rope_scaling() {
        let published = parse(&v2_lite()).expect("published");
        let mut v = v2_lite();
        let obj = v.as_object_mut().expect("object");
        let mut params = obj.remove("rope_scaling").expect("rope_scaling");
        params.as_object_mut().expect("o").remove("type");
        params["rope_type"] = "yarn".into();
        params["rope_theta"] = 10000.0.into();
        obj.remove("rope_theta");
        obj.insert("rope_parameters".into(), params);
        assert_eq!(parse(&v).expect("transformers 5"), published);
    }

    #[test]
    fn errors_name_the_field() {
        let cases: Vec<(&str, Value, &str)> = vec![
            ("model_type", "gpt2".into(), "model_type"),
            ("kv_lora_rank", Value::Null, "kv_lora_rank"),
            ("hidden_size", "2048".into(), "hidden_size"),
            ("num_experts_per_tok", 65.into(), "num_experts_per_tok"),
            ("topk_method", "best".into(), "topk_method"),
            ("n_group", 3.into(), "n_group"),
            (
                "rope_scaling",
                serde_json::json!({"type": "yarn"}),
                "rope_scaling.factor",
            ),
            (
                "rope_scaling",
                serde_json::json!({"type": "ntk", "factor": 2}),
                "rope_scaling.rope_type",
            ),
        ];
        for (key, value, field) in cases {
            let mut v = v2_lite();
            v[key] = value;
            let e = parse(&v).expect_err(key);
            assert_eq!(e.field, field, "{e}");
            assert!(e.to_string().starts_with("config.json: field"), "{e}");
        }
        let e = ModelConfig::from_json("{", Path::new("x/config.json")).expect_err("json");
        assert!(e.to_string().contains("x/config.json"), "{e}");
    }

    #[test]
    fn distill_configs_parse() {
        let qwen = serde_json::json!({"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960,
            "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
            "rope_theta": 10000, "rms_norm_eps": 1e-6, "tie_word_embeddings": false, "eos_token_id": 151643});
        let c = parse(&qwen).expect("qwen2");
        assert_eq!(
            (c.head_dim, c.num_key_value_heads, c.attention_bias),
            (128, 2, true)
        );
        let llama = serde_json::json!({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "rope_theta": 500000.0, "eos_token_id": [128001, 128008, 128009],
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}});
        let c = parse(&llama).expect("llama");
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert_eq!(c.eos_token_ids.len(), 3);
        let bad = serde_json::json!({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 1,
            "num_hidden_layers": 1, "num_attention_heads": 32, "num_key_value_heads": 5, "vocab_size": 10});
        assert_eq!(parse(&bad).expect_err("gqa").field, "num_key_value_heads");
    }
}
