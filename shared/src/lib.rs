//! Pure logic shared by the edge agent and the cloud core.
//!
//! This crate owns the *contract*: what a sensor record is and how it is validated, the
//! class list, the window and the feature layout (used alike by the agent, the simulator
//! and the training script in `onnx/`), case ids and decisions, the hybrid logical clock,
//! and the versioned postcard frame codec with its size limits.
//!
//! It must never do I/O: no sockets, no files, no clocks of its own. Time is always a
//! parameter, so everything here is deterministic and easy to test and fuzz.
//!
//! # Layout
//!
//! - [`schema`]: classes, required readings, window length, input limits.
//! - [`record`]: the sensor record, its JSON parsing and validation errors.
//! - [`features`]: window → feature vector (the student model's input layout).
//! - [`case`]: case ids, decisions and reasons, the hard case sent to the cloud.
//! - [`hlc`]: the hybrid logical clock.
//! - [`frame`]: versioned, size-limited postcard frames.
//! - [`protocol`]: the edge–cloud protocol as sans-IO state machines.
//! - [`sim`]: the simulated factory machines (normal operation and fault signatures).
//! - [`sync`]: the last-writer-wins map of shared state and its incremental sync.
//! - [`replica`]: one side's copy of the state shared with one peer, and the sync stream.

pub mod case;
pub mod features;
pub mod frame;
pub mod hlc;
pub mod protocol;
pub mod record;
pub mod replica;
pub mod schema;
pub mod sim;
pub mod sync;
