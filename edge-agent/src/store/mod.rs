//! The durable store: one sled tree holding records, windows, cases and the outbox.
//!
//! # Layout
//!
//! Every key starts with a one-byte prefix; numbers are big-endian so keys sort in order.
//!
//! | key | value | what |
//! | --- | --- | --- |
//! | `i` machine `\0` id | seq | idempotency index: (machine, id) → record |
//! | `p` machine | `Vec<StoredRecord>` | the machine's open (incomplete) window, records included |
//! | `c` case-seq | [`CaseEntry`] | a case: its records, features, student answer, decision, outbox state |
//! | `k` case-id | case-seq | case id → case |
//! | `o` case-seq | case-id | the outbox: hard cases not yet acknowledged by the cloud |
//! | `m` name | varies | meta: format version, next sequence numbers, policy state |
//!
//! A record lives in its machine's open window until the window is complete, then inside
//! its case: one value per window instead of one per record (sled copies a leaf on every
//! insert, so fewer, larger values are much cheaper to write). Removing a case's raw
//! records rewrites the case without them.
//!
//! Everything one ingest batch writes goes into one `sled::Batch`, which sled applies
//! atomically; the batch is durable only after `flush`, and nothing is acknowledged
//! before that flush returns. This module never acknowledges anything itself: it only
//! stores and reads.
//!
//! A store that sled cannot open, or whose values do not decode, is refused with a
//! message naming the problem — never emptied or overwritten.

pub mod keys;

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use shared::case::{CaseId, Decision, Reason};
use shared::record::Record;
use shared::schema::CLASSES;

use keys::Prefix;

/// Format version of the store's layout.
pub const FORMAT_VERSION: u32 = 1;

/// A record as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredRecord {
    /// Store-wide sequence number (arrival order).
    pub seq: u64,
    /// When the agent received it (Unix ms, agent clock).
    pub received_ms: i64,
    /// The record.
    pub record: Record,
}

/// What happened to a case in the outbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutboxState {
    /// A local case: never queued.
    NotQueued,
    /// Waiting for the cloud's durable acknowledgement.
    Queued,
    /// Acknowledged by the cloud.
    Delivered,
    /// An audit sample dropped under the disk cap before delivery.
    Evicted,
}

impl OutboxState {
    /// Lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            OutboxState::NotQueued => "not_queued",
            OutboxState::Queued => "queued",
            OutboxState::Delivered => "delivered",
            OutboxState::Evicted => "evicted",
        }
    }
}

/// A case as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaseEntry {
    /// Case sequence number (creation order).
    pub seq: u64,
    /// Content-derived id.
    pub id: CaseId,
    /// Machine.
    pub machine: String,
    /// First and last record timestamps (Unix ms).
    pub start_ms: i64,
    /// See `start_ms`.
    pub end_ms: i64,
    /// When the case was formed (agent clock, Unix ms).
    pub created_ms: i64,
    /// Sequence numbers of the window's records.
    pub record_seqs: Vec<u64>,
    /// The records themselves (empty once removed by retention or the disk cap).
    pub records: Vec<StoredRecord>,
    /// Features.
    pub features: Vec<f32>,
    /// Student class probabilities.
    pub probs: Vec<f32>,
    /// Student's class (index into `CLASSES`).
    pub class: u8,
    /// Out-of-distribution score.
    pub ood: f32,
    /// Policy decision.
    pub decision: Decision,
    /// Why.
    pub reason: Reason,
    /// First 16 hex digits of the student model's SHA-256.
    pub model: String,
    /// Outbox state.
    pub outbox: OutboxState,
    /// The raw records were removed (retention or disk cap); the summary remains.
    pub records_removed: bool,
}

impl CaseEntry {
    /// The student's class name.
    pub fn class_name(&self) -> &'static str {
        CLASSES
            .get(usize::from(self.class))
            .copied()
            .unwrap_or("unknown")
    }

    /// Handled: nothing more will happen to it on this gateway (local, delivered or evicted).
    pub fn handled(&self) -> bool {
        self.outbox != OutboxState::Queued
    }

    /// The case as the API shows it.
    pub fn to_json(&self) -> serde_json::Value {
        let probs: serde_json::Map<String, serde_json::Value> = CLASSES
            .iter()
            .zip(&self.probs)
            .map(|(c, p)| (c.to_string(), serde_json::json!(p)))
            .collect();
        serde_json::json!({
            "id": self.id.to_string(),
            "seq": self.seq,
            "machine": self.machine,
            "start": shared::record::format_ts(self.start_ms),
            "end": shared::record::format_ts(self.end_ms),
            "created": shared::record::format_ts(self.created_ms),
            "class": self.class_name(),
            "probs": probs,
            "ood_score": self.ood,
            "decision": self.decision.as_str(),
            "reason": self.reason.code(),
            "reason_detail": self.reason.detail(),
            "outbox": self.outbox.as_str(),
            "model": self.model,
            "record_seqs": self.record_seqs,
            "records_kept": !self.records_removed,
            "verdict": serde_json::Value::Null,
        })
    }
}

/// Counts kept in memory and rebuilt from the store at start.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Counts {
    /// Stored records.
    pub records: u64,
    /// Records in open windows.
    pub pending_records: u64,
    /// Stored case summaries.
    pub cases: u64,
    /// … of which decided local.
    pub cases_local: u64,
    /// … of which decided hard.
    pub cases_hard: u64,
    /// Hard cases waiting in the outbox.
    pub outbox: u64,
    /// … of which audit samples (evictable).
    pub outbox_audit: u64,
    /// Bytes of live keys and values of records, cases and the outbox.
    pub live_bytes: u64,
}

/// Everything read back at start.
pub struct Recovered {
    /// Counts.
    pub counts: Counts,
    /// Open windows: machine → records.
    pub windows: HashMap<String, Vec<StoredRecord>>,
    /// Stored size of each open window (key + value).
    pub pending_bytes: HashMap<String, u64>,
    /// Next record sequence number.
    pub next_record_seq: u64,
    /// Next case sequence number.
    pub next_case_seq: u64,
    /// Stored policy budget state, if any.
    pub policy_state: Option<Vec<u8>>,
}

/// How long opening waits for the store's lock to be released.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

enum Opened {
    /// Another handle (in this process or another) holds the store's lock.
    Locked(String),
    Failed(anyhow::Error),
}

fn open_once(dir: &Path, cache_bytes: u64) -> Result<sled::Db, Opened> {
    let config = sled::Config::new()
        .path(dir)
        .cache_capacity(cache_bytes)
        .mode(sled::Mode::HighThroughput);
    // sled 0.34 panics on some kinds of damage instead of returning an error: turn that
    // into the same clear refusal (and keep its panic message off the terminal).
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || config.open()));
    std::panic::set_hook(previous_hook);
    let opened = match opened {
        Ok(r) => r,
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown failure".into());
            return Err(Opened::Failed(anyhow::anyhow!(
                "the store in {} is damaged (sled could not read it: {what}); no further changes were made. \
                 Move the directory aside to start with an empty store, and keep it for recovery",
                dir.display()
            )));
        }
    };
    opened.map_err(|e| match e {
        sled::Error::Corruption { .. } => Opened::Failed(anyhow::anyhow!(
            "the store in {} is damaged ({e}); no further changes were made. Move the directory aside \
             to start with an empty store, and keep it for recovery",
            dir.display()
        )),
        sled::Error::Io(io)
            if io.kind() == std::io::ErrorKind::WouldBlock
                || io.raw_os_error() == Some(11)
                || io.to_string().contains("could not acquire lock") =>
        {
            Opened::Locked(io.to_string())
        }
        other => Opened::Failed(anyhow::anyhow!("opening the store in {}: {other}", dir.display())),
    })
}

/// Opens (or creates) the store. `cache_bytes` bounds sled's page cache.
pub fn open(dir: &Path, cache_bytes: u64) -> anyhow::Result<sled::Db> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating data directory {}", dir.display()))?;
    // sled releases its file lock only when the last of its background threads lets go of
    // the store, a moment after the previous handle is dropped: a restart within the same
    // process (or a new agent right after the old one exited) waits for it, bounded.
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let db = loop {
        match open_once(dir, cache_bytes) {
            Err(Opened::Locked(e)) if std::time::Instant::now() < deadline => {
                tracing::debug!("store {} still locked ({e}); waiting", dir.display());
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(Opened::Locked(_)) => anyhow::bail!(
                "the store in {} is in use by another process (is an agent running?); \
                 its lock was still held after {} s",
                dir.display(),
                LOCK_WAIT.as_secs()
            ),
            Err(Opened::Failed(e)) => return Err(e),
            Ok(db) => break db,
        }
    };
    match db.get(keys::meta("format"))? {
        Some(v) => {
            let version: u32 =
                postcard::from_bytes(&v).context("store format marker is unreadable")?;
            anyhow::ensure!(
                version == FORMAT_VERSION,
                "the store in {} has format {version}; this agent reads format {FORMAT_VERSION}",
                dir.display()
            );
        }
        None => {
            anyhow::ensure!(
                db.is_empty(),
                "the store in {} holds data but no format marker: it is not an edge-agent store or it is damaged; \
                 no further changes were made",
                dir.display()
            );
            db.insert(keys::meta("format"), postcard::to_stdvec(&FORMAT_VERSION)?)?;
            db.flush()?;
        }
    }
    Ok(db)
}

/// Reads the whole store once: counts, open windows and sequence numbers. Every value is
/// decoded, so damage is found here (and reported with its key) rather than later.
pub fn recover(db: &sled::Db) -> anyhow::Result<Recovered> {
    let mut counts = Counts::default();
    let mut max_record_seq = None;
    let mut max_case_seq = None;
    let mut windows = HashMap::new();
    let mut pending_bytes = HashMap::new();
    let mut audit_cases = std::collections::HashSet::new();
    let mut policy_state = None;
    for item in db.iter() {
        let (k, v) = item.context("reading the store")?;
        let bad = |what: &str| {
            anyhow::anyhow!(
                "store value under key {:?} is not a valid {what}: the store is damaged",
                String::from_utf8_lossy(&k)
            )
        };
        match Prefix::of(&k) {
            Some(Prefix::Idem) => counts.live_bytes += (k.len() + v.len()) as u64,
            Some(Prefix::Pending) => {
                let w: Vec<StoredRecord> = postcard::from_bytes(&v).map_err(|_| bad("window"))?;
                let machine = String::from_utf8(k[1..].to_vec()).map_err(|_| bad("window key"))?;
                counts.pending_records += w.len() as u64;
                counts.records += w.len() as u64;
                counts.live_bytes += (k.len() + v.len()) as u64;
                max_record_seq = max_record_seq.max(w.iter().map(|r| r.seq).max());
                pending_bytes.insert(machine.clone(), (k.len() + v.len()) as u64);
                windows.insert(machine, w);
            }
            Some(Prefix::Case) => {
                let c: CaseEntry = postcard::from_bytes(&v).map_err(|_| bad("case"))?;
                counts.cases += 1;
                counts.records += c.records.len() as u64;
                max_record_seq = max_record_seq.max(c.records.iter().map(|r| r.seq).max());
                match c.decision {
                    Decision::Local => counts.cases_local += 1,
                    Decision::Hard => counts.cases_hard += 1,
                }
                counts.live_bytes += (k.len() + v.len()) as u64;
                max_case_seq = max_case_seq.max(Some(c.seq));
                if c.reason == Reason::Audit && c.outbox == OutboxState::Queued {
                    audit_cases.insert(c.seq);
                }
            }
            Some(Prefix::CaseId) | Some(Prefix::Verdict) => {
                counts.live_bytes += (k.len() + v.len()) as u64
            }
            Some(Prefix::Outbox) => {
                counts.outbox += 1;
                counts.live_bytes += (k.len() + v.len()) as u64;
                // `c` keys sort before `o` keys: every case has been seen already.
                if audit_cases.contains(&keys::seq_of(&k)) {
                    counts.outbox_audit += 1;
                }
            }
            Some(Prefix::Meta) => {
                if &k[1..] == b"policy_state" {
                    policy_state = Some(v.to_vec());
                }
            }
            None => return Err(bad("key of this store")),
        }
    }
    let meta_u64 = |name: &str| -> anyhow::Result<u64> {
        Ok(match db.get(keys::meta(name))? {
            Some(v) => postcard::from_bytes(&v)
                .with_context(|| format!("store meta {name} is unreadable"))?,
            None => 0,
        })
    };
    Ok(Recovered {
        counts,
        windows,
        pending_bytes,
        next_record_seq: meta_u64("next_record_seq")?.max(max_record_seq.map_or(0, |s| s + 1)),
        next_case_seq: meta_u64("next_case_seq")?.max(max_case_seq.map_or(0, |s| s + 1)),
        policy_state,
    })
}

/// One case by sequence number.
pub fn get_case_by_seq(db: &sled::Db, seq: u64) -> anyhow::Result<Option<CaseEntry>> {
    match db.get(keys::case(seq))? {
        Some(v) => Ok(Some(
            postcard::from_bytes(&v).with_context(|| format!("case {seq} is unreadable"))?,
        )),
        None => Ok(None),
    }
}

/// The cloud's verdict on a case, if one arrived.
pub fn get_verdict(db: &sled::Db, id: &CaseId) -> anyhow::Result<Option<serde_json::Value>> {
    match db.get(keys::verdict(id))? {
        Some(v) => Ok(Some(
            serde_json::from_slice(&v).context("a stored verdict is unreadable")?,
        )),
        None => Ok(None),
    }
}

/// The hard cases waiting in the outbox, oldest first (at most `n`, skipping `skip`),
/// as the cloud receives them.
pub fn outbox_cases(
    db: &sled::Db,
    n: usize,
    skip: &dyn Fn(&CaseId) -> bool,
) -> anyhow::Result<Vec<shared::case::HardCase>> {
    let mut out = Vec::new();
    for item in db.scan_prefix([Prefix::Outbox as u8]) {
        if out.len() >= n {
            break;
        }
        let (k, _) = item?;
        let Some(c) = get_case_by_seq(db, keys::seq_of(&k))? else {
            continue;
        };
        if skip(&c.id) || c.outbox != OutboxState::Queued {
            continue;
        }
        out.push(shared::case::HardCase {
            id: c.id,
            machine: c.machine.clone(),
            start_ms: c.start_ms,
            end_ms: c.end_ms,
            features: c.features.clone(),
            probs: c.probs.clone(),
            reason: c.reason,
            records: c.records.into_iter().map(|r| r.record).collect(),
        });
    }
    Ok(out)
}

/// One case by id.
pub fn get_case(db: &sled::Db, id: &CaseId) -> anyhow::Result<Option<CaseEntry>> {
    match db.get(keys::case_id(id))? {
        Some(v) => get_case_by_seq(db, keys::be_u64(&v)),
        None => Ok(None),
    }
}

/// Filter and page of a case listing.
#[derive(Clone, Debug, Default)]
pub struct CaseQuery {
    /// Only this machine.
    pub machine: Option<String>,
    /// Only this decision.
    pub decision: Option<Decision>,
    /// Only cases with a sequence number below this (paging backwards from newest).
    pub before: Option<u64>,
    /// Page size.
    pub limit: usize,
}

/// Cases newest first, filtered; returns the page and the cursor of the next page.
pub fn list_cases(db: &sled::Db, q: &CaseQuery) -> anyhow::Result<(Vec<CaseEntry>, Option<u64>)> {
    let start = keys::case(0);
    let end = keys::case(q.before.unwrap_or(u64::MAX));
    let mut out = Vec::new();
    let mut next = None;
    for item in db.range(start..end).rev() {
        let (_, v) = item?;
        let c: CaseEntry = postcard::from_bytes(&v).context("case is unreadable")?;
        if q.machine.as_deref().is_some_and(|m| m != c.machine)
            || q.decision.is_some_and(|d| d != c.decision)
        {
            continue;
        }
        if out.len() == q.limit {
            next = out.last().map(|c: &CaseEntry| c.seq);
            break;
        }
        out.push(c);
    }
    Ok((out, next))
}

/// Counts recomputed from the store (for `inspect`).
pub fn count(db: &sled::Db) -> anyhow::Result<Counts> {
    Ok(recover(db)?.counts)
}

/// The acknowledgement watermark: a small file beside sled's, rewritten after every
/// group commit, holding the next sequence numbers as of the last acknowledged flush.
///
/// sled recovers a damaged log by keeping only its intact prefix, silently. If the store
/// reopens *below* the watermark, acknowledged data is gone, and the agent refuses to
/// start rather than carry on as if nothing happened. The file is written after the
/// flush it describes (never before), so it can lag the store but never lead it.
pub mod watermark {
    use std::path::{Path, PathBuf};

    use serde::{Deserialize, Serialize};

    /// File name inside the data directory.
    pub const FILE: &str = "ack-watermark.json";

    /// The watermark.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Watermark {
        /// Next record sequence number at the last acknowledged flush.
        pub next_record_seq: u64,
        /// Next case sequence number at the last acknowledged flush.
        pub next_case_seq: u64,
    }

    fn path(dir: &Path) -> PathBuf {
        dir.join(FILE)
    }

    /// Reads it; `None` if absent or unreadable (a new store, or a torn write of the file).
    pub fn read(dir: &Path) -> Option<Watermark> {
        let text = std::fs::read_to_string(path(dir)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Replaces it (write to a temporary file, then rename).
    pub fn write(dir: &Path, w: &Watermark) -> std::io::Result<()> {
        let tmp = dir.join(format!("{FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(w).unwrap_or_default())?;
        std::fs::rename(tmp, path(dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_store_is_refused_by_name_and_a_released_one_reopens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = open(dir.path(), 1 << 20).expect("first open");
        // Released a moment after the second open starts waiting: the wait covers it.
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(first);
        });
        let second = open(dir.path(), 1 << 20).expect("reopens once the first handle lets go");
        releaser.join().expect("releaser");
        // Held for good: refused, naming the store and the likely cause.
        let err = open(dir.path(), 1 << 20)
            .expect_err("the lock is held")
            .to_string();
        assert!(err.contains("in use by another process"), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        drop(second);
    }
}
