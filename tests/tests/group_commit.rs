//! Group commit: concurrent requests share flushes, and every acknowledgement still
//! follows the flush that covers it (see crash_safety for the kill -9 half of that).
//! Also: the case listing pages through every case exactly once.

use std::collections::HashSet;

use e2e::{client, record, Agent};

#[test]
fn concurrent_requests_share_flushes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(dir.path(), &[]);
    let url = format!("{}/v1/logs", agent.url);
    let threads: Vec<_> = (0..32)
        .map(|c| {
            let url = url.clone();
            std::thread::spawn(move || {
                let http = client();
                for n in 0..40 {
                    let body = record(
                        &format!("m{c}"),
                        1_700_000_000_000 + n * 1000,
                        &format!("{c}-{n}"),
                    );
                    let r = http
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .expect("post");
                    assert_eq!(r.status().as_u16(), 202);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client");
    }
    let (_, s) = agent.get("/v1/status");
    let accepted = s["since_start"]["records_accepted"]
        .as_u64()
        .expect("accepted");
    let flushes = s["since_start"]["flushes"].as_u64().expect("flushes");
    println!("{accepted} single-record requests acknowledged with {flushes} flushes");
    assert_eq!(accepted, 32 * 40);
    assert!(
        flushes < accepted,
        "concurrent requests must share flushes ({flushes} flushes for {accepted} requests)"
    );
}

#[test]
fn case_listing_pages_through_every_case_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(dir.path(), &[]);
    let mut body = Vec::new();
    for m in 0..3 {
        for n in 0..(16 * 7) {
            body.push(record(
                &format!("m{m}"),
                1_700_000_000_000 + n * 1000,
                &format!("{m}-{n}"),
            ));
        }
    }
    let (code, out, _) = agent.post(
        "/v1/logs",
        Some("application/x-ndjson"),
        body.join("\n").into_bytes(),
    );
    assert_eq!(code, 202, "{out}");
    assert_eq!(
        out["cases"].as_array().expect("cases").len(),
        21,
        "the student's answers come back at once"
    );
    let mut seen = HashSet::new();
    let mut before = String::new();
    let mut pages = 0;
    loop {
        let (code, page) = agent.get(&format!("/v1/cases?machine=m1&limit=3{before}"));
        assert_eq!(code, 200, "{page}");
        for c in page["cases"].as_array().expect("cases") {
            assert_eq!(c["machine"], "m1");
            assert!(
                seen.insert(c["id"].as_str().expect("id").to_string()),
                "case listed twice"
            );
            let (code, one) = agent.get(&format!("/v1/cases/{}", c["id"].as_str().expect("id")));
            assert_eq!(code, 200);
            assert_eq!(one["records"].as_array().expect("records").len(), 16);
        }
        pages += 1;
        match page["next_before"].as_u64() {
            Some(n) => before = format!("&before={n}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 7);
    assert_eq!(pages, 3);
    let (_, local) = agent.get("/v1/cases?decision=local&limit=1000");
    let (_, hard) = agent.get("/v1/cases?decision=hard&limit=1000");
    assert_eq!(
        local["cases"].as_array().expect("l").len() + hard["cases"].as_array().expect("h").len(),
        21
    );
}

#[test]
fn sighup_rereads_the_policy_from_the_config_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, "[policy]\nmin_max_prob = 0.6\n").expect("config");
    let agent = Agent::start(
        &dir.path().join("store"),
        &["--config", cfg.to_str().expect("utf-8")],
    );
    let (_, p) = agent.get("/v1/policy");
    assert_eq!(p["min_max_prob"].as_f64(), Some(0.6));
    std::fs::write(&cfg, "[policy]\nmin_max_prob = 0.9\nmax_share = 0.1\n").expect("config");
    let pid = agent.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill")
        .success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, p) = agent.get("/v1/policy");
        if p["min_max_prob"].as_f64() == Some(0.9) {
            assert_eq!(p["max_share"].as_f64(), Some(0.1));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not re-read the policy: {p}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A bad file keeps the policy in force.
    std::fs::write(&cfg, "[policy]\nmin_max_prob = 7\n").expect("config");
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill")
        .success());
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (_, p) = agent.get("/v1/policy");
    assert_eq!(p["min_max_prob"].as_f64(), Some(0.9));
}
