//! Reading the reference fixtures (`fixtures/parity/`: transformers' logits for small
//! random checkpoints) and comparing logits with them, for the CPU parity tests and the
//! CUDA suite.
#![allow(dead_code)] // each test crate uses part of it

use std::path::{Path, PathBuf};

use cloud_core::engine::backend::{AttnShape, Backend, DeviceError, KvShape};
use cloud_core::engine::model::{Cache, EngineError, Model};
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

/// Prefixes of a cache shared by reference give the logits of the same rows run without
/// sharing (within `tolerance` of each other, and of the reference's run in one chunk
/// within `chunked`), taking no memory of their own until they are written to; the
/// source and the prefixes go on decoding as before once each writes its own copy of
/// the block they shared. `model` has blocks of four positions.
pub fn prefix_sharing_gives_the_logits_of_a_fresh_run<B: Backend>(
    model: &Model<B>,
    case: &Case,
    tolerance: f64,
    chunked: f64,
) {
    let (_, fresh) = run_forced(model, case);
    let mut full = model.new_cache();
    model.forward(&case.prompt, &mut full).expect("prompt");
    let held = || model.backend().kv_cache().map(|kv| kv.held_bytes);
    // Prefixes ending inside a block (copy-on-write) and on a block boundary, kept alive
    // so that the source's own next append copies its shared last block too. Each is
    // checked against the same two chunks of the prompt run without sharing (a backend
    // may round a chunk of one row differently from a longer one, so the chunks decide
    // the rounding, and sharing must not change it).
    let vocab = model.config().vocab_size;
    let last = |l: &[f32]| l[l.len() - vocab..].to_vec();
    let mut kept = Vec::new();
    for keep in [case.prompt.len() - 1, 4.min(case.prompt.len() - 1)] {
        let before = held();
        let mut shared = model.cache_prefix(&full, keep);
        assert_eq!(held(), before, "a prefix of {keep} took memory of its own");
        let logits = model
            .forward(&case.prompt[keep..], &mut shared)
            .expect("rest of the prompt");
        let mut alone = model.new_cache();
        model
            .forward(&case.prompt[..keep], &mut alone)
            .expect("prefix");
        let want = model
            .forward(&case.prompt[keep..], &mut alone)
            .expect("rest of the prompt");
        let d = rel_diff(&last(&logits), &last(&want));
        assert!(d <= tolerance, "prefix of {keep}: {d:e}");
        let d = rel_diff(&last(&logits), &fresh[0]);
        assert!(d <= chunked, "prefix of {keep} against one chunk: {d:e}");
        kept.push((shared, alone));
    }
    let l = model.forward(&[case.greedy[0]], &mut full).expect("decode");
    assert!(rel_diff(&l, &fresh[1]) <= tolerance);
    for (shared, alone) in &mut kept {
        let l = model.forward(&[case.greedy[0]], shared).expect("decode");
        let want = model.forward(&[case.greedy[0]], alone).expect("decode");
        assert!(rel_diff(&l, &want) <= tolerance);
    }
}

/// A step that does not fit the KV cache is refused with a full cache and changes
/// nothing, and the backend goes on serving. `model` is the qwen2 fixture with a budget
/// of 16 KiB in blocks of four positions: one short prompt fits, a long one does not.
pub fn a_step_that_does_not_fit_is_refused_and_changes_nothing<B: Backend>(model: &Model<B>) {
    let mut small = model.new_cache();
    model
        .forward(&[1, 2, 3], &mut small)
        .expect("a short prompt fits");
    let long: Vec<u32> = (0..250).map(|i| i % 50 + 1).collect();
    let mut big = model.new_cache();
    match model.forward(&long, &mut big) {
        Err(EngineError::Device(DeviceError::CacheFull(f))) => {
            assert!(f.to_string().contains("KV cache is full"), "{f}");
        }
        other => panic!("expected a full cache, got {:?}", other.map(|l| l.len())),
    }
    assert_eq!(big.len(), 0, "the refused sequence kept nothing");
    assert_eq!(small.len(), 3);
    // In one step with a sequence that fits (room made for it first, a new block), then
    // one that does not: neither keeps anything (the first's new block goes back).
    let usage = |what: &str| {
        model
            .backend()
            .kv_cache()
            .unwrap_or_else(|| panic!("{what}: a paged cache"))
            .held_bytes
    };
    let held = usage("before the batch");
    let refuse = |small: &mut Cache<B>| {
        let mut big = model.new_cache();
        match model.forward_batch(&mut [(&[4, 5][..], small), (&long[..], &mut big)]) {
            Err(EngineError::Device(DeviceError::CacheFull(_))) => {}
            other => panic!("expected a full cache, got {:?}", other.map(|l| l.len())),
        }
        assert_eq!((small.len(), big.len()), (3, 0), "the batch kept nothing");
    };
    refuse(&mut small);
    assert_eq!(usage("after the refused batch"), held);
    // Its rows are as they were: it goes on as a copy made before the refusal does.
    let mut copy = model.cache_prefix(&small, 3);
    refuse(&mut small);
    let went_on = model
        .forward(&[4, 5], &mut small)
        .expect("the backend keeps serving after a refusal");
    let fresh = model.forward(&[4, 5], &mut copy).expect("the copy");
    assert_eq!(went_on, fresh, "the refused batch changed the cache's rows");
}

/// The inputs of the attention refusal tests: a two-layer cache shape of one key head of
/// eight columns, its attention (two query heads), and one row of queries, keys and
/// values (0.25, a value bf16 holds exactly).
pub fn tiny_attention<B: Backend>(be: &B) -> (KvShape, AttnShape, [B::Buf; 3]) {
    let shape = KvShape {
        layers: 2,
        kcols: 8,
        vcols: 8,
        values_in_keys: false,
    };
    let s = AttnShape {
        h: 2,
        hk: 1,
        dk: 8,
        dv: 8,
        scale: 0.5,
        values_in_keys: false,
    };
    let qkv = [
        be.upload(&[0.1; 16]),
        be.upload(&[0.2; 8]),
        be.upload(&[0.25; 8]),
    ];
    (shape, s, qkv)
}
