//! `edge-agent demo`: an agent on the embedded defaults, simulated machines posting to
//! it, and its live status on screen.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use crate::agent;
use crate::config::Config;
use crate::simulate::{self, SimulateOptions};
use crate::store::{self, CaseQuery};

/// Demo settings.
pub struct DemoOptions {
    /// Store directory (a temporary one when absent).
    pub data_dir: Option<PathBuf>,
    /// Machines.
    pub machines: usize,
    /// Records per second per machine.
    pub rate: f64,
    /// Stop after this many seconds (Ctrl-C otherwise).
    pub duration: Option<f64>,
}

/// Runs the demo.
pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let tmp;
    let data_dir = match opts.data_dir {
        Some(d) => d,
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let cfg = Config {
        data_dir,
        listen: "127.0.0.1:0".parse()?,
        ..Config::default()
    };
    let running = agent::start(cfg).await?;
    let url = format!("http://{}", running.addr);
    println!("edge-agent demo: agent at {url} — try {url}/v1/status, {url}/v1/cases?decision=hard, {url}/metrics");
    println!(
        "{} simulated machines at {} records/s each; Ctrl-C to stop\n",
        opts.machines, opts.rate
    );
    let sim = tokio::spawn(simulate::run(SimulateOptions {
        target: url.clone(),
        machines: opts.machines,
        rate: opts.rate,
        duration: opts.duration,
        ticks: None,
        seed: 7,
        fault_share: 0.35,
        fast: false,
        start_ms: None,
        verbose: false,
    }));
    let tty = std::io::stdout().is_terminal();
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = interval.tick() => {
                print_screen(&running.app, &url, tty);
                if sim.is_finished() { break; }
            }
            _ = &mut ctrl_c => break,
        }
    }
    sim.abort();
    print_screen(&running.app, &url, false);
    running.shutdown().await?;
    Ok(())
}

fn print_screen(app: &crate::api::App, url: &str, tty: bool) {
    let s = crate::api::status_json(app);
    let mut out = String::new();
    if tty {
        out.push_str("\x1b[2J\x1b[H");
        out.push_str(&format!(
            "edge-agent demo — API at {url} (/v1/status, /v1/cases?decision=hard, /metrics); Ctrl-C to stop\n\n"
        ));
    }
    let st = &s["store"];
    out.push_str(&format!(
        "uptime {:>6.1}s | records {:>7} | cases {:>5} (local {:>5}, hard {:>4}) | hard share {:>5.1}% | outbox {:>4} | store {:>7.1} KiB\n",
        s["agent"]["uptime_s"].as_f64().unwrap_or(0.0),
        st["records"],
        st["cases"],
        st["cases_local"],
        st["cases_hard"],
        100.0 * s["hard_share"].as_f64().unwrap_or(0.0),
        st["outbox"],
        st["live_bytes"].as_f64().unwrap_or(0.0) / 1024.0,
    ));
    if tty {
        out.push_str(&format!(
            "offline: hard cases wait in the outbox for the cloud link ({} queued)\n",
            st["outbox"]
        ));
        out.push_str("\nlatest cases:\n  machine     class              conf   decision reason\n");
        let q = CaseQuery {
            limit: 10,
            ..CaseQuery::default()
        };
        if let Ok((cases, _)) = store::list_cases(&app.db, &q) {
            for c in cases {
                let conf = c.probs.iter().copied().fold(0f32, f32::max);
                out.push_str(&format!(
                    "  {:<11} {:<18} {:>5.2}  {:<8} {}\n",
                    c.machine,
                    c.class_name(),
                    conf,
                    c.decision.as_str(),
                    c.reason.code()
                ));
            }
        }
    }
    print!("{out}");
    let _ = std::io::stdout().flush();
}
