//! Incremental last-writer-wins sync of the state shared by the edge and the cloud.
//!
//! Sans-IO: nothing here touches a socket, a file or a clock. The link carries
//! [`Batch`]es and acknowledgements (plain `u64`s) in its own frames; the caller passes the
//! physical time in.
//!
//! # The map
//!
//! [`LwwMap`] is a map from (`Scope`, key) to an [`Entry`]: a hybrid-logical-clock
//! [`Timestamp`], the [`Role`] of the side that wrote it, and an opaque value (bytes the
//! caller encoded with postcard or JSON) or a tombstone. Deletes are writes: a tombstone
//! is ordered like any other entry and is kept, so a delete also wins over an older write
//! that arrives later. Two entries for one key are ordered by timestamp — wall
//! milliseconds, then the logical counter, then the writing node's id, so a tie between
//! two nodes goes to the higher node id — and, should two entries ever carry the very same
//! timestamp (only a faulty or forged peer can produce that), by origin and value, so the
//! order is total and merging is commutative, associative and idempotent whatever arrives.
//!
//! # Scopes and who may write them
//!
//! | scope | ownership | written by |
//! | --- | --- | --- |
//! | [`Scope::DesiredConfig`] | owned by [`Role::Cloud`] | operators, through the cloud (e.g. policy thresholds); the edge applies it at run time |
//! | [`Scope::ReportedState`] | owned by [`Role::Edge`] | the edge, reporting what it runs and how it is |
//! | [`Scope::Labels`] | shared | the cloud's verdicts and labels set at the edge alike; LWW decides |
//! | [`Scope::ModelAssignments`] | owned by [`Role::Cloud`] | the cloud's rollouts; an edge that rolls a model back reports it under `ReportedState` |
//!
//! In an owned scope only the owner's writes count: a local write by the other side is an
//! error ([`SyncError::NotOwner`]) and an incoming entry whose origin is not the owner is
//! refused and reported, whatever its timestamp. Within a scope (owned or shared), LWW by
//! timestamp decides between the writes that are allowed. [`Scope::ownership`] states the
//! rule for each scope. New scopes are only ever appended to the enum, so stored maps keep
//! decoding.
//!
//! An entry's origin is a claim made by its writer. A receiver checks it where it can: an
//! entry stamped with the peer's own node id must carry the peer's role, and one stamped
//! with our own node id must carry ours ([`SyncError::OriginMismatch`]). Entries relayed
//! from third nodes are taken on the word of the (mutually authenticated) peer.
//!
//! # Incremental exchange
//!
//! Every change the map accepts — a local write, or a merged entry that won — gets the next
//! local sequence number; a key keeps only its latest one. [`LwwMap::changes_since`] lists
//! the keys changed after a sequence number, in sequence order, as a [`Batch`] that says
//! which range it covers (`after`, `upto`). The receiver merges it ([`LwwMap::merge`],
//! which reports what changed and what was refused, with the reason) and acknowledges
//! `upto`; the sender keeps that acknowledgement as the peer's cursor and next time sends
//! only what changed after it. An entry that does not change the receiver's map (it already
//! had it, or something newer) gets no new sequence number, so echoes die out: two peers
//! syncing back and forth reach a state with nothing left to send.
//!
//! [`SyncSession`] holds the cursors for one peer and drives this: [`SyncSession::next_batch`],
//! [`SyncSession::accept_batch`] (which also advances our clock by each incoming timestamp)
//! and [`SyncSession::accept_ack`]. Batches may be lost, duplicated or reordered: merging is
//! idempotent and order-independent, and the receiver only advances its acknowledgement over
//! a batch that continues where the previous one it acknowledged ended, so a lost batch is
//! never acknowledged by a later one; [`SyncSession::rewind`] (on reconnect, or when an ack is
//! overdue) sends everything not acknowledged again.
//!
//! # Clock skew
//!
//! Every incoming timestamp goes through [`Hlc::observe`] with the receiver's physical time.
//! An entry whose wall time is more than the clock's `max_drift_ms` ahead of the receiver's
//! physical clock is refused with [`SyncError::ClockSkew`]: it is not applied, does not move
//! the receiver's clock, and is listed among the rejected entries of the merge report. The
//! batch is still acknowledged — a refused entry is a decision, not a loss — so one bad entry
//! does not stall the link. Without this, a node whose clock ran a day ahead would stamp
//! writes that beat every correct write to the same keys for a day, and would drag every
//! clock it talks to a day ahead as well. With it, no accepted timestamp is more than
//! `max_drift_ms` ahead of the receiver, so a key can be pinned for at most that long. The
//! node with the bad clock keeps its own refused entries (its map then differs from its
//! peers' on those keys until one of them writes the key again); fix its clock.
//!
//! # Limits
//!
//! Keys are 1 to [`MAX_KEY_LEN`] bytes, values at most [`MAX_VALUE_LEN`] bytes. A local
//! write over a limit is an error; an incoming entry over a limit is refused and reported.
//! Nothing here panics on input. [`LwwMap::changes_since`] also bounds a batch by an
//! encoded-size budget, so a batch always fits the frame it travels in.
//!
//! # Persistence
//!
//! [`LwwMap`] and [`SyncSession`] are serde types (postcard-friendly), with `to_bytes` /
//! `from_bytes` helpers; decoding a map checks it (limits, ownership, sequence numbers).
//! The clock is restored with [`Hlc::resume`] from its last timestamp (or
//! [`LwwMap::max_timestamp`], whichever is later). Store a map and its sessions' cursors
//! together, in one transaction: a cursor that got ahead of its map (a map restored from
//! an older snapshot) would skip changes. A session restored from bytes resends whatever
//! was in flight and not acknowledged.

use std::collections::btree_map::Entry as Slot;
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::hlc::{ClockError, Hlc, Timestamp};

/// The longest key, in bytes.
pub const MAX_KEY_LEN: usize = 256;
/// The largest value, in bytes.
pub const MAX_VALUE_LEN: usize = 64 * 1024;
/// Upper bound of the postcard encoding of one [`BatchEntry`] beyond its key and value bytes.
pub const ENTRY_OVERHEAD: usize = 40;
/// Upper bound of the postcard encoding of a [`Batch`] beyond its entries.
pub const BATCH_OVERHEAD: usize = 32;

/// The two sides of the system.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// The cloud core (operators write through it).
    Cloud,
    /// An edge agent on a gateway.
    Edge,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Cloud => "cloud",
            Role::Edge => "edge",
        })
    }
}

/// Who may write a scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ownership {
    /// Only this side's writes count; the other side's are refused whatever their timestamp.
    OwnedBy(Role),
    /// Both sides write; the later write by HLC timestamp wins (tie: the higher node id).
    Shared,
}

impl Ownership {
    /// Whether a write originating from `writer` is allowed.
    pub fn permits(self, writer: Role) -> bool {
        match self {
            Ownership::OwnedBy(owner) => owner == writer,
            Ownership::Shared => true,
        }
    }
}

/// The parts of the shared state. New scopes are appended, never inserted (the enum's
/// index is its encoding).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Scope {
    /// Device configuration set by operators in the cloud and applied by the edge at run
    /// time (e.g. the hard-case policy's thresholds). Owned by the cloud.
    DesiredConfig,
    /// State reported by the edge (model in use, health, counters). Owned by the edge.
    ReportedState,
    /// Labels and verdicts of cases, from the cloud's verdicts or set at the edge. Shared.
    Labels,
    /// Which model each device should run (rollouts). Owned by the cloud.
    ModelAssignments,
}

impl Scope {
    /// Every scope, in encoding order.
    pub const ALL: [Scope; 4] = [
        Scope::DesiredConfig,
        Scope::ReportedState,
        Scope::Labels,
        Scope::ModelAssignments,
    ];

    /// The ownership rule of this scope.
    pub fn ownership(self) -> Ownership {
        match self {
            Scope::DesiredConfig | Scope::ModelAssignments => Ownership::OwnedBy(Role::Cloud),
            Scope::ReportedState => Ownership::OwnedBy(Role::Edge),
            Scope::Labels => Ownership::Shared,
        }
    }

    /// The scope's name in snake case.
    pub fn name(self) -> &'static str {
        match self {
            Scope::DesiredConfig => "desired_config",
            Scope::ReportedState => "reported_state",
            Scope::Labels => "labels",
            Scope::ModelAssignments => "model_assignments",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One key's current write. The derived order (timestamp, then origin, then value) is the
/// last-writer-wins order: the greater entry wins.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Entry {
    /// When it was written, by which node (`ts.node`).
    pub ts: Timestamp,
    /// The side that wrote it.
    pub origin: Role,
    /// The value, or `None` for a tombstone (a delete).
    pub value: Option<Vec<u8>>,
}

impl Entry {
    /// Whether this entry is a delete.
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }
}

/// One change in a batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchEntry {
    /// The scope of the key.
    pub scope: Scope,
    /// The key.
    pub key: String,
    /// Its entry on the sender.
    pub entry: Entry,
}

/// Changes of a map after sequence number `after`, in sequence order, through `upto`.
///
/// Every key the sender changed in (`after`, `upto`] is either in the batch or was changed
/// again after `upto` (and comes in a later batch), so a receiver that has applied
/// everything through `after` may acknowledge `upto` once it has applied this batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// The sequence number the batch starts after (the receiver's last acknowledgement, as
    /// the sender knew it).
    pub after: u64,
    /// The sequence number to acknowledge once the batch is applied.
    pub upto: u64,
    /// The changes.
    pub entries: Vec<BatchEntry>,
}

impl Batch {
    /// Whether the batch carries no change.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The postcard encoding.
    pub fn to_bytes(&self) -> Result<Vec<u8>, SyncError> {
        postcard::to_stdvec(self).map_err(|e| SyncError::Decode(e.to_string()))
    }

    /// Decodes a postcard-encoded batch (the entries are checked when merged).
    pub fn from_bytes(bytes: &[u8]) -> Result<Batch, SyncError> {
        decode_exact(bytes)
    }
}

/// Errors of local writes and acknowledgements, and the reasons incoming entries are
/// refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    /// The key is empty.
    #[error("empty key")]
    EmptyKey,
    /// The key is longer than [`MAX_KEY_LEN`].
    #[error("key of {len} bytes is over the limit of {max} bytes")]
    KeyTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The value is larger than [`MAX_VALUE_LEN`].
    #[error("value of {len} bytes is over the limit of {max} bytes")]
    ValueTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A write in a scope owned by the other side.
    #[error("scope `{scope}` is owned by the {owner}; a write from the {writer} is refused")]
    NotOwner {
        /// The scope.
        scope: Scope,
        /// The side the write came from.
        writer: Role,
        /// The side that owns the scope.
        owner: Role,
    },
    /// An entry stamped by a node whose role is known claims the other role.
    #[error("entry stamped by node {node} claims to come from the {claimed}, but that node is the {actual}")]
    OriginMismatch {
        /// The node id in the entry's timestamp.
        node: u64,
        /// The origin the entry claims.
        claimed: Role,
        /// The role of that node.
        actual: Role,
    },
    /// An entry from a clock too far in the future.
    #[error("entry refused: {0}")]
    ClockSkew(#[from] ClockError),
    /// The peer acknowledged a sequence number this map never issued.
    #[error("acknowledgement of sequence number {upto}, but the map's last is {last_seq}")]
    AckAhead {
        /// The acknowledged sequence number.
        upto: u64,
        /// The map's last sequence number.
        last_seq: u64,
    },
    /// Bytes that are not a valid encoding.
    #[error("cannot decode: {0}")]
    Decode(String),
}

/// An incoming entry that was not applied, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// The entry's scope.
    pub scope: Scope,
    /// The entry's key.
    pub key: String,
    /// The entry's timestamp.
    pub ts: Timestamp,
    /// Why it was refused.
    pub reason: SyncError,
}

/// A key, with its scope.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ScopedKey {
    /// The scope.
    pub scope: Scope,
    /// The key.
    pub key: String,
}

/// What a merge did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MergeReport {
    /// Keys whose entry changed (each got a new local sequence number), in batch order.
    pub changed: Vec<ScopedKey>,
    /// Entries refused, with the reason.
    pub rejected: Vec<Rejected>,
}

/// What [`SyncSession::accept_batch`] did, and the acknowledgement to send back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// Changed and refused entries.
    pub report: MergeReport,
    /// The sequence number to acknowledge to the peer (send it even if it did not move).
    pub ack: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Stored {
    entry: Entry,
    seq: u64,
}

/// The last-writer-wins map of one node. See the [module documentation](self).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "MapRepr")]
pub struct LwwMap {
    role: Role,
    last_seq: u64,
    scopes: BTreeMap<Scope, BTreeMap<String, Stored>>,
    by_seq: BTreeMap<u64, (Scope, String)>,
}

fn check_key(key: &str) -> Result<(), SyncError> {
    if key.is_empty() {
        Err(SyncError::EmptyKey)
    } else if key.len() > MAX_KEY_LEN {
        Err(SyncError::KeyTooLong {
            len: key.len(),
            max: MAX_KEY_LEN,
        })
    } else {
        Ok(())
    }
}

fn check_value(value: Option<&[u8]>) -> Result<(), SyncError> {
    match value {
        Some(v) if v.len() > MAX_VALUE_LEN => Err(SyncError::ValueTooLarge {
            len: v.len(),
            max: MAX_VALUE_LEN,
        }),
        _ => Ok(()),
    }
}

fn check_owner(scope: Scope, writer: Role) -> Result<(), SyncError> {
    match scope.ownership() {
        Ownership::OwnedBy(owner) if owner != writer => Err(SyncError::NotOwner {
            scope,
            writer,
            owner,
        }),
        _ => Ok(()),
    }
}

/// Everything an entry must satisfy to be stored, whoever sent it.
fn check_entry(scope: Scope, key: &str, entry: &Entry) -> Result<(), SyncError> {
    check_key(key)?;
    check_value(entry.value.as_deref())?;
    check_owner(scope, entry.origin)
}

fn entry_size_bound(key: &str, entry: &Entry) -> usize {
    ENTRY_OVERHEAD + key.len() + entry.value.as_ref().map_or(0, Vec::len)
}

fn decode_exact<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, SyncError> {
    let (v, rest) =
        postcard::take_from_bytes::<T>(bytes).map_err(|e| SyncError::Decode(e.to_string()))?;
    if rest.is_empty() {
        Ok(v)
    } else {
        Err(SyncError::Decode(format!(
            "{} trailing bytes after the value",
            rest.len()
        )))
    }
}

impl LwwMap {
    /// An empty map for a node playing `role`.
    pub fn new(role: Role) -> LwwMap {
        LwwMap {
            role,
            last_seq: 0,
            scopes: BTreeMap::new(),
            by_seq: BTreeMap::new(),
        }
    }

    /// The role of the node this map belongs to (checked on local writes).
    pub fn role(&self) -> Role {
        self.role
    }

    /// The sequence number of the latest change (0 for a map that never changed).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Number of keys, tombstones included.
    pub fn len(&self) -> usize {
        self.by_seq.len()
    }

    /// Whether the map holds no key (not even a tombstone).
    pub fn is_empty(&self) -> bool {
        self.by_seq.is_empty()
    }

    /// The current value of a key; `None` if it is absent or deleted.
    pub fn get(&self, scope: Scope, key: &str) -> Option<&[u8]> {
        self.entry(scope, key)?.value.as_deref()
    }

    /// The current entry of a key, tombstones included.
    pub fn entry(&self, scope: Scope, key: &str) -> Option<&Entry> {
        Some(&self.scopes.get(&scope)?.get(key)?.entry)
    }

    /// The local sequence number of a key's current entry.
    pub fn seq_of(&self, scope: Scope, key: &str) -> Option<u64> {
        Some(self.scopes.get(&scope)?.get(key)?.seq)
    }

    /// Every entry, tombstones included, by scope and key.
    pub fn iter(&self) -> impl Iterator<Item = (Scope, &str, &Entry)> + '_ {
        self.scopes.iter().flat_map(|(scope, keys)| {
            keys.iter()
                .map(move |(key, stored)| (*scope, key.as_str(), &stored.entry))
        })
    }

    /// The live (not deleted) values of one scope, by key.
    pub fn values(&self, scope: Scope) -> impl Iterator<Item = (&str, &[u8])> + '_ {
        self.scopes.get(&scope).into_iter().flat_map(|keys| {
            keys.iter()
                .filter_map(|(key, stored)| Some((key.as_str(), stored.entry.value.as_deref()?)))
        })
    }

    /// The greatest timestamp in the map: restore the clock to at least this.
    pub fn max_timestamp(&self) -> Option<Timestamp> {
        self.iter().map(|(_, _, e)| e.ts).max()
    }

    /// Writes `value` (a tombstone if `None`) under a fresh timestamp from `hlc`, as this
    /// map's role. Refused in a scope owned by the other side, or over a size limit.
    /// Returns the new entry's timestamp.
    pub fn write(
        &mut self,
        hlc: &mut Hlc,
        scope: Scope,
        key: &str,
        value: Option<Vec<u8>>,
        physical_ms: u64,
    ) -> Result<Timestamp, SyncError> {
        check_key(key)?;
        check_value(value.as_deref())?;
        check_owner(scope, self.role)?;
        let mut ts = hlc.now(physical_ms);
        if let Some(current) = self.entry(scope, key) {
            if current.ts >= ts {
                // A clock restored below the map's entries: catch up first, so a local
                // write always wins. Observing at the entry's own wall time cannot fail.
                ts = hlc.observe(current.ts, current.ts.wall_ms)?;
            }
        }
        let entry = Entry {
            ts,
            origin: self.role,
            value,
        };
        self.apply(scope, key.to_owned(), entry);
        Ok(ts)
    }

    /// Stores `value` under `key`: [`LwwMap::write`] with a value.
    pub fn put(
        &mut self,
        hlc: &mut Hlc,
        scope: Scope,
        key: &str,
        value: Vec<u8>,
        physical_ms: u64,
    ) -> Result<Timestamp, SyncError> {
        self.write(hlc, scope, key, Some(value), physical_ms)
    }

    /// Deletes `key` (writes a tombstone): [`LwwMap::write`] without a value.
    pub fn delete(
        &mut self,
        hlc: &mut Hlc,
        scope: Scope,
        key: &str,
        physical_ms: u64,
    ) -> Result<Timestamp, SyncError> {
        self.write(hlc, scope, key, None, physical_ms)
    }

    /// The changes after sequence number `after`, in sequence order: at most `max_entries`
    /// (at least 1) and, past the first entry, at most `max_bytes` of postcard encoding for
    /// the whole batch. `upto` is the last sequence number the batch covers.
    pub fn changes_since(&self, after: u64, max_entries: usize, max_bytes: usize) -> Batch {
        let max_entries = max_entries.max(1);
        let mut bytes = BATCH_OVERHEAD;
        let mut entries = Vec::new();
        let mut upto = after.max(self.last_seq);
        for (&seq, (scope, key)) in self.by_seq.range(after.saturating_add(1)..) {
            let Some(stored) = self.scopes.get(scope).and_then(|keys| keys.get(key)) else {
                continue;
            };
            let size = entry_size_bound(key, &stored.entry);
            if entries.len() == max_entries
                || (!entries.is_empty() && bytes.saturating_add(size) > max_bytes)
            {
                // Stop before this entry: the batch covers everything below it.
                upto = seq - 1;
                break;
            }
            bytes = bytes.saturating_add(size);
            entries.push(BatchEntry {
                scope: *scope,
                key: key.clone(),
                entry: stored.entry.clone(),
            });
        }
        Batch {
            after,
            upto,
            entries,
        }
    }

    /// Merges incoming entries (a peer's batch): each is checked (limits, ownership, an
    /// origin that contradicts our own node id, a timestamp too far ahead of
    /// `physical_ms`), observed by `hlc`, and stored if it wins over the current entry.
    /// Refused entries are reported and change nothing, the clock included.
    pub fn merge(
        &mut self,
        entries: Vec<BatchEntry>,
        hlc: &mut Hlc,
        physical_ms: u64,
    ) -> MergeReport {
        let me = hlc.last().node;
        let mut report = MergeReport::default();
        for BatchEntry { scope, key, entry } in entries {
            let checked = check_entry(scope, &key, &entry)
                .and_then(|()| {
                    if entry.ts.node == me && entry.origin != self.role {
                        Err(SyncError::OriginMismatch {
                            node: me,
                            claimed: entry.origin,
                            actual: self.role,
                        })
                    } else {
                        Ok(())
                    }
                })
                .and_then(|()| Ok(hlc.observe(entry.ts, physical_ms)?));
            match checked {
                Ok(_) => {
                    let wins = self
                        .entry(scope, &key)
                        .is_none_or(|current| entry > *current);
                    if wins {
                        report.changed.push(ScopedKey {
                            scope,
                            key: key.clone(),
                        });
                        self.apply(scope, key, entry);
                    }
                }
                Err(reason) => report.rejected.push(Rejected {
                    scope,
                    key,
                    ts: entry.ts,
                    reason,
                }),
            }
        }
        report
    }

    /// Stores `entry` if it wins over the current one; returns whether it did. The entry
    /// must already be checked.
    fn apply(&mut self, scope: Scope, key: String, entry: Entry) -> bool {
        let seq = self.last_seq + 1;
        let keys = self.scopes.entry(scope).or_default();
        match keys.entry(key) {
            Slot::Occupied(mut slot) => {
                if entry <= slot.get().entry {
                    return false;
                }
                let old = slot.get().seq;
                let indexed = match self.by_seq.remove(&old) {
                    Some(indexed) => indexed,
                    None => (scope, slot.key().clone()),
                };
                slot.insert(Stored { entry, seq });
                self.by_seq.insert(seq, indexed);
            }
            Slot::Vacant(slot) => {
                self.by_seq.insert(seq, (scope, slot.key().clone()));
                slot.insert(Stored { entry, seq });
            }
        }
        self.last_seq = seq;
        true
    }

    /// The postcard encoding (see [`LwwMap::from_bytes`]).
    pub fn to_bytes(&self) -> Result<Vec<u8>, SyncError> {
        postcard::to_stdvec(self).map_err(|e| SyncError::Decode(e.to_string()))
    }

    /// Decodes and checks a map encoded by [`LwwMap::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<LwwMap, SyncError> {
        decode_exact(bytes)
    }
}

/// The encoded form of a map: its role, last sequence number and every entry with its
/// sequence number, in sequence order.
#[derive(Serialize)]
struct MapReprRef<'a> {
    role: Role,
    last_seq: u64,
    entries: Vec<(u64, Scope, &'a str, &'a Entry)>,
}

#[derive(Deserialize)]
struct MapRepr {
    role: Role,
    last_seq: u64,
    entries: Vec<(u64, Scope, String, Entry)>,
}

impl Serialize for LwwMap {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut entries: Vec<_> = self
            .scopes
            .iter()
            .flat_map(|(scope, keys)| {
                keys.iter()
                    .map(move |(key, s)| (s.seq, *scope, key.as_str(), &s.entry))
            })
            .collect();
        entries.sort_unstable_by_key(|e| e.0);
        MapReprRef {
            role: self.role,
            last_seq: self.last_seq,
            entries,
        }
        .serialize(serializer)
    }
}

impl TryFrom<MapRepr> for LwwMap {
    type Error = SyncError;

    fn try_from(repr: MapRepr) -> Result<LwwMap, SyncError> {
        let bad = |what: String| Err(SyncError::Decode(what));
        let mut map = LwwMap::new(repr.role);
        map.last_seq = repr.last_seq;
        for (seq, scope, key, entry) in repr.entries {
            check_entry(scope, &key, &entry)?;
            if seq == 0 || seq > repr.last_seq {
                return bad(format!(
                    "sequence number {seq} outside 1..={}",
                    repr.last_seq
                ));
            }
            if map.by_seq.contains_key(&seq) {
                return bad(format!("sequence number {seq} used twice"));
            }
            let keys = map.scopes.entry(scope).or_default();
            if keys.contains_key(&key) {
                return bad(format!("key `{key}` of scope `{scope}` stored twice"));
            }
            map.by_seq.insert(seq, (scope, key.clone()));
            keys.insert(key, Stored { entry, seq });
        }
        Ok(map)
    }
}

/// The sync state for one peer: how far the peer has acknowledged our changes, how far we
/// have sent them, and how far we have applied the peer's.
///
/// Serialisable; what was sent but not acknowledged is not kept, so a session restored from
/// bytes sends it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncSession {
    peer_node: u64,
    peer_role: Role,
    /// The peer has applied our changes through this sequence number (ours).
    acked: u64,
    /// We have sent our changes through this sequence number (ours); at least `acked`.
    #[serde(skip)]
    sent: u64,
    /// We have applied the peer's changes through this sequence number (the peer's).
    received: u64,
}

impl SyncSession {
    /// A session with nothing exchanged yet, with the peer's node id and role as its
    /// authenticated identity says.
    pub fn new(peer_node: u64, peer_role: Role) -> SyncSession {
        SyncSession {
            peer_node,
            peer_role,
            acked: 0,
            sent: 0,
            received: 0,
        }
    }

    /// The peer's node id.
    pub fn peer_node(&self) -> u64 {
        self.peer_node
    }

    /// The peer's role.
    pub fn peer_role(&self) -> Role {
        self.peer_role
    }

    /// The peer has applied our changes through this sequence number.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// We have sent our changes through this sequence number.
    pub fn sent(&self) -> u64 {
        self.sent.max(self.acked)
    }

    /// We have applied the peer's changes through this (peer's) sequence number: the
    /// acknowledgement we send.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Whether the peer has acknowledged every change of `map`.
    pub fn is_quiescent(&self, map: &LwwMap) -> bool {
        self.acked >= map.last_seq()
    }

    /// The next batch to send: changes not yet sent, bounded as in
    /// [`LwwMap::changes_since`]. `None` when everything has been sent. Batches may be
    /// sent back to back without waiting for acknowledgements.
    pub fn next_batch(
        &mut self,
        map: &LwwMap,
        max_entries: usize,
        max_bytes: usize,
    ) -> Option<Batch> {
        if self.acked > map.last_seq() {
            // The cursor is ahead of the map (a map restored from an older snapshot):
            // start over; sending everything again is always safe.
            self.acked = 0;
            self.sent = 0;
        }
        let from = self.sent();
        if from >= map.last_seq() {
            return None;
        }
        let batch = map.changes_since(from, max_entries, max_bytes);
        self.sent = batch.upto;
        Some(batch)
    }

    /// Applies a batch from the peer (see [`LwwMap::merge`]) and returns what changed, what
    /// was refused and the acknowledgement to send. Entries stamped with the peer's node
    /// id must carry the peer's role. The acknowledgement only moves over a batch that
    /// continues where the last acknowledged one ended; a batch after a gap is applied
    /// but not acknowledged, and the peer sends the gap again after [`SyncSession::rewind`].
    pub fn accept_batch(
        &mut self,
        map: &mut LwwMap,
        hlc: &mut Hlc,
        batch: Batch,
        physical_ms: u64,
    ) -> Received {
        let Batch {
            after,
            upto,
            entries,
        } = batch;
        let mut impostors = Vec::new();
        let entries: Vec<BatchEntry> = entries
            .into_iter()
            .filter_map(|e| {
                if e.entry.ts.node == self.peer_node && e.entry.origin != self.peer_role {
                    impostors.push(Rejected {
                        reason: SyncError::OriginMismatch {
                            node: self.peer_node,
                            claimed: e.entry.origin,
                            actual: self.peer_role,
                        },
                        scope: e.scope,
                        ts: e.entry.ts,
                        key: e.key,
                    });
                    None
                } else {
                    Some(e)
                }
            })
            .collect();
        let mut report = map.merge(entries, hlc, physical_ms);
        report.rejected.extend(impostors);
        if after <= self.received && upto >= after {
            self.received = self.received.max(upto);
        }
        Received {
            report,
            ack: self.received,
        }
    }

    /// Records the peer's acknowledgement. Stale (lower) ones are harmless; one beyond
    /// the map's last sequence number is refused.
    pub fn accept_ack(&mut self, upto: u64, map: &LwwMap) -> Result<(), SyncError> {
        if upto > map.last_seq() {
            return Err(SyncError::AckAhead {
                upto,
                last_seq: map.last_seq(),
            });
        }
        self.acked = self.acked.max(upto);
        self.sent = self.sent.max(self.acked);
        Ok(())
    }

    /// A new connection: the peer says it has applied our changes through
    /// `peer_received`. That becomes the cursor, even if it is lower than the last
    /// acknowledgement (a peer restored from an older copy of its state gets the rest
    /// again); one beyond the map's last sequence number (we lost state) starts over.
    /// Whatever was sent and not acknowledged is sent again.
    pub fn reconnect(&mut self, peer_received: u64, map: &LwwMap) {
        self.acked = if peer_received > map.last_seq() {
            0
        } else {
            peer_received
        };
        self.sent = self.acked;
    }

    /// Forgets what was sent but not acknowledged, so it is sent again: call on
    /// reconnect, or when an acknowledgement is overdue.
    pub fn rewind(&mut self) {
        self.sent = self.acked;
    }

    /// The postcard encoding.
    pub fn to_bytes(&self) -> Result<Vec<u8>, SyncError> {
        postcard::to_stdvec(self).map_err(|e| SyncError::Decode(e.to_string()))
    }

    /// Decodes a session encoded by [`SyncSession::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<SyncSession, SyncError> {
        decode_exact(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::test_runner::Config;

    const DRIFT: u64 = 1_000;
    const ALL: usize = usize::MAX;

    type Contents = Vec<(Scope, String, Entry)>;

    fn contents(m: &LwwMap) -> Contents {
        m.iter()
            .map(|(s, k, e)| (s, k.to_owned(), e.clone()))
            .collect()
    }

    /// A clock that accepts any timestamp: for the merge algebra, apart from skew.
    fn any_clock() -> Hlc {
        Hlc::new(0, u64::MAX)
    }

    fn merge_into(dst: &mut LwwMap, src: &LwwMap) -> MergeReport {
        dst.merge(src.changes_since(0, ALL, ALL).entries, &mut any_clock(), 0)
    }

    fn union(maps: &[&LwwMap]) -> LwwMap {
        let mut out = LwwMap::new(Role::Cloud);
        for m in maps {
            merge_into(&mut out, m);
        }
        out
    }

    fn map_of(entries: Vec<BatchEntry>) -> LwwMap {
        let mut m = LwwMap::new(Role::Cloud);
        m.merge(entries, &mut any_clock(), 0);
        m
    }

    fn be(
        scope: Scope,
        key: &str,
        wall: u64,
        node: u64,
        origin: Role,
        v: Option<&[u8]>,
    ) -> BatchEntry {
        BatchEntry {
            scope,
            key: key.to_owned(),
            entry: Entry {
                ts: Timestamp {
                    wall_ms: wall,
                    logical: 0,
                    node,
                },
                origin,
                value: v.map(<[u8]>::to_vec),
            },
        }
    }

    fn other(role: Role) -> Role {
        match role {
            Role::Cloud => Role::Edge,
            Role::Edge => Role::Cloud,
        }
    }

    /// Entries over a small key and time space, so that conflicts and equal timestamps
    /// (with different values or origins) are common; origins may break ownership.
    fn arb_entry() -> impl Strategy<Value = BatchEntry> {
        (
            0..4usize,
            0..3u8,
            0u64..4,
            0u32..3,
            1u64..4,
            any::<bool>(),
            proptest::option::of(0u8..4),
        )
            .prop_map(|(s, k, wall_ms, logical, node, edge, v)| BatchEntry {
                scope: Scope::ALL[s],
                key: format!("k{k}"),
                entry: Entry {
                    ts: Timestamp {
                        wall_ms,
                        logical,
                        node,
                    },
                    origin: if edge { Role::Edge } else { Role::Cloud },
                    value: v.map(|b| vec![b]),
                },
            })
    }

    /// The expected map: per key, the greatest entry among those ownership permits.
    fn lww_expectation<'a>(entries: impl IntoIterator<Item = &'a BatchEntry>) -> Contents {
        let mut best: BTreeMap<(Scope, String), Entry> = BTreeMap::new();
        for e in entries {
            if !e.scope.ownership().permits(e.entry.origin) {
                continue;
            }
            let slot = best
                .entry((e.scope, e.key.clone()))
                .or_insert(e.entry.clone());
            if e.entry > *slot {
                *slot = e.entry.clone();
            }
        }
        best.into_iter().map(|((s, k), e)| (s, k, e)).collect()
    }

    // ----- the sync world: replicas in a star around a cloud, lossy links -----

    enum Msg {
        Batch { batch: Batch, forged: bool },
        Ack(u64),
    }

    struct Replica {
        map: LwwMap,
        hlc: Hlc,
        skew: u64,
        sessions: BTreeMap<usize, SyncSession>,
    }

    struct World {
        nodes: Vec<Replica>,
        ids: Vec<u64>,
        links: Vec<(usize, usize)>,
        chans: BTreeMap<(usize, usize), Vec<Msg>>,
        now: u64,
        written: Vec<BatchEntry>,
    }

    fn role_of(i: usize) -> Role {
        if i == 0 {
            Role::Cloud
        } else {
            Role::Edge
        }
    }

    impl World {
        /// Replica 0 is the cloud, the others are edges linked to it.
        fn new(ids: &[u64], skews: &[u64]) -> World {
            let n = ids.len();
            let mut links = Vec::new();
            for i in 1..n {
                links.push((0, i));
                links.push((i, 0));
            }
            let nodes = (0..n)
                .map(|i| Replica {
                    map: LwwMap::new(role_of(i)),
                    hlc: Hlc::new(ids[i], DRIFT),
                    skew: skews[i],
                    sessions: links
                        .iter()
                        .filter(|l| l.0 == i)
                        .map(|l| (l.1, SyncSession::new(ids[l.1], role_of(l.1))))
                        .collect(),
                })
                .collect();
            World {
                nodes,
                ids: ids.to_vec(),
                links,
                chans: BTreeMap::new(),
                now: 1_000_000,
                written: Vec::new(),
            }
        }

        fn physical(&self, i: usize) -> u64 {
            self.now + self.nodes[i].skew
        }

        fn write(
            &mut self,
            i: usize,
            scope: Scope,
            key: &str,
            value: Option<Vec<u8>>,
        ) -> Result<Timestamp, SyncError> {
            let p = self.physical(i);
            let node = &mut self.nodes[i];
            let before = node.map.last_seq();
            let r = node.map.write(&mut node.hlc, scope, key, value, p);
            match &r {
                Ok(_) => {
                    let entry = node.map.entry(scope, key).expect("just written").clone();
                    self.written.push(BatchEntry {
                        scope,
                        key: key.to_owned(),
                        entry,
                    });
                }
                Err(e) => {
                    assert!(matches!(e, SyncError::NotOwner { .. }), "{e}");
                    assert!(!scope.ownership().permits(role_of(i)));
                    assert_eq!(node.map.last_seq(), before);
                }
            }
            r
        }

        fn send(&mut self, link: usize, max_entries: usize) -> bool {
            let (a, b) = self.links[link];
            let node = &mut self.nodes[a];
            let session = node.sessions.get_mut(&b).expect("session");
            match session.next_batch(&node.map, max_entries, ALL) {
                Some(batch) => {
                    self.chans.entry((a, b)).or_default().push(Msg::Batch {
                        batch,
                        forged: false,
                    });
                    true
                }
                None => false,
            }
        }

        /// Hands message `pick` of the channel of `link` to its receiver (keeping a copy
        /// in the channel if `duplicate`).
        fn deliver(&mut self, link: usize, pick: usize, duplicate: bool) {
            let (a, b) = self.links[link];
            let Some(chan) = self.chans.get_mut(&(a, b)) else {
                return;
            };
            if chan.is_empty() {
                return;
            }
            let i = pick % chan.len();
            let msg = if duplicate {
                match &chan[i] {
                    Msg::Batch { batch, forged } => Msg::Batch {
                        batch: batch.clone(),
                        forged: *forged,
                    },
                    Msg::Ack(u) => Msg::Ack(*u),
                }
            } else {
                chan.remove(i)
            };
            let p = self.physical(b);
            let node = &mut self.nodes[b];
            let session = node.sessions.get_mut(&a).expect("session");
            match msg {
                Msg::Batch { batch, forged } => {
                    let n = batch.entries.len();
                    let got = session.accept_batch(&mut node.map, &mut node.hlc, batch, p);
                    if forged {
                        assert_eq!(got.report.rejected.len(), n, "{:?}", got.report);
                        assert!(got.report.changed.is_empty());
                    } else {
                        assert!(got.report.rejected.is_empty(), "{:?}", got.report.rejected);
                    }
                    self.chans
                        .entry((b, a))
                        .or_default()
                        .push(Msg::Ack(got.ack));
                }
                Msg::Ack(upto) => {
                    session
                        .accept_ack(upto, &node.map)
                        .expect("acks never run ahead");
                }
            }
        }

        fn drop_msg(&mut self, link: usize, pick: usize) {
            if let Some(chan) = self.chans.get_mut(&self.links[link]) {
                if !chan.is_empty() {
                    let i = pick % chan.len();
                    chan.remove(i);
                }
            }
        }

        fn rewind(&mut self, link: usize) {
            let (a, b) = self.links[link];
            self.nodes[a]
                .sessions
                .get_mut(&b)
                .expect("session")
                .rewind();
        }

        /// A batch from `a` breaking the rules: an owned scope written by the non-owner,
        /// or an entry stamped with `a`'s own node id claiming the other role.
        fn forge(&mut self, link: usize, scope: usize, key: &str, own_node: bool) {
            let (a, b) = self.links[link];
            let (scope, origin) = if own_node {
                (Scope::Labels, other(role_of(a)))
            } else {
                let owned = [
                    Scope::DesiredConfig,
                    Scope::ReportedState,
                    Scope::ModelAssignments,
                ];
                let s = owned[scope % owned.len()];
                let Ownership::OwnedBy(owner) = s.ownership() else {
                    unreachable!("owned scopes only")
                };
                (s, other(owner))
            };
            let entry = Entry {
                ts: Timestamp {
                    wall_ms: self.now,
                    logical: 7,
                    node: self.ids[a],
                },
                origin,
                value: Some(b"forged".to_vec()),
            };
            let batch = Batch {
                after: 0,
                upto: 0,
                entries: vec![BatchEntry {
                    scope,
                    key: key.to_owned(),
                    entry,
                }],
            };
            self.chans.entry((a, b)).or_default().push(Msg::Batch {
                batch,
                forged: true,
            });
        }

        /// Drops whatever is in flight, rewinds every session and syncs over reliable
        /// links until nothing is left to send. Returns the number of rounds it took.
        fn settle(&mut self) -> usize {
            self.chans.clear();
            for n in &mut self.nodes {
                for s in n.sessions.values_mut() {
                    s.rewind();
                }
            }
            for round in 0..20 {
                let mut moved = false;
                for link in 0..self.links.len() {
                    while self.send(link, 3) {
                        moved = true;
                        self.deliver(link, 0, false);
                        let back = self
                            .links
                            .iter()
                            .position(|&(a, b)| (b, a) == self.links[link])
                            .expect("links come in pairs");
                        self.deliver(back, usize::MAX, false);
                    }
                }
                if !moved {
                    return round;
                }
            }
            panic!("sync did not quiesce in 20 rounds");
        }

        fn check_ownership(&self) {
            for node in &self.nodes {
                for (scope, key, e) in node.map.iter() {
                    assert!(
                        scope.ownership().permits(e.origin),
                        "{scope}/{key} written by the {}",
                        e.origin
                    );
                    let writer = self
                        .ids
                        .iter()
                        .position(|&id| id == e.ts.node)
                        .expect("a known node");
                    assert_eq!(role_of(writer), e.origin, "{scope}/{key}");
                }
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Write {
            node: usize,
            scope: usize,
            key: u8,
            value: Option<u8>,
        },
        Tick(u64),
        Send {
            link: usize,
            max_entries: usize,
        },
        Deliver {
            link: usize,
            pick: usize,
            duplicate: bool,
        },
        Drop {
            link: usize,
            pick: usize,
        },
        Rewind {
            link: usize,
        },
        Forge {
            link: usize,
            scope: usize,
            key: u8,
            own_node: bool,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..3usize, 0..4usize, 0..3u8, proptest::option::of(any::<u8>()))
                .prop_map(|(node, scope, key, value)| Op::Write { node, scope, key, value }),
            1 => (0u64..40).prop_map(Op::Tick),
            3 => (0..4usize, 1..4usize).prop_map(|(link, max_entries)| Op::Send { link, max_entries }),
            4 => (0..4usize, any::<usize>(), proptest::bool::weighted(0.2))
                .prop_map(|(link, pick, duplicate)| Op::Deliver { link, pick, duplicate }),
            1 => (0..4usize, any::<usize>()).prop_map(|(link, pick)| Op::Drop { link, pick }),
            1 => (0..4usize).prop_map(|link| Op::Rewind { link }),
            1 => (0..4usize, 0..3usize, 0..3u8, any::<bool>())
                .prop_map(|(link, scope, key, own_node)| Op::Forge { link, scope, key, own_node }),
        ]
    }

    fn run(world: &mut World, ops: &[Op]) {
        let n = world.nodes.len();
        let links = world.links.len();
        for o in ops {
            match *o {
                Op::Write {
                    node,
                    scope,
                    key,
                    value,
                } => {
                    let _ = world.write(
                        node % n,
                        Scope::ALL[scope],
                        &format!("k{key}"),
                        value.map(|v| vec![v]),
                    );
                }
                Op::Tick(ms) => world.now += ms,
                Op::Send { link, max_entries } => {
                    world.send(link % links, max_entries);
                }
                Op::Deliver {
                    link,
                    pick,
                    duplicate,
                } => world.deliver(link % links, pick, duplicate),
                Op::Drop { link, pick } => world.drop_msg(link % links, pick),
                Op::Rewind { link } => world.rewind(link % links),
                Op::Forge {
                    link,
                    scope,
                    key,
                    own_node,
                } => world.forge(link % links, scope, &format!("k{key}"), own_node),
            }
        }
    }

    fn world_setup() -> impl Strategy<Value = (Vec<u64>, Vec<u64>)> {
        (2..=3usize).prop_flat_map(|n| {
            (
                Just(vec![1u64, 2, 3])
                    .prop_shuffle()
                    .prop_map(move |mut v| {
                        v.truncate(n);
                        v
                    }),
                vec(0u64..300, n),
            )
        })
    }

    proptest! {
        #![proptest_config(Config::with_cases(256))]

        /// Maps as sets of entries: ⊔ is commutative, associative and idempotent, and an
        /// idempotent merge assigns no new sequence number.
        #[test]
        fn merge_is_commutative_associative_idempotent(
            a in vec(arb_entry(), 0..12),
            b in vec(arb_entry(), 0..12),
            c in vec(arb_entry(), 0..12),
        ) {
            let (ma, mb, mc) = (map_of(a), map_of(b), map_of(c));
            let ab = union(&[&ma, &mb]);
            prop_assert_eq!(contents(&ab), contents(&union(&[&mb, &ma])));
            let bc = union(&[&mb, &mc]);
            prop_assert_eq!(contents(&union(&[&ab, &mc])), contents(&union(&[&ma, &bc])));
            let mut again = ab.clone();
            for m in [&ab, &ma, &mb] {
                let r = merge_into(&mut again, m);
                prop_assert!(r.changed.is_empty() && r.rejected.is_empty());
                prop_assert_eq!(again.last_seq(), ab.last_seq());
            }
            prop_assert_eq!(&again, &ab);
        }

        /// Any order of the same entries, with duplicates, gives the same map: per key the
        /// greatest entry ownership permits; the rest are reported as refused.
        #[test]
        fn merge_ignores_order_and_duplicates(
            (entries, shuffled, dups) in vec(arb_entry(), 0..20).prop_flat_map(|v| {
                let n = v.len().max(1);
                (Just(v.clone()), Just(v).prop_shuffle(), vec(0..n, 0..10))
            })
        ) {
            let expected = lww_expectation(&entries);
            let mut reordered = shuffled.clone();
            for i in dups {
                if let Some(e) = shuffled.get(i) {
                    reordered.push(e.clone());
                }
            }
            let mut m = LwwMap::new(Role::Edge);
            let r = m.merge(reordered, &mut any_clock(), 0);
            prop_assert_eq!(contents(&m), expected.clone());
            prop_assert_eq!(contents(&map_of(entries.clone())), expected);
            let refused = entries.iter().filter(|e| !e.scope.ownership().permits(e.entry.origin)).count();
            prop_assert!(r.rejected.len() >= refused);
            let all_ownership = r.rejected.iter().all(|x| matches!(x.reason, SyncError::NotOwner { .. }));
            prop_assert!(all_ownership);
        }
    }

    proptest! {
        #![proptest_config(Config::with_cases(160))]

        /// Two or three replicas (a cloud and one or two edges), writes anywhere, batches
        /// lost, duplicated, reordered and resent, acks lost and stale, forged entries:
        /// ownership holds throughout, and once the links are reliable the replicas
        /// quiesce with identical maps — per key, the latest permitted write by HLC.
        #[test]
        fn any_interleaving_converges((ids, skews) in world_setup(), ops in vec(op(), 0..80)) {
            let mut world = World::new(&ids, &skews);
            run(&mut world, &ops);
            world.check_ownership();
            let rounds = world.settle();
            prop_assert!(rounds <= 4, "{rounds} rounds");
            world.check_ownership();
            let expected = lww_expectation(&world.written);
            for node in &world.nodes {
                prop_assert_eq!(contents(&node.map), expected.clone());
                for s in node.sessions.values() {
                    prop_assert!(s.is_quiescent(&node.map));
                }
            }
            // Quiescent: one more round sends nothing.
            prop_assert_eq!(world.settle(), 0);
        }

        /// Both sides write the same shared key without hearing from each other; after a
        /// sync both hold the later write by HLC — with fresh clocks, the later physical
        /// time, and on a tie the higher node id.
        #[test]
        fn concurrent_writes_converge_to_the_later(
            pc in 0u64..4, pe in 0u64..4, ids in Just(vec![1u64, 2]).prop_shuffle(),
            cloud_deletes in any::<bool>(),
        ) {
            let mut world = World::new(&ids, &[0, 0]);
            world.now = 100;
            world.nodes[0].skew = pc;
            world.nodes[1].skew = pe;
            let cloud_value = (!cloud_deletes).then(|| b"cloud".to_vec());
            let tc = world.write(0, Scope::Labels, "case-1", cloud_value.clone()).expect("shared");
            let te = world.write(1, Scope::Labels, "case-1", Some(b"edge".to_vec())).expect("shared");
            world.settle();
            let cloud_wins = if pc != pe { pc > pe } else { ids[0] > ids[1] };
            prop_assert_eq!(cloud_wins, tc > te);
            let want = if cloud_wins { cloud_value } else { Some(b"edge".to_vec()) };
            for node in &world.nodes {
                prop_assert_eq!(node.map.get(Scope::Labels, "case-1").map(<[u8]>::to_vec), want.clone());
            }
        }

        /// Several conflicting writes per side between syncs: the greatest timestamp wins
        /// everywhere, in every scope both may write.
        #[test]
        fn conflicting_rounds_converge_to_the_greatest_timestamp(
            rounds in vec(vec((any::<bool>(), 0u64..3, any::<u8>()), 1..5), 1..4),
        ) {
            let mut world = World::new(&[5, 9], &[0, 40]);
            for writes in rounds {
                let mut best: Option<(Timestamp, u8)> = None;
                for (edge, tick, v) in writes {
                    world.now += tick;
                    let ts = world.write(usize::from(edge), Scope::Labels, "k", Some(vec![v])).expect("shared");
                    if best.is_none_or(|(t, _)| ts > t) {
                        best = Some((ts, v));
                    }
                }
                world.settle();
                for node in &world.nodes {
                    prop_assert_eq!(node.map.get(Scope::Labels, "k"), best.as_ref().map(|(_, v)| std::slice::from_ref(v)));
                }
            }
        }

        /// Maps and sessions survive a postcard round trip, and a restored session sends
        /// again what was in flight.
        #[test]
        fn postcard_round_trip((ids, skews) in world_setup(), ops in vec(op(), 0..40)) {
            let mut world = World::new(&ids, &skews);
            run(&mut world, &ops);
            for node in &world.nodes {
                let bytes = node.map.to_bytes().expect("encodes");
                let back = LwwMap::from_bytes(&bytes).expect("decodes");
                prop_assert_eq!(&back, &node.map);
                prop_assert_eq!(back.changes_since(0, ALL, ALL), node.map.changes_since(0, ALL, ALL));
                for s in node.sessions.values() {
                    let back = SyncSession::from_bytes(&s.to_bytes().expect("encodes")).expect("decodes");
                    prop_assert_eq!(back.acked(), s.acked());
                    prop_assert_eq!(back.received(), s.received());
                    prop_assert_eq!(back.sent(), s.acked());
                }
            }
        }

        /// Arbitrary bytes never panic the decoders.
        #[test]
        fn decoders_take_any_bytes(bytes in vec(any::<u8>(), 0..200)) {
            let _ = LwwMap::from_bytes(&bytes);
            let _ = SyncSession::from_bytes(&bytes);
            if let Ok(batch) = Batch::from_bytes(&bytes) {
                let mut m = LwwMap::new(Role::Edge);
                let mut s = SyncSession::new(1, Role::Cloud);
                let _ = s.accept_batch(&mut m, &mut Hlc::new(2, DRIFT), batch, 5_000);
            }
        }
    }

    #[test]
    fn ownership_is_explicit_per_scope() {
        assert_eq!(
            Scope::DesiredConfig.ownership(),
            Ownership::OwnedBy(Role::Cloud)
        );
        assert_eq!(
            Scope::ReportedState.ownership(),
            Ownership::OwnedBy(Role::Edge)
        );
        assert_eq!(Scope::Labels.ownership(), Ownership::Shared);
        assert_eq!(
            Scope::ModelAssignments.ownership(),
            Ownership::OwnedBy(Role::Cloud)
        );
        assert!(Ownership::Shared.permits(Role::Edge) && Ownership::Shared.permits(Role::Cloud));
        assert!(!Ownership::OwnedBy(Role::Cloud).permits(Role::Edge));
    }

    #[test]
    fn the_owner_wins_whatever_the_timestamps() {
        let mut edge = LwwMap::new(Role::Edge);
        let mut edge_clock = Hlc::new(2, DRIFT);
        let err = edge
            .put(
                &mut edge_clock,
                Scope::DesiredConfig,
                "press-07/policy",
                b"{}".to_vec(),
                10,
            )
            .expect_err("the edge does not own desired config");
        assert_eq!(
            err,
            SyncError::NotOwner {
                scope: Scope::DesiredConfig,
                writer: Role::Edge,
                owner: Role::Cloud
            }
        );
        assert!(err.to_string().contains("owned by the cloud"));
        assert!(edge.is_empty());

        // The cloud sets a threshold; an edge-originated entry with a later timestamp
        // arrives at the cloud and is refused, and the cloud's value stays.
        let mut cloud = LwwMap::new(Role::Cloud);
        let mut cloud_clock = Hlc::new(1, DRIFT);
        cloud
            .put(
                &mut cloud_clock,
                Scope::DesiredConfig,
                "press-07/policy",
                b"0.7".to_vec(),
                10,
            )
            .expect("owner");
        let r = cloud.merge(
            vec![be(
                Scope::DesiredConfig,
                "press-07/policy",
                500,
                2,
                Role::Edge,
                Some(b"0.1"),
            )],
            &mut cloud_clock,
            20,
        );
        assert!(r.changed.is_empty());
        assert!(matches!(r.rejected[0].reason, SyncError::NotOwner { .. }));
        assert_eq!(
            cloud.get(Scope::DesiredConfig, "press-07/policy"),
            Some(&b"0.7"[..])
        );
        assert_eq!(
            cloud_clock.last().wall_ms,
            10,
            "a refused entry does not move the clock"
        );

        // The edge owns reported state: the cloud may not write it.
        assert!(cloud
            .put(
                &mut cloud_clock,
                Scope::ReportedState,
                "press-07/model",
                vec![1],
                30
            )
            .is_err());
    }

    #[test]
    fn origins_must_match_known_nodes() {
        let mut cloud = LwwMap::new(Role::Cloud);
        let mut clock = Hlc::new(1, DRIFT);
        let mut session = SyncSession::new(2, Role::Edge);
        let batch = Batch {
            after: 0,
            upto: 2,
            entries: vec![
                // stamped by the peer (an edge) but claiming the cloud
                be(Scope::Labels, "a", 5, 2, Role::Cloud, Some(b"x")),
                // stamped with our own node id but claiming the edge
                be(Scope::Labels, "b", 5, 1, Role::Edge, Some(b"y")),
                be(Scope::Labels, "c", 5, 2, Role::Edge, Some(b"z")),
            ],
        };
        let got = session.accept_batch(&mut cloud, &mut clock, batch, 10);
        assert_eq!(got.report.changed.len(), 1);
        assert_eq!(got.report.rejected.len(), 2);
        assert!(got
            .report
            .rejected
            .iter()
            .all(|r| matches!(r.reason, SyncError::OriginMismatch { .. })));
        assert_eq!(got.ack, 2);
        assert_eq!(cloud.get(Scope::Labels, "c"), Some(&b"z"[..]));
    }

    #[test]
    fn limits_are_errors_not_panics() {
        let mut m = LwwMap::new(Role::Cloud);
        let mut c = Hlc::new(1, DRIFT);
        let long = "k".repeat(MAX_KEY_LEN + 1);
        assert_eq!(
            m.put(&mut c, Scope::Labels, "", vec![], 1),
            Err(SyncError::EmptyKey)
        );
        assert_eq!(
            m.put(&mut c, Scope::Labels, &long, vec![], 1),
            Err(SyncError::KeyTooLong {
                len: MAX_KEY_LEN + 1,
                max: MAX_KEY_LEN
            })
        );
        assert_eq!(
            m.put(&mut c, Scope::Labels, "k", vec![0; MAX_VALUE_LEN + 1], 1),
            Err(SyncError::ValueTooLarge {
                len: MAX_VALUE_LEN + 1,
                max: MAX_VALUE_LEN
            })
        );
        assert!(m.is_empty());
        let at_limit = "k".repeat(MAX_KEY_LEN);
        m.put(&mut c, Scope::Labels, &at_limit, vec![0; MAX_VALUE_LEN], 1)
            .expect("at the limits");
        let big = vec![0u8; MAX_VALUE_LEN + 1];
        let r = m.merge(
            vec![
                be(Scope::Labels, "", 1, 2, Role::Edge, None),
                be(Scope::Labels, &long, 1, 2, Role::Edge, None),
                be(Scope::Labels, "v", 1, 2, Role::Edge, Some(&big)),
            ],
            &mut c,
            1,
        );
        assert_eq!(r.rejected.len(), 3);
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn a_clock_far_in_the_future_cannot_pin_a_key() {
        let day = 86_400_000;
        let now = 1_700_000_000_000;
        // The edge's clock runs a day ahead; it writes a label.
        let mut edge = LwwMap::new(Role::Edge);
        let mut edge_clock = Hlc::new(2, DRIFT);
        edge.put(
            &mut edge_clock,
            Scope::Labels,
            "case-9",
            b"normal".to_vec(),
            now + day,
        )
        .expect("shared");
        edge.put(
            &mut edge_clock,
            Scope::Labels,
            "case-8",
            b"normal".to_vec(),
            now + day,
        )
        .expect("shared");

        let mut cloud = LwwMap::new(Role::Cloud);
        let mut cloud_clock = Hlc::new(1, DRIFT);
        let mut at_cloud = SyncSession::new(2, Role::Edge);
        let mut at_edge = SyncSession::new(1, Role::Cloud);
        let batch = at_edge.next_batch(&edge, 10, ALL).expect("changes");
        let got = at_cloud.accept_batch(&mut cloud, &mut cloud_clock, batch, now);
        assert!(got.report.changed.is_empty());
        assert_eq!(got.report.rejected.len(), 2);
        let reason = &got.report.rejected[0].reason;
        assert_eq!(
            *reason,
            SyncError::ClockSkew(ClockError::TooFarAhead {
                ahead_ms: day,
                max_drift_ms: DRIFT
            })
        );
        assert!(reason.to_string().contains("ahead"));
        assert_eq!(cloud_clock.last().wall_ms, 0, "not dragged into the future");
        // Refused, but acknowledged: the link does not stall on it.
        assert_eq!(got.ack, edge.last_seq());
        at_edge.accept_ack(got.ack, &edge).expect("ack");
        assert!(at_edge.is_quiescent(&edge));

        // The cloud's own verdict, written at the right time, holds at the cloud.
        cloud
            .put(
                &mut cloud_clock,
                Scope::Labels,
                "case-9",
                b"overheating".to_vec(),
                now + 1,
            )
            .expect("shared");
        assert_eq!(
            cloud.get(Scope::Labels, "case-9"),
            Some(&b"overheating"[..])
        );

        // An entry just within the drift is taken.
        let r = cloud.merge(
            vec![be(
                Scope::Labels,
                "case-7",
                now + DRIFT,
                2,
                Role::Edge,
                Some(b"x"),
            )],
            &mut cloud_clock,
            now,
        );
        assert_eq!(r.changed.len(), 1);
    }

    #[test]
    fn echoes_die_out() {
        let mut world = World::new(&[1, 2], &[0, 0]);
        world
            .write(
                0,
                Scope::DesiredConfig,
                "press-07/policy",
                Some(b"{\"max_prob\":0.7}".to_vec()),
            )
            .expect("cloud");
        world
            .write(
                1,
                Scope::ReportedState,
                "press-07/model",
                Some(b"sha256:ab".to_vec()),
            )
            .expect("edge");
        world.write(1, Scope::Labels, "case-1", None).expect("edge");
        // cloud → edge, edge → cloud (its own write and the echo), then nothing.
        assert!(world.send(0, 10));
        world.deliver(0, 0, false);
        world.deliver(1, 0, false);
        assert!(world.send(1, 10));
        world.deliver(1, 0, false);
        world.deliver(0, 0, false);
        let cloud_seq = world.nodes[0].map.last_seq();
        assert_eq!(
            cloud_seq, 3,
            "the echo of the cloud's write got no new number"
        );
        // The edge's two writes reach the cloud; the cloud sends them back once.
        assert!(world.send(0, 10));
        world.deliver(0, 0, false);
        world.deliver(1, 0, false);
        assert_eq!(world.nodes[1].map.last_seq(), 3);
        assert!(!world.send(0, 10) && !world.send(1, 10));
        assert!(world
            .nodes
            .iter()
            .all(|n| n.sessions.values().all(|s| s.is_quiescent(&n.map))));
        assert_eq!(contents(&world.nodes[0].map), contents(&world.nodes[1].map));
    }

    #[test]
    fn a_gap_is_not_acknowledged_and_rewind_fills_it() {
        let mut a = LwwMap::new(Role::Cloud);
        let mut ca = Hlc::new(1, DRIFT);
        for i in 0..6 {
            a.put(&mut ca, Scope::Labels, &format!("k{i}"), vec![i], 10)
                .expect("put");
        }
        let mut b = LwwMap::new(Role::Edge);
        let mut cb = Hlc::new(2, DRIFT);
        let mut to_b = SyncSession::new(2, Role::Edge);
        let mut from_a = SyncSession::new(1, Role::Cloud);
        let b1 = to_b.next_batch(&a, 2, ALL).expect("first");
        let b2 = to_b.next_batch(&a, 2, ALL).expect("second");
        let b3 = to_b.next_batch(&a, 2, ALL).expect("third");
        assert!(to_b.next_batch(&a, 2, ALL).is_none());
        assert_eq!((b1.after, b1.upto, b2.upto, b3.upto), (0, 2, 4, 6));
        // b2 is lost; b3 arrives: applied, but the ack stays at b1's end.
        assert_eq!(from_a.accept_batch(&mut b, &mut cb, b1, 10).ack, 2);
        let got = from_a.accept_batch(&mut b, &mut cb, b3, 10);
        assert_eq!(got.report.changed.len(), 2);
        assert_eq!(got.ack, 2);
        to_b.accept_ack(got.ack, &a).expect("ack");
        assert!(!to_b.is_quiescent(&a));
        to_b.rewind();
        let again = to_b.next_batch(&a, 10, ALL).expect("resend");
        assert_eq!((again.after, again.upto, again.entries.len()), (2, 6, 4));
        let got = from_a.accept_batch(&mut b, &mut cb, again, 10);
        assert_eq!(got.ack, 6);
        to_b.accept_ack(got.ack, &a).expect("ack");
        assert!(to_b.is_quiescent(&a));
        assert_eq!(contents(&a), contents(&b));
        // A stale ack is harmless; one ahead of the map is refused.
        to_b.accept_ack(1, &a).expect("stale");
        assert_eq!(to_b.acked(), 6);
        assert_eq!(
            to_b.accept_ack(7, &a),
            Err(SyncError::AckAhead {
                upto: 7,
                last_seq: 6
            })
        );
    }

    #[test]
    fn batches_respect_the_byte_budget() {
        let mut m = LwwMap::new(Role::Cloud);
        let mut c = Hlc::new(u64::MAX, DRIFT);
        for i in 0..20u8 {
            m.put(
                &mut c,
                Scope::Labels,
                &format!("key-{i}"),
                vec![i; 1000],
                u64::MAX - 1_000,
            )
            .expect("put");
        }
        m.put(
            &mut c,
            Scope::Labels,
            &"x".repeat(MAX_KEY_LEN),
            vec![7; MAX_VALUE_LEN],
            u64::MAX - 1_000,
        )
        .expect("put");
        for budget in [0, 100, 2_000, 5_000, 70_000] {
            let mut after = 0;
            let mut seen = 0;
            loop {
                let b = m.changes_since(after, ALL, budget);
                if b.is_empty() {
                    assert_eq!(b.upto, m.last_seq());
                    break;
                }
                let len = b.to_bytes().expect("encodes").len();
                assert!(len <= budget || b.entries.len() == 1, "{len} > {budget}");
                assert!(b.upto > after);
                seen += b.entries.len();
                after = b.upto;
            }
            assert_eq!(seen, 21);
        }
        // Superseded keys are sent once, at their latest number.
        m.put(&mut c, Scope::Labels, "key-3", vec![], u64::MAX - 1_000)
            .expect("put");
        let b = m.changes_since(0, ALL, ALL);
        assert_eq!(b.entries.len(), 21);
        assert_eq!(b.entries.last().map(|e| e.key.as_str()), Some("key-3"));
        assert_eq!(m.changes_since(m.last_seq(), ALL, ALL).upto, m.last_seq());
    }

    #[test]
    fn a_local_write_wins_even_with_a_clock_restored_too_low() {
        let mut m = LwwMap::new(Role::Edge);
        let mut c = Hlc::new(2, DRIFT);
        m.put(
            &mut c,
            Scope::ReportedState,
            "health",
            b"ok".to_vec(),
            5_000,
        )
        .expect("put");
        // Restarted with a clock that forgot its last timestamp, and a physical clock behind.
        let mut fresh = Hlc::new(2, DRIFT);
        let ts = m
            .delete(&mut fresh, Scope::ReportedState, "health", 1_000)
            .expect("delete");
        assert!(
            ts > Timestamp {
                wall_ms: 5_000,
                logical: 0,
                node: 2
            }
        );
        assert_eq!(m.get(Scope::ReportedState, "health"), None);
        assert!(m
            .entry(Scope::ReportedState, "health")
            .is_some_and(Entry::is_tombstone));
        assert_eq!(m.max_timestamp(), Some(ts));
        assert_eq!(m.values(Scope::ReportedState).count(), 0);
    }

    #[test]
    fn a_cursor_ahead_of_its_map_starts_over() {
        let mut m = LwwMap::new(Role::Cloud);
        let mut c = Hlc::new(1, DRIFT);
        m.put(&mut c, Scope::Labels, "a", vec![1], 1).expect("put");
        m.put(&mut c, Scope::Labels, "b", vec![2], 1).expect("put");
        let mut s = SyncSession::new(2, Role::Edge);
        s.next_batch(&m, ALL, ALL).expect("batch");
        s.accept_ack(2, &m).expect("ack");
        let older = {
            let mut o = LwwMap::new(Role::Cloud);
            o.put(&mut Hlc::new(1, DRIFT), Scope::Labels, "a", vec![1], 1)
                .expect("put");
            o
        };
        let b = s.next_batch(&older, ALL, ALL).expect("everything again");
        assert_eq!((b.after, b.upto, b.entries.len()), (0, 1, 1));
    }

    /// The wire form of a batch is pinned: peers of different builds must agree on it.
    #[test]
    fn batch_encoding_is_stable() {
        let batch = Batch {
            after: 0,
            upto: 3,
            entries: vec![
                be(
                    Scope::Labels,
                    "case-1",
                    1_000_000,
                    3,
                    Role::Edge,
                    Some(b"overheating"),
                ),
                BatchEntry {
                    scope: Scope::DesiredConfig,
                    key: "press-07/policy".into(),
                    entry: Entry {
                        ts: Timestamp {
                            wall_ms: 999_500,
                            logical: 2,
                            node: 1,
                        },
                        origin: Role::Cloud,
                        value: Some(b"{\"max_prob\":0.7}".to_vec()),
                    },
                },
                be(Scope::Labels, "case-2", 1_000_200, 1, Role::Cloud, None),
            ],
        };
        let mut want = vec![0, 3, 3, 2, 6];
        want.extend_from_slice(b"case-1");
        want.extend_from_slice(&[192, 132, 61, 0, 3, 1, 1, 11]);
        want.extend_from_slice(b"overheating");
        want.extend_from_slice(&[0, 15]);
        want.extend_from_slice(b"press-07/policy");
        want.extend_from_slice(&[204, 128, 61, 2, 1, 0, 1, 16]);
        want.extend_from_slice(b"{\"max_prob\":0.7}");
        want.extend_from_slice(&[2, 6]);
        want.extend_from_slice(b"case-2");
        want.extend_from_slice(&[136, 134, 61, 0, 1, 0, 0]);
        assert_eq!(batch.to_bytes().expect("encodes"), want);
        assert_eq!(Batch::from_bytes(&want), Ok(batch));
    }

    #[test]
    fn decoding_checks_the_map() {
        let mut m = LwwMap::new(Role::Cloud);
        let mut c = Hlc::new(1, DRIFT);
        m.put(&mut c, Scope::DesiredConfig, "a", vec![1], 1)
            .expect("put");
        m.put(&mut c, Scope::Labels, "b", vec![2], 1).expect("put");
        let good = m.to_bytes().expect("encodes");
        assert_eq!(LwwMap::from_bytes(&good), Ok(m.clone()));
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(LwwMap::from_bytes(&trailing).is_err());

        let entry = |origin| Entry {
            ts: Timestamp::default(),
            origin,
            value: None,
        };
        let encode = |last_seq: u64, entries: Vec<(u64, Scope, &str, Entry)>| {
            let e: Vec<_> = entries
                .iter()
                .map(|(s, sc, k, e)| (*s, *sc, *k, e))
                .collect();
            postcard::to_stdvec(&MapReprRef {
                role: Role::Cloud,
                last_seq,
                entries: e,
            })
            .expect("encodes")
        };
        let bad = [
            encode(1, vec![(2, Scope::Labels, "a", entry(Role::Cloud))]),
            encode(2, vec![(0, Scope::Labels, "a", entry(Role::Cloud))]),
            encode(
                2,
                vec![
                    (1, Scope::Labels, "a", entry(Role::Cloud)),
                    (1, Scope::Labels, "b", entry(Role::Cloud)),
                ],
            ),
            encode(
                2,
                vec![
                    (1, Scope::Labels, "a", entry(Role::Cloud)),
                    (2, Scope::Labels, "a", entry(Role::Cloud)),
                ],
            ),
            encode(1, vec![(1, Scope::DesiredConfig, "a", entry(Role::Edge))]),
            encode(1, vec![(1, Scope::Labels, "", entry(Role::Edge))]),
        ];
        for b in bad {
            assert!(LwwMap::from_bytes(&b).is_err());
        }
    }
}
