//! The [`Backend`] trait's operations on the device: each checks its buffers, then
//! launches kernels ([`super::kernels`]), cuBLAS GEMMs or the GEMV kernels
//! ([`super::project`]), or hands over to the module that owns the operation (MoE,
//! attention, graphed steps).

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use half::bf16;

use super::kv::SeqKv;
use super::step::Dev;
use super::{failed, grid, lock, per_row, Cuda, CudaBuf};
use crate::engine::backend::{
    AttnShape, Backend, DeviceError, KvShape, Projection, RopeLayout, RopeOf, Rotated, Weight,
};
use crate::engine::config::MoeConfig;
use crate::engine::sampler::{Pick, Sampled};

impl Backend for Cuda {
    type Buf = CudaBuf;
    type Kv = SeqKv;

    fn describe(&self) -> String {
        let on = |b: bool| if b { "on" } else { "off" };
        let group = self.opts.mma_decode_group;
        let decode = if self.tensor_cores && group != crate::engine::backend::MMA_DECODE_GROUP {
            format!(" (decode attention on them at {group} or more query heads per key head)")
        } else {
            String::new()
        };
        format!(
            "cuda: {} (device {}, tensor-core kernels {}{decode}, graphs {}, programmatic launch {})",
            self.name,
            self.opts.device,
            on(self.tensor_cores),
            on(self.opts.graphs),
            on(self.programmatic_launch())
        )
    }

    fn kv_cache(&self) -> Option<crate::engine::backend::KvCacheUsage> {
        self.kv_cache_usage()
    }

    fn graph_stats(&self) -> Option<crate::engine::backend::GraphStats> {
        Some(Cuda::graph_stats(self))
    }

    fn device_memory(&self) -> Option<crate::engine::backend::DeviceMemory> {
        let (free_bytes, total_bytes) = self.memory().ok()?;
        Some(crate::engine::backend::DeviceMemory {
            free_bytes,
            total_bytes,
        })
    }

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
        }
    }

    fn wants_bf16_weights(&self, _stored_bf16: bool) -> bool {
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
        moe: &MoeConfig,
    ) -> Option<CudaBuf> {
        self.moe_on_device(x, t, logits, bias, experts, hidden, inter, moe)
    }

    fn take_error(&self) -> Option<DeviceError> {
        self.flush();
        lock(&self.error).take()
    }

    fn begin_step(&self, lens: &[usize], out: u8, graphs: bool) {
        self.start_step(lens, out, graphs);
    }

    fn end_step(&self) -> bool {
        self.finish_step()
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

    fn new_kv(&self, shape: KvShape) -> SeqKv {
        SeqKv::new(shape)
    }

    fn kv_prefix(&self, kv: &SeqKv, keep: usize) -> SeqKv {
        kv.prefix(keep)
    }

    fn kv_grow(&self, caches: &mut [&mut SeqKv], lens: &[usize]) {
        self.kv_grow_step(caches, lens);
    }

    fn attend(
        &self,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        lens: &[usize],
        layer: usize,
        caches: &mut [&mut SeqKv],
        s: AttnShape,
    ) -> CudaBuf {
        self.attend_paged(q, k, v, lens, layer, caches, s)
    }
}
