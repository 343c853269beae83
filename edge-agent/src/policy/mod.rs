//! The hard-case policy: local or cloud, and why.
//!
//! A case is *hard* when the student is unsure (top probability, top-2 margin, entropy)
//! or the input is unlike its training data (out-of-distribution score), or when it is
//! drawn for the audit sample. Hard cases are limited by two budgets, so a fleet never
//! floods the cloud: at most `max_share` of any `share_window` consecutive cases, and at
//! most `max_per_minute` per minute of *record* time (a token bucket of `rate_burst`).
//!
//! Decisions are deterministic for the same input sequence: the audit draw is seeded by
//! the case id, the rate budget runs on record timestamps, and the budget state is stored
//! with the cases it counted. This module never reads a clock and never does I/O.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use shared::case::{CaseId, Decision, Reason};

/// Thresholds and budgets. Changeable at run time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// A case is hard when its top class probability is below this.
    pub min_max_prob: f32,
    /// … or when top-1 minus top-2 probability is below this.
    pub min_margin: f32,
    /// … or when the entropy of the probabilities (nats) is above this.
    pub max_entropy: f32,
    /// … or when the out-of-distribution score is above this.
    pub max_ood_score: f32,
    /// Share of confident cases sent anyway, as an audit sample (0–1).
    pub audit_share: f64,
    /// Salt of the audit draw (change it to draw a different sample).
    pub audit_salt: u64,
    /// At most this share of any `share_window` consecutive cases is sent (0–1).
    pub max_share: f64,
    /// Length of the window over which `max_share` holds.
    pub share_window: usize,
    /// At most this many hard cases per minute of record time.
    pub max_per_minute: f64,
    /// Bucket size of the rate budget (a burst allowed after a quiet period).
    pub rate_burst: f64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            min_max_prob: 0.70,
            min_margin: 0.50,
            max_entropy: 0.90,
            max_ood_score: 3.0,
            audit_share: 0.01,
            audit_salt: 0,
            max_share: 0.25,
            share_window: 200,
            max_per_minute: 600.0,
            rate_burst: 60.0,
        }
    }
}

impl PolicyConfig {
    /// Checks ranges; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        let unit = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name} must be within 0–1 (got {v})"))
            }
        };
        unit("min_max_prob", f64::from(self.min_max_prob))?;
        unit("min_margin", f64::from(self.min_margin))?;
        unit("audit_share", self.audit_share)?;
        unit("max_share", self.max_share)?;
        if !(self.max_entropy.is_finite() && self.max_entropy >= 0.0) {
            return Err(format!(
                "max_entropy must be a non-negative number (got {})",
                self.max_entropy
            ));
        }
        if !(self.max_ood_score.is_finite() && self.max_ood_score >= 0.0) {
            return Err(format!(
                "max_ood_score must be a non-negative number (got {})",
                self.max_ood_score
            ));
        }
        if self.share_window == 0 || self.share_window > 100_000 {
            return Err(format!(
                "share_window must be within 1–100000 (got {})",
                self.share_window
            ));
        }
        if !(self.max_per_minute.is_finite() && self.max_per_minute >= 0.0) {
            return Err(format!(
                "max_per_minute must be a non-negative number (got {})",
                self.max_per_minute
            ));
        }
        if !(self.rate_burst.is_finite() && self.rate_burst >= 1.0) {
            return Err(format!(
                "rate_burst must be at least 1 (got {})",
                self.rate_burst
            ));
        }
        Ok(())
    }
}

/// Budget state, stored with the cases so decisions survive restarts unchanged.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyState {
    /// Whether each of the last `share_window` cases was sent.
    recent: VecDeque<bool>,
    /// Hard cases among `recent`.
    recent_hard: usize,
    /// Tokens in the rate bucket.
    tokens: f64,
    /// Latest record time seen (ms); the bucket's clock. `None` before the first case.
    clock_ms: Option<i64>,
}

/// The uncertainty of one case, as the policy measured it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Uncertainty {
    /// Top probability.
    pub max_prob: f32,
    /// Top-1 minus top-2.
    pub margin: f32,
    /// Entropy in nats.
    pub entropy: f32,
    /// Out-of-distribution score.
    pub ood: f32,
}

impl Uncertainty {
    /// Measures class probabilities and an OOD score.
    pub fn measure(probs: &[f32], ood: f32) -> Uncertainty {
        let mut top1 = 0f32;
        let mut top2 = 0f32;
        let mut entropy = 0f32;
        for &p in probs {
            if p > top1 {
                top2 = top1;
                top1 = p;
            } else if p > top2 {
                top2 = p;
            }
            if p > 0.0 {
                entropy -= p * p.ln();
            }
        }
        Uncertainty {
            max_prob: top1,
            margin: top1 - top2,
            entropy,
            ood,
        }
    }
}

/// The policy: configuration plus budget state.
#[derive(Clone, Debug)]
pub struct Policy {
    cfg: PolicyConfig,
    state: PolicyState,
}

impl Policy {
    /// A policy resuming from `state`.
    pub fn new(cfg: PolicyConfig, state: PolicyState) -> Policy {
        let mut p = Policy { cfg, state };
        if p.state.clock_ms.is_none() {
            p.state.tokens = p.cfg.rate_burst;
        }
        p
    }

    /// The configuration in force.
    #[cfg(test)]
    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// Replaces the configuration (budget state carries over).
    pub fn set_config(&mut self, cfg: PolicyConfig) {
        self.state.tokens = self.state.tokens.min(cfg.rate_burst);
        self.cfg = cfg;
    }

    /// The budget state (to be stored with the decisions it reflects).
    pub fn state(&self) -> &PolicyState {
        &self.state
    }

    /// Decides one case. `record_ms` is the case's last record timestamp.
    pub fn decide(&mut self, id: &CaseId, u: &Uncertainty, record_ms: i64) -> (Decision, Reason) {
        // Advance the rate bucket on record time (monotonic: never moves backwards).
        match self.state.clock_ms {
            None => {
                self.state.clock_ms = Some(record_ms);
                self.state.tokens = self.cfg.rate_burst;
            }
            Some(prev) if record_ms > prev => {
                let minutes = (record_ms - prev) as f64 / 60_000.0;
                self.state.tokens = (self.state.tokens + minutes * self.cfg.max_per_minute)
                    .min(self.cfg.rate_burst);
                self.state.clock_ms = Some(record_ms);
            }
            Some(_) => {}
        }

        let c = &self.cfg;
        let wanted = if u.ood > c.max_ood_score {
            Some(Reason::OutOfDistribution { score: u.ood })
        } else if u.max_prob < c.min_max_prob {
            Some(Reason::LowConfidence {
                max_prob: u.max_prob,
            })
        } else if u.margin < c.min_margin {
            Some(Reason::SmallMargin { margin: u.margin })
        } else if u.entropy > c.max_entropy {
            Some(Reason::HighEntropy { entropy: u.entropy })
        } else if id.unit_draw(c.audit_salt) < c.audit_share {
            Some(Reason::Audit)
        } else {
            None
        };

        let (decision, reason) = match wanted {
            None => (Decision::Local, Reason::Confident),
            Some(reason) => {
                let share_cap = (c.max_share * c.share_window as f64).floor() as usize;
                // The oldest entry leaves the window when this one enters.
                let leaving = if self.state.recent.len() >= c.share_window {
                    usize::from(self.state.recent.front().copied().unwrap_or(false))
                } else {
                    0
                };
                if self.state.recent_hard - leaving + 1 > share_cap {
                    (Decision::Local, Reason::OverShareBudget)
                } else if self.state.tokens < 1.0 {
                    (Decision::Local, Reason::OverRateBudget)
                } else {
                    self.state.tokens -= 1.0;
                    (Decision::Hard, reason)
                }
            }
        };
        self.state.recent.push_back(decision == Decision::Hard);
        if decision == Decision::Hard {
            self.state.recent_hard += 1;
        }
        while self.state.recent.len() > c.share_window {
            if self.state.recent.pop_front() == Some(true) {
                self.state.recent_hard -= 1;
            }
        }
        (decision, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u64) -> CaseId {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&n.to_le_bytes());
        CaseId(b)
    }

    fn unsure() -> Uncertainty {
        Uncertainty::measure(&[0.4, 0.35, 0.25], 0.0)
    }

    #[test]
    fn measures_uncertainty() {
        let u = Uncertainty::measure(&[0.7, 0.2, 0.1], 1.5);
        assert!((u.max_prob - 0.7).abs() < 1e-6);
        assert!((u.margin - 0.5).abs() < 1e-6);
        assert!((u.entropy - 0.8018).abs() < 1e-3);
    }

    #[test]
    fn each_threshold_gives_its_reason() {
        let mut p = Policy::new(
            PolicyConfig {
                audit_share: 0.0,
                ..Default::default()
            },
            PolicyState::default(),
        );
        let (d, r) = p.decide(&id(1), &Uncertainty::measure(&[0.99, 0.01], 0.5), 0);
        assert_eq!((d, r), (Decision::Local, Reason::Confident));
        let (d, r) = p.decide(&id(2), &Uncertainty::measure(&[0.99, 0.01], 50.0), 0);
        assert_eq!(d, Decision::Hard);
        assert_eq!(r.code(), "out_of_distribution");
        let (_, r) = p.decide(&id(3), &unsure(), 0);
        assert_eq!(r.code(), "low_confidence");
        let (_, r) = p.decide(&id(4), &Uncertainty::measure(&[0.72, 0.28], 0.0), 0);
        assert_eq!(r.code(), "small_margin");
        let (_, r) = p.decide(
            &id(5),
            &Uncertainty::measure(&[0.75, 0.05, 0.05, 0.05, 0.05, 0.05], 0.0),
            0,
        );
        assert_eq!(r.code(), "high_entropy");
    }

    #[test]
    fn audit_draw_follows_the_share_and_the_case_id() {
        let cfg = PolicyConfig {
            audit_share: 0.1,
            max_share: 1.0,
            rate_burst: 1e9,
            ..Default::default()
        };
        let mut p = Policy::new(cfg.clone(), PolicyState::default());
        let confident = Uncertainty::measure(&[0.99, 0.01], 0.0);
        let audits = (0..10_000)
            .filter(|n| p.decide(&id(*n), &confident, 0).1 == Reason::Audit)
            .count();
        assert!((800..1200).contains(&audits), "{audits}");
        let mut q = Policy::new(cfg, PolicyState::default());
        for n in 0..100 {
            assert_eq!(
                Policy::new(q.config().clone(), PolicyState::default())
                    .decide(&id(n), &confident, 0)
                    .1,
                q.decide(&id(n), &confident, 0).1
            );
        }
    }

    #[test]
    fn rate_budget_counts_record_time() {
        let cfg = PolicyConfig {
            max_share: 1.0,
            max_per_minute: 60.0,
            rate_burst: 5.0,
            audit_share: 0.0,
            ..Default::default()
        };
        let mut p = Policy::new(cfg, PolicyState::default());
        let sent: Vec<bool> = (0..10)
            .map(|n| p.decide(&id(n), &unsure(), 1_000).0 == Decision::Hard)
            .collect();
        assert_eq!(sent.iter().filter(|s| **s).count(), 5);
        assert_eq!(
            p.decide(&id(99), &unsure(), 1_000).1,
            Reason::OverRateBudget
        );
        // Two seconds of record time refill two tokens, however long the wall clock took.
        assert_eq!(p.decide(&id(100), &unsure(), 3_000).0, Decision::Hard);
        assert_eq!(p.decide(&id(101), &unsure(), 3_000).0, Decision::Hard);
        assert_eq!(p.decide(&id(102), &unsure(), 3_000).0, Decision::Local);
        // Time going backwards refills nothing.
        assert_eq!(p.decide(&id(103), &unsure(), 0).0, Decision::Local);
    }

    proptest! {
        #[test]
        fn share_budget_holds_over_every_window(hard in proptest::collection::vec(any::<bool>(), 1..600), share in 0.0f64..1.0, window in 1usize..50) {
            let cfg = PolicyConfig { max_share: share, share_window: window, rate_burst: 1e9, audit_share: 0.0, ..Default::default() };
            let mut p = Policy::new(cfg, PolicyState::default());
            let confident = Uncertainty::measure(&[0.99, 0.01], 0.0);
            let uncertain = unsure();
            let sent: Vec<bool> = hard.iter().enumerate().map(|(n, h)| {
                p.decide(&id(n as u64), if *h { &uncertain } else { &confident }, 0).0 == Decision::Hard
            }).collect();
            let cap = (share * window as f64).floor() as usize;
            for w in sent.windows(window.min(sent.len())) {
                prop_assert!(w.iter().filter(|s| **s).count() <= cap);
            }
        }
    }
}
