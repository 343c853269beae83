//! Versioned, size-limited postcard frames.
//!
//! On the wire a frame is a 6-byte header — protocol version (`u8`), flags (`u8`, zero),
//! payload length (`u32`, little-endian) — followed by the postcard-encoded [`Message`].
//!
//! The decoder separates "need more bytes" from "bad bytes", and checks the version and
//! the claimed length *before* it waits for or allocates the payload: a frame claiming
//! more than the limit is an error at once, never an allocation of the claimed size.

use serde::{Deserialize, Serialize};

use crate::case::{CaseId, HardCase};
use crate::sync::Batch;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 6;
/// Default payload limit (1 MiB).
pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;

/// The messages of the edge–cloud protocol.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// First message of a connection (edge → cloud).
    Hello {
        /// Protocol version of the sender.
        protocol: u8,
        /// The device id the edge believes it has; the cloud refuses the connection if it
        /// differs from the id in the edge's verified certificate.
        device: String,
        /// Agent build version.
        agent_version: String,
        /// Hash of the student model in use.
        model_sha256: String,
        /// Hard cases waiting in the edge's outbox.
        backlog: u64,
        /// The edge's sync cursor: the cloud's changes it has applied, through this
        /// sequence number (the cloud sends only what comes after it).
        sync_received: u64,
    },
    /// A batch of hard cases.
    Cases(Vec<HardCase>),
    /// Durable acknowledgement of cases.
    Ack {
        /// The cases now stored by the receiver.
        case_ids: Vec<CaseId>,
    },
    /// Keep-alive and RTT probe.
    Heartbeat {
        /// Sequence number, echoed back.
        seq: u64,
    },
    /// The cloud's answer to `Hello`: the link is up.
    Welcome {
        /// Protocol version of the cloud.
        protocol: u8,
        /// The cloud's sync cursor for this device: the edge's changes it has applied,
        /// through this sequence number.
        sync_received: u64,
    },
    /// Verdicts on cases the edge sent (cloud → edge).
    Verdicts(Vec<VerdictMsg>),
    /// The edge stored these verdicts (the cloud stops re-sending them).
    VerdictAck {
        /// Cases whose verdicts are stored.
        case_ids: Vec<CaseId>,
    },
    /// Echo of a heartbeat.
    HeartbeatAck {
        /// The heartbeat's sequence number.
        seq: u64,
    },
    /// Backlog report (edge → cloud), sent when it changes.
    Backlog {
        /// Hard cases waiting in the outbox.
        backlog: u64,
    },
    /// Changes of the shared state (either way, on the sync stream).
    Sync(Batch),
    /// The receiver applied the sender's changes through `upto` (on the sync stream).
    SyncAck {
        /// The sender's sequence number the receiver has applied through.
        upto: u64,
    },
    /// The sender is closing the connection, and why.
    Goodbye {
        /// The reason, for logs.
        reason: String,
    },
}

impl Message {
    /// The message's name, for errors and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Cases(_) => "Cases",
            Message::Ack { .. } => "Ack",
            Message::Heartbeat { .. } => "Heartbeat",
            Message::Welcome { .. } => "Welcome",
            Message::Verdicts(_) => "Verdicts",
            Message::VerdictAck { .. } => "VerdictAck",
            Message::HeartbeatAck { .. } => "HeartbeatAck",
            Message::Backlog { .. } => "Backlog",
            Message::Sync(_) => "Sync",
            Message::SyncAck { .. } => "SyncAck",
            Message::Goodbye { .. } => "Goodbye",
        }
    }
}

/// A verdict as the link carries it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VerdictMsg {
    /// The case.
    pub case_id: CaseId,
    /// The class (one of [`crate::schema::CLASSES`]).
    pub class: String,
    /// Confidence in [0, 1].
    pub confidence: f32,
    /// Why.
    pub explanation: String,
    /// What to do.
    pub action: String,
    /// The model that gave it.
    pub model: String,
}

/// Frame errors. Every one is final for the connection that produced it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header names a protocol version this build does not speak.
    #[error("unknown protocol version {0} (this build speaks {PROTOCOL_VERSION})")]
    UnknownVersion(u8),
    /// The header's flags byte is not zero.
    #[error("unknown frame flags {0:#04x}")]
    UnknownFlags(u8),
    /// The claimed (or actual) payload is larger than the limit.
    #[error("frame payload of {len} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// Claimed or actual payload length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The payload is not a valid message.
    #[error("malformed frame payload: {0}")]
    Malformed(String),
}

/// Result of feeding bytes to the decoder.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    /// A complete frame, and how many bytes of the input it used.
    Frame(Message, usize),
    /// More input is needed: at least this many bytes in total.
    NeedMore(usize),
}

/// Encoder/decoder with a payload limit.
#[derive(Clone, Copy, Debug)]
pub struct FrameCodec {
    max_payload: usize,
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_PAYLOAD)
    }
}

impl FrameCodec {
    /// A codec refusing payloads over `max_payload` bytes (capped at `u32::MAX`).
    pub fn new(max_payload: usize) -> FrameCodec {
        FrameCodec {
            max_payload: max_payload.min(u32::MAX as usize),
        }
    }

    /// The payload limit.
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// Appends one frame to `out`. Refuses (and appends nothing) if over the limit.
    pub fn encode(&self, msg: &Message, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let payload = postcard::to_stdvec(msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
        if payload.len() > self.max_payload {
            return Err(FrameError::TooLarge {
                len: payload.len(),
                max: self.max_payload,
            });
        }
        out.push(PROTOCOL_VERSION);
        out.push(0);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&payload);
        Ok(())
    }

    /// Decodes the first frame of `buf`, if complete.
    pub fn decode(&self, buf: &[u8]) -> Result<Decoded, FrameError> {
        let Some(&version) = buf.first() else {
            return Ok(Decoded::NeedMore(HEADER_LEN));
        };
        if version != PROTOCOL_VERSION {
            return Err(FrameError::UnknownVersion(version));
        }
        if buf.len() < HEADER_LEN {
            return Ok(Decoded::NeedMore(HEADER_LEN));
        }
        if buf[1] != 0 {
            return Err(FrameError::UnknownFlags(buf[1]));
        }
        let len = u32::from_le_bytes([buf[2], buf[3], buf[4], buf[5]]) as usize;
        if len > self.max_payload {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_payload,
            });
        }
        let total = HEADER_LEN + len;
        if buf.len() < total {
            return Ok(Decoded::NeedMore(total));
        }
        let payload = &buf[HEADER_LEN..total];
        let (msg, rest) = postcard::take_from_bytes::<Message>(payload)
            .map_err(|e| FrameError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(FrameError::Malformed(format!(
                "{} trailing bytes after the message",
                rest.len()
            )));
        }
        Ok(Decoded::Frame(msg, total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::case::Reason;
    use crate::record::Record;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn record() -> impl Strategy<Value = Record> {
        (
            "[a-z0-9._-]{1,16}",
            0i64..4_000_000_000_000,
            proptest::collection::btree_map("[a-z]{1,8}", -1e6f64..1e6, 0..6),
            proptest::option::of(".{0,40}"),
            proptest::option::of("[a-z0-9]{1,10}"),
        )
            .prop_map(|(machine, ts_ms, readings, message, id)| Record {
                machine,
                ts_ms,
                readings: readings.into_iter().collect::<BTreeMap<_, _>>(),
                message,
                id,
                extra: None,
            })
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (
                any::<u8>(),
                "[a-z0-9-]{1,12}",
                ".{0,20}",
                "[0-9a-f]{0,64}",
                any::<u64>(),
                any::<u64>()
            )
                .prop_map(
                    |(protocol, device, agent_version, model_sha256, backlog, sync_received)| {
                        Message::Hello {
                            protocol,
                            device,
                            agent_version,
                            model_sha256,
                            backlog,
                            sync_received,
                        }
                    }
                ),
            (any::<u8>(), any::<u64>()).prop_map(|(protocol, sync_received)| Message::Welcome {
                protocol,
                sync_received
            }),
            any::<u64>().prop_map(|upto| Message::SyncAck { upto }),
            (
                any::<u64>(),
                any::<u64>(),
                "[a-z]{1,8}",
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
                any::<u64>()
            )
                .prop_map(|(after, upto, key, value, wall_ms)| Message::Sync(Batch {
                    after,
                    upto,
                    entries: vec![crate::sync::BatchEntry {
                        scope: crate::sync::Scope::Labels,
                        key,
                        entry: crate::sync::Entry {
                            ts: crate::hlc::Timestamp {
                                wall_ms,
                                logical: 0,
                                node: 7
                            },
                            origin: crate::sync::Role::Edge,
                            value,
                        },
                    }],
                })),
            proptest::collection::vec(
                (
                    any::<[u8; 16]>(),
                    "[a-z_]{1,16}",
                    0f32..1.0,
                    ".{0,40}",
                    ".{0,40}"
                ),
                0..4
            )
            .prop_map(|vs| Message::Verdicts(
                vs.into_iter()
                    .map(|(id, class, confidence, explanation, action)| VerdictMsg {
                        case_id: CaseId(id),
                        class,
                        confidence,
                        explanation,
                        action,
                        model: "demo".into(),
                    })
                    .collect()
            )),
            proptest::collection::vec(any::<[u8; 16]>(), 0..20).prop_map(|ids| {
                Message::VerdictAck {
                    case_ids: ids.into_iter().map(CaseId).collect(),
                }
            }),
            any::<u64>().prop_map(|seq| Message::HeartbeatAck { seq }),
            any::<u64>().prop_map(|backlog| Message::Backlog { backlog }),
            ".{0,40}".prop_map(|reason| Message::Goodbye { reason }),
            proptest::collection::vec(any::<[u8; 16]>(), 0..20).prop_map(|ids| Message::Ack {
                case_ids: ids.into_iter().map(CaseId).collect()
            }),
            any::<u64>().prop_map(|seq| Message::Heartbeat { seq }),
            proptest::collection::vec(
                (
                    any::<[u8; 16]>(),
                    "[a-z]{1,8}",
                    any::<i64>(),
                    proptest::collection::vec(
                        any::<f32>().prop_filter("finite", |x| x.is_finite()),
                        0..30
                    ),
                    proptest::collection::vec(record(), 0..4)
                ),
                0..4
            )
            .prop_map(|cases| Message::Cases(
                cases
                    .into_iter()
                    .map(|(id, machine, ts, features, records)| HardCase {
                        id: CaseId(id),
                        machine,
                        start_ms: ts,
                        end_ms: ts,
                        probs: features.clone(),
                        features,
                        reason: Reason::LowConfidence { max_prob: 0.4 },
                        records,
                    })
                    .collect()
            )),
        ]
    }

    proptest! {
        #[test]
        fn encode_decode_round_trips(msgs in proptest::collection::vec(message(), 1..5)) {
            let codec = FrameCodec::default();
            let mut buf = Vec::new();
            for m in &msgs { codec.encode(m, &mut buf).expect("fits"); }
            let mut at = 0;
            for m in &msgs {
                // Every strict prefix of a frame asks for more bytes, never errs.
                match codec.decode(&buf[at..at + 3.min(buf.len() - at)]) {
                    Ok(Decoded::NeedMore(_)) | Ok(Decoded::Frame(..)) => {}
                    Err(e) => prop_assert!(false, "prefix gave {e}"),
                }
                match codec.decode(&buf[at..]).expect("valid") {
                    Decoded::Frame(got, used) => { prop_assert_eq!(&got, m); at += used; }
                    Decoded::NeedMore(n) => prop_assert!(false, "need {n}"),
                }
            }
            prop_assert_eq!(at, buf.len());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = FrameCodec::new(64).decode(&bytes);
        }
    }

    #[test]
    fn unknown_version_and_oversize_are_typed_errors_before_allocation() {
        let codec = FrameCodec::new(1024);
        assert_eq!(
            codec.decode(&[9, 0, 0, 0, 0, 0]),
            Err(FrameError::UnknownVersion(9))
        );
        assert_eq!(codec.decode(&[9]), Err(FrameError::UnknownVersion(9)));
        // Claims 4 GiB: refused from the header alone.
        assert_eq!(
            codec.decode(&[PROTOCOL_VERSION, 0, 0xff, 0xff, 0xff, 0xff]),
            Err(FrameError::TooLarge {
                len: u32::MAX as usize,
                max: 1024
            })
        );
        assert_eq!(
            codec.decode(&[PROTOCOL_VERSION, 1, 0, 0, 0, 0]),
            Err(FrameError::UnknownFlags(1))
        );
        assert_eq!(
            codec.decode(&[PROTOCOL_VERSION, 0, 2, 0]),
            Ok(Decoded::NeedMore(HEADER_LEN))
        );
        let big = Message::Hello {
            protocol: 1,
            device: "d".into(),
            agent_version: "x".repeat(2000),
            model_sha256: String::new(),
            backlog: 0,
            sync_received: 0,
        };
        let mut out = Vec::new();
        assert!(matches!(
            codec.encode(&big, &mut out),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(out.is_empty());
        // Garbage payload of the right length is Malformed.
        assert!(matches!(
            codec.decode(&[PROTOCOL_VERSION, 0, 2, 0, 0, 0, 0xff, 0xff]),
            Err(FrameError::Malformed(_))
        ));
    }
}
