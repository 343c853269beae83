//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::path::Path;

use serde_json::{json, Value};

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
