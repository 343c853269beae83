//! Verdicts: a hard case in, a structured diagnosis out.
//!
//! [`prompt`] turns a case (features, the window's readings and log lines, the student's
//! guess) into the prompt; the engine decodes the answer constrained by [`schema`], so the
//! answer always parses as a [`Verdict`].

pub mod http;
pub mod prompt;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use shared::case::HardCase;
use shared::schema::CLASSES;

use crate::engine::generate::{Finish, Request};
use crate::engine::model::EngineError;
use crate::engine::sampler::SamplingParams;
use crate::engine::scheduler::{collect, SubmitError};
use crate::engine::service::Engine;

/// Longest explanation or action a verdict may carry (characters).
pub const TEXT_MAX_LEN: usize = 160;

/// The cloud's answer to a hard case. Serialised with its fields in this order, compact:
/// the order the schema lists and the demo model was trained on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// One of [`CLASSES`].
    pub class: String,
    /// The model's confidence in `class`, in [0, 1].
    pub confidence: f64,
    /// Why, in one sentence that names the evidence.
    pub explanation: String,
    /// What the operator should do.
    pub action: String,
}

/// The JSON schema every verdict is decoded against.
pub fn schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "class": { "type": "string", "enum": CLASSES },
            "confidence": { "type": "number", "minimum": 0, "maximum": 1 },
            "explanation": { "type": "string", "minLength": 1, "maxLength": TEXT_MAX_LEN },
            "action": { "type": "string", "minLength": 1, "maxLength": TEXT_MAX_LEN },
        },
        "required": ["class", "confidence", "explanation", "action"],
        "additionalProperties": false,
    })
}

/// The verdict service: case → prompt → schema-constrained greedy decoding → verdict.
pub struct VerdictService {
    engine: Engine,
    max_tokens: usize,
    judged: AtomicU64,
}

/// A verdict with what it cost.
#[derive(Clone, Debug, Serialize)]
pub struct Judged {
    /// The verdict.
    pub verdict: Verdict,
    /// The model that gave it.
    pub model: String,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens of the answer.
    pub completion_tokens: usize,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// Why no verdict came back.
#[derive(Debug, thiserror::Error)]
pub enum VerdictError {
    /// The engine refused the request (queue full, engine stopped, prompt too long).
    #[error(transparent)]
    Submit(#[from] SubmitError),
    /// The engine failed.
    #[error("engine: {0}")]
    Engine(String),
    /// The case does not fit beside those being judged (the KV cache is full); it may
    /// fit later.
    #[error("{0}")]
    Refused(String),
    /// The answer did not fit in the token budget (the grammar guarantees everything else).
    #[error("the verdict did not finish within {0} tokens")]
    TooLong(usize),
}

impl VerdictService {
    /// A service on `engine`, which must support structured output.
    pub fn new(engine: Engine) -> anyhow::Result<VerdictService> {
        anyhow::ensure!(
            engine.grammars().is_some(),
            "{}: the model has no end-of-sequence token, so verdicts cannot be constrained",
            engine.dir().display()
        );
        Ok(VerdictService {
            engine,
            // Two texts of at most TEXT_MAX_LEN characters plus the keys and the class;
            // a character takes at most 4 tokens (a byte-level tokenizer spelling UTF-8).
            max_tokens: 2 * 4 * TEXT_MAX_LEN + 96,
            judged: AtomicU64::new(0),
        })
    }

    /// Verdicts given so far.
    pub fn count(&self) -> u64 {
        self.judged.load(Ordering::Relaxed)
    }

    /// The prompt's token ids for a case (the rendered prompt, tokenized as the
    /// checkpoint's tokenizer does with its special tokens).
    pub fn prompt_ids(&self, case: &HardCase) -> Result<Vec<u32>, VerdictError> {
        self.engine
            .tokenizer()
            .encode(&prompt::render(case))
            .map_err(|e| VerdictError::Engine(e.to_string()))
    }

    /// Judges one case. Many calls at once are decoded in one batch by the scheduler.
    pub async fn judge(&self, case: &HardCase) -> Result<Judged, VerdictError> {
        let started = Instant::now();
        let ids = self.prompt_ids(case)?;
        let prompt_tokens = ids.len();
        let mut schema = schema();
        // The demo model learned compact JSON; any model reads it as well.
        schema["x-guidance"] = serde_json::json!({
            "whitespace_flexible": false, "item_separator": ",", "key_separator": ":",
        });
        let grammars = self
            .engine
            .grammars()
            .ok_or_else(|| VerdictError::Engine("structured output is unavailable".into()))?;
        let constraint = grammars
            .json_schema(&schema)
            .map_err(|e| VerdictError::Engine(e.to_string()))?;
        // As much room as the context leaves, up to the budget.
        let max_tokens = self
            .max_tokens
            .min(self.engine.handle().context().saturating_sub(prompt_tokens));
        let params = SamplingParams {
            max_tokens,
            stop_tokens: self.engine.stop_tokens().to_vec(),
            ..SamplingParams::default()
        };
        let rx = self.engine.handle().submit(Request {
            prompt: ids,
            params,
            constraint: Some(constraint),
        })?;
        let (steps, finish) = collect(rx).await.map_err(|e| match e {
            EngineError::Refused(m) => VerdictError::Refused(m),
            e => VerdictError::Engine(e.to_string()),
        })?;
        if finish != Finish::Stop {
            return Err(VerdictError::TooLong(max_tokens));
        }
        let ids: Vec<u32> = steps.iter().map(|s| s.token).collect();
        let text = self
            .engine
            .tokenizer()
            .decode(&ids)
            .map_err(|e| VerdictError::Engine(e.to_string()))?;
        let verdict: Verdict = serde_json::from_str(&text).map_err(|e| {
            VerdictError::Engine(format!(
                "the constrained answer does not parse ({e}): {text}"
            ))
        })?;
        self.judged.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("verdicts_total", "class" => verdict.class.clone()).increment(1);
        Ok(Judged {
            verdict,
            model: self.engine.name().to_string(),
            prompt_tokens,
            completion_tokens: ids.len(),
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}
