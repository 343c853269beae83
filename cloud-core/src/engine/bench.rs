//! `cloud-core bench`: named model shapes, what one decode step must read, and the
//! prefill/decode measurements, for any backend.
//!
//! The roofline figure: a decode step has to read every weight the step uses once (bf16:
//! 2 bytes each; for MoE layers the experts the batch routes to) and every sequence's KV
//! cache (bf16). Divided by the step's time that is the bandwidth the step achieved; over
//! the bandwidth measured on the same device in the same run, the share of the memory
//! roofline: a device-to-device copy on a GPU, a read-only stream by every thread on the
//! CPU ([`host_bandwidth`]).

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::backend::Backend;
use super::config::ModelConfig;
use super::model::{Cache, Model, PickRows};
use super::sampler::Pick;

/// Shapes the benchmark knows, for `--shape`.
pub const SHAPES: &[&str] = &[
    "deepseek-r1-distill-qwen-1.5b",
    "deepseek-v2-lite",
    "deepseek-v2-mini",
    "tiny",
];

/// The configuration of a named shape.
pub fn shape(name: &str) -> Result<ModelConfig, String> {
    let json = match name {
        // DeepSeek-R1-Distill-Qwen-1.5B's config.json, as published (values that matter).
        "deepseek-r1-distill-qwen-1.5b" | "qwen2-1.5b" => {
            r#"{"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960,
            "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
            "vocab_size": 151936, "rope_theta": 10000, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 4096, "tie_word_embeddings": false}"#
        }
        // DeepSeek-V2-Lite's config.json, as published (15.7e9 parameters, 2.4e9 active).
        "deepseek-v2-lite" => {
            r#"{"model_type": "deepseek_v2", "hidden_size": 2048, "intermediate_size": 10944,
            "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
            "vocab_size": 102400, "kv_lora_rank": 512, "q_lora_rank": null,
            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
            "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
            "moe_intermediate_size": 1408, "first_k_dense_replace": 1, "moe_layer_freq": 1,
            "topk_method": "greedy", "n_group": 1, "topk_group": 1, "norm_topk_prob": false,
            "routed_scaling_factor": 1.0, "scoring_func": "softmax", "rms_norm_eps": 1e-6,
            "rope_theta": 10000, "max_position_embeddings": 163840, "tie_word_embeddings": false,
            "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}}"#
        }
        // DeepSeek-V2-Lite's architecture at a size that fits a small machine in f32.
        "deepseek-v2-mini" => {
            r#"{"model_type": "deepseek_v2", "hidden_size": 1024, "intermediate_size": 2816,
            "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 32000,
            "kv_lora_rank": 256, "q_lora_rank": null, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32,
            "v_head_dim": 64, "n_routed_experts": 32, "n_shared_experts": 2, "num_experts_per_tok": 6,
            "moe_intermediate_size": 352, "first_k_dense_replace": 1, "topk_method": "greedy",
            "rope_theta": 10000, "max_position_embeddings": 4096,
            "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}}"#
        }
        "tiny" => {
            r#"{"model_type": "qwen2", "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096,
            "max_position_embeddings": 1024}"#
        }
        other => return Err(format!("unknown shape {other:?} ({})", SHAPES.join(", "))),
    };
    ModelConfig::from_json(json, std::path::Path::new(name)).map_err(|e| e.to_string())
}

/// Parameters of one layer's attention.
fn attention_params(c: &ModelConfig) -> usize {
    match &c.mla {
        Some(m) => {
            let qd = m.qk_nope_head_dim + m.qk_rope_head_dim;
            let q = match m.q_lora_rank {
                Some(r) => c.hidden_size * r + r * c.num_attention_heads * qd,
                None => c.hidden_size * c.num_attention_heads * qd,
            };
            q + c.hidden_size * (m.kv_lora_rank + m.qk_rope_head_dim)
                + m.kv_lora_rank * c.num_attention_heads * (m.qk_nope_head_dim + m.v_head_dim)
                + c.num_attention_heads * m.v_head_dim * c.hidden_size
        }
        None => {
            c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
        }
    }
}

/// Every parameter of the model (embeddings and output head counted apart when untied).
pub fn parameters(c: &ModelConfig) -> usize {
    let mlp: usize = (0..c.num_hidden_layers)
        .map(|i| match &c.moe {
            Some(m) if c.is_moe_layer(i) => {
                3 * c.hidden_size
                    * m.moe_intermediate_size
                    * (m.n_routed_experts + m.n_shared_experts)
                    + m.n_routed_experts * c.hidden_size
            }
            _ => 3 * c.hidden_size * c.intermediate_size,
        })
        .sum();
    let head = if c.tie_word_embeddings { 1 } else { 2 };
    c.num_hidden_layers * attention_params(c) + mlp + head * c.vocab_size * c.hidden_size
}

/// Bytes one decode step of `batch` sequences, each with `context` positions cached, must
/// read at the least: bf16 weights it uses (MoE: the routed experts a batch of that size
/// reaches on average under uniform routing, `n·(1 − (1 − k/n)^batch)` per layer), the
/// output head, and the bf16 KV cache (MLA: the latent and rope key only).
pub fn decode_bytes(c: &ModelConfig, batch: usize, context: usize) -> f64 {
    decode_bytes_as(c, batch, context, ElementBytes::BF16)
}

/// Bytes per element of the matrices and of the KV cache a backend holds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ElementBytes {
    /// Bytes per matrix element (a mix of bf16 and f32 matrices: their mean).
    pub weights: f64,
    /// Bytes per cached key or value element.
    pub cache: f64,
}

impl ElementBytes {
    /// bf16 matrices and cache (the CUDA backend).
    pub const BF16: ElementBytes = ElementBytes {
        weights: 2.0,
        cache: 2.0,
    };
}

/// [`decode_bytes`] with matrices and cache held as `elem` says.
pub fn decode_bytes_as(c: &ModelConfig, batch: usize, context: usize, elem: ElementBytes) -> f64 {
    let b = batch.max(1) as f64;
    let mut weights = 0.0;
    for i in 0..c.num_hidden_layers {
        weights += attention_params(c) as f64;
        weights += match &c.moe {
            Some(m) if c.is_moe_layer(i) => {
                let n = m.n_routed_experts as f64;
                let k = m.num_experts_per_tok as f64;
                let reached = n * (1.0 - (1.0 - k / n).powf(b));
                let expert = 3.0 * (c.hidden_size * m.moe_intermediate_size) as f64;
                (reached + m.n_shared_experts as f64) * expert
                    + (m.n_routed_experts * c.hidden_size) as f64
            }
            _ => 3.0 * (c.hidden_size * c.intermediate_size) as f64,
        };
    }
    // The output head, and one embedding row per sequence.
    weights += (c.vocab_size * c.hidden_size) as f64 + b * c.hidden_size as f64;
    let row = match &c.mla {
        Some(m) => m.kv_lora_rank + m.qk_rope_head_dim,
        None => 2 * c.num_key_value_heads * c.head_dim,
    };
    let cache = b * context as f64 * (c.num_hidden_layers * row) as f64;
    weights * elem.weights + cache * elem.cache
}

/// Options of a run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Prompt tokens per sequence.
    pub prompt: usize,
    /// Decode steps per measurement.
    pub steps: usize,
    /// Batch sizes.
    pub batches: Vec<usize>,
    /// Decode by sampling with this temperature and top-p (each step's draws from a
    /// fixed seed) instead of greedily: what picking a sampled token costs.
    pub sample: Option<(f32, f32)>,
    /// How the backend holds matrices and cache, for the bytes a step reads.
    pub elements: ElementBytes,
}

/// One batch size's figures.
#[derive(Clone, Debug)]
pub struct Row {
    /// Sequences.
    pub batch: usize,
    /// Prompt tokens per second, all sequences' prompts in one forward pass.
    pub prefill_tps: f64,
    /// Generated tokens per second over all sequences.
    pub decode_tps: f64,
    /// Milliseconds per decode step.
    pub step_ms: f64,
    /// Bytes a decode step must read (mid-measurement context).
    pub step_bytes: f64,
    /// Milliseconds of host time per decode step replayed from a CUDA graph, from the
    /// step's start to its graph's launch, the upload and launch calls apart (`None`: no
    /// step was replayed).
    pub replay_host_ms: Option<f64>,
}

fn prompt_ids(vocab: usize, n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(7919).wrapping_add(13 + salt * 31)) % vocab as u32)
        .collect()
}

/// Measures prefill and decode (greedy, or sampled as `opts.sample` says) at every batch
/// size, the tokens picked where the logits are.
pub fn run<B: Backend>(
    model: &Model<B>,
    opts: &BenchOptions,
    mut report: impl FnMut(&Row),
) -> Result<Vec<Row>, String> {
    let cfg = model.config().clone();
    let mut rows = Vec::new();
    // One warm-up pass (kernel loading, allocator pools, cuBLAS heuristics).
    {
        let mut c = model.new_cache();
        let ids = prompt_ids(cfg.vocab_size, opts.prompt.clamp(1, 16), 0);
        model
            .forward_batch_greedy(&mut [(&ids, &mut c)])
            .map_err(|e| e.to_string())?;
    }
    for &b in &opts.batches {
        let t = Instant::now();
        let (mut caches, mut next) = prefill(model, b, opts.prompt)?;
        let prefill_s = t.elapsed().as_secs_f64();
        let before = model.backend().graph_stats().unwrap_or_default();
        let t = Instant::now();
        decode(model, &mut caches, &mut next, opts)?;
        let decode_s = t.elapsed().as_secs_f64().max(1e-9);
        let after = model.backend().graph_stats().unwrap_or_default();
        let replayed = after.replayed - before.replayed;
        let row = Row {
            batch: b,
            prefill_tps: (b * opts.prompt) as f64 / prefill_s.max(1e-9),
            decode_tps: (b * opts.steps) as f64 / decode_s,
            step_ms: decode_s * 1e3 / opts.steps.max(1) as f64,
            step_bytes: decode_bytes_as(&cfg, b, opts.prompt + opts.steps / 2, opts.elements),
            replay_host_ms: (replayed > 0).then(|| {
                (after.replay_host_ns - before.replay_host_ns) as f64 / 1e6 / replayed as f64
            }),
        };
        report(&row);
        rows.push(row);
    }
    Ok(rows)
}

/// Prefills `b` sequences as [`run`] does, then calls `start` and runs `opts.steps`
/// decode steps: for a backend to observe decode steps alone (a profile).
pub fn decode_after<B: Backend>(
    model: &Model<B>,
    opts: &BenchOptions,
    b: usize,
    start: impl FnOnce(),
) -> Result<(), String> {
    let (mut caches, mut next) = prefill(model, b, opts.prompt)?;
    start();
    decode(model, &mut caches, &mut next, opts)
}

/// `b` sequences of `prompt` tokens in one forward pass: their caches and next tokens.
fn prefill<B: Backend>(
    model: &Model<B>,
    b: usize,
    prompt: usize,
) -> Result<(Vec<Cache<B>>, Vec<u32>), String> {
    let vocab = model.config().vocab_size;
    let prompts: Vec<Vec<u32>> = (0..b)
        .map(|i| prompt_ids(vocab, prompt.max(1), i as u32))
        .collect();
    let mut caches: Vec<Cache<B>> = (0..b).map(|_| model.new_cache()).collect();
    let mut batch: Vec<(&[u32], &mut Cache<B>)> = prompts
        .iter()
        .map(|p| p.as_slice())
        .zip(caches.iter_mut())
        .collect();
    let next = model
        .forward_batch_greedy(&mut batch)
        .map_err(|e| format!("prefill, batch {b}: {e}"))?;
    Ok((caches, next.iter().map(|s| s.token).collect()))
}

/// `opts.steps` decode steps of every sequence, each step's tokens picked as
/// `opts.sample` says (the draws from a seed of the batch size).
fn decode<B: Backend>(
    model: &Model<B>,
    caches: &mut [Cache<B>],
    next: &mut Vec<u32>,
    opts: &BenchOptions,
) -> Result<(), String> {
    let b = caches.len();
    let mut rng = StdRng::seed_from_u64(b as u64);
    for _ in 0..opts.steps {
        let inputs: Vec<[u32; 1]> = next.iter().map(|t| [*t]).collect();
        let mut batch: Vec<(&[u32], &mut Cache<B>)> = inputs
            .iter()
            .map(|v| &v[..])
            .zip(caches.iter_mut())
            .collect();
        let sampled: Option<Vec<Pick>> = opts.sample.map(|(temperature, top_p)| {
            (0..b)
                .map(|_| Pick {
                    temperature,
                    top_k: 0,
                    top_p,
                    draw: rng.random(),
                    repetition_penalty: 1.0,
                    alternatives: 0,
                })
                .collect()
        });
        let picks = model
            .forward_batch_pick(
                &mut batch,
                PickRows {
                    picks: sampled.as_deref(),
                    ..PickRows::default()
                },
            )
            .map_err(|e| format!("decode, batch {b}: {e}"))?;
        *next = picks.iter().map(|s| s.token).collect();
    }
    Ok(())
}

/// The host memory bandwidths the CPU backend's figures are compared with, measured
/// now by every thread the backend uses, each on its own part of buffers well past the
/// caches.
#[derive(Clone, Copy, Debug)]
pub struct HostBandwidth {
    /// A plain copy: bytes read + written per second.
    pub copy: f64,
    /// A read-only stream (a sum of every value, in the backend's widest loads): bytes
    /// read per second. What a decode step does to its weights and cache, so the CPU
    /// backend's roofline.
    pub read: f64,
}

/// [`HostBandwidth`], measured now.
pub fn host_bandwidth() -> HostBandwidth {
    use rayon::prelude::*;
    let n = 64 << 20; // 256 MiB of f32, well past the caches (and written: not the zero page)
    let src = vec![1f32; n];
    let mut dst = vec![0f32; n];
    let part = n.div_ceil(rayon::current_num_threads().max(1));
    // The fastest of a few passes: what the memory gives when nothing else is in the way
    // (one pass disturbed by another process would read low, and a share above 100%).
    let timed = |f: &mut dyn FnMut()| {
        f(); // pages touched, threads woken
        (0..6)
            .map(|_| {
                let t = Instant::now();
                f();
                (4 * n) as f64 / t.elapsed().as_secs_f64()
            })
            .fold(0.0, f64::max)
    };
    let copy = timed(&mut || {
        dst.par_chunks_mut(part)
            .zip(src.par_chunks(part))
            .for_each(|(d, s)| d.copy_from_slice(std::hint::black_box(s)));
        std::hint::black_box(&mut dst);
    });
    let read = timed(&mut || {
        let sum: f32 = src
            .par_chunks(part)
            .map(|s| super::backend::cpu::stream_sum(std::hint::black_box(s)))
            .sum();
        std::hint::black_box(sum);
    });
    HostBandwidth {
        copy: 2.0 * copy,
        read,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_published_shapes_have_their_published_sizes() {
        let qwen = shape("deepseek-r1-distill-qwen-1.5b").expect("shape");
        let p = parameters(&qwen) as f64;
        assert!((p / 1.777e9 - 1.0).abs() < 0.01, "Qwen 1.5B: {p:e}");
        let lite = shape("deepseek-v2-lite").expect("shape");
        let p = parameters(&lite) as f64;
        assert!((p / 15.7e9 - 1.0).abs() < 0.01, "V2-Lite: {p:e}");
        // Active per token: DeepSeek reports 2.4e9 for V2-Lite (the embedding table aside).
        let active = decode_bytes(&lite, 1, 0) / 2.0;
        assert!(
            (active / 2.4e9 - 1.0).abs() < 0.05,
            "V2-Lite active: {active:e}"
        );
    }

    #[test]
    fn decode_bytes_count_the_weights_once_and_the_cache_per_sequence() {
        let qwen = shape("deepseek-r1-distill-qwen-1.5b").expect("shape");
        let w1 = decode_bytes(&qwen, 1, 0);
        // All weights but the embedding table, in bf16.
        let expect = (parameters(&qwen) - qwen.vocab_size * qwen.hidden_size + qwen.hidden_size)
            as f64
            * 2.0;
        assert!((w1 - expect).abs() < 1.0, "{w1} vs {expect}");
        // A dense model reads its weights once whatever the batch; the cache grows with it.
        let row = 2.0 * (28 * 2 * 2 * 128) as f64;
        let d = decode_bytes(&qwen, 8, 100) - decode_bytes(&qwen, 8, 0);
        assert!((d - 8.0 * 100.0 * row).abs() < 1.0);
        // f32 matrices read twice the bytes; an f32 cache twice the cache's.
        let f32_all = ElementBytes {
            weights: 4.0,
            cache: 4.0,
        };
        assert!((decode_bytes_as(&qwen, 1, 0, f32_all) - 2.0 * w1).abs() < 1.0);
        let bf16_weights = ElementBytes {
            weights: 2.0,
            cache: 4.0,
        };
        let d32 = decode_bytes_as(&qwen, 8, 100, bf16_weights)
            - decode_bytes_as(&qwen, 8, 0, bf16_weights);
        assert!((d32 - 2.0 * d).abs() < 1.0);
        // MoE: a larger batch reaches more experts, never more than all of them.
        let lite = shape("deepseek-v2-lite").expect("shape");
        let (b1, b8, b64, b1k) = (
            decode_bytes(&lite, 1, 0),
            decode_bytes(&lite, 8, 0),
            decode_bytes(&lite, 64, 0),
            decode_bytes(&lite, 1024, 0),
        );
        assert!(b1 < b8 && b8 < b64 && b64 <= b1k);
        assert!(b1k <= parameters(&lite) as f64 * 2.0 + 1024.0 * 2.0 * 2048.0);
    }

    #[test]
    fn a_tiny_run_reports_every_batch_on_the_cpu() {
        let cfg = shape("tiny").expect("shape");
        let model =
            Model::random(cfg, super::super::backend::cpu::Cpu::default(), 1).expect("model");
        let rows = run(
            &model,
            &BenchOptions {
                prompt: 8,
                steps: 2,
                batches: vec![1, 3],
                sample: None,
                elements: ElementBytes::BF16,
            },
            |_| {},
        )
        .expect("run");
        assert_eq!(rows.len(), 2);
        assert!(rows
            .iter()
            .all(|r| r.decode_tps > 0.0 && r.prefill_tps > 0.0 && r.step_bytes > 0.0));
        let sampled = run(
            &model,
            &BenchOptions {
                prompt: 8,
                steps: 2,
                batches: vec![2],
                sample: Some((1.0, 0.9)),
                elements: ElementBytes::BF16,
            },
            |_| {},
        )
        .expect("sampled run");
        assert!(sampled[0].decode_tps > 0.0);
    }

    #[test]
    fn unknown_shapes_are_named_with_the_known_ones() {
        let e = shape("gpt-5").expect_err("unknown");
        assert!(e.contains("deepseek-v2-lite"), "{e}");
    }
}
