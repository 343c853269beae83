//! Structured output: decoding constrained by a JSON schema (or another llguidance
//! grammar), so the answer always parses.
//!
//! [`Grammars`] is built once per checkpoint: llguidance's token trie over the exact bytes
//! of every token of `tokenizer.json` (read from the file itself, so no second tokenizer
//! implementation is involved), and its parser factory. Each constrained request gets a
//! [`Constraint`]; before every sampling step it masks the logits to the tokens the
//! grammar allows, and after it consumes the sampled token.

use std::path::Path;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};

/// Constraint errors: the grammar or schema is unusable, or the tokenizer cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ConstraintError {
    /// The tokenizer file could not be turned into a token trie.
    #[error("tokenizer.json: {0}")]
    Tokenizer(String),
    /// The schema or grammar does not compile.
    #[error("invalid schema: {0}")]
    Grammar(String),
    /// The grammar rejected a token it had allowed, or failed inside.
    #[error("constrained decoding failed: {0}")]
    Internal(String),
}

/// Tokenises text for llguidance with the checkpoint's own tokenizer.
struct Env {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        let text = String::from_utf8_lossy(s);
        match self.tokenizer.encode(text.as_ref(), false) {
            Ok(enc) => enc.get_ids().to_vec(),
            // Fall back to the trie's own greedy split (always valid, maybe not canonical).
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// The grammar machinery of one checkpoint.
#[derive(Clone)]
pub struct Grammars {
    factory: Arc<ParserFactory>,
    eos: u32,
}

impl Grammars {
    /// Builds the token trie from `dir/tokenizer.json` for a model with `vocab_size`
    /// logits; `eos` is the token that ends a constrained answer.
    pub fn load(dir: &Path, vocab_size: usize, eos: u32) -> Result<Grammars, ConstraintError> {
        let file = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&file)
            .map_err(|e| ConstraintError::Tokenizer(format!("cannot read: {e}")))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ConstraintError::Tokenizer(format!("not JSON: {e}")))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| ConstraintError::Tokenizer(e.to_string()))?;
        let tokenizer = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| ConstraintError::Tokenizer(e.to_string()))?;
        if (eos as usize) >= vocab_size {
            return Err(ConstraintError::Tokenizer(format!(
                "end-of-sequence token {eos} is outside the model's vocabulary of {vocab_size}"
            )));
        }
        // The model may have more logits than the tokenizer has tokens (padding rows):
        // those get no bytes and are never allowed. Tokens beyond the model's logits
        // cannot be produced at all.
        words.resize(vocab_size, Vec::new());
        let info = TokRxInfo::new(vocab_size as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(Env { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| ConstraintError::Tokenizer(e.to_string()))?;
        factory.quiet();
        Ok(Grammars {
            factory: Arc::new(factory),
            eos,
        })
    }

    /// The token that ends a constrained answer.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// A constraint for one request, from a JSON schema.
    pub fn json_schema(&self, schema: &serde_json::Value) -> Result<Constraint, ConstraintError> {
        if !schema.is_object() && !schema.is_boolean() {
            return Err(ConstraintError::Grammar(
                "a JSON schema must be an object".into(),
            ));
        }
        self.grammar(TopLevelGrammar::from_json_schema(schema.clone()))
    }

    /// A constraint that only allows some JSON object (`response_format: json_object`).
    pub fn json_object(&self) -> Result<Constraint, ConstraintError> {
        self.json_schema(&serde_json::json!({"type": "object"}))
    }

    fn grammar(&self, grammar: TopLevelGrammar) -> Result<Constraint, ConstraintError> {
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| ConstraintError::Grammar(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(ConstraintError::Grammar(e));
        }
        Ok(Constraint {
            matcher,
            eos: self.eos,
        })
    }
}

/// One request's constraint state.
pub struct Constraint {
    matcher: Matcher,
    eos: u32,
}

impl Constraint {
    /// Sets the logits of every token the grammar does not allow now to −∞. Once the
    /// grammar is complete only the end-of-sequence token remains.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), ConstraintError> {
        let mask = self.allowed_set()?;
        for (t, l) in logits.iter_mut().enumerate() {
            if !mask.is_allowed(t as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// The tokens the grammar allows now, as bits: token `t` is bit `t % 32` of
    /// `words[t / 32]` (tokens past the grammar's vocabulary are not allowed). What a
    /// backend masks the logits with where they are.
    pub fn allowed(&mut self, words: &mut [u32]) -> Result<(), ConstraintError> {
        let mask = self.allowed_set()?;
        let bits = mask.as_slice();
        for (i, w) in words.iter_mut().enumerate() {
            *w = bits.get(i).copied().unwrap_or(0);
        }
        Ok(())
    }

    fn allowed_set(&mut self) -> Result<toktrie::SimpleVob, ConstraintError> {
        self.matcher
            .compute_mask_or_eos()
            .map_err(|e| ConstraintError::Internal(e.to_string()))
    }

    /// Advances the grammar by the sampled token. Returns true when the answer is
    /// complete (the token was the end-of-sequence token the grammar allowed).
    pub fn advance(&mut self, token: u32) -> Result<bool, ConstraintError> {
        if token == self.eos {
            let accepting = self.matcher.is_stopped()
                || self
                    .matcher
                    .is_accepting()
                    .map_err(|e| ConstraintError::Internal(e.to_string()))?;
            return if accepting {
                Ok(true)
            } else {
                Err(ConstraintError::Internal(
                    "end of sequence before the grammar was complete".into(),
                ))
            };
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| ConstraintError::Internal(e.to_string()))?;
        Ok(false)
    }
}
