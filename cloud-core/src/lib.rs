//! The cloud core's library.
//!
//! # Layout
//!
//! - [`demo_model`]: the embedded demo checkpoint.
//! - [`engine`]: the DeepSeek engine — checkpoints, the model on a backend trait (CPU
//!   backend), sampling, constrained decoding, generation and the serving scheduler.
//! - [`fleet`]: the fleet CA (device identities, revocation).
//! - [`verdict`]: hard case → prompt → schema-constrained verdict.
//! - [`server`]: the HTTP server — OpenAI-compatible API, verdicts, status, metrics.

pub mod demo_model;
pub mod engine;
pub mod fleet;
pub mod server;
pub mod verdict;
