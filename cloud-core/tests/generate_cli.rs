//! `cloud-core generate` end to end: a checkpoint directory with a tokenizer, text in,
//! the reference's greedy tokens out, with log-probabilities in `--json`; and the
//! command line's refusals of settings that would do nothing or nothing sensible.

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

fn checkpoint_with_tokenizer(dir: &Path) -> Value {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/parity/qwen2");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).expect("copy");
    }
    // A word-level tokenizer over the fixture's 256 ids: "t0" … "t254", and "<unk>".
    let mut vocab = serde_json::Map::new();
    for i in 0..255 {
        vocab.insert(format!("t{i}"), json!(i));
    }
    vocab.insert("<unk>".into(), json!(255));
    let tok = json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}});
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).expect("tokenizer");
    serde_json::from_str(&std::fs::read_to_string(src.join("reference.json")).expect("ref"))
        .expect("json")
}

#[test]
fn generate_prints_the_reference_continuation_with_logprobs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reference = checkpoint_with_tokenizer(dir.path());
    let case = &reference["cases"][0];
    let prompt: Vec<String> = case["prompt_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|i| format!("t{i}"))
        .collect();
    let out = Command::new(env!("CARGO_BIN_EXE_cloud-core"))
        .args(["generate", "--model"])
        .arg(dir.path())
        .args([
            "--prompt",
            &prompt.join(" "),
            "--max-tokens",
            "8",
            "--json",
            "--top-logprobs",
            "3",
        ])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["prompt_ids"], case["prompt_ids"]);
    assert_eq!(v["token_ids"], case["greedy_ids"]);
    let text: Vec<String> = case["greedy_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|i| format!("t{i}"))
        .collect();
    assert_eq!(v["text"], text.join(" "));
    assert_eq!(v["finish_reason"], "length");
    let steps = v["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 8);
    for s in steps {
        assert_eq!(s["top_logprobs"].as_array().expect("top").len(), 3);
        assert_eq!(
            s["top_logprobs"][0]["token"], s["token"],
            "greedy picks the most likely token"
        );
        assert!(s["logprob"].as_f64().expect("lp") <= 0.0);
    }
}

#[test]
fn generate_names_what_is_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    checkpoint_with_tokenizer(dir.path());
    std::fs::remove_file(dir.path().join("tokenizer.json")).expect("rm");
    let out = Command::new(env!("CARGO_BIN_EXE_cloud-core"))
        .args(["generate", "--model"])
        .arg(dir.path())
        .args(["--prompt", "t1 t2"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tokenizer.json") && err.contains("missing"),
        "{err}"
    );
    // Without a subcommand the binary prints its help, and fails.
    let out = Command::new(env!("CARGO_BIN_EXE_cloud-core"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("serve"));
}

#[test]
fn generate_renders_the_chat_template_and_stops_at_generation_config_eos() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reference = checkpoint_with_tokenizer(dir.path());
    let case = &reference["cases"][0];
    let ids: Vec<u64> = case["prompt_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_u64().expect("id"))
        .collect();
    // The template adds the first prompt token as its "BOS" and the user's text after it.
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        json!({"bos_token": format!("t{}", ids[0]), "eos_token": "t0",
            "chat_template": "{{ bos_token }}{% for m in messages %} {{ m.content }}{% endfor %}"})
        .to_string(),
    )
    .expect("write");
    let greedy: Vec<u64> = case["greedy_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_u64().expect("id"))
        .collect();
    std::fs::write(
        dir.path().join("generation_config.json"),
        json!({"eos_token_id": greedy[2]}).to_string(),
    )
    .expect("write");
    let rest: Vec<String> = ids[1..].iter().map(|i| format!("t{i}")).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_cloud-core"))
        .args([
            "generate",
            "--chat",
            "--json",
            "--max-tokens",
            "8",
            "--model",
        ])
        .arg(dir.path())
        .args(["--prompt", &rest.join(" ")])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        v["prompt_ids"], case["prompt_ids"],
        "the template's BOS and the message make the prompt"
    );
    assert_eq!(
        v["token_ids"],
        json!(greedy[..2]),
        "stopped at generation_config's eos"
    );
    assert_eq!(v["finish_reason"], "stop");
}

#[test]
fn schema_constrains_the_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    common::write_fixture_checkpoint(dir.path());
    let schema = dir.path().join("schema.json");
    std::fs::write(
        &schema,
        json!({"type": "object", "properties": {"class": {"enum": ["normal", "overheating"]},
               "score": {"type": "integer", "minimum": 0, "maximum": 9}},
               "required": ["class", "score"], "additionalProperties": false})
        .to_string(),
    )
    .expect("schema");
    let out = Command::new(env!("CARGO_BIN_EXE_cloud-core"))
        .args(["generate", "--model"])
        .arg(dir.path())
        .args([
            "--prompt",
            "Pump 3:",
            "--max-tokens",
            "200",
            "--temperature",
            "1",
            "--seed",
            "4",
            "--schema",
        ])
        .arg(&schema)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(["normal", "overheating"].contains(&v["class"].as_str().expect("class")));
    assert!((0..=9).contains(&v["score"].as_i64().expect("score")));
    // A schema that is not JSON is named in the error.
    std::fs::write(&schema, "{not json").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_cloud-core"))
        .args(["generate", "--model"])
        .arg(dir.path())
        .args(["--prompt", "x", "--schema"])
        .arg(&schema)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("schema.json"));
}

/// CUDA settings given to the CPU engine would silently do nothing: `serve` and `bench`
/// refuse them by name, before anything starts; a KV budget that is not a positive size
/// is refused by the parser.
#[test]
fn cuda_settings_need_the_cuda_engine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_cloud-core"))
            .args(args)
            .output()
            .expect("run");
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let data = dir.path().to_str().expect("utf-8");
    let err = run(&[
        "serve",
        "--data-dir",
        data,
        "--no-graphs",
        "--no-pdl",
        "--kv-cache-gib",
        "2",
    ]);
    assert!(
        err.contains("--no-graphs, --no-pdl need --engine cuda"),
        "{err}"
    );
    let err = run(&["bench", "--shape", "tiny", "--cuda-device", "1"]);
    assert!(err.contains("--cuda-device need --engine cuda"), "{err}");
    let err = run(&["bench", "--shape", "tiny", "--mma-decode-group", "1"]);
    assert!(
        err.contains("--mma-decode-group need --engine cuda"),
        "{err}"
    );
    let err = run(&["bench", "--engine", "cuda", "--cpu-weights", "bf16"]);
    assert!(err.contains("--cpu-weights needs --engine cpu"), "{err}");
    let err = run(&["bench", "--engine", "cuda", "--cpu-kv-cache", "bf16"]);
    assert!(err.contains("--cpu-kv-cache needs --engine cpu"), "{err}");
    // Bad values, refused by name before anything starts.
    let cpu_bench = ["bench", "--shape", "tiny"];
    let bench = ["bench", "--engine", "cuda"];
    let serve = ["serve", "--data-dir", data, "--engine", "cuda"];
    let cases: [(&[&str], &str, [&str; 3], &str); 4] = [
        (
            &cpu_bench,
            "--cpu-weights",
            ["fp16", "F32", "bf"],
            "unknown CPU weight type",
        ),
        (
            &cpu_bench,
            "--cpu-kv-cache",
            ["fp8", "BF16", ""],
            "unknown KV cache type",
        ),
        (
            &bench,
            "--mma-decode-group",
            ["0", "-2", "six"],
            "is not a whole number of at least 1",
        ),
        (
            &serve,
            "--kv-cache-gib",
            ["0", "-1", "lots"],
            "a size in GiB is a positive number",
        ),
    ];
    for (command, flag, bads, refusal) in cases {
        for bad in bads {
            let mut args = command.to_vec();
            let arg = format!("{flag}={bad}");
            args.push(&arg);
            let err = run(&args);
            assert!(err.contains(refusal), "{flag}={bad}: {err}");
        }
    }
    // The SIMD cap, named in the environment.
    for bad in ["sse9", "avx", ""] {
        let out = Command::new(env!("CARGO_BIN_EXE_cloud-core"))
            .args(["serve", "--data-dir", data])
            .env("CLOUD_CORE_CPU_SIMD", bad)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "CLOUD_CORE_CPU_SIMD={bad:?} served");
        let refusal = format!("CLOUD_CORE_CPU_SIMD={bad:?} is not one of baseline");
        assert!(err.contains(&refusal), "{err}");
    }
    // Nothing was started: no token written.
    assert!(!dir.path().join("operator-token").exists());
}

/// `bench --cpu-weights` holds the random matrices as bf16 (as published checkpoints
/// store them; the default) or widened to f32, says which, and counts the bytes a step
/// reads accordingly; `--kv-cache-gib` bounds the CPU's KV cache too.
#[test]
fn bench_says_how_the_cpu_holds_the_matrices() {
    let bench = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_cloud-core"))
            .args(["bench", "--shape", "tiny", "--prompt", "4", "--steps", "2"])
            .args(["--batches", "1"])
            .args(args)
            .output()
            .expect("run");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let row = text.lines().find(|l| l.starts_with("| 1 |"));
        let row = row.unwrap_or_else(|| panic!("no row: {text}"));
        let gb: f64 = row
            .split('|')
            .nth(5)
            .expect("GB column")
            .trim()
            .parse()
            .expect("GB");
        (text, gb)
    };
    let (stored, stored_gb) = bench(&[]);
    assert!(
        stored.contains("held: bf16 matrices, f32 KV cache"),
        "{stored}"
    );
    assert!(
        stored.contains(" threads, ") && stored.contains(", matrices as stored)"),
        "the device line: {stored}"
    );
    // The paged cache's memory at the end, within the budget asked for.
    let kv = stored
        .lines()
        .find(|l| l.starts_with("KV cache at the end: "));
    let kv = kv.unwrap_or_else(|| panic!("no KV cache line: {stored}"));
    assert!(kv.contains(" GiB held, "), "{kv}");
    let (bf16, bf16_gb) = bench(&["--cpu-weights", "bf16", "--kv-cache-gib", "0.5"]);
    assert!(bf16.contains("held: bf16 matrices, f32 KV cache"), "{bf16}");
    assert!(bf16.contains("of a 0.50 GiB budget"), "{bf16}");
    // A bf16 cache: said, and its bytes counted as two per value (fewer bytes a step).
    let (kv16, kv16_gb) = bench(&["--cpu-kv-cache", "bf16"]);
    assert!(
        kv16.contains("held: bf16 matrices, bf16 KV cache"),
        "{kv16}"
    );
    assert!(
        kv16.contains(", matrices as stored, bf16 KV cache)"),
        "{kv16}"
    );
    assert!(kv16_gb < stored_gb, "{kv16_gb} GB vs {stored_gb} GB");
    assert_eq!(stored_gb, bf16_gb);
    let (f32, f32_gb) = bench(&["--cpu-weights", "f32"]);
    assert!(f32.contains("held: f32 matrices, f32 KV cache"), "{f32}");
    // The matrices are nearly all of a step's bytes: f32 ones close to twice as many.
    assert!(
        f32_gb > 1.6 * bf16_gb && f32_gb <= 2.0 * bf16_gb,
        "{f32_gb} GB vs {bf16_gb} GB"
    );
}

/// `bench --layers N` measures a shape with N layers instead of its own (here on the CPU
/// engine, which replays no graphs: no host time per replayed step); zero layers, and
/// layers for a checkpoint, are refused by name.
#[test]
fn bench_measures_a_shape_with_other_layers() {
    let bench = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cloud-core"))
            .args(["bench", "--shape", "tiny", "--prompt", "4", "--steps", "2"])
            .args(["--batches", "1,2"])
            .args(args)
            .output()
            .expect("run")
    };
    let out = bench(&["--layers", "3"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("shape tiny with 3 layers: "), "{text}");
    for batch in ["| 1 |", "| 2 |"] {
        let row = text.lines().find(|l| l.starts_with(batch));
        let row = row.unwrap_or_else(|| panic!("no row {batch}: {text}"));
        assert!(row.ends_with("| — |"), "{row}");
    }
    // A tiny model's parameters grow with its layers: the count printed is the deeper one's.
    let count = |text: &str| -> f64 {
        let at = text.find("layers: ").expect("shape line") + "layers: ".len();
        text[at..]
            .split_whitespace()
            .next()
            .expect("count")
            .parse()
            .expect("number")
    };
    let deeper = bench(&["--layers", "4"]);
    let deeper = String::from_utf8_lossy(&deeper.stdout);
    assert!(count(&deeper) > count(&text), "{text}\n{deeper}");
    let out = bench(&["--layers", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--layers"));
    let dir = tempfile::tempdir().expect("tempdir");
    let out = bench(&[
        "--layers",
        "2",
        "--model",
        dir.path().to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--layers changes a --shape, not a --model"),
        "{err}"
    );
}
