//! The uplink: drains the outbox to the cloud core over QUIC and stores the verdicts
//! that come back.
//!
//! It connects with the device certificate (mutual TLS, the fleet CA), reconnects with
//! jittered exponential backoff, sends the oldest queued hard cases first with a bounded
//! number in flight, and removes an outbox entry only when the cloud acknowledges it
//! stored the case (through the committer, like every other write). Verdicts are stored
//! with their cases (`GET /v1/cases/{id}`) before they are acknowledged. After the
//! welcome it opens a second, lower-priority stream for the incremental sync of the
//! shared state (`crate::sync`), so bulk sync never delays hard cases. The protocol rules
//! live in `shared::protocol` and `shared::replica`; this module only moves frames and
//! calls the store.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use shared::frame::{Decoded, FrameCodec, Message};
use shared::protocol::{EdgeEvent, EdgeInfo, EdgeSession};
use tokio::sync::{mpsc, oneshot, watch};

use crate::pipeline::{now_ms, Command};

/// Cases in flight at most.
const MAX_IN_FLIGHT: usize = 64;
/// Cases per message at most.
const BATCH: usize = 16;

/// The link as `/v1/status` shows it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LinkState {
    /// `offline` (no cloud configured), `connecting`, `connected` or `backoff`.
    pub state: &'static str,
    /// The cloud's address.
    pub address: Option<String>,
    /// This device's id, from its certificate.
    pub device_id: Option<String>,
    /// Latest round-trip time, milliseconds.
    pub rtt_ms: Option<u64>,
    /// Cases acknowledged by the cloud since start.
    pub delivered: u64,
    /// Verdicts received since start.
    pub verdicts: u64,
    /// Connections made since start.
    pub connects: u64,
    /// Of those, connections that resumed an earlier TLS session (no certificate exchange).
    pub resumed: u64,
    /// The latest connection error.
    pub last_error: Option<String>,
}

/// Shared link state.
pub type LinkStatus = Arc<Mutex<LinkState>>;

/// Where the uplink connects and with which identity.
#[derive(Clone, Debug)]
pub struct UplinkConfig {
    /// Cloud HOST:PORT.
    pub cloud: String,
    /// Name in the cloud's certificate (default: the host part of `cloud`).
    pub server_name: String,
    /// Directory with `device.pem`, `device.key` and `ca.pem`.
    pub identity: PathBuf,
}

fn set(status: &LinkStatus, f: impl FnOnce(&mut LinkState)) {
    if let Ok(mut s) = status.lock() {
        f(&mut s);
    }
}

/// Reads the identity and builds the QUIC client configuration; returns it with the
/// device id of the certificate.
pub fn client(identity: &Path) -> anyhow::Result<(quinn::ClientConfig, String)> {
    let read = |f: &str| {
        std::fs::read(identity.join(f)).with_context(|| {
            format!(
                "reading {} (issue one with `cloud-core device issue ID --out DIR`)",
                identity.join(f).display()
            )
        })
    };
    let cert = read("device.pem")?;
    let cfg = link::tls::client_config(&read("ca.pem")?, &cert, &read("device.key")?)?;
    let der = rustls::pki_types::CertificateDer::pem_slice_iter(&cert)
        .next()
        .context("device.pem holds no certificate")??;
    let id = link::tls::device_id_of_cert(&der)?;
    Ok((cfg, id))
}

use rustls::pki_types::pem::PemObject;

/// What the uplink works with in the agent.
pub struct Agent {
    /// The store (read side: the outbox).
    pub db: sled::Db,
    /// The committer, which makes every write.
    pub tx: mpsc::Sender<Command>,
    /// The link state shown in the status.
    pub status: LinkStatus,
    /// The state shared with the cloud.
    pub sync: Arc<crate::sync::EdgeSync>,
    /// The committer's counts (the outbox backlog).
    pub shared: Arc<crate::pipeline::Shared>,
    /// The student model's hash, reported in the hello.
    pub model_sha256: String,
}

/// Runs until `stop` turns true.
pub async fn run(cfg: UplinkConfig, agent: Agent, mut stop: watch::Receiver<bool>) {
    let status = &agent.status;
    set(status, |s| {
        s.state = "connecting";
        s.address = Some(cfg.cloud.clone());
    });
    let mut backoff = Duration::from_millis(250);
    // One endpoint and client configuration for the agent's life: the configuration keeps
    // the session tickets that make reconnects fast (TLS resumption).
    let mut client: Option<Client> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        let started = Instant::now();
        let result = tokio::select! {
            r = session(&cfg, &mut client, &agent) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        let err = match result {
            Ok(()) => "the cloud closed the link".to_string(),
            Err(e) => format!("{e:#}"),
        };
        tracing::info!(cloud = %cfg.cloud, "link down: {err}");
        metrics::gauge!("edge_link_connected").set(0.0);
        // A link that stayed up a while starts the backoff over.
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(250);
        }
        let jitter = 0.5 + rand::random::<f64>();
        let wait = backoff.mul_f64(jitter);
        set(status, |s| {
            s.state = "backoff";
            s.last_error = Some(err);
        });
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
        set(status, |s| s.state = "connecting");
    }
}

async fn send(
    stream: &mut quinn::SendStream,
    codec: &FrameCodec,
    m: &Message,
) -> anyhow::Result<()> {
    let mut b = Vec::new();
    codec.encode(m, &mut b)?;
    stream.write_all(&b).await?;
    Ok(())
}

async fn commit(
    tx: &mpsc::Sender<Command>,
    make: impl FnOnce(oneshot::Sender<()>) -> Command,
) -> anyhow::Result<()> {
    let (reply, done) = oneshot::channel();
    tx.send(make(reply))
        .await
        .context("the committer stopped")?;
    done.await
        .context("the store could not write (see the agent's log)")
}

/// Hard cases in the outbox, as the committer counts them.
fn outbox_len(shared: &crate::pipeline::Shared) -> u64 {
    shared.counts.lock().map_or(0, |c| c.outbox)
}

async fn read_opt(
    r: &mut Option<quinn::RecvStream>,
) -> Result<Option<quinn::Chunk>, quinn::ReadError> {
    match r {
        Some(r) => r.read_chunk(64 * 1024, true).await,
        None => std::future::pending().await,
    }
}

/// The client endpoint and identity, kept across connections.
struct Client {
    endpoint: quinn::Endpoint,
    device: String,
    /// The identity files' modification times: a renewed certificate is picked up.
    stamp: Vec<Option<std::time::SystemTime>>,
    ipv6: bool,
}

fn identity_stamp(dir: &Path) -> Vec<Option<std::time::SystemTime>> {
    ["device.pem", "device.key", "ca.pem"]
        .iter()
        .map(|f| {
            std::fs::metadata(dir.join(f))
                .and_then(|m| m.modified())
                .ok()
        })
        .collect()
}

async fn session(
    cfg: &UplinkConfig,
    client_slot: &mut Option<Client>,
    agent: &Agent,
) -> anyhow::Result<()> {
    let Agent {
        db,
        tx,
        status,
        sync,
        shared,
        model_sha256,
    } = agent;
    let addr = tokio::net::lookup_host(&cfg.cloud)
        .await
        .with_context(|| format!("resolving {}", cfg.cloud))?
        .next()
        .with_context(|| format!("{} resolves to no address", cfg.cloud))?;
    let stamp = identity_stamp(&cfg.identity);
    if client_slot
        .as_ref()
        .is_none_or(|c| c.stamp != stamp || c.ipv6 != addr.is_ipv6())
    {
        let (client_cfg, device) = client(&cfg.identity)?;
        let bind: std::net::SocketAddr = if addr.is_ipv6() {
            "[::]:0".parse()?
        } else {
            "0.0.0.0:0".parse()?
        };
        let mut endpoint = quinn::Endpoint::client(bind)?;
        endpoint.set_default_client_config(client_cfg);
        *client_slot = Some(Client {
            endpoint,
            device,
            stamp,
            ipv6: addr.is_ipv6(),
        });
    }
    let Some(c) = client_slot.as_ref() else {
        anyhow::bail!("no client endpoint");
    };
    let device = c.device.clone();
    let connecting = c.endpoint.connect(addr, &cfg.server_name)?;
    // With a session ticket from an earlier connection the handshake resumes it. Nothing
    // is sent as 0-RTT data: the hello waits for the confirmed handshake.
    let (conn, resumed) = tokio::time::timeout(Duration::from_secs(10), async {
        match connecting.into_0rtt() {
            Ok((conn, accepted)) => Ok::<_, quinn::ConnectionError>((conn, accepted.await)),
            Err(connecting) => Ok((connecting.await?, false)),
        }
    })
    .await
    .context("handshake timed out")??;
    if let Some(reason) = conn.close_reason() {
        anyhow::bail!("the cloud closed the connection: {reason}");
    }
    if resumed {
        set(status, |st| st.resumed += 1);
        metrics::counter!("edge_link_resumed_total").increment(1);
    }
    let (mut out, mut inp) = conn.open_bi().await?;
    let _ = out.set_priority(1);
    let codec = FrameCodec::default();
    let backlog = outbox_len(shared);
    let info = EdgeInfo {
        device: device.clone(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        model_sha256: model_sha256.into(),
        backlog,
        sync_received: sync.with(|r| Ok((r.received(), false)))?,
    };
    let (mut s, hello) = EdgeSession::new(&info, MAX_IN_FLIGHT);
    send(&mut out, &codec, &hello).await?;
    let mut buf = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut heartbeat = tokio::time::interval(Duration::from_secs(5));
    let mut sync_out: Option<quinn::SendStream> = None;
    let mut sync_in: Option<quinn::RecvStream> = None;
    let mut sync_buf = Vec::new();
    loop {
        tokio::select! {
            chunk = read_opt(&mut sync_in) => {
                let Some(chunk) = chunk? else { return Ok(()) };
                sync_buf.extend_from_slice(&chunk.bytes);
                while let Decoded::Frame(m, used) = codec.decode(&sync_buf)? {
                    sync_buf.drain(..used);
                    let step = sync.handle(m).await?;
                    if let (Some(reply), Some(o)) = (step.reply, sync_out.as_mut()) {
                        send(o, &codec, &reply).await?;
                    }
                }
            }
            chunk = inp.read_chunk(64 * 1024, true) => {
                let Some(chunk) = chunk? else { return Ok(()) };
                buf.extend_from_slice(&chunk.bytes);
                while let Decoded::Frame(m, used) = codec.decode(&buf)? {
                    buf.drain(..used);
                    for ev in s.handle(m, now_ms().max(0) as u64)? {
                        match ev {
                            EdgeEvent::Ready { sync_received } => {
                                tracing::info!(cloud = %cfg.cloud, %device, "link up");
                                sync.with(|r| {
                                    r.connected(sync_received);
                                    Ok(((), false))
                                })?;
                                let (mut o, i) = conn.open_bi().await?;
                                let _ = o.set_priority(0);
                                // A stream is seen by the peer with its first bytes: open
                                // it with our cursor (an acknowledgement of what we have).
                                let ack = Message::SyncAck { upto: sync.with(|r| Ok((r.received(), false)))? };
                                send(&mut o, &codec, &ack).await?;
                                sync_out = Some(o);
                                sync_in = Some(i);
                                metrics::gauge!("edge_link_connected").set(1.0);
                                set(status, |st| {
                                    st.state = "connected";
                                    st.device_id = Some(device.clone());
                                    st.connects += 1;
                                });
                            }
                            EdgeEvent::Acked(ids) => {
                                let n = ids.len() as u64;
                                commit(tx, |r| Command::Delivered(ids, r)).await?;
                                set(status, |st| st.delivered += n);
                            }
                            EdgeEvent::Verdicts(v) => {
                                let ids: Vec<_> = v.iter().map(|v| v.case_id).collect();
                                let n = v.len() as u64;
                                commit(tx, |r| Command::Verdicts(v, r)).await?;
                                set(status, |st| st.verdicts += n);
                                let ack = s.verdicts_stored(ids);
                                send(&mut out, &codec, &ack).await?;
                            }
                            EdgeEvent::Send(m) => send(&mut out, &codec, &m).await?,
                            EdgeEvent::Rtt(ms) => {
                                metrics::gauge!("edge_link_rtt_seconds").set(ms as f64 / 1000.0);
                                set(status, |st| st.rtt_ms = Some(ms));
                            }
                        }
                    }
                }
            }
            _ = tick.tick() => {
                if let Some(o) = sync_out.as_mut() {
                    while let Some(m) = sync.with(|r| Ok((r.outgoing(), false)))? {
                        send(o, &codec, &m).await?;
                    }
                }
                let room = s.room().min(BATCH);
                if room > 0 {
                    let cases = {
                        let skip = |id: &shared::case::CaseId| s.is_in_flight(id);
                        crate::store::outbox_cases(db, room, &skip)?
                    };
                    if let Some(m) = s.send_cases(cases, now_ms().max(0) as u64) {
                        send(&mut out, &codec, &m).await?;
                    }
                }
            }
            _ = heartbeat.tick() => {
                if s.is_ready() {
                    let m = s.heartbeat(now_ms().max(0) as u64);
                    send(&mut out, &codec, &m).await?;
                    if let Some(m) = s.report_backlog(outbox_len(shared)) {
                        send(&mut out, &codec, &m).await?;
                    }
                }
            }
        }
    }
}
