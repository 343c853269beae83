//! The cloud core's library.
//!
//! # Layout
//!
//! - [`engine`]: the DeepSeek engine — checkpoints, the model on a backend trait (CPU
//!   backend), sampling, constrained decoding, generation and the serving scheduler.
//! - [`verdict`]: hard case → prompt → schema-constrained verdict.
//! - [`server`]: the HTTP server — OpenAI-compatible API, verdicts, status, metrics.

pub mod engine;
pub mod server;
pub mod verdict;
