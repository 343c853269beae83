//! The CUDA backend (cargo feature `cuda`), on `cudarc`.
//!
//! - The CUDA libraries (driver, NVRTC, cuBLAS) are opened at run time: the workspace
//!   builds with no CUDA installed, and [`Cuda::new`] says why it cannot start where
//!   there is no GPU (it never panics on a missing library).
//! - Kernels are CUDA C ([`KERNELS`]), compiled once per process by NVRTC for the
//!   device's architecture, with the CUDA headers found through `CUDA_INCLUDE`, then
//!   `$CUDA_HOME/include`, then `/usr/local/cuda/include`.
//! - Weight matrices live in device memory as bf16 (from a bf16 checkpoint: the stored
//!   values, copied from the memory map). Activations are f32. Norms, biases and the MLA
//!   per-head blocks stay f32. Projections of up to [`GEMV_ROWS`] rows (decode) read each
//!   weight once in our GEMV kernels (bias, residual, several projections of one input
//!   or SwiGLU fused in); more rows are cuBLAS bf16 GEMMs with f32 accumulation.
//! - The KV cache is paged ([`crate::engine::paged`]): bf16 rows in fixed-size blocks
//!   drawn from pools sharing one byte budget; a sequence's cache is one table of block
//!   addresses for all its layers (a block holds its positions of every layer), made
//!   room for once a step, prefixes share blocks by reference, attention reads the
//!   blocks through the table at its layer's offsets. A step that does not fit is refused with
//!   [`DeviceError::CacheFull`] and leaves every cache as it was.
//! - A step's attention is one launch for all its sequences (each reading its own cache
//!   through its block table, kept in device memory), with each row's positions split
//!   across blocks and merged by the last of them when the step has few rows; prompts
//!   and MLA's steps on the tensor cores (`attention_mma`). MoE routing, the experts and
//!   greedy picks run on the device; a prompt's experts are grouped GEMMs on the tensor
//!   cores, one launch per projection for every expert.
//! - Decode steps are captured into CUDA graphs and replayed ([`step`]); on sm_90 every
//!   kernel is launched with programmatic dependent launch (the next kernel's blocks are
//!   placed, and the projections' weights asked of L2, while the one before it ends).
//! - Errors are sticky per step: the first one is kept, later operations do nothing, and
//!   the model's forward pass returns it ([`Backend::take_error`](super::Backend::take_error)).
//!
//! # Layout
//!
//! - this file: the backend's state ([`Cuda`]), its start on a device, its options, and
//!   the error and step bookkeeping every operation goes through.
//! - `ops`: the [`Backend`](super::Backend) trait's operations, which check their buffers and launch.
//! - `kernels`: the CUDA C source, NVRTC, kernel launches.
//! - `memory`: a step's temporaries, uploads, copies.
//! - `kv`: the paged KV cache in device memory.
//! - `project`: projections (GEMV kernels, cuBLAS GEMMs) and RoPE.
//! - `attention`, `moe`, `sample`: attention, mixture-of-experts layers, picks.
//! - [`step`]: CUDA graphs of decode steps and their memory.
//! - `profile`: the per-operation profile of `bench`.

// The backend drives the GPU through cudarc's FFI-level calls (kernel launches, cuBLAS
// with mixed types, raw block addresses of the paged cache). Every `unsafe` block states
// the sizes it relies on.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::cublas::{self, CudaBlas};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, LaunchConfig};
use half::bf16;

pub use step::GraphStats;
use step::{Dev, Mode, Steps};

use super::DeviceError;
use crate::engine::paged::Budget;

/// Launches kernel `$name` of `$self` with the arguments in order (buffers by device
/// address, scalars of the kernel's parameter types); a failure is recorded. Each caller
/// passes buffers of the sizes its kernel indexes, checked just before.
macro_rules! launch {
    ($self:expr, $name:literal, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let mut words = [$( $crate::engine::backend::cuda::step::KArg::word(&$arg) ),*];
        $self.launch_words($name, $cfg, &mut words);
    }};
    // A kernel, or with `Some((weights, eps))` its variant with an RMSNorm of the input
    // folded in (the same parameters and those two).
    ($self:expr, $name:literal or $normed:literal with $norm:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        match $norm {
            None => launch!($self, $name, $cfg, $($arg),*),
            Some((nw, eps)) => launch!($self, $normed, $cfg, $($arg),*, nw, eps),
        }
    }};
}

mod attention;
mod kernels;
mod kv;
mod memory;
mod moe;
mod ops;
mod profile;
mod project;
mod sample;
pub mod step;

pub use kernels::{
    compile, fa_shared, include_path, max_threads, parameter_counts, ATT_WARPS, FA_KEYS, FA_SLOTS,
    FA_THREADS, GEMV_ROWS, KERNELS, KERNEL_NAMES, MAX_DV, MOE_MAX_EXPERTS, SAMPLE_MAX_THREADS,
};
use kernels::{compiled, Kernel, Kernels, SHARED_PER_BLOCK};
pub use kv::{DeviceChunks, SeqKv};
use kv::{KvStep, Pool};
use memory::keep_freed_memory;
use profile::Profiler;
pub use profile::{Profile, ProfiledOp};

/// Why the CUDA backend is not available here (no library, no device).
pub fn unavailable() -> Option<String> {
    // SAFETY: these only try to open the shared libraries.
    let (driver, nvrtc, blas) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
        )
    };
    if !driver {
        return Some("no CUDA driver library (libcuda) on this machine".into());
    }
    if !nvrtc {
        return Some("no NVRTC library (libnvrtc) on this machine".into());
    }
    if !blas {
        return Some("no cuBLAS library (libcublas) on this machine".into());
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => None,
        Ok(_) => Some("the CUDA driver sees no device".into()),
        Err(e) => Some(format!("the CUDA driver does not start: {e}")),
    }
}

/// Options of the backend.
#[derive(Clone, Debug)]
pub struct CudaOptions {
    /// Device ordinal.
    pub device: usize,
    /// Bytes for the KV cache; `None`: 90% of what is free when the first cache row is
    /// written (after the weights are loaded), less `reserve`.
    pub kv_cache_bytes: Option<usize>,
    /// Kept free for activations and cuBLAS when the KV budget is computed.
    pub reserve: usize,
    /// Positions per KV block.
    pub block_rows: usize,
    /// Bytes of a pool's first device allocation, and the unit of the larger ones that
    /// follow as it grows ([`crate::engine::paged`]), in whole blocks (one at least: a
    /// block holds its positions of every layer).
    pub chunk_bytes: usize,
    /// Capture decode steps into CUDA graphs and replay them ([`step`]).
    pub graphs: bool,
    /// Initial bytes of the graphed steps' arena and of their staging area (each grows,
    /// to twice its size or more, dropping the graphs made so far, when a step needs
    /// more).
    pub graph_memory: (usize, usize),
    /// Use the kernels on the bf16 tensor cores (sm_80 and later) where they apply:
    /// `attention_mma` and the grouped expert GEMMs. `false`: attention on the CUDA cores
    /// (`attention_batch`) and one cuBLAS GEMM per expert, as on older devices (to
    /// compare the two, or to fall back).
    pub tensor_core_kernels: bool,
    /// With the tensor-core kernels: decode steps whose query heads share a key head by
    /// this many or more run attention on `attention_mma` (one tile of keys read for all
    /// of a key head's query heads), fewer on `attention_batch` (a block per query head).
    /// [`crate::engine::backend::MMA_DECODE_GROUP`] by default (MLA's absorbed form, and GQA of eight heads per
    /// key head or more); 1 puts every decode step on the tensor cores (to compare the
    /// two on GQA models, such as the 1.5B's six heads per key head).
    pub mma_decode_group: usize,
    /// Launch every kernel with programmatic dependent launch on sm_90 and later (see
    /// `grid_dependency` in the kernels): the next kernel's blocks are placed while the
    /// one before it ends, rather than after. `false`: plain launches.
    pub pdl: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            device: 0,
            kv_cache_bytes: None,
            reserve: 2 << 30,
            block_rows: 16,
            chunk_bytes: 2 << 20,
            graphs: true,
            graph_memory: (64 << 20, 1 << 20),
            tensor_core_kernels: true,
            mma_decode_group: crate::engine::backend::MMA_DECODE_GROUP,
            pdl: true,
        }
    }
}

/// A buffer of the CUDA backend.
#[derive(Clone)]
pub enum CudaBuf {
    /// f32 values (activations, norms, biases).
    F32(Arc<Dev<f32>>),
    /// bf16 values (weight matrices).
    Bf16(Arc<Dev<bf16>>),
}

/// The CUDA backend.
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    /// cuBLAS's workspace, set explicitly so that a captured GEMM never allocates.
    _workspace: CudaSlice<u8>,
    kernels: Kernels,
    opts: CudaOptions,
    name: String,
    /// The device's multiprocessors (what a launch must fill).
    sms: usize,
    /// Whether it has bf16 tensor cores (sm_80 and later), which `attention_mma` and the
    /// grouped expert GEMMs need, and the options let them be used.
    tensor_cores: bool,
    /// Whether kernels are launched with programmatic dependent launch (sm_90 and later,
    /// and the options allow it, until the driver refuses one).
    pdl: AtomicBool,
    /// The driver refused a programmatic launch during the step being captured: its
    /// failure is not the shape's, which is captured again (plainly) at its next step.
    pdl_refused: AtomicBool,
    /// The attention kernels' tickets, one per (row, head) of a split `attention_batch`
    /// launch or (slot tile, key head) of a split `attention_mma` one (fewer than
    /// `2 · sms`: more are not split), zero between launches.
    tickets: CudaSlice<u32>,
    error: Mutex<Option<DeviceError>>,
    budget: Mutex<Option<Arc<Budget>>>,
    pools: Mutex<HashMap<usize, Arc<Pool>>>,
    /// The step's caches and attention metadata, from its `kv_grow` to its end.
    kv_step: Mutex<Option<KvStep>>,
    /// Per MoE layer (keyed by its first expert's gate matrix address): the device tables
    /// of every expert's gate, up and down matrix addresses.
    expert_tables: Mutex<HashMap<u64, Arc<[Dev<u64>; 3]>>>,
    /// Graph capture and replay of decode steps, and the step arena.
    steps: Mutex<Steps>,
    /// The step's capture or replay was given up: operations do nothing until it ends.
    halted: AtomicBool,
    capturing: Arc<AtomicBool>,
    /// Whether steps are profiled (read by every operation, without the profiler's lock).
    profiling: AtomicBool,
    profiler: Mutex<Profiler>,
}

/// cuBLAS's workspace (what cuBLAS recommends for Hopper).
const BLAS_WORKSPACE: usize = 32 << 20;

fn failed(op: &str, e: impl std::fmt::Display) -> DeviceError {
    DeviceError::Failed {
        op: op.to_string(),
        message: e.to_string(),
    }
}

/// Threads per block of the elementwise kernels, and a grid covering `n`.
fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row, `threads` threads.
fn per_row(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl Cuda {
    /// Starts the backend on a device: context, stream, cuBLAS, kernels.
    pub fn new(opts: CudaOptions) -> Result<Cuda, DeviceError> {
        if let Some(why) = unavailable() {
            return Err(failed("start", why));
        }
        let ctx = CudaContext::new(opts.device).map_err(|e| failed("context", e))?;
        // Everything runs on one stream: no cross-stream events to record per use (they
        // would cost driver calls per argument and cannot be captured).
        // SAFETY: no slice exists yet, and every operation is ordered on `stream`.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| failed("compute capability", e))?;
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| failed("multiprocessor count", e))?
            .max(1) as usize;
        // A stream of our own: the legacy default stream synchronises with everything and
        // cannot be captured into a CUDA graph.
        let stream = ctx.new_stream().map_err(|e| failed("stream", e))?;
        keep_freed_memory(&ctx);
        let ptx = compiled(&format!("sm_{major}{minor}")).map_err(|e| failed("NVRTC", e))?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| failed("loading kernels", e))?;
        let bounds = max_threads().map_err(|e| failed("kernels", e))?;
        let params = parameter_counts().map_err(|e| failed("kernels", e))?;
        // The shared memory a block may opt in to (at least 99 KiB from sm_80 on).
        let optin = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_or(0, |v| u32::try_from(v).unwrap_or(0))
            .max(SHARED_PER_BLOCK);
        let mut f = HashMap::new();
        for k in KERNEL_NAMES {
            let func = module
                .load_function(k)
                .map_err(|e| failed(&format!("kernel {k}"), e))?;
            // What the device runs a block of it with (its registers per thread decide).
            let most = func
                .max_threads_per_block()
                .map_err(|e| failed(&format!("kernel {k}"), e))?;
            let shared = func
                .shared_size_bytes()
                .map_err(|e| failed(&format!("kernel {k}"), e))?;
            let bound = bounds[k];
            if u32::try_from(most).unwrap_or(0) < bound {
                return Err(failed(
                    &format!("kernel {k}"),
                    format!(
                        "the device runs blocks of at most {most} threads of it, and it is \
                         launched with up to {bound}"
                    ),
                ));
            }
            let shared = u32::try_from(shared).unwrap_or(0);
            let mut dynamic = SHARED_PER_BLOCK.saturating_sub(shared);
            // Prompt attention's tiles of MLA's 576-column keys take ~80 KB (refused:
            // the kernel is not launched for them, attention_batch is).
            if *k == "attention_mma" && major >= 8 {
                let most = optin.saturating_sub(shared);
                let raised = func.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    i32::try_from(most).unwrap_or(i32::MAX),
                );
                if raised.is_ok() {
                    dynamic = most;
                }
            }
            f.insert(
                *k,
                Kernel {
                    func,
                    max_threads: bound,
                    dynamic,
                    params: params[k],
                },
            );
        }
        let blas = CudaBlas::new(stream.clone()).map_err(|e| failed("cuBLAS", e))?;
        let workspace = stream
            .alloc_zeros::<u8>(BLAS_WORKSPACE)
            .map_err(|e| failed("cuBLAS workspace", e))?;
        {
            let (wp, _s) = workspace.device_ptr(&stream);
            // SAFETY: the workspace lives as long as the handle (dropped after it).
            unsafe {
                cublas::sys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    wp as *mut std::ffi::c_void,
                    BLAS_WORKSPACE,
                )
            }
            .result()
            .map_err(|e| failed("cuBLAS workspace", e))?;
        }
        let tensor_cores = major >= 8 && opts.tensor_core_kernels;
        let pdl = major >= 9 && opts.pdl;
        let tickets = stream
            .alloc_zeros::<u32>(2 * sms)
            .map_err(|e| failed("attention tickets", e))?;
        Ok(Cuda {
            ctx,
            stream,
            blas,
            _workspace: workspace,
            kernels: Kernels { _module: module, f },
            opts,
            name,
            sms,
            tensor_cores,
            pdl: AtomicBool::new(pdl),
            pdl_refused: AtomicBool::new(false),
            tickets,
            error: Mutex::new(None),
            budget: Mutex::new(None),
            pools: Mutex::new(HashMap::new()),
            kv_step: Mutex::new(None),
            expert_tables: Mutex::new(HashMap::new()),
            steps: Mutex::new(Steps::default()),
            halted: AtomicBool::new(false),
            capturing: Arc::new(AtomicBool::new(false)),
            profiling: AtomicBool::new(false),
            profiler: Mutex::new(Profiler::default()),
        })
    }

    /// Whether kernels are launched with programmatic dependent launch (the device is
    /// sm_90 or later and the options allow it).
    pub fn programmatic_launch(&self) -> bool {
        self.pdl.load(Ordering::Relaxed)
    }

    /// The context (benchmarks time with its events).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every operation runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for the device to finish what was queued.
    pub fn synchronize(&self) -> Result<(), DeviceError> {
        self.stream
            .synchronize()
            .map_err(|e| failed("synchronize", e))
    }

    /// `(free, total)` device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize), DeviceError> {
        self.ctx
            .mem_get_info()
            .map_err(|e| failed("memory info", e))
    }

    /// Device-to-device copy bandwidth (bytes read + written per second) over buffers of
    /// `bytes`, timed with events: the memory roofline the benchmark compares against.
    pub fn copy_bandwidth(&self, bytes: usize) -> Result<f64, DeviceError> {
        use cudarc::driver::sys::CUevent_flags;
        let n = bytes / 4;
        let oom = |e: cudarc::driver::DriverError| failed("bandwidth buffers", e);
        let src = self.stream.alloc_zeros::<f32>(n).map_err(oom)?;
        let mut dst = self.stream.alloc_zeros::<f32>(n).map_err(oom)?;
        let copy = |dst: &mut CudaSlice<f32>| {
            self.stream
                .memcpy_dtod(&src, dst)
                .map_err(|e| failed("bandwidth copy", e))
        };
        copy(&mut dst)?;
        let ev = || {
            self.ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| failed("event", e))
        };
        let (start, end) = (ev()?, ev()?);
        let reps = 10;
        start.record(&self.stream).map_err(|e| failed("event", e))?;
        for _ in 0..reps {
            copy(&mut dst)?;
        }
        end.record(&self.stream).map_err(|e| failed("event", e))?;
        end.synchronize().map_err(|e| failed("event", e))?;
        let ms = start.elapsed_ms(&end).map_err(|e| failed("event", e))?;
        Ok((2 * n * 4 * reps) as f64 / (f64::from(ms) / 1e3))
    }

    /// The KV budget and bytes in use, once the first cache row was written.
    pub fn kv_usage(&self) -> Option<(usize, usize)> {
        lock(&self.budget).as_ref().map(|b| (b.limit(), b.used()))
    }

    fn errored(&self) -> bool {
        self.halted.load(Ordering::Relaxed) || lock(&self.error).is_some()
    }

    fn record(&self, e: DeviceError) {
        let mut slot = lock(&self.error);
        if slot.is_none() {
            tracing::warn!("CUDA backend: {e}");
            *slot = Some(e);
        }
    }

    fn steps(&self) -> std::sync::MutexGuard<'_, Steps> {
        lock(&self.steps)
    }

    /// Gives up the step's capture or replay: operations do nothing until the step ends,
    /// and the model runs it again eagerly.
    fn abandon(&self, why: &str) {
        self.steps().abandon(why);
        self.halted.store(true, Ordering::Relaxed);
    }

    /// How the step's operations run now.
    fn mode(&self) -> Mode {
        self.steps().mode
    }

    /// A buffer of no elements: what operations return after an error (and callers
    /// discard). It holds no memory, so making it never fails.
    fn empty(&self) -> CudaBuf {
        // SAFETY: a view of zero elements is never read or written.
        CudaBuf::F32(Arc::new(unsafe { Dev::view(&self.stream, 0, 0) }))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_gpu_the_backend_says_why_instead_of_panicking() {
        match unavailable() {
            Some(why) => {
                let err = Cuda::new(CudaOptions::default())
                    .err()
                    .map(|e| e.to_string());
                assert!(
                    err.as_deref().is_some_and(|e| e.contains(&why)),
                    "{err:?} does not say {why:?}"
                );
            }
            None => eprintln!("a GPU is present: the start-up refusal is not exercised here"),
        }
    }
}
