//! Helpers for the end-to-end tests: find the release binaries, start agents as real
//! processes on loopback, stop or kill them, talk HTTP.
//!
//! The binaries are those `cargo build --release` made (the test command builds them
//! first); the tests find them beside their own executable in the target directory.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Path of a workspace binary in the same target profile as this test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (cargo build --release --workspace)",
        path.display()
    );
    path
}

/// A running edge agent process.
pub struct Agent {
    /// The process.
    pub child: Child,
    /// Base URL, e.g. `http://127.0.0.1:40123`.
    pub url: String,
    /// Its store.
    pub data_dir: PathBuf,
}

impl Agent {
    /// Starts `edge-agent run` on a free loopback port with extra arguments.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Agent {
        let mut child = Command::new(bin("edge-agent"))
            .args(["run", "--listen", "127.0.0.1:0", "--log"])
            // E2E_AGENT_LOG=info (or debug) shows the agents' logs when a test fails.
            .arg(std::env::var("E2E_AGENT_LOG").unwrap_or_else(|_| "warn".into()))
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start edge-agent");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("edge-agent listening on ") {
                    let _ = tx.send(a.trim().to_string());
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(u) => u,
            Err(_) => {
                let _ = child.kill();
                panic!("edge-agent did not report its address within 60 s");
            }
        };
        Agent {
            child,
            url,
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// `kill -9`.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait (graceful: in-flight requests finish, store flushed).
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        panic!("edge-agent did not stop within 30 s of SIGTERM");
    }

    /// GET a JSON document.
    pub fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let r = client()
            .get(format!("{}{path}", self.url))
            .send()
            .expect("GET");
        let status = r.status().as_u16();
        let text = r.text().unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }

    /// POST a body with a content type; (status, JSON body, Retry-After).
    pub fn post(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, serde_json::Value, Option<String>) {
        let mut req = client().post(format!("{}{path}", self.url)).body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let r = req.send().expect("POST");
        let status = r.status().as_u16();
        let retry = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = r.text().unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
            retry,
        )
    }

    /// PUT JSON.
    pub fn put(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let r = client()
            .put(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .expect("PUT");
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(serde_json::Value::Null))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking HTTP client with a bounded timeout.
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// Runs an edge-agent subcommand to completion; returns stdout (panics with stderr on failure).
pub fn edge(args: &[&str]) -> String {
    let out = Command::new(bin("edge-agent"))
        .args(args)
        .output()
        .expect("run edge-agent");
    assert!(
        out.status.success(),
        "edge-agent {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Parses NDJSON.
pub fn ndjson(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("NDJSON line"))
        .collect()
}

/// A valid record as JSON text.
pub fn record(machine: &str, ts: i64, id: &str) -> String {
    serde_json::json!({"machine": machine, "ts": ts, "id": id,
        "readings": {"vibration": 2.0, "temperature": 55.0 + (ts % 7) as f64 * 0.1, "current": 10.0, "pressure": 3.1}})
    .to_string()
}

/// Runs a cloud-core subcommand to completion; returns stdout (panics with stderr on failure).
pub fn cloud_core(args: &[&str]) -> String {
    let out = Command::new(bin("cloud-core"))
        .args(args)
        .output()
        .expect("run cloud-core");
    assert!(
        out.status.success(),
        "cloud-core {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A loopback UDP port free now (for `--listen-quic`).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free UDP port")
}

/// Polls `f` every 200 ms until it holds; panics naming `what` after `secs` seconds.
pub fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out after {secs} s waiting for {what}");
}

/// A running `cloud-core serve` process with the QUIC link.
pub struct Cloud {
    /// The process.
    pub child: Child,
    /// Base URL of its HTTP API.
    pub http: String,
}

impl Cloud {
    /// The operator token the tests start the cloud with.
    pub const TOKEN: &'static str = "e2e-operator-token-0123";

    /// Starts `cloud-core serve` with the demo model (or `CLOUD_CORE_MODEL`), HTTP on a free
    /// loopback port and QUIC on `quic_port`, with the fleet CA in `ca`.
    pub fn start(data: &Path, ca: &Path, quic_port: u16) -> Cloud {
        Cloud::start_with(data, ca, quic_port, &[])
    }

    /// [`Cloud::start`] with more `serve` arguments.
    pub fn start_with(data: &Path, ca: &Path, quic_port: u16, extra: &[&str]) -> Cloud {
        let model = std::env::var_os("CLOUD_CORE_MODEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../cloud-core/demo-model")
            });
        let mut child = Command::new(bin("cloud-core"))
            .args(["serve", "--listen-http", "127.0.0.1:0", "--log", "warn"])
            .args(["--token", Cloud::TOKEN])
            .arg("--data-dir")
            .arg(data)
            .arg("--model")
            .arg(&model)
            .arg("--ca")
            .arg(ca)
            .args(["--listen-quic", &format!("127.0.0.1:{quic_port}")])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start cloud-core");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("cloud-core listening on ") {
                    let _ = tx.send(a.split_whitespace().next().unwrap_or_default().to_string());
                }
            }
        });
        let http = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(u) => u,
            Err(_) => {
                let _ = child.kill();
                panic!("cloud-core did not report its address within 120 s");
            }
        };
        Cloud { child, http }
    }

    /// `GET /api/v1/fleet` with the operator token.
    pub fn fleet(&self) -> serde_json::Value {
        let r = client()
            .get(format!("{}/api/v1/fleet", self.http))
            .bearer_auth(Cloud::TOKEN)
            .send()
            .expect("GET /api/v1/fleet");
        serde_json::from_str(&r.text().expect("body")).expect("fleet status is JSON")
    }

    /// `PUT` of a JSON body with the operator token; panics unless it succeeds.
    pub fn put(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let r = client()
            .put(format!("{}{path}", self.http))
            .bearer_auth(Cloud::TOKEN)
            .json(&body)
            .send()
            .expect("put");
        let status = r.status();
        let v: serde_json::Value = serde_json::from_str(&r.text().expect("body")).expect("json");
        assert!(status.is_success(), "PUT {path}: {status} {v}");
        v
    }

    /// A device's shared state (`GET /api/v1/fleet/devices/ID/state`).
    pub fn state(&self, device: &str) -> serde_json::Value {
        let r = client()
            .get(format!("{}/api/v1/fleet/devices/{device}/state", self.http))
            .bearer_auth(Cloud::TOKEN)
            .send()
            .expect("state");
        serde_json::from_str(&r.text().expect("body")).expect("json")
    }

    /// `kill -9`.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
