//! TLS configuration for both ends of the link.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::ALPN;

/// What is wrong with the TLS material; the message names the item.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM item is missing or malformed.
    #[error("{what}: {reason}")]
    Pem {
        /// Which item (`CA certificate`, `device key`, …).
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The peer has no verified certificate, or it names no device.
    #[error("peer identity: {0}")]
    Identity(String),
}

fn pem_err(what: &'static str, reason: impl ToString) -> TlsError {
    TlsError::Pem {
        what,
        reason: reason.to_string(),
    }
}

fn certs(what: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(what, format!("not valid PEM: {e:?}")))?;
    if certs.is_empty() {
        return Err(pem_err(what, "no certificate in the PEM data"));
    }
    Ok(certs)
}

fn key(what: &'static str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| pem_err(what, format!("no private key: {e:?}")))
}

fn roots(ca_pem: &[u8]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs("CA certificate", ca_pem)? {
        roots
            .add(c)
            .map_err(|e| pem_err("CA certificate", e.to_string()))?;
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport(keep_alive: Option<Duration>) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // A silent peer is dropped after 30 s; clients ping every 5 s to stay well inside it.
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(30)) {
        t.max_idle_timeout(Some(idle));
    }
    t.keep_alive_interval(keep_alive);
    Arc::new(t)
}

/// Sessions the server keeps for resumption (a few KiB each).
pub const RESUMABLE_SESSIONS: usize = 16_384;

/// The cloud's side: the server certificate (`chain_pem`, `key_pem`), and every client
/// must present a certificate of the fleet CA (`ca_pem`) that is not on one of the CA's
/// revocation lists (`crl_pem`, any number of PEM CRLs, possibly empty).
pub fn server_config(
    ca_pem: &[u8],
    chain_pem: &[u8],
    key_pem: &[u8],
    crl_pem: &[u8],
) -> Result<quinn::ServerConfig, TlsError> {
    let crls = CertificateRevocationListDer::pem_slice_iter(crl_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err("revocation list", format!("not valid PEM: {e:?}")))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider())
        .with_crls(crls)
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs("server certificate", chain_pem)?,
            key("server key", key_pem)?,
        )
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    // Session resumption: sessions are kept in this process (up to RESUMABLE_SESSIONS, the
    // oldest forgotten first; a restart forgets them all), so a reconnecting edge skips the
    // certificate exchange. Its certificate is not verified again on resumption, which is
    // why the server also checks every connection's certificate serial against the live
    // revocation list ([`revoked_serials`]). QUIC 0-RTT needs this stateful resumption;
    // the server allows it, and the edge sends nothing before its handshake is confirmed
    // (0-RTT data could be replayed).
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(RESUMABLE_SESSIONS);
    cfg.max_early_data_size = u32::MAX;
    let crypto = QuicServerConfig::try_from(cfg).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport(None));
    Ok(server)
}

/// An edge's side: trust only the fleet CA, present the device certificate.
pub fn client_config(
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<quinn::ClientConfig, TlsError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_auth_cert(
            certs("device certificate", cert_pem)?,
            key("device key", key_pem)?,
        )
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    // Keep session tickets (rustls' in-memory store) for fast reconnects: reuse one
    // client configuration across connections.
    cfg.enable_early_data = true;
    let crypto = QuicClientConfig::try_from(cfg).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(transport(Some(Duration::from_secs(5))));
    Ok(client)
}

/// The device id of a certificate: its subject's common name.
pub fn device_id_of_cert(der: &[u8]) -> Result<String, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| TlsError::Identity(format!("unreadable certificate: {e}")))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .ok_or_else(|| TlsError::Identity("the certificate has no common name".into()))?;
    cn.as_str()
        .map(str::to_string)
        .map_err(|e| TlsError::Identity(format!("the common name is not text: {e}")))
}

/// The leaf certificate of the peer of a connection, as the handshake verified it (or as
/// the resumed session remembers it).
pub fn peer_cert(conn: &quinn::Connection) -> Result<CertificateDer<'static>, TlsError> {
    let identity = conn
        .peer_identity()
        .ok_or_else(|| TlsError::Identity("the peer presented no certificate".into()))?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TlsError::Identity("unexpected identity type".into()))?;
    chain
        .first()
        .cloned()
        .ok_or_else(|| TlsError::Identity("empty certificate chain".into()))
}

/// The device id of the peer of a connection, from the certificate the handshake
/// verified.
pub fn device_id(conn: &quinn::Connection) -> Result<String, TlsError> {
    device_id_of_cert(&peer_cert(conn)?)
}

/// The serial number of a certificate (its DER bytes).
pub fn serial_of_cert(der: &[u8]) -> Result<Vec<u8>, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| TlsError::Identity(format!("unreadable certificate: {e}")))?;
    Ok(cert.raw_serial().to_vec())
}

/// The serial numbers revoked by PEM CRLs (any number, possibly none).
pub fn revoked_serials(crl_pem: &[u8]) -> Result<std::collections::HashSet<Vec<u8>>, TlsError> {
    let mut out = std::collections::HashSet::new();
    for crl in CertificateRevocationListDer::pem_slice_iter(crl_pem) {
        let crl = crl.map_err(|e| pem_err("revocation list", format!("not valid PEM: {e:?}")))?;
        let (_, parsed) = x509_parser::parse_x509_crl(&crl)
            .map_err(|e| pem_err("revocation list", e.to_string()))?;
        for r in parsed.iter_revoked_certificates() {
            out.insert(r.raw_serial().to_vec());
        }
    }
    Ok(out)
}
