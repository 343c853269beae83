//! Cases: one complete window of one machine, its id, the student's answer and the
//! policy's decision.

use std::borrow::Borrow;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::record::Record;

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
}
