//! Device memory of operations: a step's temporaries (from the stream's pool, or views
//! of the graph arena in a graphed step), host data uploaded for a step or kept past it,
//! and device-to-device copies.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, DeviceRepr};

use super::step::{Dev, Mode, Pre};
use super::{failed, Cuda, CudaBuf};
use crate::engine::backend::DeviceError;

impl Cuda {
    /// Memory for `n` elements that the step's kernels fill before reading: a view of
    /// the arena in a graphed step, else from the stream's pool. `None`: the error (or
    /// the abandoned capture) is recorded.
    pub(super) fn tmp<T: DeviceRepr>(&self, n: usize, what: &str) -> Option<Dev<T>> {
        let bytes = n * std::mem::size_of::<T>();
        {
            let mut st = self.steps();
            if st.graphed() {
                let got = st.arena.as_mut().and_then(|a| a.take(bytes));
                return match got {
                    Some(ptr) => {
                        st.sig.add(&[ptr, bytes as u64]);
                        // SAFETY: the arena outlives the step, and nothing else is handed
                        // these bytes during it.
                        Some(unsafe { Dev::view(&self.stream, ptr, n) })
                    }
                    None => {
                        // Twice the size, or enough for the step so far and this.
                        let (size, used) = st
                            .arena
                            .as_ref()
                            .map_or((self.opts.graph_memory.0, 0), |a| (a.size, a.used));
                        st.want_arena = st.want_arena.max(grown(size, used, bytes));
                        drop(st);
                        self.abandon("the step arena is full");
                        None
                    }
                };
            }
        }
        if n == 0 {
            // SAFETY: a view of zero elements is never read or written.
            return Some(unsafe { Dev::view(&self.stream, 0, 0) });
        }
        // SAFETY: every caller's kernels write what they later read.
        match unsafe { self.stream.alloc::<T>(n) } {
            Ok(s) => Some(Dev::owned(s)),
            Err(e) => {
                let free = self.memory().map(|m| m.0).unwrap_or(0);
                self.record(
                    if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                        DeviceError::OutOfMemory {
                            what: what.to_string(),
                            bytes,
                            free,
                        }
                    } else {
                        failed(what, e)
                    },
                );
                None
            }
        }
    }

    /// A step's host data on the device (ids, positions, metadata): staged and uploaded
    /// with the rest of the step's in a graphed step, else copied now.
    pub(super) fn meta<T: DeviceRepr>(&self, data: &[T], what: &str) -> Option<Dev<T>> {
        let bytes = std::mem::size_of_val(data);
        {
            let mut st = self.steps();
            if st.graphed() {
                let got = st.staged.as_mut().and_then(|r| {
                    let ptr = r.take(bytes)?;
                    Some((ptr, (ptr - r.base) as usize))
                });
                return match got {
                    Some((ptr, at)) => {
                        if st.staging.len() < at + bytes {
                            st.staging.resize(at + bytes, 0);
                        }
                        // SAFETY: `data` is `bytes` bytes of plain values.
                        let raw = unsafe {
                            std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), bytes)
                        };
                        st.staging[at..at + bytes].copy_from_slice(raw);
                        st.sig.add(&[ptr, bytes as u64]);
                        // SAFETY: the staging region outlives the step and is written only
                        // by the upload before the graph runs.
                        Some(unsafe { Dev::view(&self.stream, ptr, data.len()) })
                    }
                    None => {
                        let (size, used) = st
                            .staged
                            .as_ref()
                            .map_or((self.opts.graph_memory.1, 0), |r| (r.size, r.used));
                        st.want_staged = st.want_staged.max(grown(size, used, bytes));
                        drop(st);
                        self.abandon("the step's staging area is full");
                        None
                    }
                };
            }
        }
        self.htod(data, what)
    }

    /// [`Cuda::meta`] of optional data: `Some(None)` for none (a null pointer to the
    /// kernel), `None` when the upload failed (recorded).
    pub(super) fn meta_or_null<T: DeviceRepr>(
        &self,
        data: Option<&[T]>,
        what: &str,
    ) -> Option<Option<Dev<T>>> {
        match data {
            Some(d) => self.meta(d, what).map(Some),
            None => Some(None),
        }
    }

    /// Host data copied to memory of its own now (weights, expert tables: kept past the
    /// step). Not while a step is captured: the capture is given up.
    pub(super) fn htod<T: DeviceRepr>(&self, data: &[T], what: &str) -> Option<Dev<T>> {
        if self.mode() == Mode::Capture {
            self.abandon(&format!("{what} uploaded during a capture"));
            return None;
        }
        if data.is_empty() {
            // SAFETY: a view of zero elements is never read or written.
            return Some(unsafe { Dev::view(&self.stream, 0, 0) });
        }
        match self.stream.clone_htod(data) {
            Ok(s) => Some(Dev::owned(s)),
            Err(e) => {
                self.record(failed(what, e));
                None
            }
        }
    }

    /// `x` as a buffer this step may write: itself when no one else holds it, else a copy.
    pub(super) fn own<'a>(&self, x: &'a mut Arc<Dev<f32>>) -> Option<&'a mut Dev<f32>> {
        if Arc::get_mut(x).is_none() {
            let copy = self.tmp::<f32>(x.len(), "copy before writing")?;
            self.dtod(copy.ptr(), x.ptr(), x.len() * 4);
            *x = Arc::new(copy);
        }
        Arc::get_mut(x)
    }

    /// A device-to-device copy in the step (captured into its graph; skipped when the step
    /// is replayed).
    pub(super) fn dtod(&self, dst: u64, src: u64, bytes: usize) {
        if bytes == 0 || !self.note("memcpy", &[&[dst, src, bytes as u64]]) {
            return;
        }
        // SAFETY: the callers' buffers hold `bytes` at both addresses.
        let r = unsafe {
            cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream())
        };
        self.check("device copy", r);
    }

    /// Work that must precede the step's kernels but not be part of its graph: queued
    /// while capturing, done now otherwise (a replayed step launches its graph last).
    pub(super) fn before_step(&self, pre: Pre) {
        if self.mode() == Mode::Capture {
            self.steps().pre.push(pre);
            return;
        }
        self.run_pre(pre);
    }

    pub(super) fn run_pre(&self, pre: Pre) {
        let r = match &pre {
            // SAFETY: the destinations are device tables and blocks sized for the copies
            // (see `table_of` and `grow` in `kv`); pageable host data is staged by the
            // driver before the call returns.
            Pre::Htod { dst, data } => unsafe {
                cudarc::driver::result::memcpy_htod_async(*dst, data, self.stream.cu_stream())
            },
            Pre::Dtod { dst, src, bytes } => unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    *dst,
                    *src,
                    *bytes,
                    self.stream.cu_stream(),
                )
            },
        };
        self.check("cache tables", r);
    }

    /// The f32 slice of a buffer (recording an error for any other kind).
    pub(super) fn f32_of<'a>(&self, b: &'a CudaBuf, op: &str) -> Option<&'a Dev<f32>> {
        match b {
            CudaBuf::F32(s) => Some(s),
            _ => {
                self.record(failed(op, "expected an f32 activation buffer"));
                None
            }
        }
    }

    /// Device memory of its own, kept past the step (block tables). Not while a step is
    /// captured: the capture is given up.
    pub(super) fn alloc_owned<T: DeviceRepr>(&self, n: usize, what: &str) -> Option<CudaSlice<T>> {
        if self.mode() == Mode::Capture {
            self.abandon(&format!("{what} allocated during a capture"));
            return None;
        }
        // SAFETY: every caller writes what it later reads.
        match unsafe { self.stream.alloc::<T>(n.max(1)) } {
            Ok(s) => Some(s),
            Err(e) => {
                let free = self.memory().map(|m| m.0).unwrap_or(0);
                self.record(DeviceError::OutOfMemory {
                    what: format!("{what} ({e})"),
                    bytes: n * std::mem::size_of::<T>(),
                    free,
                });
                None
            }
        }
    }
}

/// Every operation allocates its outputs from the device's stream-ordered pool; by
/// default the pool returns freed memory to the driver at every synchronisation, and the
/// next step maps it again. Keep it instead (it is reused at once).
pub(super) fn keep_freed_memory(ctx: &CudaContext) {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold: u64 = u64::MAX;
    // SAFETY: the context is current on this thread (just created), the pool handle is
    // written by the driver, and the attribute takes a pointer to a u64.
    let r = unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .and_then(|()| {
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut threshold) as *mut u64 as *mut std::ffi::c_void,
                )
                .result()
            })
    };
    if let Err(e) = r {
        tracing::warn!("CUDA memory pool release threshold not set: {e}");
    }
}

/// The size a step region of `size` bytes grows to when `bytes` more did not fit past
/// the `used` ones: twice its size, or a power of two that holds them all.
fn grown(size: usize, used: usize, bytes: usize) -> usize {
    (size * 2).max((used.next_multiple_of(super::step::ALIGN) + bytes).next_power_of_two())
}
