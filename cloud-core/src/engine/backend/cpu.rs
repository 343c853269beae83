//! The CPU backend: the reference implementation, multi-threaded GEMM from the `gemm`
//! crate, straightforward loops for everything else.

use super::{AttnShape, Backend, KvShape, RopeLayout};

/// The CPU backend.
#[derive(Clone, Debug, Default)]
pub struct Cpu {
    /// Threads for GEMM (0: all cores).
    pub threads: usize,
}

/// One sequence's cache on the host: each layer's key rows and value rows.
#[derive(Clone, Debug)]
pub struct CpuKv {
    shape: KvShape,
    layers: Vec<(Vec<f32>, Vec<f32>)>,
}

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
        let total = k.len() / (hk * dk);
        let group = h / hk;
        let mut out = vec![0f32; t * h * dv];
        let mut scores = vec![0f32; total];
        for qi in 0..t {
            let visible = total - t + qi + 1; // causal: positions 0..=this one
            for head in 0..h {
                let kh = head / group;
                let qv = &q[(qi * h + head) * dk..(qi * h + head + 1) * dk];
                let mut max = f32::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate().take(visible) {
                    let kv = &k[(j * hk + kh) * dk..(j * hk + kh + 1) * dk];
                    *s = dot(qv, kv) * scale;
                    max = max.max(*s);
                }
                let mut sum = 0f32;
                for s in scores.iter_mut().take(visible) {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let o = &mut out[(qi * h + head) * dv..(qi * h + head + 1) * dv];
                for (j, s) in scores.iter().enumerate().take(visible) {
                    let w = s / sum;
                    let vv = &v[(j * hk + kh) * dv..(j * hk + kh + 1) * dv];
                    for (a, b) in o.iter_mut().zip(vv) {
                        *a += w * b;
                    }
                }
            }
        }
        out
    }
}

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type Kv = CpuKv;

    fn new_kv(&self, shape: KvShape) -> CpuKv {
        CpuKv {
            shape,
            layers: vec![(Vec::new(), Vec::new()); shape.layers],
        }
    }

    fn kv_prefix(&self, kv: &CpuKv, keep: usize) -> CpuKv {
        let (kc, vc) = (kv.shape.kcols, kv.shape.vcols);
        CpuKv {
            shape: kv.shape,
            layers: kv
                .layers
                .iter()
                .map(|(k, v)| {
                    (
                        k[..(keep * kc).min(k.len())].to_vec(),
                        v[..(keep * vc).min(v.len())].to_vec(),
                    )
                })
                .collect(),
        }
    }

    // Each layer's rows grow as its attention appends them.
    fn kv_grow(&self, _caches: &mut [&mut CpuKv], _lens: &[usize]) {}

    fn attend(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        lens: &[usize],
        layer: usize,
        caches: &mut [&mut CpuKv],
        s: AttnShape,
    ) -> Vec<f32> {
        let (qc, kc, vc) = (s.h * s.dk, s.hk * s.dk, s.hk * s.dv);
        let mut out = Vec::with_capacity(q.len() / s.dk.max(1) * s.dv);
        let mut at = 0;
        for (&len, kv) in lens.iter().zip(caches.iter_mut()) {
            assert_eq!(
                (kv.shape.kcols, kv.shape.vcols),
                (kc, vc),
                "attend: the cache's rows are not this layer's keys and values"
            );
            let (kcache, vcache) = &mut kv.layers[layer];
            kcache.extend_from_slice(&k[at * kc..(at + len) * kc]);
            vcache.extend_from_slice(&v[at * vc..(at + len) * vc]);
            let qs = &q[at * qc..(at + len) * qc];
            out.extend(self.attention(qs, kcache, vcache, len, s.h, s.hk, s.dk, s.dv, s.scale));
            at += len;
        }
        out
    }

    fn upload(&self, data: &[f32]) -> Vec<f32> {
        data.to_vec()
    }

    fn download(&self, b: &Vec<f32>) -> Vec<f32> {
        b.clone()
    }

    fn len(&self, b: &Vec<f32>) -> usize {
        b.len()
    }

    fn describe(&self) -> String {
        let threads = match self.threads {
            0 => rayon_threads(),
            n => n,
        };
        format!("cpu ({threads} threads)")
    }

    fn linear(&self, x: &Vec<f32>, m: usize, w: &Vec<f32>, n: usize, k: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * k, "linear: input is not [{m}, {k}]");
        assert_eq!(w.len(), n * k, "linear: weight is not [{n}, {k}]");
        let mut y = vec![0f32; m * n];
        if m == 0 || n == 0 {
            return y;
        }
        if k == 0 {
            return y;
        }
        if m <= GEMV_MAX_ROWS {
            return gemv(x, m, w, n, k);
        }
        let threads = if self.threads == 0 {
            rayon_threads()
        } else {
            self.threads
        };
        let par = if m * n * k < 64 * 64 * 64 || threads <= 1 {
            gemm::Parallelism::None
        } else {
            gemm::Parallelism::Rayon(threads)
        };
        // SAFETY: the asserts above guarantee x is m×k, w is n×k and y is m×n, and the
        // strides below address exactly those row-major layouts (wᵀ read column-wise).
        #[allow(unsafe_code)]
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                y.as_mut_ptr(),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
        y
    }

    fn add_bias(&self, x: &mut Vec<f32>, bias: &Vec<f32>) {
        let n = bias.len();
        for row in x.chunks_exact_mut(n) {
            for (a, b) in row.iter_mut().zip(bias) {
                *a += b;
            }
        }
    }

    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>) {
        for (a, b) in x.iter_mut().zip(y) {
            *a += b;
        }
    }

    fn add_scaled(&self, x: &mut Vec<f32>, y: &Vec<f32>, s: f32) {
        for (a, b) in x.iter_mut().zip(y) {
            *a += s * b;
        }
    }

    fn rms_norm(&self, x: &Vec<f32>, w: &Vec<f32>, eps: f32) -> Vec<f32> {
        let d = w.len();
        let mut out = vec![0f32; x.len()];
        for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (ms + eps).sqrt();
            for ((o, v), g) in o.iter_mut().zip(row).zip(w) {
                *o = v * r * g;
            }
        }
        out
    }

    fn silu_mul(&self, gate: &Vec<f32>, up: &Vec<f32>) -> Vec<f32> {
        gate.iter()
            .zip(up)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect()
    }

    fn gather_rows(&self, table: &Vec<f32>, d: usize, ids: &[u32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(ids.len() * d);
        for &i in ids {
            let start = i as usize * d;
            out.extend_from_slice(&table[start..start + d]);
        }
        out
    }

    fn slice_cols(&self, x: &Vec<f32>, cols: usize, from: usize, width: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(x.len() / cols.max(1) * width);
        for row in x.chunks_exact(cols) {
            out.extend_from_slice(&row[from..from + width]);
        }
        out
    }

    fn concat_cols(&self, a: &Vec<f32>, ca: usize, b: &Vec<f32>, cb: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(a.len() + b.len());
        for (ra, rb) in a.chunks_exact(ca).zip(b.chunks_exact(cb)) {
            out.extend_from_slice(ra);
            out.extend_from_slice(rb);
        }
        out
    }

    fn add_rows_scaled(
        &self,
        dst: &mut Vec<f32>,
        d: usize,
        src: &Vec<f32>,
        rows: &[usize],
        weights: &[f32],
    ) {
        for ((r, w), s) in rows.iter().zip(weights).zip(src.chunks_exact(d)) {
            for (a, b) in dst[r * d..(r + 1) * d].iter_mut().zip(s) {
                *a += w * b;
            }
        }
    }

    fn mla_expand(
        &self,
        kv: &Vec<f32>,
        k_pe: &Vec<f32>,
        t: usize,
        h: usize,
        nope: usize,
        dv: usize,
        rope: usize,
    ) -> (Vec<f32>, Vec<f32>) {
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
        (k, v)
    }

    fn slice_rows(&self, x: &Vec<f32>, cols: usize, from: usize, count: usize) -> Vec<f32> {
        x[from * cols..(from + count) * cols].to_vec()
    }

    fn concat_rows(&self, parts: &[Vec<f32>]) -> Vec<f32> {
        parts.concat()
    }

    fn head_linear(
        &self,
        x: &Vec<f32>,
        t: usize,
        h: usize,
        w: &Vec<f32>,
        rows: usize,
        cols: usize,
        transposed: bool,
    ) -> Vec<f32> {
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
        let mut y = vec![0f32; t * h * dout];
        for r in 0..t {
            for i in 0..h {
                let xi = &x[(r * h + i) * din..(r * h + i + 1) * din];
                let wi = &w[i * rows * cols..(i + 1) * rows * cols];
                let yi = &mut y[(r * h + i) * dout..(r * h + i + 1) * dout];
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
            }
        }
        y
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        heads: usize,
        head_dim: usize,
        offset: usize,
        rot_dim: usize,
        positions: &[usize],
        cos: &Vec<f32>,
        sin: &Vec<f32>,
        layout: RopeLayout,
    ) {
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
/// with dot products instead of going through GEMM, which packs the whole weight matrix
/// on every call and so reads it twice.
const GEMV_MAX_ROWS: usize = 8;

/// `y[m, n] = x[m, k] · wᵀ` for small `m`: each thread streams a block of weight rows.
fn gemv(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    use rayon::prelude::*;
    // Output transposed ([n, m]) so that each weight row writes one contiguous run.
    let mut yt = vec![0f32; n * m];
    let rows_per_task = (n / (4 * rayon::current_num_threads().max(1))).clamp(16, 1024);
    yt.par_chunks_mut(rows_per_task * m)
        .enumerate()
        .for_each(|(blk, out)| {
            let first = blk * rows_per_task;
            for (jj, o) in out.chunks_exact_mut(m).enumerate() {
                let wr = &w[(first + jj) * k..(first + jj + 1) * k];
                for (r, v) in o.iter_mut().enumerate() {
                    *v = dot(&x[r * k..(r + 1) * k], wr);
                }
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

/// Dot product with independent partial sums (so the compiler vectorises it).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_matches_a_naive_product() {
        let cpu = Cpu::default();
        for (m, n, k) in [(3, 70, 65), (12, 70, 65), (1, 2000, 33)] {
            check_linear(&cpu, m, n, k);
        }
    }

    fn check_linear(cpu: &Cpu, m: usize, n: usize, k: usize) {
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let y = cpu.linear(&x, m, &w, n, k);
        for r in 0..m {
            for c in 0..n {
                let want: f32 = (0..k).map(|i| x[r * k + i] * w[c * k + i]).sum();
                assert!((y[r * n + c] - want).abs() < 1e-4, "{r},{c}");
            }
        }
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
}
