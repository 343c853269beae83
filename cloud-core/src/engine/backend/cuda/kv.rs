//! The paged KV cache in device memory: pools of bf16 blocks drawn from one byte budget
//! ([`crate::engine::paged`]), each sequence's rows of every layer as one table of block
//! addresses (mirrored on the device for the kernels), copy-on-write of shared blocks.
//! A cache that cannot grow is refused with [`DeviceError::CacheFull`] and left as it
//! was.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::step::{Dev, Pre};
use super::{failed, lock, Cuda};
use crate::engine::backend::{DeviceError, KvCacheUsage, KvShape};
use crate::engine::paged::{AllocError, BlockPool, Budget, ChunkSource, PagedRows};

/// Device memory for KV pools (chunks of the paged cache).
pub struct DeviceChunks {
    stream: Arc<CudaStream>,
    /// Set while a step is captured: a chunk allocated then would belong to the graph.
    capturing: Arc<AtomicBool>,
}

/// Why a KV chunk was not allocated while a step was being captured.
const REFUSED_IN_CAPTURE: &str = "not while a step is captured";

impl ChunkSource for DeviceChunks {
    type Chunk = CudaSlice<u8>;

    fn alloc(&self, bytes: usize) -> Result<(CudaSlice<u8>, u64), String> {
        if self.capturing.load(Ordering::Relaxed) {
            return Err(REFUSED_IN_CAPTURE.into());
        }
        // SAFETY: no kernel reads a cache row before it is written (attention reads the
        // rows below each sequence's length, a copy-on-write the rows the source holds),
        // as it must already: a block freed by one sequence goes to the next uncleared.
        // Not clearing a new chunk spares a pass over its memory.
        let chunk = unsafe { self.stream.alloc::<u8>(bytes) }.map_err(|e| e.to_string())?;
        let base = {
            let (ptr, _sync) = chunk.device_ptr(&self.stream);
            ptr
        };
        Ok((chunk, base))
    }
}

pub(super) type Pool = BlockPool<DeviceChunks>;

/// One sequence's paged cache of every layer: one table of blocks for all of them, each
/// block holding `block_rows` positions of every layer in turn (that layer's key rows,
/// then its value rows, none when the values are the keys' columns), and the table
/// mirrored in device memory for the kernels (brought up to date, only where it changed,
/// once a step). A step's room is made once for all its layers
/// ([`Backend::kv_grow`](crate::engine::backend::Backend::kv_grow)), and a layer's
/// attention finds its rows at the layer's offsets in the blocks.
#[derive(Clone)]
pub struct SeqKv {
    shape: KvShape,
    /// `None` before the first rows (the pool, and the budget with it, is made then).
    rows: Option<PagedRows<DeviceChunks>>,
    table: DeviceTable,
}

impl SeqKv {
    pub(super) fn new(shape: KvShape) -> SeqKv {
        SeqKv {
            shape,
            rows: None,
            table: DeviceTable::default(),
        }
    }

    /// The first `keep` positions, sharing the blocks.
    pub(super) fn prefix(&self, keep: usize) -> SeqKv {
        SeqKv {
            shape: self.shape,
            rows: self.rows.as_ref().map(|r| r.prefix(keep)),
            table: DeviceTable::default(),
        }
    }

    /// Positions held.
    pub(super) fn len(&self) -> usize {
        self.rows.as_ref().map_or(0, PagedRows::rows)
    }
}

/// Where a layer's rows lie in a cache's blocks, in bytes (bf16 elements).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct KvLayout {
    pub shape: KvShape,
    pub block_rows: usize,
}

impl KvLayout {
    fn elems(&self) -> crate::engine::backend::KvLayout {
        crate::engine::backend::KvLayout {
            shape: self.shape,
            block_rows: self.block_rows,
        }
    }

    /// Bytes of one position in every layer: the pool's row.
    fn row_bytes(&self) -> usize {
        self.elems().row_elems() * 2
    }

    /// The byte offsets in a block of layer `layer`'s key rows and of its value rows
    /// (the key rows' when the values are the keys' columns).
    pub fn offsets(&self, layer: usize) -> (u64, u64) {
        let (k, v) = self.elems().offsets(layer);
        (2 * k as u64, 2 * v as u64)
    }
}

/// The device copy of a block table (a clone starts without one: it may diverge).
#[derive(Default)]
struct DeviceTable {
    buf: Option<CudaSlice<u64>>,
    mirror: Vec<u64>,
    /// The rows' [`PagedRows::edits`] when the mirror was last brought up to date, and
    /// the table's device address.
    synced: Option<(u64, u64)>,
}

impl Clone for DeviceTable {
    fn clone(&self) -> Self {
        DeviceTable::default()
    }
}

/// What a step's [`Cuda::kv_grow_step`] leaves for its layers' attention: the caches it
/// grew (by address), their layout, and the step's attention metadata in device memory
/// (see the kernels: each sequence's block table, cache length before the step and first
/// row), the same for every layer.
pub(super) struct KvStep {
    pub caches: Vec<usize>,
    pub lens: Vec<usize>,
    pub layout: KvLayout,
    pub meta: Dev<u64>,
}

impl Cuda {
    /// The paged cache's memory: `None` before its first row (the budget is set then).
    pub(super) fn kv_cache_usage(&self) -> Option<KvCacheUsage> {
        let mut u = KvCacheUsage {
            limit_bytes: lock(&self.budget).as_ref()?.limit(),
            ..KvCacheUsage::default()
        };
        crate::engine::paged::add_usage(&mut u, lock(&self.pools).values());
        Some(u)
    }

    /// The pool of the blocks of caches whose position takes `row_bytes` in all layers.
    pub(super) fn pool(&self, row_bytes: usize) -> Option<Arc<Pool>> {
        let budget = {
            let mut b = lock(&self.budget);
            if b.is_none() {
                let limit = match self.opts.kv_cache_bytes {
                    Some(n) => n,
                    None => {
                        let free = self.memory().map(|m| m.0).unwrap_or(0);
                        (free.saturating_sub(self.opts.reserve) as f64 * 0.9) as usize
                    }
                };
                tracing::info!(
                    "KV cache budget: {:.2} GiB",
                    limit as f64 / (1u64 << 30) as f64
                );
                *b = Some(Budget::new(limit));
            }
            b.clone()?
        };
        let mut pools = lock(&self.pools);
        Some(
            pools
                .entry(row_bytes)
                .or_insert_with(|| {
                    BlockPool::new(
                        DeviceChunks {
                            stream: self.stream.clone(),
                            capturing: self.capturing.clone(),
                        },
                        budget,
                        self.opts.block_rows,
                        row_bytes,
                        self.opts.chunk_bytes / (self.block_rows() * row_bytes).max(1),
                    )
                })
                .clone(),
        )
    }

    /// Positions per KV block.
    pub(super) fn block_rows(&self) -> usize {
        self.opts.block_rows.max(1)
    }

    /// [`Backend::kv_grow`](crate::engine::backend::Backend::kv_grow): room in every
    /// layer of each cache for its rows of the step (copy-on-write of shared blocks
    /// queued before the step), each cache's device table brought up to date, and the
    /// step's attention metadata uploaded once for all its layers.
    pub(super) fn kv_grow_step(&self, caches: &mut [&mut SeqKv], lens: &[usize]) {
        *self.kv_step() = None;
        if self.errored() {
            return;
        }
        let Some(shape) = caches.first().map(|c| c.shape) else {
            return;
        };
        if caches.len() != lens.len() {
            let why = format!("{} caches for {} sequences", caches.len(), lens.len());
            return self.record(failed("kv_grow", why));
        }
        if let Some(other) = caches.iter().find(|c| c.shape != shape) {
            let why = format!(
                "caches of two shapes in one step: {shape:?} and {:?}",
                other.shape
            );
            return self.record(failed("kv_grow", why));
        }
        let layout = KvLayout {
            shape,
            block_rows: self.block_rows(),
        };
        let n = caches.len();
        let mut meta = vec![0u64; 3 * n + 1];
        let mut row0 = 0;
        for (i, (kv, &len)) in caches.iter_mut().zip(lens).enumerate() {
            let pos0 = kv.len();
            let Some(table) = self.grow(kv, layout, len) else {
                return;
            };
            meta[i] = table;
            meta[n + i] = pos0 as u64;
            meta[2 * n + i] = row0 as u64;
            row0 += len;
        }
        meta[3 * n] = row0 as u64;
        let Some(meta) = self.meta(&meta, "attention metadata") else {
            return;
        };
        *self.kv_step() = Some(KvStep {
            caches: caches
                .iter()
                .map(|c| &**c as *const SeqKv as usize)
                .collect(),
            lens: lens.to_vec(),
            layout,
            meta,
        });
    }

    /// Makes room for `n` more positions in every layer of `kv` (its pool is made with
    /// its first rows), queues the copy-on-write copies, and returns the address of its
    /// device table.
    fn grow(&self, kv: &mut SeqKv, layout: KvLayout, n: usize) -> Option<u64> {
        if kv.rows.is_none() {
            let pool = self.pool(layout.row_bytes())?;
            kv.rows = Some(PagedRows::new(pool));
        }
        let rows = kv.rows.as_mut()?;
        let copies = match rows.reserve(n) {
            Ok(x) => x,
            Err(AllocError::Full(f)) => {
                self.record(DeviceError::CacheFull(f));
                return None;
            }
            Err(AllocError::Device { message, .. }) if message == REFUSED_IN_CAPTURE => {
                self.abandon("a new KV cache chunk is wanted during the capture");
                return None;
            }
            Err(AllocError::Device { bytes, message }) => {
                let free = self.memory().map(|m| m.0).unwrap_or(0);
                self.record(DeviceError::OutOfMemory {
                    what: format!("a KV cache chunk ({message})"),
                    bytes,
                    free,
                });
                return None;
            }
        };
        let block_bytes = rows.pool().block_bytes();
        for cp in copies {
            // The whole block: the positions it holds, of every layer.
            self.before_step(Pre::Dtod {
                dst: cp.to,
                src: cp.from,
                bytes: block_bytes,
            });
        }
        self.table_of(kv)
    }

    /// The device address of a cache's block table, uploading what changed since its last
    /// use (new blocks, a block replaced by its private copy).
    fn table_of(&self, kv: &mut SeqKv) -> Option<u64> {
        let (Some(rows), t) = (kv.rows.as_ref(), &mut kv.table) else {
            self.record(failed("kv_grow", "a cache without rows"));
            return None;
        };
        // Most steps change no cache's blocks (a block holds 16 positions): nothing to
        // compare or upload.
        if let Some((edits, base)) = t.synced {
            if edits == rows.edits() {
                return Some(base);
            }
        }
        let len = rows.block_addrs().len();
        let fits = t.buf.as_ref().is_some_and(|b| b.len() >= len);
        // What changed: compare in place.
        let same = if fits {
            t.mirror
                .iter()
                .zip(rows.block_addrs())
                .take_while(|(a, b)| **a == *b)
                .count()
        } else {
            let cap = len.next_power_of_two().max(16);
            t.buf = Some(self.alloc_owned::<u64>(cap, "block table")?);
            0
        };
        let base = t.buf.as_ref()?.device_ptr(&self.stream).0;
        if same < len || t.mirror.len() != len {
            t.mirror.truncate(same);
            t.mirror.extend(rows.block_addrs().skip(same));
            if same < len {
                let data: Vec<u8> = t.mirror[same..]
                    .iter()
                    .flat_map(|a| a.to_le_bytes())
                    .collect();
                self.before_step(Pre::Htod {
                    dst: base + 8 * same as u64,
                    data,
                });
            }
        }
        t.synced = Some((rows.edits(), base));
        Some(base)
    }

    /// What the step's [`Cuda::kv_grow_step`] left.
    pub(super) fn kv_step(&self) -> std::sync::MutexGuard<'_, Option<KvStep>> {
        lock(&self.kv_step)
    }
}
