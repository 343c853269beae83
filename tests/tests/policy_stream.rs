//! The hard-case policy on a labelled simulated stream: accuracy of the local decisions,
//! the hard share within its budget, determinism, and thresholds changed at run time.

use std::collections::HashMap;

use e2e::{edge, ndjson, Agent};

const START_MS: &str = "1795417200000";

struct Run {
    cases: Vec<serde_json::Value>,
    truth: HashMap<String, String>,
}

/// Streams `ticks` records from 8 simulated machines into a fresh agent, optionally
/// after changing its policy at run time, and reads the cases back.
fn run_stream(ticks: u64, policy: Option<serde_json::Value>) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(dir.path(), &[]);
    if let Some(p) = policy {
        let (status, body) = agent.put("/v1/policy", p);
        assert_eq!(status, 200, "{body}");
    }
    let out = edge(&[
        "simulate",
        "--target",
        &agent.url,
        "--machines",
        "8",
        "--ticks",
        &ticks.to_string(),
        "--fast",
        "--seed",
        "3",
        "--start-ms",
        START_MS,
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_str(out.trim()).expect("report");
    assert_eq!(report["records"].as_u64(), Some(8 * ticks), "{report}");
    // The student's answer came back at once, in the 202s.
    assert_eq!(report["cases"].as_u64(), Some(8 * ticks / 16), "{report}");
    agent.stop();
    let d = dir.path().to_str().expect("utf-8");
    let records = ndjson(&edge(&["export", "--data-dir", d, "records"]));
    let labels: HashMap<u64, String> = records
        .iter()
        .map(|r| {
            (
                r["_seq"].as_u64().expect("seq"),
                r["label"].as_str().expect("label kept").to_string(),
            )
        })
        .collect();
    let cases = ndjson(&edge(&["export", "--data-dir", d, "cases"]));
    let mut truth = HashMap::new();
    for c in &cases {
        let mut counts: Vec<(String, usize, usize)> = Vec::new();
        for (pos, s) in c["record_seqs"]
            .as_array()
            .expect("seqs")
            .iter()
            .enumerate()
        {
            let l = labels[&s.as_u64().expect("seq")].clone();
            match counts.iter_mut().find(|e| e.0 == l) {
                Some(e) => {
                    e.1 += 1;
                    e.2 = pos;
                }
                None => counts.push((l, 1, pos)),
            }
        }
        let label = counts
            .into_iter()
            .max_by_key(|e| (e.1, e.2))
            .expect("label")
            .0;
        truth.insert(c["id"].as_str().expect("id").to_string(), label);
    }
    Run { cases, truth }
}

fn hard_within_every_window(cases: &[serde_json::Value], window: usize, cap: usize) {
    let hard: Vec<bool> = cases.iter().map(|c| c["decision"] == "hard").collect();
    for (i, w) in hard.windows(window.min(hard.len())).enumerate() {
        let n = w.iter().filter(|h| **h).count();
        assert!(
            n <= cap,
            "{n} hard cases in the {window} cases from #{i} (cap {cap})"
        );
    }
}

#[test]
fn local_decisions_are_accurate_and_the_hard_share_stays_in_budget() {
    let run = run_stream(1600, None); // 800 cases
    let (mut local, mut local_right, mut hard, mut hard_right) = (0, 0, 0, 0);
    let mut reasons: HashMap<String, usize> = HashMap::new();
    for c in &run.cases {
        let right = c["class"].as_str() == Some(run.truth[c["id"].as_str().expect("id")].as_str());
        *reasons
            .entry(c["reason"].as_str().expect("reason").to_string())
            .or_default() += 1;
        if c["decision"] == "local" {
            local += 1;
            local_right += usize::from(right);
        } else {
            hard += 1;
            hard_right += usize::from(right);
            assert_eq!(
                c["outbox"], "queued",
                "a hard case waits in the outbox while offline"
            );
        }
    }
    let local_acc = local_right as f64 / local as f64;
    let hard_acc = hard_right as f64 / hard.max(1) as f64;
    let share = hard as f64 / run.cases.len() as f64;
    println!(
        "{} cases: {local} local (student right on {:.1}%), {hard} hard (student right on {:.1}%), hard share {:.1}%; reasons {reasons:?}",
        run.cases.len(),
        100.0 * local_acc,
        100.0 * hard_acc,
        100.0 * share
    );
    assert!(
        local_acc >= 0.95,
        "local decisions must be accurate: {local_acc}"
    );
    assert!(hard > 0, "a stream with faults has hard cases");
    assert!(
        hard_acc < local_acc,
        "the policy sends the cases the student gets wrong"
    );
    // Default budget: at most 25% of any 200 consecutive cases.
    hard_within_every_window(&run.cases, 200, 50);
}

#[test]
fn decisions_are_deterministic_and_thresholds_change_at_run_time() {
    let a = run_stream(480, None);
    let b = run_stream(480, None);
    let key = |r: &Run| {
        r.cases
            .iter()
            .map(|c| {
                (
                    c["id"].clone(),
                    c["decision"].clone(),
                    c["reason"].clone(),
                    c["class"].clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(key(&a), key(&b), "the same input gives the same decisions");

    // Stricter thresholds and a tight budget, set at run time: more cases want the cloud,
    // at most 5 of any 50 consecutive cases go.
    let tight = run_stream(
        480,
        Some(serde_json::json!({"min_max_prob": 0.999, "max_share": 0.1, "share_window": 50})),
    );
    hard_within_every_window(&tight.cases, 50, 5);
    let over = tight
        .cases
        .iter()
        .filter(|c| c["reason"] == "over_share_budget")
        .count();
    assert!(
        over > 0,
        "the tight budget turned some would-be hard cases local"
    );
    assert!(tight
        .cases
        .iter()
        .all(|c| c["reason"] != "over_share_budget" || c["decision"] == "local"));

    // Everything novel: with max_ood_score 0 every case is out of distribution.
    let all = run_stream(
        160,
        Some(serde_json::json!({"max_ood_score": 0.0, "max_share": 1.0, "rate_burst": 1000.0})),
    );
    assert!(all
        .cases
        .iter()
        .all(|c| c["decision"] == "hard" && c["reason"] == "out_of_distribution"));
}
