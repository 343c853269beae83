//! Labelled cases from the simulator, decided exactly as the agent decides them.
//!
//! `edge-agent dataset` runs simulated machines through the agent's own windowing, the
//! embedded student and the policy, without a store or HTTP, and writes one NDJSON line per
//! case: the case as the cloud receives it ([`shared::case::HardCase::to_json`]) plus the
//! policy's `decision`, the student's `class` and the simulator's true `label`. The cloud's
//! demo model is trained on these lines, and its accuracy is measured on the hard ones.

use std::collections::HashMap;
use std::io::Write;

use shared::case::{CaseId, Decision, HardCase};
use shared::features::extract;
use shared::record::Record;
use shared::schema::{CLASSES, WINDOW_LEN};
use shared::sim::{window_label, SimConfig, Simulator};

use crate::infer::Student;
use crate::policy::{Policy, PolicyConfig, PolicyState, Uncertainty};

/// What to simulate and which cases to write.
pub struct DatasetOptions {
    /// Simulator seed.
    pub seed: u64,
    /// Simulated machines.
    pub machines: usize,
    /// Records per machine.
    pub ticks: u64,
    /// Chance that a normal episode is followed by a fault.
    pub fault_share: f64,
    /// Write only the cases the policy sends to the cloud.
    pub hard_only: bool,
}

/// Writes the dataset to `out`; returns (cases, hard cases) written.
pub fn run(opts: &DatasetOptions, out: &mut impl Write) -> anyhow::Result<(u64, u64)> {
    let student = Student::embedded()?;
    let mut policy = Policy::new(PolicyConfig::default(), PolicyState::default());
    let mut sim = Simulator::new(SimConfig {
        machines: opts.machines,
        seed: opts.seed,
        fault_share: opts.fault_share,
        ..SimConfig::default()
    });
    let mut open: HashMap<String, Vec<Record>> = HashMap::new();
    let (mut written, mut hard) = (0u64, 0u64);
    for _ in 0..opts.ticks {
        let mut complete = Vec::new();
        for r in sim.tick() {
            let w = open.entry(r.machine.clone()).or_default();
            w.push(r.to_record());
            if w.len() == WINDOW_LEN {
                complete.push(std::mem::take(w));
            }
        }
        if complete.is_empty() {
            continue;
        }
        let features: Vec<_> = complete.iter().map(|w| extract(w)).collect();
        let inferred = student.infer(&features)?;
        for ((records, f), inf) in complete.into_iter().zip(features).zip(inferred) {
            let machine = records[0].machine.clone();
            let id = CaseId::of_window(&machine, &records);
            let end_ms = records.iter().map(|r| r.ts_ms).max().unwrap_or(0);
            let u = Uncertainty::measure(&inf.probs, inf.ood);
            let (decision, reason) = policy.decide(&id, &u, end_ms);
            if opts.hard_only && decision != Decision::Hard {
                continue;
            }
            let labels: Vec<String> = records
                .iter()
                .map(|r| {
                    r.extra_field("label")
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_else(|| "normal".into())
                })
                .collect();
            let label = window_label(labels.iter().map(String::as_str)).to_string();
            let class = inf
                .probs
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(c, _)| CLASSES[c])
                .unwrap_or("normal");
            let case = HardCase {
                id,
                machine,
                start_ms: records.iter().map(|r| r.ts_ms).min().unwrap_or(0),
                end_ms,
                features: f.to_vec(),
                probs: inf.probs,
                reason,
                records,
            };
            let mut j = case.to_json();
            j["decision"] = serde_json::json!(decision.as_str());
            j["class"] = serde_json::json!(class);
            j["label"] = serde_json::json!(label);
            serde_json::to_writer(&mut *out, &j)?;
            out.write_all(b"\n")?;
            written += 1;
            hard += u64::from(decision == Decision::Hard);
        }
    }
    out.flush()?;
    Ok((written, hard))
}
