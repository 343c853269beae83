//! The link end to end with real processes on loopback: a fleet CA, a cloud core serving
//! QUIC with the demo model, an edge agent with its device certificate, simulated
//! machines. (1) Steady state: hard cases leave the outbox and come back with verdicts.
//! (2) The cloud is killed (-9): the edge buffers; the cloud returns; the backlog drains
//! and every hard case has exactly one verdict.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use e2e::{bin, client, edge, Agent};
use serde_json::Value;

const TOKEN: &str = "e2e-operator-token-0123";

struct Cloud {
    child: Child,
    http: String,
}

impl Cloud {
    fn start(data: &Path, ca: &Path, quic_port: u16) -> Cloud {
        // The demo model; CLOUD_CORE_MODEL points the test at another checkpoint.
        let model = std::env::var_os("CLOUD_CORE_MODEL")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../cloud-core/demo-model")
            });
        let mut child = Command::new(bin("cloud-core"))
            .args([
                "serve",
                "--listen-http",
                "127.0.0.1:0",
                "--log",
                "warn",
                "--token",
                TOKEN,
            ])
            .arg("--data-dir")
            .arg(data)
            .arg("--model")
            .arg(&model)
            .arg("--ca")
            .arg(ca)
            .args(["--listen-quic", &format!("127.0.0.1:{quic_port}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start cloud-core");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("cloud-core listening on ") {
                    let url = a.split_whitespace().next().unwrap_or_default().to_string();
                    let _ = tx.send(url);
                }
            }
        });
        let http = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("cloud-core reports its address");
        Cloud { child, http }
    }

    fn fleet(&self) -> Value {
        let r = client()
            .get(format!("{}/api/v1/fleet", self.http))
            .bearer_auth(TOKEN)
            .send()
            .expect("fleet");
        serde_json::from_str(&r.text().expect("body")).expect("json")
    }

    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free UDP port")
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out after {secs} s waiting for {what}");
}

/// Simulated machines' first `ticks` records (a longer run repeats the shorter one's
/// records first, which the agent stores once).
fn simulate(agent: &Agent, ticks: u64) {
    edge(&[
        "simulate",
        "--target",
        &agent.url,
        "--machines",
        "4",
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

#[test]
fn hard_cases_get_verdicts_through_outages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    let id = dir.path().join("identity");
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
        "gateway-7",
        "--ca",
        ca.to_str().expect("utf8"),
        "--out",
        id.to_str().expect("utf8"),
    ]);
    let port = free_udp_port();
    let cloud_dir = dir.path().join("cloud");
    let cloud = Cloud::start(&cloud_dir, &ca, port);
    let agent = Agent::start(
        &dir.path().join("edge"),
        &[
            "--cloud",
            &format!("127.0.0.1:{port}"),
            "--identity",
            id.to_str().expect("utf8"),
            "--cloud-name",
            "localhost",
        ],
    );

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
    simulate(&agent, 1600);
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
    wait_for("the backlog to drain after the cloud returns", 240, || {
        backlog(&agent) == 0
            && all_hard
                .iter()
                .all(|id| !agent.get(&format!("/v1/cases/{id}")).1["verdict"].is_null())
    });
    // Exactly one verdict per hard case in the cloud's store.
    wait_for("the cloud's count to settle", 30, || {
        cloud.fleet()["verdicts"].as_u64() == Some(all_hard.len() as u64)
    });
    assert_eq!(cloud.fleet()["verdict_queue"], 0);
    agent.stop();
}
