//! The demo model's training corpus: `edge-agent dataset` NDJSON on stdin, one JSONL line
//! per case on stdout: `{"prompt", "completion", "label", "decision"}`, where `prompt` is
//! the verdict prompt of the case and `completion` the compact JSON of the verdict it
//! should get for its true `label` (see `cloud_core::verdict::prompt`).
//!
//! ```sh
//! cargo run --release -p cloud-core --example verdict_corpus < cases.ndjson > corpus.jsonl
//! ```

use std::io::{BufRead, BufWriter, Write};

use cloud_core::verdict::prompt::{render, target};
use shared::case::HardCase;

fn main() -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let mut written = 0usize;
    for (i, line) in stdin.lock().lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| anyhow::anyhow!("line {}: malformed JSON: {e}", i + 1))?;
        let case =
            HardCase::from_json(&value).map_err(|e| anyhow::anyhow!("line {}: {e}", i + 1))?;
        let label = value
            .get("label")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| anyhow::anyhow!("line {}: no `label`", i + 1))?;
        let decision = value
            .get("decision")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("hard");
        let completion = serde_json::to_string(&target(&case, label))?;
        let row = serde_json::json!({
            "prompt": render(&case),
            "completion": completion,
            "label": label,
            "decision": decision,
        });
        serde_json::to_writer(&mut out, &row)?;
        out.write_all(b"\n")?;
        written += 1;
    }
    out.flush()?;
    eprintln!("{written} examples written");
    Ok(())
}
