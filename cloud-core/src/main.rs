//! The cloud core: QUIC server for edge fleets, device registry and fleet status, the
//! verdict service and the DeepSeek engine (CPU, CUDA and remote backends), operator API
//! and dashboard.
//!
//! Built so far: `serve` (the OpenAI-compatible API and verdicts over HTTP on the CPU or
//! CUDA engine; with `--listen-quic --ca`, the QUIC link for edge fleets: registry,
//! verdict queue, sync, steering), `ca`, `device`, `demo`, `generate` and `bench`. The
//! remote backend, the dashboard and the student rollout are not built yet; the README's
//! "Status" section lists what is missing.

mod demo;

use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use cloud_core::engine::backend::cpu::{Cpu, CpuWeights};
use cloud_core::engine::backend::Backend;
use cloud_core::engine::bench::{self, BenchOptions};
use cloud_core::engine::model::Model;
use cloud_core::engine::service::{CpuSettings, Device};

/// Cloud core of the factory edge/cloud inference system.
#[derive(Parser)]
#[command(name = "cloud-core", version, about, arg_required_else_help = true)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt with a checkpoint directory (config.json, safetensors,
    /// tokenizer.json) on the CPU engine.
    Generate {
        /// Checkpoint directory, as published on Hugging Face.
        #[arg(long)]
        model: std::path::PathBuf,
        /// Prompt text (encoded with the checkpoint's tokenizer; no chat template).
        #[arg(long)]
        prompt: String,
        /// Most new tokens.
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// Sampling temperature (0: greedy).
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Keep only the k most likely tokens (0: all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Nucleus sampling threshold (1: off).
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Repetition penalty (1: off).
        #[arg(long, default_value_t = 1.0)]
        repetition_penalty: f32,
        /// Seed of the sampler.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Alternatives reported per step with --json.
        #[arg(long, default_value_t = 5)]
        top_logprobs: usize,
        /// Print token ids, text and each step's top log-probabilities as JSON.
        #[arg(long)]
        json: bool,
        /// Treat the prompt as a user message and render it with the checkpoint's chat
        /// template (tokenizer_config.json).
        #[arg(long)]
        chat: bool,
        /// System message (with --chat).
        #[arg(long)]
        system: Option<String>,
        /// Constrain the output to this JSON schema (a file); the answer always parses.
        #[arg(long)]
        schema: Option<std::path::PathBuf>,
    },
    /// Serve the model: the OpenAI-compatible API, verdicts on hard cases, engine status
    /// and metrics over HTTP; with --listen-quic, the QUIC link for edge agents.
    Serve {
        /// State directory (the operator token lives here).
        #[arg(long)]
        data_dir: std::path::PathBuf,
        /// HTTP listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen_http: std::net::SocketAddr,
        /// Checkpoint directory, as published on Hugging Face [default: the embedded demo
        /// model, written to DATA_DIR/demo-model].
        #[arg(long)]
        model: Option<std::path::PathBuf>,
        /// The model name the API reports and accepts [default: the directory's name].
        #[arg(long)]
        model_name: Option<String>,
        /// QUIC listen address for edge agents (needs --ca).
        #[arg(long, requires = "ca")]
        listen_quic: Option<std::net::SocketAddr>,
        /// The fleet CA directory (`cloud-core ca init`): server certificate, revocation list.
        #[arg(long)]
        ca: Option<std::path::PathBuf>,
        /// Engine backend: cpu, or cuda (needs a build with the `cuda` feature).
        #[arg(long, default_value = "cpu")]
        engine: cloud_core::engine::service::Device,
        #[command(flatten)]
        backend: BackendFlags,
        /// Operator token (at least 16 characters) [default: DATA_DIR/operator-token,
        /// created on first start].
        #[arg(long, env = "CLOUD_CORE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Most sequences decoded together.
        #[arg(long, default_value_t = 16)]
        max_batch: usize,
        /// Most requests waiting; beyond that requests get 503 with Retry-After.
        #[arg(long, default_value_t = 256)]
        max_queue: usize,
        /// Steer every edge toward sending this share of its cases (0–1); devices with
        /// their own target (`PUT /api/v1/fleet/devices/ID/target`) use theirs. Without
        /// it only devices with a target are steered.
        #[arg(long, value_parser = share)]
        target_share: Option<f64>,
        /// Verdict queue length from which steering lowers the targets (from half of it).
        #[arg(long, default_value_t = 512)]
        queue_high: usize,
        /// Log filter (error, warn, info, debug, or a tracing filter).
        #[arg(long, default_value = "info")]
        log: String,
    },
    /// The fleet CA: create it (with the cloud's QUIC server certificate).
    Ca {
        #[command(subcommand)]
        command: CaCmd,
    },
    /// Device identities: issue a certificate for a device id, revoke one, list them.
    Device {
        #[command(subcommand)]
        command: DeviceCmd,
    },
    /// The whole system on localhost: the cloud core with the demo model, edge agents linked
    /// to it over QUIC, simulated factory machines, live fleet status (Ctrl-C to stop).
    Demo(demo::DemoArgs),
    /// Measure the engine: prefill and decode tokens/s at several batch sizes on random
    /// weights of a named shape (made on the device for CUDA), the bytes a decode step
    /// reads and the share of the copy bandwidth measured in the same run.
    Bench {
        /// Model shape: deepseek-r1-distill-qwen-1.5b, deepseek-v2-lite, deepseek-v2-mini
        /// or tiny.
        #[arg(long, default_value = "deepseek-r1-distill-qwen-1.5b")]
        shape: String,
        /// Measure this checkpoint directory instead of random weights of a shape.
        #[arg(long)]
        model: Option<std::path::PathBuf>,
        /// The shape with this many layers instead of its own (a shorter run of a large
        /// shape, or the host's work of a deep model on a small one).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        layers: Option<u32>,
        /// Engine backend: cpu, or cuda (needs a build with the `cuda` feature).
        #[arg(long, default_value = "cpu")]
        engine: Device,
        /// With --model: also judge this many simulated cases through the verdict service,
        /// one at a time and all at once.
        #[arg(long, default_value_t = 0)]
        verdicts: usize,
        /// Prompt tokens per sequence.
        #[arg(long, default_value_t = 128)]
        prompt: usize,
        /// Decode steps per measurement.
        #[arg(long, default_value_t = 16)]
        steps: usize,
        /// Batch sizes to measure, comma-separated.
        #[arg(long, default_value = "1,4")]
        batches: String,
        #[command(flatten)]
        backend: BackendFlags,
        /// Decode by sampling at this temperature (0: greedy) instead of greedily.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// With --temperature: keep the fewest tokens whose probabilities reach this.
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// CUDA: after the measurements, run this many more decode steps of each batch
        /// size eagerly with an event before every operation, and print the time per
        /// operation (kernel, GEMM, copy).
        #[arg(long, default_value_t = 0)]
        profile: usize,
    },
}

/// The backends' settings (`--cpu-*` with `--engine cpu`, `--cuda-*` and the rest with
/// `--engine cuda`).
#[derive(clap::Args, Clone, Copy, Debug, Default)]
struct BackendFlags {
    /// CPU: how matrices are held: as-stored (a bf16 checkpoint's stay bf16, half the
    /// memory of f32 and exactly the same values; random bench weights count as bf16),
    /// f32 (every matrix widened), or bf16 (f32 checkpoints' matrices rounded, as on the
    /// CUDA backend) [default: as-stored].
    #[arg(long)]
    cpu_weights: Option<CpuWeights>,
    /// CPU: the KV cache's values: f32 (as computed), or bf16 (half the memory, rounded
    /// as on the CUDA backend) [default: f32].
    #[arg(long, value_parser = kv_values)]
    cpu_kv_cache: Option<bool>,
    /// CUDA: the device ordinal [default: 0].
    #[arg(long)]
    cuda_device: Option<usize>,
    /// GiB of memory for the KV cache, requests that do not fit being refused [default:
    /// once the weights are loaded, CPU: half of the host memory available, CUDA: 90% of
    /// the device memory free, less 2 GiB].
    #[arg(long, value_parser = gib)]
    kv_cache_gib: Option<usize>,
    /// CUDA: launch every decode step's kernels one by one instead of capturing the step
    /// into a CUDA graph and replaying it (to measure what the graphs save, or to fall
    /// back).
    #[arg(long)]
    no_graphs: bool,
    /// CUDA: keep off the tensor-core kernels (attention_mma, the grouped expert GEMMs):
    /// attention on the CUDA cores and one cuBLAS GEMM per expert, as on devices before
    /// sm_80 (to measure what those kernels gain, or to fall back).
    #[arg(long)]
    no_tensor_core_kernels: bool,
    /// CUDA: decode steps whose query heads share a key head by this many or more run
    /// attention on the tensor cores (attention_mma), fewer on the CUDA cores
    /// (attention_batch); 1: every decode step on the tensor cores (to compare the two on
    /// a GQA model) [default: 8].
    #[arg(long, value_parser = at_least_one)]
    mma_decode_group: Option<usize>,
    /// CUDA: launch kernels without programmatic dependent launch (sm_90 and later use
    /// it: each kernel's blocks are placed while the one before it ends).
    #[arg(long)]
    no_pdl: bool,
}

impl BackendFlags {
    /// The backend `--engine` names with these settings: an error for settings of the
    /// other backend, which would silently do nothing.
    fn apply(self, engine: Device) -> Result<Device, String> {
        use cloud_core::engine::service::CudaSettings;
        match engine {
            Device::Cuda(_) if self.cpu_weights.is_some() => {
                Err("--cpu-weights needs --engine cpu".into())
            }
            Device::Cuda(_) if self.cpu_kv_cache.is_some() => {
                Err("--cpu-kv-cache needs --engine cpu".into())
            }
            Device::Cuda(_) => {
                let d = CudaSettings::default();
                Ok(Device::Cuda(CudaSettings {
                    device: self.cuda_device.unwrap_or(d.device),
                    kv_cache_bytes: self.kv_cache_gib.or(d.kv_cache_bytes),
                    graphs: !self.no_graphs,
                    tensor_core_kernels: !self.no_tensor_core_kernels,
                    mma_decode_group: self.mma_decode_group.unwrap_or(d.mma_decode_group),
                    pdl: !self.no_pdl,
                }))
            }
            Device::Cpu(_) => {
                let given: Vec<&str> = [
                    (self.cuda_device.is_some(), "--cuda-device"),
                    (self.no_graphs, "--no-graphs"),
                    (self.no_tensor_core_kernels, "--no-tensor-core-kernels"),
                    (self.mma_decode_group.is_some(), "--mma-decode-group"),
                    (self.no_pdl, "--no-pdl"),
                ]
                .into_iter()
                .filter_map(|(on, flag)| on.then_some(flag))
                .collect();
                if given.is_empty() {
                    cloud_core::engine::backend::cpu::check_simd_env()?;
                    Ok(Device::Cpu(CpuSettings {
                        weights: self.cpu_weights.unwrap_or_default(),
                        kv_cache_bytes: self.kv_cache_gib,
                        kv_bf16: self.cpu_kv_cache.unwrap_or(false),
                    }))
                } else {
                    Err(format!("{} need --engine cuda", given.join(", ")))
                }
            }
        }
    }
}

#[cfg(feature = "cuda")]
fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

/// `--cpu-kv-cache`: whether the values are bf16.
fn kv_values(s: &str) -> Result<bool, String> {
    match s {
        "f32" => Ok(false),
        "bf16" => Ok(true),
        other => Err(format!("unknown KV cache type {other:?} (f32, bf16)")),
    }
}

/// A whole number of at least one.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?} is not a whole number of at least 1")),
    }
}

/// GiB (a positive number, fractions allowed) as bytes.
fn gib(s: &str) -> Result<usize, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v * (1u64 << 30) as f64 <= usize::MAX as f64 => {
            Ok((v * (1u64 << 30) as f64) as usize)
        }
        _ => Err(format!("a size in GiB is a positive number (got {s:?})")),
    }
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create a fleet CA in a new directory.
    Init {
        /// CA directory (must not hold a CA yet).
        #[arg(long)]
        dir: std::path::PathBuf,
        /// The CA's name.
        #[arg(long, default_value = "factory fleet CA")]
        name: String,
        /// DNS names and IP addresses the edges use to reach the cloud (repeatable).
        #[arg(long = "server-name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        server_names: Vec<String>,
    },
}

#[derive(Subcommand)]
enum DeviceCmd {
    /// Issue a certificate and key for a device id; writes device.pem, device.key, ca.pem.
    Issue {
        /// The device id (1–64 characters of A-Za-z0-9._-).
        id: String,
        /// CA directory.
        #[arg(long)]
        ca: std::path::PathBuf,
        /// Where to write the device's files.
        #[arg(long)]
        out: std::path::PathBuf,
        /// Days of validity.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Revoke every certificate issued to a device id (the server refuses it at the handshake).
    Revoke {
        /// The device id.
        id: String,
        /// CA directory.
        #[arg(long)]
        ca: std::path::PathBuf,
    },
    /// List issued certificates as JSON.
    List {
        /// CA directory.
        #[arg(long)]
        ca: std::path::PathBuf,
    },
}

fn ca_cmd(cmd: CaCmd) -> anyhow::Result<()> {
    use cloud_core::fleet::ca::Ca;
    match cmd {
        CaCmd::Init {
            dir,
            name,
            server_names,
        } => {
            Ca::init(&dir, &name, &server_names)?;
            println!(
                "fleet CA created in {} (server certificate for {})",
                dir.display(),
                server_names.join(", ")
            );
            Ok(())
        }
    }
}

fn device_cmd(cmd: DeviceCmd) -> anyhow::Result<()> {
    use anyhow::Context;
    use cloud_core::fleet::ca::Ca;
    match cmd {
        DeviceCmd::Issue { id, ca, out, days } => {
            let ident = Ca::open(&ca)?.issue_device(&id, days)?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            std::fs::write(out.join("device.pem"), &ident.cert_pem)?;
            std::fs::write(out.join("ca.pem"), &ident.ca_pem)?;
            let key = out.join("device.key");
            {
                use std::io::Write;
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create(true).truncate(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    opts.mode(0o600);
                }
                let mut f = opts
                    .open(&key)
                    .with_context(|| format!("creating {}", key.display()))?;
                f.write_all(ident.key_pem.as_bytes())?;
            }
            println!(
                "device {id}: certificate, key and CA written to {}",
                out.display()
            );
            Ok(())
        }
        DeviceCmd::Revoke { id, ca } => {
            let n = Ca::open(&ca)?.revoke_device(&id)?;
            println!("device {id}: {n} certificate(s) revoked; the revocation list is updated");
            Ok(())
        }
        DeviceCmd::List { ca } => {
            println!(
                "{}",
                serde_json::to_string_pretty(&Ca::open(&ca)?.issued()?)?
            );
            Ok(())
        }
    }
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// What `bench` measures: a checkpoint, or random weights of a named shape (with its
/// own number of layers, or this one).
#[derive(Clone, Copy)]
enum Weights<'a> {
    Checkpoint(&'a std::path::Path),
    Random(&'a str, Option<usize>),
}

/// What the paged KV cache holds at the end of a benchmark.
fn print_kv_cache(kv: Option<cloud_core::engine::backend::KvCacheUsage>) {
    let in_gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    if let Some(kv) = kv {
        println!(
            "KV cache at the end: {:.3} GiB held, {:.3} GiB allocated in {} allocation{}, of a {:.2} GiB budget",
            in_gib(kv.held_bytes),
            in_gib(kv.allocated_bytes),
            kv.allocations,
            if kv.allocations == 1 { "" } else { "s" },
            in_gib(kv.limit_bytes)
        );
    }
}

fn bench(
    weights: Weights<'_>,
    device: Device,
    opts: &BenchOptions,
    profile: usize,
) -> Result<(), String> {
    match device {
        Device::Cpu(_) if profile > 0 => Err("--profile needs --engine cuda".into()),
        Device::Cpu(settings) => {
            let model = bench_model(weights, Cpu::from(settings))?;
            println!("device: {}", model.backend().describe());
            let (bf16, f32) = model.backend().matrix_elements();
            let as_held = match (bf16, f32) {
                (_, 0) => "bf16 matrices".to_string(),
                (0, _) => "f32 matrices".to_string(),
                (b, f) => format!(
                    "{:.0}% of the matrices' elements bf16, the rest f32",
                    100.0 * b as f64 / (b + f) as f64
                ),
            };
            let (cache, cache_bytes) = if model.backend().kv.bf16 {
                ("bf16", 2.0)
            } else {
                ("f32", 4.0)
            };
            let opts = BenchOptions {
                elements: bench::ElementBytes {
                    weights: model.backend().matrix_element_bytes().unwrap_or(4.0),
                    cache: cache_bytes,
                },
                ..opts.clone()
            };
            let label = format!("{as_held}, {cache} KV cache");
            let bw = bench::host_bandwidth();
            let roofline = Roofline {
                bytes_per_s: bw.read,
                what: format!(
                    "a read-only stream by every thread, measured now: {:.0} GB/s (a copy: {:.0} GB/s read + written)",
                    bw.read / 1e9,
                    bw.copy / 1e9
                ),
            };
            bench_report(&model, &opts, &roofline, &label)?;
            print_kv_cache(model.backend().kv_cache());
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(settings) => {
            use cloud_core::engine::backend::cuda::Cuda;
            let graphs = settings.graphs;
            let be = Cuda::new(settings.into()).map_err(|e| e.to_string())?;
            let bw = be.copy_bandwidth(1 << 30).map_err(|e| e.to_string())?;
            let (free, total) = be.memory().map_err(|e| e.to_string())?;
            let in_gib = |b: usize| b as f64 / (1u64 << 30) as f64;
            println!(
                "device: {}; {:.1} GiB, {:.1} GiB free before the weights",
                be.describe(),
                in_gib(total),
                in_gib(free),
            );
            let model = bench_model(weights, be)?;
            let roofline = Roofline {
                bytes_per_s: bw,
                what: format!(
                    "a device copy, measured now: {:.0} GB/s read + written",
                    bw / 1e9
                ),
            };
            bench_report(&model, opts, &roofline, "bf16 matrices and KV cache")?;
            let g = model.backend().graph_stats();
            println!(
                "decode steps: {} captured into CUDA graphs, {} replayed, {} eager (first of their size, prefills, graphs {}), {} captures given up; programmatic launch {} at the end",
                g.captured,
                g.replayed,
                g.eager,
                on_off(graphs),
                g.abandoned,
                on_off(model.backend().programmatic_launch())
            );
            print_kv_cache(model.backend().kv_cache());
            if profile > 0 {
                bench_profile(&model, opts, profile, bw)?;
            }
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => {
            Err("this cloud-core was built without the CUDA backend (cargo feature `cuda`)".into())
        }
    }
}

/// Each batch size's decode steps, `steps` of them eager with an event before every
/// operation: the time per operation, per step.
#[cfg(feature = "cuda")]
fn bench_profile(
    model: &Model<cloud_core::engine::backend::cuda::Cuda>,
    opts: &BenchOptions,
    steps: usize,
    bw: f64,
) -> Result<(), String> {
    let be = model.backend();
    for &b in &opts.batches {
        let each = BenchOptions {
            steps,
            ..opts.clone()
        };
        let run = bench::decode_after(model, &each, b, || be.set_profiling(true));
        let p = be.take_profile();
        run?;
        let n = p.steps.max(1) as f64;
        let total: f64 = p.ops.iter().map(|o| o.ms).sum();
        println!(
            "profile, batch {b}: {} eager decode steps, {:.3} ms per step between the first \
             operation's event and the last's end (each operation's time runs to the next \
             one's event: it includes the device waiting for the host's next launch)",
            p.steps,
            total / n
        );
        println!(
            "| operation | calls per step | µs per step | share | weights read, GB/s (copy: {:.0}) |",
            bw / 1e9
        );
        println!("| --- | ---: | ---: | ---: | ---: |");
        for o in &p.ops {
            // The projections' and experts' weights over their time: how near each comes to
            // the copy.
            let rate = if o.weight_bytes > 0 && o.ms > 0.0 {
                match o.weight_bytes as f64 / (o.ms * 1e-3) / 1e9 {
                    r if r >= 100.0 => format!("{r:.0}"),
                    r => format!("{r:.3}"),
                }
            } else {
                "—".into()
            };
            println!(
                "| {} | {:.1} | {:.1} | {:.1}% | {rate} |",
                o.op,
                o.calls as f64 / n,
                1e3 * o.ms / n,
                100.0 * o.ms / total.max(1e-12)
            );
        }
    }
    Ok(())
}

fn bench_model<B: Backend>(weights: Weights<'_>, be: B) -> Result<Model<B>, String> {
    let t = Instant::now();
    let (model, what) = match weights {
        Weights::Checkpoint(dir) => (
            Model::load(dir, be).map_err(|e| e.to_string())?,
            dir.display().to_string(),
        ),
        Weights::Random(name, layers) => {
            let mut cfg = bench::shape(name)?;
            let what = match layers {
                Some(n) => {
                    cfg.num_hidden_layers = n;
                    format!("{name} with {n} layers")
                }
                None => name.to_string(),
            };
            (Model::random(cfg, be, 1).map_err(|e| e.to_string())?, what)
        }
    };
    let p = bench::parameters(model.config());
    println!(
        "shape {what}: {p:.3e} parameters; loaded in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(model)
}

/// `v` with `digits` significant digits (a small model's GB per step is not all zeros).
fn significant(v: f64, digits: i32) -> String {
    let magnitude = if v == 0.0 || !v.is_finite() {
        0
    } else {
        v.abs().log10().floor() as i32
    };
    format!("{v:.*}", (digits - 1 - magnitude).max(0) as usize)
}

/// The memory bandwidth `bench`'s roofline share is against, and how it was measured.
struct Roofline {
    bytes_per_s: f64,
    what: String,
}

fn bench_report<B: Backend>(
    model: &Model<B>,
    opts: &BenchOptions,
    roofline: &Roofline,
    weights: &str,
) -> Result<(), String> {
    println!("roofline: {}; held: {weights}", roofline.what);
    let bandwidth = roofline.bytes_per_s;
    let how = match opts.sample {
        None => "greedy".to_string(),
        Some((t, p)) => format!("sampled (temperature {t}, top-p {p})"),
    };
    println!(
        "prefill: {} prompt tokens per sequence, all sequences in one pass; decode: {} {how} steps after it",
        opts.prompt, opts.steps
    );
    println!("| batch | prefill tokens/s | decode tokens/s | ms per step | GB per step | GB/s | roofline share | host ms per replayed step |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    bench::run(model, opts, |r| {
        let achieved = r.step_bytes / (r.step_ms / 1e3);
        // The host's part of a step replayed from a graph: its walk over the layers,
        // which the device waits for.
        let host = r
            .replay_host_ms
            .map_or_else(|| "—".to_string(), |ms| format!("{ms:.3}"));
        println!(
            "| {} | {:.0} | {:.1} | {:.2} | {} | {:.0} | {:.0}% | {host} |",
            r.batch,
            r.prefill_tps,
            r.decode_tps,
            r.step_ms,
            significant(r.step_bytes / 1e9, 3),
            achieved / 1e9,
            100.0 * achieved / bandwidth
        );
    })?;
    println!("peak RSS {:.0} MiB", peak_rss_mib());
    Ok(())
}

/// Verdicts per second on simulated cases: one at a time, then all submitted at once
/// (the scheduler batches them).
fn bench_verdicts(dir: &std::path::Path, n: usize) -> Result<(), String> {
    use cloud_core::engine::scheduler::SchedulerConfig;
    use cloud_core::engine::service::Engine;
    use cloud_core::verdict::VerdictService;
    use shared::case::{CaseId, HardCase, Reason};
    use shared::sim::{SimConfig, Simulator};
    let mut sim = Simulator::new(SimConfig {
        machines: n,
        seed: 4242,
        fault_share: 0.6,
        ..SimConfig::default()
    });
    let mut windows: Vec<Vec<shared::record::Record>> = vec![Vec::new(); n];
    for _ in 0..shared::schema::WINDOW_LEN * 3 {
        for (i, r) in sim.tick().into_iter().enumerate() {
            let w = &mut windows[i];
            if w.len() == shared::schema::WINDOW_LEN {
                w.clear();
            }
            w.push(r.to_record());
        }
    }
    let cases: Vec<HardCase> = windows
        .into_iter()
        .map(|records| HardCase {
            id: CaseId::of_window(&records[0].machine, &records),
            machine: records[0].machine.clone(),
            start_ms: records[0].ts_ms,
            end_ms: records[records.len() - 1].ts_ms,
            features: shared::features::extract(&records).to_vec(),
            probs: vec![1.0 / 6.0; 6],
            reason: Reason::LowConfidence {
                max_prob: 1.0 / 6.0,
            },
            records,
        })
        .collect();
    let name = dir.display().to_string();
    let cfg = SchedulerConfig {
        max_batch: n.max(1),
        ..SchedulerConfig::default()
    };
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let engine = Engine::load_cpu(dir, &name, cfg).map_err(|e| format!("{e:#}"))?;
        let service = VerdictService::new(engine).map_err(|e| format!("{e:#}"))?;
        println!(
            "| verdicts ({n} simulated cases) | verdicts | seconds | verdicts/s | tokens/verdict |"
        );
        println!("| --- | ---: | ---: | ---: | ---: |");
        let t = Instant::now();
        let mut tokens = 0;
        for c in &cases {
            tokens += service
                .judge(c)
                .await
                .map_err(|e| e.to_string())?
                .completion_tokens;
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "| one at a time | {n} | {s:.2} | {:.1} | {:.1} |",
            n as f64 / s,
            tokens as f64 / n as f64
        );
        let t = Instant::now();
        let all = futures_util::future::join_all(cases.iter().map(|c| service.judge(c))).await;
        let s = t.elapsed().as_secs_f64();
        let mut tokens = 0;
        for j in all {
            tokens += j.map_err(|e| e.to_string())?.completion_tokens;
        }
        println!(
            "| all at once (batched) | {n} | {s:.2} | {:.1} | {:.1} |",
            n as f64 / s,
            tokens as f64 / n as f64
        );
        Ok::<(), String>(())
    })
}

#[allow(clippy::too_many_arguments)]
fn generate_cmd(
    dir: &std::path::Path,
    prompt: &str,
    params: cloud_core::engine::sampler::SamplingParams,
    json: bool,
    chat: Option<Option<String>>,
    schema: Option<&std::path::Path>,
) -> Result<(), String> {
    use cloud_core::engine::chat::{generation_eos, ChatTemplate, Message};
    use cloud_core::engine::generate::{generate, Request};
    use cloud_core::engine::tokenizer::Tokenizer;
    let tok = Tokenizer::load(dir).map_err(|e| e.to_string())?;
    let model = Model::load(dir, Cpu::default()).map_err(|e| e.to_string())?;
    let ids = match chat {
        None => tok.encode(prompt).map_err(|e| e.to_string())?,
        Some(system) => {
            let template = ChatTemplate::load(dir)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| {
                    format!(
                        "{}: no chat_template (drop --chat to send the prompt as it is)",
                        dir.join("tokenizer_config.json").display()
                    )
                })?;
            let mut messages = Vec::new();
            if let Some(s) = system {
                messages.push(Message {
                    role: "system".into(),
                    content: s,
                });
            }
            messages.push(Message {
                role: "user".into(),
                content: prompt.to_string(),
            });
            let text = template
                .render(&messages, true)
                .map_err(|e| e.to_string())?;
            tok.encode_raw(&text).map_err(|e| e.to_string())?
        }
    };
    let mut params = params;
    params.stop_tokens = model.config().eos_token_ids.clone();
    for t in generation_eos(dir).map_err(|e| e.to_string())? {
        if !params.stop_tokens.contains(&t) {
            params.stop_tokens.push(t);
        }
    }
    let constraint = match schema {
        None => None,
        Some(file) => {
            let text =
                std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
            let schema: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| format!("{}: not JSON: {e}", file.display()))?;
            let eos = *params.stop_tokens.first().ok_or_else(|| {
                "the checkpoint names no eos_token_id, so --schema cannot end the answer"
                    .to_string()
            })?;
            let grammars =
                cloud_core::engine::constrain::Grammars::load(dir, model.config().vocab_size, eos)
                    .map_err(|e| e.to_string())?;
            Some(
                grammars
                    .json_schema(&schema)
                    .map_err(|e| format!("{}: {e}", file.display()))?,
            )
        }
    };
    let out = generate(
        &model,
        vec![Request {
            prompt: ids.clone(),
            params,
            constraint,
        }],
    )
    .map_err(|e| e.to_string())?
    .remove(0);
    let text = tok.decode(&out.tokens).map_err(|e| e.to_string())?;
    if json {
        let piece = |t: u32| tok.decode(&[t]).unwrap_or_default();
        let steps: Vec<serde_json::Value> = out
            .steps
            .iter()
            .map(|s| {
                serde_json::json!({
                    "token": s.token,
                    "text": piece(s.token),
                    "logprob": s.logprob,
                    "top_logprobs": s.top.iter().map(|(t, lp)| serde_json::json!({"token": t, "text": piece(*t), "logprob": lp})).collect::<Vec<_>>(),
                })
            })
            .collect();
        let v = serde_json::json!({
            "prompt_ids": ids,
            "token_ids": out.tokens,
            "text": text,
            "finish_reason": out.finish.as_str(),
            "steps": steps,
        });
        println!("{v}");
    } else {
        println!("{text}");
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM. The handlers are installed when it is called (in the
/// runtime's context), not when it is first polled: a signal sent as soon as the server
/// says it is listening finds them in place instead of ending the process.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let signals = {
        use tokio::signal::unix::{signal, SignalKind};
        signal(SignalKind::interrupt())
            .and_then(|int| Ok((int, signal(SignalKind::terminate())?)))
            .ok()
    };
    async move {
        #[cfg(unix)]
        if let Some((mut int, mut term)) = signals {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("a share is a number within 0–1 (got {s:?})")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Demo(args) => demo::main(args),
        Cmd::Ca { command } => match ca_cmd(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cloud-core ca: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Device { command } => match device_cmd(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cloud-core device: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Generate {
            model,
            prompt,
            max_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            top_logprobs,
            json,
            chat,
            system,
            schema,
        } => {
            let params = cloud_core::engine::sampler::SamplingParams {
                temperature,
                top_k,
                top_p,
                repetition_penalty,
                seed,
                max_tokens,
                stop_tokens: Vec::new(),
                top_logprobs,
            };
            let chat = chat.then_some(system);
            match generate_cmd(&model, &prompt, params, json, chat, schema.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cloud-core generate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Bench {
            shape,
            model,
            layers,
            engine,
            verdicts,
            prompt,
            steps,
            batches,
            backend,
            temperature,
            top_p,
            profile,
        } => {
            let run = || -> Result<(), String> {
                let batches = batches
                    .split(',')
                    .map(|b| {
                        b.trim()
                            .parse::<usize>()
                            .ok()
                            .filter(|b| *b > 0)
                            .ok_or_else(|| format!("--batches: {b:?} is not a positive number"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if !(temperature.is_finite() && temperature >= 0.0) {
                    return Err(format!("--temperature must be ≥ 0 (got {temperature})"));
                }
                if !(top_p > 0.0 && top_p <= 1.0) {
                    return Err(format!("--top-p must be within (0, 1] (got {top_p})"));
                }
                let opts = BenchOptions {
                    prompt,
                    steps,
                    batches,
                    sample: (temperature > 0.0).then_some((temperature, top_p)),
                    elements: bench::ElementBytes::BF16,
                };
                let engine = backend.apply(engine)?;
                let model_of = match (&model, layers) {
                    (Some(_), Some(_)) => {
                        return Err("--layers changes a --shape, not a --model checkpoint".into())
                    }
                    (Some(dir), None) => Weights::Checkpoint(dir),
                    (None, layers) => Weights::Random(&shape, layers.map(|l| l as usize)),
                };
                bench(model_of, engine, &opts, profile)?;
                match &model {
                    Some(dir) if verdicts > 0 => bench_verdicts(dir, verdicts),
                    _ => Ok(()),
                }
            };
            match run() {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cloud-core bench: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Serve {
            data_dir,
            listen_http,
            model,
            model_name,
            listen_quic,
            ca,
            engine,
            backend,
            token,
            max_batch,
            max_queue,
            target_share,
            queue_high,
            log,
        } => {
            let engine = match backend.apply(engine) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("cloud-core serve: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let filter = tracing_subscriber::EnvFilter::try_new(&log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .init();
            let (model, model_name) = match model {
                Some(m) => (m, model_name),
                None => match cloud_core::demo_model::extract(&data_dir.join("demo-model")) {
                    Ok(dir) => (
                        dir,
                        model_name.or_else(|| Some(cloud_core::demo_model::NAME.to_string())),
                    ),
                    Err(e) => {
                        eprintln!("cloud-core serve: {e:#}");
                        return ExitCode::FAILURE;
                    }
                },
            };
            let model_name = model_name.unwrap_or_else(|| {
                std::fs::canonicalize(&model)
                    .ok()
                    .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .unwrap_or_else(|| "model".into())
            });
            let opts = cloud_core::server::ServeOptions {
                data_dir,
                listen_http,
                model,
                model_name,
                token,
                quic: listen_quic.zip(ca),
                steer: cloud_core::fleet::steer::SteerConfig {
                    default_target: target_share,
                    queue_high,
                },
                scheduler: cloud_core::engine::scheduler::SchedulerConfig {
                    max_batch,
                    max_queue,
                    ..Default::default()
                },
                device: engine,
            };
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cloud-core serve: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let stop = {
                let _in_runtime = rt.enter();
                shutdown_signal()
            };
            match rt.block_on(cloud_core::server::run(opts, stop)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cloud-core serve: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
