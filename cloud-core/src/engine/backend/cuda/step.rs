//! Decode steps as CUDA graphs, and the memory every step's operations draw on.
//!
//! A decode step (every sequence of the batch one new token) is a few hundred kernel
//! launches and GEMMs whose shapes depend only on the number of sequences. Launched one by
//! one they cost more host time than the GPU needs to run them at small batches, so the
//! backend captures the step of each batch size into a CUDA graph the second time it
//! sees that size (the first run is eager, and creates what the step needs once: KV
//! pools, expert tables, cuBLAS's state), and replays the graph from then on:
//!
//! - Every buffer of a graphed step is a view of one **arena**, bump-allocated from its
//!   start in the order the operations ask, so a step of the same size has the same
//!   addresses every time ([`Dev`]).
//! - What changes from step to step — token ids, positions, the attention metadata (block
//!   tables, cache lengths) — is never a kernel parameter: operations write it into a
//!   host **staging** area mirrored by a device region, uploaded by one copy just before
//!   the graph runs. Kernels read it from there.
//! - Work the graph must not hold — updates of the caches' device block tables,
//!   copy-on-write copies of shared KV blocks — runs before the graph is launched
//!   (queued while capturing, at once while replaying, when nothing has been launched
//!   yet). Anything that would allocate device memory during a capture (a new KV chunk, a
//!   bigger block table) abandons the capture: the step is run again eagerly.
//! - A replayed step runs the same host code with every launch skipped and hashes what it
//!   would have launched (kernels, grids, arguments, GEMM shapes and addresses). When the
//!   hash differs from the capture's, the graph is not launched, the step's results are
//!   discarded and the step is run again eagerly: a graph never runs work it was not
//!   captured from.

use std::collections::{HashMap, HashSet};
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use std::sync::atomic::Ordering;

use cudarc::driver::{CudaGraph, CudaSlice, CudaStream, DevicePtr};

use super::{lock, Cuda};
use crate::engine::backend::DeviceError;

/// Alignment of arena and staging allocations (cuBLAS wants 16 bytes, 256 is what
/// `cudaMalloc` gives).
pub const ALIGN: usize = 256;

/// Device memory of a buffer: owned (freed in stream order on drop) or a view of the
/// step arena (nothing to free: the arena is reused by the next step).
pub struct Dev<T> {
    slice: ManuallyDrop<CudaSlice<T>>,
    view: bool,
}

impl<T> Dev<T> {
    /// Owned memory.
    pub fn owned(slice: CudaSlice<T>) -> Dev<T> {
        Dev {
            slice: ManuallyDrop::new(slice),
            view: false,
        }
    }

    /// A view of `len` elements at `ptr`, which must stay allocated while it is used.
    ///
    /// # Safety
    /// `ptr` holds `len` elements of `T` for as long as the view is used.
    pub unsafe fn view(stream: &Arc<CudaStream>, ptr: u64, len: usize) -> Dev<T> {
        Dev {
            // SAFETY: the caller vouches for the memory; the view never frees it.
            slice: ManuallyDrop::new(unsafe { stream.upgrade_device_ptr::<T>(ptr, len) }),
            view: true,
        }
    }

    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.slice.device_ptr(self.slice.stream()).0
    }
}

impl<T> Deref for Dev<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.slice
    }
}

impl<T> DerefMut for Dev<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.slice
    }
}

impl<T> Drop for Dev<T> {
    fn drop(&mut self) {
        // SAFETY: the slice is taken or dropped exactly once, here.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        if self.view {
            slice.leak();
        } else {
            drop(slice);
        }
    }
}

/// A kernel argument as the kernel reads it: a device address or a scalar, in one 64-bit
/// word (a 4-byte parameter is read from the word's low half).
pub trait KArg {
    /// The word.
    fn word(&self) -> u64;
}

impl KArg for i32 {
    fn word(&self) -> u64 {
        u64::from(*self as u32)
    }
}
impl KArg for u32 {
    fn word(&self) -> u64 {
        u64::from(*self)
    }
}
impl KArg for i64 {
    fn word(&self) -> u64 {
        *self as u64
    }
}
impl KArg for u64 {
    fn word(&self) -> u64 {
        *self
    }
}
impl KArg for f32 {
    fn word(&self) -> u64 {
        u64::from(self.to_bits())
    }
}
impl<T> KArg for CudaSlice<T> {
    fn word(&self) -> u64 {
        self.device_ptr(self.stream()).0
    }
}
impl<T> KArg for Dev<T> {
    fn word(&self) -> u64 {
        self.ptr()
    }
}
impl<T: KArg + ?Sized> KArg for &T {
    fn word(&self) -> u64 {
        (**self).word()
    }
}
impl<T: KArg + ?Sized> KArg for &mut T {
    fn word(&self) -> u64 {
        (**self).word()
    }
}

/// The fingerprint of a step's work: a multiplicative mix of its 64-bit words, one
/// multiply per word (the host computes it for every operation of every replayed step,
/// so it is kept cheap; it guards against a step that differs from its capture by
/// mistake, not against an adversary).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sig(u64);

impl Default for Sig {
    fn default() -> Self {
        Sig(0xcbf2_9ce4_8422_2325)
    }
}

impl Sig {
    /// Adds one word.
    fn mix(&mut self, w: u64) {
        let h = (self.0 ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = h ^ (h >> 29);
    }

    /// Adds words.
    pub fn add(&mut self, words: &[u64]) {
        for &w in words {
            self.mix(w);
        }
    }

    /// Adds a name (eight bytes a word, then its length).
    pub fn add_str(&mut self, s: &str) {
        for chunk in s.as_bytes().chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(w));
        }
        self.mix(s.len() as u64);
    }
}

/// What a step is, for its graph: how many sequences (each one new row) and which
/// outputs it produces.
pub type StepKey = (usize, u8);

/// How the operations of the step in progress run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    /// Launched one by one, with memory from the stream's pool.
    #[default]
    Eager,
    /// Recorded into a graph (nothing runs until the graph is launched).
    Capture,
    /// Launched by replaying a graph: the operations only check they are the captured
    /// ones and stage their metadata.
    Replay,
    /// The graph was launched and the step's results are being read back.
    Flushed,
}

/// Work to do before the graph runs.
pub enum Pre {
    /// Host bytes to a device address.
    Htod { dst: u64, data: Vec<u8> },
    /// A device-to-device copy.
    Dtod { dst: u64, src: u64, bytes: usize },
}

/// A captured step.
pub struct Captured {
    pub graph: CudaGraph,
    pub sig: Sig,
}

// SAFETY: a graph may be used from any thread as long as no two use it at once; every
// use is under the backend's `Steps` lock.
unsafe impl Send for Captured {}

pub use crate::engine::backend::GraphStats;

/// One bump region of device memory, views handed out from its start every step.
pub struct Region {
    pub mem: CudaSlice<u8>,
    pub base: u64,
    pub size: usize,
    pub used: usize,
}

impl Region {
    /// The next `bytes` (aligned), or `None` when the region is spent.
    pub fn take(&mut self, bytes: usize) -> Option<u64> {
        let at = self.used.next_multiple_of(ALIGN);
        let end = at.checked_add(bytes.max(1))?;
        if end > self.size {
            return None;
        }
        self.used = end;
        Some(self.base + at as u64)
    }
}

/// The graph machinery's state.
#[derive(Default)]
pub struct Steps {
    pub mode: Mode,
    pub key: Option<StepKey>,
    /// Graphs by step shape; `never`: shapes that cannot be captured.
    pub graphs: HashMap<StepKey, Captured>,
    pub seen: HashSet<StepKey>,
    pub never: HashSet<StepKey>,
    /// Activations of graphed steps.
    pub arena: Option<Region>,
    /// The device side of the staging area, and its host side.
    pub staged: Option<Region>,
    pub staging: Vec<u8>,
    /// Sizes to allocate at the next step (after a region ran out).
    pub want_arena: usize,
    pub want_staged: usize,
    /// The fingerprint of the step so far.
    pub sig: Sig,
    /// Work queued for before the graph (while capturing).
    pub pre: Vec<Pre>,
    /// Why the step's capture or replay was given up.
    pub abandoned: Option<String>,
    /// Operations issued after the graph was launched (the step read results back in
    /// its middle: not a step a graph can hold).
    pub after_flush: bool,
    /// The step is a decode step (every sequence one new row), graphed or not.
    pub decode: bool,
    /// When the step started.
    pub began: Option<std::time::Instant>,
    pub stats: GraphStats,
}

impl Steps {
    /// Whether operations take their memory from the arena and stage their metadata.
    pub fn graphed(&self) -> bool {
        matches!(self.mode, Mode::Capture | Mode::Replay)
    }

    /// Gives up the step's capture or replay (the step will be run again eagerly).
    pub fn abandon(&mut self, why: impl Into<String>) {
        if self.abandoned.is_none() {
            let why = why.into();
            tracing::debug!("CUDA graph of step {:?} abandoned: {why}", self.key);
            self.abandoned = Some(why);
        }
    }
}

/// The most sequences a captured step holds.
const MAX_GRAPH_BATCH: usize = 512;

impl Cuda {
    /// How steps ran so far: captured, replayed, eager, abandoned.
    pub fn graph_stats(&self) -> GraphStats {
        self.steps().stats
    }

    /// Notes an operation (its name and words) in the step's fingerprint; `false` when
    /// it must not be issued (the step is being replayed).
    pub(super) fn note(&self, what: &str, words: &[&[u64]]) -> bool {
        let mut st = self.steps();
        match st.mode {
            Mode::Eager | Mode::Flushed => {
                if st.mode == Mode::Flushed {
                    st.after_flush = true;
                }
                drop(st);
                self.mark(what);
                true
            }
            Mode::Capture | Mode::Replay => {
                st.sig.add_str(what);
                for w in words {
                    st.sig.add(w);
                }
                st.mode == Mode::Capture
            }
        }
    }

    /// Makes the arena and the staging area at least as large as the last step wanted
    /// (a new one invalidates every graph, which point into the old) and empties them.
    fn regions(&self, st: &mut Steps) -> Result<(), DeviceError> {
        let make = |want: usize, have: Option<&Region>, base: usize| {
            let size = want.max(have.map_or(base, |r| r.size)).max(base);
            (have.is_none_or(|r| r.size < size)).then_some(size)
        };
        let (arena, staged) = self.opts.graph_memory;
        let new_arena = make(st.want_arena, st.arena.as_ref(), arena.max(ALIGN));
        let new_staged = make(st.want_staged, st.staged.as_ref(), staged.max(ALIGN));
        if new_arena.is_some() || new_staged.is_some() {
            st.graphs.clear();
        }
        let alloc = |size: usize| -> Result<Region, DeviceError> {
            // SAFETY: the step's kernels write arena memory before reading it; the
            // staging region is written by the upload before the graph runs.
            let mem =
                unsafe { self.stream.alloc::<u8>(size) }.map_err(|e| DeviceError::OutOfMemory {
                    what: format!("the CUDA graph arena ({e})"),
                    bytes: size,
                    free: self.memory().map(|m| m.0).unwrap_or(0),
                })?;
            let base = mem.device_ptr(&self.stream).0;
            Ok(Region {
                mem,
                base,
                size,
                used: 0,
            })
        };
        if let Some(size) = new_arena {
            st.arena = None;
            st.arena = Some(alloc(size)?);
        }
        if let Some(size) = new_staged {
            st.staged = None;
            st.staged = Some(alloc(size)?);
        }
        for r in [st.arena.as_mut(), st.staged.as_mut()]
            .into_iter()
            .flatten()
        {
            r.used = 0;
        }
        Ok(())
    }

    /// Ends a graphed step's recording and launches its graph, after the work that must
    /// precede it and the upload of the staged metadata. `false`: the step has no results
    /// (an error, or its capture or replay was given up). Eager steps: `true`.
    pub(super) fn flush(&self) -> bool {
        let mut st = self.steps();
        let mode = st.mode;
        if !matches!(mode, Mode::Capture | Mode::Replay) {
            return true;
        }
        st.mode = Mode::Flushed;
        // The host's walk of a replayed step: from its start to here, where the upload of
        // what it staged and the graph's launch begin.
        let walked = st.began.map_or(0, |t| t.elapsed().as_nanos() as u64);
        let Some(key) = st.key else {
            return false;
        };
        let mut graph = None;
        if mode == Mode::Capture {
            self.capturing.store(false, Ordering::Relaxed);
            let ended = self
                .stream
                .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
            if self.halted.load(Ordering::Relaxed) {
                return false;
            }
            let err = lock(&self.error).clone();
            match (ended, err) {
                (Ok(Some(g)), None) => graph = Some(g),
                (_, Some(DeviceError::CacheFull(_))) => return false,
                (ended, err) => {
                    // The capture itself may be what failed: no graphs for this shape,
                    // and the step runs again eagerly (where a real error shows again).
                    let why = match (ended, err) {
                        (_, Some(e)) => e.to_string(),
                        (Err(e), None) => e.to_string(),
                        (Ok(_), None) => "the capture recorded nothing".into(),
                    };
                    lock(&self.error).take();
                    // Unless the driver refused a programmatic launch in it (the next
                    // capture launches plainly), the shape's steps run eagerly from now on.
                    if !self.pdl_refused.swap(false, Ordering::Relaxed) {
                        tracing::warn!("CUDA graphs off for {} sequences: {why}", key.0);
                        st.never.insert(key);
                    }
                    st.abandon(why);
                    self.halted.store(true, Ordering::Relaxed);
                    return false;
                }
            }
        } else if self.halted.load(Ordering::Relaxed) || lock(&self.error).is_some() {
            return false;
        }
        for pre in std::mem::take(&mut st.pre) {
            self.run_pre(pre);
        }
        let used = st.staged.as_ref().map_or(0, |r| r.used);
        if used > 0 {
            let base = st.staged.as_ref().map_or(0, |r| r.base);
            // SAFETY: the staging region holds `used` bytes; the host bytes are pageable
            // and copied by the driver before the call returns.
            let r = unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    base,
                    &st.staging[..used],
                    self.stream.cu_stream(),
                )
            };
            self.check("graph metadata", r);
        }
        let launched = match graph {
            Some(g) => {
                let r = g.launch();
                let sig = st.sig;
                st.graphs.insert(key, Captured { graph: g, sig });
                st.stats.captured += 1;
                r
            }
            None => {
                let sig = st.sig;
                let r = st
                    .graphs
                    .get(&key)
                    .filter(|c| c.sig == sig)
                    .map(|c| c.graph.launch());
                match r {
                    Some(r) => {
                        st.stats.replayed += 1;
                        st.stats.replay_host_ns += walked;
                        r
                    }
                    _ => {
                        st.graphs.remove(&key);
                        st.abandon("the step differs from its capture");
                        self.halted.store(true, Ordering::Relaxed);
                        return false;
                    }
                }
            }
        };
        drop(st);
        self.check("graph launch", launched);
        !self.errored()
    }

    /// Starts a step ([`Backend::begin_step`](crate::engine::backend::Backend::begin_step)):
    /// eagerly, or captured into a graph, or replaying one.
    pub(super) fn start_step(&self, lens: &[usize], out: u8, graphs: bool) {
        let mut st = self.steps();
        st.began = Some(std::time::Instant::now());
        st.mode = Mode::Eager;
        st.key = None;
        st.sig = Sig::default();
        st.pre.clear();
        st.abandoned = None;
        st.after_flush = false;
        self.halted.store(false, Ordering::Relaxed);
        let key = (lens.len(), out);
        st.decode = !lens.is_empty() && lens.iter().all(|&l| l == 1);
        let decode = st.decode && lens.len() <= MAX_GRAPH_BATCH;
        let profiling = self.profiling.load(Ordering::Relaxed);
        if !(self.opts.graphs && graphs && decode && !profiling)
            || st.never.contains(&key)
            || self.errored()
        {
            st.stats.eager += 1;
            return;
        }
        // The first step of a shape runs eagerly: it creates what later steps reuse (KV
        // pools and chunks, expert tables, cuBLAS's state).
        if st.seen.insert(key) {
            st.stats.eager += 1;
            return;
        }
        if let Err(e) = self.regions(&mut st) {
            tracing::warn!("CUDA graphs off for {} sequences: {e}", key.0);
            st.never.insert(key);
            st.stats.eager += 1;
            return;
        }
        st.key = Some(key);
        if st.graphs.contains_key(&key) {
            st.mode = Mode::Replay;
            return;
        }
        use cudarc::driver::sys::CUstreamCaptureMode;
        // Thread-local mode: a call of this thread that cannot be captured (a synchronous
        // copy, an allocation) fails instead of being silently left out.
        match self
            .stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        {
            Ok(()) => {
                st.mode = Mode::Capture;
                self.capturing.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!("CUDA graphs off for {} sequences: capture: {e}", key.0);
                st.never.insert(key);
                st.key = None;
                st.stats.eager += 1;
            }
        }
    }

    /// Ends a step ([`Backend::end_step`](crate::engine::backend::Backend::end_step)); `false`:
    /// its results are to be discarded.
    pub(super) fn finish_step(&self) -> bool {
        self.flush();
        // The step's KV metadata (its memory, when the step ran eagerly) goes with it.
        *self.kv_step() = None;
        self.close_profile();
        let mut st = self.steps();
        let mut ok = st.abandoned.is_none();
        if st.after_flush {
            // The step read results back in its middle (and went on): no graph for it.
            if let Some(k) = st.key {
                st.graphs.remove(&k);
                st.never.insert(k);
                ok = false;
            }
        }
        if !ok {
            st.stats.abandoned += 1;
        }
        st.mode = Mode::Eager;
        st.key = None;
        st.pre.clear();
        st.abandoned = None;
        st.after_flush = false;
        self.halted.store(false, Ordering::Relaxed);
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::Sig;

    fn sig(parts: &[(&str, &[u64])]) -> Sig {
        let mut s = Sig::default();
        for (name, words) in parts {
            s.add_str(name);
            s.add(words);
        }
        s
    }

    /// A step's fingerprint changes with any operation's name or word, their order, and
    /// where one name ends and the next begins.
    #[test]
    fn fingerprints_tell_steps_apart() {
        let base = sig(&[("gemv_bf16", &[1, 2, 3]), ("attention_batch", &[4, 5])]);
        assert_eq!(
            base,
            sig(&[("gemv_bf16", &[1, 2, 3]), ("attention_batch", &[4, 5])])
        );
        let others = [
            sig(&[("gemv_bf16", &[1, 2, 4]), ("attention_batch", &[4, 5])]),
            sig(&[("gemv_bf16", &[1, 3, 2]), ("attention_batch", &[4, 5])]),
            sig(&[("attention_batch", &[4, 5]), ("gemv_bf16", &[1, 2, 3])]),
            sig(&[("gemv_bf16_norm", &[1, 2, 3]), ("attention_batch", &[4, 5])]),
            sig(&[("gemv_bf16", &[1, 2, 3]), ("attention_batch", &[4, 5, 0])]),
            sig(&[("gemv_bf16", &[1, 2, 3, 0]), ("attention_batch", &[4, 5])]),
            sig(&[("ab", &[]), ("c", &[])]),
        ];
        for (i, o) in others.iter().enumerate() {
            assert_ne!(base, *o, "variant {i}");
        }
        assert_ne!(
            sig(&[("ab", &[]), ("c", &[])]),
            sig(&[("a", &[]), ("bc", &[])])
        );
        // Every single bit of a word counts.
        for bit in 0..64 {
            assert_ne!(sig(&[("x", &[0])]), sig(&[("x", &[1 << bit])]), "bit {bit}");
        }
    }
}
