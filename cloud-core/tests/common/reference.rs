//! Reading the reference fixtures (`fixtures/parity/`: transformers' logits for small
//! random checkpoints) and comparing logits with them, for the CPU parity tests and the
//! CUDA suite.
#![allow(dead_code)] // each test crate uses part of it

use std::path::{Path, PathBuf};

use cloud_core::engine::backend::Backend;
use cloud_core::engine::model::Model;
use serde_json::Value;

/// The rule for bf16 weights (and a bf16 cache) against the f32 references: at every
/// prefill position and decode step `max|Δlogit| / max|logit| ≤ BF16_TOLERANCE`, and the
/// greedy token is the reference's wherever the reference's top-2 margin exceeds
/// `BF16_MARGIN`.
pub const BF16_TOLERANCE: f64 = 2e-2;
/// See [`BF16_TOLERANCE`].
pub const BF16_MARGIN: f32 = 0.05;

/// The architectures of the reference fixtures.
pub const ARCHS: &[&str] = &[
    "llama",
    "qwen2",
    "deepseek_v2_lite",
    "deepseek_v2_qlora",
    "deepseek_v3",
];

/// `fixtures/parity/`, or `CLOUD_CORE_FIXTURES` (a test binary carried to another machine).
pub fn fixtures() -> PathBuf {
    match std::env::var_os("CLOUD_CORE_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/parity"),
    }
}

/// A JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// A JSON array of rows of logits.
pub fn rows(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            r.as_array()
                .expect("row")
                .iter()
                .map(|x| x.as_f64().expect("number") as f32)
                .collect()
        })
        .collect()
}

/// `max|got - want| / max|want|`.
pub fn rel_diff(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "vocabulary sizes differ");
    let max_ref = want.iter().map(|x| x.abs() as f64).fold(0.0, f64::max);
    let max_diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .fold(0.0, f64::max);
    max_diff / max_ref.max(1e-30)
}

/// The greedy pick.
pub fn argmax(v: &[f32]) -> u32 {
    cloud_core::engine::sampler::argmax(v) as u32
}

/// One reference case: its prompt, the reference's greedy continuation, and the logits
/// at every prompt position and every decode step.
pub struct Case {
    pub name: String,
    pub prompt: Vec<u32>,
    pub greedy: Vec<u32>,
    pub prefill: Vec<Vec<f32>>,
    pub steps: Vec<Vec<f32>>,
}

/// The cases of `fixtures()/ARCH/reference.json`.
pub fn cases(arch: &str) -> Vec<Case> {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(arch).join("reference.json"))
            .expect("reference.json"),
    )
    .expect("json");
    reference["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap_or("?").to_string(),
            prompt: ids(&c["prompt_ids"]),
            greedy: ids(&c["greedy_ids"]),
            prefill: rows(&c["prefill_logits"]),
            steps: rows(&c["step_logits"]),
        })
        .collect()
}

/// The reference's top-2 margin.
pub fn margin(v: &[f32]) -> f32 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| b.total_cmp(a));
    s[0] - s.get(1).copied().unwrap_or(f32::NEG_INFINITY)
}

/// The greedy token of `got` is `want`'s wherever `want`'s top-2 margin exceeds
/// [`BF16_MARGIN`].
pub fn check_token(arch: &str, what: &str, got: &[f32], want: &[f32]) {
    if margin(want) > BF16_MARGIN {
        assert_eq!(
            argmax(got),
            argmax(want),
            "{arch}: {what}: greedy token differs"
        );
    }
}

/// Every position's logits of a teacher-forced run: the prompt, then the reference's
/// greedy tokens one at a time (a near-tie cannot derail later comparisons).
pub fn run_forced<B: Backend>(model: &Model<B>, case: &Case) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut cache = model.new_cache();
    let prefill = model.forward(&case.prompt, &mut cache).expect("prefill");
    let vocab = model.config().vocab_size;
    let mut steps = vec![prefill[(case.prompt.len() - 1) * vocab..].to_vec()];
    for t in &case.greedy[..case.greedy.len().saturating_sub(1)] {
        steps.push(model.forward(&[*t], &mut cache).expect("decode"));
    }
    (prefill, steps)
}
