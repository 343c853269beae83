//! Device identities on the QUIC link: only certificates of the fleet CA that are not
//! revoked get through the handshake, and the cloud reads the device id from the verified
//! certificate. The server keeps serving the others after every refusal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cloud_core::fleet::ca::{files, Ca, DeviceIdentity};
use tokio::sync::mpsc;

fn read(dir: &std::path::Path, f: &str) -> Vec<u8> {
    std::fs::read(dir.join(f)).expect("CA file")
}

fn server(ca_dir: &std::path::Path) -> quinn::ServerConfig {
    link::tls::server_config(
        &read(ca_dir, files::CA_CERT),
        &read(ca_dir, files::SERVER_CERT),
        &read(ca_dir, files::SERVER_KEY),
        &read(ca_dir, files::CRL),
    )
    .expect("server config")
}

/// Starts a server; returns its endpoint, address and the device ids it accepted.
fn start(
    cfg: quinn::ServerConfig,
) -> (quinn::Endpoint, SocketAddr, mpsc::UnboundedReceiver<String>) {
    let ep = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let addr = ep.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    let accept = ep.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accept.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Ok(conn) = incoming.await {
                    if let Ok(id) = link::tls::device_id(&conn) {
                        let _ = tx.send(id);
                        // Hold the connection until the client closes it.
                        conn.closed().await;
                    }
                }
            });
        }
    });
    (ep, addr, rx)
}

/// Connects with `cfg`; true when the connection is up and stays up for a moment (a
/// refused client certificate closes it right after the client's last flight).
async fn connects(addr: SocketAddr, cfg: quinn::ClientConfig) -> bool {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
    ep.set_default_client_config(cfg);
    let ok = match tokio::time::timeout(Duration::from_secs(10), async {
        let conn = ep.connect(addr, "localhost").ok()?.await.ok()?;
        // Round trip something: a refused certificate shows up here at the latest.
        match tokio::time::timeout(Duration::from_millis(500), conn.closed()).await {
            Ok(_) => None,
            Err(_) => Some(conn),
        }
    })
    .await
    {
        Ok(Some(conn)) => {
            conn.close(0u32.into(), b"done");
            true
        }
        _ => false,
    };
    ep.wait_idle().await;
    ok
}

fn client(id: &DeviceIdentity) -> quinn::ClientConfig {
    link::tls::client_config(
        id.ca_pem.as_bytes(),
        id.cert_pem.as_bytes(),
        id.key_pem.as_bytes(),
    )
    .expect("client config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_unrevoked_devices_of_the_fleet_ca_get_in() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_dir = dir.path().join("ca");
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let ca = Ca::init(&ca_dir, "test fleet", &names).expect("ca init");
    assert!(
        Ca::init(&ca_dir, "again", &names).is_err(),
        "an existing CA is not overwritten"
    );
    let press = ca.issue_device("press-01", 30).expect("issue");
    let lathe = ca.issue_device("lathe-02", 30).expect("issue");
    assert!(ca.issue_device("bad id!", 30).is_err());
    let other = Ca::init(&dir.path().join("other"), "other fleet", &names).expect("other ca");
    let stranger = other.issue_device("press-01", 30).expect("issue");

    let (ep, addr, mut ids) = start(server(&ca_dir));
    assert!(
        connects(addr, client(&press)).await,
        "a device of the fleet connects"
    );
    assert_eq!(
        ids.recv().await.as_deref(),
        Some("press-01"),
        "id from the certificate"
    );

    // A certificate of another CA (same device name), and none at all: refused.
    let foreign = link::tls::client_config(
        press.ca_pem.as_bytes(),
        stranger.cert_pem.as_bytes(),
        stranger.key_pem.as_bytes(),
    )
    .expect("config");
    assert!(
        !connects(addr, foreign).await,
        "another CA's certificate is refused"
    );
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(press.ca_pem.as_bytes()) {
        roots.add(c.expect("pem")).expect("root");
    }
    let mut anon = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("tls13")
    .with_root_certificates(roots)
    .with_no_client_auth();
    anon.alpn_protocols = vec![link::ALPN.to_vec()];
    let anon = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(anon).expect("quic"),
    ));
    assert!(!connects(addr, anon).await, "no certificate, no connection");

    // Revocation: the new list is loaded; the revoked device is refused, the other is not.
    assert_eq!(ca.revoke_device("lathe-02").expect("revoke"), 1);
    assert!(ca.revoke_device("never-issued").is_err());
    ep.set_server_config(Some(server(&ca_dir)));
    assert!(
        !connects(addr, client(&lathe)).await,
        "a revoked device is refused"
    );
    assert!(
        connects(addr, client(&press)).await,
        "the server keeps serving the others"
    );
    assert_eq!(ids.recv().await.as_deref(), Some("press-01"));
    // A new certificate for the revoked device brings it back.
    let lathe2 = ca.issue_device("lathe-02", 30).expect("reissue");
    assert!(connects(addr, client(&lathe2)).await);
    assert_eq!(ids.recv().await.as_deref(), Some("lathe-02"));
    let issued = ca.issued().expect("ledger");
    assert_eq!(issued.iter().filter(|c| c.revoked.is_some()).count(), 1);
    assert_eq!(issued.len(), 3);
}

use rustls::pki_types::pem::PemObject;
