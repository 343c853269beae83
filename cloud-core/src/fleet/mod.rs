//! The fleet: the CA that gives devices their identities (and takes them back), the
//! durable store of cases, verdicts and devices, and the QUIC server the edges connect to.

pub mod ca;
pub mod server;
pub mod store;
