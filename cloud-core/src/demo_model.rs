//! The embedded demo model (`cloud-core/demo-model/`): a small DeepSeek-V3-architecture
//! checkpoint trained on simulated fault diagnoses, built into the binary so the cloud
//! core answers with meaningful verdicts on any machine with no download. It is written
//! out to a directory once (the engine memory-maps checkpoints from files) and loaded like
//! any other checkpoint. Not DeepSeek's weights: see its model card.

use std::path::{Path, PathBuf};

use anyhow::Context;
use sha2::{Digest, Sha256};

/// The checkpoint's files.
pub const FILES: [(&str, &[u8]); 5] = [
    ("config.json", include_bytes!("../demo-model/config.json")),
    (
        "generation_config.json",
        include_bytes!("../demo-model/generation_config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../demo-model/model.safetensors"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../demo-model/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../demo-model/tokenizer_config.json"),
    ),
];

/// The model name the API reports for it.
pub const NAME: &str = "factory-demo-v3";

/// Writes the demo model into `dir` (a file is rewritten only if its content differs)
/// and returns `dir`.
pub fn extract(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, bytes) in FILES {
        let path = dir.join(name);
        let same = std::fs::read(&path)
            .map(|old| Sha256::digest(&old) == Sha256::digest(bytes))
            .unwrap_or(false);
        if !same {
            let tmp = dir.join(format!("{name}.tmp"));
            std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(dir.to_path_buf())
}
