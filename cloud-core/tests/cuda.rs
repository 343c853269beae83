//! The CUDA backend against the CPU backend and the committed reference fixtures
//! (`fixtures/parity/`, transformers f32), on a real GPU. Where there is none every test
//! prints why it skipped (CI has no GPU: it compiles these, runs the same suite on the
//! emulated device in `cuda_on_cpu.rs`, and compiles the kernels with NVRTC). Run on a GPU
//! machine with `bash .ci/gpu`.
#![cfg(feature = "cuda")]

#[path = "cuda_suite/mod.rs"]
mod suite;

/// A real GPU: nothing to prepare.
fn prepare() -> bool {
    true
}

#[test]
fn cuda_logits_match_the_reference_and_the_cpu_backend() {
    suite::cuda_logits_match_the_reference_and_the_cpu_backend();
}

#[test]
fn cuda_batched_decode_gives_the_tokens_of_one_at_a_time() {
    suite::cuda_batched_decode_gives_the_tokens_of_one_at_a_time();
}

#[test]
fn cuda_prefix_sharing_gives_the_logits_of_a_fresh_run() {
    suite::cuda_prefix_sharing_gives_the_logits_of_a_fresh_run();
}

#[test]
fn cuda_a_step_that_does_not_fit_is_refused_and_changes_nothing() {
    suite::cuda_a_step_that_does_not_fit_is_refused_and_changes_nothing();
}

#[test]
fn cuda_out_of_memory_is_a_typed_error() {
    suite::cuda_out_of_memory_is_a_typed_error();
}

#[test]
fn cuda_graphs_replay_decode_steps_as_they_run_eagerly() {
    suite::cuda_graphs_replay_decode_steps_as_they_run_eagerly();
}
