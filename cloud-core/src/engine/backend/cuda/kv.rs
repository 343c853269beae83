//! The paged KV cache in device memory: pools of bf16 blocks drawn from one byte budget
//! ([`crate::engine::paged`]), each sequence's rows of a layer as a table of block
//! addresses (mirrored on the device for the kernels), copy-on-write of shared blocks.
//! A cache that cannot grow is refused with [`DeviceError::CacheFull`] and left as it
//! was.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::step::{Dev, Pre};
use super::{failed, lock, per_row, Cuda, CudaBuf};
use crate::engine::backend::{DeviceError, KvCacheUsage};
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

/// One sequence's cache of one layer: bf16 rows of width `cols` in blocks, and the block
/// table mirrored in device memory for the kernels (brought up to date, only where it
/// changed, before each use).
#[derive(Clone)]
pub struct KvRows {
    pub(super) rows: PagedRows<DeviceChunks>,
    pub(super) cols: usize,
    table: DeviceTable,
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

impl KvRows {
    pub(super) fn buf(rows: PagedRows<DeviceChunks>, cols: usize) -> CudaBuf {
        CudaBuf::Paged(KvRows {
            rows,
            cols,
            table: DeviceTable::default(),
        })
    }
}

impl Cuda {
    /// The paged cache's memory: `None` before its first row (the budget is set then).
    pub(super) fn kv_cache_usage(&self) -> Option<KvCacheUsage> {
        let limit_bytes = lock(&self.budget).as_ref()?.limit();
        let (mut held_bytes, mut allocated_bytes, mut allocations) = (0, 0, 0);
        for pool in lock(&self.pools).values() {
            let total = pool.total_blocks();
            held_bytes += total.saturating_sub(pool.free_blocks()) * pool.block_bytes();
            allocated_bytes += total * pool.block_bytes();
            allocations += pool.chunks();
        }
        Some(KvCacheUsage {
            held_bytes,
            allocated_bytes,
            allocations,
            limit_bytes,
        })
    }

    pub(super) fn pool(&self, cols: usize) -> Option<Arc<Pool>> {
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
                .entry(cols)
                .or_insert_with(|| {
                    BlockPool::new(
                        DeviceChunks {
                            stream: self.stream.clone(),
                            capturing: self.capturing.clone(),
                        },
                        budget,
                        self.opts.block_rows,
                        cols * 2,
                        self.opts.blocks_per_chunk,
                    )
                })
                .clone(),
        )
    }

    /// Positions per KV block.
    pub(super) fn block_rows(&self) -> usize {
        self.opts.block_rows.max(1)
    }

    /// Makes room for `n` more rows of width `cols` in `cache` (a cache is created on the
    /// first rows) and queues the copy-on-write copies.
    pub(super) fn grow_cache(&self, cache: &mut CudaBuf, cols: usize, n: usize) -> Option<()> {
        if let CudaBuf::F32(s) = cache {
            if !s.is_empty() {
                self.record(failed("append_rows", "not a cache"));
                return None;
            }
            let pool = self.pool(cols)?;
            *cache = KvRows::buf(PagedRows::new(pool), cols);
        }
        let CudaBuf::Paged(p) = cache else {
            self.record(failed("append_rows", "not a cache"));
            return None;
        };
        if p.cols != cols {
            self.record(failed("append_rows", "row width changed"));
            return None;
        }
        let copies = match p.rows.reserve(n) {
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
        let row_bytes = cols * 2;
        for cp in copies {
            // SAFETY: both addresses are blocks of this pool, each `block_rows` rows of
            // `row_bytes` bytes, and `cp.rows` is at most `block_rows`.
            let r = unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    cp.to,
                    cp.from,
                    cp.rows * row_bytes,
                    self.stream.cu_stream(),
                )
            };
            self.check("cache copy-on-write", r);
        }
        Some(())
    }

    /// The device address of a cache's block table, uploading what changed since its last
    /// use (new blocks, a block replaced by its private copy).
    pub(super) fn table_of(&self, cache: &mut CudaBuf) -> Option<u64> {
        let CudaBuf::Paged(p) = cache else {
            self.record(failed("attention", "not a cache"));
            return None;
        };
        let t = &mut p.table;
        // Most steps change no cache's blocks (a block holds 16 positions): nothing to
        // compare or upload.
        if let Some((edits, base)) = t.synced {
            if edits == p.rows.edits() {
                return Some(base);
            }
        }
        let len = p.rows.block_addrs().len();
        let fits = t.buf.as_ref().is_some_and(|b| b.len() >= len);
        // What changed: compare in place.
        let same = if fits {
            t.mirror
                .iter()
                .zip(p.rows.block_addrs())
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
            t.mirror.extend(p.rows.block_addrs().skip(same));
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
        t.synced = Some((p.rows.edits(), base));
        Some(base)
    }

    /// A paged cache's rows as f32, `[rows, cols]`.
    pub(super) fn read_paged(&self, p: &PagedRows<DeviceChunks>, cols: usize) -> Option<Dev<f32>> {
        let rows = p.rows();
        let mut out = self.tmp::<f32>(rows * cols, "cache read")?;
        if rows == 0 {
            return Some(out);
        }
        let table = self.meta(&p.table(), "block table")?;
        let (br, c, from) = (p.pool().block_rows() as i32, cols as i32, 0i32);
        launch!(
            self,
            "paged_read",
            per_row(rows, 128),
            &table,
            &br,
            &c,
            &from,
            &mut out
        );
        Some(out)
    }
}

/// Rows held by a cache buffer (an empty f32 buffer: a cache not written yet).
pub(super) fn cache_rows(b: &CudaBuf) -> usize {
    match b {
        CudaBuf::Paged(p) => p.rows.rows(),
        _ => 0,
    }
}
