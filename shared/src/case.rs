//! Cases: one complete window of one machine, its id, the student's answer and the
//! policy's decision.

use std::borrow::Borrow;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use serde_json::{Map, Value};

use crate::features::NUM_FEATURES;
use crate::record::{format_ts, Record, RecordError};
use crate::schema::{class_index, CLASSES};

fn err(field: impl Into<String>, reason: impl Into<String>) -> RecordError {
    RecordError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A content-derived case id: the first 128 bits of SHA-256 over the machine name and
/// every record of the window (timestamp, idempotency key, readings), as 32 hex digits.
/// The same window always gets the same id, on any gateway and any architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CaseId(pub [u8; 16]);

impl CaseId {
    /// Derives the id of a window.
    pub fn of_window<R: Borrow<Record>>(machine: &str, window: &[R]) -> CaseId {
        let mut h = Sha256::new();
        h.update(b"case/v1\0");
        h.update((machine.len() as u64).to_le_bytes());
        h.update(machine.as_bytes());
        for r in window {
            let r: &Record = r.borrow();
            h.update(r.ts_ms.to_le_bytes());
            match &r.id {
                Some(id) => {
                    h.update([1]);
                    h.update((id.len() as u64).to_le_bytes());
                    h.update(id.as_bytes());
                }
                None => h.update([0]),
            }
            h.update((r.readings.len() as u64).to_le_bytes());
            for (k, v) in &r.readings {
                h.update((k.len() as u64).to_le_bytes());
                h.update(k.as_bytes());
                h.update(v.to_bits().to_le_bytes());
            }
        }
        let digest = h.finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        CaseId(id)
    }

    /// Parses 32 hex digits.
    pub fn parse(s: &str) -> Option<CaseId> {
        let bytes = hex::decode(s).ok()?;
        let arr: [u8; 16] = bytes.try_into().ok()?;
        Some(CaseId(arr))
    }

    /// A number in [0, 1) drawn deterministically from the id (for the audit sample).
    pub fn unit_draw(&self, salt: u64) -> f64 {
        let mut h = Sha256::new();
        h.update(self.0);
        h.update(salt.to_le_bytes());
        let d = h.finalize();
        let mut b = [0u8; 8];
        b.copy_from_slice(&d[..8]);
        (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl fmt::Display for CaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// Where a case is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    /// The student's answer stands; the case stays on the gateway.
    Local,
    /// The case goes to the cloud (it waits in the outbox until acknowledged).
    Hard,
}

impl Decision {
    /// `local` or `hard`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Decision::Local => "local",
            Decision::Hard => "hard",
        }
    }
}

/// Why the policy decided what it did.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Reason {
    /// All uncertainty and novelty checks passed.
    Confident,
    /// The top class probability is below `min_max_prob`.
    LowConfidence {
        /// The top probability.
        max_prob: f32,
    },
    /// Top-1 minus top-2 probability is below `min_margin`.
    SmallMargin {
        /// The margin.
        margin: f32,
    },
    /// The entropy of the probabilities (nats) is above `max_entropy`.
    HighEntropy {
        /// The entropy.
        entropy: f32,
    },
    /// The features are far from what the student was trained on.
    OutOfDistribution {
        /// The out-of-distribution score.
        score: f32,
    },
    /// Drawn for the random audit sample.
    Audit,
    /// Would have been hard, but the share budget was used up.
    OverShareBudget,
    /// Would have been hard, but the rate budget was used up.
    OverRateBudget,
}

impl Reason {
    /// A short machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Reason::Confident => "confident",
            Reason::LowConfidence { .. } => "low_confidence",
            Reason::SmallMargin { .. } => "small_margin",
            Reason::HighEntropy { .. } => "high_entropy",
            Reason::OutOfDistribution { .. } => "out_of_distribution",
            Reason::Audit => "audit",
            Reason::OverShareBudget => "over_share_budget",
            Reason::OverRateBudget => "over_rate_budget",
        }
    }

    /// A sentence for operators.
    pub fn detail(&self) -> String {
        match self {
            Reason::Confident => "student is confident and the input looks familiar".into(),
            Reason::LowConfidence { max_prob } => format!("top probability {max_prob:.3} is low"),
            Reason::SmallMargin { margin } => format!("top-2 margin {margin:.3} is small"),
            Reason::HighEntropy { entropy } => format!("entropy {entropy:.3} nats is high"),
            Reason::OutOfDistribution { score } => {
                format!("out-of-distribution score {score:.2} is high")
            }
            Reason::Audit => "drawn for the random audit sample".into(),
            Reason::OverShareBudget => {
                "uncertain, but the hard-case share budget is used up".into()
            }
            Reason::OverRateBudget => "uncertain, but the hard-case rate budget is used up".into(),
        }
    }
}

/// A hard case as the cloud receives it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HardCase {
    /// The case id.
    pub id: CaseId,
    /// The machine.
    pub machine: String,
    /// Timestamp of the first and last record of the window (Unix ms).
    pub start_ms: i64,
    /// See `start_ms`.
    pub end_ms: i64,
    /// The feature vector (layout of [`crate::features`]).
    pub features: Vec<f32>,
    /// The student's class probabilities.
    pub probs: Vec<f32>,
    /// Why it was sent.
    pub reason: Reason,
    /// The window's records.
    pub records: Vec<Record>,
}

impl Reason {
    /// The measured value a reason carries (`None` for reasons without one).
    pub fn value(&self) -> Option<f32> {
        match *self {
            Reason::LowConfidence { max_prob } => Some(max_prob),
            Reason::SmallMargin { margin } => Some(margin),
            Reason::HighEntropy { entropy } => Some(entropy),
            Reason::OutOfDistribution { score } => Some(score),
            _ => None,
        }
    }

    /// The reason with this code and value (the inverse of [`Reason::code`] and
    /// [`Reason::value`]); `None` for an unknown code.
    pub fn from_code(code: &str, value: f32) -> Option<Reason> {
        Some(match code {
            "confident" => Reason::Confident,
            "low_confidence" => Reason::LowConfidence { max_prob: value },
            "small_margin" => Reason::SmallMargin { margin: value },
            "high_entropy" => Reason::HighEntropy { entropy: value },
            "out_of_distribution" => Reason::OutOfDistribution { score: value },
            "audit" => Reason::Audit,
            "over_share_budget" => Reason::OverShareBudget,
            "over_rate_budget" => Reason::OverRateBudget,
            _ => return None,
        })
    }
}

/// Most records a case may carry in its JSON form.
pub const CASE_MAX_RECORDS: usize = 4 * crate::schema::WINDOW_LEN;

impl HardCase {
    /// The case as JSON: what the cloud's verdict endpoint accepts and datasets hold.
    ///
    /// `{"id", "machine", "start", "end", "features": [..], "probs": {class: p},
    /// "reason": {"code", "value"?}, "records": [record JSON]}`
    pub fn to_json(&self) -> Value {
        let probs: Map<String, Value> = CLASSES
            .iter()
            .zip(&self.probs)
            .map(|(c, p)| (c.to_string(), serde_json::json!(p)))
            .collect();
        let mut reason = serde_json::json!({ "code": self.reason.code() });
        if let Some(v) = self.reason.value() {
            reason["value"] = serde_json::json!(v);
        }
        serde_json::json!({
            "id": self.id.to_string(),
            "machine": self.machine,
            "start": format_ts(self.start_ms),
            "end": format_ts(self.end_ms),
            "features": self.features,
            "probs": probs,
            "reason": reason,
            "records": self.records.iter().map(Record::to_json).collect::<Vec<_>>(),
        })
    }

    /// Parses and validates the JSON form. `id`, `start`, `end`, `features` and `reason`
    /// may be left out: they are then derived from the records (the features by the
    /// edge's own code) or set to "audit". Errors name the field.
    pub fn from_json(value: &Value) -> Result<HardCase, RecordError> {
        let obj = value
            .as_object()
            .ok_or_else(|| err("case", "expected a JSON object"))?;
        let records: Vec<Record> = match obj.get("records") {
            Some(Value::Array(a)) => {
                if a.is_empty() || a.len() > CASE_MAX_RECORDS {
                    return Err(err(
                        "records",
                        format!("must hold 1–{CASE_MAX_RECORDS} records (got {})", a.len()),
                    ));
                }
                a.iter()
                    .enumerate()
                    .map(|(i, r)| {
                        Record::from_json_value(r.clone())
                            .map_err(|e| err(format!("records[{i}].{}", e.field), e.reason))
                    })
                    .collect::<Result<_, _>>()?
            }
            Some(_) => return Err(err("records", "must be an array of records")),
            None => return Err(err("records", "missing")),
        };
        let machine = match obj.get("machine") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(err("machine", "must be a string")),
            None => records[0].machine.clone(),
        };
        if let Some(i) = records.iter().position(|r| r.machine != machine) {
            return Err(err(
                format!("records[{i}].machine"),
                format!("differs from the case's machine {machine:?}"),
            ));
        }
        let id = match obj.get("id") {
            Some(Value::String(s)) => {
                CaseId::parse(s).ok_or_else(|| err("id", "must be 32 hex digits"))?
            }
            Some(_) => return Err(err("id", "must be a string of 32 hex digits")),
            None => CaseId::of_window(&machine, &records),
        };
        let ts = |field: &str, default: i64| -> Result<i64, RecordError> {
            match obj.get(field) {
                None => Ok(default),
                Some(v) => crate::record::parse_ts(v).map_err(|e| err(field, e.reason)),
            }
        };
        let start_ms = ts("start", records.iter().map(|r| r.ts_ms).min().unwrap_or(0))?;
        let end_ms = ts("end", records.iter().map(|r| r.ts_ms).max().unwrap_or(0))?;
        let features = match obj.get("features") {
            None => crate::features::extract(&records).to_vec(),
            Some(Value::Array(a)) if a.len() == NUM_FEATURES => a
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    x.as_f64()
                        .filter(|x| x.is_finite())
                        .map(|x| x as f32)
                        .ok_or_else(|| err(format!("features[{i}]"), "must be a finite number"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(err(
                    "features",
                    format!("must be an array of {NUM_FEATURES} numbers"),
                ))
            }
        };
        let probs = match obj.get("probs") {
            Some(Value::Object(m)) => {
                if let Some(k) = m.keys().find(|k| class_index(k).is_none()) {
                    return Err(err(format!("probs.{k}"), "not a known class"));
                }
                CLASSES
                    .iter()
                    .map(|c| match m.get(*c) {
                        None => Ok(0.0),
                        Some(v) => v
                            .as_f64()
                            .filter(|p| (0.0..=1.0).contains(p))
                            .map(|p| p as f32)
                            .ok_or_else(|| err(format!("probs.{c}"), "must be a number in [0, 1]")),
                    })
                    .collect::<Result<Vec<f32>, _>>()?
            }
            Some(_) => return Err(err("probs", "must be an object of class → probability")),
            None => return Err(err("probs", "missing (the student's class probabilities)")),
        };
        let reason = match obj.get("reason") {
            None => Reason::Audit,
            Some(Value::Object(r)) => {
                let code = r
                    .get("code")
                    .and_then(Value::as_str)
                    .ok_or_else(|| err("reason.code", "missing"))?;
                let value = r.get("value").and_then(Value::as_f64).unwrap_or(0.0) as f32;
                Reason::from_code(code, value)
                    .ok_or_else(|| err("reason.code", format!("unknown reason {code:?}")))?
            }
            Some(_) => return Err(err("reason", "must be an object {code, value}")),
        };
        Ok(HardCase {
            id,
            machine,
            start_ms,
            end_ms,
            features,
            probs,
            reason,
            records,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_content_derived_and_parse_back() {
        let a = CaseId::of_window::<Record>("m1", &[]);
        assert_eq!(a, CaseId::of_window::<Record>("m1", &[]));
        assert_ne!(a, CaseId::of_window::<Record>("m2", &[]));
        assert_eq!(CaseId::parse(&a.to_string()), Some(a));
        assert_eq!(CaseId::parse("zz"), None);
        let d = a.unit_draw(1);
        assert!((0.0..1.0).contains(&d));
        assert_eq!(d, a.unit_draw(1));
    }

    #[test]
    fn hard_case_json_round_trips_and_errors_name_the_field() {
        let mut sim = crate::sim::Simulator::new(crate::sim::SimConfig {
            machines: 1,
            ..Default::default()
        });
        let records: Vec<Record> = (0..16).map(|_| sim.tick()[0].to_record()).collect();
        let case = HardCase {
            id: CaseId::of_window(&records[0].machine, &records),
            machine: records[0].machine.clone(),
            start_ms: records[0].ts_ms,
            end_ms: records[15].ts_ms,
            features: crate::features::extract(&records).to_vec(),
            probs: vec![0.5, 0.3, 0.1, 0.05, 0.05, 0.0],
            reason: Reason::SmallMargin { margin: 0.2 },
            records,
        };
        let back = HardCase::from_json(&case.to_json()).expect("round trip");
        assert_eq!(back, case);
        // Only records and probs are required; the rest is derived.
        let minimal = serde_json::json!({
            "records": case.to_json()["records"],
            "probs": {"normal": 0.5, "overheating": 0.5},
        });
        let m = HardCase::from_json(&minimal).expect("minimal case");
        assert_eq!((m.id, &m.features), (case.id, &case.features));
        let mut bad = case.to_json();
        bad["records"][3]["readings"]["temperature"] = serde_json::json!("hot");
        let e = HardCase::from_json(&bad).expect_err("refused");
        assert!(e.field.starts_with("records[3].readings"), "{e}");
        let mut bad = case.to_json();
        bad["probs"]["melted"] = serde_json::json!(0.1);
        assert_eq!(
            HardCase::from_json(&bad).expect_err("refused").field,
            "probs.melted"
        );
        let mut bad = case.to_json();
        bad["features"] = serde_json::json!([1, 2]);
        assert_eq!(
            HardCase::from_json(&bad).expect_err("refused").field,
            "features"
        );
    }
}
