//! Attention: one `attention_batch` launch for all the sequences of a step, each reading
//! its paged cache through its block table (the step's own keys and values appended to
//! the caches by the same launch), with a row's positions split across blocks when the
//! step has few rows, or, for prompts and for query heads that share keys by eight or more
//! (MLA's absorbed form), `attention_mma` on the tensor cores (tiles of query slots
//! sharing each tile of keys, decode steps split the same way). Every layer's launch
//! reads the same metadata (the step's block tables, lengths and rows), at the layer's
//! offsets in the blocks.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::kernels::{fa_shared, ATT_WARPS, FA_SLOTS, FA_THREADS, MAX_DV};
use super::kv::SeqKv;
use super::step::Dev;
use super::{failed, Cuda, CudaBuf};
use crate::engine::backend::AttnShape;

/// The most ranges `attention_batch` splits a row's positions into.
const ATT_MAX_SPLITS: usize = 32;
// The last block of a split (row, head) keeps a weight per split in its block's shared
// output rows (ATT_WARPS · dv floats, dv ≥ 4).
const _: () = assert!(ATT_MAX_SPLITS <= ATT_WARPS * 4);

impl Cuda {
    /// Into how many ranges a split launch of `pairs` (row, head) pairs or slot tiles
    /// cuts each one's positions: enough for two blocks per multiprocessor. Only fewer
    /// pairs than `tickets` holds are split (one ticket each).
    fn att_splits(&self, pairs: usize) -> usize {
        if pairs < self.tickets.len() {
            (2 * self.sms)
                .div_ceil(pairs.max(1))
                .clamp(1, ATT_MAX_SPLITS)
        } else {
            1
        }
    }

    /// Scratch for the partial results of a split launch (`None` for one range), or
    /// `Err` when it cannot be had (the error or abandon is recorded).
    fn split_scratch(&self, splits: usize, len: usize) -> Result<Option<Dev<f32>>, ()> {
        if splits == 1 {
            return Ok(None);
        }
        self.tmp::<f32>(len, "attention splits").map(Some).ok_or(())
    }

    /// Launches `attention_mma` for a step of prompts or with query heads grouped by
    /// eight or more (see the kernel), else `attention_batch`, over the rows described by
    /// `meta` (see the kernels), with each row's positions split across enough blocks to
    /// give every multiprocessor two when the step has few (row, head) pairs (few slot
    /// tiles, for `attention_mma`, which splits decode steps only: `one_row`, every
    /// sequence has one row), and the splits merged by the same launch.
    /// The split depends on the step's shape alone (not on the cache lengths, which the
    /// kernel reads from `meta`), so a captured step replays with longer caches.
    /// `knew`/`vnew`: the step's key and value rows, which the same launch appends to the
    /// caches; `kbase`/`vbase`: the byte offsets of the layer's key and value rows in a
    /// block.
    #[allow(clippy::too_many_arguments)]
    fn attention_launch(
        &self,
        q: &CudaSlice<f32>,
        meta: u64,
        n: usize,
        t: usize,
        out: &mut CudaSlice<f32>,
        s: AttnShape,
        (vcols, vhead): (usize, usize),
        (kbase, vbase): (u64, u64),
        (knew, vnew): (&Dev<f32>, &Dev<f32>),
        one_row: bool,
    ) {
        let (ni, hh, hki, dki, dvi, vci, vhi, br) = (
            n as i32,
            s.h as i32,
            s.hk as i32,
            s.dk as i32,
            s.dv as i32,
            vcols as i32,
            vhead as i32,
            self.block_rows() as i32,
        );
        let (knew, vnew) = (knew.ptr(), vnew.ptr());
        // On the tensor cores, when the device has them and a block's tiles fit its shared
        // memory: prompts (two rows or more per sequence on average: never a decode step),
        // and steps whose query heads share keys by `mma_decode_group` or more (eight by
        // default: MLA's absorbed form, whose one key head all heads share), where one
        // tile of keys serves them all.
        let g = s.h / s.hk;
        let tiles_bytes = fa_shared(s.dk, s.dv, s.values_in_keys);
        if self.tensor_cores
            && (t >= 2 * n || s.values_in_keys || g >= self.opts.mma_decode_group.max(1))
            && s.dk.is_multiple_of(8)
            && s.dv.is_multiple_of(8)
            && tiles_bytes <= self.kernels.f["attention_mma"].dynamic as usize
        {
            // As many slot tiles as the step can have (ceil(rows · g / FA_SLOTS) per
            // sequence), bounded by its shape alone: a decode step has exactly
            // n · ceil(g / FA_SLOTS).
            let tiles = (t * g.div_ceil(FA_SLOTS)).min((t * g).div_ceil(FA_SLOTS) + n);
            let pairs = tiles * s.hk;
            // Split (decode steps only: see the kernel) as attention_batch's rows.
            let splits = if one_row { self.att_splits(pairs) } else { 1 };
            let cfg = LaunchConfig {
                grid_dim: (tiles as u32, s.hk as u32, splits as u32),
                block_dim: (FA_THREADS as u32, 1, 1),
                shared_mem_bytes: tiles_bytes as u32,
            };
            let len = pairs * splits * FA_SLOTS.min(g) * (s.dv + 2);
            let Ok(part) = self.split_scratch(splits, len) else {
                return;
            };
            let part_ptr = part.as_ref().map_or(0, Dev::ptr);
            launch!(
                self,
                "attention_mma",
                cfg,
                q,
                &meta,
                &ni,
                out,
                &part_ptr,
                &self.tickets,
                &hh,
                &hki,
                &dki,
                &dvi,
                &vci,
                &vhi,
                &s.scale,
                &br,
                &kbase,
                &vbase,
                &knew,
                &vnew
            );
            return;
        }
        const WARPS: usize = ATT_WARPS;
        let pairs = t * s.h;
        let splits = self.att_splits(pairs);
        let cfg = LaunchConfig {
            grid_dim: (pairs as u32, splits as u32, 1),
            block_dim: ((WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: ((s.dk + 2 * WARPS + WARPS * s.dv) * 4) as u32,
        };
        // The splits' partial results, when there is more than one (kept to the end of
        // this function, past the launch, as the stream orders it).
        let Ok(part) = self.split_scratch(splits, pairs * splits * (s.dv + 2)) else {
            return;
        };
        let part_ptr = part.as_ref().map_or(0, Dev::ptr);
        launch!(
            self,
            "attention_batch",
            cfg,
            q,
            &meta,
            &ni,
            out,
            &part_ptr,
            &self.tickets,
            &hh,
            &hki,
            &dki,
            &dvi,
            &vci,
            &vhi,
            &s.scale,
            &br,
            &kbase,
            &vbase,
            &knew,
            &vnew
        );
    }

    /// [`Backend::attend`](crate::engine::backend::Backend::attend) on the device: layer
    /// `layer` of the caches the step's [`Cuda::kv_grow_step`] made room in.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attend_paged(
        &self,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        lens: &[usize],
        layer: usize,
        caches: &[&mut SeqKv],
        s: AttnShape,
    ) -> CudaBuf {
        if self.errored() {
            return self.empty();
        }
        let (Some(qs), Some(ks), Some(vs)) = (
            self.f32_of(q, "attention"),
            self.f32_of(k, "attention"),
            self.f32_of(v, "attention"),
        ) else {
            return self.empty();
        };
        let (meta, layout) = {
            let step = self.kv_step();
            let grown = step.as_ref().filter(|st| {
                st.lens == lens
                    && st.caches.len() == caches.len()
                    && st
                        .caches
                        .iter()
                        .zip(caches)
                        .all(|(a, c)| *a == &**c as *const SeqKv as usize)
            });
            let Some(st) = grown else {
                self.record(failed(
                    "attention",
                    "the step's caches were not made room in (kv_grow) for these rows",
                ));
                return self.empty();
            };
            (st.meta.ptr(), st.layout)
        };
        let n = lens.len();
        let t: usize = lens.iter().sum();
        let (kc, vc) = (s.hk * s.dk, s.hk * s.dv);
        let shape = layout.shape;
        if s.dv > MAX_DV
            || s.dv == 0
            || !s.dk.is_multiple_of(4)
            || !s.dv.is_multiple_of(4)
            || s.hk == 0
            || !s.h.is_multiple_of(s.hk)
            || (s.values_in_keys && s.dv > s.dk)
            || layer >= shape.layers
            || shape.kcols != kc
            || shape.values_in_keys != s.values_in_keys
            || (!s.values_in_keys && shape.vcols != vc)
            || qs.len() != t * s.h * s.dk
            || ks.len() != t * kc
            || vs.len() != t * vc
        {
            self.record(failed(
                "attention",
                format!(
                    "shapes (layer {layer} of {}, {n} sequences, {t} rows, h {}, hk {}, dk {}, \
                     0 < dv {} ≤ {MAX_DV}; dk and dv multiples of 4; caches of rows {} and {} \
                     wide)",
                    shape.layers, s.h, s.hk, s.dk, s.dv, shape.kcols, shape.vcols
                ),
            ));
            return self.empty();
        }
        let Some(mut out) = self.tmp::<f32>(t * s.h * s.dv, "attention output") else {
            return self.empty();
        };
        if t == 0 {
            return CudaBuf::F32(Arc::new(out));
        }
        // The new rows go into the caches in the attention launch itself, which reads
        // them from `ks`/`vs` (values from the keys when they are the keys' columns).
        let (values, vcols, vhead) = if s.values_in_keys {
            (ks, kc, s.dk)
        } else {
            (vs, vc, s.dv)
        };
        self.attention_launch(
            qs,
            meta,
            n,
            t,
            &mut out,
            s,
            (vcols, vhead),
            layout.offsets(layer),
            (ks, values),
            lens.iter().all(|&l| l == 1),
        );
        CudaBuf::F32(Arc::new(out))
    }
}
