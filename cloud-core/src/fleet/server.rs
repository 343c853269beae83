//! The QUIC side of the cloud core: accepts edge connections (mutual TLS, the device id
//! read from the verified certificate), drives one [`CloudSession`] per connection, stores
//! cases durably before acknowledging them, and runs the verdict queue in front of the
//! engine, pushing each verdict to its device now or when it next connects.
//!
//! The edge opens two bidirectional streams: the first carries the protocol (hello, cases,
//! acks, verdicts, heartbeats) at high priority; the second, opened after the welcome,
//! carries the incremental sync of the device's shared state (`shared::replica`) at low
//! priority, so bulk sync never delays hard cases. A malformed or oversized frame, or a
//! protocol violation, on either stream closes that connection only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shared::frame::{Decoded, FrameCodec, Message, VerdictMsg};
use shared::protocol::{CloudEvent, CloudSession};
use shared::replica::{node_id, Replica};
use shared::sync::Role;
use tokio::sync::{mpsc, Mutex, Notify};

use super::store::{FleetStore, StoredVerdict};
use crate::verdict::VerdictService;

/// Wall clock, Unix ms.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A connected device.
struct Live {
    verdicts: mpsc::UnboundedSender<Vec<VerdictMsg>>,
    conn: quinn::Connection,
    serial: Vec<u8>,
}

/// The fleet side of the cloud: store, verdict service, connected devices.
pub struct Fleet {
    /// The durable store.
    pub store: FleetStore,
    verdicts: Arc<VerdictService>,
    connected: Mutex<HashMap<String, Live>>,
    /// Certificate serials revoked by the CA's current revocation list.
    revoked: std::sync::RwLock<std::collections::HashSet<Vec<u8>>>,
    work: Notify,
    /// Most cases judged at once (the engine batches them).
    pub concurrency: usize,
    replicas: std::sync::Mutex<HashMap<String, Replica>>,
    /// The hard-case share controller's state.
    pub steering: super::steer::Steering,
    /// Engine runs completed since start (one per judged case).
    pub engine_runs: AtomicU64,
    /// Verdicts in the store when this process opened it.
    pub verdicts_at_start: usize,
}

impl Fleet {
    /// A fleet over `store`, judging with `verdicts`.
    pub fn new(store: FleetStore, verdicts: Arc<VerdictService>, concurrency: usize) -> Arc<Fleet> {
        Arc::new(Fleet {
            verdicts_at_start: store.verdict_count(),
            store,
            verdicts,
            connected: Mutex::new(HashMap::new()),
            revoked: Default::default(),
            work: Notify::new(),
            concurrency: concurrency.max(1),
            replicas: std::sync::Mutex::new(HashMap::new()),
            steering: Default::default(),
            engine_runs: AtomicU64::new(0),
        })
    }

    /// The certificate serials revoked now (checked on every connection, resumed ones
    /// included).
    pub fn set_revoked(&self, revoked: std::collections::HashSet<Vec<u8>>) {
        if let Ok(mut r) = self.revoked.write() {
            *r = revoked;
        }
    }

    /// The cloud's sync node id.
    pub fn node() -> u64 {
        node_id(Role::Cloud, "cloud")
    }

    /// Runs `f` on `device`'s sync replica (loaded from the store on first use); when `f`
    /// returns `true` with its result, the replica is stored durably before this returns.
    pub fn with_replica<R>(
        &self,
        device: &str,
        f: impl FnOnce(&mut Replica) -> anyhow::Result<(R, bool)>,
    ) -> anyhow::Result<R> {
        let mut all = self
            .replicas
            .lock()
            .map_err(|_| anyhow::anyhow!("the replica table is poisoned"))?;
        let r = match all.entry(device.to_string()) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let peer = node_id(Role::Edge, device);
                let r = match self.store.replica(device)? {
                    Some(b) => Replica::from_bytes(&b, Fleet::node()).map_err(|e| {
                        anyhow::anyhow!("the stored sync state of {device} is unreadable: {e}")
                    })?,
                    None => Replica::new(Role::Cloud, Fleet::node(), peer),
                };
                v.insert(r)
            }
        };
        let (out, dirty) = f(r)?;
        if dirty {
            self.store.store_replica(device, &r.to_bytes()?)?;
        }
        Ok(out)
    }

    /// Devices connected now.
    pub async fn connected(&self) -> Vec<String> {
        let mut v: Vec<String> = self.connected.lock().await.keys().cloned().collect();
        v.sort();
        v
    }
}

/// Accepts connections on `endpoint` until it is closed. With `ca_dir`, changes of the
/// CA's revocation list apply at once (see [`watch_revocations`]); the list the endpoint
/// started with goes to [`Fleet::set_revoked`] first.
pub async fn serve(
    endpoint: quinn::Endpoint,
    fleet: Arc<Fleet>,
    steer: super::steer::SteerConfig,
    ca_dir: Option<std::path::PathBuf>,
) {
    tokio::spawn(verdict_worker(fleet.clone()));
    tokio::spawn(super::steer::run(fleet.clone(), steer));
    if let Some(dir) = ca_dir {
        tokio::spawn(watch_revocations(endpoint.clone(), fleet.clone(), dir));
    }
    while let Some(incoming) = endpoint.accept().await {
        let fleet = fleet.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => {
                    if let Err(e) = connection(conn, remote, fleet).await {
                        tracing::info!(%remote, "link closed: {e}");
                    }
                }
                // Refused at the handshake (no certificate, another CA, revoked).
                Err(e) => tracing::info!(%remote, "handshake refused: {e}"),
            }
        });
    }
}

async fn write(
    send: &mut quinn::SendStream,
    codec: &FrameCodec,
    msg: &Message,
) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    codec.encode(msg, &mut buf)?;
    send.write_all(&buf).await?;
    Ok(())
}

async fn connection(
    conn: quinn::Connection,
    remote: SocketAddr,
    fleet: Arc<Fleet>,
) -> anyhow::Result<()> {
    let (device, serial) = match link::tls::peer_cert(&conn).and_then(|c| {
        Ok((
            link::tls::device_id_of_cert(&c)?,
            link::tls::serial_of_cert(&c)?,
        ))
    }) {
        Ok(d) => d,
        Err(e) => {
            conn.close(1u32.into(), b"no device identity");
            anyhow::bail!("{e}");
        }
    };
    // A resumed session skips certificate verification: check the serial against the
    // revocation list in force now.
    if fleet.revoked.read().map_or(true, |r| r.contains(&serial)) {
        conn.close(3u32.into(), b"the device certificate is revoked");
        metrics::counter!("cloud_link_refused_total", "reason" => "revoked").increment(1);
        anyhow::bail!("{device}: the certificate is revoked");
    }
    let mut seen_addr = remote;
    let (mut send, mut recv) =
        match tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await {
            Ok(Ok(s)) => s,
            _ => {
                conn.close(1u32.into(), b"no stream");
                anyhow::bail!("{device}: no stream opened");
            }
        };
    let _ = send.set_priority(1);
    let codec = FrameCodec::default();
    let sync_received = fleet.with_replica(&device, |r| Ok((r.received(), false)))?;
    let mut session = CloudSession::new(&device, sync_received);
    let (tx, mut pushed) = mpsc::unbounded_channel::<Vec<VerdictMsg>>();
    let mut buf: Vec<u8> = Vec::new();
    let mut sync_send: Option<quinn::SendStream> = None;
    let mut sync_recv: Option<quinn::RecvStream> = None;
    let mut sync_buf: Vec<u8> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let result: anyhow::Result<()> = async {
        loop {
            tokio::select! {
                bi = conn.accept_bi(), if sync_recv.is_none() && session.is_greeted() => {
                    let (s, r) = bi?;
                    let _ = s.set_priority(0);
                    sync_send = Some(s);
                    sync_recv = Some(r);
                }
                chunk = read_opt(&mut sync_recv) => {
                    let Some(chunk) = chunk? else { return Ok(()) };
                    sync_buf.extend_from_slice(&chunk.bytes);
                    loop {
                        let msg = match codec.decode(&sync_buf) {
                            Ok(Decoded::Frame(m, used)) => {
                                sync_buf.drain(..used);
                                m
                            }
                            Ok(Decoded::NeedMore(_)) => break,
                            Err(e) => {
                                let _ = write(&mut send, &codec, &Message::Goodbye { reason: format!("sync stream: {e}") }).await;
                                anyhow::bail!("{device}: sync stream: {e}");
                            }
                        };
                        let now = now_ms();
                        let step = match fleet.with_replica(&device, |r| {
                            let st = r.handle(msg, now)?;
                            let dirty = st.dirty;
                            Ok((st, dirty))
                        }) {
                            Ok(st) => st,
                            Err(e) => {
                                let _ = write(&mut send, &codec, &Message::Goodbye { reason: format!("sync: {e}") }).await;
                                anyhow::bail!("{device}: sync: {e}");
                            }
                        };
                        for r in &step.rejected {
                            tracing::warn!(%device, scope = %r.scope, key = %r.key, "sync entry refused: {}", r.reason);
                        }
                        metrics::counter!("cloud_sync_changes_total").increment(step.changed.len() as u64);
                        metrics::counter!("cloud_sync_rejected_total").increment(step.rejected.len() as u64);
                        if let (Some(reply), Some(s)) = (step.reply, sync_send.as_mut()) {
                            write(s, &codec, &reply).await?;
                        }
                    }
                }
                _ = tick.tick() => {
                    // Connection migration: the edge's address changed under the same
                    // connection.
                    let addr = conn.remote_address();
                    if addr != seen_addr {
                        tracing::info!(%device, from = %seen_addr, to = %addr, "edge migrated");
                        metrics::counter!("cloud_link_migrations_total").increment(1);
                        seen_addr = addr;
                        let a = addr.to_string();
                        fleet.store.update_device(&device, |d| d.address = a.clone())?;
                    }
                    if let Some(s) = sync_send.as_mut() {
                        while let Some(m) = fleet.with_replica(&device, |r| Ok((r.outgoing(), false)))? {
                            write(s, &codec, &m).await?;
                        }
                    }
                }
                chunk = recv.read_chunk(64 * 1024, true) => {
                    let Some(chunk) = chunk? else { return Ok(()) };
                    buf.extend_from_slice(&chunk.bytes);
                    loop {
                        let (msg, used) = match codec.decode(&buf) {
                            Ok(Decoded::Frame(m, used)) => (m, used),
                            Ok(Decoded::NeedMore(_)) => break,
                            Err(e) => {
                                let _ = write(&mut send, &codec, &Message::Goodbye { reason: e.to_string() }).await;
                                anyhow::bail!("{device}: {e}");
                            }
                        };
                        buf.drain(..used);
                        let events = match session.handle(msg) {
                            Ok(ev) => ev,
                            Err(e) => {
                                let _ = write(&mut send, &codec, &Message::Goodbye { reason: e.to_string() }).await;
                                anyhow::bail!("{device}: {e}");
                            }
                        };
                        for ev in events {
                            match ev {
                                CloudEvent::Send(m) => write(&mut send, &codec, &m).await?,
                                CloudEvent::Connected(info) => {
                                    let now = now_ms();
                                    let addr = remote.to_string();
                                    fleet.store.update_device(&device, |d| {
                                        if d.first_seen_ms == 0 {
                                            d.first_seen_ms = now;
                                        }
                                        d.last_seen_ms = now;
                                        d.address = addr.clone();
                                        d.agent_version = info.agent_version.clone();
                                        d.model_sha256 = info.model_sha256.clone();
                                        d.backlog = info.backlog;
                                    })?;
                                    fleet.with_replica(&device, |r| {
                                        r.connected(info.sync_received);
                                        Ok(((), false))
                                    })?;
                                    fleet.connected.lock().await.insert(
                                        device.clone(),
                                        Live { verdicts: tx.clone(), conn: conn.clone(), serial: serial.clone() },
                                    );
                                    metrics::gauge!("cloud_devices_connected").increment(1.0);
                                    // Verdicts it has not acknowledged, from earlier connections.
                                    let waiting = fleet.store.undelivered(&device, 256)?;
                                    if let Some(m) = session.send_verdicts(waiting) {
                                        write(&mut send, &codec, &m).await?;
                                    }
                                }
                                CloudEvent::Store(cases) => {
                                    let ids: Vec<_> = cases.iter().map(|c| c.id).collect();
                                    let store = fleet.store.clone();
                                    let dev = device.clone();
                                    let now = now_ms();
                                    let fresh = tokio::task::spawn_blocking(move || store.store_cases(&dev, cases, now)).await??;
                                    metrics::counter!("cloud_cases_received_total").increment(ids.len() as u64);
                                    metrics::counter!("cloud_cases_duplicate_total").increment((ids.len() - fresh.len()) as u64);
                                    let ack = session.stored(ids);
                                    write(&mut send, &codec, &ack).await?;
                                    if !fresh.is_empty() {
                                        fleet.work.notify_one();
                                    }
                                }
                                CloudEvent::VerdictsDelivered(ids) => {
                                    fleet.store.delivered(&device, &ids)?;
                                    // More may be waiting than one message carried.
                                    let waiting = fleet.store.undelivered(&device, 256)?;
                                    if let Some(m) = session.send_verdicts(waiting) {
                                        write(&mut send, &codec, &m).await?;
                                    }
                                }
                                CloudEvent::Backlog(n) => {
                                    let now = now_ms();
                                    fleet.store.update_device(&device, |d| {
                                        d.backlog = n;
                                        d.last_seen_ms = now;
                                    })?;
                                }
                            }
                        }
                    }
                }
                Some(v) = pushed.recv() => {
                    if let Some(m) = session.send_verdicts(v) {
                        write(&mut send, &codec, &m).await?;
                    }
                }
            }
        }
    }
    .await;
    if session.is_greeted() {
        let mut c = fleet.connected.lock().await;
        if c.get(&device).is_some_and(|l| l.verdicts.same_channel(&tx)) {
            c.remove(&device);
            metrics::gauge!("cloud_devices_connected").decrement(1.0);
        }
        let now = now_ms();
        let _ = fleet.store.update_device(&device, |d| d.last_seen_ms = now);
    }
    if result.is_err() {
        // Let the goodbye reach the edge before the connection goes.
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_millis(500), conn.closed()).await;
        conn.close(2u32.into(), b"protocol error");
    }
    result
}

/// The QUIC server configuration from a fleet CA directory, and the serials its
/// revocation list revokes.
pub fn tls_from_ca(
    dir: &std::path::Path,
) -> anyhow::Result<(quinn::ServerConfig, std::collections::HashSet<Vec<u8>>)> {
    use super::ca::files;
    use anyhow::Context;
    let read = |f: &str| {
        std::fs::read(dir.join(f)).with_context(|| {
            format!(
                "reading {} (create the CA with `cloud-core ca init`)",
                dir.join(f).display()
            )
        })
    };
    let crl = read(files::CRL)?;
    let cfg = link::tls::server_config(
        &read(files::CA_CERT)?,
        &read(files::SERVER_CERT)?,
        &read(files::SERVER_KEY)?,
        &crl,
    )?;
    Ok((cfg, link::tls::revoked_serials(&crl)?))
}

/// Revocation without a restart: when the CA's revocation list changes (`cloud-core
/// device revoke`), new handshakes use it, and connections of devices it revokes are
/// closed now.
pub async fn watch_revocations(
    endpoint: quinn::Endpoint,
    fleet: Arc<Fleet>,
    dir: std::path::PathBuf,
) {
    let crl = dir.join(super::ca::files::CRL);
    let stamp = |p: &std::path::Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut last = stamp(&crl);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = stamp(&crl);
        if now == last {
            continue;
        }
        let (cfg, revoked) = match tls_from_ca(&dir) {
            Ok(x) => x,
            Err(e) => {
                // Possibly caught mid-write: try again on the next tick.
                tracing::warn!("reloading the revocation list: {e:#}");
                continue;
            }
        };
        last = now;
        endpoint.set_server_config(Some(cfg));
        tracing::info!(revoked = revoked.len(), "revocation list reloaded");
        for (device, live) in fleet.connected.lock().await.iter() {
            if revoked.contains(&live.serial) {
                tracing::info!(%device, "closing the connection of a revoked device");
                live.conn
                    .close(3u32.into(), b"the device certificate is revoked");
            }
        }
        fleet.set_revoked(revoked);
    }
}

async fn read_opt(
    r: &mut Option<quinn::RecvStream>,
) -> Result<Option<quinn::Chunk>, quinn::ReadError> {
    match r {
        Some(r) => r.read_chunk(64 * 1024, true).await,
        None => std::future::pending().await,
    }
}

/// Judges queued cases, `concurrency` at a time (the scheduler decodes them as one
/// batch), stores each verdict and pushes it to its device if connected.
async fn verdict_worker(fleet: Arc<Fleet>) {
    loop {
        let store = fleet.store.clone();
        let n = fleet.concurrency;
        let batch = match tokio::task::spawn_blocking(move || store.queued(n)).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                tracing::error!("reading the verdict queue: {e:#}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(_) => return,
        };
        metrics::gauge!("cloud_verdict_queue").set(fleet.store.queue_len() as f64);
        if batch.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(1), fleet.work.notified()).await;
            continue;
        }
        let judged = futures_util::future::join_all(
            batch.iter().map(|(_, c)| fleet.verdicts.judge(&c.case)),
        )
        .await;
        for ((key, c), j) in batch.into_iter().zip(judged) {
            let j = match j {
                Ok(j) => {
                    fleet.engine_runs.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("cloud_engine_runs_total").increment(1);
                    j
                }
                Err(e) => {
                    // Left in the queue: retried on the next round.
                    tracing::warn!(case = %c.case.id, "no verdict: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let msg = VerdictMsg {
                case_id: c.case.id,
                class: j.verdict.class.clone(),
                confidence: j.verdict.confidence as f32,
                explanation: j.verdict.explanation.clone(),
                action: j.verdict.action.clone(),
                model: j.model.clone(),
            };
            let stored = StoredVerdict {
                verdict: msg.clone(),
                at_ms: now_ms(),
                seconds: j.seconds,
            };
            match fleet.store.store_verdict(&key, &c.device, stored) {
                Ok(true) => {
                    if let Some(l) = fleet.connected.lock().await.get(&c.device) {
                        let _ = l.verdicts.send(vec![msg]);
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::error!(case = %c.case.id, "storing a verdict: {e:#}"),
            }
        }
    }
}
