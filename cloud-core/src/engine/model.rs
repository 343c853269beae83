//! The decoder-only transformer of every supported architecture, written once against
//! [`Backend`].
//!
//! - Llama / Qwen2: grouped-query attention (Qwen2 with Q/K/V bias), RoPE on whole heads
//!   (`rotate_half` layout), SwiGLU MLP.
//! - DeepSeek-V2/V3: Multi-head Latent Attention — queries directly or through a low-rank
//!   `q_a → norm → q_b`; keys/values from a compressed latent `kv_a → norm → kv_b` plus a
//!   rope key shared by all heads (interleaved RoPE, YaRN) — and MoE layers with shared
//!   experts after the first `first_k_dense_replace` dense ones.
//!
//! MLA runs absorbed by default (DeepSeek-V2 paper, §2.1.2): the cache holds only each
//! position's normalised latent and rope key; queries are moved into the latent space
//! through `kv_b`'s key part and attention outputs back out through its value part. The
//! expanded formulation (per-head keys and values in the cache) is kept as the reference.

use std::path::Path;

use super::backend::{AttnShape, Backend, DeviceError, KvShape, RopeLayout, RopeOf, Weight};
use super::config::{Arch, ConfigError, ModelConfig, MoeConfig, ScoringFunc, TopkMethod};
use super::rope;
use super::sampler::{Pick, Sampled, MAX_ALTERNATIVES};
use super::weights::{Checkpoint, WeightsError};

/// The eps of DeepSeek's `q_a_layernorm` and `kv_a_layernorm` (their reference code builds
/// them with the RMSNorm default, whatever `rms_norm_eps` says).
const LORA_NORM_EPS: f32 = 1e-6;

/// Errors of loading a model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// `config.json`.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Weights.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// A request the model cannot serve.
    #[error("{0}")]
    Request(String),
    /// A request that does not fit beside those running (the KV cache is full); it may
    /// fit later.
    #[error("{0}")]
    Refused(String),
    /// The device failed, or the step's sequences do not fit its memory. The caches are
    /// as they were before the step.
    #[error(transparent)]
    Device(#[from] DeviceError),
}

struct Mlp<B: Backend> {
    gate: B::Buf,
    up: B::Buf,
    down: B::Buf,
    inter: usize,
}

enum Ffn<B: Backend> {
    Dense(Mlp<B>),
    Moe {
        gate: B::Buf,
        bias: Option<Vec<f32>>,
        /// `bias` on the backend (device routing).
        bias_buf: Option<B::Buf>,
        experts: Vec<Mlp<B>>,
        shared: Option<Mlp<B>>,
    },
}

enum Attn<B: Backend> {
    Gqa {
        q: B::Buf,
        k: B::Buf,
        v: B::Buf,
        o: B::Buf,
        bias: Option<(B::Buf, B::Buf, B::Buf)>,
    },
    Mla {
        /// `q_a_proj` and `q_a_layernorm`, when queries are low-rank.
        q_a: Option<(B::Buf, B::Buf)>,
        /// `q_proj`, or `q_b_proj` after `q_a`.
        q: B::Buf,
        kv_a: B::Buf,
        kv_a_norm: B::Buf,
        kv_b: B::Buf,
        /// `kv_b`'s key part per head, `[h, nope, lora]` (absorbed into the queries).
        w_uk: B::Buf,
        /// `kv_b`'s value part per head, `[h, dv, lora]` (applied after attention).
        w_uv: B::Buf,
        o: B::Buf,
    },
}

struct Layer<B: Backend> {
    in_norm: B::Buf,
    attn: Attn<B>,
    post_norm: B::Buf,
    ffn: Ffn<B>,
}

/// A loaded model.
pub struct Model<B: Backend> {
    cfg: ModelConfig,
    be: B,
    embed: B::Buf,
    layers: Vec<Layer<B>>,
    norm: B::Buf,
    lm_head: B::Buf,
    cos: B::Buf,
    sin: B::Buf,
    scale: f32,
    max_pos: usize,
    mla_absorbed: bool,
}

/// What a forward pass returns.
#[derive(Clone, Copy, PartialEq)]
enum Out<'a> {
    /// Logits of every position.
    All,
    /// Logits of each sequence's last position.
    Last,
    /// The token after each sequence's last position, with its log-probability.
    Pick(PickRows<'a>),
}

/// How [`Model::forward_batch_pick`] picks each sequence's next token.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PickRows<'a> {
    /// Each sequence's allowed tokens, `vocab_size.div_ceil(32)` words of bits per
    /// sequence (token `t` is bit `t % 32` of word `t / 32`): a grammar's mask. `None`:
    /// every token.
    pub allowed: Option<&'a [u32]>,
    /// Each sequence's tokens so far, bits as `allowed`'s, for its repetition penalty.
    pub seen: Option<&'a [u32]>,
    /// Each sequence's [`Pick`]. `None`: greedy, no penalty.
    pub picks: Option<&'a [Pick]>,
}

impl Out<'_> {
    /// The kind of step, for a backend that keeps its work per kind (graphs).
    fn code(self) -> u8 {
        match self {
            Out::All => 0,
            Out::Last => 1,
            Out::Pick(p) => {
                2 + u8::from(p.allowed.is_some())
                    + 2 * u8::from(p.picks.is_some())
                    + 4 * u8::from(p.seen.is_some())
                    + 8 * u8::from(
                        p.picks
                            .is_some_and(|p| p.iter().any(|p| p.alternatives > 0)),
                    )
            }
        }
    }
}

enum Outputs {
    Logits(Vec<Vec<f32>>),
    Tokens(Vec<Sampled>),
}

/// One sequence's key/value cache.
pub struct Cache<B: Backend> {
    kv: B::Kv,
    len: usize,
}

impl<B: Backend> Cache<B> {
    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` before the first token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Where weights come from.
enum Source<'a> {
    /// A checkpoint on disk.
    Checkpoint(&'a Checkpoint),
    /// Deterministic random weights of the configured shape (benchmarks): matrices
    /// uniform with standard deviation `1/√fan_in`, norms 1, biases 0.
    Random(u64),
}

struct Loader<'a, B: Backend> {
    src: Source<'a>,
    be: &'a B,
}

impl<B: Backend> Loader<'_, B> {
    fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, WeightsError> {
        match &self.src {
            Source::Checkpoint(ck) => ck.f32(name, shape),
            Source::Random(seed) => Ok(random_tensor(*seed, name, shape)),
        }
    }

    fn contains(&self, name: &str) -> bool {
        match &self.src {
            Source::Checkpoint(ck) => ck.contains(name),
            // Random models use the published (per-expert) layout, with an lm_head.
            Source::Random(_) => !name.ends_with("gate_up_proj"),
        }
    }

    /// Whether `name` is stored as bf16. Random weights stand for the published
    /// checkpoints, which are bf16.
    fn stored_bf16(&self, name: &str) -> bool {
        match &self.src {
            Source::Checkpoint(ck) => ck.is_bf16(name),
            Source::Random(_) => true,
        }
    }

    /// Uploads a matrix made from the values of `name` (a slice of it, or a product of
    /// it), in bf16 where the backend holds a matrix stored as `name` is in bf16.
    fn upload_like(&self, name: &str, values: &[f32], shape: &[usize]) -> B::Buf {
        if self.be.wants_bf16_weights(self.stored_bf16(name)) {
            let v: Vec<half::bf16> = values.iter().map(|x| half::bf16::from_f32(*x)).collect();
            self.be.upload_weight(Weight::Bf16(&v), shape)
        } else {
            self.be.upload_weight(Weight::F32(values), shape)
        }
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<B::Buf, WeightsError> {
        let stored_bf16 = self.stored_bf16(name);
        if shape.len() == 2 && self.be.wants_bf16_weights(stored_bf16) {
            let values = match &self.src {
                Source::Checkpoint(ck) => ck.bf16(name, shape)?,
                Source::Random(seed) => {
                    let (seed, amp) = random_params(*seed, name, shape);
                    if let Some(b) = self.be.random_weight(shape, amp, seed) {
                        return Ok(b);
                    }
                    let v = self.f32(name, shape)?;
                    v.into_iter().map(half::bf16::from_f32).collect()
                }
            };
            return Ok(self.be.upload_weight(Weight::Bf16(&values), shape));
        }
        Ok(self
            .be
            .upload_weight(Weight::F32(&self.f32(name, shape)?), shape))
    }

    fn mlp(&self, prefix: &str, hidden: usize, inter: usize) -> Result<Mlp<B>, WeightsError> {
        Ok(Mlp {
            gate: self.get(&format!("{prefix}.gate_proj.weight"), &[inter, hidden])?,
            up: self.get(&format!("{prefix}.up_proj.weight"), &[inter, hidden])?,
            down: self.get(&format!("{prefix}.down_proj.weight"), &[hidden, inter])?,
            inter,
        })
    }
}

impl<B: Backend> Model<B> {
    /// Loads `config.json` and the weights of a checkpoint directory.
    pub fn load(dir: &Path, be: B) -> Result<Model<B>, EngineError> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let ck = Checkpoint::open(dir)?;
        Model::build(cfg, Source::Checkpoint(&ck), be)
    }

    /// A model of the configured shape with deterministic random weights (benchmarks of
    /// shapes whose checkpoints are not at hand).
    pub fn random(cfg: ModelConfig, be: B, seed: u64) -> Result<Model<B>, EngineError> {
        Model::build(cfg, Source::Random(seed), be)
    }

    fn build(cfg: ModelConfig, src: Source<'_>, be: B) -> Result<Model<B>, EngineError> {
        let l = Loader { src, be: &be };
        let hd = cfg.hidden_size;
        let embed = l.get("model.embed_tokens.weight", &[cfg.vocab_size, hd])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let attn = match &cfg.mla {
                None => {
                    let (h, kvh, d) = (
                        cfg.num_attention_heads,
                        cfg.num_key_value_heads,
                        cfg.head_dim,
                    );
                    let a = format!("{p}.self_attn");
                    let bias = if cfg.attention_bias {
                        Some((
                            l.get(&format!("{a}.q_proj.bias"), &[h * d])?,
                            l.get(&format!("{a}.k_proj.bias"), &[kvh * d])?,
                            l.get(&format!("{a}.v_proj.bias"), &[kvh * d])?,
                        ))
                    } else {
                        None
                    };
                    Attn::Gqa {
                        q: l.get(&format!("{a}.q_proj.weight"), &[h * d, hd])?,
                        k: l.get(&format!("{a}.k_proj.weight"), &[kvh * d, hd])?,
                        v: l.get(&format!("{a}.v_proj.weight"), &[kvh * d, hd])?,
                        o: l.get(&format!("{a}.o_proj.weight"), &[hd, h * d])?,
                        bias,
                    }
                }
                Some(m) => {
                    let h = cfg.num_attention_heads;
                    let qd = m.qk_nope_head_dim + m.qk_rope_head_dim;
                    let a = format!("{p}.self_attn");
                    let (q_a, q) = match m.q_lora_rank {
                        Some(r) => (
                            Some((
                                l.get(&format!("{a}.q_a_proj.weight"), &[r, hd])?,
                                l.get(&format!("{a}.q_a_layernorm.weight"), &[r])?,
                            )),
                            l.get(&format!("{a}.q_b_proj.weight"), &[h * qd, r])?,
                        ),
                        None => (None, l.get(&format!("{a}.q_proj.weight"), &[h * qd, hd])?),
                    };
                    let kv_b_name = format!("{a}.kv_b_proj.weight");
                    let kv_b_shape = [h * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank];
                    let kv_b = l.f32(&kv_b_name, &kv_b_shape)?;
                    let (w_uk, w_uv) =
                        split_kv_b(&kv_b, h, m.qk_nope_head_dim, m.v_head_dim, m.kv_lora_rank);
                    Attn::Mla {
                        q_a,
                        q,
                        kv_a: l.get(
                            &format!("{a}.kv_a_proj_with_mqa.weight"),
                            &[m.kv_lora_rank + m.qk_rope_head_dim, hd],
                        )?,
                        kv_a_norm: l
                            .get(&format!("{a}.kv_a_layernorm.weight"), &[m.kv_lora_rank])?,
                        kv_b: l.upload_like(&kv_b_name, &kv_b, &kv_b_shape),
                        w_uk: be.upload(&w_uk),
                        w_uv: be.upload(&w_uv),
                        o: l.get(&format!("{a}.o_proj.weight"), &[hd, h * m.v_head_dim])?,
                    }
                }
            };
            let ffn = match &cfg.moe {
                Some(moe) if cfg.is_moe_layer(i) => Self::load_moe(&l, &p, hd, moe)?,
                _ => Ffn::Dense(l.mlp(&format!("{p}.mlp"), hd, cfg.intermediate_size)?),
            };
            layers.push(Layer {
                in_norm: l.get(&format!("{p}.input_layernorm.weight"), &[hd])?,
                attn,
                post_norm: l.get(&format!("{p}.post_attention_layernorm.weight"), &[hd])?,
                ffn,
            });
        }
        let norm = l.get("model.norm.weight", &[hd])?;
        let lm_head = if cfg.tie_word_embeddings && !l.contains("lm_head.weight") {
            embed.clone()
        } else {
            l.get("lm_head.weight", &[cfg.vocab_size, hd])?
        };
        let (rot_dim, head_dim) = match &cfg.mla {
            Some(m) => (m.qk_rope_head_dim, m.qk_nope_head_dim + m.qk_rope_head_dim),
            None => (cfg.head_dim, cfg.head_dim),
        };
        let max_pos = cfg.max_position_embeddings.clamp(1, 1 << 17);
        let (cos, sin) = rope::tables(rot_dim, cfg.rope_theta, &cfg.rope_scaling, max_pos);
        let scale = match cfg.arch {
            Arch::DeepseekV2 | Arch::DeepseekV3 => rope::softmax_scale(head_dim, &cfg.rope_scaling),
            Arch::Qwen2 | Arch::Llama => 1.0 / (head_dim as f64).sqrt(),
        } as f32;
        Ok(Model {
            cos: be.upload(&cos),
            sin: be.upload(&sin),
            cfg,
            be,
            embed,
            layers,
            norm,
            lm_head,
            scale,
            max_pos,
            mla_absorbed: true,
        })
    }

    fn load_moe(
        l: &Loader<'_, B>,
        p: &str,
        hd: usize,
        moe: &MoeConfig,
    ) -> Result<Ffn<B>, WeightsError> {
        let n = moe.n_routed_experts;
        let gate = l.get(&format!("{p}.mlp.gate.weight"), &[n, hd])?;
        let bias_name = format!("{p}.mlp.gate.e_score_correction_bias");
        let bias = if moe.topk_method == TopkMethod::NoauxTc || l.contains(&bias_name) {
            Some(l.f32(&bias_name, &[n])?)
        } else {
            None
        };
        let inter = moe.moe_intermediate_size;
        let experts = if l.contains(&format!("{p}.mlp.experts.0.gate_proj.weight")) {
            (0..n)
                .map(|j| l.mlp(&format!("{p}.mlp.experts.{j}"), hd, inter))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            // transformers 5 fused layout: gate_up_proj [n, 2·inter, hidden], down_proj [n, hidden, inter].
            let gu_name = format!("{p}.mlp.experts.gate_up_proj");
            let down_name = format!("{p}.mlp.experts.down_proj");
            let gu = l.f32(&gu_name, &[n, 2 * inter, hd])?;
            let down = l.f32(&down_name, &[n, hd, inter])?;
            (0..n)
                .map(|j| {
                    let e = &gu[j * 2 * inter * hd..(j + 1) * 2 * inter * hd];
                    Mlp {
                        gate: l.upload_like(&gu_name, &e[..inter * hd], &[inter, hd]),
                        up: l.upload_like(&gu_name, &e[inter * hd..], &[inter, hd]),
                        down: l.upload_like(
                            &down_name,
                            &down[j * hd * inter..(j + 1) * hd * inter],
                            &[hd, inter],
                        ),
                        inter,
                    }
                })
                .collect()
        };
        let shared = if moe.n_shared_experts > 0 {
            Some(l.mlp(
                &format!("{p}.mlp.shared_experts"),
                hd,
                inter * moe.n_shared_experts,
            )?)
        } else {
            None
        };
        Ok(Ffn::Moe {
            gate,
            bias_buf: bias.as_deref().map(|b| l.be.upload(b)),
            bias,
            experts,
            shared,
        })
    }

    /// Chooses MLA's attention path (DeepSeek only; default: absorbed). Absorbed: the
    /// cache holds only each position's compressed latent and rope key, and the key/value
    /// up-projections are folded into the queries and the output. Expanded: the cache holds
    /// every head's keys and values (the reference formulation). Set it before creating
    /// caches: the two keep different caches.
    pub fn set_mla_absorbed(&mut self, absorbed: bool) {
        self.mla_absorbed = absorbed;
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> &B {
        &self.be
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// An empty cache for one sequence.
    pub fn new_cache(&self) -> Cache<B> {
        Cache {
            kv: self.be.new_kv(self.kv_shape()),
            len: 0,
        }
    }

    /// A copy of `cache` holding only its first `keep` positions: the cache of a shared
    /// prompt prefix, to start another sequence from.
    pub fn cache_prefix(&self, cache: &Cache<B>, keep: usize) -> Cache<B> {
        self.cut(cache, keep.min(cache.len))
    }

    /// The first `keep` rows of every layer's cache (a paged backend shares the blocks).
    fn cut(&self, cache: &Cache<B>, keep: usize) -> Cache<B> {
        Cache {
            kv: self.be.kv_prefix(&cache.kv, keep),
            len: keep,
        }
    }

    /// A sequence's cache: its layers, the widths of a row of keys and of values, and
    /// whether the values are the keys' first columns.
    fn kv_shape(&self) -> KvShape {
        let c = &self.cfg;
        let (kcols, vcols, values_in_keys) = match &c.mla {
            None => (
                c.num_key_value_heads * c.head_dim,
                c.num_key_value_heads * c.head_dim,
                false,
            ),
            Some(m) if self.mla_absorbed => {
                (m.kv_lora_rank + m.qk_rope_head_dim, m.kv_lora_rank, true)
            }
            Some(m) => (
                c.num_attention_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim),
                c.num_attention_heads * m.v_head_dim,
                false,
            ),
        };
        KvShape {
            layers: self.layers.len(),
            kcols,
            vcols,
            values_in_keys,
        }
    }

    /// After a device error: every cache back to the positions it had before the step,
    /// and the error.
    fn roll_back(&self, seqs: &mut [(&[u32], &mut Cache<B>)], err: DeviceError) -> EngineError {
        self.restore(seqs);
        // The cuts themselves may have failed on a broken device: report the first error.
        let _ = self.be.take_error();
        EngineError::Device(err)
    }

    /// Every cache back to the positions it had before the step.
    fn restore(&self, seqs: &mut [(&[u32], &mut Cache<B>)]) {
        for (_, cache) in seqs.iter_mut() {
            let len = cache.len;
            **cache = self.cut(cache, len);
        }
    }

    fn mlp(&self, m: &Mlp<B>, x: &B::Buf, t: usize) -> B::Buf {
        let hd = self.cfg.hidden_size;
        let h = self.be.gate_up(x, t, &m.gate, &m.up, m.inter, hd);
        self.be.linear(&h, t, &m.down, hd, m.inter)
    }

    /// Runs `ids` (the next positions of the sequence in `cache`) and returns the logits of
    /// every one of them, `[ids.len(), vocab]`.
    pub fn forward(&self, ids: &[u32], cache: &mut Cache<B>) -> Result<Vec<f32>, EngineError> {
        let mut out = self.forward_batch(&mut [(ids, cache)])?;
        Ok(out.pop().unwrap_or_default())
    }

    /// Runs several sequences at once — prefill chunks or single decode tokens, each at
    /// its own position — and returns each one's logits, `[ids.len(), vocab]`. Every
    /// projection, MLP and expert runs once over the rows of all sequences; attention runs
    /// per sequence against its own cache.
    pub fn forward_batch(
        &self,
        seqs: &mut [(&[u32], &mut Cache<B>)],
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        match self.forward_rows(seqs, Out::All)? {
            Outputs::Logits(l) => Ok(l),
            Outputs::Tokens(_) => unreachable!("asked for logits"),
        }
    }

    /// Like [`Model::forward_batch`], but returns only the logits of each sequence's last
    /// position, `[vocab]` (what generation needs: the output head runs once per sequence,
    /// not once per prompt token).
    pub fn forward_batch_last(
        &self,
        seqs: &mut [(&[u32], &mut Cache<B>)],
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        match self.forward_rows(seqs, Out::Last)? {
            Outputs::Logits(l) => Ok(l),
            Outputs::Tokens(_) => unreachable!("asked for logits"),
        }
    }

    /// Like [`Model::forward_batch_last`], but returns each sequence's greedy next token
    /// and its log-probability, chosen where the logits are (on the device for a GPU
    /// backend: only the token ids and log-probabilities come back).
    pub fn forward_batch_greedy(
        &self,
        seqs: &mut [(&[u32], &mut Cache<B>)],
    ) -> Result<Vec<Sampled>, EngineError> {
        self.forward_batch_pick(seqs, PickRows::default())
    }

    /// Like [`Model::forward_batch_greedy`], with each sequence's token picked as
    /// `how` says (greedy or sampled by its draw, after its repetition penalty, among the
    /// tokens its grammar allows) where the logits are. The log-probabilities stay the
    /// model's own.
    pub fn forward_batch_pick(
        &self,
        seqs: &mut [(&[u32], &mut Cache<B>)],
        how: PickRows<'_>,
    ) -> Result<Vec<Sampled>, EngineError> {
        let words = self.cfg.vocab_size.div_ceil(32);
        for (what, bits) in [("token mask", how.allowed), ("seen tokens", how.seen)] {
            if let Some(b) = bits {
                if b.len() != seqs.len() * words {
                    return Err(EngineError::Request(format!(
                        "{what}: {} words for {} sequences of {words}",
                        b.len(),
                        seqs.len()
                    )));
                }
            }
        }
        let too_many = how
            .picks
            .into_iter()
            .flatten()
            .map(|p| p.alternatives)
            .max();
        if let Some(n) = too_many.filter(|n| *n > MAX_ALTERNATIVES) {
            return Err(EngineError::Request(format!(
                "{n} alternatives asked for, at most {MAX_ALTERNATIVES} are reported"
            )));
        }
        if how.picks.is_some_and(|p| p.len() != seqs.len()) {
            return Err(EngineError::Request(format!(
                "{} picks for {} sequences",
                how.picks.map_or(0, <[Pick]>::len),
                seqs.len()
            )));
        }
        match self.forward_rows(seqs, Out::Pick(how))? {
            Outputs::Tokens(t) => Ok(t),
            Outputs::Logits(_) => unreachable!("asked for tokens"),
        }
    }

    fn forward_rows(
        &self,
        seqs: &mut [(&[u32], &mut Cache<B>)],
        out: Out<'_>,
    ) -> Result<Outputs, EngineError> {
        let last_only = out != Out::All;
        for (ids, cache) in seqs.iter() {
            if cache.len + ids.len() > self.max_pos {
                return Err(EngineError::Request(format!(
                    "{} positions exceed the model's {} (max_position_embeddings)",
                    cache.len + ids.len(),
                    self.max_pos
                )));
            }
            if last_only && ids.is_empty() {
                return Err(EngineError::Request(
                    "a sequence in the batch has no tokens to run".into(),
                ));
            }
            if let Some(bad) = ids.iter().find(|i| **i as usize >= self.cfg.vocab_size) {
                return Err(EngineError::Request(format!(
                    "token id {bad} is outside the vocabulary ({})",
                    self.cfg.vocab_size
                )));
            }
        }
        let be = &self.be;
        let lens: Vec<usize> = seqs.iter().map(|(ids, _)| ids.len()).collect();
        let total: usize = lens.iter().sum();
        if total == 0 {
            return Ok(match out {
                Out::Pick(..) => Outputs::Tokens(Vec::new()),
                _ => Outputs::Logits(vec![Vec::new(); seqs.len()]),
            });
        }
        // A backend may give up a step it was replaying or capturing into a graph: the
        // caches are put back and the step runs again, eagerly.
        let mut graphs = true;
        let (logits, tokens) = loop {
            be.begin_step(&lens, out.code(), graphs);
            let r = self.step(seqs, &lens, out);
            let err = be.take_error();
            if be.end_step() {
                if let Some(err) = err {
                    return Err(self.roll_back(seqs, err));
                }
                break r;
            }
            self.restore(seqs);
            graphs = false;
        };
        let vocab = self.cfg.vocab_size;
        for (ids, cache) in seqs.iter_mut() {
            cache.len += ids.len();
        }
        match out {
            Out::Pick(..) => return Ok(Outputs::Tokens(tokens)),
            Out::Last => {
                return Ok(Outputs::Logits(
                    logits.chunks(vocab).map(<[f32]>::to_vec).collect(),
                ))
            }
            Out::All => {}
        }
        let mut rows = Vec::with_capacity(seqs.len());
        let mut at = 0;
        for len in lens {
            rows.push(logits[at * vocab..(at + len) * vocab].to_vec());
            at += len;
        }
        Ok(Outputs::Logits(rows))
    }

    /// One pass of the layers over the step's rows: the logits asked for (all rows, or
    /// each sequence's last) or the greedy tokens. Device errors are left with the backend.
    fn step(
        &self,
        seqs: &mut [(&[u32], &mut Cache<B>)],
        lens: &[usize],
        out: Out<'_>,
    ) -> (Vec<f32>, Vec<Sampled>) {
        let be = &self.be;
        let hd = self.cfg.hidden_size;
        let eps = self.cfg.rms_norm_eps as f32;
        let last_only = out != Out::All;
        let total: usize = lens.iter().sum();
        let ids: Vec<u32> = seqs
            .iter()
            .flat_map(|(ids, _)| ids.iter().copied())
            .collect();
        let positions: Vec<usize> = seqs
            .iter()
            .flat_map(|(ids, c)| c.len..c.len + ids.len())
            .collect();
        let mut x = be.gather_rows(&self.embed, hd, &ids);
        // Room for the step's rows in every layer's cache, once.
        let mut caches: Vec<&mut B::Kv> = seqs.iter_mut().map(|(_, c)| &mut c.kv).collect();
        be.kv_grow(&mut caches, lens);
        for (li, layer) in self.layers.iter().enumerate() {
            // The norms before the attention's and a dense MLP's first projections run
            // inside those projections (one launch fewer each on a device).
            let (out, o, width) = self.attention(
                &layer.attn,
                &x,
                (&layer.in_norm, eps),
                total,
                &positions,
                lens,
                li,
                &mut caches,
            );
            be.linear_acc(&mut x, &out, total, o, hd, width);
            match &layer.ffn {
                Ffn::Dense(m) => {
                    let h = be.norm_gate_up(
                        &x,
                        (&layer.post_norm, eps),
                        total,
                        &m.gate,
                        &m.up,
                        m.inter,
                        hd,
                    );
                    be.linear_acc(&mut x, &h, total, &m.down, hd, m.inter);
                }
                Ffn::Moe {
                    gate,
                    bias,
                    bias_buf,
                    experts,
                    shared,
                } => {
                    let xn = be.rms_norm(&x, &layer.post_norm, eps);
                    let y = self.moe(
                        gate,
                        (bias.as_deref(), bias_buf.as_ref()),
                        experts,
                        shared.as_ref(),
                        &xn,
                        total,
                    );
                    be.add(&mut x, &y);
                }
            }
        }
        let vocab = self.cfg.vocab_size;
        // Every sequence one row (a decode step): the last rows are all the rows.
        let logits = if last_only && lens.iter().any(|&l| l != 1) {
            let mut last = Vec::with_capacity(lens.len());
            let mut end = 0;
            for len in lens {
                end += len;
                last.push((end - 1) as u32);
            }
            let x = be.gather_rows(&x, hd, &last);
            self.logits(&x, last.len())
        } else {
            self.logits(&x, total)
        };
        match out {
            Out::Pick(how) => {
                let picks = match how.picks {
                    Some(p) => be.pick_rows(&logits, vocab, how.allowed, how.seen, p),
                    None => be
                        .argmax_rows(&logits, vocab, how.allowed)
                        .into_iter()
                        .map(|(token, logprob)| Sampled {
                            token,
                            logprob,
                            top: Vec::new(),
                        })
                        .collect(),
                };
                (Vec::new(), picks)
            }
            _ => (be.download(&logits), Vec::new()),
        }
    }

    /// The logits of `t` final hidden rows: the last norm and the lm_head.
    fn logits(&self, x: &B::Buf, t: usize) -> B::Buf {
        let norm = (&self.norm, self.cfg.rms_norm_eps as f32);
        let (hd, vocab) = (self.cfg.hidden_size, self.cfg.vocab_size);
        self.norm_linear(x, norm, t, &self.lm_head, vocab, hd)
    }

    /// The model's RoPE of `rot_dim` dimensions for rows at `positions`.
    fn rope_of<'a>(
        &'a self,
        rot_dim: usize,
        positions: &'a [usize],
        layout: RopeLayout,
    ) -> RopeOf<'a, B::Buf> {
        RopeOf {
            rot_dim,
            positions,
            cos: &self.cos,
            sin: &self.sin,
            layout,
        }
    }

    /// `rms_norm(x)` with `norm`, projected by `w[n, k]` (on a device, the norm runs
    /// inside the projection).
    fn norm_linear(
        &self,
        x: &B::Buf,
        norm: (&B::Buf, f32),
        t: usize,
        w: &B::Buf,
        n: usize,
        k: usize,
    ) -> B::Buf {
        let mut out = self.be.norm_linear_parts(x, norm, t, k, &[(w, None, n)]);
        out.pop()
            .unwrap_or_else(|| unreachable!("one projection asked for"))
    }

    /// Causal attention of every sequence over its own cache (appending the step's rows).
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &B::Buf,
        k: &B::Buf,
        v: &B::Buf,
        lens: &[usize],
        li: usize,
        caches: &mut [&mut B::Kv],
        (h, hk, dk, dv): (usize, usize, usize, usize),
        values_in_keys: bool,
    ) -> B::Buf {
        let shape = AttnShape {
            h,
            hk,
            dk,
            dv,
            scale: self.scale,
            values_in_keys,
        };
        self.be.attend(q, k, v, lens, li, caches, shape)
    }

    /// The attention block of layer `li` over `rms_norm(x)` with `norm`: its output before
    /// the output projection, that projection's weight and its input width (the caller adds
    /// the projection into the residual stream).
    #[allow(clippy::too_many_arguments)]
    fn attention<'a>(
        &self,
        attn: &'a Attn<B>,
        x: &B::Buf,
        norm: (&B::Buf, f32),
        t: usize,
        positions: &[usize],
        lens: &[usize],
        li: usize,
        caches: &mut [&mut B::Kv],
    ) -> (B::Buf, &'a B::Buf, usize) {
        let be = &self.be;
        let hd = self.cfg.hidden_size;
        let h = self.cfg.num_attention_heads;
        match attn {
            Attn::Gqa { q, k, v, o, bias } => {
                let (kvh, d) = (self.cfg.num_key_value_heads, self.cfg.head_dim);
                let (qb, kb, vb) = match bias {
                    Some((qb, kb, vb)) => (Some(qb), Some(kb), Some(vb)),
                    None => (None, None, None),
                };
                // Queries and keys rotated (in the projections' pass on a device).
                let mut qkv = be
                    .norm_linear_parts_rope(
                        x,
                        norm,
                        t,
                        hd,
                        &[(q, qb, h * d), (k, kb, kvh * d), (v, vb, kvh * d)],
                        &[Some((d, 0)), Some((d, 0)), None],
                        self.rope_of(d, positions, RopeLayout::Halves),
                    )
                    .into_iter();
                let (Some(qx), Some(kx), Some(vx)) = (qkv.next(), qkv.next(), qkv.next()) else {
                    unreachable!("three projections asked for")
                };
                let out = self.attend(&qx, &kx, &vx, lens, li, caches, (h, kvh, d, d), false);
                (out, o, h * d)
            }
            Attn::Mla {
                q_a,
                q,
                kv_a,
                kv_a_norm,
                kv_b,
                w_uk,
                w_uv,
                o,
            } => {
                let Some(m) = &self.cfg.mla else {
                    unreachable!("MLA weights without MLA config")
                };
                let (nope, rope_d, dv, lora) = (
                    m.qk_nope_head_dim,
                    m.qk_rope_head_dim,
                    m.v_head_dim,
                    m.kv_lora_rank,
                );
                let qd = nope + rope_d;
                // DeepSeek's q_a/kv_a norms are built with the default eps, not rms_norm_eps.
                let eps = LORA_NORM_EPS;
                // The queries' first projection and the latent's, in one pass over x.
                let low_rank = match (q_a, m.q_lora_rank) {
                    (Some((qa, qa_norm)), Some(r)) => Some((qa, qa_norm, r)),
                    _ => None,
                };
                let (first, first_n) = low_rank.map_or((q, h * qd), |(qa, _, r)| (qa, r));
                // Each head's query rope part, and the latent's rope key (after the
                // latent itself), rotated (in the projections' pass on a device); with a
                // low-rank query, its queries in the second projection.
                let rope = self.rope_of(rope_d, positions, RopeLayout::Interleaved);
                let q_rot = Some((qd, nope));
                let mut parts = be
                    .norm_linear_parts_rope(
                        x,
                        norm,
                        t,
                        hd,
                        &[(first, None, first_n), (kv_a, None, lora + rope_d)],
                        &[
                            q_rot.filter(|_| low_rank.is_none()),
                            Some((lora + rope_d, lora)),
                        ],
                        rope,
                    )
                    .into_iter();
                let (Some(first), Some(kva)) = (parts.next(), parts.next()) else {
                    unreachable!("two projections asked for")
                };
                let qx = match low_rank {
                    Some((_, qa_norm, r)) => be
                        .norm_linear_parts_rope(
                            &first,
                            (qa_norm, eps),
                            t,
                            r,
                            &[(q, None, h * qd)],
                            &[q_rot],
                            rope,
                        )
                        .pop()
                        .unwrap_or_else(|| unreachable!("one projection asked for")),
                    None => first,
                };
                let latent =
                    be.rms_norm(&be.slice_cols(&kva, lora + rope_d, 0, lora), kv_a_norm, eps);
                let k_pe = be.slice_cols(&kva, lora + rope_d, lora, rope_d);
                if self.mla_absorbed {
                    // score = (W_UKᵀ q_nope) · c + q_pe · k_pe, output = W_UV (Σ p c).
                    let q_nope = be.slice_cols(&qx, qd, 0, nope); // [t·h, nope]
                    let q_pe = be.slice_cols(&qx, qd, nope, rope_d);
                    let q_lat = be.head_linear(&q_nope, t, h, w_uk, nope, lora, false); // [t, h, lora]
                    let q_cat = be.concat_cols(&q_lat, lora, &q_pe, rope_d);
                    let k_cat = be.concat_cols(&latent, lora, &k_pe, rope_d); // [t, lora + rope]
                    let ctx = self.attend(
                        &q_cat,
                        &k_cat,
                        &latent,
                        lens,
                        li,
                        caches,
                        (h, 1, lora + rope_d, lora),
                        true,
                    );
                    let out = be.head_linear(&ctx, t, h, w_uv, dv, lora, true); // [t, h, dv]
                    (out, o, h * dv)
                } else {
                    let kv = be.linear(&latent, t, kv_b, h * (nope + dv), lora);
                    let (kx, vx) = be.mla_expand(&kv, &k_pe, t, h, nope, dv, rope_d);
                    let out = self.attend(&qx, &kx, &vx, lens, li, caches, (h, h, qd, dv), false);
                    (out, o, h * dv)
                }
            }
        }
    }

    fn moe(
        &self,
        gate: &B::Buf,
        (bias, bias_buf): (Option<&[f32]>, Option<&B::Buf>),
        experts: &[Mlp<B>],
        shared: Option<&Mlp<B>>,
        x: &B::Buf,
        t: usize,
    ) -> B::Buf {
        let be = &self.be;
        let hd = self.cfg.hidden_size;
        let Some(moe) = &self.cfg.moe else {
            unreachable!("MoE weights without MoE config")
        };
        let n = moe.n_routed_experts;
        let logits = be.linear(x, t, gate, n, hd);
        let weights: Vec<[&B::Buf; 3]> =
            experts.iter().map(|e| [&e.gate, &e.up, &e.down]).collect();
        let inter = experts.first().map_or(0, |e| e.inter);
        if let Some(routed) = be.moe_routed(x, t, &logits, bias_buf, &weights, hd, inter, moe) {
            return match shared {
                Some(s) => {
                    let mut out = self.mlp(s, x, t);
                    be.add(&mut out, &routed);
                    out
                }
                None => routed,
            };
        }
        // Route on the host: a few numbers per token.
        let per_expert = route_tokens(&be.download(&logits), bias, moe);
        let mut out = match shared {
            Some(s) => self.mlp(s, x, t),
            None => be.upload(&vec![0.0; t * hd]),
        };
        for (e, (toks, ws)) in per_expert.iter().enumerate() {
            if toks.is_empty() {
                continue;
            }
            let ids: Vec<u32> = toks.iter().map(|&i| i as u32).collect();
            let xe = be.gather_rows(x, hd, &ids);
            let ye = self.mlp(&experts[e], &xe, toks.len());
            be.add_rows_scaled(&mut out, hd, &ye, toks, ws);
        }
        out
    }
}

/// Every token of the gate's `logits[t, n]` routed ([`route`]), gathered by expert: for
/// each of the `n`, the tokens it takes (in order) and their weights.
pub fn route_tokens(
    logits: &[f32],
    bias: Option<&[f32]>,
    moe: &MoeConfig,
) -> Vec<(Vec<usize>, Vec<f32>)> {
    let n = moe.n_routed_experts;
    let mut per_expert = vec![(Vec::new(), Vec::new()); n];
    for (tok, row) in logits.chunks_exact(n).enumerate() {
        for (e, w) in route(row, bias, moe) {
            per_expert[e].0.push(tok);
            per_expert[e].1.push(w);
        }
    }
    per_expert
}

/// DeepSeek's gate: which experts a token goes to, with which weights.
pub fn route(logits: &[f32], bias: Option<&[f32]>, moe: &MoeConfig) -> Vec<(usize, f32)> {
    let n = logits.len();
    let scores: Vec<f32> = match moe.scoring_func {
        ScoringFunc::Softmax => {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
            let s: f32 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        }
        ScoringFunc::Sigmoid => logits.iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect(),
    };
    // Scores used to choose (V3: bias-corrected); weights come from `scores`.
    let choice: Vec<f32> = match (moe.topk_method, bias) {
        (TopkMethod::NoauxTc, Some(b)) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
        _ => scores.clone(),
    };
    let k = moe.num_experts_per_tok;
    let per_group = n / moe.n_group;
    let allowed: Vec<bool> = match moe.topk_method {
        TopkMethod::Greedy => vec![true; n],
        TopkMethod::GroupLimitedGreedy | TopkMethod::NoauxTc => {
            let group_score: Vec<f32> = (0..moe.n_group)
                .map(|g| {
                    let mut s: Vec<f32> = choice[g * per_group..(g + 1) * per_group].to_vec();
                    s.sort_by(|a, b| b.total_cmp(a));
                    match moe.topk_method {
                        TopkMethod::NoauxTc => s.iter().take(2).sum(),
                        _ => s[0],
                    }
                })
                .collect();
            let keep = top_indices(&group_score, moe.topk_group);
            (0..n).map(|e| keep.contains(&(e / per_group))).collect()
        }
    };
    let masked: Vec<f32> = choice
        .iter()
        .zip(&allowed)
        .map(|(s, a)| if *a { *s } else { f32::NEG_INFINITY })
        .collect();
    let chosen = top_indices(&masked, k);
    let mut weights: Vec<f32> = chosen.iter().map(|&e| scores[e]).collect();
    let v3 = moe.topk_method == TopkMethod::NoauxTc;
    if k > 1 && moe.norm_topk_prob {
        let sum: f32 = weights.iter().sum::<f32>() + 1e-20;
        weights.iter_mut().for_each(|w| *w /= sum);
        if v3 {
            weights
                .iter_mut()
                .for_each(|w| *w *= moe.routed_scaling_factor as f32);
        }
    } else {
        weights
            .iter_mut()
            .for_each(|w| *w *= moe.routed_scaling_factor as f32);
    }
    chosen.into_iter().zip(weights).collect()
}

/// Indices of the `k` largest values (ties: lower index first).
fn top_indices(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|a, b| v[*b].total_cmp(&v[*a]).then(a.cmp(b)));
    idx.truncate(k);
    idx
}

/// The seed of one random tensor (from the model's seed and the tensor's name) and its
/// amplitude: uniform in `[-amp, amp]` has standard deviation `1/√fan_in`.
fn random_params(seed: u64, name: &str, shape: &[usize]) -> (u64, f32) {
    let mut h = seed ^ 0x9E37_79B9_7F4A_7C15;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let fan_in = *shape.last().unwrap_or(&1) as f32;
    (h, (3.0f32).sqrt() / fan_in.sqrt())
}

/// Deterministic random tensor for [`Model::random`].
fn random_tensor(seed: u64, name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    if name.ends_with("norm.weight") {
        return vec![1.0; n];
    }
    if name.ends_with(".bias") {
        return vec![0.0; n];
    }
    // A fast generator is enough: weights only need the right shape and scale.
    let (h, amp) = random_params(seed, name, shape);
    let mut x = h | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
        })
        .collect()
}

/// Splits MLA's `kv_b_proj` (`[h · (nope + dv), lora]`, per head the key rows then the
/// value rows) into per-head key and value blocks.
fn split_kv_b(kv_b: &[f32], h: usize, nope: usize, dv: usize, lora: usize) -> (Vec<f32>, Vec<f32>) {
    let mut uk = Vec::with_capacity(h * nope * lora);
    let mut uv = Vec::with_capacity(h * dv * lora);
    for i in 0..h {
        let base = i * (nope + dv) * lora;
        uk.extend_from_slice(&kv_b[base..base + nope * lora]);
        uv.extend_from_slice(&kv_b[base + nope * lora..base + (nope + dv) * lora]);
    }
    (uk, uv)
}
