//! The CUDA backend's whole test suite (`cuda_suite`) on a CUDA device emulated on the
//! CPU: the real backend code through cudarc, with libcuda, libcublas and libnvrtc
//! replaced by `tests/emu/driver.cpp` (host memory as device memory, the kernels built
//! for the CPU by `g++`, cuBLAS's GEMMs by their definition). It checks what the kernel
//! tests cannot: launch arguments and shapes, GEMM layouts, the paged cache's addresses,
//! copy-on-write, refusals and out-of-memory, all on machines without a GPU.
#![cfg(feature = "cuda")]
// Loading the emulated libraries ahead of cudarc is FFI by nature.
#![allow(unsafe_code)]

use std::sync::OnceLock;

#[path = "emu/mod.rs"]
mod emu;
#[path = "cuda_suite/mod.rs"]
mod suite;

/// Builds the emulated libraries and loads them before cudarc looks for CUDA (it then
/// finds them by their sonames); `false` (with the reason printed) without `g++`.
fn prepare() -> bool {
    static LIBS: OnceLock<Result<Vec<libloading::Library>, String>> = OnceLock::new();
    let r = LIBS.get_or_init(|| {
        let dir = emu::build(true)?;
        ["libcuda.so", "libcublas.so", "libnvrtc.so"]
            .iter()
            .map(|n| {
                // SAFETY: libraries just built from our sources; loading runs only the
                // C++ runtime's initialisers.
                unsafe { libloading::Library::new(dir.join(n)) }.map_err(|e| e.to_string())
            })
            .collect()
    });
    match r {
        Ok(_) => true,
        Err(e) => {
            emu::skip_or_fail(e);
            false
        }
    }
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

/// `cloud-core bench --engine cuda` end to end on the emulated device (the libraries
/// found on `LD_LIBRARY_PATH`, as on a GPU machine): random weights made on the device,
/// the copy bandwidth timed with events, prefill and decode at two batch sizes, decode
/// steps replayed from CUDA graphs.
#[test]
fn the_cuda_benchmark_runs_on_the_emulated_device() {
    let dir = match emu::build(true) {
        Ok(d) => d,
        Err(e) => return emu::skip_or_fail(&e),
    };
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cloud-core"))
        .args(["bench", "--engine", "cuda", "--shape", "tiny"])
        .args(["--prompt", "8", "--steps", "5", "--batches", "1,3"])
        .env("LD_LIBRARY_PATH", &dir)
        .output()
        .expect("cloud-core runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("CUDA device emulated on the CPU"), "{text}");
    for batch in ["| 1 |", "| 3 |"] {
        assert!(text.contains(batch), "no row for batch {batch}: {text}");
    }
    // Per batch size: the prefill and the first decode step run eagerly, the second is
    // captured, the other three replayed.
    assert!(
        text.contains("2 captured into CUDA graphs, 6 replayed"),
        "{text}"
    );
}
