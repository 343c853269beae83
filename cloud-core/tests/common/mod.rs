//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::path::Path;

use serde_json::{json, Value};

/// Pseudo-random values in [-1, 1) from a seed (xorshift): test data, the same on every
/// run.
pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// GPT-2's byte → printable character map (what byte-level BPE vocabularies spell).
fn byte_char(b: u8) -> char {
    let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable {
        return b as char;
    }
    let mut n = 0u32;
    for x in 0..b {
        if !matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
            n += 1;
        }
    }
    char::from_u32(256 + n).unwrap_or('?')
}

/// A byte-level BPE tokenizer: the 256 bytes (ids 0–255), a few merges of JSON
/// punctuation (ids 256–259) and `<eos>` (id 260). Returns the `<eos>` id.
pub fn write_byte_level_tokenizer(dir: &Path) -> u32 {
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u8 {
        vocab.insert(byte_char(b).to_string(), json!(b));
    }
    let merges = [("{", "\""), ("\"", ":"), (",", "\""), ("\"", ",")];
    for (i, (a, b)) in merges.iter().enumerate() {
        vocab.insert(format!("{a}{b}"), json!(256 + i));
    }
    let eos = 260u32;
    let tok = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": eos, "content": "<eos>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": Value::Object(vocab),
                  "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()},
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).expect("tokenizer.json");
    eos
}

/// The V3 parity fixture's configuration, resized for a 264-token vocabulary and a
/// 1024-position context.
pub fn random_v3_config() -> Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/parity/deepseek_v3/config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("fixture config"))
            .expect("json");
    cfg["vocab_size"] = json!(264);
    cfg["max_position_embeddings"] = json!(1024);
    cfg["rope_parameters"]["original_max_position_embeddings"] = json!(256);
    cfg["eos_token_id"] = json!(260);
    cfg
}

/// A servable checkpoint from the V3 parity fixture's random weights (vocabulary 256):
/// a byte-level tokenizer over bytes 0x00–0xFE with `<eos>` as id 255 (0xFF never occurs
/// in UTF-8), a chat template and a generation config. Returns the `<eos>` id.
pub fn write_fixture_checkpoint(dir: &Path) -> u32 {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/parity/deepseek_v3");
    std::fs::copy(
        fixture.join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .expect("weights");
    let mut cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture.join("config.json")).expect("config"),
    )
    .expect("json");
    let eos = 255u32;
    cfg["eos_token_id"] = json!(eos);
    cfg["max_position_embeddings"] = json!(2048);
    std::fs::write(dir.join("config.json"), cfg.to_string()).expect("config");
    let mut vocab = serde_json::Map::new();
    for b in 0..=254u8 {
        vocab.insert(byte_char(b).to_string(), json!(b));
    }
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": eos, "content": "<eos>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": Value::Object(vocab), "merges": []},
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).expect("tokenizer.json");
    let tc = json!({
        "eos_token": "<eos>",
        "chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
    });
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).expect("tokenizer_config");
    std::fs::write(
        dir.join("generation_config.json"),
        json!({"eos_token_id": eos}).to_string(),
    )
    .expect("generation_config");
    eos
}
