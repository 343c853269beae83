//! The disk cap: eviction by value, every eviction counted, undelivered hard cases never
//! evicted, and 503 with Retry-After when only they remain.

use e2e::{client, edge, ndjson, record, Agent};

fn batch(round: usize) -> String {
    // 10 machines × 16 records = 10 complete windows per request.
    let mut lines = Vec::new();
    for m in 0..10 {
        for i in 0..16 {
            let n = round * 16 + i;
            lines.push(record(
                &format!("m{m}"),
                1_700_000_000_000 + n as i64 * 1000,
                &format!("r{round}-{m}-{i}"),
            ));
        }
    }
    lines.join("\n")
}

fn metric(agent: &Agent, name: &str) -> f64 {
    let text = client()
        .get(format!("{}/metrics", agent.url))
        .send()
        .expect("metrics")
        .text()
        .expect("text");
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

#[test]
fn cap_evicts_by_value_and_never_an_undelivered_hard_case() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("agent.toml");
    // ~200 KiB of data; everything sent as an audit sample or as a budgeted hard case.
    std::fs::write(
        &cfg,
        "[store]\nmax_data_mib = 0.2\nretry_after_secs = 7\n[policy]\naudit_share = 0.2\n",
    )
    .expect("config");
    let store = dir.path().join("store");
    let agent = Agent::start(&store, &["--config", cfg.to_str().expect("utf-8")]);
    let mut acked_rounds = 0;
    for round in 0..60 {
        let (code, body, _) = agent.post(
            "/v1/logs",
            Some("application/x-ndjson"),
            batch(round).into_bytes(),
        );
        assert_eq!(code, 202, "round {round}: {body}");
        acked_rounds += 1;
    }
    let (_, status) = agent.get("/v1/status");
    println!("after local traffic: {}", status["store"]);
    let cap = status["store"]["cap_bytes"].as_u64().expect("cap");
    assert!(status["store"]["live_bytes"].as_u64().expect("live") <= cap);
    assert!(
        metric(&agent, "edge_evictions_total") > 0.0,
        "evictions are counted in metrics"
    );
    assert!(
        status["since_start"]["evicted_raw_records"]
            .as_u64()
            .expect("n")
            > 0
    );
    let hard_before = status["store"]["outbox"].as_u64().expect("outbox")
        - status["store"]["outbox_audit"].as_u64().expect("audit");

    // Now every case is hard (novel): the outbox fills until only undelivered hard cases remain.
    let (code, _) = agent.put("/v1/policy", serde_json::json!({"max_ood_score": 0.0, "max_share": 1.0, "rate_burst": 100000.0, "max_per_minute": 1e9}));
    assert_eq!(code, 200);
    let mut refused = None;
    for round in 60..400 {
        let (code, body, retry) = agent.post(
            "/v1/logs",
            Some("application/x-ndjson"),
            batch(round).into_bytes(),
        );
        match code {
            202 => acked_rounds += 1,
            503 => {
                refused = Some((body, retry));
                break;
            }
            other => panic!("round {round}: unexpected {other}: {body}"),
        }
    }
    let (body, retry) =
        refused.expect("the agent refused input once only undelivered hard cases remained");
    println!("refused: {body} (Retry-After {retry:?})");
    assert_eq!(retry.as_deref(), Some("7"));
    let (_, status) = agent.get("/v1/status");
    assert_eq!(status["store"]["full"], true);
    assert!(
        status["store"]["outbox_audit"].as_u64().expect("audit") == 0,
        "audit samples went first"
    );
    assert!(
        status["since_start"]["evicted_audit_samples"]
            .as_u64()
            .expect("n")
            > 0
    );
    agent.stop();

    // Read the store without the agent: every queued hard case is whole.
    let d = store.to_str().expect("utf-8");
    let cases = ndjson(&edge(&["export", "--data-dir", d, "cases"]));
    let records = ndjson(&edge(&["export", "--data-dir", d, "records"]));
    let have: std::collections::HashSet<u64> = records
        .iter()
        .map(|r| r["_seq"].as_u64().expect("seq"))
        .collect();
    let queued: Vec<&serde_json::Value> =
        cases.iter().filter(|c| c["outbox"] == "queued").collect();
    assert!(queued.len() as u64 > hard_before);
    for c in &queued {
        assert_ne!(
            c["reason"], "audit",
            "audit samples are evicted before the cap refuses input"
        );
        assert_eq!(c["records_kept"], true);
        for s in c["record_seqs"].as_array().expect("seqs") {
            assert!(
                have.contains(&s.as_u64().expect("seq")),
                "record {s} of undelivered hard case {} was evicted",
                c["id"]
            );
        }
    }
    println!(
        "{acked_rounds} requests acknowledged; {} hard cases queued, all with their records",
        queued.len()
    );
}

#[test]
fn retention_removes_only_what_is_handled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("agent.toml");
    // Raw records of handled cases kept ~1.8 s, their summaries ~5.4 s.
    std::fs::write(
        &cfg,
        "[store]\nrecord_retention_hours = 0.0005\ncase_retention_hours = 0.0015\njanitor_interval_secs = 0.2\n[policy]\naudit_share = 0.0\n",
    )
    .expect("config");
    let store = dir.path().join("store");
    let agent = Agent::start(&store, &["--config", cfg.to_str().expect("utf-8")]);
    for round in 0..10 {
        let (code, body, _) = agent.post(
            "/v1/logs",
            Some("application/x-ndjson"),
            batch(round).into_bytes(),
        );
        assert_eq!(code, 202, "{body}");
    }
    // Then every case is hard: these wait in the outbox, and must outlive any retention.
    let (code, _) = agent.put(
        "/v1/policy",
        serde_json::json!({"max_ood_score": 0.0, "max_share": 1.0, "rate_burst": 100000.0}),
    );
    assert_eq!(code, 200);
    for round in 10..13 {
        let (code, body, _) = agent.post(
            "/v1/logs",
            Some("application/x-ndjson"),
            batch(round).into_bytes(),
        );
        assert_eq!(code, 202, "{body}");
    }
    let (_, before) = agent.get("/v1/status");
    assert_eq!(before["store"]["records"], 13 * 160);
    let hard = before["store"]["outbox"].as_u64().expect("outbox");
    assert_eq!(hard, 30);
    // Wait (bounded) for both retentions to pass.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        let (_, s) = agent.get("/v1/status");
        if s["store"]["cases"].as_u64() == Some(hard) || std::time::Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    println!("after retention: {}", status["store"]);
    assert_eq!(
        status["store"]["cases"].as_u64(),
        Some(hard),
        "only the undelivered hard cases remain"
    );
    assert_eq!(
        status["store"]["records"].as_u64(),
        Some(hard * 16),
        "with all their records"
    );
    assert_eq!(status["store"]["outbox"].as_u64(), Some(hard));
    assert_eq!(
        status["since_start"]["expired_raw_records"].as_u64(),
        Some(100)
    );
    assert_eq!(
        status["since_start"]["expired_case_summaries"].as_u64(),
        Some(100)
    );
    assert!(metric(&agent, "edge_expired_total") >= 200.0);
    let (_, hard_cases) = agent.get("/v1/cases?decision=hard&limit=100");
    for c in hard_cases["cases"].as_array().expect("cases") {
        assert_eq!(c["records_kept"], true);
    }
    // An expired record may be sent again later: it is stored anew (its key expired with it).
    agent.stop();
}
