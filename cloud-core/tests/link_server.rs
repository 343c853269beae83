//! The cloud's QUIC server with a client speaking the protocol (the edge's session logic
//! from `shared::protocol`): cases acknowledged once stored, verdicts pushed back and
//! re-sent until acknowledged — also across reconnects — a re-sent case acknowledged
//! again but judged once, and impersonation or garbage closing only that connection.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cloud_core::engine::scheduler::SchedulerConfig;
use cloud_core::engine::service::Engine;
use cloud_core::fleet::ca::{files, Ca, DeviceIdentity};
use cloud_core::fleet::server::{serve, Fleet};
use cloud_core::fleet::store::FleetStore;
use cloud_core::verdict::VerdictService;
use shared::case::{CaseId, HardCase, Reason};
use shared::frame::{Decoded, FrameCodec, Message, VerdictMsg};
use shared::protocol::{EdgeEvent, EdgeInfo, EdgeSession};

struct Edge {
    _ep: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: Vec<u8>,
    codec: FrameCodec,
}

impl Edge {
    async fn connect(addr: SocketAddr, id: &DeviceIdentity) -> Edge {
        let cfg = link::tls::client_config(
            id.ca_pem.as_bytes(),
            id.cert_pem.as_bytes(),
            id.key_pem.as_bytes(),
        )
        .expect("client config");
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("ep");
        ep.set_default_client_config(cfg);
        let conn = ep
            .connect(addr, "localhost")
            .expect("connect")
            .await
            .expect("handshake");
        let (send, recv) = conn.open_bi().await.expect("stream");
        Edge {
            _ep: ep,
            conn,
            send,
            recv,
            buf: Vec::new(),
            codec: FrameCodec::default(),
        }
    }

    async fn send(&mut self, m: &Message) {
        let mut b = Vec::new();
        self.codec.encode(m, &mut b).expect("encode");
        self.send.write_all(&b).await.expect("write");
    }

    /// The next message, or None when the connection ends.
    async fn next(&mut self) -> Option<Message> {
        loop {
            if let Ok(Decoded::Frame(m, used)) = self.codec.decode(&self.buf) {
                self.buf.drain(..used);
                return Some(m);
            }
            let chunk =
                tokio::time::timeout(Duration::from_secs(60), self.recv.read_chunk(65536, true))
                    .await
                    .expect("a message within 60 s");
            match chunk {
                Ok(Some(c)) => self.buf.extend_from_slice(&c.bytes),
                _ => return None,
            }
        }
    }
}

fn cases(n: usize, seed: u64) -> Vec<HardCase> {
    let mut sim = shared::sim::Simulator::new(shared::sim::SimConfig {
        machines: n,
        seed,
        ..Default::default()
    });
    let mut w: Vec<Vec<shared::record::Record>> = vec![Vec::new(); n];
    for _ in 0..16 {
        for (i, r) in sim.tick().into_iter().enumerate() {
            w[i].push(r.to_record());
        }
    }
    w.into_iter()
        .map(|records| HardCase {
            id: CaseId::of_window(&records[0].machine, &records),
            machine: records[0].machine.clone(),
            start_ms: records[0].ts_ms,
            end_ms: records[15].ts_ms,
            features: shared::features::extract(&records).to_vec(),
            probs: vec![0.5, 0.5, 0.0, 0.0, 0.0, 0.0],
            reason: Reason::SmallMargin { margin: 0.0 },
            records,
        })
        .collect()
}

/// Runs an edge session over `edge` until `want` verdicts arrived (acknowledging them)
/// and every sent case was acknowledged. Returns (acked ids, verdicts).
async fn drive(
    edge: &mut Edge,
    device: &str,
    to_send: Vec<HardCase>,
    want: usize,
) -> (Vec<CaseId>, Vec<VerdictMsg>) {
    let info = EdgeInfo {
        device: device.into(),
        agent_version: "test".into(),
        model_sha256: "00".into(),
        backlog: to_send.len() as u64,
        ..Default::default()
    };
    let (mut s, hello) = EdgeSession::new(&info, 8);
    edge.send(&hello).await;
    let mut acked = Vec::new();
    let mut verdicts = Vec::new();
    let mut pending = to_send;
    loop {
        if s.is_ready() && pending.is_empty() && s.in_flight() == 0 && verdicts.len() >= want {
            break;
        }
        let Some(m) = edge.next().await else { break };
        for ev in s.handle(m, 0).expect("valid message") {
            match ev {
                EdgeEvent::Ready { .. } => {
                    let batch = std::mem::take(&mut pending);
                    if let Some(m) = s.send_cases(batch, 0) {
                        edge.send(&m).await;
                    }
                }
                EdgeEvent::Acked(ids) => acked.extend(ids),
                EdgeEvent::Verdicts(v) => {
                    let ack = s.verdicts_stored(v.iter().map(|v| v.case_id).collect());
                    verdicts.extend(v);
                    edge.send(&ack).await;
                }
                EdgeEvent::Send(m) => edge.send(&m).await,
                EdgeEvent::Rtt(_) => {}
            }
        }
    }
    (acked, verdicts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cases_in_verdicts_out_once_each() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = dir.path().join("model");
    std::fs::create_dir_all(&ckpt).expect("mkdir");
    common::write_fixture_checkpoint(&ckpt);
    let ca_dir = dir.path().join("ca");
    let ca = Ca::init(&ca_dir, "fleet", &["localhost".to_string()]).expect("ca");
    let press = ca.issue_device("press-01", 30).expect("issue");
    let read = |f: &str| std::fs::read(ca_dir.join(f)).expect("ca file");
    let server_cfg = link::tls::server_config(
        &read(files::CA_CERT),
        &read(files::SERVER_CERT),
        &read(files::SERVER_KEY),
        &read(files::CRL),
    )
    .expect("server config");

    let engine = Engine::load_cpu(&ckpt, "fixture", SchedulerConfig::default()).expect("engine");
    let verdicts = Arc::new(VerdictService::new(engine.clone()).expect("verdicts"));
    let store = FleetStore::open(&dir.path().join("fleet")).expect("store");
    let fleet = Fleet::new(store, verdicts, 8);
    let ep = quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse().expect("addr")).expect("ep");
    let addr = ep.local_addr().expect("addr");
    tokio::spawn(serve(
        ep,
        fleet.clone(),
        Default::default(),
        Some(ca_dir.clone()),
    ));

    // Three cases in; three acks and three verdicts back.
    let batch = cases(3, 7);
    let mut edge = Edge::connect(addr, &press).await;
    let (acked, got) = drive(&mut edge, "press-01", batch.clone(), 3).await;
    assert_eq!(acked.len(), 3);
    assert_eq!(got.len(), 3);
    for v in &got {
        assert!(batch.iter().any(|c| c.id == v.case_id));
        assert!(shared::schema::CLASSES.contains(&v.class.as_str()));
    }
    // The verdict acknowledgements reach the registry (the edge does not wait for them).
    let mut devices = Vec::new();
    for _ in 0..100 {
        devices = fleet.store.devices().expect("devices");
        if devices.len() == 1 && devices[0].verdicts_delivered == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(devices.len(), 1);
    assert_eq!((devices[0].cases, devices[0].verdicts_delivered), (3, 3));
    assert_eq!(devices[0].agent_version, "test");
    edge.conn.close(0u32.into(), b"bye");

    // Reconnect and send one case again plus a new one: both acked, only the new one
    // judged; the engine ran four verdicts in all.
    let mut edge = Edge::connect(addr, &press).await;
    let mut again = vec![batch[0].clone()];
    again.extend(cases(1, 99));
    let (acked, got) = drive(&mut edge, "press-01", again, 1).await;
    assert_eq!(acked.len(), 2, "a re-sent case is acknowledged again");
    assert_eq!(got.len(), 1, "but judged once");
    assert_eq!(fleet.store.verdict_count(), 4);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        engine
            .handle()
            .stats()
            .completed
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );
    edge.conn.close(0u32.into(), b"bye");

    // A frame claiming another device's id: refused with a goodbye, connection closed.
    let mut edge = Edge::connect(addr, &press).await;
    let (_, mut hello) = EdgeSession::new(
        &EdgeInfo {
            device: "lathe-02".into(),
            agent_version: "x".into(),
            model_sha256: "0".into(),
            backlog: 0,
            ..Default::default()
        },
        1,
    );
    edge.send(&hello).await;
    match edge.next().await {
        Some(Message::Goodbye { reason }) => assert!(reason.contains("lathe-02"), "{reason}"),
        other => panic!("expected a goodbye, got {other:?}"),
    }
    assert!(edge.next().await.is_none(), "the connection is closed");

    // Garbage and an oversized frame: that connection closes; the server goes on.
    let mut edge = Edge::connect(addr, &press).await;
    edge.send
        .write_all(&[9, 9, 9, 9, 9, 9, 9])
        .await
        .expect("write");
    assert!(matches!(
        edge.next().await,
        Some(Message::Goodbye { .. }) | None
    ));
    let mut edge = Edge::connect(addr, &press).await;
    let mut header = vec![shared::frame::PROTOCOL_VERSION, 0];
    header.extend_from_slice(&(64u32 << 20).to_le_bytes());
    edge.send.write_all(&header).await.expect("write");
    assert!(matches!(
        edge.next().await,
        Some(Message::Goodbye { .. }) | None
    ));
    if let Message::Hello { device, .. } = &mut hello {
        *device = "press-01".into();
    }
    let mut edge = Edge::connect(addr, &press).await;
    let (acked, _) = drive(&mut edge, "press-01", cases(1, 5), 1).await;
    assert_eq!(acked.len(), 1, "still serving");
}

/// Waits for the next message on a stream pair (frames from the protocol).
async fn next_on(recv: &mut quinn::RecvStream, buf: &mut Vec<u8>) -> Option<Message> {
    let codec = FrameCodec::default();
    loop {
        if let Ok(Decoded::Frame(m, used)) = codec.decode(buf) {
            buf.drain(..used);
            return Some(m);
        }
        match tokio::time::timeout(Duration::from_secs(30), recv.read_chunk(65536, true)).await {
            Ok(Ok(Some(c))) => buf.extend_from_slice(&c.bytes),
            _ => return None,
        }
    }
}

/// Hello on a fresh stream of `conn`; true when welcomed.
async fn greet(
    conn: &quinn::Connection,
    device: &str,
) -> Option<(quinn::SendStream, quinn::RecvStream, Vec<u8>)> {
    let (mut send, mut recv) = conn.open_bi().await.ok()?;
    let (_, hello) = EdgeSession::new(
        &EdgeInfo {
            device: device.into(),
            ..Default::default()
        },
        8,
    );
    let mut b = Vec::new();
    FrameCodec::default().encode(&hello, &mut b).ok()?;
    send.write_all(&b).await.ok()?;
    let mut buf = Vec::new();
    match next_on(&mut recv, &mut buf).await {
        Some(Message::Welcome { .. }) => Some((send, recv, buf)),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_resume_migration_keeps_the_link_and_revocation_is_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = dir.path().join("model");
    std::fs::create_dir_all(&ckpt).expect("mkdir");
    common::write_fixture_checkpoint(&ckpt);
    let ca_dir = dir.path().join("ca");
    let ca = Ca::init(&ca_dir, "fleet", &["localhost".to_string()]).expect("ca");
    let press = ca.issue_device("press-01", 30).expect("issue");
    let lathe = ca.issue_device("lathe-02", 30).expect("issue");
    let (server_cfg, _) = cloud_core::fleet::server::tls_from_ca(&ca_dir).expect("tls");
    let engine = Engine::load_cpu(&ckpt, "fixture", SchedulerConfig::default()).expect("engine");
    let verdicts = Arc::new(VerdictService::new(engine).expect("verdicts"));
    let store = FleetStore::open(&dir.path().join("fleet")).expect("store");
    let fleet = Fleet::new(store, verdicts, 8);
    let ep = quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse().expect("addr")).expect("ep");
    let addr = ep.local_addr().expect("addr");
    tokio::spawn(serve(
        ep,
        fleet.clone(),
        Default::default(),
        Some(ca_dir.clone()),
    ));

    // One client endpoint and configuration, as the edge keeps them.
    let client_cfg = link::tls::client_config(
        press.ca_pem.as_bytes(),
        press.cert_pem.as_bytes(),
        press.key_pem.as_bytes(),
    )
    .expect("client config");
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("ep");
    client.set_default_client_config(client_cfg);

    // First connection: a full handshake (no ticket yet).
    let connecting = client.connect(addr, "localhost").expect("connect");
    let conn = match connecting.into_0rtt() {
        Ok(_) => panic!("no session to resume on the first connection"),
        Err(c) => c.await.expect("handshake"),
    };
    assert!(greet(&conn, "press-01").await.is_some(), "welcomed");
    tokio::time::sleep(Duration::from_millis(200)).await; // tickets arrive after the handshake
    conn.close(0u32.into(), b"bye");

    // Second: the session resumes, and the cloud still knows the device from it.
    let connecting = client.connect(addr, "localhost").expect("connect");
    let (conn, accepted) = connecting
        .into_0rtt()
        .map_err(|_| ())
        .expect("a ticket from the first connection");
    assert!(accepted.await, "the server resumed the session");
    let (mut send, mut recv, mut buf) = greet(&conn, "press-01")
        .await
        .expect("welcomed on resumption");

    // Migration: the client's address changes under the connection; it carries on.
    let before = fleet.store.devices().expect("devices")[0].address.clone();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("socket");
    let new_addr = socket.local_addr().expect("addr").to_string();
    client.rebind(socket).expect("rebind");
    let batch = cases(2, 41);
    let mut b = Vec::new();
    FrameCodec::default()
        .encode(&Message::Cases(batch.clone()), &mut b)
        .expect("encode");
    send.write_all(&b).await.expect("write after migration");
    let mut acked = 0;
    while acked < 2 {
        match next_on(&mut recv, &mut buf).await {
            Some(Message::Ack { case_ids }) => acked += case_ids.len(),
            Some(_) => {}
            None => panic!("the connection ended after migration"),
        }
    }
    let mut address = before.clone();
    for _ in 0..50 {
        address = fleet.store.devices().expect("devices")[0].address.clone();
        if address == new_addr {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        address, new_addr,
        "the registry follows the migration (was {before})"
    );

    // Live revocation: the connected device is cut off, and its ticket no longer helps.
    let lathe_edge = Edge::connect(addr, &lathe).await;
    assert_eq!(ca.revoke_device("press-01").expect("revoke"), 1);
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("the revoked device's connection is closed");
    assert!(closed.to_string().contains("revoked"), "{closed}");
    let again = client.connect(addr, "localhost").expect("connect");
    let refused = match again.into_0rtt() {
        Ok((c, _)) => greet(&c, "press-01").await.is_none(),
        Err(c) => match c.await {
            Ok(c) => greet(&c, "press-01").await.is_none(),
            Err(_) => true,
        },
    };
    assert!(
        refused,
        "a revoked device does not get back in, resumed or not"
    );
    // Another device's connection is untouched.
    assert!(lathe_edge.conn.close_reason().is_none());
    let mut lathe_edge = Edge::connect(addr, &lathe).await;
    let (acked, _) = drive(&mut lathe_edge, "lathe-02", cases(1, 77), 0).await;
    assert_eq!(acked.len(), 1, "others keep being served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_from_a_restarted_server_does_not_stop_the_reconnect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = dir.path().join("model");
    std::fs::create_dir_all(&ckpt).expect("mkdir");
    common::write_fixture_checkpoint(&ckpt);
    let ca_dir = dir.path().join("ca");
    let ca = Ca::init(&ca_dir, "fleet", &["localhost".to_string()]).expect("ca");
    let press = ca.issue_device("press-01", 30).expect("issue");
    let engine = Engine::load_cpu(&ckpt, "fixture", SchedulerConfig::default()).expect("engine");
    let verdicts = Arc::new(VerdictService::new(engine).expect("verdicts"));
    let start = |addr: SocketAddr, n: u32| {
        let (server_cfg, _) = cloud_core::fleet::server::tls_from_ca(&ca_dir).expect("tls");
        let store = FleetStore::open(&dir.path().join(format!("fleet{n}"))).expect("store");
        let fleet = Fleet::new(store, verdicts.clone(), 8);
        let ep = quinn::Endpoint::server(server_cfg, addr).expect("ep");
        let local = ep.local_addr().expect("addr");
        let task = tokio::spawn(serve(ep.clone(), fleet, Default::default(), None));
        (ep, local, task)
    };
    let (server, addr, task) = start("127.0.0.1:0".parse().expect("addr"), 0);
    let client_cfg = link::tls::client_config(
        press.ca_pem.as_bytes(),
        press.cert_pem.as_bytes(),
        press.key_pem.as_bytes(),
    )
    .expect("client config");
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("ep");
    client.set_default_client_config(client_cfg);
    let conn = client
        .connect(addr, "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    assert!(greet(&conn, "press-01").await.is_some());
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The server process "restarts": its session cache is gone.
    server.close(0u32.into(), b"restart");
    server.wait_idle().await;
    task.abort();
    let _ = task.await;
    drop(server);
    drop(conn);
    // (Another port: tickets are kept per server name, so it is the same to the client.)
    let (_server, addr, _task) = start("127.0.0.1:0".parse().expect("addr"), 1);
    let connecting = client.connect(addr, "localhost").expect("connect");
    let conn = tokio::time::timeout(Duration::from_secs(10), async {
        match connecting.into_0rtt() {
            Ok((conn, accepted)) => {
                let ok = accepted.await;
                eprintln!("0-RTT attempted, accepted: {ok}");
                conn
            }
            Err(c) => c.await.expect("handshake"),
        }
    })
    .await
    .expect("the handshake completes");
    assert!(
        greet(&conn, "press-01").await.is_some(),
        "welcomed by the restarted server: {:?}",
        conn.close_reason()
    );
}
