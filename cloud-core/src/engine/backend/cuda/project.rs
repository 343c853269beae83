//! Projections: rows of a decode step (up to [`GEMV_ROWS`]) read each bf16 weight once
//! in the GEMV kernels, with the input's RMSNorm, the bias, the residual, RoPE or SwiGLU
//! folded in where the layout allows; more rows are cuBLAS bf16 GEMMs with f32
//! accumulation. Also the `rope` kernel for what is not folded.

use std::sync::Arc;

use cudarc::cublas;
use cudarc::driver::LaunchConfig;
use half::bf16;

use super::kernels::GEMV_ROWS;
use super::step::{Dev, KArg};
use super::{failed, grid, per_row, Cuda, CudaBuf};
use crate::engine::backend::{rope_parts, Backend, Projection, RopeLayout, RopeOf, Rotated};

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

/// Whether rows `x[m, k]` go through the GEMV kernels: at most [`GEMV_ROWS`] of them, `k`
/// a multiple of 8 and `x` 16-byte aligned (their 16-byte loads).
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
    /// `y[m, n] = x[m, k] · wᵀ (+ y)` with `w` bf16 `[n, k]` on cuBLAS: `x` is rounded
    /// to bf16, the product accumulates in f32 and is written (`beta` 0) or added (`beta`
    /// 1) as f32 to `y`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm_bf16(
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
    pub(super) fn to_bf16(&self, x: &Dev<f32>) -> Option<Dev<bf16>> {
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
        self.weight_bytes(n * k * 2);
        Some(())
    }

    /// `rope` of one tensor, or of two of the same rows in one launch.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rope_of(
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
    pub(super) fn project_parts(
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
    pub(super) fn gate_up_of(
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
        self.weight_bytes(2 * n * k * 2);
        CudaBuf::F32(Arc::new(y))
    }

    /// `x[m, k] · wᵀ` for a weight `w[n, k]`, plus `bias[n]` if given: into a new buffer,
    /// or added to `acc[m, n]`. A few rows (decode) with a bf16 weight go through
    /// `gemv_bf16` (the weight read once, bias or residual added in the same pass); more
    /// rows through cuBLAS.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn project(
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
        self.weight_bytes((n0 + n1 + n2) * k * 2);
    }

    /// Adds `bias[n]` to every row of `x[·, n]`.
    fn bias_rows(&self, x: &mut Dev<f32>, bias: &Dev<f32>) {
        let (len, total, n) = (x.len(), x.len() as i64, bias.len() as i32);
        launch!(self, "add_bias", grid(len), &mut *x, bias, &total, &n);
    }

    /// f32 GEMM, strided over `batch` (per-head products), in cuBLAS's column-major terms:
    /// `c = a·b` (`beta` 0) or `c += a·b` (`beta` 1).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn sgemm_batched(
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
}
