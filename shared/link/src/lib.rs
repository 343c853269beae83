//! The QUIC side of the link between edge agents and the cloud core: TLS 1.3 only, mutual
//! authentication against the fleet CA, certificate revocation lists, our ALPN, and the
//! rule that a device's id is the common name of its verified certificate — never what a
//! device claims in a frame.
//!
//! The protocol logic itself stays sans-IO in `factory-shared`; this crate only configures
//! quinn and rustls.

pub mod tls;

/// The ALPN protocol id of the link (version 1).
pub const ALPN: &[u8] = b"factory-link/1";
