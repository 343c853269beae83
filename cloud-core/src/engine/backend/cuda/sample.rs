//! Picks on the device: each row's greedy or sampled token, its log-probability and its
//! alternatives, with grammar masks and repetition penalties, by `sample_rows`.

use cudarc::driver::CudaSlice;

use super::kernels::SAMPLE_MAX_THREADS;
use super::step::Dev;
use super::{failed, per_row, Cuda, CudaBuf};
use crate::engine::sampler::{Pick, Sampled, MAX_ALTERNATIVES};

impl Cuda {
    /// Each row's pick, its log-softmax and its alternatives, on the device, by
    /// `sample_rows` (see [`Backend::pick_rows`](crate::engine::backend::Backend::pick_rows)). Only the picks are copied back.
    pub(super) fn picks(
        &self,
        x: &CudaBuf,
        cols: usize,
        allowed: Option<&[u32]>,
        seen: Option<&[u32]>,
        picks: &[Pick],
    ) -> Vec<Sampled> {
        if self.errored() {
            return Vec::new();
        }
        let Some(xs) = self.f32_of(x, "pick_rows") else {
            return Vec::new();
        };
        if cols == 0 || xs.len() % cols != 0 {
            self.record(failed("pick_rows", "rows are not whole"));
            return Vec::new();
        }
        let rows = xs.len() / cols;
        if rows == 0 {
            return Vec::new();
        }
        let bits_fit = |b: Option<&[u32]>| b.is_none_or(|b| b.len() == rows * cols.div_ceil(32));
        if !bits_fit(allowed) || !bits_fit(seen) || picks.len() != rows {
            self.record(failed(
                "pick_rows",
                "not one pick and one row of mask bits per row",
            ));
            return Vec::new();
        }
        let spec: Vec<u64> = picks.iter().flat_map(Pick::words).collect();
        let (Some(mask), Some(seen), Some(spec)) = (
            self.meta_or_null(allowed, "token mask"),
            self.meta_or_null(seen, "seen tokens"),
            self.meta(&spec, "sampling parameters"),
        ) else {
            return Vec::new();
        };
        // Token ids, log-probabilities and alternatives in one buffer, for one copy back;
        // room for the most alternatives whenever any are asked for, so that the step's
        // shape does not depend on how many.
        let stride = if picks.iter().any(|p| p.alternatives > 0) {
            MAX_ALTERNATIVES
        } else {
            0
        };
        let Some(mut out) = self.tmp::<u32>(2 * rows * (1 + stride), "pick_rows") else {
            return Vec::new();
        };
        let c = cols as i32;
        // SAFETY: `out` holds `rows` 4-byte values after the first `rows`, then
        // `2 * rows * stride`.
        let (lp, top) = unsafe {
            (
                Dev::<f32>::view(&self.stream, out.ptr() + 4 * rows as u64, rows),
                Dev::<u32>::view(&self.stream, out.ptr() + 8 * rows as u64, 2 * rows * stride),
            )
        };
        let top_ptr = if stride > 0 { top.ptr() } else { 0 };
        // About 16 values per thread, up to the kernel's block.
        let threads = (cols / 16)
            .next_power_of_two()
            .clamp(32, SAMPLE_MAX_THREADS);
        let (mask_ptr, seen_ptr) = (
            mask.as_ref().map_or(0, Dev::ptr),
            seen.as_ref().map_or(0, Dev::ptr),
        );
        launch!(
            self,
            "sample_rows",
            per_row(rows, threads as u32),
            xs,
            &c,
            &mask_ptr,
            &seen_ptr,
            &spec,
            &mut out,
            &lp,
            &(stride as i32),
            &top_ptr
        );
        if !self.flush() {
            return Vec::new();
        }
        match self.stream.clone_dtoh::<u32, CudaSlice<u32>>(&out) {
            Ok(v) => (0..rows)
                .map(|i| {
                    let alt = &v[2 * rows + 2 * i * stride..];
                    let n = picks[i].alternatives.min(cols).min(stride);
                    Sampled {
                        token: v[i],
                        logprob: f32::from_bits(v[rows + i]),
                        top: (0..n)
                            .map(|j| (alt[2 * j], f32::from_bits(alt[2 * j + 1])))
                            .collect(),
                    }
                })
                .collect(),
            Err(e) => {
                self.record(failed("pick_rows", e));
                Vec::new()
            }
        }
    }
}
