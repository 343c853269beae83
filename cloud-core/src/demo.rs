//! `cloud-core demo`: the whole system on localhost in one command. A fleet CA and one
//! device identity per edge, the cloud core in this process (`server::run`: HTTP and QUIC
//! on loopback, the embedded demo model), `edge-agent run` child processes linked to it
//! over QUIC with mutual TLS, and simulated factory machines (`edge-agent simulate`)
//! posting to each agent. It prints where to look, then one status line per second read
//! from the cloud's fleet API; Ctrl-C (or `--duration`) stops everything.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cloud_core::fleet::ca::Ca;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Options of `cloud-core demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Edge agents (device ids edge-1, edge-2, …).
    #[arg(long, default_value_t = 3)]
    edges: usize,
    /// Simulated factory machines posting to each agent.
    #[arg(long, default_value_t = 4)]
    machines: usize,
    /// Records per second per machine (a window of 16 records makes a case).
    #[arg(long, default_value_t = 16.0)]
    rate: f64,
    /// Share of the machines' episodes that are faults (0–1); faults make hard cases.
    #[arg(long, default_value_t = 0.6)]
    fault_share: f64,
    /// Stop after this many seconds (default: at Ctrl-C); the exit status is then non-zero
    /// if no verdict reached any edge (it waits up to 30 s more for a first one).
    #[arg(long)]
    duration: Option<f64>,
    /// A new or empty directory for the CA, the identities, the stores of the cloud and the
    /// agents and their logs, kept after the run [default: a temporary directory, removed
    /// at exit].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The edge-agent binary [default: the one beside this executable].
    #[arg(long)]
    edge_agent: Option<PathBuf>,
    /// The share of each edge's cases the cloud steers it toward sending (0–1).
    #[arg(long, default_value_t = 0.2)]
    target_share: f64,
    /// Log filter of the cloud core (the agents log to files in the data directory).
    #[arg(long, default_value = "warn")]
    log: String,
}

/// Runs the demo; the process's exit status.
pub fn main(args: DemoArgs) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = check(&args) {
        eprintln!("cloud-core demo: {e}");
        return ExitCode::from(2);
    }
    let mut tmp = None;
    let data_dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => match tempfile::Builder::new()
            .prefix("cloud-core-demo-")
            .tempdir()
        {
            Ok(t) => tmp.insert(t).path().to_path_buf(),
            Err(e) => {
                eprintln!("cloud-core demo: cannot create a temporary directory: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cloud-core demo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(&args, &data_dir, tmp.is_some()));
    // The QUIC server and the verdict worker are still spawned tasks: give them a moment.
    rt.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            // Keep what the agents logged for whoever looks into the failure.
            if let Some(t) = tmp {
                println!("the data directory is kept: {}", t.keep().display());
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("cloud-core demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(a: &DemoArgs) -> Result<(), String> {
    if !(1..=64).contains(&a.edges) {
        return Err("--edges must be within 1–64".into());
    }
    if !(1..=1000).contains(&a.machines) {
        return Err("--machines must be within 1–1000".into());
    }
    if !(a.rate.is_finite() && a.rate > 0.0 && a.rate <= 1000.0) {
        return Err("--rate must be within (0, 1000] records per second".into());
    }
    if !(0.0..=1.0).contains(&a.fault_share) {
        return Err("--fault-share must be within 0–1".into());
    }
    if !(0.0..=1.0).contains(&a.target_share) {
        return Err("--target-share must be within 0–1".into());
    }
    if a.duration.is_some_and(|d| !(d.is_finite() && d > 0.0)) {
        return Err("--duration must be a positive number of seconds".into());
    }
    Ok(())
}

/// Ctrl-C, SIGTERM or SIGHUP.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let (Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
                _ = hup.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// How long a `--duration` run waits past its end for a first verdict.
const GRACE: Duration = Duration::from_secs(30);

/// One edge: its agent, its simulated machines.
struct Edge {
    id: String,
    dir: PathBuf,
    url: String,
    agent: Child,
    sim: Option<Child>,
}

/// What `start` brought up.
struct Demo {
    http: String,
    quic: SocketAddr,
    token: String,
    edges: Vec<Edge>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    stop_server: tokio::sync::oneshot::Sender<()>,
}

async fn run(args: &DemoArgs, data_dir: &Path, temporary: bool) -> anyhow::Result<bool> {
    let mut stop = std::pin::pin!(stop_signal());
    let mut demo = tokio::select! {
        d = start(args, data_dir) => d?,
        _ = &mut stop => {
            // Children started so far are killed as they drop.
            println!("stopped while starting");
            return Ok(true);
        }
    };
    let client = http_client()?;
    println!();
    println!(
        "cloud-core demo: a cloud core, {} edge agent(s), {} simulated machines on each ({} records/s, {:.0}% fault episodes)",
        args.edges,
        args.machines,
        args.rate,
        100.0 * args.fault_share
    );
    println!(
        "  data      {}{}",
        data_dir.display(),
        if temporary { " (removed at exit)" } else { "" }
    );
    println!("  cloud     {}   (QUIC link on {})", demo.http, demo.quic);
    println!(
        "            curl -H 'Authorization: Bearer {}' {}/api/v1/fleet",
        demo.token, demo.http
    );
    println!("            {}/metrics", demo.http);
    for e in &demo.edges {
        println!(
            "  {:<8}  {}/v1/status   {}/v1/cases?decision=hard   (log: {})",
            e.id,
            e.url,
            e.url,
            e.dir.join("agent.log").display()
        );
    }
    match args.duration {
        Some(d) => println!("running for {d} s (Ctrl-C stops sooner)\n"),
        None => println!("Ctrl-C to stop\n"),
    }

    let started = Instant::now();
    let deadline = args.duration.map(|d| started + Duration::from_secs_f64(d));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut waiting = false;
    let failure: Option<String> = loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => break None,
        }
        if let Some(why) = exited(&mut demo.edges) {
            break Some(why);
        }
        if demo.server.is_finished() {
            break Some("the cloud core stopped".into());
        }
        let delivered = match fleet(&client, &demo.http, &demo.token).await {
            Ok(f) => {
                println!("{}", status_line(started.elapsed(), args.edges, &f));
                Totals::of(&f).delivered
            }
            Err(e) => {
                println!(
                    "[{:>4.0}s] fleet status unavailable: {e:#}",
                    started.elapsed().as_secs_f64()
                );
                0
            }
        };
        if let Some(d) = deadline {
            // A short run may end before the first verdict is back (the machines start
            // in normal operation): then it waits a little for one.
            let now = Instant::now();
            if now >= d && (delivered > 0 || now >= d + GRACE) {
                break None;
            }
            if now >= d && !waiting {
                waiting = true;
                println!(
                    "(no verdict has reached an edge yet: waiting up to {} s more)",
                    GRACE.as_secs()
                );
            }
        }
    };
    let elapsed = started.elapsed().as_secs_f64();

    // The summary, read before anything stops: the agents' link counts and the fleet.
    println!();
    let mut received = 0;
    for e in demo.edges.iter() {
        let s = get_json(&client, &format!("{}/v1/status", e.url), None).await;
        match s {
            Ok(s) => {
                received += s["cloud"]["verdicts"].as_u64().unwrap_or(0);
                println!(
                    "{}: {} records, {} cases ({} hard) | link {}: hard cases delivered {}, verdicts received {}",
                    e.id,
                    s["store"]["records"],
                    s["store"]["cases"],
                    s["store"]["cases_hard"],
                    s["cloud"]["link"].as_str().unwrap_or("?"),
                    s["cloud"]["delivered"],
                    s["cloud"]["verdicts"],
                );
            }
            Err(err) => println!("{}: status unavailable: {err:#}", e.id),
        }
    }
    match fleet(&client, &demo.http, &demo.token).await {
        Ok(f) => {
            let t = Totals::of(&f);
            println!(
                "cloud: devices {} | hard cases received {} | verdicts given {}, delivered {} | waiting for the engine {}",
                t.devices, t.cases, t.verdicts, t.delivered, t.queue
            );
        }
        Err(e) => println!("cloud: fleet status unavailable: {e:#}"),
    }

    // Everything stops: simulated machines, agents (killed and reaped), then the cloud.
    for e in demo.edges.iter_mut() {
        if let Some(sim) = e.sim.as_mut() {
            let _ = sim.kill().await;
        }
    }
    for e in demo.edges.iter_mut() {
        let _ = e.agent.kill().await;
    }
    let _ = demo.stop_server.send(());
    let failure = match tokio::time::timeout(Duration::from_secs(10), &mut demo.server).await {
        Ok(Ok(Err(e))) => Some(format!("the cloud core: {e:#}")),
        Ok(Err(e)) => Some(format!("the cloud core: {e}")),
        Ok(Ok(Ok(()))) => failure,
        Err(_) => {
            demo.server.abort();
            failure
        }
    };

    if let Some(why) = failure {
        println!("demo FAILED after {elapsed:.1} s: {why}");
        return Ok(false);
    }
    if args.duration.is_some() && received == 0 {
        println!("demo FAILED: no verdict reached any edge in {elapsed:.1} s");
        return Ok(false);
    }
    println!("demo ok: {received} verdict(s) reached the edges in {elapsed:.1} s");
    Ok(true)
}

/// The first child that exited, as a message.
fn exited(edges: &mut [Edge]) -> Option<String> {
    for e in edges.iter_mut() {
        if let Ok(Some(st)) = e.agent.try_wait() {
            return Some(format!(
                "the agent {} exited ({st}); see {}",
                e.id,
                e.dir.join("agent.log").display()
            ));
        }
        if let Some(sim) = e.sim.as_mut() {
            if let Ok(Some(st)) = sim.try_wait() {
                return Some(format!(
                    "the simulated machines of {} stopped ({st}); see {}",
                    e.id,
                    e.dir.join("simulate.log").display()
                ));
            }
        }
    }
    None
}

/// The fleet totals a status line shows.
struct Totals {
    devices: usize,
    connected: u64,
    cases: u64,
    verdicts: u64,
    delivered: u64,
    queue: u64,
}

impl Totals {
    fn of(fleet: &Value) -> Totals {
        let devices = fleet["devices"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let sum = |k: &str| devices.iter().map(|d| d[k].as_u64().unwrap_or(0)).sum();
        Totals {
            devices: devices.len(),
            connected: fleet["connected"].as_u64().unwrap_or(0),
            cases: sum("cases"),
            verdicts: fleet["verdicts"].as_u64().unwrap_or(0),
            delivered: sum("verdicts_delivered"),
            queue: fleet["verdict_queue"].as_u64().unwrap_or(0),
        }
    }
}

fn status_line(elapsed: Duration, edges: usize, fleet: &Value) -> String {
    let t = Totals::of(fleet);
    // The steering controller's view: the share the edges' thresholds want to send.
    let wanted: Vec<f64> = fleet["devices"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter_map(|d| d["steering"]["wanted_share"].as_f64())
                .collect()
        })
        .unwrap_or_default();
    let steer = if wanted.is_empty() {
        String::new()
    } else {
        format!(
            " | hard share wanted {:.0}%",
            100.0 * wanted.iter().sum::<f64>() / wanted.len() as f64
        )
    };
    format!(
        "[{:>4.0}s] edges connected {}/{} | hard cases received {:>4} | verdicts given {:>4}, delivered {:>4} | verdict queue {:>3}{steer}",
        elapsed.as_secs_f64(),
        t.connected,
        edges,
        t.cases,
        t.verdicts,
        t.delivered,
        t.queue
    )
}

fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?)
}

async fn get_json(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
) -> anyhow::Result<Value> {
    let mut req = client.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await?;
    let status = r.status();
    let text = r.text().await?;
    if !status.is_success() {
        bail!("{url}: {status}: {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("{url}: not JSON"))
}

async fn fleet(client: &reqwest::Client, http: &str, token: &str) -> anyhow::Result<Value> {
    get_json(client, &format!("{http}/api/v1/fleet"), Some(token)).await
}

/// The edge-agent binary: `--edge-agent`, or beside this executable.
fn edge_agent_binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .context("finding this executable")?
            .parent()
            .context("this executable has no directory")?
            .join("edge-agent"),
    };
    if !path.is_file() {
        bail!(
            "the edge-agent binary is not at {}: build the workspace with `cargo build --release` \
             (it builds cloud-core and edge-agent together), or name it with --edge-agent PATH",
            path.display()
        );
    }
    Ok(path)
}

/// A loopback port free now (the server binds it a moment later).
fn free_port(udp: bool) -> anyhow::Result<u16> {
    let addr = if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?
    };
    Ok(addr.port())
}

/// Writes a device's certificate, key (owner-only) and the CA certificate into `dir`.
fn write_identity(ca: &Ca, id: &str, dir: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    let ident = ca.issue_device(id, 30)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("device.pem"), &ident.cert_pem)?;
    std::fs::write(dir.join("ca.pem"), &ident.ca_pem)?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let key = dir.join("device.key");
    opts.open(&key)
        .and_then(|mut f| f.write_all(ident.key_pem.as_bytes()))
        .with_context(|| format!("writing {}", key.display()))?;
    Ok(())
}

/// Puts a child in its own process group: Ctrl-C in the terminal reaches the demo alone,
/// which reads the agents' final status and then stops them itself.
fn own_group(cmd: &mut Command) -> &mut Command {
    #[cfg(unix)]
    cmd.process_group(0);
    cmd
}

fn log_file(path: &Path) -> anyhow::Result<Stdio> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    Ok(Stdio::from(f))
}

/// Brings everything up: identities, the cloud, the agents, the simulated machines.
async fn start(args: &DemoArgs, data_dir: &Path) -> anyhow::Result<Demo> {
    let edge_agent = edge_agent_binary(args.edge_agent.as_deref())?;

    // A fresh directory: the simulated machines number their records from 1 on every
    // run, so agents reusing a store would take them for duplicates and stay idle.
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    if std::fs::read_dir(data_dir)?.next().is_some() {
        bail!(
            "{} is not empty: give the demo a new or empty directory",
            data_dir.display()
        );
    }

    // The fleet CA and one identity per edge.
    let ca_dir = data_dir.join("ca");
    let names = ["localhost".to_string(), "127.0.0.1".to_string()];
    let ca = Ca::init(&ca_dir, "factory fleet CA (demo)", &names)?;
    let ids: Vec<String> = (1..=args.edges).map(|i| format!("edge-{i}")).collect();
    for id in &ids {
        write_identity(&ca, id, &data_dir.join(id).join("identity"))?;
    }

    // The cloud core, in this process: `serve` as it runs in production.
    let cloud_dir = data_dir.join("cloud");
    std::fs::create_dir_all(&cloud_dir)
        .with_context(|| format!("creating {}", cloud_dir.display()))?;
    let (token, _) = cloud_core::server::operator_token(&cloud_dir)?;
    let model = cloud_core::demo_model::extract(&cloud_dir.join("demo-model"))?;
    let http_addr = SocketAddr::from(([127, 0, 0, 1], free_port(false)?));
    let quic_addr = SocketAddr::from(([127, 0, 0, 1], free_port(true)?));
    let opts = cloud_core::server::ServeOptions {
        data_dir: cloud_dir,
        listen_http: http_addr,
        model,
        model_name: cloud_core::demo_model::NAME.to_string(),
        token: Some(token.clone()),
        quic: Some((quic_addr, ca_dir)),
        steer: cloud_core::fleet::steer::SteerConfig {
            default_target: Some(args.target_share),
            ..Default::default()
        },
        scheduler: Default::default(),
        device: cloud_core::engine::service::Device::Cpu(Default::default()),
    };
    let (stop_server, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(cloud_core::server::run(opts, async move {
        let _ = stopped.await;
    }));
    let http = format!("http://{http_addr}");
    let client = http_client()?;
    let t = Instant::now();
    loop {
        if server.is_finished() {
            return match (&mut server).await {
                Ok(Err(e)) => Err(e.context("starting the cloud core")),
                _ => Err(anyhow::anyhow!("the cloud core stopped while starting")),
            };
        }
        if let Ok(r) = client.get(format!("{http}/healthz")).send().await {
            if r.status().is_success() {
                break;
            }
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("the cloud core did not answer on {http} within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The agents, each with its store, identity and log; started together.
    let mut edges = Vec::new();
    for id in &ids {
        let dir = data_dir.join(id);
        let mut agent = Command::new(&edge_agent);
        agent
            .arg("run")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--listen", "127.0.0.1:0", "--device-id", id])
            .args([
                "--cloud",
                &quic_addr.to_string(),
                "--cloud-name",
                "localhost",
            ])
            .arg("--identity")
            .arg(dir.join("identity"))
            .args(["--log", "warn"])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file(&dir.join("agent.log"))?)
            .kill_on_drop(true);
        let mut agent = own_group(&mut agent)
            .spawn()
            .with_context(|| format!("starting {}", edge_agent.display()))?;
        let stdout = agent.stdout.take().context("the agent's stdout")?;
        edges.push((id.clone(), dir, agent, BufReader::new(stdout).lines()));
    }
    let mut started = Vec::new();
    for (id, dir, agent, mut lines) in edges {
        let url = tokio::time::timeout(Duration::from_secs(60), async {
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
        .with_context(|| {
            format!(
                "the agent {id} did not report its address (see {})",
                dir.join("agent.log").display()
            )
        })?;
        // Keep reading its output so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        started.push(Edge {
            id,
            dir,
            url,
            agent,
            sim: None,
        });
    }

    // Simulated machines posting to each agent, each edge with its own stream.
    for (i, e) in started.iter_mut().enumerate() {
        let mut sim = Command::new(&edge_agent);
        sim.args(["simulate", "--target", &e.url])
            .args(["--machines", &args.machines.to_string()])
            .args(["--rate", &args.rate.to_string()])
            .args(["--fault-share", &args.fault_share.to_string()])
            .args(["--seed", &(i + 1).to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&e.dir.join("simulate.log"))?)
            .kill_on_drop(true);
        let sim = own_group(&mut sim)
            .spawn()
            .with_context(|| format!("starting {} simulate", edge_agent.display()))?;
        e.sim = Some(sim);
    }
    Ok(Demo {
        http,
        quic: quic_addr,
        token,
        edges: started,
        server,
        stop_server,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_sums_the_fleet() {
        let fleet = serde_json::json!({
            "devices": [
                {"id": "edge-1", "cases": 4, "verdicts_delivered": 3},
                {"id": "edge-2", "cases": 2, "verdicts_delivered": 2},
            ],
            "connected": 2, "verdict_queue": 1, "verdicts": 5,
        });
        let line = status_line(Duration::from_secs(7), 3, &fleet);
        assert_eq!(
            line,
            "[   7s] edges connected 2/3 | hard cases received    6 | verdicts given    5, delivered    5 | verdict queue   1"
        );
    }

    #[test]
    fn a_missing_edge_agent_says_how_to_build_it() {
        let err = edge_agent_binary(Some(Path::new("/nonexistent/edge-agent")))
            .expect_err("no binary there");
        assert!(err.to_string().contains("cargo build --release"), "{err}");
    }
}
