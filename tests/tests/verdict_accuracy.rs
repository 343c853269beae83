//! The demo model's verdicts on held-out hard cases: simulated machines run through the
//! edge's own student and policy (`edge-agent dataset --hard-only`, seeds the training
//! never saw), each hard case judged by the cloud's verdict service on the embedded demo
//! model with schema-constrained decoding. The verdict class must agree with the
//! simulator's true label on at least 90% of them.

use std::path::Path;

use cloud_core::engine::scheduler::SchedulerConfig;
use cloud_core::engine::service::Engine;
use cloud_core::verdict::VerdictService;
use e2e::{bin, ndjson};
use shared::case::HardCase;

/// Held-out seeds (training uses seeds ≥ 1000, see cloud-core/demo-model/MODEL_CARD.md):
/// every hard case the edge decides on these, with the `edge-agent dataset` defaults.
const SEEDS: std::ops::RangeInclusive<u64> = 1..=20;
/// At least this many hard cases come out of them (the estimate's error stays near 1%).
const MIN_CASES: usize = 500;

#[test]
fn demo_model_verdicts_agree_with_the_truth_on_held_out_hard_cases() {
    let mut cases: Vec<(HardCase, String, String)> = Vec::new();
    for seed in SEEDS {
        let out = std::process::Command::new(bin("edge-agent"))
            .args(["dataset", "--hard-only", "--seed", &seed.to_string()])
            .output()
            .expect("edge-agent dataset");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for v in ndjson(&String::from_utf8_lossy(&out.stdout)) {
            let case = HardCase::from_json(&v).expect("a case the edge wrote parses");
            let label = v["label"].as_str().expect("label").to_string();
            let student = v["class"].as_str().expect("class").to_string();
            cases.push((case, label, student));
        }
    }
    assert!(
        cases.len() >= MIN_CASES,
        "{} hard cases from the held-out seeds",
        cases.len()
    );
    let n = cases.len();

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cloud-core/demo-model");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let verdicts = rt.block_on(async {
        let sched = SchedulerConfig {
            max_batch: 32,
            max_queue: 4096,
            ..SchedulerConfig::default()
        };
        let engine = Engine::load_cpu(&dir, "demo", sched).expect("demo model");
        let service = VerdictService::new(engine).expect("verdict service");
        futures_util::future::join_all(cases.iter().map(|(c, _, _)| service.judge(c))).await
    });
    let mut right = 0;
    let mut student_right = 0;
    let mut confusion = std::collections::BTreeMap::<(String, String), usize>::new();
    for ((_, label, student), v) in cases.iter().zip(verdicts) {
        let v = v.expect("every verdict parses");
        right += usize::from(&v.verdict.class == label);
        student_right += usize::from(student == label);
        if &v.verdict.class != label {
            *confusion
                .entry((label.clone(), v.verdict.class.clone()))
                .or_default() += 1;
        }
        assert!((0.0..=1.0).contains(&v.verdict.confidence));
        assert!(!v.verdict.explanation.is_empty() && !v.verdict.action.is_empty());
    }
    let acc = right as f64 / n as f64;
    println!(
        "demo model: {right}/{n} = {:.1}% of held-out hard cases right (student: {:.1}%); \
         mistakes (truth → verdict): {confusion:?}",
        100.0 * acc,
        100.0 * student_right as f64 / n as f64
    );
    assert!(acc >= 0.90, "verdict accuracy {acc:.3} is below 0.90");
}
