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

    /// Text of `ids` with special tokens spelled out.
    pub fn decode_keep_special(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| TokenizerError::Codec(e.to_string()))
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// Turns a stream of generated tokens into a stream of text, emitting only what is
/// final: text that ends inside a multi-byte character waits for its next token, and
/// text that could be the start of a stop string waits until it is known not to be one.
pub struct TextStream {
    ids: Vec<u32>,
    text: String,
    sent: usize,
    stops: Vec<String>,
    stopped: bool,
}

impl TextStream {
    /// A stream that ends at the first of `stops` (which is not part of the text).
    pub fn new(stops: Vec<String>) -> TextStream {
        TextStream {
            ids: Vec::new(),
            text: String::new(),
            sent: 0,
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            stopped: false,
        }
    }

    /// Adds a token; returns the text that became final and whether a stop string was
    /// reached (then nothing more is emitted).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<(String, bool), TokenizerError> {
        if self.stopped {
            return Ok((String::new(), true));
        }
        self.ids.push(id);
        let full = tok.decode(&self.ids)?;
        if full.ends_with('\u{FFFD}') || !full.starts_with(&self.text[..self.sent]) {
            // An incomplete character (or a decoder that rewrote earlier text): wait.
            return Ok((String::new(), false));
        }
        self.text = full;
        // The earliest stop string that now appears in the text.
        let from = self
            .sent
            .saturating_sub(self.stops.iter().map(String::len).max().unwrap_or(0));
        let from = (0..=from)
            .rev()
            .find(|i| self.text.is_char_boundary(*i))
            .unwrap_or(0);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|p| from + p))
            .min();
        if let Some(end) = hit {
            let end = end.max(self.sent);
            let delta = self.text[self.sent..end].to_string();
            self.text.truncate(end);
            self.sent = end;
            self.stopped = true;
            return Ok((delta, true));
        }
        // Hold back the longest tail that is a proper prefix of a stop string.
        let mut safe = self.text.len();
        for s in &self.stops {
            for cut in (1..s.len()).rev() {
                if !s.is_char_boundary(cut) {
                    continue;
                }
                if self.text.ends_with(&s[..cut]) {
                    safe = safe.min(self.text.len() - cut);
                    break;
                }
            }
        }
        let safe = safe.max(self.sent);
        let delta = self.text[self.sent..safe].to_string();
        self.sent = safe;
        Ok((delta, false))
    }

    /// The text still held back, once generation is over.
    pub fn finish(&mut self, tok: &Tokenizer) -> String {
        if self.stopped {
            return String::new();
        }
        if let Ok(full) = tok.decode(&self.ids) {
            if full.starts_with(&self.text[..self.sent]) {
                self.text = full;
            }
        }
        let rest = self.text[self.sent..].to_string();
        self.sent = self.text.len();
        rest
    }

    /// All final text so far.
    pub fn text(&self) -> &str {
        &self.text[..self.sent]
    }
}
