//! Constrained decoding: whatever the weights, the output follows the schema.

mod common;

use std::path::Path;

use cloud_core::engine::backend::cpu::Cpu;
use cloud_core::engine::config::ModelConfig;
use cloud_core::engine::constrain::Grammars;
use cloud_core::engine::generate::{generate, generate_picking, Finish, Picking, Request};
use cloud_core::engine::model::Model;
use cloud_core::engine::sampler::SamplingParams;
use cloud_core::verdict::{schema, Verdict, TEXT_MAX_LEN};
use serde_json::{json, Value};
use shared::schema::CLASSES;

fn random_model(dir: &Path) -> (Model<Cpu>, Grammars) {
    let eos = common::write_byte_level_tokenizer(dir);
    let cfg = common::random_v3_config();
    let cfg = ModelConfig::from_json(&cfg.to_string(), Path::new("config.json")).expect("config");
    let grammars = Grammars::load(dir, cfg.vocab_size, eos).expect("grammars");
    (
        Model::random(cfg, Cpu::default(), 11).expect("model"),
        grammars,
    )
}

fn text(ids: &[u32]) -> String {
    // Ids 0–255 are bytes; 256–259 the merged pairs of the test tokenizer.
    let pairs = ["{\"", "\":", ",\"", "\","];
    let mut out = Vec::new();
    for &t in ids {
        match t {
            0..=255 => out.push(t as u8),
            256..=259 => out.extend_from_slice(pairs[(t - 256) as usize].as_bytes()),
            _ => panic!("token {t} is not text"),
        }
    }
    String::from_utf8(out).expect("the grammar keeps the output valid UTF-8")
}

#[test]
fn random_weights_always_give_a_schema_valid_verdict() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (model, grammars) = random_model(dir.path());
    let verdict_schema = schema();
    // Sampled at temperature 1 from random weights, several at once in one batch.
    let requests: Vec<Request> = (0..8u64)
        .map(|seed| Request {
            prompt: vec![72, 105, 33],
            params: SamplingParams {
                temperature: 1.0,
                seed,
                max_tokens: 800,
                ..Default::default()
            },
            constraint: Some(
                grammars
                    .json_schema(&verdict_schema)
                    .expect("schema compiles"),
            ),
        })
        .collect();
    let out = generate(&model, requests).expect("generate");
    for (i, o) in out.iter().enumerate() {
        assert_eq!(o.finish, Finish::Stop, "request {i} completed its answer");
        let s = text(&o.tokens);
        let v: Verdict =
            serde_json::from_str(&s).unwrap_or_else(|e| panic!("request {i}: {e}: {s:?}"));
        assert!(CLASSES.contains(&v.class.as_str()), "{s}");
        assert!((0.0..=1.0).contains(&v.confidence), "{s}");
        for t in [&v.explanation, &v.action] {
            let n = t.chars().count();
            assert!((1..=TEXT_MAX_LEN).contains(&n), "{n} characters: {s}");
        }
    }
    // Not all the same: the sampling really was free within the grammar.
    let distinct: std::collections::BTreeSet<_> = out.iter().map(|o| &o.tokens).collect();
    assert!(distinct.len() > 1);
}

#[test]
fn other_schemas_hold_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (model, grammars) = random_model(dir.path());
    let schema = json!({
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "n": {"type": "integer", "minimum": -5, "maximum": 500},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
            "unit": {"enum": ["mm", "°C", "A"]},
        },
        "required": ["ok", "n", "tags", "unit"],
        "additionalProperties": false,
    });
    for seed in 0..6u64 {
        let r = Request {
            prompt: vec![1, 2, 3],
            params: SamplingParams {
                temperature: 1.2,
                seed,
                max_tokens: 300,
                ..Default::default()
            },
            constraint: Some(grammars.json_schema(&schema).expect("compiles")),
        };
        let o = generate(&model, vec![r]).expect("generate").remove(0);
        assert_eq!(o.finish, Finish::Stop);
        let s = text(&o.tokens);
        let v: Value = serde_json::from_str(&s).unwrap_or_else(|e| panic!("{e}: {s:?}"));
        assert!(v["ok"].is_boolean(), "{s}");
        let n = v["n"].as_i64().expect("integer");
        assert!((-5..=500).contains(&n), "{s}");
        let tags = v["tags"].as_array().expect("array");
        assert!(
            tags.len() <= 3
                && tags
                    .iter()
                    .all(|t| t.as_str().is_some_and(|t| t.chars().count() <= 6)),
            "{s}"
        );
        assert!(
            ["mm", "°C", "A"].contains(&v["unit"].as_str().expect("unit")),
            "{s}"
        );
        assert_eq!(v.as_object().map(|o| o.len()), Some(4), "{s}");
    }
    // Unconstrained, the same weights do not produce JSON: the grammar is what holds.
    let free = Request::new(
        vec![1, 2, 3],
        SamplingParams {
            temperature: 1.0,
            max_tokens: 40,
            ..Default::default()
        },
    );
    let o = generate(&model, vec![free]).expect("generate").remove(0);
    assert!(serde_json::from_slice::<Value>(
        &o.tokens.iter().map(|t| *t as u8).collect::<Vec<_>>()
    )
    .is_err());
}

#[test]
fn a_bad_schema_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, grammars) = random_model(dir.path());
    let e = grammars
        .json_schema(&json!({"type": "object", "properties": {"a": {"type": "strange"}}}))
        .err()
        .expect("refused");
    assert!(e.to_string().contains("invalid schema"), "{e}");
    let e = grammars.json_schema(&json!([1, 2])).err().expect("refused");
    assert!(e.to_string().contains("must be an object"), "{e}");
    // An EOS outside the vocabulary is refused when the grammars are built.
    assert!(Grammars::load(dir.path(), 100, 260).is_err());
}

/// A greedy verdict request is picked by the backend among the grammar's tokens (the
/// mask goes to the logits, not the logits to the host), alternatives and all, as the
/// sampler picks it from the logits: the same verdict, token for token, with the same
/// log-probabilities and alternatives, batched with an unconstrained request.
#[test]
fn greedy_verdicts_picked_by_the_backend_are_the_samplers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (model, grammars) = random_model(dir.path());
    let verdict = |prompt: &[u32], top_logprobs: usize| Request {
        prompt: prompt.to_vec(),
        params: SamplingParams {
            max_tokens: 800,
            top_logprobs,
            ..Default::default()
        },
        constraint: Some(grammars.json_schema(&schema()).expect("schema compiles")),
    };
    let free = || {
        Request::new(
            vec![5, 6, 7],
            SamplingParams {
                max_tokens: 12,
                ..Default::default()
            },
        )
    };
    // The same batches both ways (a row's logits may depend on the batch's size).
    let prompts: [&[u32]; 2] = [&[72, 105, 33], &[1, 2, 3, 4]];
    let batch = || vec![verdict(prompts[0], 0), verdict(prompts[1], 2), free()];
    let by_backend = generate_picking(&model, batch(), Picking::Backend).expect("backend");
    let by_sampler = generate_picking(&model, batch(), Picking::Host).expect("sampler");
    for (i, s) in by_sampler.iter().enumerate() {
        let b = &by_backend[i];
        assert_eq!(b.finish, s.finish, "request {i}");
        assert!(!b.tokens.is_empty(), "request {i}");
        assert_eq!(b.tokens, s.tokens, "request {i}: tokens");
        for (j, (bs, ss)) in b.steps.iter().zip(&s.steps).enumerate() {
            assert_eq!(bs, ss, "request {i}, step {j}");
            assert_eq!(bs.top.len(), [0, 2, 0][i], "request {i}, step {j}");
        }
    }
    assert_eq!(by_backend[2].tokens.len(), 12);
}
