//! The CPU backend's paged KV cache: pools of f32 (or bf16) blocks in host memory drawn
//! from one byte budget ([`crate::engine::paged`]), laid out as the CUDA backend's
//! ([`KvLayout`]: a block holds `block_rows` positions of every layer). A prefix of a
//! cache shares its blocks, so a cached system prompt is held once however many
//! sequences start from it; a cache that cannot grow within the budget is refused with
//! [`DeviceError::CacheFull`] and left as it was, and the server goes on serving the
//! sequences that fit, where an unbounded cache would have the host kill the process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use half::bf16;

use crate::engine::backend::{DeviceError, KvCacheUsage, KvLayout, KvShape};
use crate::engine::paged::{AllocError, BlockPool, Budget, ChunkSource, PagedRows};

/// The CPU backend's KV cache settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvOptions {
    /// Bytes the cache may take; `None`: half of the host memory available (to this
    /// process's control group, where it has a limit) when the first row is written, once
    /// the weights are loaded.
    pub cache_bytes: Option<usize>,
    /// Positions per block.
    pub block_rows: usize,
    /// The least bytes a pool allocates at once (its first chunk; later ones grow).
    pub chunk_bytes: usize,
    /// Keys and values rounded to bf16 as they are written (half the memory, the CUDA
    /// backend's rounding), or kept as computed.
    pub bf16: bool,
}

impl Default for KvOptions {
    fn default() -> Self {
        KvOptions {
            cache_bytes: None,
            block_rows: 16,
            chunk_bytes: 4 << 20,
            bf16: false,
        }
    }
}

/// A value of the cache: f32, or bf16 (widened as attention reads it).
pub(super) trait KvElem: super::Elem + Default + 'static {
    fn from_f32(v: f32) -> Self;
    fn layer(rows: PagedLayer<'_, Self>) -> LayerRows<'_>;
}

impl KvElem for f32 {
    fn from_f32(v: f32) -> f32 {
        v
    }
    fn layer(rows: PagedLayer<'_, f32>) -> LayerRows<'_> {
        LayerRows::F32(rows)
    }
}

impl KvElem for bf16 {
    fn from_f32(v: f32) -> bf16 {
        bf16::from_f32(v)
    }
    fn layer(rows: PagedLayer<'_, bf16>) -> LayerRows<'_> {
        LayerRows::Bf16(rows)
    }
}

/// Host memory for the pools: chunks of values, the address of a block the chunk's
/// number above [`OFFSET_BITS`] and its byte offset below.
pub(super) struct HostChunks<T>(Arc<Mutex<Vec<Box<[T]>>>>);

impl<T> Clone for HostChunks<T> {
    fn clone(&self) -> Self {
        HostChunks(self.0.clone())
    }
}

impl<T> Default for HostChunks<T> {
    fn default() -> Self {
        HostChunks(Arc::default())
    }
}

/// Bits of a block address that hold its byte offset in its chunk.
const OFFSET_BITS: u32 = 40;

impl<T: KvElem> ChunkSource for HostChunks<T> {
    // The chunks live in the list, as long as the backend.
    type Chunk = ();

    fn alloc(&self, bytes: usize) -> Result<((), u64), String> {
        let n = bytes / std::mem::size_of::<T>();
        let mut v = Vec::new();
        v.try_reserve_exact(n)
            .map_err(|e| format!("host memory: {e}"))?;
        v.resize(n, T::default());
        let mut chunks = lock(&self.0);
        let at = (chunks.len() as u64) << OFFSET_BITS;
        chunks.push(v.into_boxed_slice());
        Ok(((), at))
    }
}

/// A block's chunk and the offset of its first value (of `T`) there.
fn place<T>(addr: u64) -> (usize, usize) {
    (
        (addr >> OFFSET_BITS) as usize,
        (addr & ((1 << OFFSET_BITS) - 1)) as usize / std::mem::size_of::<T>(),
    )
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its data whole (a push, a copy of rows).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

type Pool<T> = BlockPool<HostChunks<T>>;

/// One sequence's rows, of the cache's value type.
#[derive(Clone)]
enum Rows {
    F32(PagedRows<HostChunks<f32>>),
    Bf16(PagedRows<HostChunks<bf16>>),
}

/// `body` with `$r` bound to the rows of either type.
macro_rules! either {
    ($rows:expr, $r:ident => $body:expr) => {
        match $rows {
            Rows::F32($r) => $body,
            Rows::Bf16($r) => $body,
        }
    };
}

/// What every clone of one [`super::Cpu`] shares of the KV cache: its memory, pools,
/// budget, and the first error of a step.
#[derive(Default)]
pub(super) struct Store {
    chunks: HostChunks<f32>,
    chunks_bf16: HostChunks<bf16>,
    budget: Mutex<Option<Arc<Budget>>>,
    /// By row size (caches of one shape share a pool).
    pools: Mutex<HashMap<usize, Arc<Pool<f32>>>>,
    pools_bf16: Mutex<HashMap<usize, Arc<Pool<bf16>>>>,
    error: Mutex<Option<DeviceError>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("budget", &lock(&self.budget).as_ref().map(|b| b.limit()))
            .finish_non_exhaustive()
    }
}

/// One sequence's cache on the host: one table of blocks for all its layers.
#[derive(Clone)]
pub struct CpuKv {
    shape: KvShape,
    /// `None` before the first rows (the pool is found then).
    rows: Option<Rows>,
    /// The positions the last [`Store::grow`] made room for, until the last layer's
    /// attention has written them.
    room: Option<usize>,
}

impl std::fmt::Debug for CpuKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuKv")
            .field("shape", &self.shape)
            .field("positions", &self.len())
            .finish()
    }
}

impl CpuKv {
    pub(super) fn new(shape: KvShape) -> CpuKv {
        CpuKv {
            shape,
            rows: None,
            room: None,
        }
    }

    /// The first `keep` positions, sharing the blocks.
    pub(super) fn prefix(&self, keep: usize) -> CpuKv {
        CpuKv {
            shape: self.shape,
            rows: self.rows.as_ref().map(|rows| match rows {
                Rows::F32(r) => Rows::F32(r.prefix(keep)),
                Rows::Bf16(r) => Rows::Bf16(r.prefix(keep)),
            }),
            room: None,
        }
    }

    /// Positions held (those [`Store::grow`] made room for included).
    pub(super) fn len(&self) -> usize {
        self.rows
            .as_ref()
            .map_or(0, |rows| either!(rows, r => r.rows()))
    }

    pub(super) fn shape(&self) -> KvShape {
        self.shape
    }
}

impl Store {
    /// Records the first error of a step.
    pub(super) fn record(&self, e: DeviceError) {
        lock(&self.error).get_or_insert(e);
    }

    pub(super) fn errored(&self) -> bool {
        lock(&self.error).is_some()
    }

    pub(super) fn take_error(&self) -> Option<DeviceError> {
        lock(&self.error).take()
    }

    /// The memory of the cache, once it has a budget (at its first row).
    pub(super) fn usage(&self) -> Option<KvCacheUsage> {
        let mut u = KvCacheUsage {
            limit_bytes: lock(&self.budget).as_ref()?.limit(),
            ..KvCacheUsage::default()
        };
        crate::engine::paged::add_usage(&mut u, lock(&self.pools).values());
        crate::engine::paged::add_usage(&mut u, lock(&self.pools_bf16).values());
        Some(u)
    }

    /// The pool of the blocks of caches whose position takes `row_bytes` in all layers
    /// (the budget is set with the first).
    fn pool<T: KvElem>(
        &self,
        opts: &KvOptions,
        row_bytes: usize,
        pools: &Mutex<HashMap<usize, Arc<Pool<T>>>>,
        chunks: &HostChunks<T>,
    ) -> Arc<Pool<T>> {
        let budget = lock(&self.budget)
            .get_or_insert_with(|| {
                let limit = opts.cache_bytes.unwrap_or_else(|| match host_available() {
                    Some(free) => free / 2,
                    None => {
                        tracing::warn!(
                            "the host's available memory is unknown: the KV cache is not bounded"
                        );
                        usize::MAX
                    }
                });
                tracing::info!(
                    "KV cache budget: {:.2} GiB of host memory",
                    limit as f64 / (1u64 << 30) as f64
                );
                Budget::new(limit)
            })
            .clone();
        let block_rows = opts.block_rows.max(1);
        lock(pools)
            .entry(row_bytes)
            .or_insert_with(|| {
                BlockPool::new(
                    chunks.clone(),
                    budget,
                    block_rows,
                    row_bytes,
                    opts.chunk_bytes / (block_rows * row_bytes).max(1),
                )
            })
            .clone()
    }

    /// Room for `lens[s]` more positions in every layer of `caches[s]`; shared blocks
    /// about to be written are copied first. Stops at the first cache that does not
    /// fit, recording why (the model puts the caches back as they were).
    pub(super) fn grow(&self, opts: &KvOptions, caches: &mut [&mut CpuKv], lens: &[usize]) {
        if self.errored() {
            return;
        }
        for (kv, &n) in caches.iter_mut().zip(lens) {
            let layout = KvLayout {
                shape: kv.shape,
                block_rows: opts.block_rows.max(1),
            };
            let rows = kv.rows.get_or_insert_with(|| {
                let elems = layout.row_elems();
                if opts.bf16 {
                    let pool = self.pool(opts, elems * 2, &self.pools_bf16, &self.chunks_bf16);
                    Rows::Bf16(PagedRows::new(pool))
                } else {
                    let pool = self.pool(opts, elems * 4, &self.pools, &self.chunks);
                    Rows::F32(PagedRows::new(pool))
                }
            });
            match either!(rows, r => reserve(r, n)) {
                Ok(()) => kv.room = Some(n),
                Err(AllocError::Full(full)) => return self.record(DeviceError::CacheFull(full)),
                Err(AllocError::Device { bytes, message }) => {
                    return self.record(DeviceError::OutOfMemory {
                        what: format!("a KV cache chunk ({message})"),
                        bytes,
                        free: host_available().unwrap_or(0),
                    })
                }
            }
        }
    }

    /// Writes the step's new rows of layer `layer` into each cache (`k`, `v`: `lens[s]`
    /// rows of `kcols`/`vcols` per sequence, in order, their room made by [`Store::grow`])
    /// and calls `attend(s, rows)` with each sequence's rows of the layer, the new ones
    /// included. A cache without that room, or of another shape than `shape`, is refused
    /// (recorded) before anything is written.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn write_and_read(
        &self,
        opts: &KvOptions,
        caches: &mut [&mut CpuKv],
        lens: &[usize],
        layer: usize,
        shape: KvShape,
        k: &[f32],
        v: &[f32],
        mut attend: impl FnMut(usize, LayerRows<'_>),
    ) {
        let refuse = |why: String| {
            self.record(DeviceError::Failed {
                op: "attention".into(),
                message: why,
            })
        };
        if caches.len() != lens.len() {
            return refuse(format!(
                "{} caches for {} sequences",
                caches.len(),
                lens.len()
            ));
        }
        for (kv, &len) in caches.iter().zip(lens) {
            if kv.shape != shape {
                return refuse(format!(
                    "a cache of shape {:?} for rows of {shape:?}",
                    kv.shape
                ));
            }
            if layer >= shape.layers {
                return refuse(format!("layer {layer} of a cache of {}", shape.layers));
            }
            if kv.room != Some(len) {
                return refuse(format!(
                    "{len} rows for a cache with room made for {:?} (kv_grow first)",
                    kv.room
                ));
            }
        }
        let layout = KvLayout {
            shape,
            block_rows: opts.block_rows.max(1),
        };
        let mut at = 0;
        for (s, (kv, &len)) in caches.iter_mut().zip(lens).enumerate() {
            if layer + 1 == shape.layers {
                kv.room = None;
            }
            let Some(rows) = kv.rows.as_ref() else {
                continue;
            };
            let v = &v[(at * layout.kept_vcols()).min(v.len())..];
            let k = &k[at * shape.kcols..];
            either!(rows, r => write_and_view(r, layout, layer, len, k, v, |rows| attend(s, rows)));
            at += len;
        }
    }
}

/// Makes room for `n` more rows, copying a shared last block first.
fn reserve<T: KvElem>(rows: &mut PagedRows<HostChunks<T>>, n: usize) -> Result<(), AllocError> {
    let copies = rows.reserve(n)?;
    let block = rows.pool().block_bytes() / std::mem::size_of::<T>();
    let mut chunks = lock(&rows.pool().source().0);
    for cp in copies {
        // The whole block: the positions it holds, of every layer.
        let ((fc, fo), (tc, to)) = (place::<T>(cp.from), place::<T>(cp.to));
        if fc == tc {
            chunks[fc].copy_within(fo..fo + block, to);
        } else if let Ok([from, into]) = chunks.get_disjoint_mut([fc, tc]) {
            into[to..to + block].copy_from_slice(&from[fo..fo + block]);
        }
    }
    Ok(())
}

/// Writes the last `len` rows of `rows` in layer `layer` from the first `len` rows of
/// `k` and `v` (rounded to `T`), and calls `attend` with the layer's rows.
fn write_and_view<T: KvElem>(
    rows: &PagedRows<HostChunks<T>>,
    layout: KvLayout,
    layer: usize,
    len: usize,
    k: &[f32],
    v: &[f32],
    attend: impl FnOnce(LayerRows<'_>),
) {
    let (kc, vc) = (layout.shape.kcols, layout.kept_vcols());
    let (koff, voff) = layout.offsets(layer);
    let br = layout.block_rows;
    let mut chunks = lock(&rows.pool().source().0);
    let blocks: Vec<(usize, usize)> = rows.block_addrs().map(place::<T>).collect();
    let put = |dst: &mut [T], src: &[f32]| {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = T::from_f32(*s);
        }
    };
    for (i, p) in (rows.rows() - len..rows.rows()).enumerate() {
        let (c, base) = blocks[p / br];
        let row = p % br;
        let kd = base + koff + row * kc;
        put(&mut chunks[c][kd..kd + kc], &k[i * kc..(i + 1) * kc]);
        if vc > 0 {
            let vd = base + voff + row * vc;
            put(&mut chunks[c][vd..vd + vc], &v[i * vc..(i + 1) * vc]);
        }
    }
    attend(T::layer(PagedLayer {
        chunks: &chunks,
        blocks,
        block_rows: br,
        key_offset: koff,
        value_offset: voff,
        kcols: kc,
        value_stride: if vc > 0 { vc } else { kc },
        positions: rows.rows(),
    }));
}

/// One layer's rows of a paged cache, of either value type.
pub(super) enum LayerRows<'a> {
    F32(PagedLayer<'a, f32>),
    Bf16(PagedLayer<'a, bf16>),
}

/// Rows of keys and values, in runs of consecutive positions, for attention to read.
pub(super) trait KvRows: Sync {
    /// The values' type.
    type E: super::Elem;
    /// Positions held.
    fn positions(&self) -> usize;
    /// The key rows of positions `j..` up to `end` or the end of `j`'s run, whichever
    /// comes first: at least one whole row of [`KvRows::key_stride`] values.
    fn keys(&self, j: usize, end: usize) -> &[Self::E];
    /// Values in a key row.
    fn key_stride(&self) -> usize;
    /// The value rows of positions `j..`, as [`KvRows::keys`].
    fn values(&self, j: usize, end: usize) -> &[Self::E];
    /// Values in a value row (a key row's when the values are the keys' columns).
    fn value_stride(&self) -> usize;
}

/// Rows one after another in two slices: keys `[T, key_stride]`, values
/// `[T, value_stride]`.
pub(super) struct Contiguous<'a, E = f32> {
    pub k: &'a [E],
    pub v: &'a [E],
    pub key_stride: usize,
    pub value_stride: usize,
}

impl<E: super::Elem> KvRows for Contiguous<'_, E> {
    type E = E;
    fn positions(&self) -> usize {
        self.k.len() / self.key_stride.max(1)
    }
    fn keys(&self, j: usize, end: usize) -> &[E] {
        &self.k[j * self.key_stride..end * self.key_stride]
    }
    fn key_stride(&self) -> usize {
        self.key_stride
    }
    fn values(&self, j: usize, end: usize) -> &[E] {
        &self.v[j * self.value_stride..end * self.value_stride]
    }
    fn value_stride(&self) -> usize {
        self.value_stride
    }
}

/// One layer's rows of a paged cache.
pub(super) struct PagedLayer<'a, T> {
    chunks: &'a [Box<[T]>],
    /// Each block's chunk and first value.
    blocks: Vec<(usize, usize)>,
    block_rows: usize,
    key_offset: usize,
    value_offset: usize,
    kcols: usize,
    value_stride: usize,
    positions: usize,
}

impl<T> PagedLayer<'_, T> {
    fn run(&self, j: usize, end: usize, offset: usize, stride: usize) -> &[T] {
        let (b, row) = (j / self.block_rows, j % self.block_rows);
        let n = (end.min((b + 1) * self.block_rows))
            .saturating_sub(j)
            .max(1);
        let (c, base) = self.blocks[b];
        let from = base + offset + row * stride;
        &self.chunks[c][from..from + n * stride]
    }
}

impl<T: KvElem> KvRows for PagedLayer<'_, T> {
    type E = T;
    fn positions(&self) -> usize {
        self.positions
    }
    fn keys(&self, j: usize, end: usize) -> &[T] {
        self.run(j, end, self.key_offset, self.kcols)
    }
    fn key_stride(&self) -> usize {
        self.kcols
    }
    fn values(&self, j: usize, end: usize) -> &[T] {
        self.run(j, end, self.value_offset, self.value_stride)
    }
    fn value_stride(&self) -> usize {
        self.value_stride
    }
}

/// Bytes of memory the host can still give this process: the kernel's estimate of
/// available memory, within what its control group (cgroup v2) still allows. `None`
/// where neither can be read (not Linux).
pub fn host_available() -> Option<usize> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    available(
        read("/proc/meminfo").as_deref(),
        read("/sys/fs/cgroup/memory.max").as_deref(),
        read("/sys/fs/cgroup/memory.current").as_deref(),
    )
}

/// [`host_available`] from the text of `/proc/meminfo` and of the group's `memory.max`
/// and `memory.current`.
fn available(meminfo: Option<&str>, max: Option<&str>, current: Option<&str>) -> Option<usize> {
    let from_meminfo = meminfo.and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .map(|kib| kib.saturating_mul(1024))
    });
    let bytes = |s: Option<&str>| s.and_then(|s| s.trim().parse::<usize>().ok());
    // "max" (no limit) does not parse: no bound from the group.
    let from_group = bytes(max).map(|max| max.saturating_sub(bytes(current).unwrap_or(0)));
    match (from_meminfo, from_group) {
        (Some(a), Some(g)) => Some(a.min(g)),
        (a, g) => a.or(g),
    }
}

#[cfg(test)]
mod tests {
    use super::available;

    #[test]
    fn available_memory_is_the_kernels_within_the_groups_limit() {
        let meminfo =
            "MemTotal:       24000000 kB\nMemFree:  1000 kB\nMemAvailable:   20000000 kB\n";
        let gib = |g: usize| g << 30;
        assert_eq!(
            available(Some(meminfo), None, None),
            Some(20_000_000 * 1024)
        );
        assert_eq!(
            available(Some(meminfo), Some("max\n"), Some("5\n")),
            Some(20_000_000 * 1024)
        );
        let (max, used) = (gib(8).to_string(), gib(3).to_string());
        assert_eq!(
            available(Some(meminfo), Some(&max), Some(&used)),
            Some(gib(5))
        );
        assert_eq!(available(None, Some(&max), None), Some(gib(8)));
        assert_eq!(available(Some("MemTotal: 5 kB"), None, None), None);
        assert_eq!(available(None, None, None), None);
    }
}
