//! One side's copy of the state it shares with one peer, and the sync stream's protocol.
//!
//! A [`Replica`] is an [`LwwMap`], its [`Hlc`] and the [`SyncSession`] cursors for the
//! peer, kept and stored together (so a cursor never gets ahead of its map). The cloud
//! keeps one replica per device — a device's desired config, reported state, labels and
//! model assignments are its own — and the edge keeps one, for the cloud. Entries are
//! therefore never relayed between devices, and every entry a side receives comes from the
//! one peer whose certificate it verified.
//!
//! Sans-IO like the rest of this crate: the caller passes the time in, sends what
//! [`Replica::outgoing`] returns on the sync stream, feeds what arrives to
//! [`Replica::handle`], and stores [`Replica::to_bytes`] whenever [`SyncStep::dirty`]
//! says so — before sending the acknowledgement it returns, so an acknowledged change is
//! never lost.
//!
//! Node ids are derived from identities both sides know ([`node_id`]): the cloud's from
//! the word `cloud`, a device's from its certified device id.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::frame::Message;
use crate::hlc::{Hlc, Timestamp};
use crate::sync::{LwwMap, Rejected, Role, Scope, ScopedKey, SyncError, SyncSession};

/// How far ahead of the receiver's clock an incoming write may be (60 s). A write from a
/// clock further in the future is refused (and reported); see [`crate::sync`].
pub const MAX_DRIFT_MS: u64 = 60_000;
/// Most entries per sync message.
pub const BATCH_ENTRIES: usize = 512;
/// Encoded-size budget per sync message (well under the frame limit).
pub const BATCH_BYTES: usize = 256 * 1024;

/// The sync node id of a side: the cloud's from `cloud`, an edge's from its device id.
pub fn node_id(role: Role, name: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(match role {
        Role::Cloud => b"cloud\0".as_slice(),
        Role::Edge => b"edge\0".as_slice(),
    });
    h.update(name.as_bytes());
    let d = h.finalize();
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// What handling one sync message did.
#[derive(Debug, Default, PartialEq)]
pub struct SyncStep {
    /// Send this back (the acknowledgement of a batch).
    pub reply: Option<Message>,
    /// Keys whose value changed here.
    pub changed: Vec<ScopedKey>,
    /// Incoming entries refused, with the reason.
    pub rejected: Vec<Rejected>,
    /// The replica changed: store it before sending `reply`.
    pub dirty: bool,
}

#[derive(Serialize, Deserialize)]
struct Repr {
    map: LwwMap,
    session: SyncSession,
    clock: Timestamp,
}

/// The shared state of this side with one peer. See the [module documentation](self).
#[derive(Clone, Debug)]
pub struct Replica {
    map: LwwMap,
    hlc: Hlc,
    session: SyncSession,
}

impl Replica {
    /// An empty replica of `role` (node `node`) for a peer of the other role (node
    /// `peer_node`).
    pub fn new(role: Role, node: u64, peer_node: u64) -> Replica {
        let peer_role = match role {
            Role::Cloud => Role::Edge,
            Role::Edge => Role::Cloud,
        };
        Replica {
            map: LwwMap::new(role),
            hlc: Hlc::new(node, MAX_DRIFT_MS),
            session: SyncSession::new(peer_node, peer_role),
        }
    }

    /// Restores a replica stored by [`Replica::to_bytes`]; its clock resumes above every
    /// timestamp it holds.
    pub fn from_bytes(bytes: &[u8], node: u64) -> Result<Replica, SyncError> {
        let (r, rest) = postcard::take_from_bytes::<Repr>(bytes)
            .map_err(|e| SyncError::Decode(e.to_string()))?;
        if !rest.is_empty() {
            return Err(SyncError::Decode(format!("{} trailing bytes", rest.len())));
        }
        let last = r.map.max_timestamp().map_or(r.clock, |t| t.max(r.clock));
        Ok(Replica {
            map: r.map,
            hlc: Hlc::resume(node, MAX_DRIFT_MS, last),
            session: r.session,
        })
    }

    /// The encoding to store.
    pub fn to_bytes(&self) -> Result<Vec<u8>, SyncError> {
        #[derive(Serialize)]
        struct ReprRef<'a> {
            map: &'a LwwMap,
            session: &'a SyncSession,
            clock: Timestamp,
        }
        postcard::to_stdvec(&ReprRef {
            map: &self.map,
            session: &self.session,
            clock: self.hlc.last(),
        })
        .map_err(|e| SyncError::Decode(e.to_string()))
    }

    /// The map.
    pub fn map(&self) -> &LwwMap {
        &self.map
    }

    /// The sync cursors.
    pub fn session(&self) -> &SyncSession {
        &self.session
    }

    /// The value of a key (`None` if absent or deleted).
    pub fn get(&self, scope: Scope, key: &str) -> Option<&[u8]> {
        self.map.get(scope, key)
    }

    /// A local write (a delete if `value` is `None`); refused in the other side's scope.
    pub fn write(
        &mut self,
        scope: Scope,
        key: &str,
        value: Option<Vec<u8>>,
        physical_ms: u64,
    ) -> Result<Timestamp, SyncError> {
        self.map
            .write(&mut self.hlc, scope, key, value, physical_ms)
    }

    /// Every entry by scope (values shown as JSON where they are JSON), with the cursors:
    /// what the operator API and the agent's `/v1/sync` show.
    pub fn describe(&self) -> serde_json::Value {
        let mut scopes = serde_json::Map::new();
        for (scope, key, e) in self.map.iter() {
            let value = e.value.as_deref().map(|v| {
                serde_json::from_slice(v)
                    .unwrap_or_else(|_| serde_json::Value::from(String::from_utf8_lossy(v)))
            });
            if let Some(o) = scopes
                .entry(scope.name())
                .or_insert_with(|| serde_json::json!({}))
                .as_object_mut()
            {
                o.insert(
                    key.to_string(),
                    serde_json::json!({
                        "value": value,
                        "deleted": e.is_tombstone(),
                        "written_ms": e.ts.wall_ms,
                        "by": e.origin.to_string(),
                    }),
                );
            }
        }
        serde_json::json!({
            "scopes": scopes,
            "pending": self.pending(),
            "received": self.received(),
        })
    }

    /// What we have applied of the peer's changes: the cursor sent on connecting.
    pub fn received(&self) -> u64 {
        self.session.received()
    }

    /// Changes the peer has not acknowledged.
    pub fn pending(&self) -> u64 {
        self.map.last_seq().saturating_sub(self.session.acked())
    }

    /// A new connection; the peer has applied our changes through `peer_received`.
    pub fn connected(&mut self, peer_received: u64) {
        self.session.reconnect(peer_received, &self.map);
    }

    /// The next batch to send, if any change has not been sent on this connection.
    pub fn outgoing(&mut self) -> Option<Message> {
        self.session
            .next_batch(&self.map, BATCH_ENTRIES, BATCH_BYTES)
            .map(Message::Sync)
    }

    /// Handles a message of the sync stream (`Sync` or `SyncAck`); any other message is
    /// an error naming it.
    pub fn handle(&mut self, msg: Message, physical_ms: u64) -> Result<SyncStep, SyncError> {
        match msg {
            Message::Sync(batch) => {
                let before = self.session.received();
                let r = self
                    .session
                    .accept_batch(&mut self.map, &mut self.hlc, batch, physical_ms);
                let dirty = !r.report.changed.is_empty() || r.ack != before;
                Ok(SyncStep {
                    reply: Some(Message::SyncAck { upto: r.ack }),
                    changed: r.report.changed,
                    rejected: r.report.rejected,
                    dirty,
                })
            }
            Message::SyncAck { upto } => {
                let before = self.session.acked();
                if upto > self.map.last_seq() {
                    // The peer has more of ours than we have (we were restored from an
                    // older copy): send everything again, which is always safe.
                    self.session.reconnect(upto, &self.map);
                    return Ok(SyncStep {
                        dirty: true,
                        ..SyncStep::default()
                    });
                }
                self.session.accept_ack(upto, &self.map)?;
                Ok(SyncStep {
                    dirty: self.session.acked() != before,
                    ..SyncStep::default()
                })
            }
            other => Err(SyncError::Decode(format!(
                "a {} message on the sync stream",
                other.kind()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Replica, Replica) {
        let c = node_id(Role::Cloud, "cloud");
        let e = node_id(Role::Edge, "press-01");
        (
            Replica::new(Role::Cloud, c, e),
            Replica::new(Role::Edge, e, c),
        )
    }

    /// Moves every pending message from `a` to `b` and the acks back, until quiet.
    fn exchange(a: &mut Replica, b: &mut Replica, now: u64) {
        for _ in 0..100 {
            if !one_way(a, b, now) & !one_way(b, a, now) {
                return;
            }
        }
        panic!("sync did not settle");
    }

    fn one_way(x: &mut Replica, y: &mut Replica, now: u64) -> bool {
        let mut sent = false;
        while let Some(m) = x.outgoing() {
            sent = true;
            let step = y.handle(m, now).expect("batch");
            let ack = step.reply.expect("ack");
            x.handle(ack, now).expect("ack");
        }
        sent
    }

    #[test]
    fn desired_config_written_offline_arrives_and_conflicts_go_to_the_later_write() {
        let (mut cloud, mut edge) = pair();
        cloud
            .write(Scope::DesiredConfig, "policy", Some(b"{}".to_vec()), 1_000)
            .expect("cloud owns desired config");
        assert!(edge
            .write(Scope::DesiredConfig, "policy", Some(b"x".to_vec()), 1_000)
            .is_err());
        // Both write one label while apart; the edge's write is later.
        cloud
            .write(Scope::Labels, "case-1", Some(b"cloud".to_vec()), 2_000)
            .expect("label");
        edge.write(Scope::Labels, "case-1", Some(b"edge".to_vec()), 3_000)
            .expect("label");
        edge.connected(cloud.received());
        cloud.connected(edge.received());
        exchange(&mut cloud, &mut edge, 4_000);
        assert_eq!(edge.get(Scope::DesiredConfig, "policy"), Some(&b"{}"[..]));
        assert_eq!(cloud.get(Scope::Labels, "case-1"), Some(&b"edge"[..]));
        assert_eq!(edge.get(Scope::Labels, "case-1"), Some(&b"edge"[..]));
        assert_eq!(cloud.pending(), 0);
        assert_eq!(edge.pending(), 0);
    }

    #[test]
    fn a_restored_replica_resumes_where_it_was_acknowledged() {
        let (mut cloud, mut edge) = pair();
        for i in 0..5 {
            cloud
                .write(Scope::DesiredConfig, &format!("k{i}"), Some(vec![i]), 1_000)
                .expect("write");
        }
        exchange(&mut cloud, &mut edge, 1_000);
        let stored = edge.to_bytes().expect("encode");
        let edge_node = node_id(Role::Edge, "press-01");
        let mut edge = Replica::from_bytes(&stored, edge_node).expect("decode");
        assert_eq!(edge.received(), cloud.map().last_seq());
        cloud
            .write(Scope::DesiredConfig, "k9", Some(vec![9]), 2_000)
            .expect("write");
        cloud.connected(edge.received());
        let Some(Message::Sync(b)) = cloud.outgoing() else {
            panic!("one batch")
        };
        assert_eq!(b.entries.len(), 1, "only what the edge has not applied");
        edge.handle(Message::Sync(b), 2_000).expect("batch");
        // A local write after restore is later than everything it holds.
        let ts = edge
            .write(Scope::Labels, "x", Some(vec![1]), 0)
            .expect("write");
        assert!(Some(ts) > cloud.map().entry(Scope::DesiredConfig, "k9").map(|e| e.ts));
        assert!(Replica::from_bytes(&stored[..stored.len() - 1], edge_node).is_err());
    }

    #[test]
    fn a_write_from_far_in_the_future_is_refused_and_still_acknowledged() {
        let (mut cloud, mut edge) = pair();
        edge.write(Scope::ReportedState, "stats", Some(vec![1]), 10_000_000)
            .expect("write");
        let m = edge.outgoing().expect("batch");
        let step = cloud.handle(m, 1_000).expect("handled");
        assert_eq!(step.rejected.len(), 1);
        assert!(step.changed.is_empty());
        assert!(matches!(step.reply, Some(Message::SyncAck { upto: 1 })));
        assert_eq!(cloud.get(Scope::ReportedState, "stats"), None);
    }
}
