//! The per-operation profile of steps (`cloud-core bench`): an event before each
//! operation, and the time to the next one's.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use cudarc::driver::{CudaEvent, CudaSlice};

use super::{failed, lock, Cuda};

/// Events before each operation of the steps being profiled, and the totals so far.
#[derive(Default)]
pub(super) struct Profiler {
    /// Per operation of the step: its event, and the weight bytes it reads (0: not
    /// counted).
    marks: Vec<(String, CudaEvent, u64)>,
    /// Per expert kernel of the step: its mark, a copy of the rows per expert it was
    /// given (on the device until the step ends) and the weight bytes each expert with
    /// rows reads.
    experts: Vec<(usize, CudaSlice<i32>, u64)>,
    /// Per operation: milliseconds, calls and weight bytes.
    totals: HashMap<String, (f64, u64, u64)>,
    steps: u64,
}

/// What profiled steps spent per operation ([`Cuda::take_profile`]).
#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// Steps profiled.
    pub steps: u64,
    /// Per operation (a kernel's name, `gemm_bf16`, `sgemm_batched`, `memcpy`), the
    /// longest first.
    pub ops: Vec<ProfiledOp>,
}

/// One operation's share of a [`Profile`].
#[derive(Clone, Debug)]
pub struct ProfiledOp {
    /// The operation.
    pub op: String,
    /// Calls over all the steps.
    pub calls: u64,
    /// Milliseconds over all the steps, from its event to the next operation's.
    pub ms: f64,
    /// Weight bytes it read over all the steps, where counted (projections, and the
    /// routed experts' kernels, each expert with rows in a step counted once: 0 for the
    /// other operations), so that `bytes / ms` is its share of the bandwidth.
    pub weight_bytes: u64,
}

impl Cuda {
    /// Times every operation of the steps that follow, by events recorded on the stream
    /// before each one (so each step runs eagerly, without graphs, and a little slower),
    /// until [`Cuda::take_profile`]. An operation's time runs to the next one's event, so
    /// it includes any wait of the device for the host's next launch.
    pub fn set_profiling(&self, on: bool) {
        let mut p = lock(&self.profiler);
        p.marks.clear();
        p.experts.clear();
        drop(p);
        self.profiling.store(on, Ordering::Relaxed);
    }

    /// What the profiled steps spent per operation since profiling began (the longest
    /// first), and ends profiling.
    pub fn take_profile(&self) -> Profile {
        let mut p = lock(&self.profiler);
        let mut ops: Vec<ProfiledOp> = p
            .totals
            .drain()
            .map(|(op, (ms, calls, weight_bytes))| ProfiledOp {
                op,
                calls,
                ms,
                weight_bytes,
            })
            .collect();
        ops.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.op.cmp(&b.op)));
        let steps = std::mem::take(&mut p.steps);
        self.profiling.store(false, Ordering::Relaxed);
        p.marks.clear();
        p.experts.clear();
        Profile { steps, ops }
    }

    /// Records an event before the operation `what`, when profiling.
    pub(super) fn mark(&self, what: &str) {
        use cudarc::driver::sys::CUevent_flags;
        if !self.profiling.load(Ordering::Relaxed) {
            return;
        }
        let mut p = lock(&self.profiler);
        match self
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        {
            Ok(e) => p.marks.push((what.to_string(), e, 0)),
            Err(e) => {
                self.profiling.store(false, Ordering::Relaxed);
                drop(p);
                self.record(failed("profile event", e));
            }
        }
    }

    /// When profiling: the operation just launched reads `bytes` of weights.
    pub(super) fn weight_bytes(&self, bytes: usize) {
        if !self.profiling.load(Ordering::Relaxed) {
            return;
        }
        if let Some(m) = lock(&self.profiler).marks.last_mut() {
            m.2 += bytes as u64;
        }
    }

    /// When profiling: the expert kernel `op` just launched reads `per_expert` bytes of
    /// weights for each expert that `count` (rows per expert, as `moe_group` leaves them
    /// on the device) gives rows. The counts are copied on the stream and read when the
    /// step ends, so the host does not wait in the middle of the step.
    pub(super) fn expert_weight_bytes(&self, op: &str, count: &CudaSlice<i32>, per_expert: usize) {
        if !self.profiling.load(Ordering::Relaxed) {
            return;
        }
        let mut p = lock(&self.profiler);
        // Not launched (the step has failed): nothing read.
        let at = match p.marks.last() {
            Some(m) if m.0 == op => p.marks.len() - 1,
            _ => return,
        };
        match self.stream.clone_dtod(count) {
            Ok(c) => p.experts.push((at, c, per_expert as u64)),
            Err(e) => {
                self.profiling.store(false, Ordering::Relaxed);
                drop(p);
                self.record(failed("profile counts", e));
            }
        }
    }

    /// At the end of a profiled step: the time from each operation's event to the next
    /// one's (the last one's to an event recorded now) is that operation's.
    pub(super) fn close_profile(&self) {
        use cudarc::driver::sys::CUevent_flags;
        if !self.profiling.load(Ordering::Relaxed) {
            return;
        }
        let mut p = lock(&self.profiler);
        if p.marks.is_empty() {
            return;
        }
        let end = match self
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        {
            Ok(e) => e,
            Err(e) => {
                self.profiling.store(false, Ordering::Relaxed);
                drop(p);
                return self.record(failed("profile event", e));
            }
        };
        let mut marks = std::mem::take(&mut p.marks);
        // The experts' bytes: those with rows, read back past the end event.
        for (at, count, per_expert) in std::mem::take(&mut p.experts) {
            match self.stream.clone_dtoh(&count) {
                Ok(rows) => {
                    if let Some(m) = marks.get_mut(at) {
                        m.2 += rows.iter().filter(|&&r| r > 0).count() as u64 * per_expert;
                    }
                }
                Err(e) => {
                    self.profiling.store(false, Ordering::Relaxed);
                    drop(p);
                    return self.record(failed("profile counts", e));
                }
            }
        }
        for (i, (op, start, bytes)) in marks.iter().enumerate() {
            let next = marks.get(i + 1).map_or(&end, |m| &m.1);
            match start.elapsed_ms(next) {
                Ok(ms) => {
                    let t = p.totals.entry(op.clone()).or_default();
                    t.0 += f64::from(ms);
                    t.1 += 1;
                    t.2 += bytes;
                }
                Err(e) => {
                    self.profiling.store(false, Ordering::Relaxed);
                    drop(p);
                    return self.record(failed("profile event", e));
                }
            }
        }
        p.steps += 1;
    }
}
