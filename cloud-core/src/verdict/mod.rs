//! Verdicts: a hard case in, a structured diagnosis out.
//!
//! [`prompt`] turns a case (features, the window's readings and log lines, the student's
//! guess) into the prompt; the engine decodes the answer constrained by [`schema`], so the
//! answer always parses as a [`Verdict`].

pub mod prompt;

use serde::{Deserialize, Serialize};
use shared::schema::CLASSES;

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
