//! The CPU backend: the reference implementation, multi-threaded GEMM from the `gemm`
//! crate, straightforward loops for everything else. Activations are f32; matrices are
//! f32 or bf16 ([`CpuWeights`]), bf16 ones widened as they are read.

use half::bf16;

use super::{AttnShape, Backend, KvShape, RopeLayout, Weight};

mod kv;
#[cfg(target_arch = "x86_64")]
mod lanes;
pub use kv::{host_available, CpuKv, KvOptions};

/// The CPU backend.
#[derive(Clone, Debug, Default)]
pub struct Cpu {
    /// How matrices are kept.
    pub weights: CpuWeights,
    /// The paged KV cache's budget and blocks.
    pub kv: KvOptions,
    /// Elements of the matrices uploaded so far, by the form they are held in.
    held: std::sync::Arc<HeldMatrices>,
    /// The KV cache's memory and the first error of a step, shared by clones.
    store: std::sync::Arc<kv::Store>,
}

/// Elements of the matrices a [`Cpu`] backend has uploaded, by the form they are held in.
#[derive(Debug, Default)]
struct HeldMatrices {
    bf16: std::sync::atomic::AtomicU64,
    f32: std::sync::atomic::AtomicU64,
}

impl Cpu {
    /// The CPU backend keeping matrices as `weights` says.
    pub fn with_weights(weights: CpuWeights) -> Cpu {
        Cpu {
            weights,
            ..Cpu::default()
        }
    }

    /// Elements of the matrices uploaded through this backend (and its clones) so far:
    /// `(held as bf16, held as f32)`.
    pub fn matrix_elements(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.held.bf16.load(Relaxed), self.held.f32.load(Relaxed))
    }

    /// Bytes per matrix element over the matrices uploaded so far (2: all bf16, 4: all
    /// f32; `None` before any).
    pub fn matrix_element_bytes(&self) -> Option<f64> {
        let (b, f) = self.matrix_elements();
        (b + f > 0).then(|| (2 * b + 4 * f) as f64 / (b + f) as f64)
    }
}

/// How the CPU backend keeps a model's matrices (norms, biases and the absorbed MLA
/// products are always f32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuWeights {
    /// As the checkpoint stores them: a bf16 matrix stays bf16 (half the memory of f32
    /// and of the bytes each decode step reads, and exactly the same values), an f32 one
    /// stays f32. Random models stand for the published checkpoints, which are bf16.
    #[default]
    AsStored,
    /// Every matrix widened to f32 (bf16 ones exactly).
    F32,
    /// Every matrix rounded to bf16 (f32 ones lose precision, as on the CUDA backend).
    Bf16,
}

impl std::str::FromStr for CpuWeights {
    type Err = String;
    fn from_str(s: &str) -> Result<CpuWeights, String> {
        match s {
            "as-stored" => Ok(CpuWeights::AsStored),
            "f32" => Ok(CpuWeights::F32),
            "bf16" => Ok(CpuWeights::Bf16),
            other => Err(format!(
                "unknown CPU weight type {other:?} (as-stored, f32, bf16)"
            )),
        }
    }
}

/// A buffer of the CPU backend: f32 values, or a matrix kept as bf16. Only
/// [`Backend::linear`] (and the projections built on it) and [`Backend::gather_rows`]
/// read bf16 matrices; every other operation takes f32 buffers.
#[derive(Clone, Debug, PartialEq)]
pub enum CpuBuf {
    /// f32 values: activations, norms, biases, f32 matrices.
    F32(Vec<f32>),
    /// A matrix of bf16 values.
    Bf16(Vec<bf16>),
}

impl From<Vec<f32>> for CpuBuf {
    fn from(v: Vec<f32>) -> CpuBuf {
        CpuBuf::F32(v)
    }
}

impl CpuBuf {
    /// The f32 values.
    ///
    /// # Panics
    /// On a bf16 matrix: an operation was given a weight where it takes activations.
    pub fn f32(&self) -> &Vec<f32> {
        match self {
            CpuBuf::F32(v) => v,
            CpuBuf::Bf16(_) => panic!("a bf16 matrix where f32 values are expected"),
        }
    }

    fn f32_mut(&mut self) -> &mut Vec<f32> {
        match self {
            CpuBuf::F32(v) => v,
            CpuBuf::Bf16(_) => panic!("a bf16 matrix where f32 values are expected"),
        }
    }

    /// The values as f32 (bf16 ones widened, exactly).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            CpuBuf::F32(v) => v.clone(),
            CpuBuf::Bf16(v) => v.iter().map(|x| widen(*x)).collect(),
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            CpuBuf::F32(v) => v.len(),
            CpuBuf::Bf16(v) => v.len(),
        }
    }

    /// Whether it holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Values of keys and values an attention task reads at the least (smaller tasks cost
/// more to hand out than they save).
const ATTENTION_TASK_WORK: usize = 1 << 16;

impl Cpu {
    /// Causal attention for one sequence: `q[t, h, dk]` against `k[T, hk, dk]`,
    /// `v[T, hk, dv]` (grouped: query head `i` reads key head `i / (h / hk)`), where the
    /// `t` queries are the last `t` of `T` positions. Returns `[t, h, dv]`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        t: usize,
        h: usize,
        hk: usize,
        dk: usize,
        dv: usize,
        scale: f32,
    ) -> Vec<f32> {
        let rows = kv::Contiguous {
            k,
            v,
            key_stride: hk * dk,
            value_stride: hk * dv,
        };
        let s = AttnShape {
            h,
            hk,
            dk,
            dv,
            scale,
            values_in_keys: false,
        };
        attention(q, &rows, t, s)
    }
}

/// [`Cpu::attention`] over the rows `rows` holds (with [`AttnShape::values_in_keys`],
/// each head's values are the first `dv` columns of its key).
fn attention<R: kv::KvRows>(q: &[f32], rows: &R, t: usize, s: AttnShape) -> Vec<f32> {
    use rayon::prelude::*;
    let AttnShape { h, hk, dk, dv, .. } = s;
    let total = rows.positions();
    let mut out = vec![0f32; t * h * dv];
    let per = attention_heads(t, h, hk, rayon::current_num_threads());
    // Tasks of a query's heads that read one key head, each task with enough positions
    // to read that the split costs less than it saves.
    let per_task = total * (dk + dv) * per;
    let min_tasks = (ATTENTION_TASK_WORK / per_task.max(1)).max(1);
    let job = Attend { q, rows, t, s };
    let simd = Simd::detect();
    out.par_chunks_mut(per * dv)
        .enumerate()
        .with_min_len(min_tasks)
        .for_each_init(Vec::new, |scores, (task, o)| {
            job.heads_at(simd, task * per, o, scores)
        });
    out
}

/// Query heads an attention task takes at most: a tile of the products' dot products,
/// each key read once for all of them.
const ATTENTION_HEADS: usize = GEMV_MAX_ROWS;

/// Query heads per attention task of `t` queries of `h` heads reading `hk` key heads:
/// the most that share a key head, divide them evenly and fit [`ATTENTION_HEADS`], fewer
/// where that would leave fewer than four tasks a thread (a decode step's few queries).
fn attention_heads(t: usize, h: usize, hk: usize, threads: usize) -> usize {
    let group = h / hk.max(1);
    let most = ATTENTION_HEADS.min(t * h / (4 * threads.max(1))).max(1);
    (1..=most.min(group))
        .rev()
        .find(|d| group.is_multiple_of(*d))
        .unwrap_or(1)
}

/// One sequence's attention: its queries `q` (`[t, h, dk]`, the last `t` of the
/// positions `rows` holds) against those rows.
struct Attend<'a, R> {
    q: &'a [f32],
    rows: &'a R,
    t: usize,
    s: AttnShape,
}

impl<R: kv::KvRows> Attend<'_, R> {
    /// [`Attend::heads`] at the SIMD level `simd`.
    fn heads_at(&self, simd: Simd, first: usize, o: &mut [f32], scores: &mut Vec<f32>) {
        match simd {
            Simd::Baseline => self.heads::<Portable>(first, o, scores),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Simd::detect` chose these only where the CPU has the features.
            #[allow(unsafe_code)]
            Simd::Avx2 => unsafe { self.heads_avx2(first, o, scores) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            #[allow(unsafe_code)]
            Simd::Avx512 => unsafe { self.heads_avx512(first, o, scores) },
        }
    }

    /// `o` (`dv` values a head) for the `o.len() / dv` (query, head) pairs from `first`:
    /// heads of one query that read one key head. Each key is read once for all of
    /// them, its scores made by the products' dot-product tiles ([`gemv_rows`]); each
    /// head's sums are those of the head alone (the same bits however the heads are
    /// split into tasks, at every SIMD level).
    #[inline(always)]
    fn heads<D: Dot>(&self, first: usize, o: &mut [f32], scores: &mut Vec<f32>) {
        let Attend { q, rows, t, s } = self;
        let AttnShape { h, hk, dk, dv, .. } = *s;
        let n = o.len() / dv;
        let total = rows.positions();
        let (ks, vs) = (rows.key_stride(), rows.value_stride());
        let (qi, head) = (first / h, first % h);
        let visible = total - t + qi + 1; // causal: positions 0..=this one
        let kh = head / (h / hk);
        assert!(
            n > 0 && (head + n - 1) / (h / hk) == kh,
            "one key head a task"
        );
        let (ko, vo) = (kh * dk, if s.values_in_keys { kh * dk } else { kh * dv });
        let qv = &q[first * dk..(first + n) * dk];
        scores.clear();
        scores.resize(visible * n, 0.0);
        let mut j = 0;
        while j < visible {
            let run = rows.keys(j, visible);
            let count = run.len() / ks;
            let at = &mut scores[j * n..(j + count) * n];
            if ks == dk {
                // The key head's keys one after another: tiles of several keys.
                gemv_rows::<D, R::E>(qv, n, run, dk, at);
            } else {
                for (key, o) in run.chunks_exact(ks).zip(at.chunks_exact_mut(n)) {
                    gemv_rows::<D, R::E>(qv, n, &key[ko..ko + dk], dk, o);
                }
            }
            j += count;
        }
        let mut max = [f32::NEG_INFINITY; ATTENTION_HEADS];
        for at in scores.chunks_exact_mut(n) {
            for (m, v) in max.iter_mut().zip(at) {
                *v *= s.scale;
                *m = m.max(*v);
            }
        }
        let mut sum = [0f32; ATTENTION_HEADS];
        for at in scores.chunks_exact_mut(n) {
            for ((sm, m), v) in sum.iter_mut().zip(&max).zip(at) {
                *v = (*v - m).exp();
                *sm += *v;
            }
        }
        let mut j = 0;
        while j < visible {
            let run = rows.values(j, visible);
            for (value, at) in run.chunks_exact(vs).zip(scores[j * n..].chunks_exact(n)) {
                let value = &value[vo..vo + dv];
                for ((oh, sc), sm) in o.chunks_exact_mut(dv).zip(at).zip(&sum) {
                    let w = sc / sm;
                    for (a, b) in oh.iter_mut().zip(value) {
                        *a += w * b.f();
                    }
                }
            }
            j += run.len() / vs;
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn heads_avx2(&self, first: usize, o: &mut [f32], scores: &mut Vec<f32>) {
        self.heads::<InLanes<lanes::Avx2>>(first, o, scores)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    fn heads_avx512(&self, first: usize, o: &mut [f32], scores: &mut Vec<f32>) {
        self.heads::<InLanes<lanes::Avx512>>(first, o, scores)
    }
}

impl Backend for Cpu {
    type Buf = CpuBuf;
    type Kv = CpuKv;

    fn new_kv(&self, shape: KvShape) -> CpuKv {
        CpuKv::new(shape)
    }

    fn kv_prefix(&self, kv: &CpuKv, keep: usize) -> CpuKv {
        kv.prefix(keep)
    }

    fn kv_grow(&self, caches: &mut [&mut CpuKv], lens: &[usize]) {
        self.store.grow(&self.kv, caches, lens);
    }

    fn attend(
        &self,
        q: &CpuBuf,
        k: &CpuBuf,
        v: &CpuBuf,
        lens: &[usize],
        layer: usize,
        caches: &mut [&mut CpuKv],
        s: AttnShape,
    ) -> CpuBuf {
        let (q, k, v) = (q.f32(), k.f32(), v.f32());
        let rows: usize = lens.iter().sum();
        // What a step that failed gives: it is discarded, so nothing is worth computing.
        let discarded = || CpuBuf::F32(vec![0f32; rows * s.h * s.dv]);
        if self.store.errored() {
            return discarded();
        }
        let shape = KvShape {
            layers: caches.first().map_or(0, |kv| kv.shape().layers),
            kcols: s.hk * s.dk,
            vcols: s.hk * s.dv,
            values_in_keys: s.values_in_keys,
        };
        let (qc, dv) = (s.h * s.dk, s.dv);
        let vlen = if s.values_in_keys {
            v.len()
        } else {
            rows * shape.vcols
        };
        if (q.len(), k.len(), v.len()) != (rows * qc, rows * shape.kcols, vlen) {
            self.store.record(super::DeviceError::Failed {
                op: "attention".into(),
                message: format!(
                    "queries, keys and values of {}, {} and {} values for {rows} rows of {s:?}",
                    q.len(),
                    k.len(),
                    v.len()
                ),
            });
            return discarded();
        }
        let mut out = Vec::with_capacity(rows * s.h * dv);
        let mut at = 0;
        self.store
            .write_and_read(&self.kv, caches, lens, layer, shape, k, v, |i, rows| {
                let qs = &q[at * qc..(at + lens[i]) * qc];
                out.extend(match rows {
                    kv::LayerRows::F32(r) => attention(qs, &r, lens[i], s),
                    kv::LayerRows::Bf16(r) => attention(qs, &r, lens[i], s),
                });
                at += lens[i];
            });
        if self.store.errored() {
            return discarded();
        }
        CpuBuf::F32(out)
    }

    fn take_error(&self) -> Option<super::DeviceError> {
        self.store.take_error()
    }

    fn kv_cache(&self) -> Option<super::KvCacheUsage> {
        self.store.usage()
    }

    fn upload(&self, data: &[f32]) -> CpuBuf {
        CpuBuf::F32(data.to_vec())
    }

    fn download(&self, b: &CpuBuf) -> Vec<f32> {
        b.to_f32()
    }

    fn len(&self, b: &CpuBuf) -> usize {
        b.len()
    }

    fn wants_bf16_weights(&self, stored_bf16: bool) -> bool {
        match self.weights {
            CpuWeights::AsStored => stored_bf16,
            CpuWeights::F32 => false,
            CpuWeights::Bf16 => true,
        }
    }

    fn upload_weight(&self, w: Weight<'_>, shape: &[usize]) -> CpuBuf {
        let matrix = shape.len() == 2;
        let as_bf16 = matrix && self.wants_bf16_weights(matches!(w, Weight::Bf16(_)));
        let buf = match (w, as_bf16) {
            (Weight::Bf16(v), true) => CpuBuf::Bf16(v.to_vec()),
            (Weight::Bf16(v), false) => CpuBuf::F32(v.iter().map(|x| widen(*x)).collect()),
            (Weight::F32(v), true) => CpuBuf::Bf16(v.iter().map(|x| bf16::from_f32(*x)).collect()),
            (Weight::F32(v), false) => CpuBuf::F32(v.to_vec()),
        };
        if matrix {
            use std::sync::atomic::Ordering::Relaxed;
            let n = buf.len() as u64;
            match &buf {
                CpuBuf::Bf16(_) => self.held.bf16.fetch_add(n, Relaxed),
                CpuBuf::F32(_) => self.held.f32.fetch_add(n, Relaxed),
            };
        }
        buf
    }

    fn describe(&self) -> String {
        let threads = rayon::current_num_threads();
        let weights = match self.weights {
            CpuWeights::AsStored => "matrices as stored",
            CpuWeights::F32 => "f32 matrices",
            CpuWeights::Bf16 => "bf16 matrices",
        };
        let kv = if self.kv.bf16 { ", bf16 KV cache" } else { "" };
        let simd = Simd::detect().name();
        format!("cpu ({threads} threads, {simd}, {weights}{kv})")
    }

    fn linear(&self, x: &CpuBuf, m: usize, w: &CpuBuf, n: usize, k: usize) -> CpuBuf {
        let x = x.f32();
        assert_eq!(x.len(), m * k, "linear: input is not [{m}, {k}]");
        assert_eq!(w.len(), n * k, "linear: weight is not [{n}, {k}]");
        if m == 0 || n == 0 || k == 0 {
            return CpuBuf::F32(vec![0f32; m * n]);
        }
        CpuBuf::F32(matrix_product(x, m, w, n, k))
    }

    fn moe_routed(
        &self,
        x: &CpuBuf,
        t: usize,
        logits: &CpuBuf,
        bias: Option<&CpuBuf>,
        experts: &[[&CpuBuf; 3]],
        hidden: usize,
        inter: usize,
        moe: &crate::engine::config::MoeConfig,
    ) -> Option<CpuBuf> {
        let (x, logits) = (x.f32(), logits.f32());
        let n = moe.n_routed_experts;
        assert_eq!(
            x.len(),
            t * hidden,
            "moe_routed: input is not [{t}, {hidden}]"
        );
        assert_eq!(logits.len(), t * n, "moe_routed: logits are not [{t}, {n}]");
        assert_eq!(
            experts.len(),
            n,
            "moe_routed: {} experts for {n}",
            experts.len()
        );
        for (e, [gate, up, down]) in experts.iter().enumerate() {
            let lens = [gate.len(), up.len(), down.len()];
            let want = [inter * hidden; 3];
            assert_eq!(
                lens, want,
                "moe_routed: expert {e}'s matrices are not {inter} × {hidden}"
            );
        }
        let bias = bias.map(|b| b.f32().as_slice());
        let per_expert = crate::engine::model::route_tokens(logits, bias, moe);
        let active: Vec<(usize, &[usize], &[f32])> = per_expert
            .iter()
            .enumerate()
            .filter(|(_, (toks, _))| !toks.is_empty())
            .map(|(e, (toks, ws))| (e, toks.as_slice(), ws.as_slice()))
            .collect();
        Some(CpuBuf::F32(moe_experts(
            x, t, &active, experts, hidden, inter,
        )))
    }

    fn pick_rows(
        &self,
        x: &CpuBuf,
        cols: usize,
        allowed: Option<&[u32]>,
        seen: Option<&[u32]>,
        picks: &[crate::engine::sampler::Pick],
    ) -> Vec<crate::engine::sampler::Sampled> {
        super::pick_on_host(x.f32(), cols, allowed, seen, picks)
    }

    fn add_bias(&self, x: &mut CpuBuf, bias: &CpuBuf) {
        let (x, bias) = (x.f32_mut(), bias.f32());
        let n = bias.len();
        for row in x.chunks_exact_mut(n) {
            for (a, b) in row.iter_mut().zip(bias) {
                *a += b;
            }
        }
    }

    fn add(&self, x: &mut CpuBuf, y: &CpuBuf) {
        let (x, y) = (x.f32_mut(), y.f32());
        for (a, b) in x.iter_mut().zip(y) {
            *a += b;
        }
    }

    fn add_scaled(&self, x: &mut CpuBuf, y: &CpuBuf, s: f32) {
        let (x, y) = (x.f32_mut(), y.f32());
        for (a, b) in x.iter_mut().zip(y) {
            *a += s * b;
        }
    }

    fn rms_norm(&self, x: &CpuBuf, w: &CpuBuf, eps: f32) -> CpuBuf {
        let (x, w) = (x.f32(), w.f32());
        let d = w.len();
        let mut out = vec![0f32; x.len()];
        for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (ms + eps).sqrt();
            for ((o, v), g) in o.iter_mut().zip(row).zip(w) {
                *o = v * r * g;
            }
        }
        CpuBuf::F32(out)
    }

    fn silu_mul(&self, gate: &CpuBuf, up: &CpuBuf) -> CpuBuf {
        CpuBuf::F32(silu_mul(gate.f32(), up.f32()))
    }

    fn gather_rows(&self, table: &CpuBuf, d: usize, ids: &[u32]) -> CpuBuf {
        let mut out = Vec::with_capacity(ids.len() * d);
        for &i in ids {
            let rows = i as usize * d..(i as usize + 1) * d;
            match table {
                CpuBuf::F32(t) => out.extend_from_slice(&t[rows]),
                CpuBuf::Bf16(t) => out.extend(t[rows].iter().map(|x| widen(*x))),
            }
        }
        CpuBuf::F32(out)
    }

    fn slice_cols(&self, x: &CpuBuf, cols: usize, from: usize, width: usize) -> CpuBuf {
        let x = x.f32();
        let mut out = Vec::with_capacity(x.len() / cols.max(1) * width);
        for row in x.chunks_exact(cols) {
            out.extend_from_slice(&row[from..from + width]);
        }
        CpuBuf::F32(out)
    }

    fn concat_cols(&self, a: &CpuBuf, ca: usize, b: &CpuBuf, cb: usize) -> CpuBuf {
        let (a, b) = (a.f32(), b.f32());
        let mut out = Vec::with_capacity(a.len() + b.len());
        for (ra, rb) in a.chunks_exact(ca).zip(b.chunks_exact(cb)) {
            out.extend_from_slice(ra);
            out.extend_from_slice(rb);
        }
        CpuBuf::F32(out)
    }

    fn add_rows_scaled(
        &self,
        dst: &mut CpuBuf,
        d: usize,
        src: &CpuBuf,
        rows: &[usize],
        weights: &[f32],
    ) {
        let (dst, src) = (dst.f32_mut(), src.f32());
        for ((r, w), s) in rows.iter().zip(weights).zip(src.chunks_exact(d)) {
            for (a, b) in dst[r * d..(r + 1) * d].iter_mut().zip(s) {
                *a += w * b;
            }
        }
    }

    fn mla_expand(
        &self,
        kv: &CpuBuf,
        k_pe: &CpuBuf,
        t: usize,
        h: usize,
        nope: usize,
        dv: usize,
        rope: usize,
    ) -> (CpuBuf, CpuBuf) {
        let (kv, k_pe) = (kv.f32(), k_pe.f32());
        let mut k = Vec::with_capacity(t * h * (nope + rope));
        let mut v = Vec::with_capacity(t * h * dv);
        for i in 0..t {
            let pe = &k_pe[i * rope..(i + 1) * rope];
            for head in 0..h {
                let base = (i * h + head) * (nope + dv);
                k.extend_from_slice(&kv[base..base + nope]);
                k.extend_from_slice(pe);
                v.extend_from_slice(&kv[base + nope..base + nope + dv]);
            }
        }
        (CpuBuf::F32(k), CpuBuf::F32(v))
    }

    fn slice_rows(&self, x: &CpuBuf, cols: usize, from: usize, count: usize) -> CpuBuf {
        CpuBuf::F32(x.f32()[from * cols..(from + count) * cols].to_vec())
    }

    fn concat_rows(&self, parts: &[CpuBuf]) -> CpuBuf {
        let mut out = Vec::with_capacity(parts.iter().map(CpuBuf::len).sum());
        for p in parts {
            out.extend_from_slice(p.f32());
        }
        CpuBuf::F32(out)
    }

    fn head_linear(
        &self,
        x: &CpuBuf,
        t: usize,
        h: usize,
        w: &CpuBuf,
        rows: usize,
        cols: usize,
        transposed: bool,
    ) -> CpuBuf {
        let (x, w) = (x.f32(), w.f32());
        let (din, dout) = if transposed {
            (cols, rows)
        } else {
            (rows, cols)
        };
        assert_eq!(
            x.len(),
            t * h * din,
            "head_linear: input is not [{t}, {h}, {din}]"
        );
        assert_eq!(
            w.len(),
            h * rows * cols,
            "head_linear: weight is not [{h}, {rows}, {cols}]"
        );
        use rayon::prelude::*;
        let mut y = vec![0f32; t * h * dout];
        // Each row's head on its own: the same sums, whichever thread makes them.
        y.par_chunks_mut(dout).enumerate().for_each(|(ri, yi)| {
            let i = ri % h;
            let xi = &x[ri * din..(ri + 1) * din];
            let wi = &w[i * rows * cols..(i + 1) * rows * cols];
            if transposed {
                // y[o] = Σ_c x[c] · w[o, c]
                for (o, yo) in yi.iter_mut().enumerate() {
                    *yo = dot(&wi[o * cols..(o + 1) * cols], xi);
                }
            } else {
                // y[c] = Σ_r x[r] · w[r, c]
                for (rr, xv) in xi.iter().enumerate() {
                    for (yc, wv) in yi.iter_mut().zip(&wi[rr * cols..(rr + 1) * cols]) {
                        *yc += xv * wv;
                    }
                }
            }
        });
        CpuBuf::F32(y)
    }

    fn rope(
        &self,
        x: &mut CpuBuf,
        heads: usize,
        head_dim: usize,
        offset: usize,
        rot_dim: usize,
        positions: &[usize],
        cos: &CpuBuf,
        sin: &CpuBuf,
        layout: RopeLayout,
    ) {
        let (x, cos, sin) = (x.f32_mut(), cos.f32(), sin.f32());
        let half = rot_dim / 2;
        for (row, &pos) in x.chunks_exact_mut(heads * head_dim).zip(positions) {
            let c = &cos[pos * half..(pos + 1) * half];
            let s = &sin[pos * half..(pos + 1) * half];
            for h in 0..heads {
                let v = &mut row[h * head_dim + offset..h * head_dim + offset + rot_dim];
                for i in 0..half {
                    let (a, b) = match layout {
                        RopeLayout::Halves => (i, i + half),
                        RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                    };
                    let (x0, x1) = (v[a], v[b]);
                    v[a] = x0 * c[i] - x1 * s[i];
                    v[b] = x1 * c[i] + x0 * s[i];
                }
            }
        }
    }
}

/// Up to this many input rows (decode steps of small batches), weights are streamed once
/// with dot products ([`gemv`]) instead of going through GEMM ([`gemm_rows`]), which turns
/// them into columns first. Measured on the 1.5B shape's products
/// (`decode_product_bench`): at 6 rows streaming took 0.4–1.4× GEMM's time (the large
/// matrices near 1×), at 8 rows 1.3–1.7× but for the smallest matrix (the streamed
/// products' multiply-adds, one row at a time, outgrow the weights' reading from about 5
/// rows on; the GEMM kernel's do not). Those 6-row figures are from before 5 and 6 rows
/// became one tile each, which made them faster still.
const GEMV_MAX_ROWS: usize = 6;

/// `y[m, n] = x[m, k] · wᵀ` for `w[n, k]`: streamed for up to [`GEMV_MAX_ROWS`] rows,
/// else by GEMM on the weight's columns, at the widest SIMD level the CPU has.
fn product<E: Elem>(x: &[f32], m: usize, w: &[E], n: usize, k: usize) -> Vec<f32> {
    if m <= GEMV_MAX_ROWS {
        gemv(x, m, w, n, k, Simd::detect())
    } else {
        gemm_rows(x, m, w, n, k, Simd::detect())
    }
}

/// [`product`] of a matrix held either way.
fn matrix_product(x: &[f32], m: usize, w: &CpuBuf, n: usize, k: usize) -> Vec<f32> {
    match w {
        CpuBuf::F32(w) => product(x, m, w, n, k),
        CpuBuf::Bf16(w) => product(x, m, w, n, k),
    }
}

/// `silu(gate) · up`, value by value.
fn silu_mul(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect()
}

/// The routed experts of an MoE layer: for each `(expert, tokens, weights)` of `active`
/// (in expert order), the expert's SwiGLU MLP (`experts[e]`: gate, up, down) on its
/// tokens' rows of `x[t, hidden]`, added to those rows of the output scaled by the
/// tokens' weights, in expert order. The experts run side by side on the pool, each its
/// three products in a row: a decode step's experts take a few rows each, and products
/// that small, each spread over the threads on its own, cost more in waking and parking
/// the threads than in reading the weights.
fn moe_experts(
    x: &[f32],
    t: usize,
    active: &[(usize, &[usize], &[f32])],
    experts: &[[&CpuBuf; 3]],
    hidden: usize,
    inter: usize,
) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; t * hidden];
    // A few experts per thread at a time: the outputs held at once stay a few of them.
    let wave = 4 * rayon::current_num_threads().max(1);
    for group in active.chunks(wave) {
        let ys: Vec<Vec<f32>> = group
            .par_iter()
            .map(|&(e, toks, _)| {
                let m = toks.len();
                let mut xe = Vec::with_capacity(m * hidden);
                for &r in toks {
                    xe.extend_from_slice(&x[r * hidden..(r + 1) * hidden]);
                }
                let [gate, up, down] = experts[e];
                let h = silu_mul(
                    &matrix_product(&xe, m, gate, inter, hidden),
                    &matrix_product(&xe, m, up, inter, hidden),
                );
                matrix_product(&h, m, down, hidden, inter)
            })
            .collect();
        for (&(_, toks, ws), y) in group.iter().zip(ys) {
            for ((&r, &w), ye) in toks.iter().zip(ws).zip(y.chunks_exact(hidden)) {
                for (a, b) in out[r * hidden..(r + 1) * hidden].iter_mut().zip(ye) {
                    *a += w * b;
                }
            }
        }
    }
    out
}

/// A matrix element the products read: f32, or bf16 widened as it is read.
trait Elem: Copy + Send + Sync + ArchElem {
    fn f(self) -> f32;
}

/// What the x86 products need of an element: loads into SIMD lanes.
#[cfg(target_arch = "x86_64")]
use lanes::LoadLanes as ArchElem;
#[cfg(not(target_arch = "x86_64"))]
trait ArchElem {}
#[cfg(not(target_arch = "x86_64"))]
impl<T> ArchElem for T {}

impl Elem for f32 {
    #[inline(always)]
    fn f(self) -> f32 {
        self
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn f(self) -> f32 {
        widen(self)
    }
}

/// bf16 to f32, exactly: the bf16 bits are the f32's upper half (a shift the compiler
/// vectorises, unlike a call per value).
#[inline(always)]
fn widen(x: bf16) -> f32 {
    f32::from_bits(u32::from(x.to_bits()) << 16)
}

/// `y[m, n] = x[m, k] · wᵀ` for small `m`: each thread streams a block of weight rows,
/// each weight read (and widened) once for all `m` rows, compiled for `simd`.
fn gemv<W: Elem>(x: &[f32], m: usize, w: &[W], n: usize, k: usize, simd: Simd) -> Vec<f32> {
    use rayon::prelude::*;
    // Output transposed ([n, m]) so that each weight row writes one contiguous run.
    let mut yt = vec![0f32; n * m];
    let rows_per_task = (n / (4 * rayon::current_num_threads().max(1))).clamp(16, 1024);
    yt.par_chunks_mut(rows_per_task * m)
        .enumerate()
        .for_each(|(blk, out)| {
            let rows = &w[blk * rows_per_task * k..];
            match simd {
                Simd::Baseline => gemv_rows::<Portable, W>(x, m, rows, k, out),
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Simd::detect` chose these only where the CPU has the features.
                #[allow(unsafe_code)]
                Simd::Avx2 => unsafe { gemv_rows_avx2(x, m, rows, k, out) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                #[allow(unsafe_code)]
                Simd::Avx512 => unsafe { gemv_rows_avx512(x, m, rows, k, out) },
            }
        });
    let mut y = vec![0f32; m * n];
    for j in 0..n {
        for r in 0..m {
            y[r * n + j] = yt[j * m + r];
        }
    }
    y
}

/// The sum of `s`, read with the widest SIMD loads this CPU has, in an order of their
/// own: the read-only stream over memory the benchmark's roofline is measured with (a
/// core's share of the memory's bandwidth grows with the width of its loads).
pub fn stream_sum(s: &[f32]) -> f32 {
    match Simd::detect() {
        Simd::Baseline => s
            .chunks(DOT_LANES)
            .fold([0f32; DOT_LANES], |mut acc, c| {
                acc.iter_mut().zip(c).for_each(|(a, v)| *a += v);
                acc
            })
            .iter()
            .sum(),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Simd::detect` chose it only where the CPU has the features.
        #[allow(unsafe_code)]
        Simd::Avx2 => unsafe { stream_sum_avx2(s) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        #[allow(unsafe_code)]
        Simd::Avx512 => unsafe { stream_sum_avx512(s) },
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn stream_sum_avx2(s: &[f32]) -> f32 {
    // SAFETY: this function's features are avx2's.
    #[allow(unsafe_code)]
    unsafe {
        lanes::stream_sum::<lanes::Avx2>(s)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn stream_sum_avx512(s: &[f32]) -> f32 {
    // SAFETY: this function's features are avx512's.
    #[allow(unsafe_code)]
    unsafe {
        lanes::stream_sum::<lanes::Avx512>(s)
    }
}

/// The SIMD the decode products are compiled for, chosen at run time. Every level sums
/// in the same order ([`dot_rows`]), so all give the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Simd {
    /// What the target guarantees (SSE2 on x86-64).
    Baseline,
    /// AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512 (F, BW, VL).
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// Caps the SIMD level the CPU backend uses below what the CPU has: `baseline`, `avx2`
/// or `avx512`. For comparing the levels' speed on one machine (they give the same
/// bits) and for working around a level's fault; unset, the widest level is used.
pub const SIMD_ENV: &str = "CLOUD_CORE_CPU_SIMD";

/// An error naming [`SIMD_ENV`] where it is set to no level of this target: a command
/// checks it before it starts, where the backend itself would only log and ignore it.
pub fn check_simd_env() -> Result<(), String> {
    match std::env::var(SIMD_ENV) {
        Ok(v) if Simd::named(&v).is_none() => Err(format!(
            "{SIMD_ENV}={v:?} is not one of {}",
            Simd::ALL.map(Simd::name).join(", ")
        )),
        _ => Ok(()),
    }
}

impl Simd {
    /// Every level this target has a name for, the baseline first.
    #[cfg(target_arch = "x86_64")]
    const ALL: [Simd; 3] = [Simd::Baseline, Simd::Avx2, Simd::Avx512];
    #[cfg(not(target_arch = "x86_64"))]
    const ALL: [Simd; 1] = [Simd::Baseline];

    /// The level the products use: the widest the CPU has, capped by [`SIMD_ENV`].
    fn detect() -> Simd {
        static LEVEL: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| {
            let found = Simd::widest();
            let Ok(cap) = std::env::var(SIMD_ENV) else {
                return found;
            };
            match Simd::named(&cap) {
                Some(cap) => {
                    let level = found.min(cap);
                    tracing::info!("{SIMD_ENV}={cap:?}: the CPU backend uses {level:?} (the CPU has {found:?})");
                    level
                }
                None => {
                    tracing::warn!("{SIMD_ENV}={cap:?} names no SIMD level of this target: ignored, the CPU backend uses {found:?}");
                    found
                }
            }
        })
    }

    /// The level's name, as [`SIMD_ENV`] spells it.
    fn name(self) -> &'static str {
        match self {
            Simd::Baseline => "baseline",
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => "avx512",
        }
    }

    /// The level named (case aside), where this target has it.
    fn named(name: &str) -> Option<Simd> {
        let name = name.trim();
        Simd::ALL
            .into_iter()
            .find(|l| l.name().eq_ignore_ascii_case(name))
    }

    /// The widest level this CPU has.
    fn widest() -> Simd {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512bw") && has!("avx512vl") {
                return Simd::Avx512;
            }
            if has!("avx2") && has!("fma") {
                return Simd::Avx2;
            }
        }
        Simd::Baseline
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gemv_rows_avx2<W: Elem>(x: &[f32], m: usize, w: &[W], k: usize, out: &mut [f32]) {
    gemv_rows::<InLanes<lanes::Avx2>, W>(x, m, w, k, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn gemv_rows_avx512<W: Elem>(x: &[f32], m: usize, w: &[W], k: usize, out: &mut [f32]) {
    gemv_rows::<InLanes<lanes::Avx512>, W>(x, m, w, k, out)
}

/// What one call of the decode products' inner loop works on: activation rows `x` and
/// weight rows `w` of `k` values each, and the output `o`, whose row `j` of `m` values
/// takes the products with weight row `j`.
struct Tile<'a, W> {
    x: &'a [f32],
    k: usize,
    w: &'a [W],
    m: usize,
    o: &'a mut [f32],
}

/// The inner loop of the decode products ([`dot_rows`]'s contract), as one SIMD level
/// runs it.
#[allow(unsafe_code)]
trait Dot {
    /// # Safety
    /// The CPU has the level's features.
    unsafe fn dot<W: Elem, const R: usize, const J: usize>(t: Tile<'_, W>) -> usize;
}

/// [`dot_rows`] as written, vectorised (or not) by the compiler.
struct Portable;

impl Dot for Portable {
    #[inline(always)]
    #[allow(unsafe_code)]
    unsafe fn dot<W: Elem, const R: usize, const J: usize>(t: Tile<'_, W>) -> usize {
        dot_rows::<W, R, J>(t)
    }
}

/// [`dot_rows`] in explicit SIMD lanes `L`.
#[cfg(target_arch = "x86_64")]
struct InLanes<L>(std::marker::PhantomData<L>);

#[cfg(target_arch = "x86_64")]
impl<L: lanes::Lanes> Dot for InLanes<L> {
    #[inline(always)]
    #[allow(unsafe_code)]
    unsafe fn dot<W: Elem, const R: usize, const J: usize>(t: Tile<'_, W>) -> usize {
        // SAFETY: as the caller's.
        unsafe { lanes::dot_rows::<L, W, R, J>(t) }
    }
}

/// `out[j·m + r] = x[r]·w[j]` for the `out.len() / m` weight rows at the start of `w`:
/// four activation rows at a time, or, for one or two, several weight rows at a time,
/// so that each step has four independent sums to add into (a sum waits for the last
/// addition into it: a batch-1 step had one).
#[inline(always)]
#[allow(unsafe_code)]
fn gemv_rows<D: Dot, W: Elem>(x: &[f32], m: usize, w: &[W], k: usize, out: &mut [f32]) {
    let n = out.len() / m;
    let wide = match m {
        1 => n / 4 * 4,
        2 => n / 2 * 2,
        _ => 0,
    };
    // SAFETY (every `D::dot`): `gemv` picks `D` for a level only where the CPU has it.
    for j in (0..wide).step_by(if m == 1 { 4 } else { 2 }) {
        let (wr, o) = (&w[j * k..], &mut out[j * m..]);
        unsafe {
            match m {
                1 => D::dot::<W, 1, 4>(Tile { x, k, w: wr, m, o }),
                _ => D::dot::<W, 2, 2>(Tile { x, k, w: wr, m, o }),
            }
        };
    }
    for j in wide..n {
        let (wr, o) = (&w[j * k..], &mut out[j * m..(j + 1) * m]);
        let mut r = 0;
        while r < m {
            let t = Tile {
                x: &x[r * k..],
                k,
                w: wr,
                m,
                o: &mut o[r..],
            };
            r += unsafe {
                match m - r {
                    1 => D::dot::<W, 1, 1>(t),
                    2 => D::dot::<W, 2, 1>(t),
                    3 => D::dot::<W, 3, 1>(t),
                    4 => D::dot::<W, 4, 1>(t),
                    5 => D::dot::<W, 5, 1>(t),
                    _ => D::dot::<W, 6, 1>(t),
                }
            };
        }
    }
}

/// `o[j·m + r] = x[r]·w[j]` for the first `R` rows of `x` and the first `J` rows of `w`
/// (rows of `k` values), returning `R`: each chunk of a weight row widened once and used for every
/// activation row, in `DOT_LANES` independent sums per pair (an order that depends on
/// neither the SIMD width nor `R` and `J`).
#[inline(always)]
fn dot_rows<W: Elem, const R: usize, const J: usize>(t: Tile<'_, W>) -> usize {
    let Tile { x, k, w, m, o } = t;
    let mut acc = [[[0f32; DOT_LANES]; R]; J];
    let full = k / DOT_LANES * DOT_LANES;
    // Whole rows sliced once and chunks of a fixed size: no bounds to check per value,
    // and sums the compiler keeps in registers.
    let xs: [&[f32]; R] = std::array::from_fn(|r| &x[r * k..r * k + full]);
    let ws: [&[W]; J] = std::array::from_fn(|j| &w[j * k..j * k + full]);
    for c in (0..full / DOT_LANES).map(|c| c * DOT_LANES) {
        for (aj, wr) in acc.iter_mut().zip(&ws) {
            let wc: &[W; DOT_LANES] = wr[c..c + DOT_LANES].try_into().expect("a chunk");
            let wf: [f32; DOT_LANES] = std::array::from_fn(|i| wc[i].f());
            for (a, xr) in aj.iter_mut().zip(&xs) {
                let xc: &[f32; DOT_LANES] = xr[c..c + DOT_LANES].try_into().expect("a chunk");
                for i in 0..DOT_LANES {
                    a[i] += xc[i] * wf[i];
                }
            }
        }
    }
    for (j, aj) in acc.iter().enumerate() {
        for (r, a) in aj.iter().enumerate() {
            o[j * m + r] = lane_sum(
                a,
                &x[r * k + full..(r + 1) * k],
                &w[j * k + full..(j + 1) * k],
            );
        }
    }
    R
}

/// A dot product's end: its lanes summed in order, then the values past the last whole
/// chunk (`x`, `w`) added one by one. The order every SIMD level keeps.
#[inline(always)]
fn lane_sum<W: Elem>(lanes: &[f32; DOT_LANES], x: &[f32], w: &[W]) -> f32 {
    let mut s: f32 = lanes.iter().sum();
    for (xv, wv) in x.iter().zip(w) {
        s += xv * wv.f();
    }
    s
}

/// Independent partial sums per row of [`dot_rows`].
const DOT_LANES: usize = 16;

/// `y[m, n] (+)= x[m, k] · c` for columns `c[k, n]` (row-major: `n` values per row of
/// `k`) and rows of `x` `stride` values apart, by the `gemm` crate on one thread; `add`:
/// added to `y`, else written over it.
fn gemm_columns(y: &mut [f32], x: &[f32], stride: usize, c: &[f32], n: usize, add: bool) {
    let (m, k) = (y.len() / n.max(1), c.len() / n.max(1));
    assert!(y.len() == m * n && c.len() == n * k && k <= stride);
    assert!(m == 0 || x.len() >= (m - 1) * stride + k);
    // SAFETY: the asserts above guarantee that y is m×n, c is k×n and x holds m rows of
    // k values `stride` apart, and the strides below address exactly those layouts.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            add,
            x.as_ptr(),
            1,
            stride as isize,
            c.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Weight rows per task of [`gemm_rows`] at most: a block whose columns stay in cache
/// while its product is made, large enough that `gemm` reading `x` again per block is
/// noise. Fewer where that leaves fewer than two blocks per thread.
const GEMM_ROWS: usize = 128;

/// Values of each weight row turned into columns at a time by [`gemm_rows`]: 128 rows of
/// them are 512 KiB of f32, which stay in a core's L2 cache while `gemm` reads them.
const GEMM_VALUES: usize = 1024;

/// `y[m, n] = x[m, k] · wᵀ` for `w[n, k]` and more rows than [`gemv`] takes. Each task
/// takes a block of weight rows and, a span of their values at a time, turns it into
/// columns ([`columns`]: f32, bf16 widened) and adds its product with `x`'s span by the
/// `gemm` crate. Given the rows themselves, `gemm` gathers their values into its panels
/// one at a time, which took as long as its products at 128 activation rows; columns it
/// copies a vector at a time.
fn gemm_rows<E: Elem>(x: &[f32], m: usize, w: &[E], n: usize, k: usize, simd: Simd) -> Vec<f32> {
    use rayon::prelude::*;
    thread_local! {
        /// One span's columns, kept from one product to the next.
        static COLUMNS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let per_block = (n / (2 * rayon::current_num_threads().max(1)))
        .next_multiple_of(16)
        .clamp(16, GEMM_ROWS);
    let blocks: Vec<(usize, Vec<f32>)> = w
        .par_chunks(per_block * k)
        .enumerate()
        .map(|(b, rows)| {
            let nb = rows.len() / k;
            let mut yb = vec![0f32; m * nb];
            COLUMNS.with_borrow_mut(|c| {
                for v in (0..k).step_by(GEMM_VALUES) {
                    let kc = GEMM_VALUES.min(k - v);
                    if c.len() < nb * kc {
                        c.resize(nb * kc, 0.0);
                    }
                    let c = &mut c[..nb * kc];
                    columns(&rows[v..], nb, k, c, simd);
                    gemm_columns(&mut yb, &x[v..], k, c, nb, v > 0);
                }
            });
            (b * per_block, yb)
        })
        .collect();
    let mut y = vec![0f32; m * n];
    for (first, yb) in blocks {
        let nb = yb.len() / m;
        for (r, row) in yb.chunks_exact(nb).enumerate() {
            y[r * n + first..r * n + first + nb].copy_from_slice(row);
        }
    }
    y
}

/// `nb` weight rows `stride` values apart as columns: `c[i·nb + j] = w[j·stride + i]`
/// for the `c.len() / nb` values `i` of each, in f32 (bf16 widened, exactly), whole tiles
/// transposed in registers where the CPU has AVX-512 (16 × 16) or AVX2 (8 rows × 16).
fn columns<E: Elem>(w: &[E], nb: usize, stride: usize, c: &mut [f32], simd: Simd) {
    let k = c.len() / nb.max(1);
    assert!(c.len() == nb * k && k <= stride);
    assert!(nb == 0 || w.len() >= (nb - 1) * stride + k);
    // SAFETY: detected, each level has the features its function enables.
    #[allow(unsafe_code)]
    let (rows, cols) = match simd {
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { lanes::columns_avx512(w, nb, stride, c) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { lanes::columns_avx2(w, nb, stride, c) },
        Simd::Baseline => (0, 0),
    };
    // The rest (all of it at the baseline) in tiles that keep the rows' lines in cache:
    // the values past `cols` of the rows the tiles covered, then the rows past them.
    const TILE: usize = 16;
    let mut copy = |js: std::ops::Range<usize>, is: std::ops::Range<usize>| {
        for j0 in js.clone().step_by(TILE) {
            for i0 in is.clone().step_by(TILE) {
                for i in i0..(i0 + TILE).min(is.end) {
                    for j in j0..(j0 + TILE).min(js.end) {
                        c[i * nb + j] = w[j * stride + i].f();
                    }
                }
            }
        }
    };
    copy(0..rows, cols..k);
    copy(rows..nb, 0..k);
}

/// Dot product with independent partial sums (so the compiler vectorises it), `b`
/// widened as it is read.
#[inline(always)]
fn dot<E: Elem>(a: &[f32], b: &[E]) -> f32 {
    let mut acc = [0f32; 16];
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i].f();
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y.f();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_sum_reads_every_value() {
        // Small integers: every order of additions gives the exact sum.
        for n in [0, 1, 15, 16, 63, 64, 65, 1000, 4099] {
            let s: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
            let expect: f32 = s.iter().sum();
            assert_eq!(stream_sum(&s), expect, "{n} values");
        }
    }

    #[test]
    fn linear_matches_a_naive_product() {
        let cpu = Cpu::default();
        // Rows up to GEMV_MAX_ROWS stream the weights; more go through GEMM in blocks of
        // up to GEMM_ROWS weight rows turned into columns GEMM_VALUES values at a time
        // (here blocks that are not whole, of 16 rows, and spans that are not whole).
        let cases = [
            (3, 70, 65),
            (12, 70, 65),
            (1, 2000, 33),
            (9, 300, 40),
            (16, 130, 40),
            (17, 300, 40),
            (12, 40, 6000),
            (7, 20, 2 * GEMM_VALUES + 3),
        ];
        for (m, n, k) in cases {
            check_linear(&cpu, m, n, k);
        }
    }

    fn check_linear(cpu: &Cpu, m: usize, n: usize, k: usize) {
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let wb: Vec<bf16> = w.iter().map(|v| bf16::from_f32(*v)).collect();
        let x = CpuBuf::F32(x);
        for (w, name) in [(CpuBuf::F32(w), "f32"), (CpuBuf::Bf16(wb), "bf16")] {
            let y = cpu.linear(&x, m, &w, n, k);
            let (xs, ws, ys) = (x.f32(), w.to_f32(), y.f32());
            for r in 0..m {
                for c in 0..n {
                    let want: f32 = (0..k).map(|i| xs[r * k + i] * ws[c * k + i]).sum();
                    assert!(
                        (ys[r * n + c] - want).abs() < 1e-4,
                        "{name} {m}x{n}x{k}: {r},{c}"
                    );
                }
            }
        }
    }

    #[test]
    fn bf16_matrices_are_kept_as_asked_and_read_exactly() {
        let vals = [1.0f32, -2.5, 0.1, 3.0e-3, 65504.0, -0.0];
        let stored: Vec<bf16> = vals.iter().map(|v| bf16::from_f32(*v)).collect();
        let widened: Vec<f32> = stored.iter().map(|v| v.to_f32()).collect();
        let shape = [3, 2];
        for (weights, from_bf16, from_f32) in [
            (CpuWeights::AsStored, true, false),
            (CpuWeights::F32, false, false),
            (CpuWeights::Bf16, true, true),
        ] {
            let cpu = Cpu::with_weights(weights);
            assert_eq!(cpu.wants_bf16_weights(true), weights != CpuWeights::F32);
            assert_eq!(cpu.wants_bf16_weights(false), weights == CpuWeights::Bf16);
            let a = cpu.upload_weight(Weight::Bf16(&stored), &shape);
            assert_eq!(matches!(a, CpuBuf::Bf16(_)), from_bf16, "{weights:?}");
            assert_eq!(cpu.download(&a), widened, "{weights:?}: bf16 values change");
            let b = cpu.upload_weight(Weight::F32(&vals), &shape);
            assert_eq!(matches!(b, CpuBuf::Bf16(_)), from_f32, "{weights:?}");
            let want = if from_f32 { &widened[..] } else { &vals[..] };
            assert_eq!(cpu.download(&b), want, "{weights:?}");
            // Norms and biases stay f32 whatever the setting.
            let norm = cpu.upload_weight(Weight::Bf16(&stored), &[6]);
            assert_eq!(norm, CpuBuf::F32(widened.clone()));
            // An embedding table's rows read the same either way.
            let rows = cpu.gather_rows(&a, 2, &[2, 0]);
            assert_eq!(
                rows.f32(),
                &[widened[4], widened[5], widened[0], widened[1]]
            );
            // The two matrices are counted by the form they are held in; the norm is not.
            let held_bf16 = 6 * (from_bf16 as u64 + from_f32 as u64);
            assert_eq!(cpu.matrix_elements(), (held_bf16, 12 - held_bf16));
            let want_bytes = (2 * held_bf16 + 4 * (12 - held_bf16)) as f64 / 12.0;
            assert_eq!(cpu.matrix_element_bytes(), Some(want_bytes));
        }
        assert_eq!(Cpu::default().matrix_element_bytes(), None);
    }

    /// The routed experts on the CPU give each token the weighted sum of its experts'
    /// MLPs, as one token and one expert at a time would: for steps of few rows per expert
    /// (streamed products, each row's bits those of the row alone: equal but for the
    /// order the experts are added in) and of many (GEMM).
    #[test]
    fn routed_experts_are_each_tokens_weighted_mlps() {
        use crate::engine::config::{MoeConfig, ScoringFunc, TopkMethod};
        use crate::engine::model::route;
        let (hidden, inter, n, t) = (64, 48, 8, 40);
        let moe = MoeConfig {
            n_routed_experts: n,
            n_shared_experts: 0,
            num_experts_per_tok: 2,
            moe_intermediate_size: inter,
            first_k_dense_replace: 0,
            moe_layer_freq: 1,
            topk_method: TopkMethod::Greedy,
            scoring_func: ScoringFunc::Softmax,
            n_group: 1,
            topk_group: 1,
            norm_topk_prob: false,
            routed_scaling_factor: 1.0,
        };
        let vals = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| (((i * 37 + seed * 101) % 97) as f32 - 48.0) / 64.0)
                .collect()
        };
        let cpu = Cpu::default();
        let mats: Vec<[CpuBuf; 3]> = (0..n)
            .map(|e| {
                let w = |len, seed, shape: &[usize]| {
                    cpu.upload_weight(Weight::F32(&vals(len, seed)), shape)
                };
                [
                    w(inter * hidden, 3 * e + 1, &[inter, hidden]),
                    w(inter * hidden, 3 * e + 2, &[inter, hidden]),
                    w(hidden * inter, 3 * e + 3, &[hidden, inter]),
                ]
            })
            .collect();
        let experts: Vec<[&CpuBuf; 3]> = mats.iter().map(|m| [&m[0], &m[1], &m[2]]).collect();
        let x = vals(t * hidden, 50);
        let logits = vals(t * n, 51);
        let mut want = vec![0f32; t * hidden];
        let mut tokens = vec![0; n];
        for tok in 0..t {
            let xt = CpuBuf::F32(x[tok * hidden..(tok + 1) * hidden].to_vec());
            for (e, w) in route(&logits[tok * n..(tok + 1) * n], None, &moe) {
                tokens[e] += 1;
                let [gate, up, down] = experts[e];
                let g = cpu.linear(&xt, 1, gate, inter, hidden);
                let u = cpu.linear(&xt, 1, up, inter, hidden);
                let y = cpu.linear(&cpu.silu_mul(&g, &u), 1, down, hidden, inter);
                for (o, v) in want[tok * hidden..(tok + 1) * hidden]
                    .iter_mut()
                    .zip(y.f32())
                {
                    *o += w * v;
                }
            }
        }
        assert!(
            tokens.iter().any(|&c| c > GEMV_MAX_ROWS),
            "no expert takes the GEMM path: {tokens:?}"
        );
        for rows in [1, 5, t] {
            let got = cpu
                .moe_routed(
                    &CpuBuf::F32(x[..rows * hidden].to_vec()),
                    rows,
                    &CpuBuf::F32(logits[..rows * n].to_vec()),
                    None,
                    &experts,
                    hidden,
                    inter,
                    &moe,
                )
                .expect("the CPU routes its experts");
            let want = &want[..rows * hidden];
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = got
                .f32()
                .iter()
                .zip(want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                scale > 0.0 && diff <= 1e-5 * scale,
                "{rows} rows: {diff} of {scale}"
            );
        }
    }

    /// Each level is named as the cap spells it; other names are none.
    #[test]
    fn simd_levels_are_named() {
        for level in Simd::ALL {
            assert_eq!(Simd::named(level.name()), Some(level));
            assert_eq!(Simd::named(&level.name().to_uppercase()), Some(level));
        }
        for name in ["", "sse9", "avx", "neon2"] {
            assert_eq!(Simd::named(name), None, "{name:?}");
        }
    }

    /// The SIMD levels this CPU has, the baseline first.
    fn levels() -> Vec<Simd> {
        let widest = Simd::widest();
        Simd::ALL.into_iter().filter(|l| *l <= widest).collect()
    }

    /// A block of weight rows turned into columns holds every value where the products
    /// read it, exactly (bf16 widened), at every SIMD level: whole tiles, remainders of
    /// rows and of columns, blocks smaller than a tile, and spans of the rows' values
    /// (from `first`, `span` of the `k`).
    #[test]
    fn columns_are_the_rows_transposed() {
        let cases = [
            (16, 16, 0, 16),
            (128, 48, 0, 48),
            (37, 50, 0, 50),
            (5, 3, 0, 3),
            (16, 70, 0, 70),
            (40, 16, 0, 16),
            (37, 70, 3, 33),
            (32, 100, 48, 52),
        ];
        for (nb, k, first, span) in cases {
            let w: Vec<f32> = (0..nb * k).map(|i| i as f32 * 0.75 - 900.0).collect();
            let wb: Vec<bf16> = w.iter().map(|v| bf16::from_f32(*v)).collect();
            for level in levels() {
                let mut c = vec![f32::NAN; nb * span];
                columns(&w[first..], nb, k, &mut c, level);
                let mut cb = vec![f32::NAN; nb * span];
                columns(&wb[first..], nb, k, &mut cb, level);
                for j in 0..nb {
                    for i in 0..span {
                        let at = format!("{level:?}, {nb} × {k} from {first}, row {j}, value {i}");
                        let v = j * k + first + i;
                        assert_eq!(c[i * nb + j].to_bits(), w[v].to_bits(), "{at}");
                        assert_eq!(cb[i * nb + j], wb[v].to_f32(), "{at}, bf16");
                    }
                }
            }
        }
    }

    /// Every SIMD level this CPU has sums in the same order: the same bits, for f32 and
    /// bf16 weights, every row count a decode product takes and a length that leaves a
    /// remainder after the lanes; and each row's as if it were alone.
    #[test]
    fn every_simd_level_gives_the_same_bits() {
        let levels = levels();
        println!("SIMD levels compared: {levels:?}");
        let (n, k) = (37, 300);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
            .collect();
        let wb: Vec<bf16> = w.iter().map(|v| bf16::from_f32(*v)).collect();
        for m in 1..=GEMV_MAX_ROWS {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 13 % 29) as f32 - 14.0) / 8.0)
                .collect();
            let want = gemv(&x, m, &w, n, k, Simd::Baseline);
            let want_b = gemv(&x, m, &wb, n, k, Simd::Baseline);
            let bits = |v: Vec<f32>| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            // Each row's sums are those of the row alone: the same bits whatever the batch.
            for r in 0..m {
                let row = &x[r * k..(r + 1) * k];
                let alone = bits(gemv(row, 1, &w, n, k, Simd::Baseline));
                assert_eq!(
                    bits(want[r * n..(r + 1) * n].to_vec()),
                    alone,
                    "m {m}, row {r}"
                );
            }
            for &level in &levels[1..] {
                assert_eq!(
                    bits(gemv(&x, m, &w, n, k, level)),
                    bits(want.clone()),
                    "{level:?}, m {m}"
                );
                assert_eq!(
                    bits(gemv(&x, m, &wb, n, k, level)),
                    bits(want_b.clone()),
                    "{level:?}, m {m}, bf16"
                );
            }
        }
    }

    /// Attention compiled for every SIMD level this CPU has gives the same bits, however
    /// a query's heads are split into tasks: keys and values in f32 and bf16, grouped
    /// heads (several key heads in a row, or one), values in the keys' columns (MLA), and
    /// head sizes that leave a remainder after the lanes.
    #[test]
    fn attention_at_every_simd_level_gives_the_same_bits() {
        fn each_level<R: kv::KvRows>(job: &Attend<'_, R>) -> Vec<Vec<u32>> {
            let (h, hk, dv) = (job.s.h, job.s.hk, job.s.dv);
            let group = h / hk;
            let splits: Vec<usize> = (1..=group.min(ATTENTION_HEADS))
                .filter(|p| group.is_multiple_of(*p))
                .collect();
            assert!(splits.len() > 1, "the heads split more than one way");
            let mut runs = Vec::new();
            for level in levels() {
                for &per in &splits {
                    let mut out = vec![0f32; job.t * h * dv];
                    let mut scores = Vec::new();
                    for (task, o) in out.chunks_mut(per * dv).enumerate() {
                        job.heads_at(level, task * per, o, &mut scores);
                    }
                    runs.push(out.iter().map(|v| v.to_bits()).collect());
                }
            }
            runs
        }
        let (t, dk, dv, total) = (3, 72, 40, 50);
        let val = |i: usize, m: usize| ((i * m % 97) as f32 - 48.0) / 61.0;
        for (h, hk) in [(4, 2), (12, 2), (6, 1)] {
            let q: Vec<f32> = (0..t * h * dk).map(|i| val(i, 31)).collect();
            let k: Vec<f32> = (0..total * hk * dk).map(|i| val(i, 17)).collect();
            let v: Vec<f32> = (0..total * hk * dv).map(|i| val(i, 13)).collect();
            let (ks, vs) = (hk * dk, hk * dv);
            for values_in_keys in [false, true] {
                let s = AttnShape {
                    h,
                    hk,
                    dk,
                    dv,
                    scale: 0.2,
                    values_in_keys,
                };
                let (v, vs) = if values_in_keys { (&k, ks) } else { (&v, vs) };
                let (kb, vb): (Vec<bf16>, Vec<bf16>) = (
                    k.iter().map(|x| bf16::from_f32(*x)).collect(),
                    v.iter().map(|x| bf16::from_f32(*x)).collect(),
                );
                let (wide, narrow) = (
                    kv::Contiguous {
                        k: &k[..],
                        v: &v[..],
                        key_stride: ks,
                        value_stride: vs,
                    },
                    kv::Contiguous {
                        k: &kb[..],
                        v: &vb[..],
                        key_stride: ks,
                        value_stride: vs,
                    },
                );
                let f = each_level(&Attend {
                    q: &q,
                    rows: &wide,
                    t,
                    s,
                });
                let b = each_level(&Attend {
                    q: &q,
                    rows: &narrow,
                    t,
                    s,
                });
                let what = format!("{h} heads, {hk} key heads, values in keys {values_in_keys}");
                println!("{what}: {} levels and splits compared", f.len());
                assert!(f.iter().all(|o| *o == f[0]), "f32, {what}");
                assert!(b.iter().all(|o| *o == b[0]), "bf16, {what}");
                assert_ne!(f[0], b[0], "the bf16 rows are rounded");
            }
        }
    }

    /// A query's heads per attention task: as many as share a key head, divide them
    /// and fit a tile, fewer where the tasks would be too few for the threads.
    #[test]
    fn attention_tasks_take_heads_of_one_key_head() {
        // (queries, heads, key heads, threads) → heads per task
        let cases = [
            ((512, 16, 1, 2), 4), // MLA prefill: 16 share the latent; 4 divides them
            ((512, 12, 2, 2), 6), // GQA prefill: 6 share each key head
            ((1, 12, 2, 2), 1),   // one decode query: the heads spread over the threads
            ((1, 16, 1, 2), 2),
            ((4, 12, 2, 2), 6),
            ((4, 12, 2, 16), 1),
            ((64, 7, 7, 2), 1), // no sharing
            ((0, 8, 1, 2), 1),
        ];
        for ((t, h, hk, threads), want) in cases {
            assert_eq!(
                attention_heads(t, h, hk, threads),
                want,
                "{t} × {h} / {hk}, {threads}"
            );
        }
    }

    #[test]
    #[should_panic(expected = "a bf16 matrix where f32 values are expected")]
    fn a_bf16_matrix_given_as_activations_is_named() {
        let cpu = Cpu::default();
        let w = CpuBuf::Bf16(vec![bf16::ONE; 4]);
        cpu.rms_norm(&w, &CpuBuf::F32(vec![1.0; 2]), 1e-6);
    }

    #[test]
    fn attention_of_one_position_is_its_value_and_is_causal() {
        let cpu = Cpu::default();
        // Two positions, one head, dk = dv = 2.
        let q = vec![1.0, 0.0, 0.0, 1.0];
        let k = vec![1.0, 0.0, 0.0, 1.0];
        let v = vec![5.0, 6.0, 7.0, 8.0];
        let o = cpu.attention(&q, &k, &v, 2, 1, 1, 2, 2, 1.0);
        assert_eq!(&o[..2], &[5.0, 6.0]); // the first query sees only itself
        assert!(o[2] > 6.0 && o[2] < 7.0);
    }

    /// Long enough that no tasks are merged for want of work (each task a query's heads of
    /// one key head): grouped heads read their own key head, each query the positions up
    /// to its own, as a plain softmax of the scaled scores says.
    #[test]
    fn attention_split_into_tasks_matches_a_plain_softmax() {
        let (t, h, hk, dk, dv, total) = (3, 4, 2, 128, 96, 300);
        assert!(total * (dk + dv) >= ATTENTION_TASK_WORK, "no tasks merged");
        let val = |i: usize, m: usize| ((i * m % 97) as f32 - 48.0) / 97.0;
        let q: Vec<f32> = (0..t * h * dk).map(|i| val(i, 31)).collect();
        let k: Vec<f32> = (0..total * hk * dk).map(|i| val(i, 17)).collect();
        let v: Vec<f32> = (0..total * hk * dv).map(|i| val(i, 13)).collect();
        let scale = 0.125;
        let got = Cpu::default().attention(&q, &k, &v, t, h, hk, dk, dv, scale);
        for qi in 0..t {
            for head in 0..h {
                let kh = head / (h / hk);
                let visible = total - t + qi + 1;
                let scores: Vec<f64> = (0..visible)
                    .map(|j| {
                        (0..dk)
                            .map(|d| {
                                q[(qi * h + head) * dk + d] as f64
                                    * k[(j * hk + kh) * dk + d] as f64
                            })
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..dv {
                    let want: f64 = (0..visible)
                        .map(|j| e[j] / sum * v[(j * hk + kh) * dv + d] as f64)
                        .sum();
                    let g = got[(qi * h + head) * dv + d] as f64;
                    assert!(
                        (g - want).abs() < 1e-5,
                        "query {qi}, head {head}, {d}: {g} vs {want}"
                    );
                }
            }
        }
    }
}
