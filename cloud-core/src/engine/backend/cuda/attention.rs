//! Attention: one `attention_batch` launch for all the sequences of a step, each reading
//! its paged cache through its block table (the step's own keys and values appended to
//! the caches by the same launch), with a row's positions split across blocks when the
//! step has few rows, or, for prompts and for query heads that share keys by eight or more
//! (MLA's absorbed form), `attention_mma` on the tensor cores (tiles of query slots
//! sharing each tile of keys, decode steps split the same way); and attention over dense
//! rows (no cache).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig};

use super::kernels::{fa_shared, ATT_WARPS, FA_SLOTS, FA_THREADS, MAX_DV};
use super::kv::cache_rows;
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
    /// `fresh`: the step's key and value rows, which the same launch appends to the
    /// caches (`None`: the caches hold them already).
    #[allow(clippy::too_many_arguments)]
    fn attention_launch(
        &self,
        q: &CudaSlice<f32>,
        meta: &CudaSlice<u64>,
        n: usize,
        t: usize,
        out: &mut CudaSlice<f32>,
        s: AttnShape,
        (vcols, vhead): (usize, usize),
        fresh: Option<(&Dev<f32>, &Dev<f32>)>,
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
        let (knew, vnew) = fresh.map_or((0, 0), |(k, v)| (k.ptr(), v.ptr()));
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
                meta,
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
            meta,
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
            &knew,
            &vnew
        );
    }

    /// [`Backend::attend`](crate::engine::backend::Backend::attend) on the device.
    pub(super) fn attend_paged(
        &self,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        lens: &[usize],
        caches: &mut [(&mut CudaBuf, &mut CudaBuf)],
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
        let n = lens.len();
        let t: usize = lens.iter().sum();
        let (kc, vc) = (s.hk * s.dk, s.hk * s.dv);
        if s.dv > MAX_DV
            || s.dv == 0
            || !s.dk.is_multiple_of(4)
            || !s.dv.is_multiple_of(4)
            || s.hk == 0
            || !s.h.is_multiple_of(s.hk)
            || (s.values_in_keys && s.dv > s.dk)
            || caches.len() != n
            || qs.len() != t * s.h * s.dk
            || ks.len() != t * kc
            || vs.len() != t * vc
        {
            self.record(failed(
                "attention",
                format!(
                    "shapes ({n} sequences, {t} rows, h {}, hk {}, dk {}, 0 < dv {} ≤ {MAX_DV}; \
                     dk and dv multiples of 4)",
                    s.h, s.hk, s.dk, s.dv
                ),
            ));
            return self.empty();
        }
        // Room for the new rows (copy-on-write of shared blocks included), then each
        // cache's device table.
        let mut meta = vec![0u64; 4 * n + 1];
        let mut row0 = 0;
        for (i, ((kcache, vcache), len)) in caches.iter_mut().zip(lens).enumerate() {
            let pos0 = cache_rows(kcache);
            if self.grow_cache(kcache, kc, *len).is_none() {
                return self.empty();
            }
            let Some(kt) = self.table_of(kcache) else {
                return self.empty();
            };
            meta[i] = kt;
            meta[n + i] = if s.values_in_keys {
                kt
            } else {
                if cache_rows(vcache) != pos0 || self.grow_cache(vcache, vc, *len).is_none() {
                    self.record(failed("attention", "key and value caches differ in length"));
                    return self.empty();
                }
                let Some(vt) = self.table_of(vcache) else {
                    return self.empty();
                };
                vt
            };
            meta[2 * n + i] = pos0 as u64;
            meta[3 * n + i] = row0 as u64;
            row0 += len;
        }
        meta[4 * n] = t as u64;
        let Some(mut out) = self.tmp::<f32>(t * s.h * s.dv, "attention output") else {
            return self.empty();
        };
        if t == 0 {
            return CudaBuf::F32(Arc::new(out));
        }
        let Some(md) = self.meta(&meta, "attention metadata") else {
            return self.empty();
        };
        // The new rows go into the caches in the attention launch itself, which reads
        // them from `ks`/`vs` (values from the keys when they are the keys' columns).
        let (values, vcols, vhead) = if s.values_in_keys {
            (ks, kc, s.dk)
        } else {
            (vs, vc, s.dv)
        };
        self.attention_launch(
            qs,
            &md,
            n,
            t,
            &mut out,
            s,
            (vcols, vhead),
            Some((ks, values)),
            lens.iter().all(|&l| l == 1),
        );
        CudaBuf::F32(Arc::new(out))
    }

    /// [`Backend::attention`](crate::engine::backend::Backend::attention) on the device:
    /// rows attending to rows of the same call, no cache.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_dense(
        &self,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        t: usize,
        h: usize,
        hk: usize,
        dk: usize,
        dv: usize,
        scale: f32,
    ) -> CudaBuf {
        if self.errored() {
            return self.empty();
        }
        let Some(qs) = self.f32_of(q, "attention") else {
            return self.empty();
        };
        let (CudaBuf::Paged(kp), CudaBuf::Paged(vp)) = (k, v) else {
            self.record(failed("attention", "keys and values must be a cache"));
            return self.empty();
        };
        let total = kp.rows.rows();
        if dv > MAX_DV
            || dv == 0
            || !dk.is_multiple_of(4)
            || !dv.is_multiple_of(4)
            || hk == 0
            || !h.is_multiple_of(hk)
            || kp.cols != hk * dk
            || vp.cols != hk * dv
            || vp.rows.rows() != total
            || t > total
            || qs.len() != t * h * dk
        {
            self.record(failed(
                "attention",
                format!(
                    "shapes (t {t}, T {total}, h {h}, hk {hk}, dk {dk}, 0 < dv {dv} ≤ {MAX_DV}; \
                     dk and dv multiples of 4)"
                ),
            ));
            return self.empty();
        }
        let Some(mut out) = self.tmp::<f32>(t * h * dv, "attention output") else {
            return self.empty();
        };
        if t == 0 {
            return CudaBuf::F32(Arc::new(out));
        }
        let (Some(kt), Some(vt)) = (
            self.meta(&kp.rows.table(), "key table"),
            self.meta(&vp.rows.table(), "value table"),
        ) else {
            return self.empty();
        };
        let addr = |x: &CudaSlice<u64>| x.device_ptr(&self.stream).0;
        let meta = [addr(&kt), addr(&vt), (total - t) as u64, 0, t as u64];
        let Some(md) = self.meta(&meta, "attention metadata") else {
            return self.empty();
        };
        let shape = AttnShape {
            h,
            hk,
            dk,
            dv,
            scale,
            values_in_keys: false,
        };
        // The tables are freed in stream order, after the kernel.
        self.attention_launch(qs, &md, 1, t, &mut out, shape, (hk * dv, dv), None, t == 1);
        CudaBuf::F32(Arc::new(out))
    }
}
