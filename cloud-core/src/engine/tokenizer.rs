//! Text ↔ token ids with the checkpoint's own `tokenizer.json` (the `tokenizers` crate,
//! the same implementation transformers uses).

use std::path::{Path, PathBuf};

/// Tokenizer errors, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// `tokenizer.json` is missing or unreadable.
    #[error("{file}: {reason}")]
    Load {
        /// The file.
        file: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Codec(String),
}

/// A loaded tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// Loads `tokenizer.json` from a checkpoint directory.
    pub fn load(dir: &Path) -> Result<Tokenizer, TokenizerError> {
        let file = dir.join("tokenizer.json");
        if !file.exists() {
            return Err(TokenizerError::Load {
                file,
                reason: "missing (the checkpoint has no tokenizer)".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&file).map_err(|e| TokenizerError::Load {
            file: file.clone(),
            reason: format!("not a valid tokenizer: {e}"),
        })?;
        Ok(Tokenizer { inner })
    }

    /// Token ids of `text` (special tokens such as BOS added as the tokenizer defines).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| TokenizerError::Codec(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` exactly as written (no special tokens added): for text rendered
    /// by a chat template, which already holds them.
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Codec(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TokenizerError::Codec(e.to_string()))
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}
