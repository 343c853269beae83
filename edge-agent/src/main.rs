//! The edge agent: a factory gateway that never loses a sensor log and decides on its own
//! which cases it can handle and which are hard.
//!
//! # Layout
//!
//! - [`config`]: TOML configuration with flag overrides.
//! - [`ingest`]: request parsing and validation (nothing of a bad request is stored).
//! - [`pipeline`]: the committer — group commit, windows → cases, retention, disk cap.
//! - [`store`]: the sled layout and read side.
//! - [`infer`]: the student model on tract-onnx.
//! - [`policy`]: the hard-case policy and its budgets.
//! - [`api`]: the HTTP API; [`agent`]: starting and stopping it all.
//! - [`simulate`], [`demo`], [`bench`]: simulated machines, the demo screen, benchmarks.
//! - [`uplink`]: the QUIC link to the cloud core (outbox drain, verdicts back).
//! - [`dataset`]: labelled simulated cases, decided as the agent decides them.
//!
//! It never acknowledges a record before the flush that makes it durable, never evicts an
//! undelivered hard case, and never panics on input.

mod agent;
mod api;
mod bench;
mod config;
mod dataset;
mod demo;
mod infer;
mod ingest;
mod pipeline;
mod policy;
mod simulate;
mod store;
mod sync;
mod uplink;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::config::Config;

/// Edge agent for factory gateways: durable ingest of sensor logs, a distilled ONNX
/// student model, and a policy that decides which cases go to the cloud.
#[derive(Parser)]
#[command(name = "edge-agent", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent: HTTP ingest, windows, student inference, policy, outbox.
    Run(RunArgs),
    /// Post simulated factory machine logs to an agent.
    Simulate(SimulateArgs),
    /// Start an agent with simulated machines and show its live status.
    Demo(DemoArgs),
    /// Print counts from a store (the agent must not be running).
    Inspect {
        /// Store directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write stored records or cases as NDJSON to stdout (the agent must not be running).
    Export {
        /// Store directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// What to export.
        what: ExportWhat,
    },
    /// Write simulated cases as NDJSON, decided by the embedded student and the default
    /// policy, each with the simulator's true label (for training and evaluating models).
    Dataset {
        /// Simulator seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Simulated machines.
        #[arg(long, default_value_t = 8)]
        machines: usize,
        /// Records per machine.
        #[arg(long, default_value_t = 1600)]
        ticks: u64,
        /// Chance that a normal episode is followed by a fault.
        #[arg(long, default_value_t = 0.5)]
        fault_share: f64,
        /// Only the cases the policy sends to the cloud.
        #[arg(long)]
        hard_only: bool,
    },
    /// Measure durable ingest, inference and memory; prints Markdown tables.
    Bench {
        /// Smaller runs, to check the bench itself works.
        #[arg(long)]
        quick: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportWhat {
    /// Raw records, with their sequence number (`_seq`) and arrival time (`_received`), in case order.
    Records,
    /// Cases with features, student answer, decision and reason.
    Cases,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Store directory [config: data_dir; default: edge-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// HTTP listen address, e.g. 0.0.0.0:8080 [config: listen; default: 127.0.0.1:8080].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Cloud core HOST:PORT: hard cases go there over QUIC (needs --identity); without
    /// it they wait in the durable outbox [config: cloud].
    #[arg(long)]
    cloud: Option<String>,
    /// Directory with device.pem, device.key and ca.pem (`cloud-core device issue`)
    /// [config: identity].
    #[arg(long)]
    identity: Option<PathBuf>,
    /// Name in the cloud's certificate [config: cloud_name; default: the host of --cloud].
    #[arg(long)]
    cloud_name: Option<String>,
    /// TOML configuration file; flags override its values (see README for every key).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Student model (.onnx, with its .json metadata beside it) instead of the embedded one
    /// [config: model].
    #[arg(long)]
    model: Option<PathBuf>,
    /// This gateway's device id [config: device_id; default: edge-local].
    #[arg(long)]
    device_id: Option<String>,
    /// sled page cache in MiB: the store's share of the memory budget [config: store.cache_mib; default: 8].
    #[arg(long)]
    cache_mib: Option<u64>,
    /// Cap on stored data in MiB; over it, eviction by value, then 503 [config: store.max_data_mib; default: 4096].
    #[arg(long)]
    max_data_mib: Option<f64>,
    /// Hours raw records of handled cases are kept [config: store.record_retention_hours; default: 168].
    #[arg(long)]
    record_retention_hours: Option<f64>,
    /// Start even if the store lost acknowledged data after damage (it is refused otherwise).
    #[arg(long)]
    accept_data_loss: bool,
    /// Log filter, e.g. info or edge_agent=debug [env: RUST_LOG].
    #[arg(long, default_value = "info")]
    log: String,
}

#[derive(clap::Args)]
struct SimulateArgs {
    /// Agent base URL, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    target: String,
    /// Number of simulated machines.
    #[arg(long, default_value_t = 4)]
    machines: usize,
    /// Records per second per machine.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Stop after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Stop after this many records per machine.
    #[arg(long)]
    ticks: Option<u64>,
    /// Seed of the simulated fleet (same seed, same records).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Share of episodes that are faults (0–1).
    #[arg(long, default_value_t = 0.35)]
    fault_share: f64,
    /// Send as fast as the agent acknowledges, not in real time.
    #[arg(long)]
    fast: bool,
    /// Timestamp of the first record, Unix ms (default: now). Fix it for reproducible runs.
    #[arg(long)]
    start_ms: Option<i64>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Store directory (default: a temporary directory, removed at exit).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Simulated machines.
    #[arg(long, default_value_t = 8)]
    machines: usize,
    /// Records per second per machine.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long)]
    duration: Option<f64>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("edge-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(real_main(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
}

fn load_config(args: &RunArgs) -> anyhow::Result<Config> {
    let mut cfg = match &args.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    if let Some(v) = &args.data_dir {
        cfg.data_dir = v.clone();
    }
    if let Some(v) = args.listen {
        cfg.listen = v;
    }
    if let Some(v) = &args.cloud {
        cfg.cloud = Some(v.clone());
    }
    if let Some(v) = &args.identity {
        cfg.identity = Some(v.clone());
    }
    if let Some(v) = &args.cloud_name {
        cfg.cloud_name = Some(v.clone());
    }
    if let Some(v) = &args.model {
        cfg.model = Some(v.clone());
    }
    if let Some(v) = &args.device_id {
        cfg.device_id = v.clone();
    }
    if let Some(v) = args.cache_mib {
        cfg.store.cache_mib = v;
    }
    if let Some(v) = args.max_data_mib {
        cfg.store.max_data_mib = v;
    }
    if let Some(v) = args.record_retention_hours {
        cfg.store.record_retention_hours = v;
    }
    cfg.accept_data_loss = args.accept_data_loss;
    cfg.validate()?;
    Ok(cfg)
}

async fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Run(args) => {
            init_logging(&args.log);
            let cfg = load_config(&args)?;
            // Before the agent says it is listening: a SIGHUP or SIGTERM sent as soon as
            // it has must find the handlers in place (without them SIGHUP and SIGTERM
            // end the process, or are lost where they are ignored).
            let signals = StopSignals::register();
            let running = agent::start(cfg).await?;
            println!("edge-agent listening on http://{}", running.addr);
            let _ = std::io::stdout().flush();
            wait_for_stop(&running, args.config.as_deref(), signals).await;
            tracing::info!("shutting down: finishing requests in flight and flushing");
            running.shutdown().await
        }
        Cmd::Simulate(a) => {
            init_logging("warn");
            let report = simulate::run(simulate::SimulateOptions {
                target: a.target,
                machines: a.machines,
                rate: a.rate,
                duration: a.duration,
                ticks: a.ticks,
                seed: a.seed,
                fault_share: a.fault_share,
                fast: a.fast,
                start_ms: a.start_ms,
                verbose: !a.json,
            })
            .await?;
            if a.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "sent {} records ({} duplicates) in {:.1}s; {} cases answered, {} hard; {} retries",
                    report.records, report.duplicates, report.seconds, report.cases, report.hard, report.retries
                );
            }
            Ok(())
        }
        Cmd::Demo(a) => {
            init_logging("warn");
            demo::run(demo::DemoOptions {
                data_dir: a.data_dir,
                machines: a.machines,
                rate: a.rate,
                duration: a.duration,
            })
            .await
        }
        Cmd::Inspect { data_dir, json } => inspect(&data_dir, json),
        Cmd::Export { data_dir, what } => export(&data_dir, what),
        Cmd::Dataset {
            seed,
            machines,
            ticks,
            fault_share,
            hard_only,
        } => {
            anyhow::ensure!(
                (0.0..=1.0).contains(&fault_share),
                "--fault-share must be in [0, 1]"
            );
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let opts = dataset::DatasetOptions {
                seed,
                machines,
                ticks,
                fault_share,
                hard_only,
            };
            let (n, hard) = dataset::run(&opts, &mut out)?;
            eprintln!("{n} cases written ({hard} hard)");
            Ok(())
        }
        Cmd::Bench { quick } => {
            init_logging("warn");
            bench::run(bench::BenchOptions { quick }).await
        }
    }
}

/// The signals `run` answers, their handlers installed (`None`: installing failed).
struct StopSignals(Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>);

impl StopSignals {
    /// Installs the handlers of SIGTERM and SIGHUP.
    fn register() -> StopSignals {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(term), Ok(hup)) => StopSignals(Some((term, hup))),
            _ => StopSignals(None),
        }
    }
}

/// Waits for Ctrl-C or SIGTERM; SIGHUP re-reads the policy from the config file.
async fn wait_for_stop(
    running: &agent::RunningAgent,
    config: Option<&std::path::Path>,
    signals: StopSignals,
) {
    let Some((mut term, mut hup)) = signals.0 else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return,
            _ = term.recv() => return,
            _ = hup.recv() => {
                let Some(path) = config else {
                    tracing::warn!("SIGHUP: no --config file to re-read");
                    continue;
                };
                match Config::from_file(path) {
                    Ok(cfg) => match running.set_policy(cfg.policy).await {
                        Ok(()) => tracing::info!(file = %path.display(), "SIGHUP: policy re-read"),
                        Err(e) => tracing::error!("SIGHUP: {e}"),
                    },
                    Err(e) => tracing::error!("SIGHUP: keeping the current policy: {e:#}"),
                }
            }
        }
    }
}

fn inspect(dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(dir.exists(), "no store at {}", dir.display());
    let db = store::open(dir, 16 << 20)?;
    let counts = store::count(&db)?;
    let disk = db.size_on_disk().unwrap_or(0);
    if json {
        let mut v = serde_json::to_value(&counts)?;
        v["disk_bytes"] = serde_json::json!(disk);
        println!("{v}");
    } else {
        println!("records            {}", counts.records);
        println!("open-window records {}", counts.pending_records);
        println!(
            "cases              {} (local {}, hard {})",
            counts.cases, counts.cases_local, counts.cases_hard
        );
        println!(
            "outbox             {} (audit samples {})",
            counts.outbox, counts.outbox_audit
        );
        println!("live bytes         {}", counts.live_bytes);
        println!("disk bytes         {disk}");
    }
    Ok(())
}

fn export(dir: &std::path::Path, what: ExportWhat) -> anyhow::Result<()> {
    anyhow::ensure!(dir.exists(), "no store at {}", dir.display());
    let db = store::open(dir, 16 << 20)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let record_line = |r: &store::StoredRecord| {
        let mut j = r.record.to_json();
        j["_seq"] = serde_json::json!(r.seq);
        j["_received"] = serde_json::json!(shared::record::format_ts(r.received_ms));
        j
    };
    // Cases in creation order (their records with them), then the open windows.
    for item in db.scan_prefix([store::keys::Prefix::Case as u8]) {
        let (_, v) = item.context("reading the store")?;
        let c: store::CaseEntry =
            postcard::from_bytes(&v).context("a stored case is unreadable")?;
        match what {
            ExportWhat::Records => {
                for r in &c.records {
                    serde_json::to_writer(&mut out, &record_line(r))?;
                    out.write_all(b"\n")?;
                }
            }
            ExportWhat::Cases => {
                let mut j = c.to_json();
                j["features"] = serde_json::json!(c.features);
                serde_json::to_writer(&mut out, &j)?;
                out.write_all(b"\n")?;
            }
        }
    }
    if let ExportWhat::Records = what {
        for item in db.scan_prefix([store::keys::Prefix::Pending as u8]) {
            let (_, v) = item.context("reading the store")?;
            let w: Vec<store::StoredRecord> =
                postcard::from_bytes(&v).context("an open window is unreadable")?;
            for r in &w {
                serde_json::to_writer(&mut out, &record_line(r))?;
                out.write_all(b"\n")?;
            }
        }
    }
    out.flush()?;
    Ok(())
}
