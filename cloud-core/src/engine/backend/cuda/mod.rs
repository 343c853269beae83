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
//!   drawn from pools sharing one byte budget; a sequence's cache of a layer is a table
//!   of block addresses, prefixes share blocks by reference, attention reads the blocks
//!   through the table. A step that does not fit is refused with
//!   [`DeviceError::CacheFull`] and leaves every cache as it was.
//! - A step's attention is one launch for all its sequences (each reading its own cache
//!   through its block table, kept in device memory), with each row's positions split
//!   across blocks and merged by the last of them when the step has few rows. MoE
//!   routing, the experts and greedy picks run on the device; a prompt's experts are
//!   cuBLAS GEMMs over the rows routed to each.
//! - Decode steps are captured into CUDA graphs and replayed ([`step`]).
//! - Errors are sticky per step: the first one is kept, later operations do nothing, and
//!   the model's forward pass returns it ([`Backend::take_error`]).

// The backend drives the GPU through cudarc's FFI-level calls (kernel launches, cuBLAS
// with mixed types, raw block addresses of the paged cache). Every `unsafe` block states
// the sizes it relies on.
#![allow(unsafe_code)]

pub mod step;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::cublas::{self, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig,
};
use half::bf16;

pub use step::GraphStats;
use step::{Captured, Dev, KArg, Mode, Pre, Region, Sig, Steps};

use super::{
    rope_parts, AttnShape, Backend, DeviceError, Projection, RopeLayout, RopeOf, Rotated, Weight,
};
use crate::engine::paged::{AllocError, BlockPool, Budget, ChunkSource, PagedRows};
use crate::engine::sampler::{Pick, Sampled, MAX_ALTERNATIVES};

/// Launches kernel `$name` of `$self` with the arguments in order (buffers by device
/// address, scalars of the kernel's parameter types); a failure is recorded. Each caller
/// passes buffers of the sizes its kernel indexes, checked just before.
macro_rules! launch {
    ($self:expr, $name:literal, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let mut words = [$( KArg::word(&$arg) ),*];
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

/// The kernels' CUDA C source.
pub const KERNELS: &str = include_str!("../cuda_kernels.cu");

/// Every kernel in [`KERNELS`].
pub const KERNEL_NAMES: &[&str] = &[
    "f32_to_bf16",
    "bf16_to_f32",
    "fill_uniform_bf16",
    "axpy",
    "add_bias",
    "rms_norm",
    "silu_mul",
    "gather_rows_f32",
    "gather_rows_bf16",
    "copy_cols",
    "add_rows_scaled",
    "mla_expand",
    "rope",
    "paged_write",
    "paged_read",
    "attention_batch",
    "sample_rows",
    "gemv_bf16",
    "gemv_swiglu",
    "gemv_bf16_norm",
    "gemv_bf16_rope",
    "gemv_bf16_norm_rope",
    "gemv_swiglu_norm",
    "moe_route",
    "moe_group",
    "moe_gate_up",
    "moe_down",
    "moe_combine",
];

/// Each kernel's `MAX_THREADS(n)` in [`KERNELS`] (a number, or a name `#define`d as
/// one): the most threads a block of it is launched with. Every kernel of
/// [`KERNEL_NAMES`] declares one.
pub fn max_threads() -> Result<HashMap<&'static str, u32>, String> {
    const MARK: &str = "__global__ void MAX_THREADS(";
    let value = |arg: &str| -> Option<u32> {
        arg.parse().ok().or_else(|| {
            let def = format!("#define {arg} ");
            let at = KERNELS.find(&def)? + def.len();
            KERNELS[at..].lines().next()?.trim().parse().ok()
        })
    };
    let mut bounds = HashMap::new();
    for (at, _) in KERNELS.match_indices(MARK) {
        let rest = &KERNELS[at + MARK.len()..];
        let (arg, rest) = rest.split_once(')').ok_or("an unclosed MAX_THREADS(")?;
        let name = rest.trim_start().split('(').next().unwrap_or("").trim();
        let Some(k) = KERNEL_NAMES.iter().find(|k| **k == name) else {
            return Err(format!("MAX_THREADS of an unknown kernel {name:?}"));
        };
        let n = value(arg.trim())
            .filter(|n| (1..=1024).contains(n))
            .ok_or_else(|| format!("{k}: MAX_THREADS({arg}) is not a block size"))?;
        bounds.insert(*k, n);
    }
    match KERNEL_NAMES.iter().find(|k| !bounds.contains_key(*k)) {
        Some(k) => Err(format!("kernel {k} declares no MAX_THREADS")),
        None => Ok(bounds),
    }
}

/// The most value dimensions the attention kernel handles per head (MLA's latent: 512).
pub const MAX_DV: usize = 512;

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

/// Where NVRTC finds `cuda_bf16.h`: `CUDA_INCLUDE`, else `$CUDA_HOME/include`, else
/// `/usr/local/cuda/include`.
pub fn include_path() -> String {
    if let Ok(p) = std::env::var("CUDA_INCLUDE") {
        return p;
    }
    if let Ok(home) = std::env::var("CUDA_HOME") {
        return format!("{home}/include");
    }
    "/usr/local/cuda/include".into()
}

/// Compiles [`KERNELS`] to PTX for `arch` (`sm_90`, say). Needs only NVRTC and the CUDA
/// headers, no device: CI checks the kernels compile this way.
pub fn compile(arch: &str) -> Result<cudarc::nvrtc::Ptx, String> {
    // SAFETY: only tries to open the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("no NVRTC library (libnvrtc) on this machine".into());
    }
    let arch: &'static str = Box::leak(arch.to_string().into_boxed_str());
    let opts = cudarc::nvrtc::CompileOptions {
        include_paths: vec![include_path()],
        arch: Some(arch),
        use_fast_math: Some(false),
        name: Some("cloud_core_kernels.cu".into()),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(KERNELS, opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => format!(
            "NVRTC could not compile the kernels for {arch} (headers from {}): {}",
            include_path(),
            log.to_string_lossy()
        ),
        other => format!("NVRTC: {other:?}"),
    })
}

/// [`compile`]'s PTX for `arch`, compiled once per process: every backend a process
/// starts (the tests start many, a server one per device) loads the same kernels, and
/// NVRTC takes seconds over them. A failure is not kept: the next backend tries again.
fn compiled(arch: &str) -> Result<cudarc::nvrtc::Ptx, String> {
    static PTX: Mutex<Vec<(String, cudarc::nvrtc::Ptx)>> = Mutex::new(Vec::new());
    let mut done = lock(&PTX);
    if let Some((_, ptx)) = done.iter().find(|(a, _)| a == arch) {
        return Ok(ptx.clone());
    }
    let ptx = compile(arch)?;
    #[cfg(test)]
    COMPILES.fetch_add(1, Ordering::Relaxed);
    done.push((arch.to_string(), ptx.clone()));
    Ok(ptx)
}

/// How many times [`compiled`] compiled (the tests check that it keeps what it compiled).
#[cfg(test)]
static COMPILES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

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
    /// Blocks per device allocation of a pool.
    pub blocks_per_chunk: usize,
    /// Capture decode steps into CUDA graphs and replay them ([`step`]).
    pub graphs: bool,
    /// Initial bytes of the graphed steps' arena and of their staging area (each doubles,
    /// dropping the graphs made so far, when a step needs more).
    pub graph_memory: (usize, usize),
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            device: 0,
            kv_cache_bytes: None,
            reserve: 2 << 30,
            block_rows: 16,
            blocks_per_chunk: 256,
            graphs: true,
            graph_memory: (64 << 20, 1 << 20),
        }
    }
}

/// Device memory for KV pools (chunks of the paged cache).
pub struct DeviceChunks {
    stream: Arc<CudaStream>,
    /// Set while a step is captured: a chunk allocated then would belong to the graph.
    capturing: Arc<AtomicBool>,
}

/// Why a KV chunk was not allocated while a step was being captured.
const REFUSED_IN_CAPTURE: &str = "not while a step is captured";

impl ChunkSource for DeviceChunks {
    type Chunk = CudaSlice<u8>;

    fn alloc(&self, bytes: usize) -> Result<(CudaSlice<u8>, u64), String> {
        if self.capturing.load(Ordering::Relaxed) {
            return Err(REFUSED_IN_CAPTURE.into());
        }
        let chunk = self
            .stream
            .alloc_zeros::<u8>(bytes)
            .map_err(|e| e.to_string())?;
        let base = {
            let (ptr, _sync) = chunk.device_ptr(&self.stream);
            ptr
        };
        Ok((chunk, base))
    }
}

type Pool = BlockPool<DeviceChunks>;

/// A buffer of the CUDA backend.
#[derive(Clone)]
pub enum CudaBuf {
    /// f32 values (activations, norms, biases).
    F32(Arc<Dev<f32>>),
    /// bf16 values (weight matrices).
    Bf16(Arc<Dev<bf16>>),
    /// KV cache rows, bf16, in blocks.
    Paged(KvRows),
}

/// One sequence's cache of one layer: bf16 rows of width `cols` in blocks, and the block
/// table mirrored in device memory for the kernels (brought up to date, only where it
/// changed, before each use).
#[derive(Clone)]
pub struct KvRows {
    rows: PagedRows<DeviceChunks>,
    cols: usize,
    table: DeviceTable,
}

/// The device copy of a block table (a clone starts without one: it may diverge).
#[derive(Default)]
struct DeviceTable {
    buf: Option<CudaSlice<u64>>,
    mirror: Vec<u64>,
}

impl Clone for DeviceTable {
    fn clone(&self) -> Self {
        DeviceTable::default()
    }
}

impl KvRows {
    fn buf(rows: PagedRows<DeviceChunks>, cols: usize) -> CudaBuf {
        CudaBuf::Paged(KvRows {
            rows,
            cols,
            table: DeviceTable::default(),
        })
    }
}

struct Kernels {
    _module: Arc<CudaModule>,
    f: HashMap<&'static str, Kernel>,
}

struct Kernel {
    func: CudaFunction,
    /// The most threads a block of it is launched with (`MAX_THREADS`).
    max_threads: u32,
    /// Its static shared memory per block.
    shared: u32,
}

/// Shared memory a block may have without opting in per kernel (every architecture).
const SHARED_PER_BLOCK: u32 = 48 << 10;

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
    /// `attention_batch`'s tickets, one per (row, head) of a split launch (fewer than
    /// `2 · sms`: more pairs are not split), zero between launches.
    tickets: CudaSlice<u32>,
    error: Mutex<Option<DeviceError>>,
    budget: Mutex<Option<Arc<Budget>>>,
    pools: Mutex<HashMap<usize, Arc<Pool>>>,
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

/// Events before each operation of the steps being profiled, and the totals so far.
#[derive(Default)]
struct Profiler {
    marks: Vec<(String, CudaEvent)>,
    /// Per operation: milliseconds and calls.
    totals: HashMap<String, (f64, u64)>,
    steps: u64,
}

/// What profiled steps spent per operation ([`Cuda::take_profile`]).
#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// Steps profiled.
    pub steps: u64,
    /// Per operation (a kernel's name, `gemm_bf16`, `sgemm_batched`, `memcpy`), the
    /// longest first.
    pub ops: Vec<ProfiledOp>,
}

/// One operation's share of a [`Profile`].
#[derive(Clone, Debug)]
pub struct ProfiledOp {
    /// The operation.
    pub op: String,
    /// Calls over all the steps.
    pub calls: u64,
    /// Milliseconds over all the steps, from its event to the next operation's.
    pub ms: f64,
}

/// The most rows `gemv_bf16` takes (more go through cuBLAS): `GEMV_ROWS` of the kernels.
pub const GEMV_ROWS: usize = 8;
/// Warps per (row, head) block of `attention_batch`: `ATT_WARPS` of the kernels.
pub const ATT_WARPS: usize = 8;
/// The most experts the MoE kernels route among: `MOE_MAX_EXPERTS` of the kernels.
pub const MOE_MAX_EXPERTS: usize = 512;
/// The most threads of a `sample_rows` block: `SAMPLE_MAX_THREADS` of the kernels.
pub const SAMPLE_MAX_THREADS: usize = 1024;
/// The most ranges `attention_batch` splits a row's positions into.
const ATT_MAX_SPLITS: usize = 32;
// The last block of a split (row, head) keeps a weight per split in its block's shared
// output rows (ATT_WARPS · dv floats, dv ≥ 4).
const _: () = assert!(ATT_MAX_SPLITS <= ATT_WARPS * 4);
/// The most sequences a captured step holds.
const MAX_GRAPH_BATCH: usize = 512;
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

/// Whether rows `x[m, k]` go through the GEMV kernels: at most [`GEMV_ROWS`] of them, `k`
/// a multiple of 8 and `x` 16-byte aligned (their 16-byte loads).
/// Which projections' outputs to rotate, and how (see [`Backend::norm_linear_parts_rope`]).
type PartsRope<'a> = (&'a [Option<(usize, usize)>], RopeOf<'a, CudaBuf>);

/// RoPE folded into a `gemv_bf16_rope` launch: the rows' positions (device), the tables'
/// addresses, the rotated dimensions, the layout, and per part (head_dim, offset), head_dim
/// 0 for a part not rotated.
struct FoldedRope {
    pos: Dev<u32>,
    cos: u64,
    sin: u64,
    rot: i32,
    interleaved: i32,
    parts: [(i32, i32); 3],
}

fn gemv_fits(x: &Dev<f32>, m: usize, k: usize) -> bool {
    m <= GEMV_ROWS && k.is_multiple_of(8) && x.ptr().is_multiple_of(16)
}

/// The RMSNorm a GEMV launch folds in for rows `x[m, k]`: `Some(None)` without one,
/// `Some(Some(..))` for f32 weights of `k` (16-byte aligned, for vector loads) on rows
/// the GEMV takes, `None` where it cannot be folded (the caller norms first).
fn folded_norm<'a>(
    norm: Option<(&'a CudaBuf, f32)>,
    x: &Dev<f32>,
    m: usize,
    k: usize,
) -> Option<Option<(&'a Dev<f32>, f32)>> {
    match norm {
        None => Some(None),
        Some((CudaBuf::F32(w), eps))
            if w.len() == k && w.ptr().is_multiple_of(16) && gemv_fits(x, m, k) =>
        {
            Some(Some((w.as_ref(), eps)))
        }
        Some(_) => None,
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
            f.insert(
                *k,
                Kernel {
                    func,
                    max_threads: bound,
                    shared: u32::try_from(shared).unwrap_or(0),
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
            tickets,
            error: Mutex::new(None),
            budget: Mutex::new(None),
            pools: Mutex::new(HashMap::new()),
            expert_tables: Mutex::new(HashMap::new()),
            steps: Mutex::new(Steps::default()),
            halted: AtomicBool::new(false),
            capturing: Arc::new(AtomicBool::new(false)),
            profiling: AtomicBool::new(false),
            profiler: Mutex::new(Profiler::default()),
        })
    }

    /// The device's name.
    pub fn device_name(&self) -> &str {
        &self.name
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

    /// Memory for `n` elements that the step's kernels fill before reading: a view of
    /// the arena in a graphed step, else from the stream's pool. `None`: the error (or
    /// the abandoned capture) is recorded.
    fn tmp<T: DeviceRepr>(&self, n: usize, what: &str) -> Option<Dev<T>> {
        let bytes = n * std::mem::size_of::<T>();
        {
            let mut st = self.steps();
            if st.graphed() {
                let got = st.arena.as_mut().and_then(|a| a.take(bytes));
                return match got {
                    Some(ptr) => {
                        st.sig.add(&[ptr, bytes as u64]);
                        // SAFETY: the arena outlives the step, and nothing else is handed
                        // these bytes during it.
                        Some(unsafe { Dev::view(&self.stream, ptr, n) })
                    }
                    None => {
                        let size = st
                            .arena
                            .as_ref()
                            .map_or(self.opts.graph_memory.0, |a| a.size);
                        st.want_arena = st.want_arena.max(size * 2);
                        drop(st);
                        self.abandon("the step arena is full");
                        None
                    }
                };
            }
        }
        if n == 0 {
            // SAFETY: a view of zero elements is never read or written.
            return Some(unsafe { Dev::view(&self.stream, 0, 0) });
        }
        // SAFETY: every caller's kernels write what they later read.
        match unsafe { self.stream.alloc::<T>(n) } {
            Ok(s) => Some(Dev::owned(s)),
            Err(e) => {
                let free = self.memory().map(|m| m.0).unwrap_or(0);
                self.record(
                    if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                        DeviceError::OutOfMemory {
                            what: what.to_string(),
                            bytes,
                            free,
                        }
                    } else {
                        failed(what, e)
                    },
                );
                None
            }
        }
    }

    /// A step's host data on the device (ids, positions, metadata): staged and uploaded
    /// with the rest of the step's in a graphed step, else copied now.
    fn meta<T: DeviceRepr>(&self, data: &[T], what: &str) -> Option<Dev<T>> {
        let bytes = std::mem::size_of_val(data);
        {
            let mut st = self.steps();
            if st.graphed() {
                let got = st.staged.as_mut().and_then(|r| {
                    let ptr = r.take(bytes)?;
                    Some((ptr, (ptr - r.base) as usize))
                });
                return match got {
                    Some((ptr, at)) => {
                        if st.staging.len() < at + bytes {
                            st.staging.resize(at + bytes, 0);
                        }
                        // SAFETY: `data` is `bytes` bytes of plain values.
                        let raw = unsafe {
                            std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), bytes)
                        };
                        st.staging[at..at + bytes].copy_from_slice(raw);
                        st.sig.add(&[ptr, bytes as u64]);
                        // SAFETY: the staging region outlives the step and is written only
                        // by the upload before the graph runs.
                        Some(unsafe { Dev::view(&self.stream, ptr, data.len()) })
                    }
                    None => {
                        let size = st
                            .staged
                            .as_ref()
                            .map_or(self.opts.graph_memory.1, |r| r.size);
                        st.want_staged = st.want_staged.max(size * 2);
                        drop(st);
                        self.abandon("the step's staging area is full");
                        None
                    }
                };
            }
        }
        self.htod(data, what)
    }

    /// [`Cuda::meta`] of optional data: `Some(None)` for none (a null pointer to the
    /// kernel), `None` when the upload failed (recorded).
    fn meta_or_null<T: DeviceRepr>(
        &self,
        data: Option<&[T]>,
        what: &str,
    ) -> Option<Option<Dev<T>>> {
        match data {
            Some(d) => self.meta(d, what).map(Some),
            None => Some(None),
        }
    }

    /// Host data copied to memory of its own now (weights, expert tables: kept past the
    /// step). Not while a step is captured: the capture is given up.
    fn htod<T: DeviceRepr>(&self, data: &[T], what: &str) -> Option<Dev<T>> {
        if self.mode() == Mode::Capture {
            self.abandon(&format!("{what} uploaded during a capture"));
            return None;
        }
        if data.is_empty() {
            // SAFETY: a view of zero elements is never read or written.
            return Some(unsafe { Dev::view(&self.stream, 0, 0) });
        }
        match self.stream.clone_htod(data) {
            Ok(s) => Some(Dev::owned(s)),
            Err(e) => {
                self.record(failed(what, e));
                None
            }
        }
    }

    /// `x` as a buffer this step may write: itself when no one else holds it, else a copy.
    fn own<'a>(&self, x: &'a mut Arc<Dev<f32>>) -> Option<&'a mut Dev<f32>> {
        if Arc::get_mut(x).is_none() {
            let copy = self.tmp::<f32>(x.len(), "copy before writing")?;
            self.dtod(copy.ptr(), x.ptr(), x.len() * 4);
            *x = Arc::new(copy);
        }
        Arc::get_mut(x)
    }

    /// A device-to-device copy in the step (captured into its graph; skipped when the step
    /// is replayed).
    fn dtod(&self, dst: u64, src: u64, bytes: usize) {
        if bytes == 0 || !self.note("memcpy", &[&[dst, src, bytes as u64]]) {
            return;
        }
        // SAFETY: the callers' buffers hold `bytes` at both addresses.
        let r = unsafe {
            cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream())
        };
        self.check("device copy", r);
    }

    /// Work that must precede the step's kernels but not be part of its graph: queued
    /// while capturing, done now otherwise (a replayed step launches its graph last).
    fn before_step(&self, pre: Pre) {
        if self.mode() == Mode::Capture {
            self.steps().pre.push(pre);
            return;
        }
        self.run_pre(pre);
    }

    fn run_pre(&self, pre: Pre) {
        let r = match &pre {
            // SAFETY: the destinations are device tables and blocks sized for the copies
            // (see `table_of` and `grow_cache`); pageable host data is staged by the
            // driver before the call returns.
            Pre::Htod { dst, data } => unsafe {
                cudarc::driver::result::memcpy_htod_async(*dst, data, self.stream.cu_stream())
            },
            Pre::Dtod { dst, src, bytes } => unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    *dst,
                    *src,
                    *bytes,
                    self.stream.cu_stream(),
                )
            },
        };
        self.check("cache tables", r);
    }

    /// Notes an operation (its name and words) in the step's fingerprint; `false` when
    /// it must not be issued (the step is being replayed).
    fn note(&self, what: &str, words: &[&[u64]]) -> bool {
        let mut st = self.steps();
        match st.mode {
            Mode::Eager | Mode::Flushed => {
                if st.mode == Mode::Flushed {
                    st.after_flush = true;
                }
                drop(st);
                self.mark(what);
                true
            }
            Mode::Capture | Mode::Replay => {
                st.sig.add_str(what);
                for w in words {
                    st.sig.add(w);
                }
                st.mode == Mode::Capture
            }
        }
    }

    /// Launches a kernel with its arguments as words (see [`KArg`]).
    fn launch_words(&self, name: &'static str, cfg: LaunchConfig, words: &mut [u64]) {
        let (g, b) = (cfg.grid_dim, cfg.block_dim);
        let shape = [
            u64::from(g.0),
            u64::from(g.1),
            u64::from(g.2),
            u64::from(b.0),
            u64::from(b.1),
            u64::from(b.2),
            u64::from(cfg.shared_mem_bytes),
        ];
        let threads = b.0 * b.1 * b.2;
        let k = &self.kernels.f[name];
        if threads > k.max_threads {
            return self.record(failed(
                name,
                format!(
                    "a block of {threads} threads; the kernel is launched with at most {}",
                    k.max_threads
                ),
            ));
        }
        if k.shared + cfg.shared_mem_bytes > SHARED_PER_BLOCK {
            return self.record(failed(
                name,
                format!(
                    "{} bytes of shared memory per block; at most {SHARED_PER_BLOCK}",
                    k.shared + cfg.shared_mem_bytes
                ),
            ));
        }
        if !self.note(name, &[&shape, words]) {
            return;
        }
        let mut params: Vec<*mut std::ffi::c_void> = words
            .iter_mut()
            .map(|w| (w as *mut u64).cast::<std::ffi::c_void>())
            .collect();
        if let Err(e) = self.ctx.bind_to_thread() {
            return self.record(failed("context", e));
        }
        // SAFETY: the kernel's parameters are the words in order (device addresses and
        // scalars of the parameter types, little-endian), sized by each caller.
        let r = unsafe {
            cudarc::driver::result::launch_kernel(
                k.func.cu_function(),
                cfg.grid_dim,
                cfg.block_dim,
                cfg.shared_mem_bytes,
                self.stream.cu_stream(),
                &mut params,
            )
        };
        self.check(name, r);
    }

    fn check(&self, op: &str, r: Result<(), cudarc::driver::DriverError>) {
        if let Err(e) = r {
            self.record(failed(op, e));
        }
    }

    /// The f32 slice of a buffer (recording an error for any other kind).
    fn f32_of<'a>(&self, b: &'a CudaBuf, op: &str) -> Option<&'a Dev<f32>> {
        match b {
            CudaBuf::F32(s) => Some(s),
            _ => {
                self.record(failed(op, "expected an f32 activation buffer"));
                None
            }
        }
    }

    fn pool(&self, cols: usize) -> Option<Arc<Pool>> {
        let budget = {
            let mut b = lock(&self.budget);
            if b.is_none() {
                let limit = match self.opts.kv_cache_bytes {
                    Some(n) => n,
                    None => {
                        let free = self.memory().map(|m| m.0).unwrap_or(0);
                        (free.saturating_sub(self.opts.reserve) as f64 * 0.9) as usize
                    }
                };
                tracing::info!(
                    "KV cache budget: {:.2} GiB",
                    limit as f64 / (1u64 << 30) as f64
                );
                *b = Some(Budget::new(limit));
            }
            b.clone()?
        };
        let mut pools = lock(&self.pools);
        Some(
            pools
                .entry(cols)
                .or_insert_with(|| {
                    BlockPool::new(
                        DeviceChunks {
                            stream: self.stream.clone(),
                            capturing: self.capturing.clone(),
                        },
                        budget,
                        self.opts.block_rows,
                        cols * 2,
                        self.opts.blocks_per_chunk,
                    )
                })
                .clone(),
        )
    }

    /// `y[m, n] = x[m, k] · wᵀ (+ y)` with `w` bf16 `[n, k]` on cuBLAS: `x` is rounded
    /// to bf16, the product accumulates in f32 and is written (`beta` 0) or added (`beta`
    /// 1) as f32 to `y`.
    #[allow(clippy::too_many_arguments)]
    fn gemm_bf16(
        &self,
        x: &Dev<f32>,
        m: usize,
        w: &Dev<bf16>,
        n: usize,
        k: usize,
        y: &Dev<f32>,
        beta: f32,
    ) -> Option<()> {
        let xb = self.to_bf16(x)?;
        self.gemm_bf16_in(&xb, m, w, n, k, y, beta)
    }

    /// `x` rounded to bf16 (the input cuBLAS's bf16 GEMMs take).
    fn to_bf16(&self, x: &Dev<f32>) -> Option<Dev<bf16>> {
        let mut xb = self.tmp::<bf16>(x.len(), "linear input")?;
        let total = x.len() as i64;
        launch!(self, "f32_to_bf16", grid(x.len()), x, &mut xb, &total);
        Some(xb)
    }

    /// [`Cuda::gemm_bf16`] from an input already in bf16.
    #[allow(clippy::too_many_arguments)]
    fn gemm_bf16_in(
        &self,
        xb: &Dev<bf16>,
        m: usize,
        w: &Dev<bf16>,
        n: usize,
        k: usize,
        y: &Dev<f32>,
        beta: f32,
    ) -> Option<()> {
        self.gemm_raw(w.ptr(), xb.ptr(), y.ptr(), m, n, k, beta)
    }

    /// [`Cuda::gemm_bf16_in`] on device addresses: `w` holds `n·k` bf16, `xp` `m·k` bf16
    /// and `yp` `m·n` f32 (the callers' buffers, or rows of them).
    #[allow(clippy::too_many_arguments)]
    fn gemm_raw(
        &self,
        wp: u64,
        xp: u64,
        yp: u64,
        m: usize,
        n: usize,
        k: usize,
        beta: f32,
    ) -> Option<()> {
        let words = [
            wp,
            xp,
            yp,
            n as u64,
            m as u64,
            k as u64,
            u64::from(beta.to_bits()),
        ];
        if !self.note("gemm_bf16", &[&words]) {
            return Some(());
        }
        let alpha = 1.0f32;
        // cuBLAS calls do not make the context current themselves (the engine runs on
        // another thread than the one that created the backend).
        if let Err(e) = self.ctx.bind_to_thread() {
            self.record(failed("context", e));
            return None;
        }
        // Column-major view: yᵀ[n, m] = (w as k×n)ᵀ · (x as k×m).
        // SAFETY: w holds n·k, x m·k and y m·n elements (checked by the caller).
        let r = unsafe {
            cublas::result::gemm_ex(
                *self.blas.handle(),
                cublas::sys::cublasOperation_t::CUBLAS_OP_T,
                cublas::sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                (&alpha) as *const f32 as *const _,
                wp as *const _,
                cublas::sys::cudaDataType_t::CUDA_R_16BF,
                k as i32,
                xp as *const _,
                cublas::sys::cudaDataType_t::CUDA_R_16BF,
                k as i32,
                (&beta) as *const f32 as *const _,
                yp as *mut _,
                cublas::sys::cudaDataType_t::CUDA_R_32F,
                n as i32,
                cublas::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        if let Err(e) = r {
            self.record(failed("cuBLAS bf16 GEMM", e));
            return None;
        }
        Some(())
    }

    /// `rope` of one tensor, or of two of the same rows in one launch.
    #[allow(clippy::too_many_arguments)]
    fn rope_of(
        &self,
        a: Rotated<'_, CudaBuf>,
        b: Option<Rotated<'_, CudaBuf>>,
        rot_dim: usize,
        positions: &[usize],
        cos: &CudaBuf,
        sin: &CudaBuf,
        layout: RopeLayout,
    ) {
        if self.errored() {
            return;
        }
        let (CudaBuf::F32(c), CudaBuf::F32(s)) = (cos, sin) else {
            return self.record(failed("rope", "expected f32 tables"));
        };
        let half = rot_dim / 2;
        let max_pos = c.len().checked_div(half).unwrap_or(0);
        if positions.iter().any(|p| *p >= max_pos) {
            return self.record(failed("rope", "positions out of range"));
        }
        // Each tensor: its rows owned for writing, (pointer, heads, head_dim, offset).
        let mut each = [(0u64, 0i32, 0i32, 0i32); 2];
        for (slot, (x, heads, head_dim, offset)) in each.iter_mut().zip(std::iter::once(a).chain(b))
        {
            let CudaBuf::F32(xs) = x else {
                return self.record(failed("rope", "expected f32 buffers"));
            };
            if xs.len() != positions.len() * heads * head_dim || offset + rot_dim > head_dim {
                return self.record(failed("rope", "shapes out of range"));
            }
            let Some(xs) = self.own(xs) else {
                return;
            };
            *slot = (xs.ptr(), heads as i32, head_dim as i32, offset as i32);
        }
        let [(x0, h0, d0, o0), (x1, h1, d1, o1)] = each;
        if positions.is_empty() || half == 0 || h0 + h1 == 0 {
            return;
        }
        let pos: Vec<u32> = positions.iter().map(|p| *p as u32).collect();
        let Some(pos) = self.meta(&pos, "positions") else {
            return;
        };
        let (rot, il) = (rot_dim as i32, i32::from(layout == RopeLayout::Interleaved));
        let threads = (half.div_ceil(32) * 32).min(256) as u32;
        launch!(
            self,
            "rope",
            per_row(positions.len() * (h0 + h1) as usize, threads),
            &x0,
            &h0,
            &d0,
            &o0,
            &x1,
            &h1,
            &d1,
            &o1,
            &pos,
            c.as_ref(),
            s.as_ref(),
            &rot,
            &il
        );
    }

    /// Up to three projections of the same rows, of `rms_norm(x)` with `norm`, and with
    /// `rope` the parts it names rotated (see [`Backend::norm_linear_parts_rope`]): one
    /// `gemv_bf16(_norm)(_rope)` launch for a few rows, else cuBLAS per part (x rounded
    /// to bf16 once), else (any other layout) one projection at a time, then the `rope`
    /// kernel.
    fn project_parts(
        &self,
        x: &CudaBuf,
        norm: Option<(&CudaBuf, f32)>,
        m: usize,
        k: usize,
        parts: &[Projection<'_, CudaBuf>],
        rope: Option<PartsRope<'_>>,
    ) -> Vec<CudaBuf> {
        let (mut outs, rotated) = self.project_parts_once(x, norm, m, k, parts, rope);
        if let (false, Some((rotate, r))) = (rotated, rope) {
            rope_parts(self, &mut outs, parts, rotate, r);
        }
        outs
    }

    /// [`Cuda::project_parts`] but for the `rope` kernel: the outputs, and whether they
    /// are rotated already (in the GEMV's pass).
    fn project_parts_once(
        &self,
        x: &CudaBuf,
        norm: Option<(&CudaBuf, f32)>,
        m: usize,
        k: usize,
        parts: &[Projection<'_, CudaBuf>],
        rope: Option<PartsRope<'_>>,
    ) -> (Vec<CudaBuf>, bool) {
        let each = || match norm {
            Some((w, eps)) => {
                self.project_parts_once(&self.rms_norm(x, w, eps), None, m, k, parts, rope)
            }
            None => (
                parts
                    .iter()
                    .map(|(w, b, n)| self.project(x, m, w, *n, k, *b, None))
                    .collect(),
                false,
            ),
        };
        if self.errored() || parts.is_empty() || parts.len() > 3 || m == 0 {
            return each();
        }
        let Some(xs) = self.f32_of(x, "linear") else {
            return each();
        };
        // Every part a bf16 [n, k] weight with a bias of n, or none.
        let mut ws = Vec::with_capacity(3);
        let mut bs = Vec::with_capacity(3);
        for (w, b, n) in parts {
            let CudaBuf::Bf16(w) = w else {
                return each();
            };
            let b = match b {
                None => None,
                Some(CudaBuf::F32(b)) if b.len() == *n => Some(b.as_ref()),
                Some(_) => return each(),
            };
            if w.len() != n * k || *n == 0 {
                return each();
            }
            ws.push(w.as_ref());
            bs.push(b);
        }
        if xs.len() != m * k {
            return each();
        }
        let Some(norm) = folded_norm(norm, xs, m, k) else {
            return each();
        };
        if !gemv_fits(xs, m, k) {
            // cuBLAS: x rounded to bf16 once for every part.
            let Some(xb) = self.to_bf16(xs) else {
                return each();
            };
            let mut outs = Vec::with_capacity(parts.len());
            for ((w, b), (_, _, n)) in ws.iter().zip(&bs).zip(parts) {
                let Some(mut y) = self.tmp::<f32>(m * n, "linear output") else {
                    return each();
                };
                if self.gemm_bf16_in(&xb, m, w, *n, k, &y, 0.0).is_none() {
                    return each();
                }
                if let Some(b) = b {
                    self.bias_rows(&mut y, b);
                }
                outs.push(CudaBuf::F32(Arc::new(y)));
            }
            return (outs, false);
        }
        let mut ys = Vec::with_capacity(3);
        for (_, _, n) in parts {
            match self.tmp::<f32>(m * n, "linear output") {
                Some(y) => ys.push(y),
                None => return each(),
            }
        }
        let gemv_parts: Vec<(u64, u64, u64, usize)> = ws
            .iter()
            .zip(&bs)
            .zip(&ys)
            .zip(parts)
            .map(|(((w, b), y), p)| (w.ptr(), b.map_or(0, |b| b.ptr()), y.ptr(), p.2))
            .collect();
        let folded = rope.and_then(|(rotate, r)| self.folded_rope(rotate, r, parts, m));
        let rotated = folded.is_some();
        self.gemv(xs, m, k, &gemv_parts, false, norm, folded);
        (
            ys.into_iter().map(|y| CudaBuf::F32(Arc::new(y))).collect(),
            rotated,
        )
    }

    /// The RoPE a GEMV launch folds in for `parts` of rows at `r.positions` (see
    /// `gemv_bf16_rope`): its kernel arguments, or `None` where it cannot be folded (the
    /// `rope` kernel runs after).
    fn folded_rope(
        &self,
        rotate: &[Option<(usize, usize)>],
        r: RopeOf<'_, CudaBuf>,
        parts: &[Projection<'_, CudaBuf>],
        m: usize,
    ) -> Option<FoldedRope> {
        let (CudaBuf::F32(c), CudaBuf::F32(s)) = (r.cos, r.sin) else {
            return None;
        };
        let half = r.rot_dim / 2;
        let max_pos = c.len().checked_div(half)?;
        if half == 0
            || !r.rot_dim.is_multiple_of(2)
            || s.len() != c.len()
            || r.positions.len() != m
            || r.positions.iter().any(|p| *p >= max_pos)
            || rotate.len() > parts.len()
        {
            return None;
        }
        let mut each = [(0i32, 0i32); 3];
        for ((slot, rot), (_, _, n)) in each.iter_mut().zip(rotate).zip(parts) {
            if let Some((d, off)) = *rot {
                if d == 0 || !n.is_multiple_of(d) || off + r.rot_dim > d {
                    return None;
                }
                *slot = (d as i32, off as i32);
            }
        }
        if each.iter().all(|(d, _)| *d == 0) {
            return None;
        }
        let pos: Vec<u32> = r.positions.iter().map(|p| *p as u32).collect();
        let pos = self.meta(&pos, "positions")?;
        Some(FoldedRope {
            pos,
            cos: c.ptr(),
            sin: s.ptr(),
            rot: r.rot_dim as i32,
            interleaved: i32::from(r.layout == RopeLayout::Interleaved),
            parts: each,
        })
    }

    /// SwiGLU's `silu(x·gateᵀ) · (x·upᵀ)` of `rms_norm(x)` with `norm`: one
    /// `gemv_swiglu(_norm)` launch for a few rows, else two cuBLAS GEMMs and `silu_mul`.
    #[allow(clippy::too_many_arguments)]
    fn gate_up_of(
        &self,
        x: &CudaBuf,
        norm: Option<(&CudaBuf, f32)>,
        m: usize,
        gate: &CudaBuf,
        up: &CudaBuf,
        n: usize,
        k: usize,
    ) -> CudaBuf {
        let separate = || match norm {
            Some((w, eps)) => self.gate_up_of(&self.rms_norm(x, w, eps), None, m, gate, up, n, k),
            None => self.silu_mul(&self.linear(x, m, gate, n, k), &self.linear(x, m, up, n, k)),
        };
        if self.errored() {
            return self.empty();
        }
        let (CudaBuf::F32(xs), CudaBuf::Bf16(g), CudaBuf::Bf16(u)) = (x, gate, up) else {
            return separate();
        };
        if xs.len() != m * k || g.len() != n * k || u.len() != n * k || m == 0 || n == 0 {
            return separate();
        }
        let Some(norm) = folded_norm(norm, xs, m, k) else {
            return separate();
        };
        if !gemv_fits(xs, m, k) {
            // cuBLAS: x rounded to bf16 once for both.
            let Some(xb) = self.to_bf16(xs) else {
                return self.empty();
            };
            let (Some(gy), Some(uy)) =
                (self.tmp::<f32>(m * n, "gate"), self.tmp::<f32>(m * n, "up"))
            else {
                return self.empty();
            };
            if self.gemm_bf16_in(&xb, m, g, n, k, &gy, 0.0).is_none()
                || self.gemm_bf16_in(&xb, m, u, n, k, &uy, 0.0).is_none()
            {
                return self.empty();
            }
            return self.silu_mul(&CudaBuf::F32(Arc::new(gy)), &CudaBuf::F32(Arc::new(uy)));
        }
        let Some(mut y) = self.tmp::<f32>(m * n, "gate_up") else {
            return self.empty();
        };
        let (mi, ni, ki) = (m as i32, n as i32, k as i32);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            "gemv_swiglu" or "gemv_swiglu_norm" with norm,
            cfg,
            xs.as_ref(),
            g.as_ref(),
            u.as_ref(),
            &mut y,
            &mi,
            &ni,
            &ki
        );
        CudaBuf::F32(Arc::new(y))
    }

    /// `x[m, k] · wᵀ` for a weight `w[n, k]`, plus `bias[n]` if given: into a new buffer,
    /// or added to `acc[m, n]`. A few rows (decode) with a bf16 weight go through
    /// `gemv_bf16` (the weight read once, bias or residual added in the same pass); more
    /// rows through cuBLAS.
    #[allow(clippy::too_many_arguments)]
    fn project(
        &self,
        x: &CudaBuf,
        m: usize,
        w: &CudaBuf,
        n: usize,
        k: usize,
        bias: Option<&CudaBuf>,
        acc: Option<&mut CudaBuf>,
    ) -> CudaBuf {
        if self.errored() {
            return self.empty();
        }
        let Some(xs) = self.f32_of(x, "linear") else {
            return self.empty();
        };
        if xs.len() != m * k || self.len(w) != n * k {
            self.record(failed(
                "linear",
                format!(
                    "shapes: x has {} elements for [{m}, {k}], w {} for [{n}, {k}]",
                    xs.len(),
                    self.len(w)
                ),
            ));
            return self.empty();
        }
        let bias = match bias {
            None => None,
            Some(CudaBuf::F32(b)) if b.len() == n => Some(b.as_ref()),
            Some(_) => {
                self.record(failed("linear", format!("the bias is not {n} values")));
                return self.empty();
            }
        };
        let acc = match acc {
            None => None,
            Some(CudaBuf::F32(a)) if a.len() == m * n => match self.own(a) {
                Some(a) => Some(a),
                None => return self.empty(),
            },
            Some(_) => {
                self.record(failed("linear", format!("the sum is not [{m}, {n}]")));
                return self.empty();
            }
        };
        if m == 0 || n == 0 {
            return self.empty();
        }
        let mut fresh = None;
        if acc.is_none() {
            fresh = self.tmp::<f32>(m * n, "linear output");
            if fresh.is_none() {
                return self.empty();
            }
        }
        let accumulate = acc.is_some();
        let y: &mut Dev<f32> = match (acc, fresh.as_mut()) {
            (Some(a), _) => a,
            (None, Some(f)) => f,
            (None, None) => return self.empty(),
        };
        match w {
            CudaBuf::Bf16(ws) if gemv_fits(xs, m, k) => {
                let part = (ws.ptr(), bias.map_or(0, |b| b.ptr()), y.ptr(), n);
                self.gemv(xs, m, k, &[part], accumulate, None, None);
            }
            CudaBuf::Bf16(ws) => {
                let beta = if accumulate { 1.0 } else { 0.0 };
                if self.gemm_bf16(xs, m, ws, n, k, y, beta).is_none() {
                    return self.empty();
                }
                if let Some(b) = bias {
                    self.bias_rows(y, b);
                }
            }
            CudaBuf::F32(ws) => {
                let beta = if accumulate { 1.0 } else { 0.0 };
                self.sgemm_batched(true, (n, m, k), ws, (k, 0), xs, (k, 0), y, (n, 0), 1, beta);
                if let Some(b) = bias {
                    self.bias_rows(y, b);
                }
            }
            CudaBuf::Paged(..) => {
                self.record(failed("linear", "a cache is not a weight"));
                return self.empty();
            }
        }
        match fresh {
            Some(f) => CudaBuf::F32(Arc::new(f)),
            None => self.empty(),
        }
    }

    /// `gemv_bf16` over up to three projections `(weight, bias or 0, output, n)` of the
    /// rows `x[m, k]` (see [`gemv_fits`]), added to the outputs with `accumulate`.
    #[allow(clippy::too_many_arguments)]
    fn gemv(
        &self,
        x: &Dev<f32>,
        m: usize,
        k: usize,
        parts: &[(u64, u64, u64, usize)],
        accumulate: bool,
        norm: Option<(&Dev<f32>, f32)>,
        rope: Option<FoldedRope>,
    ) {
        let part = |i: usize| parts.get(i).copied().unwrap_or((0, 0, 0, 0));
        let [(w0, b0, y0, n0), (w1, b1, y1, n1), (w2, b2, y2, n2)] = [part(0), part(1), part(2)];
        // A warp per output, or per rotated pair of outputs.
        let warps = |n: usize, i: usize| match &rope {
            Some(r) if r.parts[i].0 > 0 => {
                let d = r.parts[i].0 as usize;
                n / d * (d - r.rot as usize / 2)
            }
            _ => n,
        };
        let cfg = LaunchConfig {
            grid_dim: (
                (warps(n0, 0) + warps(n1, 1) + warps(n2, 2)).div_ceil(8) as u32,
                1,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // gemv_bf16's parameters, then the RoPE's (`_rope`), then the norm's (`_norm`).
        let mut words: Vec<u64> = [x.ptr(), w0, w1, w2, b0, b1, b2, y0, y1, y2]
            .into_iter()
            .chain([n0, n1, n2, m, k].map(|v| (v as i32).word()))
            .chain([i32::from(accumulate).word()])
            .collect();
        if let Some(r) = &rope {
            words.extend([
                r.pos.ptr(),
                r.cos,
                r.sin,
                r.rot.word(),
                r.interleaved.word(),
            ]);
            words.extend(r.parts.iter().flat_map(|(d, off)| [d.word(), off.word()]));
        }
        if let Some((nw, eps)) = norm {
            words.extend([nw.ptr(), eps.word()]);
        }
        let name = match (rope.is_some(), norm.is_some()) {
            (false, false) => "gemv_bf16",
            (false, true) => "gemv_bf16_norm",
            (true, false) => "gemv_bf16_rope",
            (true, true) => "gemv_bf16_norm_rope",
        };
        self.launch_words(name, cfg, &mut words);
    }

    /// Adds `bias[n]` to every row of `x[·, n]`.
    fn bias_rows(&self, x: &mut Dev<f32>, bias: &Dev<f32>) {
        let (len, total, n) = (x.len(), x.len() as i64, bias.len() as i32);
        launch!(self, "add_bias", grid(len), &mut *x, bias, &total, &n);
    }

    /// f32 GEMM, strided over `batch` (per-head products), in cuBLAS's column-major terms:
    /// `c = a·b` (`beta` 0) or `c += a·b` (`beta` 1).
    #[allow(clippy::too_many_arguments)]
    fn sgemm_batched(
        &self,
        transa: bool,
        (m, n, k): (usize, usize, usize),
        a: &Dev<f32>,
        (lda, stride_a): (usize, usize),
        b: &Dev<f32>,
        (ldb, stride_b): (usize, usize),
        c: &mut Dev<f32>,
        (ldc, stride_c): (usize, usize),
        batch: usize,
        beta: f32,
    ) {
        let (ap, bp, cp) = (a.ptr(), b.ptr(), c.ptr());
        let words = [
            ap,
            bp,
            cp,
            u64::from(transa),
            m as u64,
            n as u64,
            k as u64,
            lda as u64,
            stride_a as u64,
            ldb as u64,
            stride_b as u64,
            ldc as u64,
            stride_c as u64,
            batch as u64,
            u64::from(beta.to_bits()),
        ];
        if !self.note("sgemm_batched", &[&words]) {
            return;
        }
        if let Err(e) = self.ctx.bind_to_thread() {
            return self.record(failed("context", e));
        }
        let op = |t: bool| {
            if t {
                cublas::sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                cublas::sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let alpha = 1.0f32;
        // SAFETY: the caller sized a, b and c for these strides and leading dimensions.
        let r = unsafe {
            cublas::result::sgemm_strided_batched(
                *self.blas.handle(),
                op(transa),
                op(false),
                m as i32,
                n as i32,
                k as i32,
                &alpha,
                ap as *const f32,
                lda as i32,
                stride_a as i64,
                bp as *const f32,
                ldb as i32,
                stride_b as i64,
                &beta,
                cp as *mut f32,
                ldc as i32,
                stride_c as i64,
                batch as i32,
            )
        };
        if let Err(e) = r {
            self.record(failed("cuBLAS f32 GEMM", e));
        }
    }

    /// The address tables of a layer's experts (`None` unless every matrix is bf16).
    fn expert_tables(&self, experts: &[[&CudaBuf; 3]]) -> Option<Arc<[Dev<u64>; 3]>> {
        let key = bf16_addr(experts.first()?[0])?;
        if let Some(t) = lock(&self.expert_tables).get(&key) {
            return Some(t.clone());
        }
        let cols = expert_addrs(experts)?;
        let tables = Arc::new([
            self.htod(&cols[0], "expert table")?,
            self.htod(&cols[1], "expert table")?,
            self.htod(&cols[2], "expert table")?,
        ]);
        lock(&self.expert_tables).insert(key, tables.clone());
        Some(tables)
    }

    /// The routed experts' SwiGLU MLPs for a prompt's tokens on cuBLAS: the rows of every
    /// slot's token gathered in slot order (grouped by expert) and rounded to bf16, then
    /// for each expert with rows one GEMM each for its gate, up and down projections.
    /// `y[slot]`: the expert's output for the slot's token, unweighted. Reads the
    /// experts' row counts back, which a prompt's step (never captured) may.
    fn experts_by_gemm(
        &self,
        x: &Dev<f32>,
        experts: &[[&CudaBuf; 3]],
        count: &Dev<i32>,
        slot_tok: &Dev<i32>,
        (pairs, hidden, inter): (usize, usize, usize),
        y: &mut Dev<f32>,
    ) -> Option<()> {
        let Some(mats) = expert_addrs(experts) else {
            self.record(failed("moe", "expert weights are not bf16"));
            return None;
        };
        let counts = match self.stream.clone_dtoh::<i32, CudaSlice<i32>>(count) {
            Ok(v) => v,
            Err(e) => {
                self.record(failed("moe counts", e));
                return None;
            }
        };
        if counts.iter().any(|&c| c < 0)
            || counts.iter().map(|&c| c as usize).sum::<usize>() != pairs
        {
            self.record(failed(
                "moe",
                format!("expert counts {counts:?} for {pairs} slots"),
            ));
            return None;
        }
        let mut rows = self.tmp::<f32>(pairs * hidden, "moe rows")?;
        let hi = hidden as i32;
        launch!(
            self,
            "gather_rows_f32",
            per_row(pairs, 256),
            x,
            slot_tok,
            &mut rows,
            &hi
        );
        let xb = self.to_bf16(&rows)?;
        let gate = self.tmp::<f32>(pairs * inter, "moe gate")?;
        let up = self.tmp::<f32>(pairs * inter, "moe up")?;
        // Bytes per bf16 and per f32 element.
        let (bf, f) = (2u64, 4u64);
        let runs = || {
            counts
                .iter()
                .enumerate()
                .filter(|c| *c.1 > 0)
                .scan(0usize, |at, (e, &c)| {
                    let from = *at as u64;
                    *at += c as usize;
                    Some((e, from, c as usize))
                })
        };
        for (e, from, c) in runs() {
            let xr = xb.ptr() + from * hidden as u64 * bf;
            let at = from * inter as u64 * f;
            self.gemm_raw(mats[0][e], xr, gate.ptr() + at, c, inter, hidden, 0.0)?;
            self.gemm_raw(mats[1][e], xr, up.ptr() + at, c, inter, hidden, 0.0)?;
        }
        let mut act = self.tmp::<f32>(pairs * inter, "moe intermediate")?;
        let total = (pairs * inter) as i64;
        launch!(
            self,
            "silu_mul",
            grid(pairs * inter),
            &gate,
            &up,
            &mut act,
            &total
        );
        let hb = self.to_bf16(&act)?;
        for (e, from, c) in runs() {
            let hr = hb.ptr() + from * inter as u64 * bf;
            let yr = y.ptr() + from * hidden as u64 * f;
            self.gemm_raw(mats[2][e], hr, yr, c, hidden, inter, 0.0)?;
        }
        Some(())
    }

    /// Each row's pick, its log-softmax and its alternatives, on the device, by
    /// `sample_rows` (see [`Backend::pick_rows`]). Only the picks are copied back.
    fn picks(
        &self,
        x: &CudaBuf,
        cols: usize,
        allowed: Option<&[u32]>,
        seen: Option<&[u32]>,
        picks: &[Pick],
    ) -> Vec<Sampled> {
        if self.errored() {
            return Vec::new();
        }
        let Some(xs) = self.f32_of(x, "pick_rows") else {
            return Vec::new();
        };
        if cols == 0 || xs.len() % cols != 0 {
            self.record(failed("pick_rows", "rows are not whole"));
            return Vec::new();
        }
        let rows = xs.len() / cols;
        if rows == 0 {
            return Vec::new();
        }
        let bits_fit = |b: Option<&[u32]>| b.is_none_or(|b| b.len() == rows * cols.div_ceil(32));
        if !bits_fit(allowed) || !bits_fit(seen) || picks.len() != rows {
            self.record(failed(
                "pick_rows",
                "not one pick and one row of mask bits per row",
            ));
            return Vec::new();
        }
        let spec: Vec<u64> = picks.iter().flat_map(Pick::words).collect();
        let (Some(mask), Some(seen), Some(spec)) = (
            self.meta_or_null(allowed, "token mask"),
            self.meta_or_null(seen, "seen tokens"),
            self.meta(&spec, "sampling parameters"),
        ) else {
            return Vec::new();
        };
        // Token ids, log-probabilities and alternatives in one buffer, for one copy back;
        // room for the most alternatives whenever any are asked for, so that the step's
        // shape does not depend on how many.
        let stride = if picks.iter().any(|p| p.alternatives > 0) {
            MAX_ALTERNATIVES
        } else {
            0
        };
        let Some(mut out) = self.tmp::<u32>(2 * rows * (1 + stride), "pick_rows") else {
            return Vec::new();
        };
        let c = cols as i32;
        // SAFETY: `out` holds `rows` 4-byte values after the first `rows`, then
        // `2 * rows * stride`.
        let (lp, top) = unsafe {
            (
                Dev::<f32>::view(&self.stream, out.ptr() + 4 * rows as u64, rows),
                Dev::<u32>::view(&self.stream, out.ptr() + 8 * rows as u64, 2 * rows * stride),
            )
        };
        let top_ptr = if stride > 0 { top.ptr() } else { 0 };
        // About 16 values per thread, up to the kernel's block.
        let threads = (cols / 16)
            .next_power_of_two()
            .clamp(32, SAMPLE_MAX_THREADS);
        let (mask_ptr, seen_ptr) = (
            mask.as_ref().map_or(0, Dev::ptr),
            seen.as_ref().map_or(0, Dev::ptr),
        );
        launch!(
            self,
            "sample_rows",
            per_row(rows, threads as u32),
            xs,
            &c,
            &mask_ptr,
            &seen_ptr,
            &spec,
            &mut out,
            &lp,
            &(stride as i32),
            &top_ptr
        );
        if !self.flush() {
            return Vec::new();
        }
        match self.stream.clone_dtoh::<u32, CudaSlice<u32>>(&out) {
            Ok(v) => (0..rows)
                .map(|i| {
                    let alt = &v[2 * rows + 2 * i * stride..];
                    let n = picks[i].alternatives.min(cols).min(stride);
                    Sampled {
                        token: v[i],
                        logprob: f32::from_bits(v[rows + i]),
                        top: (0..n)
                            .map(|j| (alt[2 * j], f32::from_bits(alt[2 * j + 1])))
                            .collect(),
                    }
                })
                .collect(),
            Err(e) => {
                self.record(failed("pick_rows", e));
                Vec::new()
            }
        }
    }

    /// Device memory of its own, kept past the step (block tables). Not while a step is
    /// captured: the capture is given up.
    fn alloc_owned<T: DeviceRepr>(&self, n: usize, what: &str) -> Option<CudaSlice<T>> {
        if self.mode() == Mode::Capture {
            self.abandon(&format!("{what} allocated during a capture"));
            return None;
        }
        // SAFETY: every caller writes what it later reads.
        match unsafe { self.stream.alloc::<T>(n.max(1)) } {
            Ok(s) => Some(s),
            Err(e) => {
                let free = self.memory().map(|m| m.0).unwrap_or(0);
                self.record(DeviceError::OutOfMemory {
                    what: format!("{what} ({e})"),
                    bytes: n * std::mem::size_of::<T>(),
                    free,
                });
                None
            }
        }
    }

    /// How steps ran so far: captured, replayed, eager, abandoned.
    pub fn graph_stats(&self) -> GraphStats {
        self.steps().stats
    }

    /// Times every operation of the steps that follow, by events recorded on the stream
    /// before each one (so each step runs eagerly, without graphs, and a little slower),
    /// until [`Cuda::take_profile`]. An operation's time runs to the next one's event, so
    /// it includes any wait of the device for the host's next launch.
    pub fn set_profiling(&self, on: bool) {
        lock(&self.profiler).marks.clear();
        self.profiling.store(on, Ordering::Relaxed);
    }

    /// What the profiled steps spent per operation since profiling began (the longest
    /// first), and ends profiling.
    pub fn take_profile(&self) -> Profile {
        let mut p = lock(&self.profiler);
        let mut ops: Vec<ProfiledOp> = p
            .totals
            .drain()
            .map(|(op, (ms, calls))| ProfiledOp { op, calls, ms })
            .collect();
        ops.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.op.cmp(&b.op)));
        let steps = std::mem::take(&mut p.steps);
        self.profiling.store(false, Ordering::Relaxed);
        p.marks.clear();
        Profile { steps, ops }
    }

    /// Records an event before the operation `what`, when profiling.
    fn mark(&self, what: &str) {
        use cudarc::driver::sys::CUevent_flags;
        if !self.profiling.load(Ordering::Relaxed) {
            return;
        }
        let mut p = lock(&self.profiler);
        match self
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        {
            Ok(e) => p.marks.push((what.to_string(), e)),
            Err(e) => {
                self.profiling.store(false, Ordering::Relaxed);
                drop(p);
                self.record(failed("profile event", e));
            }
        }
    }

    /// At the end of a profiled step: the time from each operation's event to the next
    /// one's (the last one's to an event recorded now) is that operation's.
    fn close_profile(&self) {
        use cudarc::driver::sys::CUevent_flags;
        if !self.profiling.load(Ordering::Relaxed) {
            return;
        }
        let mut p = lock(&self.profiler);
        if p.marks.is_empty() {
            return;
        }
        let end = match self
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        {
            Ok(e) => e,
            Err(e) => {
                self.profiling.store(false, Ordering::Relaxed);
                drop(p);
                return self.record(failed("profile event", e));
            }
        };
        let marks = std::mem::take(&mut p.marks);
        for (i, (op, start)) in marks.iter().enumerate() {
            let next = marks.get(i + 1).map_or(&end, |m| &m.1);
            match start.elapsed_ms(next) {
                Ok(ms) => {
                    let t = p.totals.entry(op.clone()).or_default();
                    t.0 += f64::from(ms);
                    t.1 += 1;
                }
                Err(e) => {
                    self.profiling.store(false, Ordering::Relaxed);
                    drop(p);
                    return self.record(failed("profile event", e));
                }
            }
        }
        p.steps += 1;
    }

    /// Makes the arena and the staging area at least as large as the last step wanted
    /// (a new one invalidates every graph, which point into the old) and empties them.
    fn regions(&self, st: &mut Steps) -> Result<(), DeviceError> {
        let make = |want: usize, have: Option<&Region>, base: usize| {
            let size = want.max(have.map_or(base, |r| r.size)).max(base);
            (have.is_none_or(|r| r.size < size)).then_some(size)
        };
        let (arena, staged) = self.opts.graph_memory;
        let new_arena = make(st.want_arena, st.arena.as_ref(), arena.max(step::ALIGN));
        let new_staged = make(st.want_staged, st.staged.as_ref(), staged.max(step::ALIGN));
        if new_arena.is_some() || new_staged.is_some() {
            st.graphs.clear();
        }
        let alloc = |size: usize| -> Result<Region, DeviceError> {
            // SAFETY: the step's kernels write arena memory before reading it; the
            // staging region is written by the upload before the graph runs.
            let mem =
                unsafe { self.stream.alloc::<u8>(size) }.map_err(|e| DeviceError::OutOfMemory {
                    what: format!("the CUDA graph arena ({e})"),
                    bytes: size,
                    free: self.memory().map(|m| m.0).unwrap_or(0),
                })?;
            let base = mem.device_ptr(&self.stream).0;
            Ok(Region {
                mem,
                base,
                size,
                used: 0,
            })
        };
        if let Some(size) = new_arena {
            st.arena = None;
            st.arena = Some(alloc(size)?);
        }
        if let Some(size) = new_staged {
            st.staged = None;
            st.staged = Some(alloc(size)?);
        }
        for r in [st.arena.as_mut(), st.staged.as_mut()]
            .into_iter()
            .flatten()
        {
            r.used = 0;
        }
        Ok(())
    }

    /// Ends a graphed step's recording and launches its graph, after the work that must
    /// precede it and the upload of the staged metadata. `false`: the step has no results
    /// (an error, or its capture or replay was given up). Eager steps: `true`.
    fn flush(&self) -> bool {
        let mut st = self.steps();
        let mode = st.mode;
        if !matches!(mode, Mode::Capture | Mode::Replay) {
            return true;
        }
        st.mode = Mode::Flushed;
        let Some(key) = st.key else {
            return false;
        };
        let mut graph = None;
        if mode == Mode::Capture {
            self.capturing.store(false, Ordering::Relaxed);
            let ended = self
                .stream
                .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
            if self.halted.load(Ordering::Relaxed) {
                return false;
            }
            let err = lock(&self.error).clone();
            match (ended, err) {
                (Ok(Some(g)), None) => graph = Some(g),
                (_, Some(DeviceError::CacheFull(_))) => return false,
                (ended, err) => {
                    // The capture itself may be what failed: no graphs for this shape,
                    // and the step runs again eagerly (where a real error shows again).
                    let why = match (ended, err) {
                        (_, Some(e)) => e.to_string(),
                        (Err(e), None) => e.to_string(),
                        (Ok(_), None) => "the capture recorded nothing".into(),
                    };
                    tracing::warn!("CUDA graphs off for {} sequences: {why}", key.0);
                    lock(&self.error).take();
                    st.never.insert(key);
                    st.abandon(why);
                    self.halted.store(true, Ordering::Relaxed);
                    return false;
                }
            }
        } else if self.halted.load(Ordering::Relaxed) || lock(&self.error).is_some() {
            return false;
        }
        for pre in std::mem::take(&mut st.pre) {
            self.run_pre(pre);
        }
        let used = st.staged.as_ref().map_or(0, |r| r.used);
        if used > 0 {
            let base = st.staged.as_ref().map_or(0, |r| r.base);
            // SAFETY: the staging region holds `used` bytes; the host bytes are pageable
            // and copied by the driver before the call returns.
            let r = unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    base,
                    &st.staging[..used],
                    self.stream.cu_stream(),
                )
            };
            self.check("graph metadata", r);
        }
        let launched = match graph {
            Some(g) => {
                let r = g.launch();
                let sig = st.sig;
                st.graphs.insert(key, Captured { graph: g, sig });
                st.stats.captured += 1;
                r
            }
            None => {
                let sig = st.sig;
                let r = st
                    .graphs
                    .get(&key)
                    .filter(|c| c.sig == sig)
                    .map(|c| c.graph.launch());
                match r {
                    Some(r) => {
                        st.stats.replayed += 1;
                        r
                    }
                    _ => {
                        st.graphs.remove(&key);
                        st.abandon("the step differs from its capture");
                        self.halted.store(true, Ordering::Relaxed);
                        return false;
                    }
                }
            }
        };
        drop(st);
        self.check("graph launch", launched);
        !self.errored()
    }

    /// Positions per KV block.
    fn block_rows(&self) -> usize {
        self.opts.block_rows.max(1)
    }

    /// Makes room for `n` more rows of width `cols` in `cache` (a cache is created on the
    /// first rows), queues the copy-on-write copies, and returns the new rows' addresses.
    fn grow_cache(&self, cache: &mut CudaBuf, cols: usize, n: usize) -> Option<Vec<u64>> {
        if let CudaBuf::F32(s) = cache {
            if !s.is_empty() {
                self.record(failed("append_rows", "not a cache"));
                return None;
            }
            let pool = self.pool(cols)?;
            *cache = KvRows::buf(PagedRows::new(pool), cols);
        }
        let CudaBuf::Paged(p) = cache else {
            self.record(failed("append_rows", "not a cache"));
            return None;
        };
        if p.cols != cols {
            self.record(failed("append_rows", "row width changed"));
            return None;
        }
        let (copies, addrs) = match p.rows.grow(n) {
            Ok(x) => x,
            Err(AllocError::Full(f)) => {
                self.record(DeviceError::CacheFull(f));
                return None;
            }
            Err(AllocError::Device { message, .. }) if message == REFUSED_IN_CAPTURE => {
                self.abandon("a new KV cache chunk is wanted during the capture");
                return None;
            }
            Err(AllocError::Device { bytes, message }) => {
                let free = self.memory().map(|m| m.0).unwrap_or(0);
                self.record(DeviceError::OutOfMemory {
                    what: format!("a KV cache chunk ({message})"),
                    bytes,
                    free,
                });
                return None;
            }
        };
        let row_bytes = cols * 2;
        for cp in copies {
            // SAFETY: both addresses are blocks of this pool, each `block_rows` rows of
            // `row_bytes` bytes, and `cp.rows` is at most `block_rows`.
            let r = unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    cp.to,
                    cp.from,
                    cp.rows * row_bytes,
                    self.stream.cu_stream(),
                )
            };
            self.check("cache copy-on-write", r);
        }
        Some(addrs)
    }

    /// The device address of a cache's block table, uploading what changed since its last
    /// use (new blocks, a block replaced by its private copy).
    fn table_of(&self, cache: &mut CudaBuf) -> Option<u64> {
        let CudaBuf::Paged(p) = cache else {
            self.record(failed("attention", "not a cache"));
            return None;
        };
        let t = &mut p.table;
        let len = p.rows.block_addrs().len();
        let fits = t.buf.as_ref().is_some_and(|b| b.len() >= len);
        // Most steps change nothing (a block holds 16 positions): compare in place.
        let same = if fits {
            t.mirror
                .iter()
                .zip(p.rows.block_addrs())
                .take_while(|(a, b)| **a == *b)
                .count()
        } else {
            let cap = len.next_power_of_two().max(16);
            t.buf = Some(self.alloc_owned::<u64>(cap, "block table")?);
            0
        };
        let base = t.buf.as_ref()?.device_ptr(&self.stream).0;
        if same < len || t.mirror.len() != len {
            t.mirror.truncate(same);
            t.mirror.extend(p.rows.block_addrs().skip(same));
            if same < len {
                let data: Vec<u8> = t.mirror[same..]
                    .iter()
                    .flat_map(|a| a.to_le_bytes())
                    .collect();
                self.before_step(Pre::Htod {
                    dst: base + 8 * same as u64,
                    data,
                });
            }
        }
        Some(base)
    }

    /// Launches `attention_batch` over the rows described by `meta` (see the kernel),
    /// with each row's positions split across enough blocks to give every
    /// multiprocessor two when the step has few (row, head) pairs, and the splits merged
    /// by the same launch.
    /// The split depends on the step's shape alone (not on the cache lengths, which the
    /// kernel reads from `meta`), so a captured step replays with longer caches.
    /// `fresh`: the step's key and value rows, which the same launch appends to the
    /// caches (`None`: the caches hold them already).
    #[allow(clippy::too_many_arguments)]
    fn attention_launch(
        &self,
        q: &CudaSlice<f32>,
        meta: &CudaSlice<u64>,
        n: usize,
        t: usize,
        out: &mut CudaSlice<f32>,
        s: AttnShape,
        (vcols, vhead): (usize, usize),
        fresh: Option<(&Dev<f32>, &Dev<f32>)>,
    ) {
        const WARPS: usize = ATT_WARPS;
        let pairs = t * s.h;
        // More than one split only for fewer than 2 · sms pairs: `tickets` has a slot
        // for each.
        let splits = (2 * self.sms).div_ceil(pairs).clamp(1, ATT_MAX_SPLITS);
        debug_assert!(splits == 1 || pairs < self.tickets.len());
        let cfg = LaunchConfig {
            grid_dim: (pairs as u32, splits as u32, 1),
            block_dim: ((WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: ((s.dk + 2 * WARPS + WARPS * s.dv) * 4) as u32,
        };
        let (ni, hh, hki, dki, dvi, vci, vhi, br) = (
            n as i32,
            s.h as i32,
            s.hk as i32,
            s.dk as i32,
            s.dv as i32,
            vcols as i32,
            vhead as i32,
            self.block_rows() as i32,
        );
        // The splits' partial results, when there is more than one (kept to the end of
        // this function, past the launch, as the stream orders it).
        let part = if splits > 1 {
            match self.tmp::<f32>(pairs * splits * (s.dv + 2), "attention splits") {
                Some(p) => Some(p),
                None => return,
            }
        } else {
            None
        };
        let part_ptr = part.as_ref().map_or(0, Dev::ptr);
        let (knew, vnew) = fresh.map_or((0, 0), |(k, v)| (k.ptr(), v.ptr()));
        launch!(
            self,
            "attention_batch",
            cfg,
            q,
            meta,
            &ni,
            out,
            &part_ptr,
            &self.tickets,
            &hh,
            &hki,
            &dki,
            &dvi,
            &vci,
            &vhi,
            &s.scale,
            &br,
            &knew,
            &vnew
        );
    }

    /// A paged cache's rows as f32, `[rows, cols]`.
    fn read_paged(&self, p: &PagedRows<DeviceChunks>, cols: usize) -> Option<Dev<f32>> {
        let rows = p.rows();
        let mut out = self.tmp::<f32>(rows * cols, "cache read")?;
        if rows == 0 {
            return Some(out);
        }
        let table = self.meta(&p.table(), "block table")?;
        let (br, c, from) = (p.pool().block_rows() as i32, cols as i32, 0i32);
        launch!(
            self,
            "paged_read",
            per_row(rows, 128),
            &table,
            &br,
            &c,
            &from,
            &mut out
        );
        Some(out)
    }
}

/// Every operation allocates its outputs from the device's stream-ordered pool; by
/// default the pool returns freed memory to the driver at every synchronisation, and the
/// next step maps it again. Keep it instead (it is reused at once).
fn keep_freed_memory(ctx: &CudaContext) {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold: u64 = u64::MAX;
    // SAFETY: the context is current on this thread (just created), the pool handle is
    // written by the driver, and the attribute takes a pointer to a u64.
    let r = unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .and_then(|()| {
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut threshold) as *mut u64 as *mut std::ffi::c_void,
                )
                .result()
            })
    };
    if let Err(e) = r {
        tracing::warn!("CUDA memory pool release threshold not set: {e}");
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Backend for Cuda {
    type Buf = CudaBuf;

    fn upload(&self, data: &[f32]) -> CudaBuf {
        if self.errored() {
            return self.empty();
        }
        match self.meta(data, "upload") {
            Some(s) => CudaBuf::F32(Arc::new(s)),
            None => self.empty(),
        }
    }

    fn download(&self, b: &CudaBuf) -> Vec<f32> {
        if self.errored() {
            return Vec::new();
        }
        if !self.flush() {
            return Vec::new();
        }
        let r = match b {
            CudaBuf::F32(s) => self.stream.clone_dtoh::<f32, CudaSlice<f32>>(s),
            CudaBuf::Bf16(s) => self
                .stream
                .clone_dtoh::<bf16, CudaSlice<bf16>>(s)
                .map(|v| v.into_iter().map(bf16::to_f32).collect()),
            CudaBuf::Paged(p) => match self.read_paged(&p.rows, p.cols) {
                Some(s) => self.stream.clone_dtoh::<f32, CudaSlice<f32>>(&s),
                None => return Vec::new(),
            },
        };
        match r {
            Ok(v) => v,
            Err(e) => {
                self.record(failed("download", e));
                Vec::new()
            }
        }
    }

    fn len(&self, b: &CudaBuf) -> usize {
        match b {
            CudaBuf::F32(s) => s.len(),
            CudaBuf::Bf16(s) => s.len(),
            CudaBuf::Paged(p) => p.rows.rows() * p.cols,
        }
    }

    fn wants_bf16_weights(&self) -> bool {
        true
    }

    fn upload_weight(&self, w: Weight<'_>, shape: &[usize]) -> CudaBuf {
        if self.errored() {
            return self.empty();
        }
        let matrix = shape.len() == 2;
        match (w, matrix) {
            (Weight::Bf16(v), true) => match self.htod(v, "weight upload") {
                Some(s) => CudaBuf::Bf16(Arc::new(s)),
                None => self.empty(),
            },
            (Weight::F32(v), true) => {
                let v: Vec<bf16> = v.iter().map(|x| bf16::from_f32(*x)).collect();
                match self.htod(&v, "weight upload") {
                    Some(s) => CudaBuf::Bf16(Arc::new(s)),
                    None => self.empty(),
                }
            }
            (Weight::F32(v), false) => self.upload(v),
            (Weight::Bf16(v), false) => {
                self.upload(&v.iter().map(|x| x.to_f32()).collect::<Vec<_>>())
            }
        }
    }

    fn random_weight(&self, shape: &[usize], amp: f32, seed: u64) -> Option<CudaBuf> {
        if self.errored() {
            return Some(self.empty());
        }
        let n: usize = shape.iter().product();
        // SAFETY: the fill kernel writes all n elements.
        let mut y = match unsafe { self.stream.alloc::<bf16>(n) } {
            Ok(s) => s,
            Err(e) => {
                let free = self.memory().map(|m| m.0).unwrap_or(0);
                self.record(DeviceError::OutOfMemory {
                    what: format!("a random weight {shape:?} ({e})"),
                    bytes: n * 2,
                    free,
                });
                return Some(self.empty());
            }
        };
        let total = n as i64;
        launch!(
            self,
            "fill_uniform_bf16",
            grid(n),
            &mut y,
            &total,
            &seed,
            &amp
        );
        Some(CudaBuf::Bf16(Arc::new(Dev::owned(y))))
    }

    fn pick_rows(
        &self,
        x: &CudaBuf,
        cols: usize,
        allowed: Option<&[u32]>,
        seen: Option<&[u32]>,
        picks: &[Pick],
    ) -> Vec<Sampled> {
        self.picks(x, cols, allowed, seen, picks)
    }

    fn moe_routed(
        &self,
        x: &CudaBuf,
        t: usize,
        logits: &CudaBuf,
        bias: Option<&CudaBuf>,
        experts: &[[&CudaBuf; 3]],
        hidden: usize,
        inter: usize,
        moe: &crate::engine::config::MoeConfig,
    ) -> Option<CudaBuf> {
        use crate::engine::config::{ScoringFunc, TopkMethod};
        let n = experts.len();
        let k = moe.num_experts_per_tok;
        let groups = moe.n_group.max(1);
        // What the kernels handle; anything else goes the host's way.
        if n == 0
            || n > MOE_MAX_EXPERTS
            || groups > 64
            || !n.is_multiple_of(groups)
            || k == 0
            || k > n
            || !hidden.is_multiple_of(8)
            || !inter.is_multiple_of(8)
        {
            return None;
        }
        if self.errored() {
            return Some(self.empty());
        }
        let tables = self.expert_tables(experts)?;
        let (Some(xs), Some(ls)) = (self.f32_of(x, "moe"), self.f32_of(logits, "moe")) else {
            return Some(self.empty());
        };
        if xs.len() != t * hidden || ls.len() != t * n {
            self.record(failed("moe", "shapes"));
            return Some(self.empty());
        }
        let Some(mut out) = self.tmp::<f32>(t * hidden, "moe output") else {
            return Some(self.empty());
        };
        if t == 0 {
            return Some(CudaBuf::F32(Arc::new(out)));
        }
        let pairs = t * k;
        let (
            Some(mut ids),
            Some(mut w),
            Some(mut count),
            Some(mut start),
            Some(mut slot_tok),
            Some(mut slot_w),
            Some(mut slot_of),
            Some(mut y),
        ) = (
            self.tmp::<i32>(pairs, "moe routes"),
            self.tmp::<f32>(pairs, "moe weights"),
            self.tmp::<i32>(n, "moe counts"),
            self.tmp::<i32>(n, "moe starts"),
            self.tmp::<i32>(pairs, "moe slots"),
            self.tmp::<f32>(pairs, "moe slots"),
            self.tmp::<i32>(pairs, "moe slots"),
            self.tmp::<f32>(pairs * hidden, "moe expert outputs"),
        )
        else {
            return Some(self.empty());
        };
        let (ti, ni, ki) = (t as i32, n as i32, k as i32);
        let scoring = i32::from(moe.scoring_func == ScoringFunc::Sigmoid);
        let method = match moe.topk_method {
            TopkMethod::Greedy => 0i32,
            TopkMethod::GroupLimitedGreedy => 1,
            TopkMethod::NoauxTc => 2,
        };
        let (gi, tg, norm, scale) = (
            groups as i32,
            moe.topk_group as i32,
            i32::from(moe.norm_topk_prob),
            moe.routed_scaling_factor as f32,
        );
        let route_cfg = LaunchConfig {
            grid_dim: (t.div_ceil(64) as u32, 1, 1),
            block_dim: (64, 1, 1),
            shared_mem_bytes: 0,
        };
        match bias {
            Some(CudaBuf::F32(b)) if b.len() == n => {
                launch!(
                    self,
                    "moe_route",
                    route_cfg,
                    ls,
                    b.as_ref(),
                    &ti,
                    &ni,
                    &ki,
                    &scoring,
                    &method,
                    &gi,
                    &tg,
                    &norm,
                    &scale,
                    &mut ids,
                    &mut w
                )
            }
            _ => {
                let null = 0u64;
                launch!(
                    self,
                    "moe_route",
                    route_cfg,
                    ls,
                    &null,
                    &ti,
                    &ni,
                    &ki,
                    &scoring,
                    &method,
                    &gi,
                    &tg,
                    &norm,
                    &scale,
                    &mut ids,
                    &mut w
                )
            }
        }
        let pi = pairs as i32;
        launch!(
            self,
            "moe_group",
            per_row(1, MOE_MAX_EXPERTS as u32),
            &ids,
            &w,
            &pi,
            &ki,
            &ni,
            &mut count,
            &mut start,
            &mut slot_tok,
            &mut slot_w,
            &mut slot_of
        );
        // A prompt's tokens (enough rows per expert for tensor cores): one cuBLAS GEMM per
        // expert and projection. A decode step (captured into graphs, and its eager run
        // computed as its replays are): the expert kernels, which read each weight row
        // once for all of an expert's rows.
        let grouped = pairs >= 2 * n && self.mode() == Mode::Eager && !self.steps().decode;
        if grouped {
            let shape = (pairs, hidden, inter);
            if self
                .experts_by_gemm(xs, experts, &count, &slot_tok, shape, &mut y)
                .is_none()
            {
                return Some(self.empty());
            }
        } else {
            let Some(mut h) = self.tmp::<f32>(pairs * inter, "moe intermediate") else {
                return Some(self.empty());
            };
            const WARPS: usize = 8;
            let by_expert = |rows: usize| LaunchConfig {
                grid_dim: (n as u32, rows.div_ceil(WARPS) as u32, 1),
                block_dim: ((WARPS * 32) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let (hi, ii) = (hidden as i32, inter as i32);
            launch!(
                self,
                "moe_gate_up",
                by_expert(inter),
                xs,
                &tables[0],
                &tables[1],
                &count,
                &start,
                &slot_tok,
                &hi,
                &ii,
                &mut h
            );
            launch!(
                self,
                "moe_down",
                by_expert(hidden),
                &h,
                &tables[2],
                &count,
                &start,
                &hi,
                &ii,
                &mut y
            );
        }
        let hi = hidden as i32;
        launch!(
            self,
            "moe_combine",
            per_row(t, 256),
            &y,
            &slot_of,
            &slot_w,
            &ki,
            &hi,
            &mut out
        );
        Some(CudaBuf::F32(Arc::new(out)))
    }

    fn take_error(&self) -> Option<DeviceError> {
        self.flush();
        lock(&self.error).take()
    }

    fn begin_step(&self, lens: &[usize], out: u8, graphs: bool) {
        let mut st = self.steps();
        st.mode = Mode::Eager;
        st.key = None;
        st.sig = Sig::default();
        st.pre.clear();
        st.abandoned = None;
        st.after_flush = false;
        self.halted.store(false, Ordering::Relaxed);
        let key = (lens.len(), out);
        st.decode = !lens.is_empty() && lens.iter().all(|&l| l == 1);
        let decode = st.decode && lens.len() <= MAX_GRAPH_BATCH;
        let profiling = self.profiling.load(Ordering::Relaxed);
        if !(self.opts.graphs && graphs && decode && !profiling)
            || st.never.contains(&key)
            || self.errored()
        {
            st.stats.eager += 1;
            return;
        }
        // The first step of a shape runs eagerly: it creates what later steps reuse (KV
        // pools and chunks, expert tables, cuBLAS's state).
        if st.seen.insert(key) {
            st.stats.eager += 1;
            return;
        }
        if let Err(e) = self.regions(&mut st) {
            tracing::warn!("CUDA graphs off for {} sequences: {e}", key.0);
            st.never.insert(key);
            st.stats.eager += 1;
            return;
        }
        st.key = Some(key);
        if st.graphs.contains_key(&key) {
            st.mode = Mode::Replay;
            return;
        }
        use cudarc::driver::sys::CUstreamCaptureMode;
        // Thread-local mode: a call of this thread that cannot be captured (a synchronous
        // copy, an allocation) fails instead of being silently left out.
        match self
            .stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        {
            Ok(()) => {
                st.mode = Mode::Capture;
                self.capturing.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!("CUDA graphs off for {} sequences: capture: {e}", key.0);
                st.never.insert(key);
                st.key = None;
                st.stats.eager += 1;
            }
        }
    }

    fn end_step(&self) -> bool {
        self.flush();
        self.close_profile();
        let mut st = self.steps();
        let mut ok = st.abandoned.is_none();
        if st.after_flush {
            // The step read results back in its middle (and went on): no graph for it.
            if let Some(k) = st.key {
                st.graphs.remove(&k);
                st.never.insert(k);
                ok = false;
            }
        }
        if !ok {
            st.stats.abandoned += 1;
        }
        st.mode = Mode::Eager;
        st.key = None;
        st.pre.clear();
        st.abandoned = None;
        st.after_flush = false;
        self.halted.store(false, Ordering::Relaxed);
        ok
    }

    fn linear(&self, x: &CudaBuf, m: usize, w: &CudaBuf, n: usize, k: usize) -> CudaBuf {
        self.project(x, m, w, n, k, None, None)
    }

    fn linear_bias(
        &self,
        x: &CudaBuf,
        m: usize,
        w: &CudaBuf,
        bias: Option<&CudaBuf>,
        n: usize,
        k: usize,
    ) -> CudaBuf {
        self.project(x, m, w, n, k, bias, None)
    }

    fn linear_acc(
        &self,
        acc: &mut CudaBuf,
        x: &CudaBuf,
        m: usize,
        w: &CudaBuf,
        n: usize,
        k: usize,
    ) {
        self.project(x, m, w, n, k, None, Some(acc));
    }

    fn linear_parts(
        &self,
        x: &CudaBuf,
        m: usize,
        k: usize,
        parts: &[Projection<'_, CudaBuf>],
    ) -> Vec<CudaBuf> {
        self.project_parts(x, None, m, k, parts, None)
    }

    fn norm_linear_parts(
        &self,
        x: &CudaBuf,
        norm: (&CudaBuf, f32),
        m: usize,
        k: usize,
        parts: &[Projection<'_, CudaBuf>],
    ) -> Vec<CudaBuf> {
        self.project_parts(x, Some(norm), m, k, parts, None)
    }

    fn norm_linear_parts_rope(
        &self,
        x: &CudaBuf,
        norm: (&CudaBuf, f32),
        m: usize,
        k: usize,
        parts: &[Projection<'_, CudaBuf>],
        rotate: &[Option<(usize, usize)>],
        rope: RopeOf<'_, CudaBuf>,
    ) -> Vec<CudaBuf> {
        self.project_parts(x, Some(norm), m, k, parts, Some((rotate, rope)))
    }

    fn gate_up(
        &self,
        x: &CudaBuf,
        m: usize,
        gate: &CudaBuf,
        up: &CudaBuf,
        n: usize,
        k: usize,
    ) -> CudaBuf {
        self.gate_up_of(x, None, m, gate, up, n, k)
    }

    #[allow(clippy::too_many_arguments)]
    fn norm_gate_up(
        &self,
        x: &CudaBuf,
        norm: (&CudaBuf, f32),
        m: usize,
        gate: &CudaBuf,
        up: &CudaBuf,
        n: usize,
        k: usize,
    ) -> CudaBuf {
        self.gate_up_of(x, Some(norm), m, gate, up, n, k)
    }

    fn add_bias(&self, x: &mut CudaBuf, bias: &CudaBuf) {
        if self.errored() {
            return;
        }
        let n = self.len(bias);
        let (CudaBuf::F32(xs), CudaBuf::F32(bs)) = (x, bias) else {
            return self.record(failed("add_bias", "expected f32 buffers"));
        };
        if n == 0 || xs.len() % n != 0 {
            return self.record(failed("add_bias", "bias length does not divide the rows"));
        }
        let Some(xs) = self.own(xs) else {
            return;
        };
        let (len, total, n) = (xs.len(), xs.len() as i64, n as i32);
        launch!(self, "add_bias", grid(len), xs, bs.as_ref(), &total, &n);
    }

    fn add(&self, x: &mut CudaBuf, y: &CudaBuf) {
        self.add_scaled(x, y, 1.0);
    }

    fn add_scaled(&self, x: &mut CudaBuf, y: &CudaBuf, s: f32) {
        if self.errored() {
            return;
        }
        let (CudaBuf::F32(xs), CudaBuf::F32(ys)) = (x, y) else {
            return self.record(failed("add", "expected f32 buffers"));
        };
        if xs.len() != ys.len() {
            return self.record(failed("add", "lengths differ"));
        }
        let Some(xs) = self.own(xs) else {
            return;
        };
        let (len, n) = (xs.len(), xs.len() as i64);
        launch!(self, "axpy", grid(len), xs, ys.as_ref(), &n, &s);
    }

    fn rms_norm(&self, x: &CudaBuf, w: &CudaBuf, eps: f32) -> CudaBuf {
        if self.errored() {
            return self.empty();
        }
        let (CudaBuf::F32(xs), CudaBuf::F32(ws)) = (x, w) else {
            self.record(failed("rms_norm", "expected f32 buffers"));
            return self.empty();
        };
        let d = ws.len();
        if d == 0 || xs.len() % d != 0 {
            self.record(failed("rms_norm", "weight length does not divide the rows"));
            return self.empty();
        }
        let Some(mut y) = self.tmp::<f32>(xs.len(), "rms_norm") else {
            return self.empty();
        };
        let rows = xs.len() / d;
        if rows > 0 {
            let di = d as i32;
            launch!(
                self,
                "rms_norm",
                per_row(rows, 256),
                xs.as_ref(),
                ws.as_ref(),
                &mut y,
                &di,
                &eps
            );
        }
        CudaBuf::F32(Arc::new(y))
    }

    fn silu_mul(&self, gate: &CudaBuf, up: &CudaBuf) -> CudaBuf {
        if self.errored() {
            return self.empty();
        }
        let (CudaBuf::F32(g), CudaBuf::F32(u)) = (gate, up) else {
            self.record(failed("silu_mul", "expected f32 buffers"));
            return self.empty();
        };
        if g.len() != u.len() {
            self.record(failed("silu_mul", "lengths differ"));
            return self.empty();
        }
        let Some(mut y) = self.tmp::<f32>(g.len(), "silu_mul") else {
            return self.empty();
        };
        let n = g.len() as i64;
        if n > 0 {
            launch!(
                self,
                "silu_mul",
                grid(g.len()),
                g.as_ref(),
                u.as_ref(),
                &mut y,
                &n
            );
        }
        CudaBuf::F32(Arc::new(y))
    }

    fn gather_rows(&self, table: &CudaBuf, d: usize, ids: &[u32]) -> CudaBuf {
        if self.errored() {
            return self.empty();
        }
        let rows = self.len(table).checked_div(d).unwrap_or(0);
        if let Some(bad) = ids.iter().find(|i| **i as usize >= rows) {
            self.record(failed("gather_rows", format!("row {bad} of {rows}")));
            return self.empty();
        }
        let Some(mut y) = self.tmp::<f32>(ids.len() * d, "gather_rows") else {
            return self.empty();
        };
        if ids.is_empty() {
            return CudaBuf::F32(Arc::new(y));
        }
        let Some(idx) = self.meta(ids, "row ids") else {
            return self.empty();
        };
        let di = d as i32;
        match table {
            CudaBuf::F32(t) => launch!(
                self,
                "gather_rows_f32",
                per_row(ids.len(), 256),
                t.as_ref(),
                &idx,
                &mut y,
                &di
            ),
            CudaBuf::Bf16(t) => launch!(
                self,
                "gather_rows_bf16",
                per_row(ids.len(), 256),
                t.as_ref(),
                &idx,
                &mut y,
                &di
            ),
            CudaBuf::Paged(..) => {
                self.record(failed("gather_rows", "not from a cache"));
                return self.empty();
            }
        }
        CudaBuf::F32(Arc::new(y))
    }

    fn slice_cols(&self, x: &CudaBuf, cols: usize, from: usize, width: usize) -> CudaBuf {
        if self.errored() {
            return self.empty();
        }
        let Some(xs) = self.f32_of(x, "slice_cols") else {
            return self.empty();
        };
        if cols == 0 || xs.len() % cols != 0 || from + width > cols {
            self.record(failed("slice_cols", "columns out of range"));
            return self.empty();
        }
        let rows = xs.len() / cols;
        let Some(mut y) = self.tmp::<f32>(rows * width, "slice_cols") else {
            return self.empty();
        };
        if rows * width > 0 {
            let (xc, xf, yc, yf, w, r) = (
                cols as i32,
                from as i32,
                width as i32,
                0i32,
                width as i32,
                rows as i64,
            );
            launch!(
                self,
                "copy_cols",
                grid(rows * width),
                xs,
                &xc,
                &xf,
                &mut y,
                &yc,
                &yf,
                &w,
                &r
            );
        }
        CudaBuf::F32(Arc::new(y))
    }

    fn concat_cols(&self, a: &CudaBuf, ca: usize, b2: &CudaBuf, cb: usize) -> CudaBuf {
        if self.errored() {
            return self.empty();
        }
        let (Some(a), Some(bb)) = (
            self.f32_of(a, "concat_cols"),
            self.f32_of(b2, "concat_cols"),
        ) else {
            return self.empty();
        };
        if ca == 0 || cb == 0 || a.len() % ca != 0 || a.len() / ca != bb.len() / cb {
            self.record(failed("concat_cols", "row counts differ"));
            return self.empty();
        }
        let rows = a.len() / ca;
        let Some(mut y) = self.tmp::<f32>(rows * (ca + cb), "concat_cols") else {
            return self.empty();
        };
        if rows > 0 {
            let yc = (ca + cb) as i32;
            let r = rows as i64;
            for (src, c, at) in [(a, ca, 0usize), (bb, cb, ca)] {
                let (xc, xf, yf, w) = (c as i32, 0i32, at as i32, c as i32);
                launch!(
                    self,
                    "copy_cols",
                    grid(rows * c),
                    src,
                    &xc,
                    &xf,
                    &mut y,
                    &yc,
                    &yf,
                    &w,
                    &r
                );
            }
        }
        CudaBuf::F32(Arc::new(y))
    }

    fn add_rows_scaled(
        &self,
        dst: &mut CudaBuf,
        d: usize,
        src: &CudaBuf,
        rows: &[usize],
        weights: &[f32],
    ) {
        if self.errored() || rows.is_empty() {
            return;
        }
        let (CudaBuf::F32(ds), CudaBuf::F32(ss)) = (dst, src) else {
            return self.record(failed("add_rows_scaled", "expected f32 buffers"));
        };
        let n_dst = ds.len().checked_div(d).unwrap_or(0);
        if ss.len() != rows.len() * d
            || weights.len() != rows.len()
            || rows.iter().any(|r| *r >= n_dst)
        {
            return self.record(failed("add_rows_scaled", "rows out of range"));
        }
        let ids: Vec<u32> = rows.iter().map(|r| *r as u32).collect();
        let (Some(idx), Some(w)) = (self.meta(&ids, "rows"), self.meta(weights, "weights")) else {
            return;
        };
        let Some(ds) = self.own(ds) else {
            return;
        };
        let di = d as i32;
        launch!(
            self,
            "add_rows_scaled",
            per_row(rows.len(), 256),
            ds,
            &di,
            ss.as_ref(),
            &idx,
            &w
        );
    }

    fn mla_expand(
        &self,
        kv: &CudaBuf,
        k_pe: &CudaBuf,
        t: usize,
        h: usize,
        nope: usize,
        dv: usize,
        rope: usize,
    ) -> (CudaBuf, CudaBuf) {
        if self.errored() {
            return (self.empty(), self.empty());
        }
        let (Some(kv), Some(pe)) = (
            self.f32_of(kv, "mla_expand"),
            self.f32_of(k_pe, "mla_expand"),
        ) else {
            return (self.empty(), self.empty());
        };
        if kv.len() != t * h * (nope + dv) || pe.len() != t * rope {
            self.record(failed("mla_expand", "shapes"));
            return (self.empty(), self.empty());
        }
        let (Some(mut k), Some(mut v)) = (
            self.tmp::<f32>(t * h * (nope + rope), "mla keys"),
            self.tmp::<f32>(t * h * dv, "mla values"),
        ) else {
            return (self.empty(), self.empty());
        };
        if t > 0 {
            let (hh, n, d, r) = (h as i32, nope as i32, dv as i32, rope as i32);
            launch!(
                self,
                "mla_expand",
                per_row(t * h, 128),
                kv,
                pe,
                &mut k,
                &mut v,
                &hh,
                &n,
                &d,
                &r
            );
        }
        (CudaBuf::F32(Arc::new(k)), CudaBuf::F32(Arc::new(v)))
    }

    fn slice_rows(&self, x: &CudaBuf, cols: usize, from: usize, count: usize) -> CudaBuf {
        if self.errored() {
            return self.empty();
        }
        match x {
            CudaBuf::Paged(p) => {
                if from != 0 || count > p.rows.rows() || p.cols != cols {
                    self.record(failed("slice_rows", "a cache slice must be a prefix"));
                    return self.empty();
                }
                KvRows::buf(p.rows.prefix(count), cols)
            }
            CudaBuf::F32(s) => {
                if (from + count) * cols > s.len() {
                    self.record(failed("slice_rows", "rows out of range"));
                    return self.empty();
                }
                let Some(y) = self.tmp::<f32>(count * cols, "slice_rows") else {
                    return self.empty();
                };
                self.dtod(
                    y.ptr(),
                    s.ptr() + (from * cols * 4) as u64,
                    count * cols * 4,
                );
                CudaBuf::F32(Arc::new(y))
            }
            CudaBuf::Bf16(_) => {
                self.record(failed("slice_rows", "weights are not sliced"));
                self.empty()
            }
        }
    }

    fn concat_rows(&self, parts: &[CudaBuf]) -> CudaBuf {
        if self.errored() {
            return self.empty();
        }
        if parts.len() == 1 {
            return parts[0].clone();
        }
        let total: usize = parts.iter().map(|p| self.len(p)).sum();
        let Some(y) = self.tmp::<f32>(total, "concat_rows") else {
            return self.empty();
        };
        let mut at = 0;
        for p in parts {
            let Some(s) = self.f32_of(p, "concat_rows") else {
                return self.empty();
            };
            self.dtod(y.ptr() + (at * 4) as u64, s.ptr(), s.len() * 4);
            at += s.len();
        }
        CudaBuf::F32(Arc::new(y))
    }

    fn head_linear(
        &self,
        x: &CudaBuf,
        t: usize,
        h: usize,
        w: &CudaBuf,
        rows: usize,
        cols: usize,
        transposed: bool,
    ) -> CudaBuf {
        if self.errored() {
            return self.empty();
        }
        let (Some(xs), Some(ws)) = (self.f32_of(x, "head_linear"), self.f32_of(w, "head_linear"))
        else {
            return self.empty();
        };
        let (inp, out) = if transposed {
            (cols, rows)
        } else {
            (rows, cols)
        };
        if xs.len() != t * h * inp || ws.len() != h * rows * cols {
            self.record(failed("head_linear", "shapes"));
            return self.empty();
        }
        let Some(mut y) = self.tmp::<f32>(t * h * out, "head_linear") else {
            return self.empty();
        };
        if t == 0 {
            return CudaBuf::F32(Arc::new(y));
        }
        // Per head i (column-major): yᵢᵀ[out, t] = op(wᵢ)[out, inp] · xᵢᵀ[inp, t], with
        // wᵢ row-major [rows, cols] seen as column-major [cols, rows] (ld = cols).
        self.sgemm_batched(
            transposed,
            (out, t, inp),
            ws,
            (cols, rows * cols),
            xs,
            (h * inp, inp),
            &mut y,
            (h * out, out),
            h,
            0.0,
        );
        CudaBuf::F32(Arc::new(y))
    }

    fn append_rows(&self, cache: &mut CudaBuf, rows: &CudaBuf, cols: usize) {
        if self.errored() {
            return;
        }
        let Some(src) = self.f32_of(rows, "append_rows") else {
            return;
        };
        if cols == 0 || src.len() % cols != 0 {
            return self.record(failed("append_rows", "rows are not whole"));
        }
        let n = src.len() / cols;
        let Some(addrs) = self.grow_cache(cache, cols, n) else {
            return;
        };
        if n == 0 {
            return;
        }
        let Some(dst) = self.meta(&addrs, "row addresses") else {
            return;
        };
        let ci = cols as i32;
        launch!(self, "paged_write", per_row(n, 128), src, &dst, &ci);
    }

    fn rope(
        &self,
        x: &mut CudaBuf,
        heads: usize,
        head_dim: usize,
        offset: usize,
        rot_dim: usize,
        positions: &[usize],
        cos: &CudaBuf,
        sin: &CudaBuf,
        layout: RopeLayout,
    ) {
        let a = (x, heads, head_dim, offset);
        self.rope_of(a, None, rot_dim, positions, cos, sin, layout);
    }

    fn rope_pair(
        &self,
        a: Rotated<'_, CudaBuf>,
        b: Rotated<'_, CudaBuf>,
        rot_dim: usize,
        positions: &[usize],
        cos: &CudaBuf,
        sin: &CudaBuf,
        layout: RopeLayout,
    ) {
        self.rope_of(a, Some(b), rot_dim, positions, cos, sin, layout);
    }

    fn attend(
        &self,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        lens: &[usize],
        caches: &mut [(&mut CudaBuf, &mut CudaBuf)],
        s: AttnShape,
    ) -> CudaBuf {
        if self.errored() {
            return self.empty();
        }
        let (Some(qs), Some(ks), Some(vs)) = (
            self.f32_of(q, "attention"),
            self.f32_of(k, "attention"),
            self.f32_of(v, "attention"),
        ) else {
            return self.empty();
        };
        let n = lens.len();
        let t: usize = lens.iter().sum();
        let (kc, vc) = (s.hk * s.dk, s.hk * s.dv);
        if s.dv > MAX_DV
            || s.dv == 0
            || !s.dk.is_multiple_of(4)
            || !s.dv.is_multiple_of(4)
            || s.hk == 0
            || !s.h.is_multiple_of(s.hk)
            || (s.values_in_keys && s.dv > s.dk)
            || caches.len() != n
            || qs.len() != t * s.h * s.dk
            || ks.len() != t * kc
            || vs.len() != t * vc
        {
            self.record(failed(
                "attention",
                format!(
                    "shapes ({n} sequences, {t} rows, h {}, hk {}, dk {}, 0 < dv {} ≤ {MAX_DV}; \
                     dk and dv multiples of 4)",
                    s.h, s.hk, s.dk, s.dv
                ),
            ));
            return self.empty();
        }
        // Room for the new rows (copy-on-write of shared blocks included), then each
        // cache's device table.
        let mut meta = vec![0u64; 4 * n + 1];
        let mut row0 = 0;
        for (i, ((kcache, vcache), len)) in caches.iter_mut().zip(lens).enumerate() {
            let pos0 = cache_rows(kcache);
            if self.grow_cache(kcache, kc, *len).is_none() {
                return self.empty();
            }
            let Some(kt) = self.table_of(kcache) else {
                return self.empty();
            };
            meta[i] = kt;
            meta[n + i] = if s.values_in_keys {
                kt
            } else {
                if cache_rows(vcache) != pos0 || self.grow_cache(vcache, vc, *len).is_none() {
                    self.record(failed("attention", "key and value caches differ in length"));
                    return self.empty();
                }
                let Some(vt) = self.table_of(vcache) else {
                    return self.empty();
                };
                vt
            };
            meta[2 * n + i] = pos0 as u64;
            meta[3 * n + i] = row0 as u64;
            row0 += len;
        }
        meta[4 * n] = t as u64;
        let Some(mut out) = self.tmp::<f32>(t * s.h * s.dv, "attention output") else {
            return self.empty();
        };
        if t == 0 {
            return CudaBuf::F32(Arc::new(out));
        }
        let Some(md) = self.meta(&meta, "attention metadata") else {
            return self.empty();
        };
        // The new rows go into the caches in the attention launch itself, which reads
        // them from `ks`/`vs` (values from the keys when they are the keys' columns).
        let (values, vcols, vhead) = if s.values_in_keys {
            (ks, kc, s.dk)
        } else {
            (vs, vc, s.dv)
        };
        self.attention_launch(
            qs,
            &md,
            n,
            t,
            &mut out,
            s,
            (vcols, vhead),
            Some((ks, values)),
        );
        CudaBuf::F32(Arc::new(out))
    }

    fn attention(
        &self,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        t: usize,
        h: usize,
        hk: usize,
        dk: usize,
        dv: usize,
        scale: f32,
    ) -> CudaBuf {
        if self.errored() {
            return self.empty();
        }
        let Some(qs) = self.f32_of(q, "attention") else {
            return self.empty();
        };
        let (CudaBuf::Paged(kp), CudaBuf::Paged(vp)) = (k, v) else {
            self.record(failed("attention", "keys and values must be a cache"));
            return self.empty();
        };
        let total = kp.rows.rows();
        if dv > MAX_DV
            || dv == 0
            || !dk.is_multiple_of(4)
            || !dv.is_multiple_of(4)
            || hk == 0
            || !h.is_multiple_of(hk)
            || kp.cols != hk * dk
            || vp.cols != hk * dv
            || vp.rows.rows() != total
            || t > total
            || qs.len() != t * h * dk
        {
            self.record(failed(
                "attention",
                format!(
                    "shapes (t {t}, T {total}, h {h}, hk {hk}, dk {dk}, 0 < dv {dv} ≤ {MAX_DV}; \
                     dk and dv multiples of 4)"
                ),
            ));
            return self.empty();
        }
        let Some(mut out) = self.tmp::<f32>(t * h * dv, "attention output") else {
            return self.empty();
        };
        if t == 0 {
            return CudaBuf::F32(Arc::new(out));
        }
        let (Some(kt), Some(vt)) = (
            self.meta(&kp.rows.table(), "key table"),
            self.meta(&vp.rows.table(), "value table"),
        ) else {
            return self.empty();
        };
        let addr = |x: &CudaSlice<u64>| x.device_ptr(&self.stream).0;
        let meta = [addr(&kt), addr(&vt), (total - t) as u64, 0, t as u64];
        let Some(md) = self.meta(&meta, "attention metadata") else {
            return self.empty();
        };
        let shape = AttnShape {
            h,
            hk,
            dk,
            dv,
            scale,
            values_in_keys: false,
        };
        // The tables are freed in stream order, after the kernel.
        self.attention_launch(qs, &md, 1, t, &mut out, shape, (hk * dv, dv), None);
        CudaBuf::F32(Arc::new(out))
    }
}

/// A bf16 matrix's device address (`None`: not bf16).
fn bf16_addr(b: &CudaBuf) -> Option<u64> {
    match b {
        CudaBuf::Bf16(s) => Some(s.ptr()),
        _ => None,
    }
}

/// The experts' gate, up and down matrix addresses, one list per projection (`None`:
/// one is not bf16).
fn expert_addrs(experts: &[[&CudaBuf; 3]]) -> Option<[Vec<u64>; 3]> {
    let mut cols: [Vec<u64>; 3] = Default::default();
    for e in experts {
        for (j, m) in e.iter().enumerate() {
            cols[j].push(bf16_addr(m)?);
        }
    }
    Some(cols)
}

/// Rows held by a cache buffer (an empty f32 buffer: a cache not written yet).
fn cache_rows(b: &CudaBuf) -> usize {
    match b {
        CudaBuf::Paged(p) => p.rows.rows(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels compile with NVRTC for the architectures we serve on. Needs NVRTC and
    /// the CUDA headers only (no GPU): CI installs both from PyPI and sets
    /// `CLOUD_CORE_REQUIRE_NVRTC=1`, which turns the skip into a failure.
    #[test]
    fn kernels_compile_with_nvrtc() {
        let required = std::env::var("CLOUD_CORE_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
        // SAFETY: only tries to open the library.
        let nvrtc = unsafe { cudarc::nvrtc::sys::is_culib_present() };
        let header = std::path::Path::new(&include_path()).join("cuda_bf16.h");
        let missing = if !nvrtc {
            Some("no NVRTC library (libnvrtc) on the library path".to_string())
        } else if !header.exists() {
            Some(format!("no {}", header.display()))
        } else {
            None
        };
        if let Some(why) = missing {
            assert!(!required, "CLOUD_CORE_REQUIRE_NVRTC=1 but {why}");
            eprintln!("skipped: {why}");
            return;
        }
        for arch in ["sm_80", "sm_90"] {
            let ptx = compiled(arch).unwrap_or_else(|e| panic!("{e}"));
            let src = ptx.to_src();
            for k in KERNEL_NAMES {
                assert!(
                    src.contains(&format!(".entry {k}(")),
                    "{arch}: kernel {k} missing from the PTX"
                );
            }
            // The second backend of the process reuses the first one's PTX, for its arch.
            let before = COMPILES.load(Ordering::Relaxed);
            let again = compiled(arch).unwrap_or_else(|e| panic!("{e}")).to_src();
            assert_eq!(
                COMPILES.load(Ordering::Relaxed),
                before,
                "{arch}: compiled again"
            );
            assert!(again == src, "{arch}: the kept PTX differs");
        }
        for arch in ["sm_80", "sm_90"] {
            let src = compiled(arch).expect("kept").to_src();
            assert!(
                src.contains(&format!(".target {arch}")),
                "{arch}: kept for another arch"
            );
        }
    }

    /// What ptxas reports of one kernel: registers per thread, bytes of stack frame, of
    /// spill stores and loads, and of static shared memory.
    #[derive(Debug, Default)]
    struct Resources {
        regs: u32,
        stack: u32,
        spills: (u32, u32),
        smem: u32,
    }

    /// Compiles the kernels to machine code for `arch` with ptxas's report of every
    /// kernel's resources, and reads the report. `None`: no NVRTC or headers here.
    fn resources(arch: &str) -> Option<HashMap<String, Resources>> {
        use cudarc::nvrtc::result as nvrtc;
        // SAFETY: only tries to open the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() }
            || !std::path::Path::new(&include_path())
                .join("cuda_bf16.h")
                .exists()
        {
            return None;
        }
        let src = std::ffi::CString::new(KERNELS).expect("no NUL in the kernels");
        let prog = nvrtc::create_program(&src, Some(c"cloud_core_kernels.cu")).expect("program");
        let opts = [
            format!("--include-path={}", include_path()),
            format!("--gpu-architecture={arch}"),
            "--ptxas-options=--verbose".to_string(),
        ];
        // SAFETY: `prog` is a live program, destroyed once after its log is read.
        let (compiled, log) = unsafe {
            let r = nvrtc::compile_program(prog, &opts);
            let log = nvrtc::get_program_log(prog).expect("log");
            nvrtc::destroy_program(prog).expect("destroy");
            (r, log)
        };
        let log: String = log
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8 as char)
            .collect();
        assert!(compiled.is_ok(), "{arch}: {log}");
        // "Function properties for K", then "N bytes stack frame, N bytes spill stores, N
        // bytes spill loads", then "Used N registers, …, N bytes smem, …".
        let number_before = |line: &str, what: &str| -> Option<u32> {
            let at = line.find(what)?;
            line[..at].split_whitespace().last()?.parse().ok()
        };
        let mut out: HashMap<String, Resources> = HashMap::new();
        let mut current: Option<String> = None;
        for line in log.lines() {
            if let Some((_, k)) = line.split_once("Function properties for ") {
                current = Some(k.trim().to_string());
                out.entry(k.trim().to_string()).or_default();
                continue;
            }
            let Some(r) = current.as_ref().and_then(|k| out.get_mut(k)) else {
                continue;
            };
            if let Some(n) = number_before(line, " bytes stack frame") {
                r.stack = n;
                r.spills = (
                    number_before(line, " bytes spill stores").expect("spill stores"),
                    number_before(line, " bytes spill loads").expect("spill loads"),
                );
            }
            if let Some(n) = number_before(line, " registers") {
                r.regs = n;
                r.smem = number_before(line, " bytes smem").unwrap_or(0);
                current = None;
            }
        }
        Some(out)
    }

    /// On the architectures we serve on, every kernel fits the largest block it is
    /// launched with (`MAX_THREADS`: its registers, allocated 8 at a time, times that
    /// within a multiprocessor's 64 Ki; static shared memory within 48 KiB) without
    /// spilling registers to memory, as ptxas compiles it. A launch beyond what the
    /// registers allow fails only on a real device, so this is checked where the kernels
    /// are compiled.
    #[test]
    fn kernels_fit_their_blocks_without_spilling() {
        let required = std::env::var("CLOUD_CORE_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
        let bounds = max_threads().expect("MAX_THREADS");
        for arch in ["sm_80", "sm_90"] {
            let Some(report) = resources(arch) else {
                assert!(
                    !required,
                    "CLOUD_CORE_REQUIRE_NVRTC=1 but no NVRTC or headers"
                );
                eprintln!("skipped: no NVRTC library or CUDA headers here");
                return;
            };
            for k in KERNEL_NAMES {
                let r = report
                    .get(*k)
                    .unwrap_or_else(|| panic!("{arch}: ptxas reports nothing of {k}"));
                let bound = bounds[k];
                eprintln!(
                    "{arch} {k:18} {:3} registers × {bound:4} threads, stack {:5} B, \
                     shared {:5} B",
                    r.regs, r.stack, r.smem
                );
                assert!(r.regs > 0, "{arch}: {k}: no register count read");
                assert_eq!(r.spills, (0, 0), "{arch}: {k} spills registers");
                assert!(
                    r.regs.next_multiple_of(8) * bound <= 65_536,
                    "{arch}: {k}: {} registers × {bound} threads exceed 64 Ki",
                    r.regs
                );
                assert!(
                    r.smem <= SHARED_PER_BLOCK,
                    "{arch}: {k}: {} bytes of shared memory",
                    r.smem
                );
            }
        }
    }

    #[test]
    fn every_kernel_declares_its_largest_block() {
        let bounds = max_threads().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(bounds.len(), KERNEL_NAMES.len());
        assert_eq!(bounds["sample_rows"], SAMPLE_MAX_THREADS as u32);
        assert_eq!(bounds["moe_group"], MOE_MAX_EXPERTS as u32);
        assert_eq!(bounds["attention_batch"], (ATT_WARPS * 32) as u32);
    }

    #[test]
    fn launch_shapes_agree_with_the_kernels() {
        for (name, value) in [
            ("GEMV_ROWS", GEMV_ROWS),
            ("ATT_WARPS", ATT_WARPS),
            ("MAX_DV", MAX_DV),
            ("MOE_MAX_EXPERTS", MOE_MAX_EXPERTS),
            ("SAMPLE_MAX_THREADS", SAMPLE_MAX_THREADS),
        ] {
            assert!(
                KERNELS.contains(&format!("#define {name} {value}\n")),
                "{name} is not {value} in the kernels"
            );
        }
    }

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
