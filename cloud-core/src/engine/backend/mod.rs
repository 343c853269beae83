//! The operations the model code is written against, once, for every backend.
//!
//! A backend owns its buffers (host memory for the CPU backend, device memory for CUDA)
//! and implements a small set of row-wise operations over them. Activations are f32
//! matrices stored row-major as `[rows, cols]`; weights are stored as Hugging Face does,
//! `[out_features, in_features]`. The CPU backend is the reference: the CUDA backend
//! must agree with it (and both with the committed fixtures).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

/// A failure of the device a backend runs on, typed so that callers can tell a request
/// that does not fit (refuse it, keep serving) from a broken device.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The KV cache's budget is spent: the step's sequences do not all fit.
    #[error(transparent)]
    CacheFull(#[from] super::paged::CacheFull),
    /// An allocation failed.
    #[error("out of device memory: {what} wants {bytes} bytes ({free} bytes free)")]
    OutOfMemory {
        /// What was being allocated.
        what: String,
        /// Bytes asked for.
        bytes: usize,
        /// Bytes the device reported free.
        free: usize,
    },
    /// Anything else the device or its libraries reported.
    #[error("device error in {op}: {message}")]
    Failed {
        /// The operation.
        op: String,
        /// The error.
        message: String,
    },
}

/// Counts of how steps ran on a backend with graphs (benchmarks, tests and the engine
/// status read them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Steps captured into a graph.
    pub captured: u64,
    /// Steps run by replaying a graph.
    pub replayed: u64,
    /// Steps run eagerly.
    pub eager: u64,
    /// Captures or replays given up (the step then ran eagerly): a shape change, a
    /// device allocation a capture cannot hold, a full arena.
    pub abandoned: u64,
    /// Host nanoseconds over the replayed steps, each from its start to the upload of
    /// its staged metadata and its graph's launch: the model's walk over its layers,
    /// which the device waits for between steps.
    pub replay_host_ns: u64,
}

impl GraphStats {
    /// The steps by how they ran, named as the status and the metrics name them.
    pub fn counts(&self) -> [(&'static str, u64); 4] {
        [
            ("captured", self.captured),
            ("replayed", self.replayed),
            ("eager", self.eager),
            ("abandoned", self.abandoned),
        ]
    }
}

/// The least query heads per key head whose decode steps a device backend runs
/// attention for on its tensor cores by default (the CUDA backend's `attention_mma`: MLA's
/// absorbed form, and GQA of eight heads per key head or more).
pub const MMA_DECODE_GROUP: usize = 8;

/// A device's memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Bytes free on the device (for every process).
    pub free_bytes: usize,
    /// Bytes in all.
    pub total_bytes: usize,
}

/// The memory of a paged KV cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvCacheUsage {
    /// Bytes of the blocks held by sequences and cached prompts.
    pub held_bytes: usize,
    /// Bytes allocated for blocks, in device or host memory (held or free for reuse).
    pub allocated_bytes: usize,
    /// The allocations those bytes came in (a pool's allocations grow with it).
    pub allocations: usize,
    /// The most it may allocate.
    pub limit_bytes: usize,
}

/// A weight as the loader has it: f32 (converted, or random) or bf16 as stored.
pub enum Weight<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// bf16 values, as the checkpoint stores them.
    Bf16(&'a [half::bf16]),
}

/// How RoPE pairs the dimensions it rotates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// `(x[i], x[i + d/2])` — Llama, Qwen2 (`rotate_half`).
    Halves,
    /// `(x[2i], x[2i + 1])` — DeepSeek's MLA rope part.
    Interleaved,
}

/// The shape of one attention call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnShape {
    /// Query heads.
    pub h: usize,
    /// Key/value heads (query head `i` reads key head `i / (h / hk)`).
    pub hk: usize,
    /// Key (and query) width per head.
    pub dk: usize,
    /// Value width per head.
    pub dv: usize,
    /// Softmax scale.
    pub scale: f32,
    /// Each head's values are the first `dv` columns of its key (absorbed MLA: the
    /// latent, followed by the rope key). A backend may then keep no value cache and read
    /// the values from the key rows.
    pub values_in_keys: bool,
}

/// The shape of one sequence's KV cache ([`Backend::new_kv`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    /// Layers.
    pub layers: usize,
    /// Width of a position's key row in one layer.
    pub kcols: usize,
    /// Width of its value row.
    pub vcols: usize,
    /// The values are the first `vcols` columns of the keys (absorbed MLA): a backend may
    /// keep no value rows.
    pub values_in_keys: bool,
}

/// Where a layer's rows lie in the blocks of a paged cache of caches of one shape: a
/// block holds `block_rows` positions of every layer in turn, that layer's key rows,
/// then its value rows (none when the values are the keys' columns). Both backends lay
/// their blocks out so; sizes here are in elements (f32 on the CPU, bf16 on CUDA).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// The caches' shape.
    pub shape: KvShape,
    /// Positions per block.
    pub block_rows: usize,
}

impl KvLayout {
    /// Value columns kept (none when the values are the keys' columns).
    pub fn kept_vcols(&self) -> usize {
        if self.shape.values_in_keys {
            0
        } else {
            self.shape.vcols
        }
    }

    /// Elements of one position in every layer: a pool's row.
    pub fn row_elems(&self) -> usize {
        self.shape.layers * (self.shape.kcols + self.kept_vcols())
    }

    /// The offsets in a block, in elements, of layer `layer`'s key rows and of its value
    /// rows (the key rows' when the values are the keys' columns).
    pub fn offsets(&self, layer: usize) -> (usize, usize) {
        let (kc, vc, br) = (self.shape.kcols, self.kept_vcols(), self.block_rows);
        let k = layer * br * (kc + vc);
        let v = if self.shape.values_in_keys {
            k
        } else {
            k + br * kc
        };
        (k, v)
    }
}

/// One projection of [`Backend::linear_parts`]: a weight `[n, k]`, its bias, `n`.
pub type Projection<'a, B> = (&'a B, Option<&'a B>, usize);

/// The rotation of [`Backend::rope`] for [`Backend::norm_linear_parts_rope`]: `rot_dim`
/// dimensions, rows at `positions`, tables `cos`/`sin` of `[max_pos, rot_dim / 2]`.
pub struct RopeOf<'a, B> {
    /// Dimensions rotated per head.
    pub rot_dim: usize,
    /// Each row's position.
    pub positions: &'a [usize],
    /// `cos` table.
    pub cos: &'a B,
    /// `sin` table.
    pub sin: &'a B,
    /// How the dimensions pair.
    pub layout: RopeLayout,
}

impl<B> Clone for RopeOf<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B> Copy for RopeOf<'_, B> {}

/// Rotates the outputs `outs[j]` of projections `parts[j]` (`n` outputs per row) that
/// `rotate[j] = Some((head_dim, offset))` names, as [`Backend::rope`] rotates
/// `x[rows, n / head_dim, head_dim]` from `offset`; two of them in one
/// [`Backend::rope_pair`].
pub fn rope_parts<B: Backend + ?Sized>(
    be: &B,
    outs: &mut [B::Buf],
    parts: &[Projection<'_, B::Buf>],
    rotate: &[Option<(usize, usize)>],
    r: RopeOf<'_, B::Buf>,
) {
    let mut each: Vec<Rotated<'_, B::Buf>> = outs
        .iter_mut()
        .zip(parts)
        .zip(rotate)
        .filter_map(|((x, p), rot)| {
            rot.filter(|(d, _)| *d > 0)
                .map(|(d, off)| (x, p.2 / d, d, off))
        })
        .collect();
    while !each.is_empty() {
        let a = each.remove(0);
        if each.is_empty() {
            let (x, heads, d, off) = a;
            be.rope(
                x,
                heads,
                d,
                off,
                r.rot_dim,
                r.positions,
                r.cos,
                r.sin,
                r.layout,
            );
        } else {
            let b = each.remove(0);
            be.rope_pair(a, b, r.rot_dim, r.positions, r.cos, r.sin, r.layout);
        }
    }
}

/// One tensor of [`Backend::rope_pair`]: `x[rows, heads, head_dim]` rotated from `offset`
/// within each head, as `(x, heads, head_dim, offset)`.
pub type Rotated<'a, B> = (&'a mut B, usize, usize, usize);

/// Backend operations.
pub trait Backend {
    /// An f32 buffer on the backend.
    type Buf: Clone;
    /// One sequence's KV cache of every layer ([`Backend::new_kv`]).
    type Kv;

    /// Uploads host data.
    fn upload(&self, data: &[f32]) -> Self::Buf;
    /// Downloads to the host.
    fn download(&self, b: &Self::Buf) -> Vec<f32>;
    /// Number of elements.
    fn len(&self, b: &Self::Buf) -> usize;

    /// Whether a matrix stored as bf16 (`stored_bf16`) or f32 should be loaded as bf16
    /// ([`Backend::upload_weight`] then gets bf16 values, as stored where they are, with
    /// no f32 copy on the host).
    fn wants_bf16_weights(&self, stored_bf16: bool) -> bool {
        let _ = stored_bf16;
        false
    }
    /// Uploads a weight of `shape` (a matrix `[out, in]`, a norm or a bias). Backends may
    /// keep matrices in a narrower type; `linear`, `gather_rows`, `rms_norm` and
    /// `add_bias` accept what this returns.
    fn upload_weight(&self, w: Weight<'_>, shape: &[usize]) -> Self::Buf {
        let _ = shape;
        match w {
            Weight::F32(v) => self.upload(v),
            Weight::Bf16(v) => self.upload(&v.iter().map(|x| x.to_f32()).collect::<Vec<_>>()),
        }
    }
    /// A random matrix of `shape`, uniform in `[-amp, amp]`, made where it will live
    /// (benchmarks of shapes too large to build on the host); `None`: build it on the host.
    fn random_weight(&self, shape: &[usize], amp: f32, seed: u64) -> Option<Self::Buf> {
        let _ = (shape, amp, seed);
        None
    }
    /// The index of the largest value of every row of `x[·, cols]` (the first on ties)
    /// and its log-softmax: greedy decoding, with the log-probability of the pick. With
    /// `allowed` (`cols.div_ceil(32)` words per row; value `i` is bit `i % 32` of word
    /// `i / 32`) the largest allowed value is picked (0 if none is), its log-softmax still
    /// that over the whole row: a grammar's mask. A GPU backend picks on the device and
    /// copies back only the picks.
    fn argmax_rows(&self, x: &Self::Buf, cols: usize, allowed: Option<&[u32]>) -> Vec<(u32, f32)> {
        let rows = self.len(x).checked_div(cols).unwrap_or(0);
        let greedy = vec![crate::engine::sampler::Pick::GREEDY; rows];
        let picks = self.pick_rows(x, cols, allowed, None, &greedy);
        picks.into_iter().map(|s| (s.token, s.logprob)).collect()
    }
    /// [`Backend::argmax_rows`] with each row's token picked as `picks[row]` says
    /// ([`crate::engine::sampler::Pick::sample`]: greedy, or sampled by its draw with a
    /// temperature, top-k and top-p), among the tokens `allowed` gives, after the
    /// repetition penalty of the tokens `seen` gives (bits laid out as `allowed`'s), with
    /// the alternatives each pick asks for.
    fn pick_rows(
        &self,
        x: &Self::Buf,
        cols: usize,
        allowed: Option<&[u32]>,
        seen: Option<&[u32]>,
        picks: &[crate::engine::sampler::Pick],
    ) -> Vec<crate::engine::sampler::Sampled> {
        pick_on_host(&self.download(x), cols, allowed, seen, picks)
    }
    /// Routed experts of an MoE layer, on the device: routes every row of `x[t, hidden]`
    /// from the gate's `logits[t, n]` (and the noaux_tc correction `bias[n]`) as
    /// [`crate::engine::model::route`] does, runs each chosen expert (`gate`, `up`, `down`
    /// matrices, intermediate size `inter`) on its tokens, and returns the weighted sum,
    /// `[t, hidden]` (shared experts not included). `None`: this backend routes on the host.
    #[allow(clippy::too_many_arguments)]
    fn moe_routed(
        &self,
        x: &Self::Buf,
        t: usize,
        logits: &Self::Buf,
        bias: Option<&Self::Buf>,
        experts: &[[&Self::Buf; 3]],
        hidden: usize,
        inter: usize,
        moe: &crate::engine::config::MoeConfig,
    ) -> Option<Self::Buf> {
        let _ = (x, t, logits, bias, experts, hidden, inter, moe);
        None
    }
    /// A forward pass begins: `lens[s]` new rows of sequence `s`, outputs of kind `out`
    /// (the model's code for all logits, last logits or greedy tokens). A device backend
    /// may capture the step into a graph and replay it for later steps of the same shape;
    /// `graphs` is false when the model runs a step again after [`Backend::end_step`]
    /// refused its results.
    fn begin_step(&self, lens: &[usize], out: u8, graphs: bool) {
        let _ = (lens, out, graphs);
    }
    /// The forward pass is over. `false`: the backend discarded the step's results (its
    /// capture or replay was given up); the model restores the caches and runs the step
    /// again with `graphs` off.
    fn end_step(&self) -> bool {
        true
    }
    /// The first device error since the last call, if any. Operations after an error
    /// do nothing and return empty buffers: callers check this after a forward pass and
    /// discard its results.
    fn take_error(&self) -> Option<DeviceError> {
        None
    }

    /// What runs the model, for status pages: `cpu (N threads)`, `cuda: DEVICE NAME`.
    fn describe(&self) -> String;

    /// The paged KV cache's memory, or `None` for a backend without one.
    fn kv_cache(&self) -> Option<KvCacheUsage> {
        None
    }

    /// The device's memory, free and in all, or `None` for the host's (not tracked).
    fn device_memory(&self) -> Option<DeviceMemory> {
        None
    }

    /// How steps ran so far (captured into graphs, replayed, eager), or `None` for a
    /// backend without graphs.
    fn graph_stats(&self) -> Option<GraphStats> {
        None
    }

    /// `y[m, n] = x[m, k] · wᵀ` for a weight `w[n, k]`.
    fn linear(&self, x: &Self::Buf, m: usize, w: &Self::Buf, n: usize, k: usize) -> Self::Buf;
    /// `y[m, n] = x[m, k] · wᵀ + bias` (a bias of `n` values, or none).
    fn linear_bias(
        &self,
        x: &Self::Buf,
        m: usize,
        w: &Self::Buf,
        bias: Option<&Self::Buf>,
        n: usize,
        k: usize,
    ) -> Self::Buf {
        let mut y = self.linear(x, m, w, n, k);
        if let Some(b) = bias {
            self.add_bias(&mut y, b);
        }
        y
    }
    /// Several projections of the same rows `x[m, k]`: for each part `(w[n, k], bias,
    /// n)`, `x · wᵀ + bias` (a layer's queries, keys and values). A device backend makes
    /// them in one pass over `x`.
    fn linear_parts(
        &self,
        x: &Self::Buf,
        m: usize,
        k: usize,
        parts: &[Projection<'_, Self::Buf>],
    ) -> Vec<Self::Buf> {
        parts
            .iter()
            .map(|(w, b, n)| self.linear_bias(x, m, w, *b, *n, k))
            .collect()
    }
    /// `silu(x · gateᵀ) · (x · upᵀ)`, `[m, n]`: a SwiGLU MLP before its down projection.
    fn gate_up(
        &self,
        x: &Self::Buf,
        m: usize,
        gate: &Self::Buf,
        up: &Self::Buf,
        n: usize,
        k: usize,
    ) -> Self::Buf {
        let g = self.linear(x, m, gate, n, k);
        let u = self.linear(x, m, up, n, k);
        self.silu_mul(&g, &u)
    }
    /// [`Backend::linear_parts`] of `rms_norm(x, norm.0, norm.1)`: a device backend folds
    /// the norm into the projections' pass over `x` (no launch of its own).
    fn norm_linear_parts(
        &self,
        x: &Self::Buf,
        norm: (&Self::Buf, f32),
        m: usize,
        k: usize,
        parts: &[Projection<'_, Self::Buf>],
    ) -> Vec<Self::Buf> {
        let xn = self.rms_norm(x, norm.0, norm.1);
        self.linear_parts(&xn, m, k, parts)
    }
    /// [`Backend::norm_linear_parts`] with some outputs rotated (a layer's queries and
    /// keys): `rotate[j]` is `Some((head_dim, offset))` for part `j` rotated as
    /// [`Backend::rope`] rotates `x[m, n / head_dim, head_dim]` from `offset` (see
    /// [`rope_parts`]), `None` for a part left as it is. A device backend folds the
    /// rotation into the projections' pass (no launch of its own).
    #[allow(clippy::too_many_arguments)]
    fn norm_linear_parts_rope(
        &self,
        x: &Self::Buf,
        norm: (&Self::Buf, f32),
        m: usize,
        k: usize,
        parts: &[Projection<'_, Self::Buf>],
        rotate: &[Option<(usize, usize)>],
        rope: RopeOf<'_, Self::Buf>,
    ) -> Vec<Self::Buf> {
        let mut outs = self.norm_linear_parts(x, norm, m, k, parts);
        rope_parts(self, &mut outs, parts, rotate, rope);
        outs
    }
    /// [`Backend::gate_up`] of `rms_norm(x, norm.0, norm.1)`, the norm folded in likewise.
    #[allow(clippy::too_many_arguments)]
    fn norm_gate_up(
        &self,
        x: &Self::Buf,
        norm: (&Self::Buf, f32),
        m: usize,
        gate: &Self::Buf,
        up: &Self::Buf,
        n: usize,
        k: usize,
    ) -> Self::Buf {
        let xn = self.rms_norm(x, norm.0, norm.1);
        self.gate_up(&xn, m, gate, up, n, k)
    }
    /// `acc[m, n] += x[m, k] · wᵀ`: a projection added into the residual stream.
    fn linear_acc(
        &self,
        acc: &mut Self::Buf,
        x: &Self::Buf,
        m: usize,
        w: &Self::Buf,
        n: usize,
        k: usize,
    ) {
        let y = self.linear(x, m, w, n, k);
        self.add(acc, &y);
    }
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
    /// [`Backend::rope`] of two tensors of the same rows, positions and rotation (a
    /// layer's queries and keys): one launch on a device.
    #[allow(clippy::too_many_arguments)]
    fn rope_pair(
        &self,
        a: Rotated<'_, Self::Buf>,
        b: Rotated<'_, Self::Buf>,
        rot_dim: usize,
        positions: &[usize],
        cos: &Self::Buf,
        sin: &Self::Buf,
        layout: RopeLayout,
    ) {
        for (x, heads, head_dim, offset) in [a, b] {
            self.rope(
                x, heads, head_dim, offset, rot_dim, positions, cos, sin, layout,
            );
        }
    }
    /// One sequence's KV cache of every layer, empty, for caches of `shape`.
    fn new_kv(&self, shape: KvShape) -> Self::Kv;
    /// The first `keep` positions of `kv` (at most its own), to start another sequence
    /// from (a paged backend shares the blocks) or to put a cache back after a step
    /// failed.
    fn kv_prefix(&self, kv: &Self::Kv, keep: usize) -> Self::Kv;
    /// Room in every layer of `caches[s]` for `lens[s]` more positions, once per step
    /// before its first layer's [`Backend::attend`]. A backend that cannot make room
    /// records the error ([`Backend::take_error`]).
    fn kv_grow(&self, caches: &mut [&mut Self::Kv], lens: &[usize]);
    /// One step's attention in layer `layer` for every sequence in it. Rows of
    /// `q[·, h, dk]`, `k[·, hk, dk]` and `v[·, hk, dv]` belong to the sequences in order,
    /// `lens[s]` rows to sequence `s` (as given to [`Backend::kv_grow`]): each sequence's
    /// new key and value rows go into its cache of the layer (`caches[s]`), then its
    /// queries attend causally over its whole cache. Returns `[Σ lens, h, dv]`. With
    /// [`AttnShape::values_in_keys`] a backend may keep no value rows.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        lens: &[usize],
        layer: usize,
        caches: &mut [&mut Self::Kv],
        s: AttnShape,
    ) -> Self::Buf;
}

/// [`Backend::pick_rows`] on rows `v[·, cols]` in host memory, the rows in parallel (each
/// pick depends on its row alone: the same picks in any order).
pub(crate) fn pick_on_host(
    v: &[f32],
    cols: usize,
    allowed: Option<&[u32]>,
    seen: Option<&[u32]>,
    picks: &[crate::engine::sampler::Pick],
) -> Vec<crate::engine::sampler::Sampled> {
    use rayon::prelude::*;
    if cols == 0 {
        return Vec::new();
    }
    let words = cols.div_ceil(32);
    fn row_bits(b: Option<&[u32]>, words: usize, r: usize) -> Option<&[u32]> {
        b.and_then(|b| b.get(r * words..(r + 1) * words))
    }
    v.par_chunks_exact(cols)
        .zip(picks)
        .enumerate()
        .map(|(r, (row, pick))| {
            pick.sample(row, row_bits(allowed, words, r), row_bits(seen, words, r))
        })
        .collect()
}
