//! `edge-agent bench`: durable ingest throughput, inference latency and peak memory.
//!
//! Each ingest scenario starts a fresh agent *process* on a temporary store (so its
//! memory is measured alone), pre-generates simulated records, and has N concurrent
//! clients post them — NDJSON batches, or one record per request. A record counts only
//! when its 202 came back, i.e. after the flush that made it durable. Figures go to
//! `BENCHMARKS.md`; nothing here asserts on speed.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use shared::features::{extract, NUM_FEATURES};
use shared::schema::WINDOW_LEN;
use shared::sim::{SimConfig, Simulator};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::infer::Student;

/// Bench settings.
pub struct BenchOptions {
    /// Smaller runs (a smoke test of the bench itself).
    pub quick: bool,
}

struct IngestResult {
    label: String,
    records: u64,
    requests: u64,
    seconds: f64,
    peak_rss_kib: u64,
}

/// Runs every benchmark and prints a Markdown table.
pub async fn run(opts: BenchOptions) -> anyhow::Result<()> {
    let scale = if opts.quick { 10 } else { 1 };
    let mut results = Vec::new();
    for clients in [1usize, 8, 64] {
        results.push(ingest_scenario(clients, 100, 200_000 / scale).await?);
    }
    for clients in [1usize, 8, 64] {
        results.push(ingest_scenario(clients, 1, 20_000 / scale).await?);
    }
    println!(
        "| scenario | records | requests | seconds | records/s | requests/s | agent peak RSS |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &results {
        println!(
            "| {} | {} | {} | {:.2} | {:.0} | {:.0} | {:.1} MiB |",
            r.label,
            r.records,
            r.requests,
            r.seconds,
            r.records as f64 / r.seconds,
            r.requests as f64 / r.seconds,
            r.peak_rss_kib as f64 / 1024.0
        );
    }
    println!();
    inference(opts.quick)?;
    Ok(())
}

fn inference(quick: bool) -> anyhow::Result<()> {
    let student = Student::embedded()?;
    let mut sim = Simulator::new(SimConfig {
        machines: 64,
        fault_share: 0.5,
        ..SimConfig::default()
    });
    let mut windows: Vec<Vec<shared::record::Record>> = vec![Vec::new(); 64];
    for _ in 0..WINDOW_LEN {
        for (i, r) in sim.tick().into_iter().enumerate() {
            windows[i].push(r.to_record());
        }
    }
    let features: Vec<[f32; NUM_FEATURES]> = windows.iter().map(|w| extract(w)).collect();
    let iters = if quick { 200 } else { 5_000 };
    println!("| student inference (tract) | µs per call | µs per case |");
    println!("| --- | ---: | ---: |");
    for batch in [1usize, 16, 64] {
        let input = &features[..batch];
        student.infer(input)?; // warm-up
        let t = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(student.infer(std::hint::black_box(input))?);
        }
        let per_call = t.elapsed().as_secs_f64() * 1e6 / iters as f64;
        println!(
            "| batch {batch} | {per_call:.1} | {:.2} |",
            per_call / batch as f64
        );
    }
    let t = Instant::now();
    for _ in 0..iters {
        for w in &windows {
            std::hint::black_box(extract(std::hint::black_box(w)));
        }
    }
    println!(
        "| feature extraction (16 records) | — | {:.2} |",
        t.elapsed().as_secs_f64() * 1e6 / (iters * windows.len()) as f64
    );
    Ok(())
}

async fn ingest_scenario(
    clients: usize,
    batch: usize,
    total: usize,
) -> anyhow::Result<IngestResult> {
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new(exe)
        .args(["run", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the agent")?;
    let pid = child.id().unwrap_or(0);
    let stdout = child.stdout.take().context("agent stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(a) = line.strip_prefix("edge-agent listening on ") {
                return Some(a.trim().to_string());
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .context("the agent did not report its address")?;
    let url = format!("{addr}/v1/logs");

    // Pre-generate every body: client i posts the records of machine i, in order.
    let per_client = total / clients;
    let mut sim = Simulator::new(SimConfig {
        machines: clients,
        seed: 42,
        fault_share: 0.35,
        ..SimConfig::default()
    });
    let mut bodies: Vec<Vec<Vec<u8>>> = vec![Vec::new(); clients];
    let mut current: Vec<Vec<u8>> = vec![Vec::new(); clients];
    let mut in_current = 0;
    for _ in 0..per_client {
        for (i, r) in sim.tick().into_iter().enumerate() {
            serde_json::to_writer(&mut current[i], &r.to_json())?;
            current[i].push(b'\n');
        }
        in_current += 1;
        if in_current == batch {
            for i in 0..clients {
                bodies[i].push(std::mem::take(&mut current[i]));
            }
            in_current = 0;
        }
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for list in bodies {
        let client = client.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = 0u64;
            let mut requests = 0u64;
            for body in list {
                let resp = client
                    .post(&url)
                    .header("content-type", "application/x-ndjson")
                    .body(body)
                    .send()
                    .await?;
                if resp.status().as_u16() != 202 {
                    bail!("agent answered {}", resp.status());
                }
                let v: serde_json::Value = serde_json::from_slice(&resp.bytes().await?)?;
                acked += v["accepted"].as_u64().unwrap_or(0);
                requests += 1;
            }
            Ok::<_, anyhow::Error>((acked, requests))
        }));
    }
    let mut records = 0;
    let mut requests = 0;
    for t in tasks {
        let (a, r) = t.await??;
        records += a;
        requests += r;
    }
    let seconds = started.elapsed().as_secs_f64();
    let peak_rss_kib = peak_rss_kib(pid).unwrap_or(0);
    let _ = child.kill().await;
    Ok(IngestResult {
        label: if batch == 1 {
            format!("{clients} client(s), 1 record/request")
        } else {
            format!("{clients} client(s), NDJSON batches of {batch}")
        },
        records,
        requests,
        seconds,
        peak_rss_kib,
    })
}

/// Peak resident set size of a process (Linux `VmHWM`), KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}
