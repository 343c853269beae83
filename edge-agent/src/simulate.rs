//! `edge-agent simulate`: simulated factory machines posting to an agent over HTTP.
//!
//! Records come from `shared::sim` (deterministic for a seed) and carry their true class
//! in `label`. One poster sends NDJSON batches in order, so the same seed and tick count
//! give the agent the same input in the same order — on any architecture. Like a real
//! device it retries what was not acknowledged (503 with `Retry-After`, connection
//! errors); a 4xx is a bug in the simulator and stops it.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use shared::sim::{SimConfig, Simulator};

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimulateOptions {
    /// Base URL of the agent, e.g. `http://127.0.0.1:8080`.
    pub target: String,
    /// Number of machines.
    pub machines: usize,
    /// Records per second per machine.
    pub rate: f64,
    /// Stop after this many seconds.
    pub duration: Option<f64>,
    /// Stop after this many ticks (records per machine).
    pub ticks: Option<u64>,
    /// Seed.
    pub seed: u64,
    /// Share of fault episodes.
    pub fault_share: f64,
    /// Send as fast as the agent accepts instead of in real time.
    pub fast: bool,
    /// Timestamp of the first tick (Unix ms); now when absent.
    pub start_ms: Option<i64>,
    /// Print a line per second.
    pub verbose: bool,
}

/// What happened.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SimulateReport {
    /// Records acknowledged.
    pub records: u64,
    /// Of which duplicates (re-sent after a lost acknowledgement).
    pub duplicates: u64,
    /// Cases answered by the student.
    pub cases: u64,
    /// … decided hard.
    pub hard: u64,
    /// Requests retried.
    pub retries: u64,
    /// Seconds taken.
    pub seconds: f64,
}

/// Runs the simulation.
pub async fn run(opts: SimulateOptions) -> anyhow::Result<SimulateReport> {
    if opts.machines == 0 || opts.machines > 100_000 {
        bail!("--machines must be within 1–100000");
    }
    if !(opts.rate.is_finite() && opts.rate > 0.0 && opts.rate <= 1000.0) {
        bail!("--rate must be within (0, 1000] records per second per machine");
    }
    let interval_ms = (1000.0 / opts.rate).max(1.0) as i64;
    let start_ms = opts.start_ms.unwrap_or_else(crate::pipeline::now_ms);
    let mut sim = Simulator::new(SimConfig {
        machines: opts.machines,
        seed: opts.seed,
        interval_ms,
        start_ms,
        fault_share: opts.fault_share,
    });
    let url = format!("{}/v1/logs", opts.target.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let started = Instant::now();
    let mut report = SimulateReport::default();
    let mut tick: u64 = 0;
    let mut last_print = Instant::now();
    // Ticks per request: ~100 ms of data in real time, up to 500 records when fast.
    let ticks_per_post = if opts.fast {
        (500 / opts.machines).max(1) as u64
    } else {
        ((opts.rate / 10.0).ceil() as u64).max(1)
    };
    loop {
        if opts.ticks.is_some_and(|t| tick >= t)
            || opts
                .duration
                .is_some_and(|d| started.elapsed().as_secs_f64() >= d)
        {
            break;
        }
        let mut body = Vec::with_capacity(256 * opts.machines * ticks_per_post as usize);
        for _ in 0..ticks_per_post {
            if opts.ticks.is_some_and(|t| tick >= t) {
                break;
            }
            for r in sim.tick() {
                serde_json::to_writer(&mut body, &r.to_json())?;
                body.push(b'\n');
            }
            tick += 1;
        }
        if !opts.fast {
            // Real time: a tick is sent once its time has come.
            let due = Duration::from_millis((tick as i64 * interval_ms) as u64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        let outcome = post_with_retry(&client, &url, body, &mut report).await?;
        report.records += outcome["accepted"].as_u64().unwrap_or(0);
        report.duplicates += outcome["duplicates"].as_u64().unwrap_or(0);
        if let Some(cases) = outcome["cases"].as_array() {
            report.cases += cases.len() as u64;
            report.hard += cases.iter().filter(|c| c["decision"] == "hard").count() as u64;
        }
        if opts.verbose && last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            eprintln!(
                "simulate: {} records, {} cases ({} hard) in {:.1}s",
                report.records,
                report.cases,
                report.hard,
                started.elapsed().as_secs_f64()
            );
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

async fn post_with_retry(
    client: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    report: &mut SimulateReport,
) -> anyhow::Result<serde_json::Value> {
    let mut backoff = Duration::from_millis(100);
    for attempt in 0..100 {
        let resp = client
            .post(url)
            .header("content-type", "application/x-ndjson")
            .body(body.clone())
            .send()
            .await;
        match resp {
            Ok(r) if r.status().as_u16() == 202 => {
                let text = r.text().await.context("reading the agent's answer")?;
                return serde_json::from_str(&text).context("the agent's answer is not JSON");
            }
            Ok(r) if r.status().as_u16() == 503 => {
                let wait = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(Duration::from_secs)
                    .unwrap_or(backoff);
                report.retries += 1;
                tokio::time::sleep(wait.min(Duration::from_secs(30))).await;
            }
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                bail!("the agent refused a simulated batch ({status}): {text}");
            }
            Err(e) if attempt < 99 => {
                tracing::debug!("post failed ({e}); retrying");
                report.retries += 1;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e).context("posting to the agent"),
        }
    }
    bail!("the agent did not accept a batch after 100 attempts")
}
