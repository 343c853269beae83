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
// Named so that `cargo test -- --skip emulated_device` leaves out every test here.
#[path = "cuda_suite/mod.rs"]
mod emulated_device;

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

/// `cloud-core bench --engine cuda` end to end on the emulated device (the libraries
/// found on `LD_LIBRARY_PATH`, as on a GPU machine): random weights made on the device,
/// the copy bandwidth timed with events, prefill and decode at two batch sizes, decode
/// steps replayed from CUDA graphs, and the profile of eager decode steps per operation.
#[test]
fn the_cuda_benchmark_runs_on_the_emulated_device() {
    let dir = match emu::build(true) {
        Ok(d) => d,
        Err(e) => return emu::skip_or_fail(&e),
    };
    // Greedy, then sampled on the device, then greedy with a profile, then without the
    // tensor-core kernels and programmatic launches (the emulated device is an sm_90
    // one, which has both) in a KV budget of a quarter GiB; then with a driver that
    // refuses programmatic launches in a capture.
    let profiled = &["--profile", "2"][..];
    // Profiled with every decode step's attention on the tensor cores (the tiny shape has
    // two query heads per key head: attention_batch's by default).
    let mma = &["--profile", "2", "--mma-decode-group", "1"][..];
    let plain = &[
        "--no-tensor-core-kernels",
        "--no-pdl",
        "--kv-cache-gib",
        "0.25",
    ][..];
    for (extra, refused) in [
        (&[][..], false),
        (&["--temperature", "1", "--top-p", "0.9"], false),
        (profiled, false),
        (mma, false),
        (plain, false),
        (&[], true),
    ] {
        let mut bench = std::process::Command::new(env!("CARGO_BIN_EXE_cloud-core"));
        bench
            .args(["bench", "--engine", "cuda", "--shape", "tiny"])
            .args(["--prompt", "8", "--steps", "5", "--batches", "1,3"])
            .args(extra)
            .env("LD_LIBRARY_PATH", &dir);
        if refused {
            bench.env("EMU_REFUSE_PDL", "1");
        }
        let out = bench.output().expect("cloud-core runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{extra:?}: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("CUDA device emulated on the CPU"), "{text}");
        let on = if extra == plain { "off" } else { "on" };
        let decode = if extra == mma {
            " (decode attention on them at 1 or more query heads per key head)"
        } else {
            ""
        };
        assert!(
            text.contains(&format!(
                "tensor-core kernels {on}{decode}, graphs on, programmatic launch {on})"
            )),
            "{extra:?}: {text}"
        );
        for batch in ["| 1 |", "| 3 |"] {
            let row = text.lines().find(|l| l.starts_with(batch));
            let row = row.unwrap_or_else(|| panic!("no row for batch {batch}: {text}"));
            // The host's time per replayed step: every batch size has steps replayed,
            // even where its first capture is given up (see below).
            let host = row.split('|').map(str::trim).nth(8).unwrap_or("");
            let host: f64 = host
                .parse()
                .unwrap_or_else(|_| panic!("{extra:?}: no host time: {row}"));
            assert!(host > 0.0, "{row}");
        }
        // Per batch size: the prefill and the first decode step run eagerly, the second
        // is captured, the other three replayed. Where the driver refuses programmatic
        // launches in a capture, the first capture (batch 1's) is given up and its step
        // run again eagerly, programmatic launches end, and the next step is captured
        // plainly: graphs are not lost to it.
        let stats: &[&str] = if refused {
            &[
                "2 captured into CUDA graphs, 5 replayed",
                "1 captures given up; programmatic launch off at the end",
            ]
        } else {
            &[
                "2 captured into CUDA graphs, 6 replayed",
                "0 captures given up; programmatic launch {on} at the end",
            ]
        };
        for s in stats {
            assert!(
                text.contains(s.replace("{on}", on).as_str()),
                "{extra:?}: {text}"
            );
        }
        // The KV cache's memory after the runs: the last batch's sequences are gone,
        // their blocks kept for reuse.
        let kv = text
            .lines()
            .find(|l| l.starts_with("KV cache at the end: "));
        let kv = kv.unwrap_or_else(|| panic!("{extra:?}: no KV cache line: {text}"));
        assert!(
            kv.contains("0.000 GiB held") && kv.contains(" allocation"),
            "{kv}"
        );
        if extra == plain {
            assert!(kv.ends_with("of a 0.25 GiB budget"), "{kv}");
        }
        if extra == profiled || extra == mma {
            let attention = if extra == mma {
                "attention_mma"
            } else {
                "attention_batch"
            };
            // Per batch size, 2 steps: a row per operation with its calls per step (the
            // tiny shape has 2 dense layers: 2 attention launches, which also append the
            // step's keys and values to the caches and merge split positions, 2 q/k/v
            // projections with the norm and RoPE folded in, the norms folded into the
            // gate/up and lm_head projections — no norm or RoPE launch of its own —, the
            // output and down projections, 1 pick).
            for batch in [1, 3] {
                let head = format!("profile, batch {batch}: 2 eager decode steps");
                let at = text
                    .find(&head)
                    .unwrap_or_else(|| panic!("no {head:?}: {text}"));
                let table = &text[at..];
                let table = &table[..table.find("\n\n").unwrap_or(table.len())];
                for (op, calls) in [
                    (attention, 2.0),
                    ("gemv_bf16_norm_rope", 2.0),
                    ("gemv_bf16_norm", 1.0),
                    ("gemv_swiglu_norm", 2.0),
                    ("gemv_bf16", 4.0),
                    ("sample_rows", 1.0),
                ] {
                    let row = table
                        .lines()
                        .find(|l| l.starts_with(&format!("| {op} |")))
                        .unwrap_or_else(|| panic!("batch {batch}: no {op} row: {table}"));
                    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
                    assert_eq!(cells[2].parse::<f64>().ok(), Some(calls), "{row}");
                    let us: f64 = cells[3].parse().expect("µs per step");
                    assert!(us > 0.0, "{row}");
                    // The projections' weight bandwidth; none counted for the others.
                    if op.starts_with("gemv") {
                        let rate: f64 = cells[5].parse().expect("GB/s");
                        assert!(rate > 0.0, "{row}");
                    } else {
                        assert_eq!(cells[5], "—", "{row}");
                    }
                }
                // Nothing else is launched: no norm or RoPE apart from its projection, no
                // cache append and no merge of split positions apart from the attention
                // (the embedding gather aside).
                let known = [
                    attention,
                    "gemv_bf16_norm_rope",
                    "gemv_bf16_norm",
                    "gemv_swiglu_norm",
                    "gemv_bf16",
                    "sample_rows",
                    "gather_rows_bf16",
                ];
                for row in table.lines().filter(|l| l.starts_with("| ")) {
                    let op = row.split('|').nth(1).map_or("", str::trim);
                    if op == "operation" || op.starts_with("---") {
                        continue;
                    }
                    assert!(
                        known.contains(&op),
                        "batch {batch}: {op} launched apart (a norm or RoPE apart from its \
                         projection, a cache append or a merge apart from the attention?): \
                         {table}"
                    );
                }
            }
        }
    }
}

/// `cloud-core serve --engine cuda` on the emulated device (the libraries found on
/// `LD_LIBRARY_PATH`, as on a GPU machine) with a KV budget from its command line: a
/// completion is served, and the engine status names the backend with its settings and
/// reports the paged cache within that budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_the_emulated_device_reports_its_backend_and_kv_cache() {
    use std::io::BufRead;
    let dir = match emu::build(true) {
        Ok(d) => d,
        Err(e) => return emu::skip_or_fail(&e),
    };
    let data = tempfile::tempdir().expect("tempdir");
    let token = "emulated-device-token-0123";
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cloud-core"))
        .args(["serve", "--engine", "cuda", "--kv-cache-gib", "0.25"])
        .args([
            "--listen-http",
            "127.0.0.1:0",
            "--log",
            "warn",
            "--token",
            token,
        ])
        .arg("--data-dir")
        .arg(data.path())
        .env("LD_LIBRARY_PATH", &dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("cloud-core serve starts");
    let stdout = child.stdout.take().expect("stdout");
    /// Stops the server however the test ends.
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _stop = Stop(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(a) = line.strip_prefix("cloud-core listening on ") {
                let _ = tx.send(a.split_whitespace().next().unwrap_or_default().to_string());
            }
        }
    });
    let http = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("cloud-core serve reports its address within 120 s");
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(120))
        .build()
        .expect("client");
    let r = client
        .post(format!("{http}/v1/completions"))
        .bearer_auth(token)
        .json(&serde_json::json!({"prompt": "pump-01 runs hot", "max_tokens": 4, "temperature": 0}))
        .send()
        .await
        .expect("completion");
    assert_eq!(r.status().as_u16(), 200);
    let v: serde_json::Value = r.json().await.expect("JSON");
    assert!(v["choices"][0]["text"].is_string(), "{v}");
    // The engine publishes a step's figures once it has sent its tokens: the status is
    // read until they account for every step (for 20 s at most).
    let ran = |st: &serde_json::Value| {
        let g = &st["graphs"];
        let n = |k: &str| g[k].as_u64().unwrap_or(0);
        st["steps"].as_u64() == Some(n("captured") + n("replayed") + n("eager"))
    };
    let mut status = serde_json::Value::Null;
    for _ in 0..200 {
        status = client
            .get(format!("{http}/api/v1/engine"))
            .bearer_auth(token)
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("JSON");
        if ran(&status) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        status["backend"],
        "cuda: CUDA device emulated on the CPU (device 0, tensor-core kernels on, graphs on, \
         programmatic launch on)",
        "{status}"
    );
    let kv = &status["kv_cache"];
    assert_eq!(kv["limit_bytes"], 1u64 << 28, "{status}");
    let (held, allocated) = (
        kv["held_bytes"].as_u64().expect("held"),
        kv["allocated_bytes"].as_u64().expect("allocated"),
    );
    assert!(
        held <= allocated && 0 < allocated && allocated <= 1 << 28,
        "{status}"
    );
    let allocations = kv["allocations"].as_u64().expect("allocations");
    assert!(allocations > 0, "{status}");
    // The same figures as metrics.
    let metrics = client
        .get(format!("{http}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for (name, value) in [
        ("engine_kv_cache_allocated_bytes", allocated),
        ("engine_kv_cache_allocations", allocations),
        ("engine_kv_cache_limit_bytes", 1 << 28),
    ] {
        let got = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse::<f64>().ok());
        assert_eq!(got, Some(value as f64), "{name}: {metrics}");
    }
    // The emulated device's 4 GiB, less the weights, caches and activations.
    let mem = &status["device_memory"];
    assert_eq!(mem["total_bytes"], 4u64 << 30, "{status}");
    let free = mem["free_bytes"].as_u64().expect("free");
    assert!(allocated < (4 << 30) - free, "{status}");
    // Every step the scheduler ran: the prompt's eagerly, the decode steps captured,
    // replayed or (the first of their batch size) eager.
    assert!(ran(&status), "{status}");
    assert!(status["graphs"]["eager"].as_u64() >= Some(1), "{status}");
}

/// The serving path on the emulated device: the engine thread, the continuous-batching
/// scheduler (prefill and decode steps of several requests together, graphed decode
/// steps) and schema-constrained verdicts from the embedded demo model, against the same
/// verdicts from the CPU engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verdicts_on_the_emulated_device_match_the_cpu_engine() {
    use cloud_core::engine::scheduler::SchedulerConfig;
    use cloud_core::engine::service::{Device, Engine};
    use cloud_core::verdict::VerdictService;
    if !prepare() {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("demo-model");
    let mut sim = shared::sim::Simulator::new(shared::sim::SimConfig {
        machines: 4,
        seed: 77,
        fault_share: 0.6,
        ..Default::default()
    });
    let mut windows: Vec<Vec<serde_json::Value>> = vec![Vec::new(); 4];
    for _ in 0..shared::schema::WINDOW_LEN {
        for (i, r) in sim.tick().into_iter().enumerate() {
            windows[i].push(r.to_record().to_json());
        }
    }
    let cases: Vec<shared::case::HardCase> = windows
        .into_iter()
        .map(|records| {
            let v = serde_json::json!({"records": records, "probs": {"normal": 0.5, "overheating": 0.5}});
            shared::case::HardCase::from_json(&v).expect("case")
        })
        .collect();
    let judge_all = |device: Device| {
        let dir = dir.clone();
        let cases = cases.clone();
        async move {
            let engine =
                Engine::load(&dir, "demo", SchedulerConfig::default(), device).expect("engine");
            let service = VerdictService::new(engine.clone()).expect("verdicts");
            // All at once: the scheduler batches them.
            let judged =
                futures_util::future::join_all(cases.iter().map(|c| service.judge(c))).await;
            let verdicts = judged
                .into_iter()
                .map(|j| j.expect("a verdict").verdict)
                .collect::<Vec<_>>();
            (verdicts, engine)
        }
    };
    let (cpu, _) = judge_all(Device::Cpu(Default::default())).await;
    // A budget of 64 MiB, which the status reports with what the cached prompts hold.
    let (cuda, engine) = judge_all(Device::Cuda(cloud_core::engine::service::CudaSettings {
        kv_cache_bytes: Some(64 << 20),
        ..Default::default()
    }))
    .await;
    assert!(
        engine
            .backend()
            .starts_with("cuda: CUDA device emulated on the CPU"),
        "{}",
        engine.backend()
    );
    // Published after the step that empties the batch (the answers may come first).
    let mut kv = None;
    for _ in 0..200 {
        kv = engine.handle().stats().backend().kv_cache;
        if engine
            .handle()
            .stats()
            .running
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
            && kv.is_some()
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let kv = kv.expect("a paged cache");
    assert_eq!(kv.limit_bytes, 64 << 20, "{kv:?}");
    assert!(
        0 < kv.held_bytes
            && kv.held_bytes <= kv.allocated_bytes
            && kv.allocated_bytes <= kv.limit_bytes,
        "{kv:?}"
    );
    for (i, (c, g)) in cpu.iter().zip(&cuda).enumerate() {
        assert_eq!(c.class, g.class, "case {i}: CPU {c:?}, CUDA {g:?}");
        assert!((0.0..=1.0).contains(&g.confidence), "case {i}: {g:?}");
    }
}
