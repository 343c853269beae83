//! Crash safety: every acknowledged record survives `kill -9` and is stored exactly once.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e::{client, edge, ndjson, record, Agent};

#[test]
fn every_acknowledged_record_survives_kill_9_exactly_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(dir.path(), &[]);
    let url = format!("{}/v1/logs", agent.url);
    let stop = Arc::new(AtomicBool::new(false));
    // id → body line, for everything acknowledged.
    let acked: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let mut clients = Vec::new();
    for c in 0..8 {
        let (url, stop, acked) = (url.clone(), stop.clone(), acked.clone());
        clients.push(std::thread::spawn(move || {
            let http = client();
            let machine = format!("m{c}");
            let mut seq = 0i64;
            while !stop.load(Ordering::Relaxed) {
                // Half the clients send batches of 50, half single records.
                let n = if c % 2 == 0 { 50 } else { 1 };
                let lines: Vec<(String, String)> = (0..n)
                    .map(|_| {
                        seq += 1;
                        let id = format!("{machine}-{seq:07}");
                        (
                            id.clone(),
                            record(&machine, 1_700_000_000_000 + seq * 100, &id),
                        )
                    })
                    .collect();
                let body = lines
                    .iter()
                    .map(|(_, l)| l.as_str())
                    .collect::<Vec<_>>()
                    .join("\n");
                match http
                    .post(&url)
                    .header("content-type", "application/x-ndjson")
                    .body(body)
                    .send()
                {
                    Ok(r) if r.status().as_u16() == 202 => {
                        let mut a = acked.lock().expect("lock");
                        for (id, line) in lines {
                            a.insert(id, line);
                        }
                    }
                    // After the kill: connection errors. Nothing acknowledged, nothing owed.
                    _ => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }));
    }
    // Let the clients run, then kill the agent in the middle of the stream.
    std::thread::sleep(Duration::from_millis(1500));
    let before_kill = acked.lock().expect("lock").len();
    agent.kill9();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client thread");
    }
    let acked = acked.lock().expect("lock").clone();
    assert!(
        before_kill > 500,
        "too few records acknowledged before the kill ({before_kill}) to prove anything"
    );
    println!("{} records acknowledged before kill -9", acked.len());

    // Restart on the same store: it recovers, and re-sending everything stores nothing twice.
    let agent = Agent::start(dir.path(), &[]);
    let (_, status) = agent.get("/v1/status");
    let records_after_restart = status["store"]["records"].as_u64().expect("records");
    assert!(
        records_after_restart >= acked.len() as u64,
        "{records_after_restart} < {}",
        acked.len()
    );
    let lines: Vec<&String> = acked.values().collect();
    let mut dup_total = 0;
    for chunk in lines.chunks(500) {
        let body = chunk
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        let (code, outcome, _) =
            agent.post("/v1/logs", Some("application/x-ndjson"), body.into_bytes());
        assert_eq!(code, 202, "{outcome}");
        assert_eq!(
            outcome["accepted"], 0,
            "a re-sent acknowledged record was stored again: {outcome}"
        );
        dup_total += outcome["duplicates"].as_u64().expect("duplicates");
    }
    assert_eq!(dup_total, acked.len() as u64);
    agent.stop();

    // The store, read without the agent: each acknowledged id exactly once.
    let exported = ndjson(&edge(&[
        "export",
        "--data-dir",
        dir.path().to_str().expect("utf-8"),
        "records",
    ]));
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &exported {
        *seen
            .entry(r["id"].as_str().expect("id").to_string())
            .or_default() += 1;
    }
    let missing: Vec<&String> = acked.keys().filter(|id| !seen.contains_key(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged records lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let doubled: Vec<(&String, &usize)> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "records stored twice: {doubled:?}");
    let seqs: HashSet<u64> = exported
        .iter()
        .map(|r| r["_seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs.len(), exported.len(), "sequence numbers are unique");

    // Counts from inspect agree with the export.
    let counts: serde_json::Value = serde_json::from_str(&edge(&[
        "inspect",
        "--data-dir",
        dir.path().to_str().expect("utf-8"),
        "--json",
    ]))
    .expect("json");
    assert_eq!(counts["records"].as_u64(), Some(exported.len() as u64));
}
