//! The CUDA backend's tests, run by `tests/cuda.rs` (a real GPU) and
//! `tests/cuda_on_cpu.rs` (the CUDA libraries emulated on the CPU), which include this
//! module: the including crate's `prepare()` says whether to run.
//!
//! The rule (bf16 weights and cache against f32 references): at every prefill position
//! and decode step `max|Δlogit| / max|logit| ≤ 2e-2`, and the greedy token is the
//! reference's wherever the reference's top-2 margin exceeds 0.05. Decode steps are fed
//! the reference's tokens, so a near-tie elsewhere cannot derail later comparisons.

#[path = "../common/mod.rs"]
mod common;
#[path = "../common/reference.rs"]
mod reference;

use cloud_core::engine::backend::cpu::{Cpu, CpuBuf};
use cloud_core::engine::backend::cuda::{unavailable, Cuda, CudaOptions};
use cloud_core::engine::backend::{Backend, DeviceError, KvShape};
use cloud_core::engine::model::{Cache, Model};
use cloud_core::engine::sampler::log_softmax;
use reference::{argmax, cases, check_token, fixtures, rel_diff, run_forced as run, ARCHS};

const TOLERANCE: f64 = reference::BF16_TOLERANCE;

/// The backend, or `None` with the reason printed. `CLOUD_CORE_REQUIRE_GPU=1` (set by
/// `.ci/gpu`) makes a missing GPU a failure.
fn gpu(opts: CudaOptions) -> Option<Cuda> {
    if !crate::prepare() {
        return None;
    }
    if let Some(why) = unavailable() {
        assert!(
            std::env::var("CLOUD_CORE_REQUIRE_GPU").map_or(true, |v| v != "1"),
            "CLOUD_CORE_REQUIRE_GPU=1 but {why}"
        );
        eprintln!("skipped: {why}");
        return None;
    }
    Some(
        Cuda::new(opts)
            .unwrap_or_else(|e| panic!("a GPU is present but the backend does not start: {e}")),
    )
}

/// With the tensor-core kernels (attention, grouped expert GEMMs) where the device has
/// them, and without (the kernels of older devices); and with every decode step's
/// attention on the tensor cores (`attention_mma` split over a decode row's positions
/// with fewer query heads per key head than a tile has slots, which the defaults leave
/// to `attention_batch`).
#[test]
fn cuda_logits_match_the_reference_and_the_cpu_backend() {
    let Some(_) = gpu(CudaOptions::default()) else {
        return;
    };
    let default_group = CudaOptions::default().mma_decode_group;
    let variants = [(true, default_group), (false, default_group), (true, 1)];
    for (arch, (tensor_core_kernels, mma_decode_group)) in ARCHS
        .iter()
        .flat_map(|a| variants.iter().map(move |v| (a, *v)))
    {
        let dir = fixtures().join(arch);
        let cpu = Model::load(&dir, Cpu::default()).expect("cpu model");
        let opts = CudaOptions {
            tensor_core_kernels,
            mma_decode_group,
            ..Default::default()
        };
        let mut cuda = Model::load(&dir, gpu(opts).expect("gpu")).expect("cuda model");
        let modes: &[bool] = if cuda.config().mla.is_some() {
            &[true, false]
        } else {
            &[true]
        };
        let vocab = cuda.config().vocab_size;
        for &absorbed in modes {
            cuda.set_mla_absorbed(absorbed);
            let label = format!(
                "{arch}{}{}{}",
                if absorbed { "" } else { " (expanded MLA)" },
                if tensor_core_kernels {
                    ""
                } else {
                    " (no tensor-core kernels)"
                },
                if mma_decode_group == default_group {
                    ""
                } else {
                    " (decode attention on the tensor cores)"
                }
            );
            let mut worst = 0f64;
            for case in cases(arch) {
                let (prefill, steps) = run(&cuda, &case);
                let (cpu_prefill, cpu_steps) = run(&cpu, &case);
                for (pos, want) in case.prefill.iter().enumerate() {
                    let got = &prefill[pos * vocab..(pos + 1) * vocab];
                    for (against, w) in [
                        ("reference", want.as_slice()),
                        ("CPU", &cpu_prefill[pos * vocab..(pos + 1) * vocab]),
                    ] {
                        let d = rel_diff(got, w);
                        worst = worst.max(d);
                        assert!(
                            d <= TOLERANCE,
                            "{label}/{}: prefill {pos} vs {against}: {d:e}",
                            case.name
                        );
                    }
                    check_token(&label, &format!("{} prefill {pos}", case.name), got, want);
                }
                for (step, want) in case.steps.iter().enumerate() {
                    for (against, w) in [
                        ("reference", want.as_slice()),
                        ("CPU", cpu_steps[step].as_slice()),
                    ] {
                        let d = rel_diff(&steps[step], w);
                        worst = worst.max(d);
                        assert!(
                            d <= TOLERANCE,
                            "{label}/{}: step {step} vs {against}: {d:e}",
                            case.name
                        );
                    }
                    check_token(
                        &label,
                        &format!("{} step {step}", case.name),
                        &steps[step],
                        want,
                    );
                }
            }
            println!("{label}: CUDA parity holds; worst max|Δlogit|/max|logit| = {worst:.2e}");
        }
    }
}

#[test]
#[allow(clippy::needless_range_loop)] // `step` indexes every sequence's reference
fn cuda_batched_decode_gives_the_tokens_of_one_at_a_time() {
    let Some(be) = gpu(CudaOptions::default()) else {
        return;
    };
    let mut be = Some(be);
    for arch in ARCHS {
        let be = be
            .take()
            .unwrap_or_else(|| gpu(CudaOptions::default()).expect("gpu"));
        let model = Model::load(&fixtures().join(arch), be).expect("model");
        let vocab = model.config().vocab_size;
        let cases = cases(arch);
        // One at a time.
        let alone: Vec<Vec<Vec<f32>>> = cases.iter().map(|c| run(&model, c).1).collect();
        // All together, prefill in one batch, then every step in one batch.
        let mut caches: Vec<_> = cases.iter().map(|_| model.new_cache()).collect();
        let mut inputs: Vec<Vec<u32>> = cases.iter().map(|c| c.prompt.clone()).collect();
        let n = cases.iter().map(|c| c.greedy.len()).min().unwrap_or(0);
        for step in 0..n {
            let mut batch: Vec<(&[u32], &mut _)> = inputs
                .iter()
                .map(|v| v.as_slice())
                .zip(caches.iter_mut())
                .collect();
            let out = model.forward_batch_last(&mut batch).expect("batch");
            let greedy = model.forward_batch_greedy(&mut []).expect("empty batch");
            assert!(greedy.is_empty());
            for (s, logits) in out.iter().enumerate() {
                let d = rel_diff(logits, &alone[s][step]);
                assert!(
                    d <= TOLERANCE,
                    "{arch}: batched step {step}, sequence {s}: {d:e}"
                );
                check_token(
                    arch,
                    &format!("batched step {step}, sequence {s}"),
                    logits,
                    &cases[s].steps[step],
                );
                assert_eq!(logits.len(), vocab);
            }
            inputs = cases.iter().map(|c| vec![c.greedy[step]]).collect();
        }
        // Greedy on the device picks what the host would.
        let mut caches: Vec<_> = cases.iter().map(|_| model.new_cache()).collect();
        let mut batch: Vec<(&[u32], &mut _)> = cases
            .iter()
            .map(|c| c.prompt.as_slice())
            .zip(caches.iter_mut())
            .collect();
        let picks = model.forward_batch_greedy(&mut batch).expect("greedy");
        for (s, pick) in picks.iter().enumerate() {
            let want = &alone[s][0];
            assert_eq!(
                pick.token,
                argmax(want),
                "{arch}: device argmax, sequence {s}"
            );
            // Within what batching may change the logits by (the rule above), twice.
            let lp = log_softmax(want)[pick.token as usize];
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(
                (pick.logprob - lp).abs() <= 2.0 * TOLERANCE as f32 * scale,
                "{arch}: sequence {s}: log-probability {} vs {lp}",
                pick.logprob
            );
        }
    }
}

#[test]
fn cuda_prefix_sharing_gives_the_logits_of_a_fresh_run() {
    let Some(be) = gpu(CudaOptions {
        block_rows: 4,
        ..Default::default()
    }) else {
        return;
    };
    let model = Model::load(&fixtures().join("deepseek_v2_lite"), be).expect("model");
    // A chunk of one row attends on the CUDA cores, a longer one on the tensor cores
    // (queries and probabilities in bf16).
    reference::prefix_sharing_gives_the_logits_of_a_fresh_run(
        &model,
        &cases("deepseek_v2_lite")[0],
        1e-5,
        TOLERANCE,
    );
}

#[test]
fn cuda_a_step_that_does_not_fit_is_refused_and_changes_nothing() {
    // A budget of a few blocks: one short prompt fits, a long one does not.
    let Some(be) = gpu(CudaOptions {
        kv_cache_bytes: Some(16 << 10),
        block_rows: 4,
        chunk_bytes: 1,
        ..Default::default()
    }) else {
        return;
    };
    let model = Model::load(&fixtures().join("qwen2"), be).expect("model");
    reference::a_step_that_does_not_fit_is_refused_and_changes_nothing(&model);
}

#[test]
fn cuda_out_of_memory_is_a_typed_error() {
    let Some(be) = gpu(CudaOptions::default()) else {
        return;
    };
    let (free, _) = be.memory().expect("memory");
    let huge = free / 2 + (1 << 30);
    let _ = be.random_weight(&[huge, 2], 0.1, 1);
    match be.take_error() {
        Some(DeviceError::OutOfMemory { bytes, .. }) => assert!(bytes >= huge * 4),
        other => panic!("expected out of memory, got {other:?}"),
    }
    // The backend goes on working.
    let x = be.upload(&[1.0, 2.0]);
    assert_eq!(be.download(&x), vec![1.0, 2.0]);
}

/// A layer's attention reads the rows its step made room for, once for every layer
/// (`kv_grow`): without that room, over other caches than those grown, past the caches'
/// layers, or with caches of differing shapes in one step, it is refused by name (nothing
/// is written), and the backend goes on; done right, one position's attention is its
/// value.
#[test]
fn cuda_attention_without_room_made_is_refused() {
    let Some(be) = gpu(CudaOptions {
        kv_cache_bytes: Some(64 << 20),
        ..Default::default()
    }) else {
        return;
    };
    let (shape, s, [q, k, v]) = reference::tiny_attention(&be);
    let refused = |op: &str, what: &str| match be.take_error() {
        Some(DeviceError::Failed { op: o, message }) => {
            assert_eq!(o, op, "{what}: refused as {message}")
        }
        other => panic!("{what}: expected a refusal by {op}, got {other:?}"),
    };
    let (mut a, mut b) = (be.new_kv(shape), be.new_kv(shape));
    let out = be.attend(&q, &k, &v, &[1], 0, &mut [&mut a], s);
    assert_eq!(be.len(&out), 0);
    refused("attention", "no room made");
    be.kv_grow(&mut [&mut a], &[1]);
    be.attend(&q, &k, &v, &[1], 0, &mut [&mut b], s);
    refused("attention", "room made in another cache");
    be.kv_grow(&mut [&mut a], &[1]);
    be.attend(&q, &k, &v, &[1], 2, &mut [&mut a], s);
    refused("attention", "a layer past the caches'");
    let mut wide = be.new_kv(KvShape { kcols: 16, ..shape });
    be.kv_grow(&mut [&mut a, &mut wide], &[1, 1]);
    refused("kv_grow", "caches of two shapes");
    be.kv_grow(&mut [&mut b], &[1]);
    let out = be.attend(&q, &k, &v, &[1], 1, &mut [&mut b], s);
    assert!(be.take_error().is_none());
    // 0.25 is a bf16 value: the cache holds it exactly.
    assert_eq!(be.download(&out), vec![0.25; 16]);
}

/// Greedy decoding of `prompts` for `steps` steps (the first a prefill) on two models of
/// the same checkpoint, one running its steps eagerly and one with CUDA graphs: every
/// step's logits agree. With `leave`, the second sequence leaves the batch at that step.
fn graphed_against_eager(
    eager: &Model<Cuda>,
    graphed: &Model<Cuda>,
    prompts: Vec<Vec<u32>>,
    steps: usize,
    leave: Option<usize>,
    what: &str,
) {
    let mut ce: Vec<_> = prompts.iter().map(|_| eager.new_cache()).collect();
    let mut cg: Vec<_> = prompts.iter().map(|_| graphed.new_cache()).collect();
    let mut live: Vec<usize> = (0..prompts.len()).collect();
    let mut inputs = prompts;
    for step in 0..steps {
        if leave == Some(step) {
            live.remove(1);
        }
        let run = |model: &Model<Cuda>, caches: &mut Vec<Cache<Cuda>>| {
            let mut seqs: Vec<(&[u32], &mut _)> = caches
                .iter_mut()
                .enumerate()
                .filter(|(s, _)| live.contains(s))
                .map(|(s, cache)| (inputs[s].as_slice(), cache))
                .collect();
            model.forward_batch_last(&mut seqs).expect("step")
        };
        let want = run(eager, &mut ce);
        let got = run(graphed, &mut cg);
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            let d = rel_diff(g, w);
            assert!(
                d <= 1e-5,
                "{what}: step {step}, sequence {i}: graphed vs eager {d:e}"
            );
        }
        for (i, &s) in live.iter().enumerate() {
            inputs[s] = vec![argmax(&want[i])];
        }
    }
}

/// Decode steps captured into CUDA graphs and replayed give the logits of the same steps
/// run eagerly, through block-table updates (4-position blocks), new KV chunks wanted
/// while capturing (one block per chunk: those captures are given up and run eagerly),
/// an arena and a staging area too small at first (given up, doubled, captured again),
/// and a batch that shrinks (a second graph).
#[test]
fn cuda_graphs_replay_decode_steps_as_they_run_eagerly() {
    let opts = |graphs: bool| CudaOptions {
        block_rows: 4,
        chunk_bytes: 1,
        graphs,
        graph_memory: (16 << 10, 256),
        ..Default::default()
    };
    if gpu(opts(false)).is_none() {
        return;
    }
    for arch in ["qwen2", "deepseek_v2_lite", "deepseek_v3"] {
        let dir = fixtures().join(arch);
        let eager = Model::load(&dir, gpu(opts(false)).expect("gpu")).expect("model");
        let graphed = Model::load(&dir, gpu(opts(true)).expect("gpu")).expect("model");
        let cases = cases(arch);
        let mut prompts: Vec<Vec<u32>> = cases.iter().map(|c| c.prompt.clone()).collect();
        prompts.push(cases[0].prompt.iter().rev().copied().collect());
        // One sequence finishes at step 12: the batch shrinks.
        graphed_against_eager(&eager, &graphed, prompts, 22, Some(12), arch);
        let st = graphed.backend().graph_stats();
        assert!(st.captured >= 2, "{arch}: {st:?}");
        assert!(st.replayed >= 8 && st.abandoned >= 2, "{arch}: {st:?}");
        assert_eq!(eager.backend().graph_stats().captured, 0);
        println!("{arch}: graphed decode matches eager; {st:?}");
    }
}

/// A decode batch large enough that the experts go through the grouped GEMMs (more rows
/// per expert than the expert kernels take in one pass) is captured into a graph and
/// replayed, with the logits of the same steps run eagerly.
#[test]
fn cuda_graphs_replay_large_moe_decode_batches() {
    use cloud_core::engine::config::ModelConfig;
    let opts = |graphs: bool| CudaOptions {
        graphs,
        ..Default::default()
    };
    if gpu(opts(false)).is_none() {
        return;
    }
    let dir = fixtures().join("deepseek_v3");
    let cfg = ModelConfig::from_file(&dir.join("config.json")).expect("config");
    let moe = cfg.moe.as_ref().expect("an MoE fixture");
    let seqs = 25;
    assert!(
        seqs * moe.num_experts_per_tok > 8 * moe.n_routed_experts,
        "too few rows per expert for the grouped GEMMs"
    );
    let eager = Model::load(&dir, gpu(opts(false)).expect("gpu")).expect("model");
    let graphed = Model::load(&dir, gpu(opts(true)).expect("gpu")).expect("model");
    let vocab = cfg.vocab_size as u32;
    let prompts: Vec<Vec<u32>> = (0..seqs as u32)
        .map(|s| {
            (0..3 + s % 4)
                .map(|i| (7 * s + 3 * i + 1) % vocab)
                .collect()
        })
        .collect();
    graphed_against_eager(&eager, &graphed, prompts, 5, None, "deepseek_v3");
    let st = graphed.backend().graph_stats();
    assert!(st.captured >= 1 && st.replayed >= 2, "{st:?}");
    println!("{seqs} sequences: graphed decode matches eager; {st:?}");
}

/// Pseudo-random values in [-1, 1), rounded to bf16 (what the device stores).
fn bf16_values(n: usize, seed: u64) -> Vec<half::bf16> {
    common::rand_vec(n, seed)
        .into_iter()
        .map(half::bf16::from_f32)
        .collect()
}

/// The routed experts of a prompt's rows and of a decode step of many sequences (grouped
/// GEMMs on the tensor cores, one launch per projection for every expert), and of a
/// decode step of a few (the expert kernels), against the host's routing and SwiGLU of
/// the same weights; profiled, the expert kernels count the weights of the experts
/// reached.
#[test]
fn cuda_prompt_and_decode_experts_match_the_host() {
    use cloud_core::engine::backend::Weight;
    use cloud_core::engine::config::{MoeConfig, ScoringFunc, TopkMethod};
    use cloud_core::engine::model::route;
    let Some(gpu) = gpu(CudaOptions::default()) else {
        return;
    };
    let (t, n, hidden, inter) = (24, 8, 64, 32);
    let moe = MoeConfig {
        n_routed_experts: n,
        n_shared_experts: 0,
        num_experts_per_tok: 3,
        moe_intermediate_size: inter,
        first_k_dense_replace: 0,
        moe_layer_freq: 1,
        topk_method: TopkMethod::NoauxTc,
        scoring_func: ScoringFunc::Sigmoid,
        n_group: 2,
        topk_group: 1,
        norm_topk_prob: true,
        routed_scaling_factor: 2.5,
    };
    let f32s = |v: &[half::bf16]| -> Vec<f32> { v.iter().map(|x| x.to_f32()).collect() };
    let mats: Vec<[Vec<half::bf16>; 3]> = (0..n as u64)
        .map(|e| {
            [
                bf16_values(inter * hidden, 10 + e),
                bf16_values(inter * hidden, 20 + e),
                bf16_values(hidden * inter, 30 + e),
            ]
        })
        .collect();
    let bufs: Vec<[_; 3]> = mats
        .iter()
        .map(|m| {
            [
                gpu.upload_weight(Weight::Bf16(&m[0]), &[inter, hidden]),
                gpu.upload_weight(Weight::Bf16(&m[1]), &[inter, hidden]),
                gpu.upload_weight(Weight::Bf16(&m[2]), &[hidden, inter]),
            ]
        })
        .collect();
    let experts: Vec<[&_; 3]> = bufs.iter().map(|b| [&b[0], &b[1], &b[2]]).collect();
    let x = f32s(&bf16_values(t * hidden, 1));
    let logits: Vec<f32> = f32s(&bf16_values(t * n, 2))
        .iter()
        .map(|v| 3.0 * v)
        .collect();
    let bias: Vec<f32> = f32s(&bf16_values(n, 3)).iter().map(|v| 0.1 * v).collect();
    let cpu = Cpu::default();
    let mut want = vec![0f32; t * hidden];
    // The experts each token is routed to.
    let mut routed = vec![Vec::new(); t];
    for tok in 0..t {
        let xt = &x[tok * hidden..(tok + 1) * hidden];
        for (e, w) in route(&logits[tok * n..(tok + 1) * n], Some(bias.as_slice()), &moe) {
            routed[tok].push(e);
            // The CPU backend reads the same bf16 matrices.
            let xt = CpuBuf::F32(xt.to_vec());
            let [wg, wu, wd] = mats[e].clone().map(CpuBuf::Bf16);
            let g = cpu.linear(&xt, 1, &wg, inter, hidden);
            let u = cpu.linear(&xt, 1, &wu, inter, hidden);
            let d = cpu.linear(&cpu.silu_mul(&g, &u), 1, &wd, hidden, inter);
            for (o, v) in want[tok * hidden..(tok + 1) * hidden]
                .iter_mut()
                .zip(d.f32())
            {
                *o += w * v;
            }
        }
    }
    // A decode step of `few` sequences routes fewer rows to each expert than the expert
    // kernels take in one pass; one of all `t`, more.
    let few = 8;
    assert!(few * moe.num_experts_per_tok <= 8 * n && t * moe.num_experts_per_tok > 8 * n);
    let bb = gpu.upload(&bias);
    let mut got = Vec::new();
    // The steps are profiled: the expert kernels' weight bytes are those of the experts
    // the step's rows reach, each once.
    gpu.set_profiling(true);
    let reached = |rows: usize| {
        let mut e: Vec<usize> = routed[..rows].concat();
        e.sort_unstable();
        e.dedup();
        e.len()
    };
    for (what, lens) in [
        ("prompt", vec![t]),
        ("decode step of many", vec![1; t]),
        ("decode step of few", vec![1; few]),
        ("decode step of one", vec![1]),
    ] {
        let rows = lens.iter().sum::<usize>();
        let (xb, lb) = (
            gpu.upload(&x[..rows * hidden]),
            gpu.upload(&logits[..rows * n]),
        );
        gpu.begin_step(&lens, 0, false);
        let out = gpu
            .moe_routed(&xb, rows, &lb, Some(&bb), &experts, hidden, inter, &moe)
            .expect("routed on the device");
        let out = gpu.download(&out);
        assert!(gpu.end_step(), "{what}: step discarded");
        assert!(gpu.take_error().is_none(), "{what}: device error");
        let d = rel_diff(&out, &want[..rows * hidden]);
        assert!(d <= TOLERANCE, "{what}: experts vs the host: {d:e}");
        println!("{what}: experts vs the host {d:e}");
        got.push(out);
    }
    let profile = gpu.take_profile();
    let per_expert = 3 * inter * hidden * 2;
    for (op, share, experts) in [
        ("moe_gemm_gate_up", 2, 2 * reached(t)),
        ("moe_gemm_down", 1, 2 * reached(t)),
        ("moe_gate_up", 2, reached(few) + reached(1)),
        ("moe_down", 1, reached(few) + reached(1)),
    ] {
        let o = profile.ops.iter().find(|o| o.op == op);
        let o = o.unwrap_or_else(|| panic!("no {op} in the profile: {profile:?}"));
        assert_eq!(
            o.weight_bytes as usize,
            experts * per_expert * share / 3,
            "{op}: {experts} experts reached"
        );
    }
    assert_eq!(profile.steps, 4);
    assert!(reached(1) < n, "one row reaches every expert");
    // The GEMMs take their inputs rounded to bf16, the expert kernels f32: the same results
    // from both decode steps would mean they went the same way.
    assert_eq!(
        got[0], got[1],
        "the large decode step did not go through the GEMMs"
    );
    assert_ne!(
        got[2][..],
        got[0][..few * hidden],
        "the small decode step did not go through the expert kernels"
    );
}

/// Verdicts, greedy, sampled and with a repetition penalty: each step's token is picked
/// on the device among those its grammar allows (the mask, the seen tokens and the
/// sampler's draw go to the device, the logits stay there), and is the token the host's
/// sampler picks from the logits with the same draw; the log-probabilities and the
/// alternatives (found on the device too) agree.
#[test]
fn cuda_verdicts_picked_on_the_device_are_the_samplers() {
    use cloud_core::engine::config::ModelConfig;
    use cloud_core::engine::constrain::Grammars;
    use cloud_core::engine::generate::{generate_picking, Picking, Request};
    use cloud_core::engine::sampler::SamplingParams;
    let Some(gpu) = gpu(CudaOptions::default()) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let eos = common::write_byte_level_tokenizer(dir.path());
    let cfg = ModelConfig::from_json(
        &common::random_v3_config().to_string(),
        std::path::Path::new("config.json"),
    )
    .expect("config");
    let grammars = Grammars::load(dir.path(), cfg.vocab_size, eos).expect("grammars");
    let model = Model::random(cfg, gpu, 11).expect("model");
    for (temperature, penalty) in [(0.0, 1.0), (1.0, 1.0), (0.0, 1.3)] {
        let verdict = |prompt: &[u32]| Request {
            prompt: prompt.to_vec(),
            params: SamplingParams {
                temperature,
                repetition_penalty: penalty,
                top_p: 0.95,
                seed: prompt.len() as u64,
                max_tokens: 40,
                top_logprobs: prompt.len() - 1,
                ..Default::default()
            },
            constraint: Some(
                grammars
                    .json_schema(&cloud_core::verdict::schema())
                    .expect("schema compiles"),
            ),
        };
        // The same batch both ways, so that the logits are the same.
        let prompts: [&[u32]; 2] = [&[72, 105, 33], &[1, 2, 3, 4]];
        let run = |picking| {
            let requests = prompts.iter().map(|p| verdict(p)).collect();
            generate_picking(&model, requests, picking).expect("generate")
        };
        let on_device = run(Picking::Backend);
        let on_host = run(Picking::Host);
        for (i, (d, h)) in on_device.iter().zip(&on_host).enumerate() {
            let what = format!("temperature {temperature}, penalty {penalty}, request {i}");
            assert!(!d.tokens.is_empty(), "{what}");
            assert_eq!(d.tokens, h.tokens, "{what}: tokens");
            for (j, (ds, hs)) in d.steps.iter().zip(&h.steps).enumerate() {
                assert!(
                    (ds.logprob - hs.logprob).abs() <= 1e-4 * hs.logprob.abs().max(1.0),
                    "{what}, step {j}: log-probability {} vs {}",
                    ds.logprob,
                    hs.logprob
                );
                assert_eq!(ds.top.len(), prompts[i].len() - 1, "{what}, step {j}");
                for ((dt, dl), (ht, hl)) in ds.top.iter().zip(&hs.top) {
                    assert_eq!(dt, ht, "{what}, step {j}: alternatives");
                    assert!(
                        (dl - hl).abs() <= 1e-4 * hl.abs().max(1.0),
                        "{what}, step {j}"
                    );
                }
            }
        }
    }
}
