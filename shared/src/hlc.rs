//! Hybrid logical clock (Kulkarni et al., "Logical Physical Clocks", 2014).
//!
//! Timestamps order by (wall milliseconds, logical counter, node id): the node id breaks
//! ties, so two different nodes never produce equal timestamps. The clock never reads the
//! system time itself: `physical_ms` is always a parameter.
//!
//! Clock skew is bounded by `max_drift_ms`: a remote timestamp further ahead of our
//! physical clock than that is refused with [`ClockError::TooFarAhead`] instead of dragging
//! our clock (and every later write) into the future.

use serde::{Deserialize, Serialize};

/// One HLC timestamp. Ordering is lexicographic over the fields, in order.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Timestamp {
    /// Physical component, Unix milliseconds.
    pub wall_ms: u64,
    /// Logical counter within one millisecond.
    pub logical: u32,
    /// Node id: the tie-break.
    pub node: u64,
}

/// Errors of the clock.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClockError {
    /// A remote timestamp is further in the future than the allowed drift.
    #[error(
        "remote clock is {ahead_ms} ms ahead of ours (more than the allowed {max_drift_ms} ms)"
    )]
    TooFarAhead {
        /// How far ahead it is.
        ahead_ms: u64,
        /// The allowed drift.
        max_drift_ms: u64,
    },
}

/// The clock of one node.
#[derive(Clone, Debug)]
pub struct Hlc {
    node: u64,
    last: Timestamp,
    max_drift_ms: u64,
}

impl Hlc {
    /// A clock for `node`, refusing remote timestamps more than `max_drift_ms` ahead.
    pub fn new(node: u64, max_drift_ms: u64) -> Hlc {
        Hlc {
            node,
            last: Timestamp {
                wall_ms: 0,
                logical: 0,
                node,
            },
            max_drift_ms,
        }
    }

    /// Restores a clock that must stay above `last` (e.g. loaded from disk).
    pub fn resume(node: u64, max_drift_ms: u64, last: Timestamp) -> Hlc {
        let mut c = Hlc::new(node, max_drift_ms);
        c.last = Timestamp { node, ..last };
        c
    }

    /// The last timestamp issued or observed.
    pub fn last(&self) -> Timestamp {
        self.last
    }

    fn bump(&mut self, wall: u64) -> Timestamp {
        if wall > self.last.wall_ms {
            self.last.wall_ms = wall;
            self.last.logical = 0;
        } else if self.last.logical == u32::MAX {
            // Counter exhausted within this millisecond: borrow the next one.
            self.last.wall_ms += 1;
            self.last.logical = 0;
        } else {
            self.last.logical += 1;
        }
        self.last.node = self.node;
        self.last
    }

    /// A timestamp for a local event: strictly greater than every earlier one.
    pub fn now(&mut self, physical_ms: u64) -> Timestamp {
        self.bump(physical_ms)
    }

    /// Merges a remote timestamp; the result is greater than both it and every earlier
    /// local timestamp.
    pub fn observe(
        &mut self,
        remote: Timestamp,
        physical_ms: u64,
    ) -> Result<Timestamp, ClockError> {
        if remote.wall_ms > physical_ms.saturating_add(self.max_drift_ms) {
            return Err(ClockError::TooFarAhead {
                ahead_ms: remote.wall_ms - physical_ms,
                max_drift_ms: self.max_drift_ms,
            });
        }
        if remote > self.last {
            self.last.wall_ms = remote.wall_ms;
            self.last.logical = remote.logical;
        }
        Ok(self.bump(physical_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Local(u64),
        Remote(u64, u32, u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..10_000).prop_map(Op::Local),
            (0u64..12_000, any::<u32>(), 0u64..5, 0u64..10_000)
                .prop_map(|(w, l, n, p)| Op::Remote(w, l, n, p)),
        ]
    }

    proptest! {
        #[test]
        fn timestamps_strictly_increase_and_dominate_observed(ops in proptest::collection::vec(op(), 1..200)) {
            let mut c = Hlc::new(7, 1_000);
            let mut prev = c.last();
            for o in ops {
                match o {
                    Op::Local(p) => {
                        let t = c.now(p);
                        prop_assert!(t > prev);
                        prop_assert!(t.wall_ms >= p);
                        prev = t;
                    }
                    Op::Remote(w, l, n, p) => {
                        let remote = Timestamp { wall_ms: w, logical: l, node: n };
                        match c.observe(remote, p) {
                            Ok(t) => {
                                prop_assert!(t > prev);
                                prop_assert!(t > remote);
                                prev = t;
                            }
                            Err(ClockError::TooFarAhead { .. }) => {
                                prop_assert!(w > p + 1_000);
                                prop_assert_eq!(c.last(), prev);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn logical_overflow_borrows_the_next_millisecond() {
        let mut c = Hlc::resume(
            1,
            10,
            Timestamp {
                wall_ms: 5,
                logical: u32::MAX,
                node: 1,
            },
        );
        let t = c.now(5);
        assert_eq!((t.wall_ms, t.logical), (6, 0));
    }

    #[test]
    fn node_id_breaks_ties() {
        let a = Hlc::new(1, 0).now(100);
        let b = Hlc::new(2, 0).now(100);
        assert!(a < b);
    }
}
