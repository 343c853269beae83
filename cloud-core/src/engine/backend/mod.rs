//! The operations the model code is written against, once, for every backend.
//!
//! A backend owns its buffers (host memory for the CPU backend, device memory for CUDA)
//! and implements a small set of row-wise operations over them. Activations are f32
//! matrices stored row-major as `[rows, cols]`; weights are stored as Hugging Face does,
//! `[out_features, in_features]`. The CPU backend is the reference: the CUDA backend
//! must agree with it (and both with the committed fixtures).

pub mod cpu;

/// How RoPE pairs the dimensions it rotates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// `(x[i], x[i + d/2])` — Llama, Qwen2 (`rotate_half`).
    Halves,
    /// `(x[2i], x[2i + 1])` — DeepSeek's MLA rope part.
    Interleaved,
}

/// Backend operations.
pub trait Backend {
    /// An f32 buffer on the backend.
    type Buf: Clone;

    /// Uploads host data.
    fn upload(&self, data: &[f32]) -> Self::Buf;
    /// Downloads to the host.
    fn download(&self, b: &Self::Buf) -> Vec<f32>;
    /// Number of elements.
    fn len(&self, b: &Self::Buf) -> usize;

    /// `y[m, n] = x[m, k] · wᵀ` for a weight `w[n, k]`.
    fn linear(&self, x: &Self::Buf, m: usize, w: &Self::Buf, n: usize, k: usize) -> Self::Buf;
    /// Adds `bias[n]` to every row of `x[m, n]`.
    fn add_bias(&self, x: &mut Self::Buf, bias: &Self::Buf);
    /// `x += y`.
    fn add(&self, x: &mut Self::Buf, y: &Self::Buf);
    /// `x += s · y`.
    fn add_scaled(&self, x: &mut Self::Buf, y: &Self::Buf, s: f32);
    /// RMSNorm of every row of `x[·, d]` with weight `w[d]`.
    fn rms_norm(&self, x: &Self::Buf, w: &Self::Buf, eps: f32) -> Self::Buf;
    /// `silu(gate) · up`, elementwise.
    fn silu_mul(&self, gate: &Self::Buf, up: &Self::Buf) -> Self::Buf;
    /// Rows `ids` of `table[·, d]`.
    fn gather_rows(&self, table: &Self::Buf, d: usize, ids: &[u32]) -> Self::Buf;
    /// Columns `[from, from + width)` of every row of `x[·, cols]`.
    fn slice_cols(&self, x: &Self::Buf, cols: usize, from: usize, width: usize) -> Self::Buf;
    /// Rows side by side: `[a | b]` for `a[m, ca]`, `b[m, cb]`.
    fn concat_cols(&self, a: &Self::Buf, ca: usize, b: &Self::Buf, cb: usize) -> Self::Buf;
    /// `dst[rows[i]] += weights[i] · src[i]` for rows of width `d` (MoE: scatter expert
    /// outputs back to their tokens).
    fn add_rows_scaled(
        &self,
        dst: &mut Self::Buf,
        d: usize,
        src: &Self::Buf,
        rows: &[usize],
        weights: &[f32],
    );
    /// MLA: from `kv[t, h, nope + dv]` and the shared rope key `k_pe[t, rope]`, the keys
    /// `[t, h, nope + rope]` (each head's no-rope part, then the shared rope part) and the
    /// values `[t, h, dv]`.
    #[allow(clippy::too_many_arguments)]
    fn mla_expand(
        &self,
        kv: &Self::Buf,
        k_pe: &Self::Buf,
        t: usize,
        h: usize,
        nope: usize,
        dv: usize,
        rope: usize,
    ) -> (Self::Buf, Self::Buf);
    /// Rows `[from, from + count)` of `x[·, cols]`.
    fn slice_rows(&self, x: &Self::Buf, cols: usize, from: usize, count: usize) -> Self::Buf;
    /// Row blocks one after another.
    fn concat_rows(&self, parts: &[Self::Buf]) -> Self::Buf;
    /// Per-head products: for `x[t, h, ·]` and per-head blocks `w[h, rows, cols]`, row
    /// `x[r, i]` times `w[i]` (`rows` in, `cols` out) or, `transposed`, times `w[i]ᵀ`
    /// (`cols` in, `rows` out). MLA's absorbed path uses it to move queries into the
    /// latent space and attention outputs back out of it.
    #[allow(clippy::too_many_arguments)]
    fn head_linear(
        &self,
        x: &Self::Buf,
        t: usize,
        h: usize,
        w: &Self::Buf,
        rows: usize,
        cols: usize,
        transposed: bool,
    ) -> Self::Buf;
    /// Appends rows (a KV cache growing by the new positions).
    fn append_rows(&self, cache: &mut Self::Buf, rows: &Self::Buf);
    /// Rotates, in every row of `x[m, heads · head_dim]`, the `rot_dim` dimensions starting
    /// at `offset` within each head, row `r` at position `positions[r]`, with the tables
    /// `cos`/`sin` of `[max_pos, rot_dim / 2]`.
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &mut Self::Buf,
        heads: usize,
        head_dim: usize,
        offset: usize,
        rot_dim: usize,
        positions: &[usize],
        cos: &Self::Buf,
        sin: &Self::Buf,
        layout: RopeLayout,
    );
    /// Causal attention for one sequence: `q[t, h, dk]` against `k[T, hk, dk]`,
    /// `v[T, hk, dv]` (grouped: query head `i` reads key head `i / (h / hk)`), where the
    /// `t` queries are the last `t` of `T` positions. Returns `[t, h, dv]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        t: usize,
        h: usize,
        hk: usize,
        dk: usize,
        dv: usize,
        scale: f32,
    ) -> Self::Buf;
}
