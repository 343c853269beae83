//! The link end to end with real processes on loopback: a fleet CA, a cloud core serving
//! QUIC with the demo model, an edge agent with its device certificate, simulated
//! machines. (1) Steady state: hard cases leave the outbox and come back with verdicts.
//! (2) The cloud is killed (-9): the edge buffers; the cloud returns; the backlog drains
//! and every hard case has exactly one verdict. (3) The cloud, then the edge, is killed
//! (-9) mid-drain: nothing lost, one verdict and one engine run per case. (4) Desired
//! config written while the edge is offline reaches it; conflicting label writes made on
//! both sides while apart converge on both to the later one; the cloud's steering reaches
//! the edge's policy.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::{bin, client, edge, free_udp_port, wait_for, Agent, Cloud};
use serde_json::Value;

const TOKEN: &str = Cloud::TOKEN;

/// Simulated machines' first `ticks` records (a longer run repeats the shorter one's
/// records first, which the agent stores once).
fn simulate(agent: &Agent, ticks: u64) {
    simulate_machines(agent, 4, ticks);
}

fn simulate_machines(agent: &Agent, machines: u32, ticks: u64) {
    edge(&[
        "simulate",
        "--target",
        &agent.url,
        "--machines",
        &machines.to_string(),
        "--ticks",
        &ticks.to_string(),
        "--fast",
        "--fault-share",
        "0.7",
        "--seed",
        "11",
    ]);
}

fn backlog(agent: &Agent) -> u64 {
    let (_, st) = agent.get("/v1/status");
    st["store"]["outbox"].as_u64().unwrap_or(u64::MAX)
}

fn hard_cases(agent: &Agent) -> Vec<String> {
    let (_, v) = agent.get("/v1/cases?decision=hard&limit=1000");
    v["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| c["id"].as_str().expect("id").to_string())
        .collect()
}

/// A fleet CA in `dir/ca` and the identity of `device` in `dir/identity`.
fn fleet_ca(dir: &Path, device: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let ca = dir.join("ca");
    let id = dir.join("identity");
    let cc = |args: &[&str]| {
        let out = Command::new(bin("cloud-core"))
            .args(args)
            .output()
            .expect("cloud-core");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    cc(&["ca", "init", "--dir", ca.to_str().expect("utf8")]);
    cc(&[
        "device",
        "issue",
        device,
        "--ca",
        ca.to_str().expect("utf8"),
        "--out",
        id.to_str().expect("utf8"),
    ]);
    (ca, id)
}

fn start_agent(data: &Path, port: u16, id: &Path) -> Agent {
    Agent::start(
        data,
        &[
            "--cloud",
            &format!("127.0.0.1:{port}"),
            "--identity",
            id.to_str().expect("utf8"),
            "--cloud-name",
            "localhost",
        ],
    )
}

fn connected(agent: &Agent) -> bool {
    agent.get("/v1/status").1["cloud"]["link"] == "connected"
}

#[test]
fn hard_cases_get_verdicts_through_outages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, id) = fleet_ca(dir.path(), "gateway-7");
    let port = free_udp_port();
    let cloud_dir = dir.path().join("cloud");
    let cloud = Cloud::start(&cloud_dir, &ca, port);
    let agent = start_agent(&dir.path().join("edge"), port, &id);

    // (1) Steady state.
    simulate(&agent, 800);
    let hard = hard_cases(&agent);
    assert!(!hard.is_empty(), "the simulation produced hard cases");
    wait_for("the outbox to drain and verdicts to arrive", 180, || {
        backlog(&agent) == 0
            && hard
                .iter()
                .all(|id| !agent.get(&format!("/v1/cases/{id}")).1["verdict"].is_null())
    });
    let (_, st) = agent.get("/v1/status");
    assert_eq!(st["cloud"]["link"], "connected", "{st}");
    assert_eq!(st["cloud"]["device_id"], "gateway-7");
    let fleet = cloud.fleet();
    assert_eq!(fleet["devices"][0]["id"], "gateway-7", "{fleet}");
    assert_eq!(fleet["verdicts"].as_u64(), Some(hard.len() as u64));
    let (_, case) = agent.get(&format!("/v1/cases/{}", hard[0]));
    let class = case["verdict"]["class"].as_str().expect("verdict class");
    assert!(shared::schema::CLASSES.contains(&class));
    assert_eq!(case["outbox"], "delivered");

    // (2) The cloud dies; the edge keeps taking records and buffers its hard cases.
    cloud.kill9();
    simulate_machines(&agent, 24, 2400);
    let all_hard = hard_cases(&agent);
    assert!(
        all_hard.len() > hard.len(),
        "more hard cases while the cloud is down"
    );
    wait_for("the edge to notice the link is down", 60, || {
        agent.get("/v1/status").1["cloud"]["link"] != "connected"
    });
    assert!(backlog(&agent) > 0, "they wait in the outbox");
    let cloud = Cloud::start(&cloud_dir, &ca, port);
    // (3) Killed again mid-drain: while the engine works through the backlog.
    let total = all_hard.len() as u64;
    let mut progress = 0;
    wait_for("the engine to start on the backlog", 120, || {
        let f = cloud.fleet();
        progress = f["verdicts"].as_u64().unwrap_or(0);
        progress > hard.len() as u64 || progress >= total
    });
    cloud.kill9();
    eprintln!("cloud killed with {progress} of {total} verdicts given");
    let cloud = Cloud::start(&cloud_dir, &ca, port);
    wait_for("the backlog to drain after the cloud returns", 240, || {
        backlog(&agent) == 0
            && all_hard
                .iter()
                .all(|id| !agent.get(&format!("/v1/cases/{id}")).1["verdict"].is_null())
    });
    // Exactly one verdict per hard case in the cloud's store.
    wait_for("the cloud's count to settle", 30, || {
        cloud.fleet()["verdicts"].as_u64() == Some(total)
    });
    let f = cloud.fleet();
    assert_eq!(f["verdict_queue"], 0);
    assert_eq!(f["devices"][0]["cases"].as_u64(), Some(total), "{f}");
    // Cases judged before the kill were not judged again: this process ran the engine
    // exactly once for each verdict it added.
    assert_eq!(
        f["engine_runs"].as_u64(),
        f["verdicts"]
            .as_u64()
            .zip(f["verdicts_at_start"].as_u64())
            .map(|(v, s)| v - s),
        "{f}"
    );
    agent.stop();
}

#[test]
fn an_edge_killed_mid_drain_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, id) = fleet_ca(dir.path(), "gateway-3");
    let port = free_udp_port();
    let edge_dir = dir.path().join("edge");
    // A backlog builds while the cloud is not there yet.
    let agent = start_agent(&edge_dir, port, &id);
    simulate_machines(&agent, 24, 2400);
    let hard = hard_cases(&agent);
    let total = hard.len() as u64;
    assert!(total > 100, "a backlog of hard cases ({total})");
    assert_eq!(backlog(&agent), total);
    let cloud = Cloud::start(&cloud_dir(&dir), &ca, port);
    // Kill the edge as soon as the cloud has part of the backlog.
    let mut at_kill = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let f = cloud.fleet();
        at_kill = f["devices"][0]["cases"].as_u64().unwrap_or(0);
        if at_kill > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.kill9();
    assert!(at_kill > 0, "the drain started before the kill");
    eprintln!("edge killed with {at_kill} of {total} cases stored by the cloud");
    let agent = start_agent(&edge_dir, port, &id);
    assert_eq!(hard_cases(&agent), hard, "the hard cases survived the kill");
    wait_for(
        "the backlog to drain and every verdict to arrive",
        300,
        || {
            backlog(&agent) == 0
                && hard
                    .iter()
                    .all(|id| !agent.get(&format!("/v1/cases/{id}")).1["verdict"].is_null())
        },
    );
    wait_for("the cloud's counts to settle", 30, || {
        cloud.fleet()["verdicts"].as_u64() == Some(total)
    });
    let f = cloud.fleet();
    assert_eq!(f["devices"][0]["cases"].as_u64(), Some(total), "{f}");
    assert_eq!(
        f["engine_runs"].as_u64(),
        Some(total),
        "one engine run per case: {f}"
    );
    assert_eq!(f["verdict_queue"], 0);
    // The registry follows the edge's backlog (reported with the heartbeats).
    wait_for("the registry's backlog to reach zero", 30, || {
        cloud.fleet()["devices"][0]["backlog"] == 0
    });
    agent.stop();
}

fn cloud_dir(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join("cloud")
}

fn label(v: &Value, key: &str) -> Value {
    v["scopes"]["labels"][key]["value"].clone()
}

#[test]
fn shared_state_converges_through_offline_periods() {
    let dir = tempfile::tempdir().expect("tempdir");
    let device = "gateway-5";
    let (ca, id) = fleet_ca(dir.path(), device);
    let port = free_udp_port();
    let edge_dir = dir.path().join("edge");
    let steer = ["--target-share", "0.05"];
    let cloud = Cloud::start_with(&cloud_dir(&dir), &ca, port, &steer);
    let agent = start_agent(&edge_dir, port, &id);
    wait_for("the link", 60, || connected(&agent));

    // The cloud goes away; the edge writes label k1 (earlier).
    cloud.kill9();
    wait_for("the edge to notice", 60, || !connected(&agent));
    let (code, v) = agent.put("/v1/labels/k1", serde_json::json!("edge-early"));
    assert_eq!(code, 200, "{v}");
    agent.stop();
    std::thread::sleep(Duration::from_millis(20));

    // The edge is offline; the cloud returns and writes desired config and labels.
    let cloud = Cloud::start_with(&cloud_dir(&dir), &ca, port, &steer);
    cloud.put(
        &format!("/api/v1/fleet/devices/{device}/config/policy"),
        serde_json::json!({"max_per_minute": 1234.0, "audit_share": 0.02}),
    );
    cloud.put(
        &format!("/api/v1/fleet/devices/{device}/labels/k1"),
        serde_json::json!("cloud-later"),
    );
    cloud.put(
        &format!("/api/v1/fleet/devices/{device}/labels/k2"),
        serde_json::json!("cloud-early"),
    );
    // A bad value is refused with the reason, and so is a write to the edge's scope.
    let r = client()
        .put(format!(
            "{}/api/v1/fleet/devices/{device}/config/policy",
            cloud.http
        ))
        .bearer_auth(TOKEN)
        .body("{not json")
        .send()
        .expect("put");
    assert_eq!(r.status().as_u16(), 400);
    std::thread::sleep(Duration::from_millis(20));
    cloud.kill9();

    // The edge returns with no cloud, and writes label k2 (later).
    let agent = start_agent(&edge_dir, port, &id);
    let (code, _) = agent.put("/v1/labels/k2", serde_json::json!("edge-later"));
    assert_eq!(code, 200);

    // Both are up: everything converges, each conflict to the later write.
    let cloud = Cloud::start_with(&cloud_dir(&dir), &ca, port, &steer);
    wait_for("the desired policy to reach the edge", 90, || {
        agent.get("/v1/policy").1["max_per_minute"] == 1234.0
    });
    wait_for("labels to converge on both sides", 60, || {
        let (_, e) = agent.get("/v1/sync");
        let c = cloud.state(device);
        label(&e, "k1") == "cloud-later"
            && label(&c, "k1") == "cloud-later"
            && label(&e, "k2") == "edge-later"
            && label(&c, "k2") == "edge-later"
    });
    let (_, st) = agent.get("/v1/status");
    assert_eq!(st["sync"]["desired"]["policy"]["audit_share"], 0.02, "{st}");
    assert!(st["sync"]["desired_error"].is_null(), "{st}");

    // Steering (target 5%): the edge reports its counts, the controller takes a step
    // from them, and the edge's policy follows the thresholds it writes.
    simulate(&agent, 1200);
    wait_for(
        "a steering step from the edge's reported counts",
        90,
        || cloud.fleet()["devices"][0]["steering"]["steps"].as_u64() >= Some(1),
    );
    let f = cloud.fleet();
    let d = &f["devices"][0];
    assert_eq!(d["steering"]["target"], 0.05, "{f}");
    assert!(d["steering"]["wanted_share"].as_f64().is_some(), "{f}");
    // (The direction and size of each step are unit-tested in cloud-core's `steer`.)
    let sigma = d["steering"]["sensitivity"].as_f64().unwrap_or(f64::NAN);
    assert!((0.0..=1.0).contains(&sigma), "{f}");
    wait_for("the steered policy to reach the edge", 60, || {
        let c = cloud.state(device);
        let s = &c["scopes"]["desired_config"]["steering"]["value"]["policy"];
        let (_, p) = agent.get("/v1/policy");
        !s.is_null()
            && p["min_margin"] == s["min_margin"]
            && p["min_max_prob"] == s["min_max_prob"]
            && p["max_share"] == s["max_share"]
    });
    let (_, p) = agent.get("/v1/policy");
    assert!(
        (p["max_share"].as_f64().unwrap_or(1.0) - 0.075).abs() < 1e-6,
        "the cap is 1.5 x the target: {p}"
    );
    assert_eq!(
        p["max_per_minute"], 1234.0,
        "the operator's fields stay: {p}"
    );
    wait_for("the sync to settle", 30, || {
        cloud.fleet()["devices"][0]["sync"]["pending"] == 0
            && agent.get("/v1/status").1["sync"]["pending"] == 0
    });
    agent.stop();
}
