//! Simulated factory machines: normal operation and fault signatures.
//!
//! Each machine runs episodes — normal operation, or one fault of a random severity —
//! and emits one record per tick. Every record carries its true class in the `label`
//! field, which the agent ignores but stores, so tests and benchmarks can score the
//! system. The generator is deterministic for a seed, on every architecture.
//!
//! Signatures (severity `s` in [0.25, 1], `p` = progress through the episode):
//! - `bearing_wear`: vibration up by `s·(1.5 + 2p)` mm/s and noisier; temperature creeps up.
//! - `overheating`: temperature ramps up to `+25·s` °C; current slightly up.
//! - `misalignment`: vibration up with a periodic component; current steadily up;
//!   pressure oscillates.
//! - `electrical_fault`: current spikes and jitters; trips in the log.
//! - `sensor_fault`: one channel sticks at a value, or drops out to implausible values.
//!
//! Mild episodes look much like normal operation: that is what makes hard cases.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use serde_json::{json, Value};

use crate::record::Record;
use crate::schema::{CLASSES, WINDOW_LEN};

/// Settings of a simulated fleet.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Number of machines.
    pub machines: usize,
    /// Seed of the whole fleet.
    pub seed: u64,
    /// Milliseconds between two records of one machine.
    pub interval_ms: i64,
    /// Timestamp of the first tick (Unix ms).
    pub start_ms: i64,
    /// Share of episodes that are faults (0–1).
    pub fault_share: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            machines: 4,
            seed: 1,
            interval_ms: 1_000,
            start_ms: 1_795_417_200_000,
            fault_share: 0.35,
        }
    }
}

/// One simulated record with its true label.
#[derive(Clone, Debug, PartialEq)]
pub struct SimRecord {
    /// Machine name.
    pub machine: String,
    /// Timestamp, Unix ms.
    pub ts_ms: i64,
    /// vibration, temperature, current, pressure.
    pub readings: [f64; 4],
    /// Extra reading: spindle speed.
    pub rpm: f64,
    /// Log line, if any.
    pub message: Option<String>,
    /// Idempotency key.
    pub id: String,
    /// The true class.
    pub label: &'static str,
}

impl SimRecord {
    /// The record as a device would post it (with `label`, which the agent ignores).
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "machine": self.machine,
            "ts": self.ts_ms,
            "readings": {
                "vibration": self.readings[0],
                "temperature": self.readings[1],
                "current": self.readings[2],
                "pressure": self.readings[3],
                "rpm": self.rpm,
            },
            "id": self.id,
            "label": self.label,
        });
        if let Some(m) = &self.message {
            v["message"] = Value::String(m.clone());
        }
        v
    }

    /// The record exactly as the agent would store it after parsing [`Self::to_json`].
    pub fn to_record(&self) -> Record {
        // Going through JSON keeps one code path for the agent and for datasets.
        match Record::from_json_value(self.to_json()) {
            Ok(r) => r,
            Err(e) => unreachable_record(e),
        }
    }
}

#[cold]
fn unreachable_record(e: crate::record::RecordError) -> Record {
    // The simulator only emits valid records; a failure here is a bug in this module.
    panic!("simulator produced an invalid record: {e}")
}

#[derive(Clone, Debug)]
struct Episode {
    class: usize,
    len: u32,
    at: u32,
    severity: f64,
    channel: usize,
    stuck_mode: bool,
    stuck_value: f64,
}

#[derive(Clone, Debug)]
struct Machine {
    name: String,
    base: [f64; 4],
    rpm: f64,
    rng: StdRng,
    episode: Episode,
    seq: u64,
    last: [f64; 4],
    fault_share: f64,
}

const KINDS: [&str; 5] = ["press", "lathe", "pump", "mill", "fan"];

impl Machine {
    fn new(index: usize, seed: u64, fault_share: f64) -> Machine {
        let mut rng =
            StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (index as u64 + 1));
        let base = [
            rng.random_range(1.4..2.6),
            rng.random_range(42.0..62.0),
            rng.random_range(7.5..12.5),
            rng.random_range(2.7..3.5),
        ];
        let rpm = rng.random_range(900.0..1800.0f64).round();
        let mut m = Machine {
            name: format!("{}-{:02}", KINDS[index % KINDS.len()], index + 1),
            base,
            rpm,
            rng,
            episode: Episode {
                class: 0,
                len: 0,
                at: 0,
                severity: 0.0,
                channel: 0,
                stuck_mode: false,
                stuck_value: 0.0,
            },
            seq: 0,
            last: base,
            fault_share,
        };
        m.next_episode(true);
        m
    }

    fn next_episode(&mut self, first: bool) {
        let w = WINDOW_LEN as u32;
        let fault = !first
            && self.episode.class == 0
            && self.rng.random_bool(self.fault_share.clamp(0.0, 1.0));
        let (class, len) = if fault {
            (
                self.rng.random_range(1..CLASSES.len()),
                self.rng.random_range(2 * w..6 * w),
            )
        } else {
            (0, self.rng.random_range(2 * w..6 * w))
        };
        let channel = self.rng.random_range(0..4);
        self.episode = Episode {
            class,
            len,
            at: 0,
            severity: self.rng.random_range(0.25..1.0),
            channel,
            stuck_mode: self.rng.random_bool(0.5),
            stuck_value: self.last[channel],
        };
    }

    fn step(&mut self, ts_ms: i64) -> SimRecord {
        if self.episode.at >= self.episode.len {
            self.next_episode(false);
        }
        let e = self.episode.clone();
        let i = e.at as f64;
        let p = i / e.len.max(1) as f64;
        let s = e.severity;
        let noise =
            |rng: &mut StdRng, sd: f64| Normal::new(0.0, sd).map(|n| n.sample(rng)).unwrap_or(0.0);
        let mut v = [
            self.base[0] + noise(&mut self.rng, 0.08),
            self.base[1] + noise(&mut self.rng, 0.3),
            self.base[2] + noise(&mut self.rng, 0.15),
            self.base[3] + noise(&mut self.rng, 0.03),
        ];
        let mut message = None;
        let r: f64 = self.rng.random();
        match CLASSES[e.class] {
            "bearing_wear" => {
                v[0] += s * (1.5 + 2.0 * p) + noise(&mut self.rng, 0.35 * s);
                v[1] += s * 3.0 * p;
                if r < 0.15 * s {
                    message = Some("WARN vibration above threshold".to_string());
                }
            }
            "overheating" => {
                v[1] += s * (i * 0.8).min(25.0);
                v[2] += s * 0.8;
                if r < 0.2 * s {
                    message = Some("WARN spindle temp rising".to_string());
                }
            }
            "misalignment" => {
                v[0] += s * 1.2 * (1.0 + 0.5 * (i * 1.3).sin());
                v[2] += s * 1.5;
                v[3] += s * 0.15 * (i * 0.9).sin();
                if r < 0.1 * s {
                    message = Some("WARN coupling noise detected".to_string());
                }
            }
            "electrical_fault" => {
                v[2] += noise(&mut self.rng, 2.0 * s);
                if self.rng.random_bool(0.3) {
                    v[2] += s * 6.0 * if self.rng.random_bool(0.5) { 1.0 } else { -1.0 };
                }
                if r < 0.1 * s {
                    message = Some("ERROR overcurrent trip".to_string());
                } else if r < 0.2 * s {
                    message = Some("WARN supply voltage dip".to_string());
                }
            }
            "sensor_fault" => {
                let c = e.channel;
                if e.stuck_mode {
                    v[c] = e.stuck_value;
                } else if self.rng.random_bool(0.15 + 0.35 * s) {
                    v[c] = if self.rng.random_bool(0.5) {
                        0.0
                    } else {
                        [99.9, -40.0, 250.0, -1.0][c]
                    };
                }
                if r < 0.1 {
                    message = Some(format!(
                        "WARN sensor {} reading implausible",
                        crate::schema::CHANNELS[c]
                    ));
                }
            }
            _ => {
                if r < 0.3 {
                    message = Some("INFO cycle complete".to_string());
                } else if r < 0.31 {
                    message = Some("WARN door opened during cycle".to_string());
                }
            }
        }
        // Keep sensor values as a real device reports them: 3 decimals.
        for x in v.iter_mut() {
            *x = (*x * 1000.0).round() / 1000.0;
        }
        self.last = v;
        self.episode.at += 1;
        self.seq += 1;
        SimRecord {
            machine: self.name.clone(),
            ts_ms,
            readings: v,
            rpm: self.rpm,
            message,
            id: format!("{}-{:08}", self.name, self.seq),
            label: CLASSES[e.class],
        }
    }
}

/// A deterministic simulated fleet.
#[derive(Clone, Debug)]
pub struct Simulator {
    cfg: SimConfig,
    machines: Vec<Machine>,
    tick: u64,
}

impl Simulator {
    /// A fleet as configured.
    pub fn new(cfg: SimConfig) -> Simulator {
        let machines = (0..cfg.machines)
            .map(|i| Machine::new(i, cfg.seed, cfg.fault_share))
            .collect();
        Simulator {
            cfg,
            machines,
            tick: 0,
        }
    }

    /// Machine names, in order.
    pub fn machine_names(&self) -> Vec<String> {
        self.machines.iter().map(|m| m.name.clone()).collect()
    }

    /// One record from every machine, for the next tick.
    pub fn tick(&mut self) -> Vec<SimRecord> {
        let t = self.cfg.start_ms + self.tick as i64 * self.cfg.interval_ms;
        self.tick += 1;
        self.machines
            .iter_mut()
            .enumerate()
            .map(|(i, m)| m.step(t + i as i64))
            .collect()
    }
}

/// The true class of a window: the most frequent label (ties go to the later one).
pub fn window_label<'a>(labels: impl IntoIterator<Item = &'a str>) -> &'a str {
    let mut counts: Vec<(&str, usize, usize)> = Vec::new();
    for (pos, l) in labels.into_iter().enumerate() {
        match counts.iter_mut().find(|(c, _, _)| *c == l) {
            Some(e) => {
                e.1 += 1;
                e.2 = pos;
            }
            None => counts.push((l, 1, pos)),
        }
    }
    counts
        .into_iter()
        .max_by_key(|(_, n, last)| (*n, *last))
        .map(|(l, _, _)| l)
        .unwrap_or("normal")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_every_class_appears() {
        let cfg = SimConfig {
            machines: 5,
            seed: 9,
            fault_share: 0.6,
            ..SimConfig::default()
        };
        let mut a = Simulator::new(cfg.clone());
        let mut b = Simulator::new(cfg);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..2000 {
            let ra = a.tick();
            assert_eq!(ra, b.tick());
            for r in ra {
                seen.insert(r.label);
                let rec = r.to_record();
                assert_eq!(
                    rec.extra_field("label"),
                    Some(Value::String(r.label.into()))
                );
            }
        }
        assert_eq!(seen.len(), CLASSES.len(), "{seen:?}");
    }

    #[test]
    fn window_label_is_the_majority() {
        assert_eq!(
            window_label(["normal", "overheating", "overheating"]),
            "overheating"
        );
        assert_eq!(window_label(["normal", "overheating"]), "overheating");
        assert_eq!(window_label([]), "normal");
    }
}
