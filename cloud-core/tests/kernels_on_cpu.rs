//! The CUDA backend's kernels (`src/engine/backend/cuda_kernels.cu`), run on the CPU and
//! checked against the CPU backend: so the kernels' logic is tested on every machine,
//! GPU or not. The kernel source is compiled by the host C++ compiler against
//! `tests/emu/shim.h`, which runs every CUDA thread of a block as a fiber (barriers
//! and warp shuffles behave as on the device) and every block in turn; device pointers
//! are host pointers, so the paged cache's block tables hold host addresses. Each test
//! launches a kernel with the grid and block shape the backend uses. `EMU_ORDER`
//! (`reverse`, or a seed for a shuffle) changes the order in which the threads of a block
//! and the blocks of a grid run; CI runs these tests under more than one.
//! `EMU_SANITIZE=address` builds the kernels with AddressSanitizer (the process started
//! with its runtime preloaded), so an access past the end of a buffer stops the test.
//!
//! Needs `g++` (C++20); without it the tests say so and skip, unless
//! `CLOUD_CORE_REQUIRE_EMU=1` (CI sets it), which makes that a failure.

// Loading the compiled kernels and handing them raw host pointers is FFI by nature.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_void, CString};
use std::sync::OnceLock;

use cloud_core::engine::backend::cpu::{Cpu, CpuBuf};
use cloud_core::engine::backend::{Backend, RopeLayout};
use cloud_core::engine::config::{MoeConfig, ScoringFunc, TopkMethod};
use cloud_core::engine::model::route;
use half::bf16;

mod common;
#[path = "emu/mod.rs"]
mod emu_build;
use cloud_core::engine::sampler::Pick;
use common::rand_vec;
use emu_build::{glue, KERNELS};

/// The CPU backend over host vectors (f32 weights): the reference the kernels are held to.
#[derive(Default)]
struct Host(Cpu);

fn buf(v: &[f32]) -> CpuBuf {
    CpuBuf::F32(v.to_vec())
}

#[allow(clippy::too_many_arguments)]
impl Host {
    fn linear(&self, x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        self.0.linear(&buf(x), m, &buf(w), n, k).to_f32()
    }
    fn add(&self, x: &mut Vec<f32>, y: &[f32]) {
        let mut b = buf(x);
        self.0.add(&mut b, &buf(y));
        *x = b.to_f32();
    }
    fn add_scaled(&self, x: &mut Vec<f32>, y: &[f32], s: f32) {
        let mut b = buf(x);
        self.0.add_scaled(&mut b, &buf(y), s);
        *x = b.to_f32();
    }
    fn add_bias(&self, x: &mut Vec<f32>, bias: &[f32]) {
        let mut b = buf(x);
        self.0.add_bias(&mut b, &buf(bias));
        *x = b.to_f32();
    }
    fn silu_mul(&self, g: &[f32], u: &[f32]) -> Vec<f32> {
        self.0.silu_mul(&buf(g), &buf(u)).to_f32()
    }
    fn rms_norm(&self, x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
        self.0.rms_norm(&buf(x), &buf(w), eps).to_f32()
    }
    fn gather_rows(&self, table: &[f32], d: usize, ids: &[u32]) -> Vec<f32> {
        self.0.gather_rows(&buf(table), d, ids).to_f32()
    }
    fn slice_cols(&self, x: &[f32], cols: usize, from: usize, width: usize) -> Vec<f32> {
        self.0.slice_cols(&buf(x), cols, from, width).to_f32()
    }
    fn add_rows_scaled(
        &self,
        dst: &mut Vec<f32>,
        d: usize,
        src: &[f32],
        rows: &[usize],
        w: &[f32],
    ) {
        let mut b = buf(dst);
        self.0.add_rows_scaled(&mut b, d, &buf(src), rows, w);
        *dst = b.to_f32();
    }
    fn mla_expand(
        &self,
        kv: &[f32],
        pe: &[f32],
        t: usize,
        h: usize,
        nope: usize,
        dv: usize,
        rope: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let (k, v) = self.0.mla_expand(&buf(kv), &buf(pe), t, h, nope, dv, rope);
        (k.to_f32(), v.to_f32())
    }
    fn argmax_rows(&self, x: &[f32], cols: usize, allowed: Option<&[u32]>) -> Vec<(u32, f32)> {
        self.0.argmax_rows(&buf(x), cols, allowed)
    }
    fn rope(
        &self,
        x: &mut Vec<f32>,
        heads: usize,
        head_dim: usize,
        offset: usize,
        rot: usize,
        positions: &[usize],
        cos: &[f32],
        sin: &[f32],
        layout: RopeLayout,
    ) {
        let mut b = buf(x);
        self.0.rope(
            &mut b,
            heads,
            head_dim,
            offset,
            rot,
            positions,
            &buf(cos),
            &buf(sin),
            layout,
        );
        *x = b.to_f32();
    }
}

type LaunchFn =
    unsafe extern "C" fn(*const c_char, u32, u32, u32, u32, u32, u32, u32, *mut *mut c_void) -> i32;

struct Emu {
    _lib: libloading::Library,
    launch: LaunchFn,
    dir: std::path::PathBuf,
}

fn emu() -> Option<&'static Emu> {
    static EMU: OnceLock<Result<Emu, String>> = OnceLock::new();
    let r = EMU.get_or_init(|| {
        let dir = emu_build::build(false)?;
        let lib = dir.join("libkernels.so");
        // SAFETY: the library is the one just built, with no initialisers of its own
        // beyond the C++ runtime's; `emu_launch` has the signature of `LaunchFn`.
        unsafe {
            let l = libloading::Library::new(&lib).map_err(|e| e.to_string())?;
            let f: libloading::Symbol<'_, LaunchFn> =
                l.get(b"emu_launch\0").map_err(|e| e.to_string())?;
            let launch = *f;
            Ok(Emu {
                _lib: l,
                launch,
                dir,
            })
        }
    });
    match r {
        Ok(e) => Some(e),
        Err(why) => {
            emu_build::skip_or_fail(why);
            None
        }
    }
}

/// A kernel argument: a pointer into host memory standing in for device memory, or a
/// scalar of the kernel parameter's type.
enum Arg {
    P(*const u8),
    I(i32),
    L(i64),
    U(u64),
    F(f32),
}

fn p<T>(v: &[T]) -> Arg {
    Arg::P(v.as_ptr().cast())
}

fn pm<T>(v: &mut [T]) -> Arg {
    Arg::P(v.as_mut_ptr().cast())
}

fn launch(name: &str, grid: (u32, u32), block: u32, shared: u32, args: &[Arg]) {
    launch3(name, (grid.0, grid.1, 1), block, shared, args);
}

/// [`launch`] on a grid of three dimensions.
fn launch3(name: &str, grid: (u32, u32, u32), block: u32, shared: u32, args: &[Arg]) {
    let Some(e) = emu() else { return };
    // The device reads as many parameters as the kernel declares, whatever was passed: a
    // launch with the wrong count is a test's mistake, named here rather than a crash.
    static ARITY: OnceLock<std::collections::HashMap<String, usize>> = OnceLock::new();
    let arity = ARITY.get_or_init(|| {
        emu_build::kernels(KERNELS)
            .into_iter()
            .map(|(k, types)| (k, types.len()))
            .collect()
    });
    assert_eq!(
        arity.get(name),
        Some(&args.len()),
        "{name}: launched with {} arguments",
        args.len()
    );
    let mut store: Vec<[u8; 8]> = args
        .iter()
        .map(|a| {
            let mut b = [0u8; 8];
            match a {
                Arg::P(p) => b.copy_from_slice(&(*p as usize as u64).to_ne_bytes()),
                Arg::I(v) => b[..4].copy_from_slice(&v.to_ne_bytes()),
                Arg::L(v) => b.copy_from_slice(&v.to_ne_bytes()),
                Arg::U(v) => b.copy_from_slice(&v.to_ne_bytes()),
                Arg::F(v) => b[..4].copy_from_slice(&v.to_ne_bytes()),
            }
            b
        })
        .collect();
    let mut ptrs: Vec<*mut c_void> = store.iter_mut().map(|b| b.as_mut_ptr().cast()).collect();
    let cname = CString::new(name).expect("name");
    // The emulation runs one launch at a time (blocks share static `__shared__` storage).
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // SAFETY: every pointer argument points into a live Vec of the size the kernel
    // indexes for these launch dimensions (set up by each test), and scalars are passed
    // in 8-byte slots read as the kernel's parameter types.
    let rc = unsafe {
        (e.launch)(
            cname.as_ptr(),
            grid.0,
            grid.1,
            grid.2,
            block,
            1,
            1,
            shared,
            ptrs.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "no kernel named {name}");
}

/// A `#define NAME value` of the kernels (a launch shape they are written for).
fn kernel_define(name: &str) -> usize {
    let key = format!("#define {name} ");
    KERNELS
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("the kernels define no {name}"))
}

fn available() -> bool {
    emu().is_some()
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|x| bf16::from_f32(*x)).collect()
}

fn rounded(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| bf16::from_f32(*x).to_f32()).collect()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= tol * scale,
            "{what}: element {i}: {a} vs {b} (scale {scale})"
        );
    }
}

#[test]
fn conversions_and_elementwise_kernels_match_the_cpu() {
    if !available() {
        return;
    }
    let n = 1000;
    let x = rand_vec(n, 1);
    let y = rand_vec(n, 2);
    // f32 → bf16 rounds to nearest even, as `half` does.
    let mut b = vec![bf16::ZERO; n];
    launch(
        "f32_to_bf16",
        (4, 1),
        256,
        0,
        &[p(&x), pm(&mut b), Arg::L(n as i64)],
    );
    assert_eq!(b, to_bf16(&x));
    let mut back = vec![0f32; n];
    launch(
        "bf16_to_f32",
        (4, 1),
        256,
        0,
        &[p(&b), pm(&mut back), Arg::L(n as i64)],
    );
    assert_eq!(back, rounded(&x));
    // x += s·y
    let mut z = x.clone();
    launch(
        "axpy",
        (4, 1),
        256,
        0,
        &[pm(&mut z), p(&y), Arg::L(n as i64), Arg::F(0.5)],
    );
    let cpu = Host::default();
    let mut want = x.clone();
    cpu.add_scaled(&mut want, &y, 0.5);
    assert_close(&z, &want, 1e-6, "axpy");
    // silu(g)·u
    let mut s = vec![0f32; n];
    launch(
        "silu_mul",
        (4, 1),
        256,
        0,
        &[p(&x), p(&y), pm(&mut s), Arg::L(n as i64)],
    );
    assert_close(&s, &cpu.silu_mul(&x, &y), 1e-5, "silu_mul");
    // bias on every row
    let bias = rand_vec(40, 3);
    let mut xb = x.clone();
    launch(
        "add_bias",
        (4, 1),
        256,
        0,
        &[pm(&mut xb), p(&bias), Arg::L(n as i64), Arg::I(40)],
    );
    let mut want = x.clone();
    cpu.add_bias(&mut want, &bias);
    assert_close(&xb, &want, 1e-6, "add_bias");
    // Uniform random weights stay in range and are centred.
    let mut r = vec![bf16::ZERO; 4096];
    launch(
        "fill_uniform_bf16",
        (16, 1),
        256,
        0,
        &[pm(&mut r), Arg::L(4096), Arg::U(7), Arg::F(0.25)],
    );
    let f: Vec<f32> = r.iter().map(|v| v.to_f32()).collect();
    assert!(f.iter().all(|v| v.abs() <= 0.2501));
    let mean = f.iter().sum::<f32>() / f.len() as f32;
    assert!(mean.abs() < 0.02, "mean {mean}");
    assert!(f.iter().filter(|v| **v > 0.0).count() > 1800);
}

#[test]
fn row_kernels_match_the_cpu() {
    if !available() {
        return;
    }
    let cpu = Host::default();
    let (rows, d) = (5, 96);
    let x = rand_vec(rows * d, 4);
    let w = rand_vec(d, 5);
    let mut y = vec![0f32; rows * d];
    launch(
        "rms_norm",
        (rows as u32, 1),
        256,
        0,
        &[p(&x), p(&w), pm(&mut y), Arg::I(d as i32), Arg::F(1e-6)],
    );
    assert_close(&y, &cpu.rms_norm(&x, &w, 1e-6), 1e-5, "rms_norm");
    // Gathers from an f32 and a bf16 table.
    let table = rand_vec(10 * d, 6);
    let ids = [3u32, 0, 9, 3];
    let mut g = vec![0f32; ids.len() * d];
    launch(
        "gather_rows_f32",
        (4, 1),
        256,
        0,
        &[p(&table), p(&ids), pm(&mut g), Arg::I(d as i32)],
    );
    assert_eq!(g, cpu.gather_rows(&table, d, &ids));
    let tb = to_bf16(&table);
    launch(
        "gather_rows_bf16",
        (4, 1),
        256,
        0,
        &[p(&tb), p(&ids), pm(&mut g), Arg::I(d as i32)],
    );
    assert_eq!(g, cpu.gather_rows(&rounded(&table), d, &ids));
    // Column slices and concatenations.
    let mut sl = vec![0f32; rows * 30];
    launch(
        "copy_cols",
        (1, 1),
        256,
        0,
        &[
            p(&x),
            Arg::I(d as i32),
            Arg::I(10),
            pm(&mut sl),
            Arg::I(30),
            Arg::I(0),
            Arg::I(30),
            Arg::L(rows as i64),
        ],
    );
    assert_eq!(sl, cpu.slice_cols(&x, d, 10, 30));
    // Scatter-add of expert rows.
    let src = rand_vec(3 * d, 7);
    let to = [4u32, 1, 2];
    let ws = [0.5f32, -1.0, 2.0];
    let mut dst = x.clone();
    launch(
        "add_rows_scaled",
        (3, 1),
        256,
        0,
        &[pm(&mut dst), Arg::I(d as i32), p(&src), p(&to), p(&ws)],
    );
    let mut want = x.clone();
    cpu.add_rows_scaled(&mut want, d, &src, &[4, 1, 2], &ws);
    assert_close(&dst, &want, 1e-6, "add_rows_scaled");
    // MLA's expansion of per-head keys and values.
    let (t, h, nope, dv, rope) = (3, 4, 8, 6, 4);
    let kv = rand_vec(t * h * (nope + dv), 8);
    let pe = rand_vec(t * rope, 9);
    let mut k = vec![0f32; t * h * (nope + rope)];
    let mut v = vec![0f32; t * h * dv];
    launch(
        "mla_expand",
        ((t * h) as u32, 1),
        128,
        0,
        &[
            p(&kv),
            p(&pe),
            pm(&mut k),
            pm(&mut v),
            Arg::I(h as i32),
            Arg::I(nope as i32),
            Arg::I(dv as i32),
            Arg::I(rope as i32),
        ],
    );
    let (wk, wv) = cpu.mla_expand(&kv, &pe, t, h, nope, dv, rope);
    assert_eq!((k, v), (wk, wv));
    // Greedy picks (sample_rows with greedy picks), the lowest index on ties.
    let mut logits = rand_vec(3 * 1000, 10);
    logits[1000 + 17] = 5.0;
    logits[1000 + 900] = 5.0;
    // Row 0 allows every token, row 1 forbids its best (17) and allows only the odd
    // ones, row 2 allows none (token 0).
    let words = 1000usize.div_ceil(32);
    let mut mask = vec![u32::MAX; 3 * words];
    for w in &mut mask[words..2 * words] {
        *w = 0xAAAA_AAAA;
    }
    mask[words] &= !(1 << 17);
    for w in &mut mask[2 * words..] {
        *w = 0;
    }
    for allowed in [None, Some(&mask)] {
        let mut picks = vec![0u32; 3];
        let mut logprobs = vec![0f32; 3];
        let mask_arg = allowed.map_or(Arg::U(0), |m| p(m));
        let spec: Vec<u64> = [Pick::GREEDY; 3].iter().flat_map(Pick::words).collect();
        launch(
            "sample_rows",
            (3, 1),
            256,
            0,
            &[
                p(&logits),
                Arg::I(1000),
                mask_arg,
                Arg::U(0),
                p(&spec),
                pm(&mut picks),
                pm(&mut logprobs),
                Arg::I(0),
                Arg::U(0),
            ],
        );
        let want = cpu.argmax_rows(&logits, 1000, allowed.map(|m| m.as_slice()));
        for (r, &(token, logprob)) in want.iter().enumerate() {
            assert_eq!(picks[r], token, "row {r}, mask {}", allowed.is_some());
            assert!(
                (logprobs[r] - logprob).abs() <= 1e-5,
                "row {r}: log-probability {} vs {logprob}",
                logprobs[r]
            );
        }
        if allowed.is_none() {
            assert_eq!(picks[1], 17);
        } else {
            assert!(picks[1] % 2 == 1 && picks[1] != 17, "{picks:?}");
            assert_eq!(picks[2], 0);
        }
    }
}

/// `rope` over one tensor, and over two of the same rows in one launch (a layer's
/// queries and keys, of other head counts, widths and offsets), against the CPU's.
#[test]
fn rope_matches_the_cpu_in_both_layouts() {
    if !available() {
        return;
    }
    let cpu = Host::default();
    let (rows, heads, hd) = (3, 2, 24);
    let (heads2, hd2) = (3, 28);
    let positions = [0usize, 5, 11];
    let pos: Vec<u32> = positions.iter().map(|p| *p as u32).collect();
    for (layout, offset, offset2, rot) in [
        (RopeLayout::Halves, 0, 4, 24),
        (RopeLayout::Interleaved, 8, 0, 16),
    ] {
        let half = rot / 2;
        let cos = rand_vec(16 * half, 11);
        let sin = rand_vec(16 * half, 12);
        let x = rand_vec(rows * heads * hd, 13);
        let x2 = rand_vec(rows * heads2 * hd2, 14);
        let threads = (half.div_ceil(32) * 32).min(256) as u32;
        for pair in [false, true] {
            let (mut got, mut got2) = (x.clone(), x2.clone());
            let blocks = rows * (heads + if pair { heads2 } else { 0 });
            launch(
                "rope",
                (blocks as u32, 1),
                threads,
                0,
                &[
                    pm(&mut got),
                    Arg::I(heads as i32),
                    Arg::I(hd as i32),
                    Arg::I(offset as i32),
                    if pair { pm(&mut got2) } else { Arg::U(0) },
                    Arg::I(if pair { heads2 as i32 } else { 0 }),
                    Arg::I(hd2 as i32),
                    Arg::I(offset2 as i32),
                    p(&pos),
                    p(&cos),
                    p(&sin),
                    Arg::I(rot as i32),
                    Arg::I(i32::from(layout == RopeLayout::Interleaved)),
                ],
            );
            let (mut want, mut want2) = (x.clone(), x2.clone());
            cpu.rope(
                &mut want, heads, hd, offset, rot, &positions, &cos, &sin, layout,
            );
            assert_close(&got, &want, 1e-6, &format!("rope {layout:?}, pair {pair}"));
            if pair {
                cpu.rope(
                    &mut want2, heads2, hd2, offset2, rot, &positions, &cos, &sin, layout,
                );
            }
            assert_close(
                &got2,
                &want2,
                1e-6,
                &format!("rope {layout:?} second, pair {pair}"),
            );
        }
    }
}

/// One sequence's paged cache in host memory, laid out as the backend lays it out: blocks
/// of `br` positions of `layers` layers, each layer's key rows (`kc` wide) then its value
/// rows (`vc` wide; none when the values are the keys' columns), the blocks deliberately
/// out of order, every other layer's rows NaN (a kernel reading them would show).
struct Paged {
    blocks: Vec<Vec<bf16>>,
    table: Vec<u64>,
    br: usize,
    kc: usize,
    vc: usize,
    /// Elements into a block of the layer's key rows and value rows.
    kbase: usize,
    vbase: usize,
}

impl Paged {
    /// Layer `layer` of `layers` holding keys `k` and values `v` (`v` empty when the
    /// values are the keys' columns, `vc` 0), with blocks for `room` more positions.
    fn new(
        k: &[f32],
        v: &[f32],
        (kc, vc): (usize, usize),
        br: usize,
        room: usize,
        (layer, layers): (usize, usize),
    ) -> Paged {
        let rows = k.len() / kc;
        let n = (rows + room).div_ceil(br).max(1);
        let per_layer = br * (kc + vc);
        let mut blocks: Vec<Vec<bf16>> = (0..n)
            .map(|_| vec![bf16::NAN; layers * per_layer])
            .collect();
        let (kbase, vbase) = (layer * per_layer, layer * per_layer + br * kc);
        // Table entry i is block n - 1 - i.
        for r in 0..rows {
            let b = &mut blocks[n - 1 - r / br];
            let (o, kr) = (r % br, &k[r * kc..(r + 1) * kc]);
            for (d, x) in b[kbase + o * kc..].iter_mut().zip(kr) {
                *d = bf16::from_f32(*x);
            }
            if vc > 0 {
                for (d, x) in b[vbase + o * vc..].iter_mut().zip(&v[r * vc..(r + 1) * vc]) {
                    *d = bf16::from_f32(*x);
                }
            }
        }
        // The rows to come: zero, as the backend's blocks may hold anything there.
        for r in rows..n * br {
            let b = &mut blocks[n - 1 - r / br];
            let o = r % br;
            b[kbase + o * kc..kbase + (o + 1) * kc].fill(bf16::ZERO);
            b[vbase + o * vc..vbase + (o + 1) * vc].fill(bf16::ZERO);
        }
        let table = (0..n)
            .map(|i| blocks[n - 1 - i].as_ptr() as usize as u64)
            .collect();
        Paged {
            blocks,
            table,
            br,
            kc,
            vc,
            kbase,
            vbase: if vc > 0 { vbase } else { kbase },
        }
    }

    /// The first `rows` rows `cols` wide from `base`, as f32.
    fn read(&self, rows: usize, base: usize, cols: usize) -> Vec<f32> {
        let n = self.blocks.len();
        (0..rows)
            .flat_map(|r| {
                let b = &self.blocks[n - 1 - r / self.br];
                let at = base + (r % self.br) * cols;
                b[at..at + cols].iter().map(|x| x.to_f32())
            })
            .collect()
    }

    fn keys(&self, rows: usize) -> Vec<f32> {
        self.read(rows, self.kbase, self.kc)
    }

    fn values(&self, rows: usize) -> Vec<f32> {
        self.read(rows, self.vbase, self.vc)
    }

    /// The kernels' `kbase` and `vbase`, in bytes.
    fn bases(&self) -> (i64, i64) {
        (2 * self.kbase as i64, 2 * self.vbase as i64)
    }
}

/// One step of several sequences: each appends its new rows to its caches and attends
/// over its whole cache in the same launch (`attention_batch`, in one range of positions
/// per row, or split and merged by the last block of each row and head to finish), against
/// the CPU's attention of each sequence alone; then the same attention with every row read
/// from the caches.
#[test]
fn batched_paged_attention_matches_the_cpu_per_sequence() {
    if !available() {
        return;
    }
    let cpu = Host::default();
    // (h, hk, dk, dv, values in keys, block rows, [(cached rows, new rows)]): GQA
    // (Qwen-like), MLA's absorbed form (one key head, values the keys' first columns,
    // wider than a warp's 32 lanes), decode steps, a prefill, and an empty sequence.
    /// (h, hk, dk, dv, values in keys, block rows, [(cached rows, new rows)])
    type Case = (
        usize,
        usize,
        usize,
        usize,
        bool,
        usize,
        &'static [(usize, usize)],
    );
    let cases: &[Case] = &[
        (
            4,
            2,
            16,
            16,
            false,
            4,
            &[(7, 1), (0, 5), (12, 1), (3, 0), (4, 3)],
        ),
        (4, 1, 40, 32, true, 16, &[(13, 2), (1, 1), (0, 9)]),
        (2, 2, 8, 8, false, 4, &[(0, 9)]),
        // Prompts of several slot and key tiles for `attention_mma`: three query heads
        // per key head (tiles end mid-row), and MLA's form with 40 new rows after 20.
        (6, 2, 16, 16, false, 4, &[(7, 1), (0, 13), (33, 6), (2, 0)]),
        (4, 1, 40, 32, true, 8, &[(20, 40), (0, 3)]),
        // Decode steps of MLA's form, sixteen heads on its one key head, and of eight
        // query heads per key head, with caches of several key tiles to split.
        (16, 1, 40, 32, true, 8, &[(100, 1), (0, 1), (65, 1)]),
        (16, 2, 16, 16, false, 4, &[(70, 1), (3, 1)]),
    ];
    for (ci, &(h, hk, dk, dv, vik, br, seqs)) in cases.iter().enumerate() {
        let (kc, vc) = (hk * dk, hk * dv);
        let n = seqs.len();
        let t: usize = seqs.iter().map(|s| s.1).sum();
        let seed = 100 * ci as u64;
        let q = rand_vec(t * h * dk, seed + 1);
        let k_new = rand_vec(t * kc, seed + 2);
        let v_new: Vec<f32> = if vik {
            // The values are the first dv columns of each key row.
            k_new.chunks(dk).flat_map(|r| r[..dv].to_vec()).collect()
        } else {
            rand_vec(t * vc, seed + 3)
        };
        // Layer 1 or 2 of three: the rows start past other layers' (NaN) rows.
        let layer = (1 + ci % 2, 3);
        let mut caches = Vec::new();
        let mut k_old = Vec::new();
        let mut v_old = Vec::new();
        for (i, &(cached, new)) in seqs.iter().enumerate() {
            let k = rand_vec(cached * kc, seed + 10 + i as u64);
            let v: Vec<f32> = if vik {
                k.chunks(dk).flat_map(|r| r[..dv].to_vec()).collect()
            } else {
                rand_vec(cached * vc, seed + 20 + i as u64)
            };
            let kept = if vik { (&[][..], 0) } else { (&v[..], vc) };
            caches.push(Paged::new(&k, kept.0, (kc, kept.1), br, new, layer));
            k_old.push(k);
            v_old.push(v);
        }
        let (kbase, vbase) = caches[0].bases();
        let mut meta = vec![0u64; 3 * n + 1];
        let mut row0 = 0;
        for (i, &(cached, new)) in seqs.iter().enumerate() {
            meta[i] = caches[i].table.as_ptr() as u64;
            meta[n + i] = cached as u64;
            meta[2 * n + i] = row0 as u64;
            row0 += new;
        }
        meta[3 * n] = t as u64;
        // Peaked: a few positions take most of the weight, as in a trained model.
        let scale = 3.0 / (dk as f32).sqrt();
        let warps = kernel_define("ATT_WARPS") as u32;
        let (vcols, vhead) = if vik { (kc, dk) } else { (vc, dv) };
        // Each row's positions in one range, or split in 3 or 5 (more than some rows
        // have positions: empty ranges) and merged. `fresh`: the new rows are given (and
        // appended), else read from the caches.
        // Every (row, head)'s ticket is back to zero after each launch, ready for the next
        // (a graph replays the same tickets).
        let mut tickets = vec![0u32; t * h];
        let mut attend = |splits: u32, fresh: bool| {
            let mut out = vec![f32::NAN; t * h * dv];
            let mut part = vec![0f32; t * h * splits as usize * (dv + 2)];
            let part_arg = if splits == 1 {
                Arg::U(0)
            } else {
                pm(&mut part)
            };
            launch(
                "attention_batch",
                ((t * h) as u32, splits),
                warps * 32,
                ((dk + 2 * warps as usize + warps as usize * dv) * 4) as u32,
                &[
                    p(&q),
                    p(&meta),
                    Arg::I(n as i32),
                    pm(&mut out),
                    part_arg,
                    pm(&mut tickets),
                    Arg::I(h as i32),
                    Arg::I(hk as i32),
                    Arg::I(dk as i32),
                    Arg::I(dv as i32),
                    Arg::I(vcols as i32),
                    Arg::I(vhead as i32),
                    Arg::F(scale),
                    Arg::I(br as i32),
                    Arg::L(kbase),
                    Arg::L(vbase),
                    if fresh { p(&k_new) } else { Arg::U(0) },
                    match (fresh, vik) {
                        (false, _) => Arg::U(0),
                        (true, true) => p(&k_new),
                        (true, false) => p(&v_new),
                    },
                ],
            );
            assert!(
                tickets.iter().all(|&x| x == 0),
                "case {ci}: {splits} splits left tickets {tickets:?}"
            );
            out
        };
        // The tensor-core kernel first, so that the rows it appends are checked below.
        // Its dynamic shared memory as laid out in the kernel: queries and keys (and
        // values), bf16, rows padded; f32 scores, bf16 probabilities, four words a slot.
        let (slots, keys) = (kernel_define("FA_SLOTS"), kernel_define("FA_KEYS"));
        let ldk = dk.next_multiple_of(16) + 8;
        let values = if vik { 0 } else { keys * (dv + 8) * 2 };
        let mma_shared =
            (slots + keys) * ldk * 2 + values + slots * ((keys + 1) * 4 + (keys + 8) * 2 + 16);
        // A bound on the slot tiles (those past the step's return at once), and a ticket
        // for each of them and key head, back to zero after every launch.
        let tiles = (t * (h / hk)).div_ceil(slots) + n;
        let mut mma_tickets = vec![0u32; tiles * hk];
        // Each tile's positions in one range of key tiles, or, for a step of one row per
        // sequence, split (flash decoding) and merged by the launch: room for each tile's
        // min(FA_SLOTS, g) slots.
        let mut mma = |fresh: bool, splits: usize| {
            let mut out = vec![f32::NAN; t * h * dv];
            let mut part = vec![f32::NAN; tiles * hk * splits * slots.min(h / hk) * (dv + 2)];
            let part_arg = if splits == 1 {
                Arg::U(0)
            } else {
                pm(&mut part)
            };
            launch3(
                "attention_mma",
                (tiles as u32, hk as u32, splits as u32),
                kernel_define("FA_THREADS") as u32,
                mma_shared as u32,
                &[
                    p(&q),
                    p(&meta),
                    Arg::I(n as i32),
                    pm(&mut out),
                    part_arg,
                    pm(&mut mma_tickets),
                    Arg::I(h as i32),
                    Arg::I(hk as i32),
                    Arg::I(dk as i32),
                    Arg::I(dv as i32),
                    Arg::I(vcols as i32),
                    Arg::I(vhead as i32),
                    Arg::F(scale),
                    Arg::I(br as i32),
                    Arg::L(kbase),
                    Arg::L(vbase),
                    if fresh { p(&k_new) } else { Arg::U(0) },
                    match (fresh, vik) {
                        (false, _) => Arg::U(0),
                        (true, true) => p(&k_new),
                        (true, false) => p(&v_new),
                    },
                ],
            );
            assert!(
                mma_tickets.iter().all(|&x| x == 0),
                "case {ci}: attention_mma in {splits} splits left tickets {mma_tickets:?}"
            );
            out
        };
        let by_mma = mma(true, 1);
        let mut at = 0;
        for (i, &(cached, new)) in seqs.iter().enumerate() {
            let total = cached + new;
            for (cols, old, fresh, what) in [
                (kc, &k_old[i], &k_new, "keys"),
                (vc, &v_old[i], &v_new, "values"),
            ] {
                if vik && what == "values" {
                    continue;
                }
                let mut want = old.clone();
                want.extend_from_slice(&fresh[at * cols..(at + new) * cols]);
                let back = if what == "keys" {
                    caches[i].keys(total)
                } else {
                    caches[i].values(total)
                };
                assert_eq!(
                    back,
                    rounded(&want),
                    "case {ci}, sequence {i}: {what} appended by attention_mma"
                );
            }
            at += new;
        }
        let out = attend(1, true);
        // Queries and probabilities rounded to bf16 for the tensor cores: within 1% of
        // the largest output (f32 queries and probabilities: within 1e-5).
        assert_close(&by_mma, &out, 1e-2, &format!("case {ci}: attention_mma"));
        assert_close(
            &mma(false, 1),
            &by_mma,
            0.0,
            &format!("case {ci}: attention_mma from the caches"),
        );
        // Decode steps split in 2 or 5 ranges of whole key tiles (some empty for the short
        // sequences), from the step's rows or the caches: the same attention, its
        // probabilities rounded against other maxima.
        let one_row = seqs.iter().all(|s| s.1 == 1);
        for splits in [2, 5].into_iter().filter(|_| one_row) {
            for fresh in [true, false] {
                assert_close(
                    &mma(fresh, splits),
                    &out,
                    1e-2,
                    &format!("case {ci}: attention_mma in {splits} splits (fresh {fresh})"),
                );
            }
        }
        for splits in [3, 5] {
            assert_close(
                &attend(splits, true),
                &out,
                1e-5,
                &format!("case {ci}: {splits} splits against one"),
            );
        }
        // The appended rows, read back from the caches, are exactly the given ones.
        assert_eq!(attend(1, false), out, "case {ci}: from the caches");
        assert_close(
            &attend(5, false),
            &out,
            1e-5,
            &format!("case {ci}: from the caches, 5 splits"),
        );
        let mut at = 0;
        for (i, &(cached, new)) in seqs.iter().enumerate() {
            let total = cached + new;
            let mut k = k_old[i].clone();
            k.extend_from_slice(&k_new[at * kc..(at + new) * kc]);
            let mut v = v_old[i].clone();
            v.extend_from_slice(&v_new[at * vc..(at + new) * vc]);
            // The appended rows are in the cache, as bf16.
            assert_eq!(
                caches[i].keys(total),
                rounded(&k),
                "case {ci}, sequence {i}: keys"
            );
            if new > 0 {
                let qs = &q[at * h * dk..(at + new) * h * dk];
                let want =
                    cpu.0
                        .attention(qs, &rounded(&k), &rounded(&v), new, h, hk, dk, dv, scale);
                assert_close(
                    &out[at * h * dv..(at + new) * h * dv],
                    &want,
                    1e-5,
                    &format!("case {ci}, sequence {i} ({cached} cached, {new} new)"),
                );
            }
            at += new;
        }
    }
}

fn moe_cfg(method: TopkMethod, scoring: ScoringFunc, k: usize, norm: bool) -> MoeConfig {
    MoeConfig {
        n_routed_experts: 16,
        n_shared_experts: 0,
        num_experts_per_tok: k,
        moe_intermediate_size: 12,
        first_k_dense_replace: 0,
        moe_layer_freq: 1,
        topk_method: method,
        scoring_func: scoring,
        n_group: 4,
        topk_group: 2,
        norm_topk_prob: norm,
        routed_scaling_factor: 2.5,
    }
}

fn method_code(m: TopkMethod) -> i32 {
    match m {
        TopkMethod::Greedy => 0,
        TopkMethod::GroupLimitedGreedy => 1,
        TopkMethod::NoauxTc => 2,
    }
}

#[test]
fn moe_routing_matches_the_cpu_router() {
    if !available() {
        return;
    }
    let t = 7;
    let n = 16;
    for (i, moe) in [
        moe_cfg(TopkMethod::Greedy, ScoringFunc::Softmax, 6, false),
        moe_cfg(
            TopkMethod::GroupLimitedGreedy,
            ScoringFunc::Softmax,
            3,
            true,
        ),
        moe_cfg(TopkMethod::NoauxTc, ScoringFunc::Sigmoid, 4, true),
        moe_cfg(TopkMethod::NoauxTc, ScoringFunc::Sigmoid, 1, true),
    ]
    .into_iter()
    .enumerate()
    {
        let k = moe.num_experts_per_tok;
        let logits: Vec<f32> = rand_vec(t * n, 20 + i as u64)
            .iter()
            .map(|x| x * 4.0)
            .collect();
        let bias: Vec<f32> = rand_vec(n, 30).iter().map(|x| x * 0.3).collect();
        let mut ids = vec![0i32; t * k];
        let mut w = vec![0f32; t * k];
        let uses_bias = moe.topk_method == TopkMethod::NoauxTc;
        let bias_arg = if uses_bias { p(&bias) } else { Arg::U(0) };
        launch(
            "moe_route",
            (1, 1),
            64,
            0,
            &[
                p(&logits),
                bias_arg,
                Arg::I(t as i32),
                Arg::I(n as i32),
                Arg::I(k as i32),
                Arg::I(i32::from(moe.scoring_func == ScoringFunc::Sigmoid)),
                Arg::I(method_code(moe.topk_method)),
                Arg::I(moe.n_group as i32),
                Arg::I(moe.topk_group as i32),
                Arg::I(i32::from(moe.norm_topk_prob)),
                Arg::F(moe.routed_scaling_factor as f32),
                pm(&mut ids),
                pm(&mut w),
            ],
        );
        for tok in 0..t {
            let want = route(
                &logits[tok * n..(tok + 1) * n],
                uses_bias.then_some(&bias[..]),
                &moe,
            );
            for (j, (e, wt)) in want.iter().enumerate() {
                assert_eq!(
                    ids[tok * k + j] as usize,
                    *e,
                    "{:?} token {tok} choice {j}",
                    moe.topk_method
                );
                assert!(
                    (w[tok * k + j] - wt).abs() < 1e-5,
                    "{:?} token {tok} weight {j}",
                    moe.topk_method
                );
            }
        }
    }
}

/// `n` experts' bf16 gate, up ([inter, hidden]) and down ([hidden, inter]) matrices,
/// pseudo-random from `seed`.
fn expert_weights(n: usize, hidden: usize, inter: usize, seed: u64) -> Vec<[Vec<bf16>; 3]> {
    (0..n as u64)
        .map(|e| {
            [
                to_bf16(&rand_vec(inter * hidden, seed + e)),
                to_bf16(&rand_vec(inter * hidden, seed + 100 + e)),
                to_bf16(&rand_vec(hidden * inter, seed + 200 + e)),
            ]
        })
        .collect()
}

/// The experts' gate, up and down address tables, as the backend keeps them.
fn expert_tables(mats: &[[Vec<bf16>; 3]]) -> [Vec<u64>; 3] {
    std::array::from_fn(|j| mats.iter().map(|m| m[j].as_ptr() as usize as u64).collect())
}

#[test]
fn moe_experts_on_the_device_match_a_host_computation() {
    if !available() {
        return;
    }
    // 40 tokens: 120 pairs among 16 experts, so that some expert has more slots than
    // the kernels take at once (GEMV_ROWS).
    let (t, n, k, hidden, inter) = (40, 16, 3, 64, 24);
    let moe = moe_cfg(TopkMethod::Greedy, ScoringFunc::Softmax, k, true);
    let x = rand_vec(t * hidden, 40);
    let logits: Vec<f32> = rand_vec(t * n, 41).iter().map(|v| v * 3.0).collect();
    // Experts' bf16 matrices and their address tables.
    let mats = expert_weights(n, hidden, inter, 100);
    let [tg, tu, td] = expert_tables(&mats);
    let pairs = t * k;
    let (mut ids, mut w) = (vec![0i32; pairs], vec![0f32; pairs]);
    launch(
        "moe_route",
        (1, 1),
        64,
        0,
        &[
            p(&logits),
            Arg::U(0),
            Arg::I(t as i32),
            Arg::I(n as i32),
            Arg::I(k as i32),
            Arg::I(0),
            Arg::I(0),
            Arg::I(4),
            Arg::I(2),
            Arg::I(1),
            Arg::F(moe.routed_scaling_factor as f32),
            pm(&mut ids),
            pm(&mut w),
        ],
    );
    let (mut count, mut start, mut tiles) = (vec![0i32; n], vec![0i32; n], vec![-1i32; n + 1]);
    let (mut slot_tok, mut slot_w, mut slot_of) =
        (vec![0i32; pairs], vec![0f32; pairs], vec![0i32; pairs]);
    launch(
        "moe_group",
        (1, 1),
        kernel_define("MOE_MAX_EXPERTS") as u32,
        0,
        &[
            p(&ids),
            p(&w),
            Arg::I(pairs as i32),
            Arg::I(k as i32),
            Arg::I(n as i32),
            pm(&mut count),
            pm(&mut start),
            pm(&mut tiles),
            pm(&mut slot_tok),
            pm(&mut slot_w),
            pm(&mut slot_of),
        ],
    );
    let warps = 8u32;
    let mut h = vec![0f32; pairs * inter];
    launch(
        "moe_gate_up",
        (n as u32, inter.div_ceil(warps as usize) as u32),
        warps * 32,
        0,
        &[
            p(&x),
            p(&tg),
            p(&tu),
            p(&count),
            p(&start),
            p(&slot_tok),
            Arg::I(hidden as i32),
            Arg::I(inter as i32),
            pm(&mut h),
        ],
    );
    let mut y = vec![0f32; pairs * hidden];
    launch(
        "moe_down",
        (n as u32, hidden.div_ceil(warps as usize) as u32),
        warps * 32,
        0,
        &[
            p(&h),
            p(&td),
            p(&count),
            p(&start),
            Arg::I(hidden as i32),
            Arg::I(inter as i32),
            pm(&mut y),
        ],
    );
    let mut out = vec![0f32; t * hidden];
    launch(
        "moe_combine",
        (t as u32, 1),
        256,
        0,
        &[
            p(&y),
            p(&slot_of),
            p(&slot_w),
            Arg::I(k as i32),
            Arg::I(hidden as i32),
            pm(&mut out),
        ],
    );
    // The host computation: route, then each chosen expert's SwiGLU, weighted.
    let cpu = Host::default();
    let f = |v: &Vec<bf16>| -> Vec<f32> { v.iter().map(|x| x.to_f32()).collect() };
    let mut want = vec![0f32; t * hidden];
    for tok in 0..t {
        let xt = x[tok * hidden..(tok + 1) * hidden].to_vec();
        for (e, wt) in route(&logits[tok * n..(tok + 1) * n], None, &moe) {
            let g = cpu.linear(&xt, 1, &f(&mats[e][0]), inter, hidden);
            let u = cpu.linear(&xt, 1, &f(&mats[e][1]), inter, hidden);
            let d = cpu.linear(&cpu.silu_mul(&g, &u), 1, &f(&mats[e][2]), hidden, inter);
            for (o, v) in want[tok * hidden..(tok + 1) * hidden].iter_mut().zip(d) {
                *o += wt * v;
            }
        }
    }
    assert_close(&out, &want, 1e-4, "moe");
    // Every pair landed in one slot, grouped by expert.
    let mut seen = slot_of.clone();
    seen.sort_unstable();
    assert_eq!(seen, (0..pairs as i32).collect::<Vec<_>>());
    assert_eq!(count.iter().sum::<i32>() as usize, pairs);
    let (mut at, mut tile) = (0, 0);
    let gm = kernel_define("GG_M") as i32;
    for e in 0..n {
        assert_eq!(start[e], at, "expert {e}: start");
        assert_eq!(tiles[e], tile, "expert {e}: first row tile");
        at += count[e];
        tile += (count[e] + gm - 1) / gm;
    }
    assert_eq!(tiles[n], tile, "row tiles");
    for pair in 0..pairs {
        let (e, s) = (ids[pair] as usize, slot_of[pair]);
        assert!(
            (start[e]..start[e] + count[e]).contains(&s),
            "pair {pair} (expert {e}) in slot {s}"
        );
        assert_eq!(
            slot_tok[s as usize] as usize,
            pair / k,
            "pair {pair}: token"
        );
        assert_eq!(slot_w[s as usize], w[pair], "pair {pair}: weight");
    }
    assert!(
        count
            .iter()
            .any(|&c| c as usize > kernel_define("GEMV_ROWS")),
        "no expert has more slots than one pass takes: {count:?}"
    );
}

/// The grouped expert GEMMs (tensor-core products, PTX's mma fragments emulated lane by
/// lane) against a host computation with the same roundings: an expert with more rows
/// than a tile (two row tiles, the second partial), one with none, one with a few;
/// outputs and depths that end partway through a tile.
#[test]
fn grouped_expert_gemms_match_a_host_computation() {
    if !available() {
        return;
    }
    let (t, hidden, inter) = (80, 40, 72usize);
    let (gm, gn, threads) = (
        kernel_define("GG_M"),
        kernel_define("GG_N"),
        kernel_define("GG_THREADS") as u32,
    );
    // The slots of each expert: every token, none, every other one, three.
    let tokens: Vec<Vec<usize>> = vec![
        (0..t).collect(),
        vec![],
        (0..t).step_by(2).collect(),
        vec![5, 17, 79],
    ];
    assert!(tokens[0].len() > gm && !tokens[0].len().is_multiple_of(gm));
    assert!(!inter.is_multiple_of(gn) && hidden < gn);
    let n = tokens.len();
    let count: Vec<i32> = tokens.iter().map(|v| v.len() as i32).collect();
    let start: Vec<i32> = count
        .iter()
        .scan(0, |at, c| {
            let s = *at;
            *at += c;
            Some(s)
        })
        .collect();
    // The row tiles as moe_group numbers them: each expert's in turn.
    let row_tiles = |c: &i32| (*c as usize).div_ceil(gm) as i32;
    let mut tiles: Vec<i32> = count
        .iter()
        .scan(0, |at, c| {
            let s = *at;
            *at += row_tiles(c);
            Some(s)
        })
        .collect();
    tiles.push(count.iter().map(row_tiles).sum());
    let slot_tok: Vec<i32> = tokens.iter().flatten().map(|&v| v as i32).collect();
    let pairs = slot_tok.len();
    let x = rand_vec(t * hidden, 60);
    let mats = expert_weights(n, hidden, inter, 400);
    let [tg, tu, td] = expert_tables(&mats);
    // As many row tiles as the backend launches for these pairs: more than there are.
    let rows = (slot_tok.len().div_ceil(gm) + n).min(t.div_ceil(gm) * n) as u32;
    assert!(rows as i32 > tiles[n]);
    let mut act = vec![bf16::NAN; pairs * inter];
    launch(
        "moe_gemm_gate_up",
        (inter.div_ceil(gn) as u32, rows),
        threads,
        0,
        &[
            p(&x),
            p(&slot_tok),
            p(&tg),
            p(&tu),
            p(&count),
            p(&start),
            p(&tiles),
            Arg::I(n as i32),
            Arg::I(hidden as i32),
            Arg::I(inter as i32),
            pm(&mut act),
        ],
    );
    let mut y = vec![f32::NAN; pairs * hidden];
    launch(
        "moe_gemm_down",
        (hidden.div_ceil(gn) as u32, rows),
        threads,
        0,
        &[
            p(&act),
            p(&td),
            p(&count),
            p(&start),
            p(&tiles),
            Arg::I(n as i32),
            Arg::I(hidden as i32),
            Arg::I(inter as i32),
            pm(&mut y),
        ],
    );
    let cpu = Host::default();
    let f = |v: &[bf16]| -> Vec<f32> { v.iter().map(|x| x.to_f32()).collect() };
    let act = f(&act);
    let (mut want_act, mut want_y) = (vec![0f32; pairs * inter], vec![0f32; pairs * hidden]);
    for (e, toks) in tokens.iter().enumerate() {
        for (i, &tok) in toks.iter().enumerate() {
            let s = start[e] as usize + i;
            let xt = rounded(&x[tok * hidden..(tok + 1) * hidden]);
            let g = cpu.linear(&xt, 1, &f(&mats[e][0]), inter, hidden);
            let u = cpu.linear(&xt, 1, &f(&mats[e][1]), inter, hidden);
            want_act[s * inter..(s + 1) * inter].copy_from_slice(&cpu.silu_mul(&g, &u));
            // The down projection of the device's own intermediate values, so that a value
            // rounded to the other neighbouring bf16 does not spread into the comparison.
            let d = cpu.linear(
                &act[s * inter..(s + 1) * inter],
                1,
                &f(&mats[e][2]),
                hidden,
                inter,
            );
            want_y[s * hidden..(s + 1) * hidden].copy_from_slice(&d);
        }
    }
    // The intermediate values are bf16: within one rounding of the host's.
    assert_close(&act, &want_act, 1.0 / 256.0, "gate and up");
    assert_close(&y, &want_y, 1e-4, "down");
}

#[test]
fn the_glue_reads_every_kernel_signature() {
    let g = glue(KERNELS);
    for name in [
        "rms_norm",
        "attention_batch",
        "moe_route",
        "moe_combine",
        "sample_rows",
    ] {
        assert!(
            g.contains(&format!("\"{name}\"")),
            "{name} missing from the glue"
        );
    }
}

/// Decode projections: `gemv_bf16` against the CPU's product of the same bf16 weights,
/// for one to eight rows, with a bias, and added into a residual.
#[test]
fn gemv_matches_the_cpu_with_bias_and_residual() {
    if !available() {
        return;
    }
    let cpu = Host::default();
    let (n, k) = (37, 48);
    let w = rounded(&rand_vec(n * k, 30));
    let wb = to_bf16(&w);
    let bias = rand_vec(n, 31);
    for m in [1, 3, 8] {
        let x = rand_vec(m * k, 32 + m as u64);
        let want = cpu.linear(&x, m, &w, n, k);
        let warps = n.div_ceil(8) as u32;
        let run = |bias: Option<&[f32]>, start: &[f32], acc: bool| {
            let mut y = start.to_vec();
            launch(
                "gemv_bf16",
                (warps, 1),
                256,
                0,
                &[
                    p(&x),
                    p(&wb),
                    Arg::U(0),
                    Arg::U(0),
                    bias.map_or(Arg::U(0), p),
                    Arg::U(0),
                    Arg::U(0),
                    pm(&mut y),
                    Arg::U(0),
                    Arg::U(0),
                    Arg::I(n as i32),
                    Arg::I(0),
                    Arg::I(0),
                    Arg::I(m as i32),
                    Arg::I(k as i32),
                    Arg::I(i32::from(acc)),
                ],
            );
            y
        };
        let zero = vec![0f32; m * n];
        assert_close(
            &run(None, &zero, false),
            &want,
            1e-5,
            &format!("gemv m {m}"),
        );
        let mut with_bias = want.clone();
        cpu.add_bias(&mut with_bias, &bias);
        assert_close(
            &run(Some(&bias), &zero, false),
            &with_bias,
            1e-5,
            "gemv + bias",
        );
        let res = rand_vec(m * n, 33);
        let mut summed = res.clone();
        cpu.add(&mut summed, &want);
        assert_close(&run(None, &res, true), &summed, 1e-5, "residual + gemv");
    }
}

/// `gemv_bf16` with three projections of the same rows in one launch (one without a bias)
/// and `gemv_swiglu` (gate and up projections with SiLU·mul) against the CPU.
#[test]
fn fused_projections_match_the_cpu() {
    if !available() {
        return;
    }
    let cpu = Host::default();
    let k = 40;
    let ns = [24usize, 8, 13];
    let ws: Vec<Vec<f32>> = ns
        .iter()
        .enumerate()
        .map(|(i, n)| rounded(&rand_vec(n * k, 40 + i as u64)))
        .collect();
    let wbs: Vec<Vec<bf16>> = ws.iter().map(|w| to_bf16(w)).collect();
    let biases: Vec<Vec<f32>> = ns
        .iter()
        .enumerate()
        .map(|(i, n)| rand_vec(*n, 50 + i as u64))
        .collect();
    for m in [1, 5, 8] {
        let x = rand_vec(m * k, 60 + m as u64);
        let mut ys: Vec<Vec<f32>> = ns.iter().map(|n| vec![0f32; m * n]).collect();
        let total: usize = ns.iter().sum();
        let (y0, rest) = ys.split_at_mut(1);
        let (y1, y2) = rest.split_at_mut(1);
        launch(
            "gemv_bf16",
            (total.div_ceil(8) as u32, 1),
            256,
            0,
            &[
                p(&x),
                p(&wbs[0]),
                p(&wbs[1]),
                p(&wbs[2]),
                p(&biases[0]),
                Arg::U(0),
                p(&biases[2]),
                pm(&mut y0[0]),
                pm(&mut y1[0]),
                pm(&mut y2[0]),
                Arg::I(ns[0] as i32),
                Arg::I(ns[1] as i32),
                Arg::I(ns[2] as i32),
                Arg::I(m as i32),
                Arg::I(k as i32),
                Arg::I(0),
            ],
        );
        for i in 0..3 {
            let mut want = cpu.linear(&x, m, &ws[i], ns[i], k);
            if i != 1 {
                cpu.add_bias(&mut want, &biases[i]);
            }
            assert_close(&ys[i], &want, 1e-5, &format!("gemv part {i} of 3, m {m}"));
        }
        let n = ns[0];
        let mut y = vec![0f32; m * n];
        launch(
            "gemv_swiglu",
            (n.div_ceil(8) as u32, 1),
            256,
            0,
            &[
                p(&x),
                p(&wbs[0]),
                p(&to_bf16(
                    &ws[0][..n * k].iter().rev().copied().collect::<Vec<_>>(),
                )),
                pm(&mut y),
                Arg::I(m as i32),
                Arg::I(n as i32),
                Arg::I(k as i32),
            ],
        );
        let up: Vec<f32> = ws[0][..n * k].iter().rev().copied().collect();
        let want = cpu.silu_mul(
            &cpu.linear(&x, m, &ws[0], n, k),
            &cpu.linear(&x, m, &up, n, k),
        );
        assert_close(&y, &want, 1e-5, &format!("gemv_swiglu m {m}"));
    }
}

/// `gemv_bf16_norm` and `gemv_swiglu_norm` (the RMSNorm folded into the projections'
/// pass over the rows) against the CPU's `rms_norm` followed by the same projections, with
/// rows of very different scales (the norm's per-row scale is what is folded in).
#[test]
fn norm_folded_projections_match_norm_then_projection() {
    if !available() {
        return;
    }
    let cpu = Host::default();
    let (k, eps) = (64, 1e-6f32);
    let ns = [16usize, 9, 30];
    let ws: Vec<Vec<f32>> = ns
        .iter()
        .enumerate()
        .map(|(i, n)| rounded(&rand_vec(n * k, 70 + i as u64)))
        .collect();
    let wbs: Vec<Vec<bf16>> = ws.iter().map(|w| to_bf16(w)).collect();
    let bias = rand_vec(ns[2], 75);
    let nw: Vec<f32> = rand_vec(k, 76).iter().map(|v| 1.0 + v).collect();
    for m in [1, 4, 8] {
        let mut x = rand_vec(m * k, 80 + m as u64);
        for (r, row) in x.chunks_mut(k).enumerate() {
            row.iter_mut()
                .for_each(|v| *v *= 10f32.powi(r as i32 % 4 - 1));
        }
        let xn = cpu.rms_norm(&x, &nw, eps);
        let mut ys: Vec<Vec<f32>> = ns.iter().map(|n| vec![0f32; m * n]).collect();
        // The third part is added into a residual.
        let res = rand_vec(m * ns[2], 85);
        ys[2].copy_from_slice(&res);
        let total: usize = ns.iter().sum();
        let (y0, rest) = ys.split_at_mut(1);
        let (y1, y2) = rest.split_at_mut(1);
        launch(
            "gemv_bf16_norm",
            (total.div_ceil(8) as u32, 1),
            256,
            0,
            &[
                p(&x),
                p(&wbs[0]),
                p(&wbs[1]),
                p(&wbs[2]),
                Arg::U(0),
                Arg::U(0),
                p(&bias),
                pm(&mut y0[0]),
                pm(&mut y1[0]),
                pm(&mut y2[0]),
                Arg::I(ns[0] as i32),
                Arg::I(ns[1] as i32),
                Arg::I(ns[2] as i32),
                Arg::I(m as i32),
                Arg::I(k as i32),
                Arg::I(1),
                p(&nw),
                Arg::F(eps),
            ],
        );
        for i in 0..3 {
            let mut want = cpu.linear(&xn, m, &ws[i], ns[i], k);
            if i == 2 {
                cpu.add_bias(&mut want, &bias);
                // accumulate adds into what the first two parts held too (zeros).
                cpu.add(&mut want, &res);
            }
            assert_close(
                &ys[i],
                &want,
                1e-4,
                &format!("gemv_bf16_norm part {i}, m {m}"),
            );
        }
        let n = ns[2];
        let up: Vec<f32> = ws[2].iter().rev().copied().collect();
        let mut y = vec![0f32; m * n];
        launch(
            "gemv_swiglu_norm",
            (n.div_ceil(8) as u32, 1),
            256,
            0,
            &[
                p(&x),
                p(&wbs[2]),
                p(&to_bf16(&up)),
                pm(&mut y),
                Arg::I(m as i32),
                Arg::I(n as i32),
                Arg::I(k as i32),
                p(&nw),
                Arg::F(eps),
            ],
        );
        let want = cpu.silu_mul(
            &cpu.linear(&xn, m, &ws[2], n, k),
            &cpu.linear(&xn, m, &up, n, k),
        );
        assert_close(&y, &want, 1e-4, &format!("gemv_swiglu_norm m {m}"));
    }
}

/// RoPE folded into the projections (`gemv_bf16_rope`, `gemv_bf16_norm_rope`): the same
/// outputs as the projection, its bias, then the `rope` the CPU backend applies, in both
/// layouts, for rotated parts of many heads from offset 0 (Qwen2's queries and keys), of
/// one head rotated after the rest of it (MLA's query heads, the latent's rope key), and
/// a part left alone (values).
#[test]
fn rope_folded_projections_match_projection_then_rope() {
    if !available() {
        return;
    }
    let cpu = Host::default();
    let (k, eps, max_pos) = (64, 1e-6f32, 20);
    // (layout, rot, [(n, head_dim, offset)]: head_dim 0 = not rotated)
    let cases = [
        (
            RopeLayout::Halves,
            16,
            [(48, 16, 0), (32, 16, 0), (32, 0, 0)],
        ),
        (
            RopeLayout::Interleaved,
            16,
            [(48, 24, 8), (40, 40, 24), (20, 0, 0)],
        ),
    ];
    for (ci, (layout, rot, parts)) in cases.into_iter().enumerate() {
        let half = rot / 2;
        let seed = 300 + 10 * ci as u64;
        let cos = rand_vec(max_pos * half, seed);
        let sin = rand_vec(max_pos * half, seed + 1);
        let ws: Vec<Vec<f32>> = parts
            .iter()
            .enumerate()
            .map(|(i, (n, _, _))| rounded(&rand_vec(n * k, seed + 2 + i as u64)))
            .collect();
        let wbs: Vec<Vec<bf16>> = ws.iter().map(|w| to_bf16(w)).collect();
        let biases: Vec<Vec<f32>> = parts
            .iter()
            .enumerate()
            .map(|(i, (n, _, _))| rand_vec(*n, seed + 5 + i as u64))
            .collect();
        let nw: Vec<f32> = rand_vec(k, seed + 8).iter().map(|v| 1.0 + v).collect();
        let warps: usize = parts
            .iter()
            .map(|&(n, d, _)| n.checked_div(d).map_or(n, |heads| heads * (d - half)))
            .sum();
        for m in [1, 3, 8] {
            let x = rand_vec(m * k, seed + 9 + m as u64);
            let positions: Vec<usize> = (0..m).map(|r| (7 * r + 3 * ci) % max_pos).collect();
            let pos: Vec<u32> = positions.iter().map(|p| *p as u32).collect();
            for normed in [false, true] {
                let mut ys: Vec<Vec<f32>> = parts
                    .iter()
                    .map(|(n, _, _)| vec![f32::NAN; m * n])
                    .collect();
                let (y0, rest) = ys.split_at_mut(1);
                let (y1, y2) = rest.split_at_mut(1);
                let mut args = vec![
                    p(&x),
                    p(&wbs[0]),
                    p(&wbs[1]),
                    p(&wbs[2]),
                    p(&biases[0]),
                    p(&biases[1]),
                    p(&biases[2]),
                    pm(&mut y0[0]),
                    pm(&mut y1[0]),
                    pm(&mut y2[0]),
                    Arg::I(parts[0].0 as i32),
                    Arg::I(parts[1].0 as i32),
                    Arg::I(parts[2].0 as i32),
                    Arg::I(m as i32),
                    Arg::I(k as i32),
                    Arg::I(0),
                    p(&pos),
                    p(&cos),
                    p(&sin),
                    Arg::I(rot as i32),
                    Arg::I(i32::from(layout == RopeLayout::Interleaved)),
                ];
                for &(_, d, off) in &parts {
                    args.push(Arg::I(d as i32));
                    args.push(Arg::I(off as i32));
                }
                let name = if normed {
                    args.push(p(&nw));
                    args.push(Arg::F(eps));
                    "gemv_bf16_norm_rope"
                } else {
                    "gemv_bf16_rope"
                };
                launch(name, (warps.div_ceil(8) as u32, 1), 256, 0, &args);
                let xin = if normed {
                    cpu.rms_norm(&x, &nw, eps)
                } else {
                    x.clone()
                };
                for (i, &(n, d, off)) in parts.iter().enumerate() {
                    let mut want = cpu.linear(&xin, m, &ws[i], n, k);
                    cpu.add_bias(&mut want, &biases[i]);
                    if let Some(heads) = n.checked_div(d) {
                        cpu.rope(
                            &mut want, heads, d, off, rot, &positions, &cos, &sin, layout,
                        );
                    }
                    assert_close(
                        &ys[i],
                        &want,
                        1e-4,
                        &format!("{name} {layout:?} part {i}, m {m}"),
                    );
                }
            }
        }
    }
}

/// Sampling on the device: `sample_rows` picks what the host's `Pick::pick` picks from
/// the same values and draws — greedy, temperatures, top-k, top-p, repetition penalties,
/// their combinations, ties, grammar masks, draws at both ends — with the log-softmax of
/// the whole row.
#[test]
fn sampling_on_the_device_picks_what_the_host_picks() {
    use cloud_core::engine::sampler::{
        alternatives, argmax, log_softmax, penalize, set_bits, MAX_ALTERNATIVES,
    };
    if !available() {
        return;
    }
    // (temperature, top_k, top_p, repetition penalty)
    let specs = [
        (0.0, 0, 1.0, 1.0),
        (1.0, 0, 1.0, 1.0),
        (0.7, 0, 0.9, 1.3),
        (1.3, 40, 1.0, 1.0),
        (1.0, 5, 0.5, 0.8),
        (0.9, 1, 1.0, 1.0),
        (2.0, 0, 0.3, 1.0),
        (1.0, 1000, 0.95, 1.0),
        (0.0, 0, 1.0, 2.0),
    ];
    for (cols, spread, seed) in [
        (300usize, 4.0f32, 1u64),
        (300, 30.0, 2),
        (5000, 8.0, 3),
        (12, 4.0, 4),
    ] {
        let rows = if cols > 1000 { 4 } else { 24 };
        let mut x: Vec<f32> = rand_vec(rows * cols, 60 + seed)
            .iter()
            .map(|v| v * spread)
            .collect();
        // Ties: row r's first values repeat its largest.
        for r in 0..rows {
            let row = &mut x[r * cols..(r + 1) * cols];
            let top = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            row[3] = top;
            row[cols - 2] = top;
        }
        let draws = rand_vec(rows, 70 + seed);
        let picks: Vec<Pick> = (0..rows)
            .map(|r| {
                let (temperature, top_k, top_p, repetition_penalty) = specs[r % specs.len()];
                let draw = match r % 11 {
                    0 => 0.0,
                    1 => 1.0 - 1e-12,
                    _ => f64::from(draws[r].abs()).min(0.999),
                };
                Pick {
                    temperature,
                    top_k,
                    top_p,
                    draw,
                    repetition_penalty,
                    // Up to 7 alternatives; row 1's the most (more than a row of 12 holds).
                    alternatives: if r == 1 { MAX_ALTERNATIVES } else { r % 8 },
                }
            })
            .collect();
        // Every third row allows only tokens whose index is not a multiple of 3.
        let words = cols.div_ceil(32);
        let mut mask = vec![u32::MAX; rows * words];
        for r in (0..rows).step_by(3) {
            for t in (0..cols).step_by(3) {
                mask[r * words + t / 32] &= !(1 << (t % 32));
            }
        }
        let mut off_argmax = 0;
        // Seen: every 7th token and each row's largest value (the penalty changes picks).
        let mut seen = vec![0u32; rows * words];
        for r in 0..rows {
            let row = &x[r * cols..(r + 1) * cols];
            let mut tokens: Vec<u32> = (0..cols as u32).step_by(7).collect();
            tokens.push(argmax(row) as u32);
            set_bits(&mut seen[r * words..(r + 1) * words], &tokens);
        }
        for (allowed, seen) in [
            (None, None),
            (Some(&mask), None),
            (Some(&mask), Some(&seen)),
        ] {
            let spec: Vec<u64> = picks.iter().flat_map(Pick::words).collect();
            let mut out = vec![0u32; rows];
            let mut lp = vec![0f32; rows];
            let mut top = vec![u32::MAX; rows * 2 * MAX_ALTERNATIVES];
            let threads = (cols / 16).next_power_of_two().clamp(32, 1024) as u32;
            launch(
                "sample_rows",
                (rows as u32, 1),
                threads,
                0,
                &[
                    p(&x),
                    Arg::I(cols as i32),
                    allowed.map_or(Arg::U(0), |m| p(m)),
                    seen.map_or(Arg::U(0), |m| p(m)),
                    p(&spec),
                    pm(&mut out),
                    pm(&mut lp),
                    Arg::I(MAX_ALTERNATIVES as i32),
                    pm(&mut top),
                ],
            );
            for r in 0..rows {
                let row = &x[r * cols..(r + 1) * cols];
                let mut masked = row.to_vec();
                if let Some(m) = allowed {
                    for (t, v) in masked.iter_mut().enumerate() {
                        if (m[r * words + t / 32] >> (t % 32)) & 1 == 0 {
                            *v = f32::NEG_INFINITY;
                        }
                    }
                }
                if let Some(sn) = seen {
                    penalize(
                        &mut masked,
                        &sn[r * words..(r + 1) * words],
                        picks[r].repetition_penalty,
                    );
                }
                let want = picks[r].pick(&masked);
                off_argmax += usize::from(want != argmax(&masked));
                let what = format!(
                    "{cols} columns, row {r}, {:?}, mask {}, seen {}",
                    picks[r],
                    allowed.is_some(),
                    seen.is_some()
                );
                assert_eq!(out[r] as usize, want, "{what}");
                let lw = log_softmax(row)[want];
                assert!(
                    (lp[r] - lw).abs() <= 1e-4,
                    "{what}: log-probability {} vs {lw}",
                    lp[r]
                );
                // The alternatives: the raw row's largest, whatever the mask and penalty.
                let lse = row[0] - log_softmax(row)[0];
                let want = alternatives(row, lse, picks[r].alternatives);
                let got = &top[r * 2 * MAX_ALTERNATIVES..(r + 1) * 2 * MAX_ALTERNATIVES];
                for (j, &(t, l)) in want.iter().enumerate() {
                    assert_eq!(got[2 * j], t, "{what}: alternative {j}");
                    let gl = f32::from_bits(got[2 * j + 1]);
                    assert!(
                        (gl - l).abs() <= 1e-4,
                        "{what}: alternative {j}: {gl} vs {l}"
                    );
                }
                assert!(
                    got[2 * want.len()..].iter().all(|w| *w == u32::MAX),
                    "{what}: more than {} alternatives written",
                    want.len()
                );
            }
        }
        // The draws did choose: not every pick is the largest value.
        assert!(off_argmax > 0, "{cols} columns: every pick was the argmax");
    }
}

/// What a child process of the test below does: one fault the device would refuse, named
/// by `EMU_FAULT`.
fn fault_in_child(fault: &str) {
    let (n, k) = (8, 16);
    let wb = to_bf16(&rand_vec(n * k, 40));
    let x = rand_vec(k + 4, 41);
    let mut y = vec![0f32; n];
    // `x` one float past its start: 4-byte aligned, not 16 (its loads are 16-byte ones).
    let (xs, ws): (&[f32], &[bf16]) = match fault {
        "misaligned" => (&x[1..], &wb),
        // The weights one row short: the last warp reads past their end.
        "out_of_bounds" => (&x, &wb[..(n - 1) * k]),
        other => panic!("no fault {other}"),
    };
    let ws = ws.to_vec();
    launch(
        "gemv_bf16",
        (1, 1),
        256,
        0,
        &[
            p(xs),
            p(&ws),
            Arg::U(0),
            Arg::U(0),
            Arg::U(0),
            Arg::U(0),
            Arg::U(0),
            pm(&mut y),
            Arg::U(0),
            Arg::U(0),
            Arg::I(n as i32),
            Arg::I(0),
            Arg::I(0),
            Arg::I(1),
            Arg::I(k as i32),
            Arg::I(0),
        ],
    );
    println!("no fault: {y:?}");
}

/// The emulation faults where the device would, instead of forgiving what x86-64 forgives:
/// a 16-byte load from an address 16 does not divide (the device's "misaligned address")
/// and, when built with AddressSanitizer (`EMU_SANITIZE=address`, as CI runs these tests
/// once), a read past the end of an allocation. Each runs in a child process (a fault
/// ends it).
#[test]
fn the_emulation_faults_where_the_device_would() {
    if let Ok(fault) = std::env::var("EMU_FAULT") {
        return fault_in_child(&fault);
    }
    let Some(emu) = emu() else { return };
    let mut faults = vec![("misaligned", "misaligned address")];
    if emu_build::address_sanitized() {
        faults.push(("out_of_bounds", "heap-buffer-overflow"));
    } else {
        eprintln!("out-of-bounds reads not checked: EMU_SANITIZE=address is not set");
    }
    for (fault, says) in faults {
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "the_emulation_faults_where_the_device_would",
                "--nocapture",
            ])
            .env("EMU_FAULT", fault)
            .env("EMU_BUILT", &emu.dir)
            .output()
            .expect("the test binary runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{fault}: no fault reported ({}):\n{}\n{err}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
