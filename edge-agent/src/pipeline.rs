//! The committer: the one task that writes the store.
//!
//! Requests arrive already validated. The committer takes every request waiting in its
//! queue, appends their records to the per-machine windows, turns complete windows into
//! cases (features → student → policy), writes all of it as one atomic sled batch, and
//! flushes once — *group commit*: concurrent requests share one fsync. Only after that
//! flush returns does any of them get its acknowledgement. It never acknowledges a
//! record before the flush that covers it.
//!
//! The same task enforces retention and the disk cap, so eviction never races ingest.
//! Eviction goes by value: audit samples waiting in the outbox first, then raw records of
//! handled cases (oldest first), then summaries of handled cases. Undelivered hard cases
//! and records of open windows are never evicted; when only they remain, requests are
//! refused with 503 and `Retry-After` instead of dropping anything.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use shared::case::{CaseId, Decision, Reason};
use shared::features::{extract, NUM_FEATURES};
use shared::record::Record;
use shared::schema::WINDOW_LEN;
use tokio::sync::{mpsc, oneshot};

use crate::config::StoreConfig;
use crate::infer::Student;
use crate::ingest::IngestError;
use crate::policy::{Policy, PolicyConfig, PolicyState, Uncertainty};
use crate::store::{self, keys, CaseEntry, Counts, OutboxState, StoredRecord};

/// Most records taken into one group commit.
const MAX_GROUP_RECORDS: usize = 2_000;
/// Cases handled per eviction or retention step.
const STEP_CASES: usize = 64;

/// A command for the committer.
pub enum Command {
    /// Store validated records; reply after the flush.
    Ingest {
        /// The records, in request order.
        records: Vec<Record>,
        /// Estimated stored size, for the disk cap.
        est_bytes: u64,
        /// Where the outcome goes.
        reply: oneshot::Sender<Result<IngestOutcome, IngestError>>,
    },
    /// Replace the policy configuration.
    SetPolicy(PolicyConfig, oneshot::Sender<()>),
    /// The cloud stored these hard cases: they leave the outbox.
    Delivered(Vec<CaseId>, oneshot::Sender<()>),
    /// Verdicts from the cloud, to store with their cases (replies after the flush).
    Verdicts(Vec<shared::frame::VerdictMsg>, oneshot::Sender<()>),
}

/// The answer to an accepted request.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IngestOutcome {
    /// Records stored now.
    pub accepted: usize,
    /// Records already stored earlier (same machine and id), acknowledged again.
    pub duplicates: usize,
    /// Cases completed by this request: the student's answer, at once.
    pub cases: Vec<CaseAnswer>,
}

/// The student's answer for one case.
#[derive(Clone, Debug, Serialize)]
pub struct CaseAnswer {
    /// Case id.
    pub id: String,
    /// Machine.
    pub machine: String,
    /// The student's class.
    pub class: &'static str,
    /// Its probability.
    pub confidence: f32,
    /// `local` or `hard` (hard: a cloud verdict will follow).
    pub decision: &'static str,
    /// Why.
    pub reason: &'static str,
}

/// State shared with the HTTP API (read side).
pub struct Shared {
    /// Counts of what is stored.
    pub counts: Mutex<Counts>,
    /// The store is full of undelivered hard cases: ingest answers 503.
    pub full: AtomicBool,
    /// A write or flush failed: the agent refuses ingest until restarted.
    pub failed: Mutex<Option<String>>,
    /// Policy configuration in force.
    pub policy: RwLock<PolicyConfig>,
    /// Lifetime totals since start.
    pub totals: Mutex<Totals>,
}

/// Totals since the agent started.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    /// Records accepted.
    pub records_accepted: u64,
    /// Duplicates acknowledged again.
    pub records_duplicate: u64,
    /// Cases decided local.
    pub cases_local: u64,
    /// Cases decided hard.
    pub cases_hard: u64,
    /// Cases the thresholds wanted to send but a budget (share or rate) held back.
    pub cases_over_budget: u64,
    /// Requests refused because the store was full.
    pub refused_full: u64,
    /// Evictions under the disk cap, by kind.
    pub evicted_audit_samples: u64,
    /// Cases whose raw records were evicted.
    pub evicted_raw_records: u64,
    /// Case summaries evicted.
    pub evicted_case_summaries: u64,
    /// Cases whose raw records expired (retention).
    pub expired_raw_records: u64,
    /// Case summaries expired (retention).
    pub expired_case_summaries: u64,
    /// Group commits (flushes).
    pub flushes: u64,
}

/// Wall clock, Unix ms.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A window that just filled: (machine, its records with their sequence numbers, the
/// index of the request that completed it).
type CompletedWindow = (String, Vec<StoredRecord>, usize);

/// The committer's state.
pub struct Pipeline {
    db: sled::Db,
    data_dir: std::path::PathBuf,
    student: Arc<Student>,
    policy: Policy,
    windows: HashMap<String, Vec<StoredRecord>>,
    /// Stored size of each open window's entry (key + value), for the cap's accounting.
    pending_bytes: HashMap<String, u64>,
    /// Records of windows found identical to an earlier case in the current commit.
    duplicate_window_records: u64,
    next_record_seq: u64,
    next_case_seq: u64,
    shared: Arc<Shared>,
    store_cfg: StoreConfig,
    cap_bytes: u64,
    model_tag: String,
    evict_records_cursor: u64,
    evict_summaries_cursor: u64,
    expire_records_cursor: u64,
    expire_cases_cursor: u64,
}

impl Pipeline {
    /// Recovers state from the store; refuses a store that lost acknowledged data unless
    /// `accept_loss`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        data_dir: std::path::PathBuf,
        accept_loss: bool,
        db: sled::Db,
        student: Arc<Student>,
        policy_cfg: PolicyConfig,
        store_cfg: StoreConfig,
        cap_bytes: u64,
    ) -> anyhow::Result<(Pipeline, Arc<Shared>)> {
        let rec = store::recover(&db)?;
        if let Some(w) = store::watermark::read(&data_dir) {
            if rec.next_record_seq < w.next_record_seq || rec.next_case_seq < w.next_case_seq {
                let msg = format!(
                    "the store in {} is damaged: it reopened with records up to #{} and cases up to #{}, but records up \
                     to #{} and cases up to #{} had been acknowledged (sled kept only the intact part of its log). \
                     No further changes were made: restore it from a backup, or start with --accept-data-loss to \
                     serve from what remains",
                    data_dir.display(),
                    rec.next_record_seq,
                    rec.next_case_seq,
                    w.next_record_seq,
                    w.next_case_seq
                );
                if !accept_loss {
                    anyhow::bail!(msg);
                }
                tracing::error!("{msg}; continuing because --accept-data-loss was given");
                metrics::counter!("edge_records_lost_total")
                    .increment(w.next_record_seq.saturating_sub(rec.next_record_seq));
            }
        }
        let state: PolicyState = match &rec.policy_state {
            Some(b) => postcard::from_bytes(b).unwrap_or_default(),
            None => PolicyState::default(),
        };
        let shared = Arc::new(Shared {
            counts: Mutex::new(rec.counts),
            full: AtomicBool::new(false),
            failed: Mutex::new(None),
            policy: RwLock::new(policy_cfg.clone()),
            totals: Mutex::new(Totals::default()),
        });
        let model_tag = student.sha256().chars().take(16).collect();
        Ok((
            Pipeline {
                db,
                data_dir,
                student,
                policy: Policy::new(policy_cfg, state),
                windows: rec.windows,
                pending_bytes: rec.pending_bytes,
                duplicate_window_records: 0,
                next_record_seq: rec.next_record_seq,
                next_case_seq: rec.next_case_seq,
                shared: shared.clone(),
                store_cfg,
                cap_bytes,
                model_tag,
                evict_records_cursor: 0,
                evict_summaries_cursor: 0,
                expire_records_cursor: 0,
                expire_cases_cursor: 0,
            },
            shared,
        ))
    }

    /// Runs until every sender is gone, then flushes.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut janitor = tokio::time::interval(Duration::from_secs_f64(
            self.store_cfg.janitor_interval_secs,
        ));
        janitor.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                c = rx.recv() => match c { Some(c) => c, None => break },
                _ = janitor.tick() => { self.janitor(); continue; }
            };
            let mut group = Vec::new();
            let mut n = 0usize;
            let push = |c: Command, group: &mut Vec<Command>, n: &mut usize| {
                if let Command::Ingest { records, .. } = &c {
                    *n += records.len();
                }
                group.push(c);
            };
            push(first, &mut group, &mut n);
            while n < MAX_GROUP_RECORDS {
                match rx.try_recv() {
                    Ok(c) => push(c, &mut group, &mut n),
                    Err(_) => break,
                }
            }
            let (link, group): (Vec<Command>, Vec<Command>) = group
                .into_iter()
                .partition(|c| matches!(c, Command::Delivered(..) | Command::Verdicts(..)));
            if !link.is_empty() {
                self.link_commit(link).await;
            }
            if !group.is_empty() {
                self.commit(group).await;
            }
        }
        if let Err(e) = self.db.flush_async().await {
            tracing::error!("final flush failed: {e}");
        }
    }

    /// Outbox deliveries and verdicts from the uplink: one batch, one flush.
    async fn link_commit(&mut self, cmds: Vec<Command>) {
        let mut batch = sled::Batch::default();
        let mut replies = Vec::new();
        let (mut delivered, mut delivered_audit, mut verdicts, mut added) =
            (0u64, 0u64, 0u64, 0u64);
        let mut seen = HashSet::new();
        for cmd in cmds {
            match cmd {
                Command::Delivered(ids, reply) => {
                    for id in ids {
                        if !seen.insert(id) {
                            continue;
                        }
                        let Ok(Some(mut c)) = store::get_case(&self.db, &id) else {
                            continue;
                        };
                        if c.outbox != OutboxState::Queued {
                            continue;
                        }
                        batch.remove(&keys::outbox(c.seq)[..]);
                        c.outbox = OutboxState::Delivered;
                        self.rewrite_case(&c, &mut batch);
                        delivered += 1;
                        if c.reason == Reason::Audit {
                            delivered_audit += 1;
                        }
                    }
                    replies.push(reply);
                }
                Command::Verdicts(vs, reply) => {
                    for v in vs {
                        // Only for cases this gateway holds; a repeat overwrites with the same.
                        if !self
                            .db
                            .contains_key(keys::case_id(&v.case_id))
                            .unwrap_or(false)
                        {
                            continue;
                        }
                        let j = serde_json::json!({
                            "class": v.class, "confidence": v.confidence,
                            "explanation": v.explanation, "action": v.action, "model": v.model,
                            "received": shared::record::format_ts(now_ms()),
                        });
                        if let Ok(bytes) = serde_json::to_vec(&j) {
                            if !self
                                .db
                                .contains_key(keys::verdict(&v.case_id))
                                .unwrap_or(true)
                            {
                                added += (17 + bytes.len()) as u64;
                                verdicts += 1;
                            }
                            batch.insert(&keys::verdict(&v.case_id)[..], bytes);
                        }
                    }
                    replies.push(reply);
                }
                Command::Ingest { reply, .. } => {
                    let _ = reply.send(Err(IngestError::new(500, "misrouted command")));
                }
                Command::SetPolicy(_, reply) => {
                    let _ = reply.send(());
                }
            }
        }
        let result = match self.db.apply_batch(batch) {
            Ok(()) => self.db.flush_async().await.map(|_| ()),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                if let Ok(mut c) = self.shared.counts.lock() {
                    c.outbox -= delivered.min(c.outbox);
                    c.outbox_audit -= delivered_audit.min(c.outbox_audit);
                    c.live_bytes += added;
                    publish_gauges(&c);
                }
                metrics::counter!("edge_cases_delivered_total").increment(delivered);
                metrics::counter!("edge_verdicts_received_total").increment(verdicts);
                for r in replies {
                    let _ = r.send(());
                }
            }
            Err(e) => {
                tracing::error!("store write failed: {e}; refusing ingest until restart");
                if let Ok(mut f) = self.shared.failed.lock() {
                    *f = Some(e.to_string());
                }
                // Replies dropped: the uplink sees the failure and acknowledges nothing.
            }
        }
    }

    fn failed(&self) -> Option<String> {
        self.shared.failed.lock().ok().and_then(|f| f.clone())
    }

    async fn commit(&mut self, group: Vec<Command>) {
        let started = Instant::now();
        let now = now_ms();
        let mut batch = sled::Batch::default();
        let mut waiting: Vec<(
            oneshot::Sender<Result<IngestOutcome, IngestError>>,
            IngestOutcome,
        )> = Vec::new();
        let mut seen_idem: HashSet<Vec<u8>> = HashSet::new();
        let mut completed: Vec<CompletedWindow> = Vec::new();
        let mut touched: HashSet<String> = HashSet::new();
        let mut added_bytes = 0u64;
        let mut added_records = 0u64;
        let mut dups = 0u64;
        let failed = self.failed();

        for cmd in group {
            match cmd {
                // Routed to `link_commit` by `run`; answered there.
                Command::Delivered(_, reply) | Command::Verdicts(_, reply) => {
                    drop(reply);
                }
                Command::SetPolicy(cfg, reply) => {
                    self.policy.set_config(cfg.clone());
                    if let Ok(mut p) = self.shared.policy.write() {
                        *p = cfg;
                    }
                    let _ = reply.send(());
                }
                Command::Ingest {
                    records,
                    est_bytes,
                    reply,
                } => {
                    if let Some(f) = &failed {
                        let _ = reply.send(Err(IngestError::new(
                            503,
                            format!("the store failed ({f}); restart the agent"),
                        )));
                        continue;
                    }
                    if !self.make_room(added_bytes + est_bytes) {
                        self.shared.full.store(true, Ordering::Relaxed);
                        metrics::counter!("edge_requests_refused_full_total").increment(1);
                        if let Ok(mut t) = self.shared.totals.lock() {
                            t.refused_full += 1;
                        }
                        let _ = reply.send(Err(IngestError::new(
                            503,
                            "the store is full of hard cases not yet delivered to the cloud; retry later",
                        )));
                        continue;
                    }
                    self.shared.full.store(false, Ordering::Relaxed);
                    let mut outcome = IngestOutcome::default();
                    let reply_index = waiting.len();
                    for r in records {
                        if let Some(id) = &r.id {
                            let k = keys::idem(&r.machine, id);
                            if seen_idem.contains(&k) || self.db.contains_key(&k).unwrap_or(false) {
                                outcome.duplicates += 1;
                                continue;
                            }
                            batch.insert(k.as_slice(), &self.next_record_seq.to_be_bytes()[..]);
                            added_bytes += (k.len() + 8) as u64;
                            seen_idem.insert(k);
                        }
                        let seq = self.next_record_seq;
                        self.next_record_seq += 1;
                        let stored = StoredRecord {
                            seq,
                            received_ms: now,
                            record: r,
                        };
                        added_records += 1;
                        outcome.accepted += 1;
                        let machine = stored.record.machine.clone();
                        let w = self.windows.entry(machine.clone()).or_default();
                        w.push(stored);
                        if w.len() >= WINDOW_LEN {
                            completed.push((machine.clone(), std::mem::take(w), reply_index));
                        }
                        touched.insert(machine);
                    }
                    dups += outcome.duplicates as u64;
                    waiting.push((reply, outcome));
                }
            }
        }
        if waiting.is_empty() {
            return;
        }

        // Complete windows → cases.
        self.duplicate_window_records = 0;
        let (new_cases, case_bytes) = self.decide_cases(completed, now, &mut batch, &mut waiting);
        added_bytes += case_bytes;
        added_records -= self.duplicate_window_records.min(added_records);

        // Open windows are stored whole, records included, under their machine.
        let mut replaced_bytes = 0u64;
        for m in &touched {
            replaced_bytes += self.pending_bytes.remove(m).unwrap_or(0);
            let key = keys::pending(m);
            match self.windows.get(m) {
                Some(w) if !w.is_empty() => match postcard::to_stdvec(w) {
                    Ok(v) => {
                        let size = (key.len() + v.len()) as u64;
                        added_bytes += size;
                        self.pending_bytes.insert(m.clone(), size);
                        batch.insert(key, v);
                    }
                    Err(e) => tracing::error!("encoding the open window of {m}: {e}"),
                },
                _ => {
                    self.windows.remove(m);
                    batch.remove(key);
                }
            }
        }
        if let Ok(v) = postcard::to_stdvec(&self.next_record_seq) {
            batch.insert(keys::meta("next_record_seq"), v);
        }
        if let Ok(v) = postcard::to_stdvec(&self.next_case_seq) {
            batch.insert(keys::meta("next_case_seq"), v);
        }
        if let Ok(v) = postcard::to_stdvec(self.policy.state()) {
            batch.insert(keys::meta("policy_state"), v);
        }

        let result = match self.db.apply_batch(batch) {
            Ok(()) => self.db.flush_async().await.map(|_| ()),
            Err(e) => Err(e),
        };
        let elapsed = started.elapsed();
        metrics::histogram!("edge_commit_seconds").record(elapsed.as_secs_f64());
        metrics::histogram!("edge_commit_records").record(added_records as f64);
        match result {
            Ok(()) => {
                let w = store::watermark::Watermark {
                    next_record_seq: self.next_record_seq,
                    next_case_seq: self.next_case_seq,
                };
                if let Err(e) = store::watermark::write(&self.data_dir, &w) {
                    tracing::warn!("writing the acknowledgement watermark: {e}");
                }
                if let Ok(mut c) = self.shared.counts.lock() {
                    c.records += added_records;
                    c.live_bytes = (c.live_bytes + added_bytes).saturating_sub(replaced_bytes);
                    c.pending_records = self.windows.values().map(|w| w.len() as u64).sum();
                    for e in &new_cases {
                        c.cases += 1;
                        match e.decision {
                            Decision::Local => c.cases_local += 1,
                            Decision::Hard => {
                                c.cases_hard += 1;
                                c.outbox += 1;
                                if e.reason == Reason::Audit {
                                    c.outbox_audit += 1;
                                }
                            }
                        }
                    }
                    publish_gauges(&c);
                }
                if let Ok(mut t) = self.shared.totals.lock() {
                    t.records_accepted += added_records;
                    t.records_duplicate += dups;
                    t.flushes += 1;
                    for e in &new_cases {
                        match e.decision {
                            Decision::Local => t.cases_local += 1,
                            Decision::Hard => t.cases_hard += 1,
                        }
                        if matches!(e.reason, Reason::OverShareBudget | Reason::OverRateBudget) {
                            t.cases_over_budget += 1;
                        }
                    }
                }
                metrics::counter!("edge_records_accepted_total").increment(added_records);
                metrics::counter!("edge_records_duplicate_total").increment(dups);
                metrics::counter!("edge_flushes_total").increment(1);
                for e in &new_cases {
                    metrics::counter!("edge_cases_total", "decision" => e.decision.as_str(), "reason" => e.reason.code())
                        .increment(1);
                }
                for (reply, outcome) in waiting {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                tracing::error!("store write failed: {e}; refusing ingest until restart");
                if let Ok(mut f) = self.shared.failed.lock() {
                    *f = Some(e.to_string());
                }
                for (reply, _) in waiting {
                    let _ = reply.send(Err(IngestError::new(
                        500,
                        format!("the store could not write the records: {e}"),
                    )));
                }
            }
        }
    }

    fn decide_cases(
        &mut self,
        completed: Vec<CompletedWindow>,
        now: i64,
        batch: &mut sled::Batch,
        waiting: &mut [(
            oneshot::Sender<Result<IngestOutcome, IngestError>>,
            IngestOutcome,
        )],
    ) -> (Vec<CaseEntry>, u64) {
        if completed.is_empty() {
            return (Vec::new(), 0);
        }
        let features: Vec<[f32; NUM_FEATURES]> = completed
            .iter()
            .map(|(_, w, _)| {
                extract(
                    w.iter()
                        .map(|s| &s.record)
                        .collect::<Vec<&Record>>()
                        .as_slice(),
                )
            })
            .collect();
        let t = Instant::now();
        let inferred = match self.student.infer(&features) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::error!("student inference failed: {e:#}; sending the cases to the cloud");
                None
            }
        };
        metrics::histogram!("edge_inference_seconds").record(t.elapsed().as_secs_f64());
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let mut bytes = 0u64;
        for (i, (machine, window, reply_index)) in completed.into_iter().enumerate() {
            let records: Vec<&Record> = window.iter().map(|s| &s.record).collect();
            let id = CaseId::of_window(&machine, records.as_slice());
            if !seen.insert(id) || self.db.contains_key(keys::case_id(&id)).unwrap_or(false) {
                // A window identical in content (machine, timestamps, ids, readings) to an
                // earlier case: already stored, once.
                self.duplicate_window_records += window.len() as u64;
                continue;
            }
            let (probs, ood) = match &inferred {
                Some(v) => (v[i].probs.clone(), v[i].ood),
                None => (vec![0.0; shared::schema::NUM_CLASSES], f32::MAX),
            };
            let u = Uncertainty::measure(&probs, ood);
            let start_ms = records.iter().map(|r| r.ts_ms).min().unwrap_or(0);
            let end_ms = records.iter().map(|r| r.ts_ms).max().unwrap_or(0);
            drop(records);
            let (decision, reason) = self.policy.decide(&id, &u, end_ms);
            let class = probs
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(c, _)| c as u8)
                .unwrap_or(0);
            let seq = self.next_case_seq;
            self.next_case_seq += 1;
            let entry = CaseEntry {
                seq,
                id,
                machine: machine.clone(),
                start_ms,
                end_ms,
                created_ms: now,
                record_seqs: window.iter().map(|s| s.seq).collect(),
                records: window,
                features: features[i].to_vec(),
                probs,
                class,
                ood,
                decision,
                reason,
                model: self.model_tag.clone(),
                outbox: if decision == Decision::Hard {
                    OutboxState::Queued
                } else {
                    OutboxState::NotQueued
                },
                records_removed: false,
            };
            let Ok(value) = postcard::to_stdvec(&entry) else {
                continue;
            };
            bytes += (9 + value.len() + 17 + 8) as u64;
            batch.insert(&keys::case(seq)[..], value);
            batch.insert(&keys::case_id(&id)[..], &seq.to_be_bytes()[..]);
            if decision == Decision::Hard {
                batch.insert(&keys::outbox(seq)[..], &id.0[..]);
                bytes += 9 + 16;
            }
            if let Some((_, outcome)) = waiting.get_mut(reply_index) {
                outcome.cases.push(CaseAnswer {
                    id: id.to_string(),
                    machine: machine.clone(),
                    class: entry.class_name(),
                    confidence: u.max_prob,
                    decision: decision.as_str(),
                    reason: reason.code(),
                });
            }
            out.push(entry);
        }
        (out, bytes)
    }

    fn live_bytes(&self) -> u64 {
        self.shared.counts.lock().map(|c| c.live_bytes).unwrap_or(0)
    }

    /// Evicts by value until `need` more bytes fit under the cap. `false` if they cannot.
    fn make_room(&mut self, need: u64) -> bool {
        if self.live_bytes() + need <= self.cap_bytes {
            return true;
        }
        // Evict down to 90% of the cap so that eviction does not run on every request.
        let target = self.cap_bytes.saturating_sub(self.cap_bytes / 10);
        while self.live_bytes() + need > target {
            if !self.evict_step() {
                break;
            }
        }
        self.live_bytes() + need <= self.cap_bytes
    }

    /// One eviction step, in order of value. `false` when nothing is evictable.
    fn evict_step(&mut self) -> bool {
        let audit = self
            .shared
            .counts
            .lock()
            .map(|c| c.outbox_audit)
            .unwrap_or(0);
        if audit > 0 && self.evict_audit_samples() {
            return true;
        }
        if self.remove_raw_records(EvictWhy::Cap) {
            return true;
        }
        self.remove_summaries(EvictWhy::Cap)
    }

    fn evict_audit_samples(&mut self) -> bool {
        let mut victims = Vec::new();
        for item in self.db.scan_prefix([keys::Prefix::Outbox as u8]) {
            let Ok((k, _)) = item else { break };
            if let Ok(Some(c)) = store::get_case_by_seq(&self.db, keys::seq_of(&k)) {
                if c.reason == Reason::Audit {
                    victims.push(c);
                    if victims.len() == STEP_CASES {
                        break;
                    }
                }
            }
        }
        if victims.is_empty() {
            if let Ok(mut c) = self.shared.counts.lock() {
                c.outbox_audit = 0;
            }
            return false;
        }
        let mut batch = sled::Batch::default();
        let mut freed = 0u64;
        let mut records = 0u64;
        for mut c in victims.iter().cloned() {
            batch.remove(&keys::outbox(c.seq)[..]);
            freed += 9 + 16;
            let (n, b) = self.remove_records_of(&mut c, &mut batch);
            records += n;
            freed += b;
            c.outbox = OutboxState::Evicted;
            freed += self.rewrite_case(&c, &mut batch);
        }
        if self.apply(batch) {
            let n = victims.len() as u64;
            if let Ok(mut c) = self.shared.counts.lock() {
                c.outbox -= n.min(c.outbox);
                c.outbox_audit -= n.min(c.outbox_audit);
                c.records -= records.min(c.records);
                c.live_bytes = c.live_bytes.saturating_sub(freed);
                publish_gauges(&c);
            }
            if let Ok(mut t) = self.shared.totals.lock() {
                t.evicted_audit_samples += n;
            }
            metrics::counter!("edge_evictions_total", "kind" => "audit_sample").increment(n);
            true
        } else {
            false
        }
    }

    /// Up to [`STEP_CASES`] cases from `cursor` on, created before `cutoff`, that `wanted`
    /// picks (with their stored size), and the cursor to continue from. Cases still queued
    /// are never picked; the uplink resets the cursors when it delivers one.
    fn oldest_cases(
        &self,
        cursor: u64,
        cutoff: i64,
        wanted: impl Fn(&CaseEntry) -> bool,
    ) -> (Vec<(CaseEntry, usize)>, u64) {
        let mut victims = Vec::new();
        let mut next_cursor = cursor;
        for item in self.db.range(keys::case(cursor)..keys::case(u64::MAX)) {
            let Ok((_, v)) = item else { break };
            let Ok(c) = postcard::from_bytes::<CaseEntry>(&v) else {
                continue;
            };
            if c.created_ms >= cutoff {
                break;
            }
            next_cursor = c.seq + 1;
            if wanted(&c) {
                victims.push((c, v.len()));
                if victims.len() == STEP_CASES {
                    break;
                }
            }
        }
        (victims, next_cursor)
    }

    /// Removes the raw records of handled cases, oldest first (eviction or retention).
    fn remove_raw_records(&mut self, why: EvictWhy) -> bool {
        let cutoff = match why {
            EvictWhy::Cap => i64::MAX,
            EvictWhy::Retention => {
                now_ms() - (self.store_cfg.record_retention_hours * 3_600_000.0) as i64
            }
        };
        let cursor = match why {
            EvictWhy::Cap => self.evict_records_cursor,
            EvictWhy::Retention => self.expire_records_cursor,
        };
        let (victims, next_cursor) =
            self.oldest_cases(cursor, cutoff, |c| c.handled() && !c.records_removed);
        let victims: Vec<CaseEntry> = victims.into_iter().map(|(c, _)| c).collect();
        match why {
            EvictWhy::Cap => self.evict_records_cursor = next_cursor,
            EvictWhy::Retention => self.expire_records_cursor = next_cursor,
        }
        if victims.is_empty() {
            return false;
        }
        let mut batch = sled::Batch::default();
        let mut freed = 0u64;
        let mut records = 0u64;
        for mut c in victims.iter().cloned() {
            let (n, b) = self.remove_records_of(&mut c, &mut batch);
            records += n;
            freed += b;
            freed += self.rewrite_case(&c, &mut batch);
        }
        if !self.apply(batch) {
            return false;
        }
        let n = victims.len() as u64;
        if let Ok(mut c) = self.shared.counts.lock() {
            c.records -= records.min(c.records);
            c.live_bytes = c.live_bytes.saturating_sub(freed);
            publish_gauges(&c);
        }
        if let Ok(mut t) = self.shared.totals.lock() {
            match why {
                EvictWhy::Cap => t.evicted_raw_records += n,
                EvictWhy::Retention => t.expired_raw_records += n,
            }
        }
        match why {
            EvictWhy::Cap => {
                metrics::counter!("edge_evictions_total", "kind" => "raw_records").increment(n)
            }
            EvictWhy::Retention => {
                metrics::counter!("edge_expired_total", "kind" => "raw_records").increment(n)
            }
        }
        true
    }

    /// Removes summaries of handled cases, oldest first (eviction or retention).
    fn remove_summaries(&mut self, why: EvictWhy) -> bool {
        let cutoff = match why {
            EvictWhy::Cap => i64::MAX,
            EvictWhy::Retention => {
                now_ms() - (self.store_cfg.case_retention_hours * 3_600_000.0) as i64
            }
        };
        let cursor = match why {
            EvictWhy::Cap => self.evict_summaries_cursor,
            EvictWhy::Retention => self.expire_cases_cursor,
        };
        let (mut victims, next_cursor) = self.oldest_cases(cursor, cutoff, CaseEntry::handled);
        match why {
            EvictWhy::Cap => self.evict_summaries_cursor = next_cursor,
            EvictWhy::Retention => self.expire_cases_cursor = next_cursor,
        }
        if victims.is_empty() {
            return false;
        }
        let mut batch = sled::Batch::default();
        let mut freed = 0u64;
        let mut records = 0u64;
        let (mut local, mut hard) = (0u64, 0u64);
        for (c, len) in victims.iter_mut() {
            if !c.records_removed {
                let (n, b) = self.remove_records_of(c, &mut batch);
                records += n;
                freed += b;
            }
            batch.remove(&keys::case(c.seq)[..]);
            batch.remove(&keys::case_id(&c.id)[..]);
            batch.remove(&keys::verdict(&c.id)[..]);
            freed += (9 + *len + 17 + 8) as u64;
            match c.decision {
                Decision::Local => local += 1,
                Decision::Hard => hard += 1,
            }
        }
        if !self.apply(batch) {
            return false;
        }
        let n = victims.len() as u64;
        if let Ok(mut c) = self.shared.counts.lock() {
            c.records -= records.min(c.records);
            c.cases -= n.min(c.cases);
            c.cases_local -= local.min(c.cases_local);
            c.cases_hard -= hard.min(c.cases_hard);
            c.live_bytes = c.live_bytes.saturating_sub(freed);
            publish_gauges(&c);
        }
        if let Ok(mut t) = self.shared.totals.lock() {
            match why {
                EvictWhy::Cap => t.evicted_case_summaries += n,
                EvictWhy::Retention => t.expired_case_summaries += n,
            }
        }
        match why {
            EvictWhy::Cap => {
                metrics::counter!("edge_evictions_total", "kind" => "case_summary").increment(n)
            }
            EvictWhy::Retention => {
                metrics::counter!("edge_expired_total", "kind" => "case_summary").increment(n)
            }
        }
        true
    }

    /// Queues removal of the idempotency keys of a case's records and empties its record
    /// list (the caller rewrites or deletes the case); (records, bytes of the keys).
    fn remove_records_of(&self, c: &mut CaseEntry, batch: &mut sled::Batch) -> (u64, u64) {
        let mut bytes = 0u64;
        for s in &c.records {
            if let Some(id) = &s.record.id {
                let ik = keys::idem(&s.record.machine, id);
                bytes += (ik.len() + 8) as u64;
                batch.remove(ik);
            }
        }
        let n = c.records.len() as u64;
        c.records = Vec::new();
        c.records_removed = true;
        (n, bytes)
    }

    /// Queues the rewrite of a case entry; returns the bytes saved (old − new).
    fn rewrite_case(&self, c: &CaseEntry, batch: &mut sled::Batch) -> u64 {
        let old = self
            .db
            .get(keys::case(c.seq))
            .ok()
            .flatten()
            .map_or(0, |v| v.len());
        match postcard::to_stdvec(c) {
            Ok(v) => {
                let saved = old.saturating_sub(v.len()) as u64;
                batch.insert(&keys::case(c.seq)[..], v);
                saved
            }
            Err(_) => 0,
        }
    }

    fn apply(&self, batch: sled::Batch) -> bool {
        match self.db.apply_batch(batch) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("eviction write failed: {e}");
                false
            }
        }
    }

    /// Retention, the disk cap, and the size gauges.
    fn janitor(&mut self) {
        let deadline = Instant::now() + Duration::from_millis(50);
        while Instant::now() < deadline && self.remove_raw_records(EvictWhy::Retention) {}
        while Instant::now() < deadline && self.remove_summaries(EvictWhy::Retention) {}
        if !self.make_room(0) {
            self.shared.full.store(true, Ordering::Relaxed);
        } else if self.live_bytes() < self.cap_bytes {
            // Room again (retention, or a raised cap): take input.
            self.shared.full.store(false, Ordering::Relaxed);
        }
        metrics::gauge!("edge_store_full").set(if self.shared.full.load(Ordering::Relaxed) {
            1.0
        } else {
            0.0
        });
        if let Ok(size) = self.db.size_on_disk() {
            metrics::gauge!("edge_store_disk_bytes").set(size as f64);
        }
    }
}

#[derive(Clone, Copy)]
enum EvictWhy {
    Cap,
    Retention,
}

fn publish_gauges(c: &Counts) {
    metrics::gauge!("edge_outbox_backlog").set(c.outbox as f64);
    metrics::gauge!("edge_store_live_bytes").set(c.live_bytes as f64);
    metrics::gauge!("edge_stored_records").set(c.records as f64);
    metrics::gauge!("edge_stored_cases").set(c.cases as f64);
    metrics::gauge!("edge_open_window_records").set(c.pending_records as f64);
}

#[cfg(test)]
mod tests {
    //! A model-based test: random sequences of ingest requests (with re-sent records) and
    //! restarts, against a trivial in-memory model of what must be stored.

    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Clone, Debug)]
    enum Op {
        /// Post records `ids` of machine `m`.
        Ingest(usize, Vec<u32>),
        /// Stop the committer and recover from the store.
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0usize..3, proptest::collection::vec(0u32..120, 1..40)).prop_map(|(m, ids)| Op::Ingest(m, ids)),
            1 => Just(Op::Restart),
        ]
    }

    fn record(m: usize, id: u32) -> Record {
        let mut readings = BTreeMap::new();
        for (i, ch) in shared::schema::CHANNELS.iter().enumerate() {
            readings.insert(ch.to_string(), f64::from(id) * 0.01 + i as f64);
        }
        Record {
            machine: format!("m{m}"),
            ts_ms: 1_700_000_000_000 + i64::from(id) * 1000,
            readings,
            message: None,
            id: Some(format!("r{id}")),
            extra: None,
        }
    }

    fn open(dir: &std::path::Path, student: &Arc<Student>) -> Pipeline {
        let db = store::open(dir, 1 << 20).expect("open");
        let (p, _) = Pipeline::new(
            dir.to_path_buf(),
            false,
            db,
            student.clone(),
            PolicyConfig::default(),
            StoreConfig::default(),
            u64::MAX,
        )
        .expect("recover");
        p
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn store_matches_model_across_resends_and_restarts(ops in proptest::collection::vec(op(), 1..25)) {
            let student = Arc::new(Student::embedded().expect("model"));
            let dir = tempfile::tempdir().expect("tempdir");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            // Model: per machine, the ids accepted, in order.
            let mut model: Vec<Vec<u32>> = vec![Vec::new(); 3];
            let mut pipeline = open(dir.path(), &student);
            for op in ops {
                match op {
                    Op::Restart => {
                        drop(pipeline);
                        pipeline = open(dir.path(), &student);
                    }
                    Op::Ingest(m, ids) => {
                        let (tx, rx) = oneshot::channel();
                        let records: Vec<Record> = ids.iter().map(|id| record(m, *id)).collect();
                        rt.block_on(pipeline.commit(vec![Command::Ingest { records, est_bytes: 0, reply: tx }]));
                        let outcome = rt.block_on(rx).expect("reply").expect("accepted");
                        let mut new = 0;
                        let mut expected_cases = 0;
                        for id in ids {
                            if !model[m].contains(&id) {
                                model[m].push(id);
                                new += 1;
                                if model[m].len().is_multiple_of(WINDOW_LEN) {
                                    expected_cases += 1;
                                }
                            }
                        }
                        prop_assert_eq!(outcome.accepted, new);
                        prop_assert_eq!(outcome.cases.len(), expected_cases);
                    }
                }
            }
            drop(pipeline);
            let db = store::open(dir.path(), 1 << 20).expect("open");
            let rec = store::recover(&db).expect("recover");
            let total: usize = model.iter().map(Vec::len).sum();
            prop_assert_eq!(rec.counts.records, total as u64);
            prop_assert_eq!(rec.counts.cases, model.iter().map(|v| (v.len() / WINDOW_LEN) as u64).sum::<u64>());
            for (m, ids) in model.iter().enumerate() {
                let open: Vec<String> = rec
                    .windows
                    .get(&format!("m{m}"))
                    .map(|w| w.iter().filter_map(|r| r.record.id.clone()).collect())
                    .unwrap_or_default();
                let want: Vec<String> = ids[ids.len() - ids.len() % WINDOW_LEN..].iter().map(|id| format!("r{id}")).collect();
                prop_assert_eq!(open, want, "open window of m{}", m);
            }
            // Every case holds the 16 records of its window, in arrival order.
            let (cases, _) = store::list_cases(&db, &store::CaseQuery { limit: 1000, ..Default::default() }).expect("list");
            for c in cases {
                let m: usize = c.machine[1..].parse().expect("machine");
                let ids: Vec<String> = c.records.iter().filter_map(|r| r.record.id.clone()).collect();
                let pos = model[m].iter().position(|id| format!("r{id}") == ids[0]).expect("first id in model");
                let want: Vec<String> = model[m][pos..pos + WINDOW_LEN].iter().map(|id| format!("r{id}")).collect();
                prop_assert_eq!(pos % WINDOW_LEN, 0);
                prop_assert_eq!(ids, want);
            }
        }
    }
}
