//! The paged KV cache's bookkeeping, independent of where the memory lives.
//!
//! Memory comes in *chunks* (one allocation each, of device memory for the CUDA backend
//! and host memory for the CPU one, never returned while the pool lives) cut into
//! fixed-size *blocks* of `block_rows` cache rows. A pool's chunks grow with it (each
//! as large as all before it, up to [`MAX_CHUNK_BYTES`] or an eighth of the budget), so
//! a cache that grows every step allocates rarely, and a chunk that does not fit what
//! is left of the budget is made smaller, down to the pool's least. A sequence's cache
//! is a [`PagedRows`]: a table of blocks plus a row count (what a row holds is the
//! backend's: both backends' is one position of every layer, so a sequence has one
//! table for all its layers). Blocks are reference-counted ([`BlockRef`]): a prefix of
//! one cache is another cache sharing the same blocks, so a shared system prompt is
//! stored once, and a block goes back to its pool's free list when the last cache
//! holding it drops it. Every block has the same size, so freeing never fragments; a
//! pool grows a chunk at a time until the byte budget shared by all pools is spent, and
//! then refuses with [`CacheFull`].
//!
//! Appending to a block that another cache also holds copies it first (copy-on-write of
//! the last, partly filled block), so sharing never lets one sequence see another's rows.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The pools' shared byte budget was spent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the KV cache is full: {needed} more blocks of {block_rows} positions were wanted and \
     its budget of {limit_bytes} bytes is spent ({used_bytes} bytes in use)"
)]
pub struct CacheFull {
    /// Blocks the append wanted.
    pub needed: usize,
    /// Positions per block.
    pub block_rows: usize,
    /// The budget.
    pub limit_bytes: usize,
    /// Bytes held by all pools.
    pub used_bytes: usize,
}

/// A byte budget shared by every pool of one device.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes taken by chunks so far.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(bytes).filter(|n| *n <= self.limit)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Where chunks come from: the device allocator (or host memory in tests).
pub trait ChunkSource: Send + Sync {
    /// What keeps a chunk alive.
    type Chunk: Send;
    /// Allocates `bytes`; returns the chunk and its base address.
    fn alloc(&self, bytes: usize) -> Result<(Self::Chunk, u64), String>;
}

/// The largest chunk a pool allocates at once.
pub const MAX_CHUNK_BYTES: usize = 256 << 20;

struct PoolState<C> {
    free: Vec<u64>,
    chunks: Vec<C>,
    /// Blocks in all chunks.
    blocks: usize,
}

/// Fixed-size blocks of cache rows of one width.
pub struct BlockPool<S: ChunkSource> {
    source: S,
    budget: Arc<Budget>,
    block_rows: usize,
    block_bytes: usize,
    blocks_per_chunk: usize,
    state: Mutex<PoolState<S::Chunk>>,
}

/// Why a block could not be had.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// The budget is spent.
    #[error(transparent)]
    Full(#[from] CacheFull),
    /// The allocator failed (out of device memory below the budget, or a device error).
    #[error("allocating a KV cache chunk of {bytes} bytes: {message}")]
    Device {
        /// Bytes asked for.
        bytes: usize,
        /// The allocator's error.
        message: String,
    },
}

impl<S: ChunkSource> BlockPool<S> {
    /// A pool of blocks of `block_rows` rows of `row_bytes` bytes, at least
    /// `blocks_per_chunk` blocks per allocation (and a multiple of it), drawing on
    /// `budget`; fewer where that would take more than an eighth of the budget, so a
    /// small budget is still spent a few blocks at a time.
    pub fn new(
        source: S,
        budget: Arc<Budget>,
        block_rows: usize,
        row_bytes: usize,
        blocks_per_chunk: usize,
    ) -> Arc<BlockPool<S>> {
        let block_bytes = block_rows.max(1) * row_bytes;
        let eighth = budget.limit() / 8 / block_bytes.max(1);
        Arc::new(BlockPool {
            source,
            budget,
            block_rows: block_rows.max(1),
            block_bytes,
            blocks_per_chunk: blocks_per_chunk.min(eighth).max(1),
            state: Mutex::new(PoolState {
                free: Vec::new(),
                chunks: Vec::new(),
                blocks: 0,
            }),
        })
    }

    /// Where its chunks come from.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// Rows per block.
    pub fn block_rows(&self) -> usize {
        self.block_rows
    }

    /// Bytes per block.
    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// Blocks free in the chunks allocated so far.
    pub fn free_blocks(&self) -> usize {
        self.lock().free.len()
    }

    /// Blocks in all chunks (free or held).
    pub fn total_blocks(&self) -> usize {
        self.lock().blocks
    }

    /// Device allocations made so far.
    pub fn chunks(&self) -> usize {
        self.lock().chunks.len()
    }

    /// The blocks of the next chunk, given `total` so far: as many as that, within
    /// [`MAX_CHUNK_BYTES`] and an eighth of the budget, in whole `blocks_per_chunk`.
    fn next_chunk_blocks(&self, total: usize) -> usize {
        let unit = self.blocks_per_chunk;
        let cap = MAX_CHUNK_BYTES.min(self.budget.limit() / 8) / self.block_bytes;
        total.min(cap) / unit * unit
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState<S::Chunk>> {
        // A panic while holding the lock leaves the lists consistent (each operation is a
        // push or a pop), so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `n` blocks, all or none.
    pub fn alloc(self: &Arc<Self>, n: usize) -> Result<Vec<BlockRef<S>>, AllocError> {
        let mut st = self.lock();
        while st.free.len() < n {
            // The largest chunk up to the next one's size that the budget still takes and
            // the allocator gives, halving down to the least.
            let unit = self.blocks_per_chunk;
            let mut blocks = self.next_chunk_blocks(st.blocks).max(unit);
            let (chunk, base) = loop {
                let bytes = blocks * self.block_bytes;
                if !self.budget.take(bytes) {
                    if blocks == unit {
                        return Err(AllocError::Full(CacheFull {
                            needed: n - st.free.len(),
                            block_rows: self.block_rows,
                            limit_bytes: self.budget.limit(),
                            used_bytes: self.budget.used(),
                        }));
                    }
                } else {
                    match self.source.alloc(bytes) {
                        Ok(got) => break got,
                        Err(message) => {
                            self.budget.give_back(bytes);
                            if blocks == unit {
                                return Err(AllocError::Device { bytes, message });
                            }
                        }
                    }
                }
                blocks = (blocks / 2 / unit).max(1) * unit;
            };
            st.chunks.push(chunk);
            st.blocks += blocks;
            // Lowest addresses handed out first.
            st.free.extend(
                (0..blocks)
                    .rev()
                    .map(|i| base + (i * self.block_bytes) as u64),
            );
        }
        let at = st.free.len() - n;
        let taken: Vec<u64> = st.free.drain(at..).rev().collect();
        drop(st);
        Ok(taken
            .into_iter()
            .map(|addr| {
                Arc::new(Block {
                    addr,
                    pool: self.clone(),
                })
            })
            .collect())
    }
}

impl<S: ChunkSource> Drop for BlockPool<S> {
    fn drop(&mut self) {
        let blocks = self.lock().blocks;
        self.budget.give_back(blocks * self.block_bytes);
    }
}

/// One block; back to its pool when the last reference drops.
pub struct Block<S: ChunkSource> {
    addr: u64,
    pool: Arc<BlockPool<S>>,
}

impl<S: ChunkSource> Block<S> {
    /// Its address.
    pub fn addr(&self) -> u64 {
        self.addr
    }
}

impl<S: ChunkSource> Drop for Block<S> {
    fn drop(&mut self) {
        self.pool.lock().free.push(self.addr);
    }
}

/// A shared block.
pub type BlockRef<S> = Arc<Block<S>>;

/// A copy to make before writing (copy-on-write of a shared block): `rows` rows from
/// `from` to `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockCopy {
    /// Source block.
    pub from: u64,
    /// Destination block (new, owned by this cache alone).
    pub to: u64,
    /// Rows to copy.
    pub rows: usize,
}

/// The rows of one sequence's cache.
pub struct PagedRows<S: ChunkSource> {
    pool: Arc<BlockPool<S>>,
    blocks: Vec<BlockRef<S>>,
    rows: usize,
    /// Changes of the block table so far (see [`PagedRows::edits`]).
    edits: u64,
    /// Whether the last block may be held by another cache too (a prefix took it, or it
    /// came from one). `false`: this cache made it, so an append to it needs no copy and
    /// no look at its holders (which would read the block, most decode steps, for every
    /// sequence and layer).
    last_shared: AtomicBool,
}

impl<S: ChunkSource> Clone for PagedRows<S> {
    fn clone(&self) -> Self {
        self.prefix(self.rows)
    }
}

impl<S: ChunkSource> PagedRows<S> {
    /// An empty cache drawing on `pool`.
    pub fn new(pool: Arc<BlockPool<S>>) -> PagedRows<S> {
        PagedRows {
            pool,
            blocks: Vec::new(),
            rows: 0,
            edits: 0,
            last_shared: AtomicBool::new(false),
        }
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The pool.
    pub fn pool(&self) -> &Arc<BlockPool<S>> {
        &self.pool
    }

    /// The block addresses, in order.
    #[cfg(test)]
    fn table(&self) -> Vec<u64> {
        self.block_addrs().collect()
    }

    /// How many times the block table has changed (blocks added, dropped or replaced by
    /// a private copy) since this cache was made: a mirror of the table made when it
    /// was this is still the table while it stays this.
    pub fn edits(&self) -> u64 {
        self.edits
    }

    /// The block addresses, in order, without collecting them.
    pub fn block_addrs(&self) -> impl ExactSizeIterator<Item = u64> + '_ {
        self.blocks.iter().map(|b| b.addr)
    }

    /// The first `keep` rows, sharing this cache's blocks.
    pub fn prefix(&self, keep: usize) -> PagedRows<S> {
        let keep = keep.min(self.rows);
        let n = keep.div_ceil(self.pool.block_rows);
        if n > 0 && n == self.blocks.len() {
            self.last_shared.store(true, Ordering::Relaxed);
        }
        PagedRows {
            pool: self.pool.clone(),
            blocks: self.blocks[..n].to_vec(),
            rows: keep,
            edits: 0,
            last_shared: AtomicBool::new(n > 0),
        }
    }

    /// Makes room for `n` more rows as [`PagedRows::reserve`] does, and returns the
    /// copies to make before writing and the address of every new row, in order (rows
    /// of `block_bytes / block_rows` bytes, one after another in a block). On error
    /// nothing changed.
    #[cfg(test)]
    fn grow(&mut self, n: usize) -> Result<(Vec<BlockCopy>, Vec<u64>), AllocError> {
        let from = self.rows;
        let copies = self.reserve(n)?;
        Ok((copies, self.row_addrs(from, n)))
    }

    /// The addresses of rows `from..from + n` (held rows).
    #[cfg(test)]
    fn row_addrs(&self, from: usize, n: usize) -> Vec<u64> {
        let br = self.pool.block_rows;
        let row_bytes = (self.pool.block_bytes / br) as u64;
        (from..(from + n).min(self.rows))
            .map(|r| self.blocks[r / br].addr + (r % br) as u64 * row_bytes)
            .collect()
    }

    /// Makes room for `n` more rows: allocates the blocks they need and, when the last
    /// block is partly filled and shared, replaces it by a private copy. Returns the
    /// copies to make before writing. On error nothing changed.
    pub fn reserve(&mut self, n: usize) -> Result<Vec<BlockCopy>, AllocError> {
        let br = self.pool.block_rows;
        let used_in_last = self.rows % br;
        let cow = used_in_last != 0
            && n > 0
            && self.last_shared.load(Ordering::Relaxed)
            && self.blocks.last().is_some_and(|b| {
                let shared = Arc::strong_count(b) > 1;
                // Its other holders are gone: it is this cache's alone again.
                if !shared {
                    self.last_shared.store(false, Ordering::Relaxed);
                }
                shared
            });
        let new_blocks = (self.rows + n).div_ceil(br) - self.blocks.len();
        // Most steps add a row to a block that has room: no blocks, no pool lock.
        let wanted = new_blocks + usize::from(cow);
        let mut fresh = if wanted == 0 {
            Vec::new()
        } else {
            self.pool.alloc(wanted)?
        };
        if wanted > 0 {
            self.edits += 1;
        }
        let mut copies = Vec::new();
        if cow {
            let own = fresh.pop().expect("allocated one block for the copy");
            let last = self.blocks.len() - 1;
            copies.push(BlockCopy {
                from: self.blocks[last].addr,
                to: own.addr,
                rows: used_in_last,
            });
            self.blocks[last] = own;
            self.last_shared.store(false, Ordering::Relaxed);
        }
        if new_blocks > 0 {
            // The new last block is this cache's own.
            self.last_shared.store(false, Ordering::Relaxed);
        }
        self.blocks.extend(fresh);
        self.rows += n;
        Ok(copies)
    }

    /// Drops rows past `keep` (and the blocks only they used).
    pub fn truncate(&mut self, keep: usize) {
        if keep < self.rows {
            self.rows = keep;
            let blocks = keep.div_ceil(self.pool.block_rows);
            if blocks < self.blocks.len() {
                self.edits += 1;
                self.blocks.truncate(blocks);
                // The new last block may have been taken by a prefix.
                self.last_shared.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// Adds the memory of `pools` to `u`: what their blocks hold, what their chunks took,
/// and in how many allocations.
pub fn add_usage<'a, S: ChunkSource + 'a>(
    u: &mut super::backend::KvCacheUsage,
    pools: impl IntoIterator<Item = &'a Arc<BlockPool<S>>>,
) {
    for pool in pools {
        let total = pool.total_blocks();
        u.held_bytes += total.saturating_sub(pool.free_blocks()) * pool.block_bytes();
        u.allocated_bytes += total * pool.block_bytes();
        u.allocations += pool.chunks();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Host memory standing in for device memory.
    struct Host;

    impl ChunkSource for Host {
        type Chunk = Vec<u8>;
        fn alloc(&self, bytes: usize) -> Result<(Vec<u8>, u64), String> {
            let v = vec![0u8; bytes];
            let base = v.as_ptr() as u64;
            Ok((v, base))
        }
    }

    fn pool(limit_blocks: usize) -> Arc<BlockPool<Host>> {
        // 4 rows of 8 bytes per block, 2 blocks per chunk.
        BlockPool::new(Host, Budget::new(limit_blocks * 32), 4, 8, 2)
    }

    #[test]
    fn rows_land_in_consecutive_slots_of_their_blocks() {
        let p = pool(8);
        let mut c = PagedRows::new(p.clone());
        let (copies, addrs) = c.grow(6).expect("room");
        assert!(copies.is_empty());
        let t = c.table();
        assert_eq!(t.len(), 2);
        assert_eq!(addrs[0], t[0]);
        assert_eq!(addrs[3], t[0] + 24);
        assert_eq!(addrs[4], t[1]);
        assert_eq!(addrs[5], t[1] + 8);
        let (_, more) = c.grow(3).expect("room");
        assert_eq!(more[0], t[1] + 16);
        assert_eq!(c.table().len(), 3);
        assert_eq!(c.rows(), 9);
    }

    #[test]
    fn blocks_return_to_the_pool_and_are_reused_without_growth() {
        let p = pool(4);
        for _ in 0..10 {
            let mut c = PagedRows::new(p.clone());
            c.grow(16).expect("four blocks fit the budget");
            assert_eq!(p.free_blocks(), 0);
        }
        assert_eq!(p.free_blocks(), 4);
        assert_eq!(p.total_blocks(), 4);
    }

    /// Each chunk is as large as the pool so far, up to an eighth of the budget: a cache
    /// growing a block at a time allocates a few times, not once per two blocks.
    /// A least chunk larger than the budget (a small `--kv-cache-gib`) is cut to an
    /// eighth of it: the budget is still spent, a block at a time, not refused whole.
    #[test]
    fn a_small_budget_is_spent_in_small_chunks() {
        // Room for 16 blocks of 32 bytes; a least chunk of 64 blocks asked for.
        let p = BlockPool::new(Host, Budget::new(16 * 32), 4, 8, 64);
        let mut c = PagedRows::new(p.clone());
        c.grow(4).expect("one block fits");
        assert_eq!(p.total_blocks(), 2, "an eighth of the budget");
        c.grow(60).expect("the whole budget fits");
        assert_eq!(p.total_blocks(), 16);
        assert!(matches!(c.grow(1), Err(AllocError::Full(_))));
    }

    #[test]
    fn chunks_grow_with_the_pool() {
        // 1024 blocks of 32 bytes: chunks of at most 128 blocks.
        let budget = Budget::new(1024 * 32);
        let p = BlockPool::new(Host, budget.clone(), 4, 8, 2);
        let mut c = PagedRows::new(p.clone());
        let mut totals = vec![];
        for _ in 0..300 {
            c.grow(4).expect("room");
            if totals.last() != Some(&p.total_blocks()) {
                totals.push(p.total_blocks());
            }
        }
        assert_eq!(totals, [2, 4, 8, 16, 32, 64, 128, 256, 384]);
        assert_eq!(p.chunks(), 9);
        assert_eq!(budget.used(), 384 * 32);
        drop(c);
        drop(p);
        assert_eq!(budget.used(), 0, "the chunks' bytes go back with the pool");
    }

    /// A chunk larger than what the budget has left is made smaller, so the pool still
    /// fills the budget to its last block before it refuses.
    #[test]
    fn the_last_chunks_shrink_to_fill_the_budget() {
        // 70 blocks: chunks 2, 2, 4, then 8 (an eighth of the budget) until 64, then
        // the 6 left as 4 and 2.
        let budget = Budget::new(70 * 32);
        let p = BlockPool::new(Host, budget.clone(), 4, 8, 2);
        let mut c = PagedRows::new(p.clone());
        for i in 0..70 {
            c.grow(4).unwrap_or_else(|e| panic!("block {i}: {e}"));
        }
        assert_eq!(p.total_blocks(), 70);
        assert_eq!(p.free_blocks(), 0);
        assert_eq!(p.chunks(), 12);
        assert_eq!(budget.used(), budget.limit());
        match c.grow(1) {
            Err(AllocError::Full(f)) => assert_eq!(f.needed, 1),
            other => panic!("the 71st block: {other:?}"),
        }
        assert_eq!(c.rows(), 280);
    }

    /// Host memory that refuses allocations over a size, as a device short of memory
    /// below the budget does.
    struct Capped(usize);

    impl ChunkSource for Capped {
        type Chunk = Vec<u8>;
        fn alloc(&self, bytes: usize) -> Result<(Vec<u8>, u64), String> {
            if bytes > self.0 {
                return Err(format!("{bytes} bytes: out of memory"));
            }
            Host.alloc(bytes)
        }
    }

    /// A chunk the allocator refuses is asked for again at half the size, down to the
    /// least; what the refused ones took from the budget goes back.
    #[test]
    fn a_refused_chunk_is_asked_for_again_smaller() {
        let budget = Budget::new(1024 * 32);
        let p = BlockPool::new(Capped(4 * 32), budget.clone(), 4, 8, 2);
        let mut c = PagedRows::new(p.clone());
        for i in 0..50 {
            c.grow(4).unwrap_or_else(|e| panic!("block {i}: {e}"));
        }
        let total = p.total_blocks();
        assert!((50..=53).contains(&total), "{total} blocks");
        assert!(p.chunks() >= 50 / 4, "no chunk over 4 blocks");
        assert_eq!(budget.used(), total * 32);

        let none = BlockPool::new(Capped(0), budget.clone(), 4, 8, 2);
        match PagedRows::new(none.clone()).grow(1) {
            Err(AllocError::Device { bytes, message }) => {
                assert_eq!(bytes, 64);
                assert!(message.contains("out of memory"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            budget.used(),
            total * 32,
            "the refused chunk's bytes went back"
        );
    }

    #[test]
    fn a_full_budget_refuses_and_leaves_the_cache_as_it_was() {
        let p = pool(4);
        let mut a = PagedRows::new(p.clone());
        a.grow(12).expect("three blocks");
        let before = a.table();
        let err = a.grow(8).expect_err("two more blocks exceed the budget");
        match err {
            AllocError::Full(f) => {
                assert_eq!(f.needed, 1);
                assert!(f.to_string().contains("KV cache is full"), "{f}");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(a.table(), before);
        assert_eq!(a.rows(), 12);
        // What the failed call took went back: one more block still fits.
        a.grow(4).expect("the fourth block");
    }

    #[test]
    fn a_prefix_shares_blocks_and_copies_the_partial_one_before_writing() {
        let p = pool(16);
        let mut a = PagedRows::new(p.clone());
        a.grow(6).expect("room");
        let mut b = a.prefix(5);
        assert_eq!(b.table(), a.table(), "shared by reference");
        let held = |p: &BlockPool<Host>| p.total_blocks() - p.free_blocks();
        let before = held(&p);
        let (copies, addrs) = b.grow(1).expect("room");
        assert_eq!(copies.len(), 1);
        assert_eq!(copies[0].from, a.table()[1]);
        assert_eq!(copies[0].rows, 1);
        assert_ne!(
            b.table()[1],
            a.table()[1],
            "the partial block is now private"
        );
        assert_eq!(b.table()[0], a.table()[0], "full blocks stay shared");
        assert_eq!(addrs[0], b.table()[1] + 8);
        assert_eq!(held(&p), before + 1, "one block for the private copy");
        // A prefix ending on a block boundary shares everything and copies nothing.
        let mut c = a.prefix(4);
        let (copies, _) = c.grow(2).expect("room");
        assert!(copies.is_empty());
        assert_eq!(c.table()[0], a.table()[0]);
    }

    /// The cache a prefix was taken from copies its partial last block before writing
    /// while the prefix holds it, and writes in place again once the prefix is gone; a
    /// truncated cache whose new last block a prefix holds copies it too. The block
    /// table's edit count moves exactly when the table does.
    #[test]
    fn the_source_of_a_prefix_copies_its_shared_last_block() {
        let p = pool(16);
        let mut a = PagedRows::new(p.clone());
        a.grow(6).expect("room");
        let edits = a.edits();
        let (copies, _) = a.grow(1).expect("room");
        assert!(copies.is_empty(), "a block of its own: written in place");
        assert_eq!(a.edits(), edits, "same table");
        let b = a.prefix(7);
        let shared = a.table()[1];
        let (copies, _) = a.grow(1).expect("room");
        assert_eq!(copies.len(), 1, "the prefix holds the last block");
        assert_eq!((copies[0].from, copies[0].rows), (shared, 3));
        assert_ne!(a.table()[1], shared);
        assert_eq!(b.table()[1], shared, "the prefix keeps the original");
        assert_eq!(a.edits(), edits + 1);
        let (copies, _) = a.grow(1).expect("room");
        assert!(copies.is_empty(), "the copy is its own");
        // A prefix that outlives nothing: once dropped, no copy.
        let mut c = PagedRows::new(p.clone());
        c.grow(3).expect("room");
        drop(c.prefix(3));
        let (copies, _) = c.grow(1).expect("room");
        assert!(copies.is_empty(), "its other holder is gone");
        // Truncated back into a block a prefix holds: copied before writing.
        let mut d = PagedRows::new(p.clone());
        d.grow(6).expect("room");
        let e = d.prefix(3);
        let edits = d.edits();
        d.truncate(3);
        assert_eq!(d.edits(), edits + 1, "a block dropped");
        let (copies, _) = d.grow(1).expect("room");
        assert_eq!(copies.len(), 1, "the prefix holds the new last block");
        assert_eq!(copies[0].from, e.table()[0]);
        d.truncate(2);
        assert_eq!(
            d.edits(),
            edits + 2,
            "the copy counts; a cut inside the block does not"
        );
    }

    #[test]
    fn shared_blocks_free_only_when_the_last_holder_drops() {
        let p = pool(16);
        let mut a = PagedRows::new(p.clone());
        a.grow(8).expect("room");
        let b = a.prefix(8);
        let free = p.free_blocks();
        drop(a);
        assert_eq!(p.free_blocks(), free, "still held by the prefix");
        drop(b);
        assert_eq!(p.free_blocks(), free + 2);
    }

    #[test]
    fn truncate_releases_whole_blocks_past_the_kept_rows() {
        let p = pool(16);
        let mut a = PagedRows::new(p.clone());
        a.grow(9).expect("room");
        let free = p.free_blocks();
        a.truncate(4);
        assert_eq!(a.table().len(), 1);
        assert_eq!(p.free_blocks(), free + 2);
        let (_, addrs) = a.grow(1).expect("room");
        assert_eq!(a.rows(), 5);
        assert_eq!(addrs[0], a.table()[1]);
    }

    #[test]
    fn pools_of_different_widths_share_one_budget() {
        let budget = Budget::new(128);
        let narrow = BlockPool::new(Host, budget.clone(), 4, 8, 1); // 32-byte blocks
        let wide = BlockPool::new(Host, budget.clone(), 4, 16, 1); // 64-byte blocks
        let mut a = PagedRows::new(narrow.clone());
        let mut b = PagedRows::new(wide.clone());
        a.grow(8).expect("64 bytes");
        assert!(b.grow(8).is_err(), "128 more bytes exceed the budget");
        b.grow(4).expect("64 bytes");
        assert_eq!(budget.used(), 128);
        drop((a, b, narrow, wide));
        assert_eq!(budget.used(), 0, "a dropped pool gives its chunks back");
    }

    #[test]
    fn random_sharing_never_hands_one_block_to_two_writers() {
        // Many caches forking and growing at random: a block written by a cache (the rows
        // it appends) is never one another live cache can still read at that row.
        let p = pool(4096);
        let mut caches: Vec<PagedRows<Host>> = Vec::new();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut rnd = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        for _ in 0..2000 {
            match rnd(4) {
                0 if !caches.is_empty() => {
                    let i = rnd(caches.len());
                    let keep = rnd(caches[i].rows() + 1);
                    let c = caches[i].prefix(keep);
                    caches.push(c);
                }
                1 if caches.len() > 1 => {
                    let i = rnd(caches.len());
                    caches.swap_remove(i);
                }
                _ => {
                    if caches.is_empty() {
                        caches.push(PagedRows::new(p.clone()));
                    }
                    let i = rnd(caches.len());
                    let n = 1 + rnd(6);
                    let (_, addrs) = caches[i].grow(n).expect("budget is ample");
                    for (j, c) in caches.iter().enumerate() {
                        if j == i {
                            continue;
                        }
                        let readable: Vec<u64> = (0..c.rows())
                            .map(|r| c.table()[r / 4] + (r % 4) as u64 * 8)
                            .collect();
                        for a in &addrs {
                            assert!(!readable.contains(a), "row written into a live cache");
                        }
                    }
                }
            }
        }
    }
}
