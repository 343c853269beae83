//! Benchmark of the link, against a real `cloud-core serve` process on loopback: clients
//! speak the edge's protocol (`shared::protocol::EdgeSession`) with device certificates of
//! a fresh fleet CA, as many in flight and per message as the edge agent uses.
//!
//! ```sh
//! cargo build --release -p cloud-core --examples
//! target/release/examples/link_bench [--edges 50] [--backlog 100000] [--per-edge 2000]
//! ```
//!
//! Measures: the link's added latency per case (one case in flight; send → durable ack,
//! so engine time is excluded), the acknowledgement rate draining a backlog over one link
//! (verdicts meanwhile follow at the engine's pace, on the same machine), hard cases/s
//! acknowledged with `--edges` links at once, and the cloud process's resident memory per
//! connected edge.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use cloud_core::fleet::ca::{Ca, DeviceIdentity};
use shared::case::{CaseId, HardCase, Reason};
use shared::frame::{Decoded, FrameCodec, Message};
use shared::protocol::{EdgeEvent, EdgeInfo, EdgeSession};

const IN_FLIGHT: usize = 64;
const BATCH: usize = 16;

struct Client {
    _ep: quinn::Endpoint,
    _conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: Vec<u8>,
    codec: FrameCodec,
    session: EdgeSession,
}

impl Client {
    async fn connect(
        addr: SocketAddr,
        device: &str,
        id: &DeviceIdentity,
        max_in_flight: usize,
    ) -> anyhow::Result<Client> {
        let cfg = link::tls::client_config(
            id.ca_pem.as_bytes(),
            id.cert_pem.as_bytes(),
            id.key_pem.as_bytes(),
        )?;
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        ep.set_default_client_config(cfg);
        let conn = ep.connect(addr, "localhost")?.await?;
        let (send, recv) = conn.open_bi().await?;
        let info = EdgeInfo {
            device: device.into(),
            agent_version: "bench".into(),
            model_sha256: "0".into(),
            ..Default::default()
        };
        let (session, hello) = EdgeSession::new(&info, max_in_flight);
        let mut c = Client {
            _ep: ep,
            _conn: conn,
            send,
            recv,
            buf: Vec::new(),
            codec: FrameCodec::default(),
            session,
        };
        c.write(&hello).await?;
        while !c.session.is_ready() {
            c.step(&mut HashMap::new(), &mut Vec::new()).await?;
        }
        Ok(c)
    }

    async fn write(&mut self, m: &Message) -> anyhow::Result<()> {
        let mut b = Vec::new();
        self.codec.encode(m, &mut b)?;
        self.send.write_all(&b).await?;
        Ok(())
    }

    /// Reads one message and handles it: acks recorded (latency), verdicts acknowledged.
    async fn step(
        &mut self,
        sent_at: &mut HashMap<CaseId, Instant>,
        latencies: &mut Vec<f64>,
    ) -> anyhow::Result<usize> {
        let m = loop {
            if let Decoded::Frame(m, used) = self.codec.decode(&self.buf)? {
                self.buf.drain(..used);
                break m;
            }
            let chunk =
                tokio::time::timeout(Duration::from_secs(60), self.recv.read_chunk(1 << 16, true))
                    .await
                    .context("no message within 60 s")??
                    .context("the cloud closed the stream")?;
            self.buf.extend_from_slice(&chunk.bytes);
        };
        let mut acked = 0;
        for ev in self.session.handle(m, 0)? {
            match ev {
                EdgeEvent::Acked(ids) => {
                    let now = Instant::now();
                    for id in &ids {
                        if let Some(t) = sent_at.remove(id) {
                            latencies.push((now - t).as_secs_f64() * 1000.0);
                        }
                    }
                    acked += ids.len();
                }
                EdgeEvent::Verdicts(v) => {
                    let ack = self
                        .session
                        .verdicts_stored(v.iter().map(|v| v.case_id).collect());
                    self.write(&ack).await?;
                }
                EdgeEvent::Send(m) => self.write(&m).await?,
                _ => {}
            }
        }
        Ok(acked)
    }

    /// Sends `cases` (oldest first, bounded in flight) until all are acknowledged.
    /// Returns the per-case send → ack latencies, ms.
    async fn drain(&mut self, mut cases: Vec<HardCase>) -> anyhow::Result<Vec<f64>> {
        cases.reverse();
        let total = cases.len();
        let mut sent_at = HashMap::new();
        let mut latencies = Vec::with_capacity(total);
        let mut acked = 0;
        while acked < total {
            while self.session.room() > 0 && !cases.is_empty() {
                let n = self.session.room().min(BATCH).min(cases.len());
                let batch: Vec<HardCase> = cases.split_off(cases.len() - n);
                let now = Instant::now();
                for c in &batch {
                    sent_at.insert(c.id, now);
                }
                if let Some(m) = self.session.send_cases(batch, 0) {
                    self.write(&m).await?;
                }
            }
            acked += self.step(&mut sent_at, &mut latencies).await?;
        }
        Ok(latencies)
    }
}

/// `n` distinct hard cases (simulated windows, each id fresh).
fn cases(n: usize, seed: u64) -> Vec<HardCase> {
    let base = 64;
    let mut sim = shared::sim::Simulator::new(shared::sim::SimConfig {
        machines: base,
        seed,
        ..Default::default()
    });
    let mut w: Vec<Vec<shared::record::Record>> = vec![Vec::new(); base];
    for _ in 0..shared::schema::WINDOW_LEN {
        for (i, r) in sim.tick().into_iter().enumerate() {
            w[i].push(r.to_record());
        }
    }
    (0..n)
        .map(|i| {
            let records = w[i % base].clone();
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&seed.to_le_bytes());
            id[8..].copy_from_slice(&(i as u64).to_le_bytes());
            HardCase {
                id: CaseId(id),
                machine: records[0].machine.clone(),
                start_ms: records[0].ts_ms,
                end_ms: records[records.len() - 1].ts_ms,
                features: shared::features::extract(&records).to_vec(),
                probs: vec![0.4, 0.35, 0.1, 0.05, 0.05, 0.05],
                reason: Reason::SmallMargin { margin: 0.05 },
                records,
            }
        })
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<f64>().ok())
            })
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let edges = arg("--edges", 50);
    let backlog = arg("--backlog", 100_000);
    let per_edge = arg("--per-edge", 2_000);
    let exe = std::env::current_exe()?;
    let serve_bin = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("cloud-core"))
        .context("locating cloud-core")?;
    anyhow::ensure!(
        serve_bin.exists(),
        "{} is missing: cargo build --release -p cloud-core",
        serve_bin.display()
    );

    let dir = tempfile::tempdir()?;
    let ca_dir = dir.path().join("ca");
    let ca = Ca::init(&ca_dir, "bench fleet", &["localhost".to_string()])?;
    let ids: Vec<(String, DeviceIdentity)> = (0..=edges)
        .map(|i| {
            let d = format!("bench-{i:03}");
            ca.issue_device(&d, 30).map(|id| (d, id))
        })
        .collect::<anyhow::Result<_>>()?;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut child = Command::new(&serve_bin)
        .args([
            "serve",
            "--listen-http",
            "127.0.0.1:0",
            "--log",
            "error",
            "--token",
            "bench-operator-token-0000",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("cloud"))
        .arg("--ca")
        .arg(&ca_dir)
        .args(["--listen-quic", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cloud-core serve")?;
    let out = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(out).lines();
    loop {
        let l = lines.next().context("cloud-core exited")??;
        if l.starts_with("cloud-core QUIC link on") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let pid = child.id();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    println!(
        "link benchmark: cloud-core serve (embedded demo model) on {addr}, clients in this process"
    );

    // 1. Added latency: one case in flight at a time.
    let mut c = Client::connect(addr, &ids[0].0, &ids[0].1, 1).await?;
    let mut lat = c.drain(cases(1_000, 1)).await?;
    lat.sort_by(f64::total_cmp);
    println!(
        "latency per case, send -> durable ack (1 in flight, 1000 cases): p50 {:.2} ms, p99 {:.2} ms",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    drop(c);

    // 2. Draining a backlog over one link.
    let mut c = Client::connect(addr, &ids[0].0, &ids[0].1, IN_FLIGHT).await?;
    let backlog_cases = cases(backlog, 2);
    let t = Instant::now();
    let mut lat = c.drain(backlog_cases).await?;
    let secs = t.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    println!(
        "one link, {backlog} case backlog: {:.0} cases/s acknowledged ({secs:.1} s; ack latency p50 {:.1} ms, p99 {:.1} ms at {IN_FLIGHT} in flight)",
        backlog as f64 / secs,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    drop(c);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 3. Memory per connected edge, then all of them sending at once.
    let before = rss_mib(pid);
    let mut clients = Vec::new();
    for (d, id) in &ids[1..] {
        clients.push(Client::connect(addr, d, id, IN_FLIGHT).await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_mib(pid);
    println!(
        "cloud-core resident memory: {before:.1} MiB, {after:.1} MiB with {edges} edges connected: {:.0} KiB per edge",
        (after - before) * 1024.0 / edges as f64
    );
    let t = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let batch = cases(per_edge, 100 + i as u64);
            tokio::spawn(async move { c.drain(batch).await })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let secs = t.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    println!(
        "{edges} links at once, {per_edge} cases each: {:.0} cases/s acknowledged ({secs:.1} s; ack latency p50 {:.1} ms, p99 {:.1} ms)",
        (edges * per_edge) as f64 / secs,
        percentile(&all, 0.5),
        percentile(&all, 0.99)
    );
    println!("cloud-core resident memory after: {:.1} MiB", rss_mib(pid));
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}
