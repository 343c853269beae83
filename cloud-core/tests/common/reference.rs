//! Reading the reference fixtures (`fixtures/parity/`: transformers' logits for small
//! random checkpoints) and comparing logits with them, for the CPU parity tests and the
//! CUDA suite.
#![allow(dead_code)] // each test crate uses part of it

use std::path::{Path, PathBuf};

use serde_json::Value;

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
