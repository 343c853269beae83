//! The cloud core's library: what exists of the engine so far.
//!
//! # Layout
//!
//! - [`engine`]: the DeepSeek engine — so far checkpoint configuration and weight loading
//!   only; no forward pass, no serving. The `cloud-core` binary says so and exits.

pub mod engine;
pub mod server;
pub mod verdict;
