//! The fleet: the CA that gives devices their identities (and takes them back), the
//! durable store of cases, verdicts and devices, the QUIC server the edges connect to, and
//! the controller that steers each edge's hard-case share.

pub mod ca;
pub mod server;
pub mod steer;
pub mod store;
