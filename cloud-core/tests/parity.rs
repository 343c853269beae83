//! Parity with the reference implementation (Hugging Face transformers, f32, eager) on the
//! small random checkpoints in `fixtures/parity/` (made by `make_fixtures.py` there; no
//! Python is needed to run this test).
//!
//! For every architecture and prompt: the logits at every prompt position, then a greedy
//! continuation with the KV cache, one token per step. Each step must satisfy
//! `max|Δlogit| / max|logit| ≤ 1e-4`, and the greedy tokens must be identical.

use std::path::{Path, PathBuf};

use cloud_core::engine::backend::cpu::Cpu;
use cloud_core::engine::config::ModelConfig;
use cloud_core::engine::model::Model;
use serde_json::Value;

const TOLERANCE: f64 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/parity")
}

fn rows(v: &Value) -> Vec<Vec<f32>> {
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

fn rel_diff(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "vocabulary sizes differ");
    let max_ref = want.iter().map(|x| x.abs() as f64).fold(0.0, f64::max);
    let max_diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .fold(0.0, f64::max);
    max_diff / max_ref.max(1e-30)
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn check(arch: &str) {
    let dir = fixtures().join(arch);
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("reference.json")).expect("reference.json"),
    )
    .expect("json");
    // Both spellings of the config mean the same model.
    let saved = ModelConfig::from_file(&dir.join("config.json")).expect("config.json");
    let published_path = dir.join("config.published-style.json");
    if published_path.exists() {
        let published = ModelConfig::from_file(&published_path).expect("published-style config");
        assert_eq!(saved, published, "{arch}: the two config spellings differ");
    }
    let model = Model::load(&dir, Cpu::default()).unwrap_or_else(|e| panic!("{arch}: {e}"));
    let vocab = model.config().vocab_size;
    let mut worst = 0f64;
    for case in reference["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().unwrap_or("?");
        let prompt: Vec<u32> = case["prompt_ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect();
        let want_greedy: Vec<u32> = case["greedy_ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect();
        let prefill = rows(&case["prefill_logits"]);
        let steps = rows(&case["step_logits"]);
        let mut cache = model.new_cache();
        let logits = model.forward(&prompt, &mut cache).expect("prefill");
        for (pos, want) in prefill.iter().enumerate() {
            let d = rel_diff(&logits[pos * vocab..(pos + 1) * vocab], want);
            worst = worst.max(d);
            assert!(
                d <= TOLERANCE,
                "{arch}/{name}: prefill position {pos}: relative difference {d:e}"
            );
        }
        let mut last = logits[(prompt.len() - 1) * vocab..].to_vec();
        let mut greedy = Vec::new();
        for (step, want) in steps.iter().enumerate() {
            if step > 0 {
                last = model
                    .forward(&[*greedy.last().expect("token")], &mut cache)
                    .expect("decode");
            }
            let d = rel_diff(&last, want);
            worst = worst.max(d);
            assert!(
                d <= TOLERANCE,
                "{arch}/{name}: decode step {step}: relative difference {d:e}"
            );
            greedy.push(argmax(&last));
        }
        assert_eq!(greedy, want_greedy, "{arch}/{name}: greedy tokens differ");
    }
    println!("{arch}: parity with transformers holds; worst max|Δlogit|/max|logit| = {worst:.2e}");
}

#[test]
fn llama_matches_the_reference() {
    check("llama");
}

#[test]
fn qwen2_matches_the_reference() {
    check("qwen2");
}

#[test]
fn deepseek_v2_lite_matches_the_reference() {
    check("deepseek_v2_lite");
}

#[test]
fn deepseek_v2_with_q_lora_matches_the_reference() {
    check("deepseek_v2_qlora");
}

#[test]
fn deepseek_v3_matches_the_reference() {
    check("deepseek_v3");
}
