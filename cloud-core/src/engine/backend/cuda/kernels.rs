//! The kernels: their CUDA C source ([`KERNELS`]), the block shapes it is written for,
//! compilation by NVRTC (once per process and architecture), and launches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaFunction, CudaModule, LaunchConfig};

use super::{failed, lock, Cuda};

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
    "moe_gemm_gate_up",
    "moe_gemm_down",
    "moe_combine",
    "attention_mma",
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

/// The most rows `gemv_bf16` takes (more go through cuBLAS): `GEMV_ROWS` of the kernels.
pub const GEMV_ROWS: usize = 8;
/// Warps per (row, head) block of `attention_batch`: `ATT_WARPS` of the kernels.
pub const ATT_WARPS: usize = 8;
/// The most experts the MoE kernels route among: `MOE_MAX_EXPERTS` of the kernels.
pub const MOE_MAX_EXPERTS: usize = 512;
/// The most threads of a `sample_rows` block: `SAMPLE_MAX_THREADS` of the kernels.
pub const SAMPLE_MAX_THREADS: usize = 1024;
/// Rows (slots) and outputs of a tile of the grouped expert GEMMs (`moe_gemm_gate_up`,
/// `moe_gemm_down`): `GG_M` and `GG_N` of the kernels.
pub const GG_M: usize = 64;
pub const GG_N: usize = 64;
/// Threads of a grouped expert GEMM block: `GG_THREADS` of the kernels.
pub const GG_THREADS: usize = 128;

/// Query slots (row, head) and key positions of a tile of `attention_mma`, and its
/// threads: `FA_SLOTS`, `FA_KEYS` and `FA_THREADS` of the kernels.
pub const FA_SLOTS: usize = 32;
pub const FA_KEYS: usize = 32;
pub const FA_THREADS: usize = 256;

/// The dynamic shared memory of an `attention_mma` block, as the kernel lays it out: the
/// slots' queries and the tile's keys (bf16, rows of the key width rounded up to 16, plus
/// 8), its values unless they are the keys' columns (rows of dv + 8), the scores (f32,
/// rows of FA_KEYS + 1), the probabilities (bf16, rows of FA_KEYS + 8), and four words
/// per slot.
pub fn fa_shared(dk: usize, dv: usize, values_in_keys: bool) -> usize {
    let ldk = dk.next_multiple_of(16) + 8;
    let values = if values_in_keys {
        0
    } else {
        FA_KEYS * (dv + 8) * 2
    };
    (FA_SLOTS + FA_KEYS) * ldk * 2
        + values
        + FA_SLOTS * ((FA_KEYS + 1) * 4 + (FA_KEYS + 8) * 2 + 16)
}

/// Each kernel's number of parameters in [`KERNELS`]: a launch passes exactly as many
/// (the device reads what the kernel declares, whatever a launch passes).
pub fn parameter_counts() -> Result<HashMap<&'static str, usize>, String> {
    const MARK: &str = "extern \"C\" __global__ void ";
    let mut counts = HashMap::new();
    for (at, _) in KERNELS.match_indices(MARK) {
        let mut rest = &KERNELS[at + MARK.len()..];
        if let Some(after) = rest.strip_prefix("MAX_THREADS(") {
            rest = after.split_once(')').ok_or("an unclosed MAX_THREADS(")?.1;
        }
        let (name, rest) = rest.split_once('(').ok_or("a kernel without parameters")?;
        let (params, _) = rest.split_once(')').ok_or("an unclosed parameter list")?;
        let name = name.trim();
        let Some(k) = KERNEL_NAMES.iter().find(|k| **k == name) else {
            return Err(format!("a kernel {name:?} missing from KERNEL_NAMES"));
        };
        counts.insert(
            *k,
            params.split(',').filter(|p| !p.trim().is_empty()).count(),
        );
    }
    match KERNEL_NAMES.iter().find(|k| !counts.contains_key(*k)) {
        Some(k) => Err(format!("kernel {k} is not in the kernels' source")),
        None => Ok(counts),
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
pub(super) fn compiled(arch: &str) -> Result<cudarc::nvrtc::Ptx, String> {
    static PTX: Mutex<Vec<(String, cudarc::nvrtc::Ptx)>> = Mutex::new(Vec::new());
    let mut done = lock(&PTX);
    if let Some((_, ptx)) = done.iter().find(|(a, _)| a == arch) {
        return Ok(ptx.clone());
    }
    let ptx = compile(arch)?;
    #[cfg(test)]
    COMPILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    done.push((arch.to_string(), ptx.clone()));
    Ok(ptx)
}

/// How many times [`compiled`] compiled (the tests check that it keeps what it compiled).
#[cfg(test)]
static COMPILES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

pub(super) struct Kernels {
    pub(super) _module: Arc<CudaModule>,
    pub(super) f: HashMap<&'static str, Kernel>,
}

pub(super) struct Kernel {
    pub(super) func: CudaFunction,
    /// The most threads a block of it is launched with (`MAX_THREADS`).
    pub(super) max_threads: u32,
    /// The most dynamic shared memory a block of it may have (48 KiB less its static
    /// shared memory, unless raised for it).
    pub(super) dynamic: u32,
    /// Its number of parameters.
    pub(super) params: usize,
}

/// Shared memory a block may have without opting in per kernel (every architecture).
pub(super) const SHARED_PER_BLOCK: u32 = 48 << 10;

impl Cuda {
    /// Launches a kernel with its arguments as words (see [`KArg`](super::step::KArg)).
    pub(super) fn launch_words(&self, name: &'static str, cfg: LaunchConfig, words: &mut [u64]) {
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
        if cfg.shared_mem_bytes > k.dynamic {
            return self.record(failed(
                name,
                format!(
                    "{} bytes of dynamic shared memory per block; at most {}",
                    cfg.shared_mem_bytes, k.dynamic
                ),
            ));
        }
        if words.len() != k.params {
            return self.record(failed(
                name,
                format!(
                    "launched with {} arguments; the kernel has {} parameters",
                    words.len(),
                    k.params
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
        let programmatic = self.pdl.load(std::sync::atomic::Ordering::Relaxed);
        let mut r = if programmatic {
            use cudarc::driver::sys;
            // Programmatic dependent launch: the kernel's blocks may be placed while the
            // one before it ends (every kernel waits for it first: `grid_dependency`).
            let mut attr = sys::CUlaunchAttribute {
                id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
                pad: [0; 4],
                value: sys::CUlaunchAttributeValue { pad: [0; 64] },
            };
            attr.value.programmaticStreamSerializationAllowed = 1;
            let config = sys::CUlaunchConfig {
                gridDimX: g.0,
                gridDimY: g.1,
                gridDimZ: g.2,
                blockDimX: b.0,
                blockDimY: b.1,
                blockDimZ: b.2,
                sharedMemBytes: cfg.shared_mem_bytes,
                hStream: self.stream.cu_stream(),
                attrs: &mut attr,
                numAttrs: 1,
            };
            // SAFETY: as below; `config` and `attr` outlive the call, which copies them.
            unsafe {
                sys::cuLaunchKernelEx(
                    &config,
                    k.func.cu_function(),
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
                .result()
            }
        } else {
            Ok(())
        };
        if let Err(e) = &r {
            // A driver that refuses the attribute: plain launches from now on, this one
            // included (kernels wait for the one before them either way).
            tracing::warn!(
                "CUDA backend: programmatic dependent launch refused ({e}); kernels are \
                 launched plainly from now on"
            );
            use std::sync::atomic::Ordering::Relaxed;
            self.pdl.store(false, Relaxed);
            self.pdl_refused
                .store(self.capturing.load(Relaxed), Relaxed);
        }
        if !programmatic || r.is_err() {
            // SAFETY: the kernel's parameters are the words in order (device addresses and
            // scalars of the parameter types, little-endian), sized by each caller.
            r = unsafe {
                cudarc::driver::result::launch_kernel(
                    k.func.cu_function(),
                    cfg.grid_dim,
                    cfg.block_dim,
                    cfg.shared_mem_bytes,
                    self.stream.cu_stream(),
                    &mut params,
                )
            };
        }
        self.check(name, r);
    }

    pub(super) fn check(&self, op: &str, r: Result<(), cudarc::driver::DriverError>) {
        if let Err(e) = r {
            self.record(failed(op, e));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

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
        assert_eq!(bounds["moe_gemm_gate_up"], GG_THREADS as u32);
        assert_eq!(bounds["moe_gemm_down"], GG_THREADS as u32);
        assert_eq!(bounds["attention_mma"], FA_THREADS as u32);
    }

    #[test]
    fn every_kernel_has_its_parameters_counted() {
        let counts = parameter_counts().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(counts.len(), KERNEL_NAMES.len());
        assert_eq!(counts["attention_batch"], 18);
        assert_eq!(counts["attention_mma"], 18);
        assert_eq!(counts["moe_gemm_down"], 9);
    }

    /// Kernels are launched with programmatic dependent launch on sm_90: one that did
    /// not wait for the kernel before it, first thing, would run beside it.
    #[test]
    fn every_kernel_first_waits_for_the_one_before() {
        const MARK: &str = "extern \"C\" __global__ void ";
        let mut seen = 0;
        for (at, _) in KERNELS.match_indices(MARK) {
            let rest = &KERNELS[at + MARK.len()..];
            // The body: from the first brace (parameter lists have none).
            let (signature, body) = rest.split_once('{').expect("a kernel's body");
            let body = body.trim_start();
            // Or its first half, then a projection that waits after its prefetch.
            let split = body
                .strip_prefix("grid_launch_dependents();")
                .is_some_and(|b| {
                    let b = b.trim_start();
                    b.starts_with("gemv_parts<") || b.starts_with("gemv_gate_up<")
                });
            assert!(
                body.starts_with("grid_dependency();") || split,
                "kernel {} does not start with grid_dependency();",
                signature.trim()
            );
            seen += 1;
        }
        assert_eq!(seen, KERNEL_NAMES.len());
        // Those projections wait before their first product (which reads the rows).
        for helper in ["void gemv_parts(", "void gemv_gate_up("] {
            let at = KERNELS.find(helper).expect("the helper");
            let body = &KERNELS[at..];
            let body = &body[..body.find("\n}\n").expect("its end")];
            let wait = body.find("grid_wait();").expect("a wait");
            for product in ["gemv_one<", "gemv_pair<", "dot_two<", "x["] {
                assert!(
                    body.find(product).is_none_or(|p| p > wait),
                    "{helper}: {product} before grid_wait()"
                );
            }
        }
    }

    #[test]
    fn launch_shapes_agree_with_the_kernels() {
        for (name, value) in [
            ("GEMV_ROWS", GEMV_ROWS),
            ("ATT_WARPS", ATT_WARPS),
            ("MAX_DV", MAX_DV),
            ("MOE_MAX_EXPERTS", MOE_MAX_EXPERTS),
            ("SAMPLE_MAX_THREADS", SAMPLE_MAX_THREADS),
            ("GG_M", GG_M),
            ("GG_N", GG_N),
            ("GG_THREADS", GG_THREADS),
            ("FA_SLOTS", FA_SLOTS),
            ("FA_KEYS", FA_KEYS),
            ("FA_THREADS", FA_THREADS),
        ] {
            assert!(
                KERNELS.contains(&format!("#define {name} {value}\n")),
                "{name} is not {value} in the kernels"
            );
        }
    }
}
