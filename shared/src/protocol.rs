//! The edge–cloud protocol as sans-IO state machines: [`EdgeSession`] and [`CloudSession`]
//! take decoded messages and the current time, and return the messages to send and what
//! the caller must do (store cases, delete acknowledged outbox entries, store verdicts).
//! They own no sockets, files or clocks, so every rule is tested without a network; the
//! QUIC glue around them only moves frames.
//!
//! The rules:
//! - The edge speaks first (`Hello`, with the device id it believes it has); the cloud
//!   compares that id with the one in the edge's *verified certificate* and closes the
//!   connection on a mismatch. Nothing else is accepted before `Hello`/`Welcome`.
//! - Cases: the edge keeps at most `max_in_flight` unacknowledged; the cloud acknowledges a
//!   case only after the caller reports it stored durably ([`CloudSession::stored`]); the
//!   edge deletes an outbox entry only on that acknowledgement. Cases in flight when a
//!   connection drops are sent again on the next one (the cloud deduplicates by case id).
//! - Verdicts: the cloud sends each verdict until the edge acknowledges it stored it; a
//!   re-sent verdict is stored once (the edge keys them by case id).
//! - Heartbeats measure the round-trip time.

use std::collections::{BTreeMap, BTreeSet};

use crate::case::{CaseId, HardCase};
use crate::frame::{Message, VerdictMsg, PROTOCOL_VERSION};

/// A protocol violation; the connection is closed with this reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The peer speaks another protocol version.
    #[error("protocol version {0} is not supported (this build speaks {PROTOCOL_VERSION})")]
    Version(u8),
    /// The device claims an id other than its certificate's.
    #[error("device claims id {claimed:?} but its certificate is for {certified:?}")]
    Impersonation {
        /// What the frame claimed.
        claimed: String,
        /// What the certificate says.
        certified: String,
    },
    /// A message arrived that the state does not allow.
    #[error("unexpected {0} in this state")]
    Unexpected(&'static str),
    /// The peer said goodbye.
    #[error("the peer closed the link: {0}")]
    Closed(String),
}

/// What the edge reports about itself when it connects.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EdgeInfo {
    /// The device id from the edge's own certificate.
    pub device: String,
    /// Agent build version.
    pub agent_version: String,
    /// Student model hash.
    pub model_sha256: String,
    /// Outbox backlog.
    pub backlog: u64,
    /// The edge's sync cursor (the cloud's changes it has applied, through this).
    pub sync_received: u64,
}

/// What the edge's caller must do.
#[derive(Clone, Debug, PartialEq)]
pub enum EdgeEvent {
    /// Send this message.
    Send(Message),
    /// The link is up: send cases. The cloud has applied the edge's sync changes
    /// through `sync_received`.
    Ready {
        /// The cloud's sync cursor for this device.
        sync_received: u64,
    },
    /// The cloud stored these cases: delete them from the outbox.
    Acked(Vec<CaseId>),
    /// Verdicts arrived: store them, then call [`EdgeSession::verdicts_stored`].
    Verdicts(Vec<VerdictMsg>),
    /// A round-trip time measurement, milliseconds.
    Rtt(u64),
}

/// The edge's side of one connection.
#[derive(Debug)]
pub struct EdgeSession {
    ready: bool,
    max_in_flight: usize,
    in_flight: BTreeMap<CaseId, u64>,
    heartbeat_seq: u64,
    heartbeat_sent: Option<(u64, u64)>,
    rtt_ms: Option<u64>,
    backlog_reported: u64,
}

impl EdgeSession {
    /// A new connection: returns the session and the `Hello` to send first.
    pub fn new(info: &EdgeInfo, max_in_flight: usize) -> (EdgeSession, Message) {
        let hello = Message::Hello {
            protocol: PROTOCOL_VERSION,
            device: info.device.clone(),
            agent_version: info.agent_version.clone(),
            model_sha256: info.model_sha256.clone(),
            backlog: info.backlog,
            sync_received: info.sync_received,
        };
        let s = EdgeSession {
            ready: false,
            max_in_flight: max_in_flight.max(1),
            in_flight: BTreeMap::new(),
            heartbeat_seq: 0,
            heartbeat_sent: None,
            rtt_ms: None,
            backlog_reported: info.backlog,
        };
        (s, hello)
    }

    /// The cloud welcomed us.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// How many more cases may be sent now.
    pub fn room(&self) -> usize {
        if self.ready {
            self.max_in_flight.saturating_sub(self.in_flight.len())
        } else {
            0
        }
    }

    /// Cases sent and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Is this case sent and unacknowledged on this connection?
    pub fn is_in_flight(&self, id: &CaseId) -> bool {
        self.in_flight.contains_key(id)
    }

    /// The latest round-trip time, milliseconds.
    pub fn rtt_ms(&self) -> Option<u64> {
        self.rtt_ms
    }

    /// Sends cases (oldest first; those beyond [`EdgeSession::room`] or already in flight
    /// are left for later). Returns the message, if any case went.
    pub fn send_cases(&mut self, cases: Vec<HardCase>, now_ms: u64) -> Option<Message> {
        let room = self.room();
        let mut batch = Vec::new();
        for c in cases {
            if batch.len() >= room {
                break;
            }
            if self.in_flight.contains_key(&c.id) {
                continue;
            }
            self.in_flight.insert(c.id, now_ms);
            batch.push(c);
        }
        (!batch.is_empty()).then_some(Message::Cases(batch))
    }

    /// A heartbeat to send now.
    pub fn heartbeat(&mut self, now_ms: u64) -> Message {
        self.heartbeat_seq += 1;
        self.heartbeat_sent = Some((self.heartbeat_seq, now_ms));
        Message::Heartbeat {
            seq: self.heartbeat_seq,
        }
    }

    /// The outbox backlog now: the report to send, if it changed since the last one (or
    /// the hello) and the link is up.
    pub fn report_backlog(&mut self, backlog: u64) -> Option<Message> {
        if !self.ready || backlog == self.backlog_reported {
            return None;
        }
        self.backlog_reported = backlog;
        Some(Message::Backlog { backlog })
    }

    /// The edge stored these verdicts: the acknowledgement to send.
    pub fn verdicts_stored(&mut self, case_ids: Vec<CaseId>) -> Message {
        Message::VerdictAck { case_ids }
    }

    /// Handles one message from the cloud.
    pub fn handle(&mut self, msg: Message, now_ms: u64) -> Result<Vec<EdgeEvent>, ProtocolError> {
        match msg {
            Message::Welcome {
                protocol,
                sync_received,
            } => {
                if protocol != PROTOCOL_VERSION {
                    return Err(ProtocolError::Version(protocol));
                }
                if self.ready {
                    return Err(ProtocolError::Unexpected("second Welcome"));
                }
                self.ready = true;
                Ok(vec![EdgeEvent::Ready { sync_received }])
            }
            Message::Goodbye { reason } => Err(ProtocolError::Closed(reason)),
            m if !self.ready => Err(ProtocolError::Unexpected(m.kind())),
            Message::Ack { case_ids } => {
                // Only what we sent counts; an ack for anything else is ignored (a late
                // ack from an earlier connection, say) — the outbox entry stays.
                let acked: Vec<CaseId> = case_ids
                    .into_iter()
                    .filter(|id| self.in_flight.remove(id).is_some())
                    .collect();
                Ok(if acked.is_empty() {
                    Vec::new()
                } else {
                    vec![EdgeEvent::Acked(acked)]
                })
            }
            Message::Verdicts(v) => Ok(vec![EdgeEvent::Verdicts(v)]),
            Message::Heartbeat { seq } => Ok(vec![EdgeEvent::Send(Message::HeartbeatAck { seq })]),
            Message::HeartbeatAck { seq } => match self.heartbeat_sent {
                Some((s, at)) if s == seq => {
                    let rtt = now_ms.saturating_sub(at);
                    self.rtt_ms = Some(rtt);
                    self.heartbeat_sent = None;
                    Ok(vec![EdgeEvent::Rtt(rtt)])
                }
                _ => Ok(Vec::new()),
            },
            m => Err(ProtocolError::Unexpected(m.kind())),
        }
    }
}

/// What the cloud's caller must do.
#[derive(Clone, Debug, PartialEq)]
pub enum CloudEvent {
    /// Send this message.
    Send(Message),
    /// The device is connected and identified.
    Connected(EdgeInfo),
    /// Store these cases durably (deduplicated by id), then call
    /// [`CloudSession::stored`].
    Store(Vec<HardCase>),
    /// The device stored these verdicts.
    VerdictsDelivered(Vec<CaseId>),
    /// The device's outbox backlog.
    Backlog(u64),
}

/// The cloud's side of one connection, for the device its certificate names.
#[derive(Debug)]
pub struct CloudSession {
    device: String,
    sync_received: u64,
    greeted: bool,
    unacked_verdicts: BTreeSet<CaseId>,
}

impl CloudSession {
    /// A connection whose verified certificate names `device`; `sync_received` is the
    /// cloud's sync cursor for it (the device's changes applied through this), sent in
    /// the welcome.
    pub fn new(device: &str, sync_received: u64) -> CloudSession {
        CloudSession {
            device: device.to_string(),
            sync_received,
            greeted: false,
            unacked_verdicts: BTreeSet::new(),
        }
    }

    /// The device.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// The device said hello and was welcomed.
    pub fn is_greeted(&self) -> bool {
        self.greeted
    }

    /// Verdicts sent and not yet acknowledged.
    pub fn unacked_verdicts(&self) -> usize {
        self.unacked_verdicts.len()
    }

    /// These cases are stored durably: the acknowledgement to send.
    pub fn stored(&mut self, case_ids: Vec<CaseId>) -> Message {
        Message::Ack { case_ids }
    }

    /// Verdicts to deliver (skipping those already sent and unacknowledged on this
    /// connection); the message, if any.
    pub fn send_verdicts(&mut self, verdicts: Vec<VerdictMsg>) -> Option<Message> {
        if !self.greeted {
            return None;
        }
        let fresh: Vec<VerdictMsg> = verdicts
            .into_iter()
            .filter(|v| self.unacked_verdicts.insert(v.case_id))
            .collect();
        (!fresh.is_empty()).then_some(Message::Verdicts(fresh))
    }

    /// Handles one message from the edge.
    pub fn handle(&mut self, msg: Message) -> Result<Vec<CloudEvent>, ProtocolError> {
        match msg {
            Message::Hello {
                protocol,
                device,
                agent_version,
                model_sha256,
                backlog,
                sync_received,
            } => {
                if self.greeted {
                    return Err(ProtocolError::Unexpected("second Hello"));
                }
                if protocol != PROTOCOL_VERSION {
                    return Err(ProtocolError::Version(protocol));
                }
                if device != self.device {
                    return Err(ProtocolError::Impersonation {
                        claimed: device,
                        certified: self.device.clone(),
                    });
                }
                self.greeted = true;
                // The welcome goes first: whatever the caller sends on `Connected`
                // (verdicts waiting from earlier connections) must follow it.
                Ok(vec![
                    CloudEvent::Send(Message::Welcome {
                        protocol: PROTOCOL_VERSION,
                        sync_received: self.sync_received,
                    }),
                    CloudEvent::Connected(EdgeInfo {
                        device,
                        agent_version,
                        model_sha256,
                        backlog,
                        sync_received,
                    }),
                ])
            }
            Message::Goodbye { reason } => Err(ProtocolError::Closed(reason)),
            m if !self.greeted => Err(ProtocolError::Unexpected(m.kind())),
            Message::Cases(cases) => Ok(vec![CloudEvent::Store(cases)]),
            Message::VerdictAck { case_ids } => {
                for id in &case_ids {
                    self.unacked_verdicts.remove(id);
                }
                Ok(vec![CloudEvent::VerdictsDelivered(case_ids)])
            }
            Message::Heartbeat { seq } => Ok(vec![CloudEvent::Send(Message::HeartbeatAck { seq })]),
            Message::HeartbeatAck { .. } => Ok(Vec::new()),
            Message::Backlog { backlog } => Ok(vec![CloudEvent::Backlog(backlog)]),
            m => Err(ProtocolError::Unexpected(m.kind())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::case::Reason;
    use proptest::prelude::*;

    fn case(n: u8) -> HardCase {
        HardCase {
            id: CaseId([n; 16]),
            machine: "m".into(),
            start_ms: 0,
            end_ms: 0,
            features: vec![],
            probs: vec![],
            reason: Reason::Audit,
            records: vec![],
        }
    }

    fn info(device: &str) -> EdgeInfo {
        EdgeInfo {
            device: device.into(),
            agent_version: "0.1.0".into(),
            model_sha256: "ab".into(),
            backlog: 3,
            sync_received: 5,
        }
    }

    fn verdict(n: u8) -> VerdictMsg {
        VerdictMsg {
            case_id: CaseId([n; 16]),
            class: "normal".into(),
            confidence: 0.9,
            explanation: "e".into(),
            action: "a".into(),
            model: "demo".into(),
        }
    }

    /// Connects an edge and a cloud session; returns both, greeted.
    fn connect() -> (EdgeSession, CloudSession) {
        let (mut edge, hello) = EdgeSession::new(&info("press-01"), 4);
        let mut cloud = CloudSession::new("press-01", 7);
        let ev = cloud.handle(hello).expect("hello");
        assert!(
            matches!(ev[1], CloudEvent::Connected(ref i) if i.backlog == 3 && i.sync_received == 5)
        );
        let CloudEvent::Send(welcome) = ev[0].clone() else {
            panic!("the welcome comes first")
        };
        assert_eq!(edge.room(), 0, "nothing goes before the welcome");
        assert_eq!(
            edge.handle(welcome, 0).expect("welcome"),
            vec![EdgeEvent::Ready { sync_received: 7 }]
        );
        (edge, cloud)
    }

    /// Verdicts waiting from an earlier connection, sent as soon as the device is known,
    /// reach the edge after the welcome (a verdict before it is a protocol error).
    #[test]
    fn verdicts_waiting_at_connect_follow_the_welcome() {
        let (mut edge, hello) = EdgeSession::new(&info("press-01"), 4);
        let mut cloud = CloudSession::new("press-01", 0);
        let mut wire = Vec::new();
        for ev in cloud.handle(hello).expect("hello") {
            match ev {
                CloudEvent::Send(m) => wire.push(m),
                CloudEvent::Connected(_) => {
                    wire.extend(cloud.send_verdicts(vec![verdict(1), verdict(2)]));
                }
                _ => {}
            }
        }
        assert_eq!(wire.len(), 2);
        for m in wire {
            edge.handle(m, 0).expect("in order");
        }
    }

    #[test]
    fn the_backlog_is_reported_when_it_changes() {
        let (mut edge, mut cloud) = connect();
        assert_eq!(edge.report_backlog(3), None, "the hello said 3");
        let m = edge.report_backlog(7).expect("changed");
        assert_eq!(
            cloud.handle(m).expect("backlog"),
            vec![CloudEvent::Backlog(7)]
        );
        assert_eq!(edge.report_backlog(7), None);
    }

    #[test]
    fn a_device_claiming_another_id_is_refused() {
        let (_, hello) = EdgeSession::new(&info("press-01"), 4);
        let mut cloud = CloudSession::new("lathe-02", 0);
        assert!(matches!(
            cloud.handle(hello),
            Err(ProtocolError::Impersonation { .. })
        ));
        assert!(!cloud.is_greeted());
    }

    #[test]
    fn nothing_but_hello_before_the_welcome() {
        let mut cloud = CloudSession::new("press-01", 7);
        assert_eq!(
            cloud.handle(Message::Cases(vec![case(1)])),
            Err(ProtocolError::Unexpected("Cases"))
        );
        let (mut edge, _) = EdgeSession::new(&info("press-01"), 4);
        assert!(edge.handle(Message::Ack { case_ids: vec![] }, 0).is_err());
        let (_, mut hello) = EdgeSession::new(&info("press-01"), 4);
        if let Message::Hello { protocol, .. } = &mut hello {
            *protocol = 9;
        }
        assert_eq!(
            CloudSession::new("press-01", 7).handle(hello),
            Err(ProtocolError::Version(9))
        );
    }

    #[test]
    fn cases_are_bounded_in_flight_and_removed_only_on_ack() {
        let (mut edge, mut cloud) = connect();
        let msg = edge
            .send_cases((1..=6).map(case).collect(), 10)
            .expect("cases");
        let Message::Cases(sent) = &msg else { panic!() };
        assert_eq!(sent.len(), 4, "max_in_flight");
        assert_eq!(edge.room(), 0);
        assert!(edge.send_cases(vec![case(5)], 11).is_none());
        let ev = cloud.handle(msg).expect("cases");
        let CloudEvent::Store(stored) = &ev[0] else {
            panic!()
        };
        // The cloud acks only what the caller stored.
        let ack = cloud.stored(stored[..2].iter().map(|c| c.id).collect());
        let ev = edge.handle(ack, 20).expect("ack");
        assert_eq!(
            ev,
            vec![EdgeEvent::Acked(vec![CaseId([1; 16]), CaseId([2; 16])])]
        );
        assert_eq!(edge.in_flight(), 2);
        assert_eq!(edge.room(), 2);
        // An ack for something never sent on this connection changes nothing.
        let ev = edge
            .handle(
                Message::Ack {
                    case_ids: vec![CaseId([9; 16])],
                },
                21,
            )
            .expect("ack");
        assert!(ev.is_empty());
        assert_eq!(edge.in_flight(), 2);
    }

    #[test]
    fn verdicts_are_resent_until_acknowledged_and_rtt_is_measured() {
        let (mut edge, mut cloud) = connect();
        let m = cloud
            .send_verdicts(vec![verdict(1), verdict(2)])
            .expect("verdicts");
        assert!(
            cloud.send_verdicts(vec![verdict(1)]).is_none(),
            "not twice at once"
        );
        let ev = edge.handle(m, 0).expect("verdicts");
        let EdgeEvent::Verdicts(v) = &ev[0] else {
            panic!()
        };
        let ack = edge.verdicts_stored(v.iter().map(|v| v.case_id).collect());
        let ev = cloud.handle(ack).expect("ack");
        assert_eq!(ev.len(), 1);
        assert_eq!(cloud.unacked_verdicts(), 0);
        let hb = edge.heartbeat(100);
        let ev = cloud.handle(hb).expect("hb");
        let CloudEvent::Send(echo) = ev[0].clone() else {
            panic!()
        };
        assert_eq!(
            edge.handle(echo, 142).expect("echo"),
            vec![EdgeEvent::Rtt(42)]
        );
        assert_eq!(edge.rtt_ms(), Some(42));
    }

    proptest! {
        /// Whatever arrives in whatever order — acks for unsent, duplicated or reordered
        /// cases, stray messages — the edge's in-flight set stays within its bound and a
        /// case leaves it only through an ack of that case.
        #[test]
        fn in_flight_stays_bounded_and_exact(ops in proptest::collection::vec((0u8..4, 0u8..12), 0..80)) {
            let (mut edge, _) = connect();
            let mut model: BTreeSet<u8> = BTreeSet::new();
            for (op, n) in ops {
                match op {
                    0 => {
                        let before = edge.room();
                        if let Some(Message::Cases(sent)) = edge.send_cases(vec![case(n)], 0) {
                            prop_assert_eq!(sent.len(), 1);
                            prop_assert!(before > 0);
                            prop_assert!(model.insert(n));
                        }
                    }
                    1 => {
                        let ev = edge.handle(Message::Ack { case_ids: vec![CaseId([n; 16])] }, 0).expect("ack");
                        let was = model.remove(&n);
                        prop_assert_eq!(!ev.is_empty(), was);
                    }
                    2 => { let _ = edge.handle(Message::Verdicts(vec![verdict(n)]), 0); }
                    _ => { let _ = edge.handle(Message::HeartbeatAck { seq: u64::from(n) }, 0); }
                }
                prop_assert!(edge.in_flight() <= 4);
                prop_assert_eq!(edge.in_flight(), model.len());
            }
        }
    }
}
