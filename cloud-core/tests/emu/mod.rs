//! Builds the CUDA backend's kernels for the CPU (see `shim.h`), and optionally the
//! emulated CUDA driver, cuBLAS and NVRTC around them (see `driver.cpp`), with the host's
//! `g++`. Shared by the tests that need them.

use std::path::PathBuf;

/// The kernels' source, as the backend compiles it.
pub const KERNELS: &str = include_str!("../../src/engine/backend/cuda_kernels.cu");
const SHIM: &str = include_str!("shim.h");
const DRIVER: &str = include_str!("driver.cpp");

/// Every kernel of `src` (each `extern "C" __global__` function), in order: its name and
/// its parameters' types.
pub fn kernels(src: &str) -> Vec<(String, Vec<String>)> {
    let marker = "extern \"C\" __global__ void ";
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find(marker) {
        rest = &rest[i + marker.len()..];
        // Past the kernel's `MAX_THREADS(n)`.
        if let Some(after) = rest.strip_prefix("MAX_THREADS(") {
            rest = &after[after.find(')').expect(")") + 1..];
        }
        let open = rest.find('(').expect("(");
        let name = rest[..open].trim().to_string();
        let close = rest.find(')').expect(")");
        let types = rest[open + 1..close]
            .split(',')
            .map(|p| {
                let p = p.replace("__restrict__", " ");
                let p = p.trim();
                let cut = p
                    .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .expect("a typed parameter");
                p[..=cut].trim().to_string()
            })
            .collect();
        out.push((name, types));
    }
    out
}

/// The C++ glue: `emu_bind(name, grid, block, shared, args)` returns the named kernel's
/// launch as a `std::function` with `args` read as its parameter types now (as
/// `cuLaunchKernel` reads them when it is called, also while a stream is captured),
/// `emu_launch` binds and runs at once, and `emu_has_kernel(name)` says whether it exists.
pub fn glue(src: &str) -> String {
    let mut bind = String::from(
        "#include <functional>\n\
         extern \"C\" void* emu_bind(const char* name, unsigned gx, unsigned gy, unsigned gz, \
         unsigned bx, unsigned by, unsigned bz, unsigned shared, void** a) {\n  \
         dim3 g{gx, gy, gz}, b{bx, by, bz};\n",
    );
    let mut has = String::from("extern \"C\" int emu_has_kernel(const char* name) {\n");
    for (name, types) in kernels(src) {
        let reads: Vec<String> = types
            .iter()
            .enumerate()
            .map(|(i, ty)| format!("{ty} p{i} = *({ty}*)a[{i}];"))
            .collect();
        let names: Vec<String> = (0..types.len()).map(|i| format!("p{i}")).collect();
        bind.push_str(&format!(
            "  if (!std::strcmp(name, \"{name}\")) {{ {} return new std::function<void()>([=] {{ emu_run(g, b, shared, [=] {{ {name}({}); }}); }}); }}\n",
            reads.join(" "),
            names.join(", ")
        ));
        has.push_str(&format!(
            "  if (!std::strcmp(name, \"{name}\")) return 1;\n"
        ));
    }
    bind.push_str("  return nullptr;\n}\n");
    has.push_str("  return 0;\n}\n");
    let launch = "extern \"C\" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, \
                  unsigned bx, unsigned by, unsigned bz, unsigned shared, void** a) {\n  \
                  auto* f = (std::function<void()>*)emu_bind(name, gx, gy, gz, bx, by, bz, shared, a);\n  \
                  if (!f) return 1;\n  (*f)();\n  delete f;\n  return 0;\n}\n";
    bind + &has + launch
}

fn run(cmd: &mut std::process::Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("no g++ to build the kernels for the CPU: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "g++ failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Builds `libkernels.so` (kernels + `emu_launch`) and, with `driver`, `libcuda.so`,
/// `libcublas.so` and `libnvrtc.so` (each the kernels plus the emulated libraries, named
/// by their sonames so that loading them first makes them the ones cudarc finds), and
/// returns their directory.
///
/// The directory is named by a hash of everything that goes into the libraries (the
/// source, the flags, the compiler's version) under the target directory's scratch space,
/// so the test processes of one run (the kernel tests, the suite, the benchmark's child
/// processes, the same tests in other orders) compile each variant once: g++ takes ~10 s
/// over the kernels. A build goes to a directory of its own first and is renamed into
/// place whole, so a process never loads another's half-written library.
/// `EMU_BUILT=<dir>` reuses what another process built there (a test's child process).
pub fn build(driver: bool) -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("EMU_BUILT") {
        return Ok(dir.into());
    }
    // The kernels' warp reduction runs as one exchange instead of five shuffles (see
    // `emu_warp_sum` in shim.h: the same additions in the same order).
    let warp_sum = "__device__ __forceinline__ float warp_sum(float v) {";
    if !KERNELS.contains(warp_sum) {
        return Err(format!("the kernels no longer define `{warp_sum}`"));
    }
    let kernels = KERNELS
        .replace("#include <cuda_bf16.h>", "")
        .replace(
            "extern __shared__ float sm[];",
            "float* sm = (float*)emu_dynamic_shared;",
        )
        .replace(
            warp_sum,
            &format!(
                "{warp_sum} return emu_warp_sum(v); }}\n\
                 __device__ __forceinline__ float warp_sum_on_the_device(float v) {{"
            ),
        );
    let mut src = format!("{SHIM}\n#include <cstdio>\n{kernels}\n{}", glue(KERNELS));
    if driver {
        src.push_str(DRIVER);
    }
    if address_sanitized() && !std::env::var("LD_PRELOAD").is_ok_and(|p| p.contains("libasan")) {
        return Err(
            "EMU_SANITIZE=address: the process must start with AddressSanitizer's runtime \
             (LD_PRELOAD=$(g++ -print-file-name=libasan.so))"
                .into(),
        );
    }
    let compile: Vec<String> = ["-std=c++20", "-O2", "-fPIC", "-pthread", "-w"]
        .into_iter()
        .map(String::from)
        .chain(sanitizers())
        .collect();
    let names: &[&str] = if driver {
        &["libcuda.so", "libcublas.so", "libnvrtc.so"]
    } else {
        &["libkernels.so"]
    };
    let version = std::process::Command::new("g++")
        .arg("--version")
        .output()
        .map_err(|e| format!("no g++ to build the kernels for the CPU: {e}"))?
        .stdout;
    let key = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&src, &compile, names, &version).hash(&mut h);
        h.finish()
    };
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let dir = root.join(format!("cloud-core-emu-{key:016x}"));
    if dir.is_dir() {
        return Ok(dir);
    }
    let fresh = root.join(format!("cloud-core-emu-{key:016x}.{}", std::process::id()));
    std::fs::create_dir_all(&fresh).map_err(|e| format!("{}: {e}", fresh.display()))?;
    let built = compile_into(&fresh, &src, &compile, names);
    if built.is_err() || std::fs::rename(&fresh, &dir).is_err() {
        // Failed, or another process put its build there first (then use that one).
        let _ = std::fs::remove_dir_all(&fresh);
    }
    built.map(|()| dir)
}

/// Compiles `src` once with `flags` and links it as each library of `names` in `dir`.
fn compile_into(
    dir: &std::path::Path,
    src: &str,
    flags: &[String],
    names: &[&str],
) -> Result<(), String> {
    let cpp = dir.join("emu.cpp");
    std::fs::write(&cpp, src).map_err(|e| e.to_string())?;
    let obj = dir.join("emu.o");
    run(std::process::Command::new("g++")
        .args(flags)
        .args(["-c", "-o"])
        .arg(&obj)
        .arg(&cpp))?;
    let sanitize = sanitizers();
    for name in names {
        run(std::process::Command::new("g++")
            .args(["-shared", "-pthread", &format!("-Wl,-soname,{name}")])
            .args(&sanitize)
            .arg("-o")
            .arg(dir.join(name))
            .arg(&obj))?;
    }
    Ok(())
}

/// The checks compiled into the emulated kernels and libraries: always the alignment of
/// every typed load and store (a vector load from an address its type's alignment does not
/// divide faults on the device); with `EMU_SANITIZE=address`, also AddressSanitizer (every
/// access inside some allocation: an emulated device allocation is a heap block of exactly
/// its size), for a process started with its runtime preloaded.
fn sanitizers() -> Vec<String> {
    let mut on = vec!["alignment".to_string()];
    if address_sanitized() {
        on.push("address".into());
    }
    let on = on.join(",");
    vec![
        format!("-fsanitize={on}"),
        format!("-fno-sanitize-recover={on}"),
        "-fno-omit-frame-pointer".into(),
    ]
}

/// Whether `EMU_SANITIZE=address` asks for AddressSanitizer.
pub fn address_sanitized() -> bool {
    std::env::var("EMU_SANITIZE").is_ok_and(|v| v == "address")
}

/// Whether a build error means the machine has no compiler (a skip) rather than a broken
/// kernel (a failure); `CLOUD_CORE_REQUIRE_EMU=1` makes it a failure too.
pub fn skip_or_fail(err: &str) {
    if err.starts_with("no g++") {
        assert!(
            std::env::var("CLOUD_CORE_REQUIRE_EMU").map_or(true, |v| v != "1"),
            "CLOUD_CORE_REQUIRE_EMU=1 but {err}"
        );
        eprintln!("skipped: {err}");
    } else {
        panic!("{err}");
    }
}
