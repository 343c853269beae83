//! The CUDA backend against the CPU backend and the committed reference fixtures
//! (`fixtures/parity/`, transformers f32), on a real GPU. Where there is none every test
//! prints why it skipped (CI has no GPU: it compiles these, runs the same suite on the
//! emulated device in `cuda_on_cpu.rs`, and compiles the kernels with NVRTC). Run on a GPU
//! machine with `bash .ci/gpu`.
#![cfg(feature = "cuda")]

#[path = "cuda_suite/mod.rs"]
mod suite;

/// A real GPU: nothing to prepare. The tests are those of the suite.
fn prepare() -> bool {
    true
}
