//! Mixture-of-experts layers on the device: routing (softmax/greedy or sigmoid/noaux_tc,
//! with groups), grouping of the (token, expert) pairs by expert, the experts' SwiGLU
//! MLPs (GEMV kernels for decode steps of a few rows per expert, grouped GEMMs on the
//! tensor cores for prompts and large decode batches) and the weighted combination.

use std::sync::Arc;

use cudarc::driver::LaunchConfig;
use half::bf16;

use super::kernels::{GEMV_ROWS, GG_M, GG_N, GG_THREADS, MOE_MAX_EXPERTS};
use super::step::Dev;
use super::{failed, lock, per_row, Cuda, CudaBuf};

impl Cuda {
    /// The address tables of a layer's experts (`None` unless every matrix is bf16).
    pub(super) fn expert_tables(&self, experts: &[[&CudaBuf; 3]]) -> Option<Arc<[Dev<u64>; 3]>> {
        let key = bf16_addr(experts.first()?[0])?;
        if let Some(t) = lock(&self.expert_tables).get(&key) {
            return Some(t.clone());
        }
        let cols = expert_addrs(experts)?;
        let tables = Arc::new([
            self.htod(&cols[0], "expert table")?,
            self.htod(&cols[1], "expert table")?,
            self.htod(&cols[2], "expert table")?,
        ]);
        lock(&self.expert_tables).insert(key, tables.clone());
        Some(tables)
    }

    /// The routed experts' SwiGLU MLPs as grouped GEMMs on the tensor cores: one launch
    /// for every expert's gate and up projections (the rows of each slot's token read
    /// from `x` and rounded to bf16 as they are staged, SiLU·mul applied to the
    /// products, the result kept as bf16), one for every expert's down projection. Each
    /// launch has a block per output tile of every row tile the step can have; the blocks
    /// past the step's own return at once, so the host never reads the counts. `y[slot]`:
    /// the expert's output for the slot's token, unweighted.
    fn experts_by_grouped_gemm(
        &self,
        x: &Dev<f32>,
        tables: &[Dev<u64>; 3],
        g: &ExpertGroups<'_>,
        (pairs, hidden, inter): (usize, usize, usize),
        y: &mut Dev<f32>,
    ) -> Option<()> {
        let mut act = self.tmp::<bf16>(pairs * inter, "moe intermediate")?;
        let tiles = |outputs: usize| LaunchConfig {
            grid_dim: (outputs.div_ceil(GG_N) as u32, g.row_tiles as u32, 1),
            block_dim: (GG_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ni, hi, ii) = (tables[0].len() as i32, hidden as i32, inter as i32);
        launch!(
            self,
            "moe_gemm_gate_up",
            tiles(inter),
            x,
            g.slot_tok,
            &tables[0],
            &tables[1],
            g.count,
            g.start,
            g.tiles,
            &ni,
            &hi,
            &ii,
            &mut act
        );
        self.expert_weight_bytes("moe_gemm_gate_up", g.count, 2 * inter * hidden * 2);
        launch!(
            self,
            "moe_gemm_down",
            tiles(hidden),
            &act,
            &tables[2],
            g.count,
            g.start,
            g.tiles,
            &ni,
            &hi,
            &ii,
            y
        );
        self.expert_weight_bytes("moe_gemm_down", g.count, hidden * inter * 2);
        Some(())
    }

    /// [`Backend::moe_routed`](crate::engine::backend::Backend::moe_routed) on the device
    /// (`None`: a layout the kernels do not take, for the host's way).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn moe_on_device(
        &self,
        x: &CudaBuf,
        t: usize,
        logits: &CudaBuf,
        bias: Option<&CudaBuf>,
        experts: &[[&CudaBuf; 3]],
        hidden: usize,
        inter: usize,
        moe: &crate::engine::config::MoeConfig,
    ) -> Option<CudaBuf> {
        use crate::engine::config::{ScoringFunc, TopkMethod};
        let n = experts.len();
        let k = moe.num_experts_per_tok;
        let groups = moe.n_group.max(1);
        // What the kernels handle; anything else goes the host's way.
        if n == 0
            || n > MOE_MAX_EXPERTS
            || groups > 64
            || !n.is_multiple_of(groups)
            || k == 0
            || k > n
            || !hidden.is_multiple_of(8)
            || !inter.is_multiple_of(8)
        {
            return None;
        }
        if self.errored() {
            return Some(self.empty());
        }
        let tables = self.expert_tables(experts)?;
        let (Some(xs), Some(ls)) = (self.f32_of(x, "moe"), self.f32_of(logits, "moe")) else {
            return Some(self.empty());
        };
        if xs.len() != t * hidden || ls.len() != t * n {
            self.record(failed("moe", "shapes"));
            return Some(self.empty());
        }
        let Some(mut out) = self.tmp::<f32>(t * hidden, "moe output") else {
            return Some(self.empty());
        };
        if t == 0 {
            return Some(CudaBuf::F32(Arc::new(out)));
        }
        let pairs = t * k;
        let (
            Some(mut ids),
            Some(mut w),
            Some(mut count),
            Some(mut start),
            Some(mut tiles),
            Some(mut slot_tok),
            Some(mut slot_w),
            Some(mut slot_of),
            Some(mut y),
        ) = (
            self.tmp::<i32>(pairs, "moe routes"),
            self.tmp::<f32>(pairs, "moe weights"),
            self.tmp::<i32>(n, "moe counts"),
            self.tmp::<i32>(n, "moe starts"),
            self.tmp::<i32>(n + 1, "moe tiles"),
            self.tmp::<i32>(pairs, "moe slots"),
            self.tmp::<f32>(pairs, "moe slots"),
            self.tmp::<i32>(pairs, "moe slots"),
            self.tmp::<f32>(pairs * hidden, "moe expert outputs"),
        )
        else {
            return Some(self.empty());
        };
        let (ti, ni, ki) = (t as i32, n as i32, k as i32);
        let scoring = i32::from(moe.scoring_func == ScoringFunc::Sigmoid);
        let method = match moe.topk_method {
            TopkMethod::Greedy => 0i32,
            TopkMethod::GroupLimitedGreedy => 1,
            TopkMethod::NoauxTc => 2,
        };
        let (gi, tg, norm, scale) = (
            groups as i32,
            moe.topk_group as i32,
            i32::from(moe.norm_topk_prob),
            moe.routed_scaling_factor as f32,
        );
        let route_cfg = LaunchConfig {
            grid_dim: (t.div_ceil(64) as u32, 1, 1),
            block_dim: (64, 1, 1),
            shared_mem_bytes: 0,
        };
        match bias {
            Some(CudaBuf::F32(b)) if b.len() == n => {
                launch!(
                    self,
                    "moe_route",
                    route_cfg,
                    ls,
                    b.as_ref(),
                    &ti,
                    &ni,
                    &ki,
                    &scoring,
                    &method,
                    &gi,
                    &tg,
                    &norm,
                    &scale,
                    &mut ids,
                    &mut w
                )
            }
            _ => {
                let null = 0u64;
                launch!(
                    self,
                    "moe_route",
                    route_cfg,
                    ls,
                    &null,
                    &ti,
                    &ni,
                    &ki,
                    &scoring,
                    &method,
                    &gi,
                    &tg,
                    &norm,
                    &scale,
                    &mut ids,
                    &mut w
                )
            }
        }
        let pi = pairs as i32;
        launch!(
            self,
            "moe_group",
            per_row(1, MOE_MAX_EXPERTS as u32),
            &ids,
            &w,
            &pi,
            &ki,
            &ni,
            &mut count,
            &mut start,
            &mut tiles,
            &mut slot_tok,
            &mut slot_w,
            &mut slot_of
        );
        // Grouped GEMMs on the tensor cores for a prompt's tokens (on average at least two
        // rows per expert) and for a decode step of more rows per expert than the expert
        // kernels take in one pass (a large batch); otherwise (and on a device without
        // bf16 tensor cores) the expert kernels, which read each weight row once per
        // GEMV_ROWS of an expert's rows with f32 inputs. The choice depends on the step's
        // shape only, so a graphed step's eager run computes what its replays do.
        let rows_per_expert = if self.steps().decode {
            GEMV_ROWS + 1
        } else {
            2
        };
        // The most row tiles the step's pairs can make (an expert's last tile may be
        // partial; an expert's rows are at most t): a grid dimension of at most 65,535.
        let row_tiles = (pairs.div_ceil(GG_M) + n).min(t.div_ceil(GG_M) * n);
        let grouped =
            self.tensor_cores && pairs >= rows_per_expert * n && row_tiles <= u16::MAX as usize;
        if grouped {
            let groups = ExpertGroups {
                count: &count,
                start: &start,
                tiles: &tiles,
                slot_tok: &slot_tok,
                row_tiles,
            };
            if self
                .experts_by_grouped_gemm(xs, &tables, &groups, (pairs, hidden, inter), &mut y)
                .is_none()
            {
                return Some(self.empty());
            }
        } else {
            let Some(mut h) = self.tmp::<f32>(pairs * inter, "moe intermediate") else {
                return Some(self.empty());
            };
            const WARPS: usize = 8;
            let by_expert = |rows: usize| LaunchConfig {
                grid_dim: (n as u32, rows.div_ceil(WARPS) as u32, 1),
                block_dim: ((WARPS * 32) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let (hi, ii) = (hidden as i32, inter as i32);
            launch!(
                self,
                "moe_gate_up",
                by_expert(inter),
                xs,
                &tables[0],
                &tables[1],
                &count,
                &start,
                &slot_tok,
                &hi,
                &ii,
                &mut h
            );
            self.expert_weight_bytes("moe_gate_up", &count, 2 * inter * hidden * 2);
            launch!(
                self,
                "moe_down",
                by_expert(hidden),
                &h,
                &tables[2],
                &count,
                &start,
                &hi,
                &ii,
                &mut y
            );
            self.expert_weight_bytes("moe_down", &count, hidden * inter * 2);
        }
        let hi = hidden as i32;
        launch!(
            self,
            "moe_combine",
            per_row(t, 256),
            &y,
            &slot_of,
            &slot_w,
            &ki,
            &hi,
            &mut out
        );
        Some(CudaBuf::F32(Arc::new(out)))
    }
}

/// A bf16 matrix's device address (`None`: not bf16).
fn bf16_addr(b: &CudaBuf) -> Option<u64> {
    match b {
        CudaBuf::Bf16(s) => Some(s.ptr()),
        _ => None,
    }
}

/// The experts' gate, up and down matrix addresses, one list per projection (`None`:
/// one is not bf16).
fn expert_addrs(experts: &[[&CudaBuf; 3]]) -> Option<[Vec<u64>; 3]> {
    let mut cols: [Vec<u64>; 3] = Default::default();
    for e in experts {
        for (j, m) in e.iter().enumerate() {
            cols[j].push(bf16_addr(m)?);
        }
    }
    Some(cols)
}

/// The (token, expert) pairs grouped by expert, as `moe_group` leaves them on the device,
/// and the most row tiles of the grouped GEMMs they can make.
struct ExpertGroups<'a> {
    count: &'a Dev<i32>,
    start: &'a Dev<i32>,
    tiles: &'a Dev<i32>,
    slot_tok: &'a Dev<i32>,
    row_tiles: usize,
}
