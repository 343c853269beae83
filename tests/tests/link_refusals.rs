//! The link refuses what it must and only that, with real processes on loopback: a cloud
//! core serving QUIC, one well-behaved edge agent with simulated machines getting verdicts
//! throughout, and raw QUIC clients from this test that
//! (5) have no certificate, a certificate of another CA, a revoked certificate, or a valid
//!     certificate and a `Hello` claiming another device's id: each is refused;
//! (6) are valid but send a malformed frame (garbage under a valid header, a bad version
//!     byte) or a frame whose header claims more than the 1 MiB limit: each loses its own
//!     connection, with a `Goodbye` naming the problem.
//! Afterwards the good agent is still connected on its first connection, still gets
//! verdicts, the fleet API shows it connected, and the cloud process is alive.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::{bin, cloud_core, free_udp_port, wait_for, Agent, Cloud};
use serde_json::Value;
use shared::frame::{Decoded, FrameCodec, Message, DEFAULT_MAX_PAYLOAD, PROTOCOL_VERSION};

/// The good edge's device id.
const GOOD: &str = "gateway-good";

/// The one place this test builds a `Hello` (the message may gain fields).
fn hello(device: &str) -> Message {
    Message::Hello {
        protocol: PROTOCOL_VERSION,
        device: device.to_string(),
        agent_version: "link-refusals-test".to_string(),
        model_sha256: String::new(),
        backlog: 0,
        sync_received: 0,
    }
}

fn frame(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    FrameCodec::default()
        .encode(msg, &mut out)
        .expect("encode a frame");
    out
}

/// A child process killed and reaped when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// TLS material of one identity, as `cloud-core device issue` wrote it.
struct Identity {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl Identity {
    fn read(dir: &Path) -> Identity {
        let read = |f: &str| std::fs::read(dir.join(f)).expect("identity file");
        Identity {
            ca: read("ca.pem"),
            cert: read("device.pem"),
            key: read("device.key"),
        }
    }

    /// A client presenting this identity's certificate and trusting `trust` (PEM).
    fn client(&self, trust: &[u8]) -> quinn::ClientConfig {
        link::tls::client_config(trust, &self.cert, &self.key).expect("client TLS config")
    }
}

/// A client that trusts the fleet CA but presents no certificate at all.
fn no_certificate_client(ca_pem: &[u8]) -> quinn::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.expect("CA PEM")).expect("CA certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![link::ALPN.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(cfg).expect("QUIC client TLS config");
    quinn::ClientConfig::new(Arc::new(crypto))
}

/// What a raw client saw.
#[derive(Debug)]
struct Outcome {
    /// The handshake failed on the client's side (the error), or `None`.
    handshake: Option<String>,
    /// Frames the cloud sent.
    frames: Vec<Message>,
    /// Why the connection ended, if it did within the wait.
    closed: Option<String>,
}

impl Outcome {
    fn welcomed(&self) -> bool {
        self.frames
            .iter()
            .any(|m| matches!(m, Message::Welcome { .. }))
    }

    fn goodbye(&self) -> Option<&str> {
        self.frames.iter().find_map(|m| match m {
            Message::Goodbye { reason } => Some(reason.as_str()),
            _ => None,
        })
    }

    /// Everything the client learnt of its refusal, for matching and for messages.
    fn why(&self) -> String {
        format!(
            "handshake: {:?}; goodbye: {:?}; closed: {:?}",
            self.handshake,
            self.goodbye(),
            self.closed
        )
    }
}

/// Reads frames from `recv` into `out` until `stop` says so, the stream ends or fails,
/// or `within` passes.
async fn read_frames(
    recv: &mut quinn::RecvStream,
    buf: &mut Vec<u8>,
    out: &mut Vec<Message>,
    within: Duration,
    stop: impl Fn(&Message) -> bool,
) {
    let codec = FrameCodec::default();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        loop {
            match codec.decode(buf) {
                Ok(Decoded::Frame(m, used)) => {
                    buf.drain(..used);
                    let done = stop(&m);
                    out.push(m);
                    if done {
                        return;
                    }
                }
                Ok(Decoded::NeedMore(_)) => break,
                Err(e) => panic!("the cloud sent a frame this build cannot decode: {e}"),
            }
        }
        match tokio::time::timeout_at(deadline, recv.read_chunk(64 * 1024, true)).await {
            Ok(Ok(Some(chunk))) => buf.extend_from_slice(&chunk.bytes),
            // Finished, reset, connection lost, or out of time.
            _ => return,
        }
    }
}

/// Connects with `cfg`, opens the stream, sends `hello`; if welcomed, sends `then` (raw
/// bytes); collects what the cloud answers and waits for the connection to end.
async fn attempt(
    cfg: quinn::ClientConfig,
    cloud: SocketAddr,
    hello: &Message,
    then: Option<&[u8]>,
) -> Outcome {
    let mut endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("address")).expect("client endpoint");
    endpoint.set_default_client_config(cfg);
    let conn = match endpoint
        .connect(cloud, "localhost")
        .expect("start connecting")
        .await
    {
        Ok(c) => c,
        Err(e) => {
            return Outcome {
                handshake: Some(e.to_string()),
                frames: Vec::new(),
                closed: Some(e.to_string()),
            }
        }
    };
    let mut frames = Vec::new();
    if let Ok((mut send, mut recv)) = conn.open_bi().await {
        let mut buf = Vec::new();
        if send.write_all(&frame(hello)).await.is_ok() {
            read_frames(
                &mut recv,
                &mut buf,
                &mut frames,
                Duration::from_secs(10),
                |m| !matches!(m, Message::Verdicts(_)),
            )
            .await;
        }
        let welcomed = frames.iter().any(|m| matches!(m, Message::Welcome { .. }));
        if let (true, Some(bytes)) = (welcomed, then) {
            if send.write_all(bytes).await.is_ok() {
                read_frames(
                    &mut recv,
                    &mut buf,
                    &mut frames,
                    Duration::from_secs(10),
                    |m| matches!(m, Message::Goodbye { .. }),
                )
                .await;
            }
        }
    }
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .ok()
        .map(|e| e.to_string());
    conn.close(0u32.into(), b"test done");
    endpoint.wait_idle().await;
    Outcome {
        handshake: None,
        frames,
        closed,
    }
}

/// The good agent's link section of `/v1/status`.
fn link(agent: &Agent) -> Value {
    agent.get("/v1/status").1["cloud"].clone()
}

fn count(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

#[test]
fn refused_and_misbehaving_clients_lose_only_their_own_connection() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |p: &str| dir.path().join(p).to_str().expect("utf-8 path").to_string();

    // The fleet CA with its devices, and another CA whose certificates mean nothing here.
    cloud_core(&["ca", "init", "--dir", &path("ca")]);
    for id in [
        GOOD,
        "gateway-revoked",
        "gateway-liar",
        "gateway-garbage",
        "gateway-version",
        "gateway-huge",
    ] {
        cloud_core(&[
            "device",
            "issue",
            id,
            "--ca",
            &path("ca"),
            "--out",
            &path(id),
        ]);
    }
    cloud_core(&["device", "revoke", "gateway-revoked", "--ca", &path("ca")]);
    cloud_core(&["ca", "init", "--dir", &path("other-ca")]);
    cloud_core(&[
        "device",
        "issue",
        "gateway-foreign",
        "--ca",
        &path("other-ca"),
        "--out",
        &path("gateway-foreign"),
    ]);

    // The cloud (it reads the revocation list at start) and the well-behaved edge.
    let port = free_udp_port();
    let cloud_addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    let mut cloud = Cloud::start(Path::new(&path("cloud")), Path::new(&path("ca")), port);
    let agent = Agent::start(
        Path::new(&path("edge")),
        &[
            "--cloud",
            &cloud_addr.to_string(),
            "--identity",
            &path(GOOD),
            "--cloud-name",
            "localhost",
        ],
    );
    // Audit a fifth of the confident cases too, so verdicts flow steadily from the start.
    let (code, body) = agent.put("/v1/policy", serde_json::json!({"audit_share": 0.2}));
    assert_eq!(code, 200, "PUT /v1/policy: {body}");
    let _machines = Proc(
        Command::new(bin("edge-agent"))
            .args(["simulate", "--target", &agent.url])
            .args(["--machines", "6", "--rate", "32", "--fault-share", "0.7"])
            .args(["--seed", "23", "--duration", "120"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start edge-agent simulate"),
    );
    wait_for("the good edge's first verdicts", 60, || {
        let l = link(&agent);
        l["link"] == "connected" && count(&l, "verdicts") > 0
    });
    let before = link(&agent);
    assert_eq!(
        count(&before, "connects"),
        1,
        "the good edge connected once: {before}"
    );

    let ca_pem = Identity::read(Path::new(&path(GOOD))).ca;
    let identity = |id: &str| Identity::read(Path::new(&path(id)));
    let rt = tokio::runtime::Runtime::new().expect("runtime");

    // (5) Refused at the handshake, each with the TLS alert that names why: no
    // certificate, a certificate of another CA, a revoked certificate.
    let refusals = [
        (
            "no certificate",
            no_certificate_client(&ca_pem),
            GOOD,
            "no certificates",
        ),
        (
            "a certificate of another CA",
            identity("gateway-foreign").client(&ca_pem),
            "gateway-foreign",
            "invalid peer certificate",
        ),
        (
            "a revoked certificate",
            identity("gateway-revoked").client(&ca_pem),
            "gateway-revoked",
            "Revoked",
        ),
    ];
    for (what, cfg, id, named) in refusals {
        let o = rt.block_on(attempt(cfg, cloud_addr, &hello(id), None));
        eprintln!("{what}: {}", o.why());
        assert!(
            !o.welcomed(),
            "a client with {what} must not be welcomed: {o:?}"
        );
        let closed = o.closed.as_deref().unwrap_or_default();
        assert!(
            closed.contains("handshake failed") && closed.contains(named),
            "a client with {what} must be refused at the handshake with an alert naming \
             {named:?}: {}",
            o.why()
        );
    }

    // (5) A valid certificate whose Hello claims the good edge's id.
    let o = rt.block_on(attempt(
        identity("gateway-liar").client(&ca_pem),
        cloud_addr,
        &hello(GOOD),
        None,
    ));
    eprintln!("a Hello claiming another id: {}", o.why());
    assert!(
        !o.welcomed(),
        "a Hello claiming another id must not be welcomed: {o:?}"
    );
    let bye = o.goodbye().unwrap_or_default();
    assert!(
        bye.contains("gateway-liar") && bye.contains(GOOD),
        "the Goodbye must name the claimed and the certified id: {}",
        o.why()
    );
    assert!(
        o.closed.is_some(),
        "the cloud must close the connection: {o:?}"
    );

    // (6) Valid clients, welcomed, that then send bad frames.
    let mut garbage = vec![PROTOCOL_VERSION, 0];
    garbage.extend_from_slice(&16u32.to_le_bytes());
    garbage.extend_from_slice(&[0xff; 16]);
    let mut bad_version = frame(&Message::Heartbeat { seq: 1 });
    bad_version[0] = PROTOCOL_VERSION.wrapping_add(41);
    let mut huge = vec![PROTOCOL_VERSION, 0];
    huge.extend_from_slice(&(DEFAULT_MAX_PAYLOAD as u32 + 1).to_le_bytes());
    huge.extend_from_slice(&[0u8; 1024]);
    let misbehaving: [(&str, &str, &[u8], &str); 3] = [
        (
            "garbage under a valid header",
            "gateway-garbage",
            &garbage,
            "malformed",
        ),
        (
            "a bad version byte",
            "gateway-version",
            &bad_version,
            "version",
        ),
        (
            "a header claiming more than 1 MiB",
            "gateway-huge",
            &huge,
            "over the limit",
        ),
    ];
    for (what, id, bytes, named) in misbehaving {
        let o = rt.block_on(attempt(
            identity(id).client(&ca_pem),
            cloud_addr,
            &hello(id),
            Some(bytes),
        ));
        eprintln!("{what}: {}", o.why());
        assert!(o.welcomed(), "{id} (valid) must be welcomed first: {o:?}");
        let bye = o.goodbye().unwrap_or_default();
        assert!(
            bye.contains(named),
            "after {what} the cloud must say goodbye naming the problem ({named:?}): {}",
            o.why()
        );
        assert!(
            o.closed.is_some(),
            "after {what} the cloud must close that connection: {o:?}"
        );
    }
    drop(rt);

    // The good edge never lost its connection and keeps getting verdicts.
    wait_for(
        "more verdicts and delivered cases at the good edge",
        60,
        || {
            let l = link(&agent);
            count(&l, "verdicts") > count(&before, "verdicts")
                && count(&l, "delivered") > count(&before, "delivered")
        },
    );
    let after = link(&agent);
    assert_eq!(
        after["link"], "connected",
        "the good edge is still connected: {after}"
    );
    assert_eq!(
        count(&after, "connects"),
        1,
        "the good edge kept its first connection throughout: {after}"
    );
    assert!(cloud.is_running(), "the cloud process is alive");
    let fleet = cloud.fleet();
    let devices = fleet["devices"].as_array().expect("fleet devices");
    let good = devices
        .iter()
        .find(|d| d["id"] == GOOD)
        .unwrap_or_else(|| panic!("the fleet lists {GOOD}: {fleet}"));
    assert_eq!(
        good["connected"], true,
        "the fleet shows {GOOD} connected: {fleet}"
    );
    assert_eq!(
        fleet["connected"], 1,
        "only the good edge is connected now: {fleet}"
    );
    for refused in ["gateway-foreign", "gateway-revoked", "gateway-liar"] {
        assert!(
            devices.iter().all(|d| d["id"] != refused),
            "{refused} was never greeted, so the registry must not list it: {fleet}"
        );
    }
    agent.stop();
    eprintln!("link refusals: {:.1} s", started.elapsed().as_secs_f64());
}
