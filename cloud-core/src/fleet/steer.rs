//! Steering the hard-case share: the cloud tells each edge, through its desired config,
//! how eager to be, so a fleet neither floods the engine nor leaves it idle.
//!
//! Each device has a target share of its cases to send to the cloud (an operator sets it
//! per device with `PUT /api/v1/fleet/devices/{id}/target`, or the fleet default
//! `--target-share` applies). Edges report their cumulative decision counts under
//! reported state (`stats`). Every [`INTERVAL`] the controller, per device with a target:
//!
//! 1. takes the cases decided since its last step (or since the agent started, when this
//!    process has not stepped for this run of the agent yet) and the share the policy
//!    *wanted* to send (sent plus those held back by the edge's budgets), once at least
//!    [`MIN_SAMPLE`] cases were decided;
//! 2. lowers the target under load: the effective target is the target times a pressure
//!    factor of the verdict queue (1 up to half of `--queue-high` cases waiting, falling
//!    linearly to 0.1 at twice `--queue-high`);
//! 3. moves the device's *sensitivity* σ ∈ [0, 1] toward the effective target
//!    (proportional step of the error, at most 0.1 per look);
//! 4. writes desired config `steering`: σ, the policy thresholds it maps to (σ = 0.5 is
//!    the agent's default policy; higher sends more: `min_max_prob = 0.4 + 0.6σ`,
//!    `min_margin = σ`, `max_entropy = 1.8 (1 − σ)`) and a hard cap
//!    `max_share = 1.5 × effective target`, so a flood is cut at once while the
//!    thresholds settle.
//!
//! The edge applies `steering` over its local policy and the operator's desired `policy`
//! config. A device whose target is removed (and with no fleet default) gets `steering`
//! deleted, and goes back to its own thresholds. State per device is shown in `GET
//! /api/v1/fleet` (`steering`) and as metrics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shared::sync::Scope;

use super::server::Fleet;

/// How often the controller looks.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// Cases a device must have decided since the last step before the next one.
pub const MIN_SAMPLE: u64 = 24;
/// Largest change of σ per step.
pub const MAX_STEP: f64 = 0.1;
/// The desired-config key the controller writes.
pub const KEY: &str = "steering";
/// The reported-state key the edges write their counts under.
pub const STATS_KEY: &str = "stats";

/// Fleet-wide steering settings.
#[derive(Clone, Copy, Debug)]
pub struct SteerConfig {
    /// Target share for devices without their own (`None`: only devices with a target
    /// are steered).
    pub default_target: Option<f64>,
    /// Verdict queue length at which the pressure factor starts falling (from half of it).
    pub queue_high: usize,
}

impl Default for SteerConfig {
    fn default() -> Self {
        SteerConfig {
            default_target: None,
            queue_high: 512,
        }
    }
}

/// What an edge reports under reported state `stats` (cumulative since it started).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EdgeStats {
    /// When the agent started (Unix ms): counts restart from zero with it.
    pub started_ms: u64,
    /// Cases decided local.
    pub cases_local: u64,
    /// Cases sent to the cloud.
    pub cases_hard: u64,
    /// Cases the thresholds wanted to send but a budget held back.
    pub over_budget: u64,
}

/// The controller's view of one device.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DeviceSteer {
    /// The target share in force (the device's own or the fleet default).
    pub target: f64,
    /// The target after the queue's pressure.
    pub effective_target: f64,
    /// Share of cases sent in the last sample.
    pub observed_share: Option<f64>,
    /// Share the thresholds wanted to send in the last sample.
    pub wanted_share: Option<f64>,
    /// Sensitivity written to the device.
    pub sensitivity: f64,
    /// Steps taken.
    pub steps: u64,
    #[serde(skip)]
    base: Option<EdgeStats>,
}

/// The controller's state, shown by the API.
#[derive(Default)]
pub struct Steering {
    devices: Mutex<HashMap<String, DeviceSteer>>,
    pressure: Mutex<f64>,
}

impl Steering {
    /// Per-device state.
    pub fn devices(&self) -> HashMap<String, DeviceSteer> {
        self.devices.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// The queue's pressure factor at the last look.
    pub fn pressure(&self) -> f64 {
        self.pressure.lock().map_or(1.0, |p| *p)
    }
}

/// The pressure factor for `queue` cases waiting.
pub fn pressure(queue: usize, high: usize) -> f64 {
    let high = high.max(1) as f64;
    let q = queue as f64;
    if q <= high / 2.0 {
        1.0
    } else {
        (1.0 - (q - high / 2.0) / (1.5 * high)).clamp(0.1, 1.0)
    }
}

/// One controller step: the new sensitivity from the current one, the effective target
/// and the share the thresholds wanted in the last sample.
pub fn step(sensitivity: f64, effective_target: f64, wanted_share: f64) -> f64 {
    let err = effective_target - wanted_share;
    (sensitivity + err.clamp(-MAX_STEP, MAX_STEP)).clamp(0.0, 1.0)
}

/// The desired config `steering` for a sensitivity and effective target.
pub fn desired(sensitivity: f64, effective_target: f64) -> serde_json::Value {
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    serde_json::json!({
        "sensitivity": r(sensitivity),
        "effective_target": r(effective_target),
        "policy": {
            "min_max_prob": r(0.4 + 0.6 * sensitivity),
            "min_margin": r(sensitivity),
            "max_entropy": r(1.8 * (1.0 - sensitivity)),
            "max_share": r((1.5 * effective_target).clamp(0.001, 1.0)),
        },
    })
}

/// Runs the controller until the process ends.
pub async fn run(fleet: Arc<Fleet>, cfg: SteerConfig) {
    let mut tick = tokio::time::interval(INTERVAL);
    loop {
        tick.tick().await;
        if let Err(e) = look(&fleet, cfg) {
            tracing::warn!("steering: {e:#}");
        }
    }
}

fn look(fleet: &Fleet, cfg: SteerConfig) -> anyhow::Result<()> {
    let p = pressure(fleet.store.queue_len(), cfg.queue_high);
    if let Ok(mut g) = fleet.steering.pressure.lock() {
        *g = p;
    }
    metrics::gauge!("cloud_steer_pressure").set(p);
    let now = super::server::now_ms();
    for d in fleet.store.devices()? {
        let Some(target) = d.target_share.or(cfg.default_target) else {
            // Not steered (any more): the edge goes back to its own thresholds.
            fleet.with_replica(&d.id, |r| {
                let steered = r.get(Scope::DesiredConfig, KEY).is_some();
                if steered {
                    r.write(Scope::DesiredConfig, KEY, None, now)?;
                }
                Ok(((), steered))
            })?;
            if let Ok(mut devices) = fleet.steering.devices.lock() {
                devices.remove(&d.id);
            }
            continue;
        };
        let effective = (target * p).clamp(0.0, 1.0);
        let (stats, current) = fleet.with_replica(&d.id, |r| {
            let stats: Option<EdgeStats> = r
                .get(Scope::ReportedState, STATS_KEY)
                .and_then(|b| serde_json::from_slice(b).ok());
            let current: Option<serde_json::Value> = r
                .get(Scope::DesiredConfig, KEY)
                .and_then(|b| serde_json::from_slice(b).ok());
            Ok(((stats, current), false))
        })?;
        let mut devices = fleet
            .steering
            .devices
            .lock()
            .map_err(|_| anyhow::anyhow!("steering state poisoned"))?;
        let s = devices.entry(d.id.clone()).or_insert_with(|| DeviceSteer {
            sensitivity: current
                .as_ref()
                .and_then(|c| c["sensitivity"].as_f64())
                .unwrap_or(0.5),
            ..DeviceSteer::default()
        });
        s.target = target;
        s.effective_target = effective;
        if let Some(now_stats) = stats {
            // Counts are since the agent started: with no earlier look at this run of the
            // agent (first look, an agent restart, a cloud restart), the sample starts at
            // zero, i.e. at the agent's start.
            let base = match &s.base {
                Some(b)
                    if b.started_ms == now_stats.started_ms
                        && now_stats.cases_local >= b.cases_local
                        && now_stats.cases_hard >= b.cases_hard
                        && now_stats.over_budget >= b.over_budget =>
                {
                    b.clone()
                }
                _ => EdgeStats {
                    started_ms: now_stats.started_ms,
                    ..EdgeStats::default()
                },
            };
            let hard = now_stats.cases_hard - base.cases_hard;
            let over = now_stats.over_budget - base.over_budget;
            let decided = now_stats.cases_local - base.cases_local + hard;
            if decided >= MIN_SAMPLE {
                let wanted = (hard + over) as f64 / decided as f64;
                s.observed_share = Some(hard as f64 / decided as f64);
                s.wanted_share = Some(wanted);
                s.sensitivity = step(s.sensitivity, effective, wanted);
                s.steps += 1;
                s.base = Some(now_stats);
            } else {
                s.base = Some(base);
            }
        }
        let want = desired(s.sensitivity, effective);
        let labels = [("device", d.id.clone())];
        metrics::gauge!("cloud_steer_target_share", &labels).set(target);
        metrics::gauge!("cloud_steer_sensitivity", &labels).set(s.sensitivity);
        if let Some(o) = s.observed_share {
            metrics::gauge!("cloud_steer_observed_share", &labels).set(o);
        }
        drop(devices);
        if current.as_ref() != Some(&want) {
            let bytes = serde_json::to_vec(&want)?;
            fleet.with_replica(&d.id, |r| {
                r.write(Scope::DesiredConfig, KEY, Some(bytes), now)?;
                Ok(((), true))
            })?;
            tracing::debug!(device = %d.id, %want, "steering");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_falls_with_the_queue() {
        assert_eq!(pressure(0, 100), 1.0);
        assert_eq!(pressure(50, 100), 1.0);
        assert!((pressure(125, 100) - 0.5).abs() < 1e-9);
        assert_eq!(pressure(10_000, 100), 0.1);
    }

    #[test]
    fn sensitivity_moves_toward_the_target_and_stays_in_range() {
        // Sending too much: less sensitive, by at most one step.
        assert!((step(0.5, 0.1, 0.4) - 0.4).abs() < 1e-9);
        assert!((step(0.5, 0.1, 0.12) - 0.48).abs() < 1e-9);
        // Starving: more sensitive.
        assert!(step(0.5, 0.2, 0.05) > 0.5);
        assert_eq!(step(0.98, 0.9, 0.0), 1.0);
        assert_eq!(step(0.02, 0.0, 0.9), 0.0);
        // σ = 0.5 is the agent's default policy.
        let d = desired(0.5, 0.2);
        assert_eq!(d["policy"]["min_max_prob"], 0.7);
        assert_eq!(d["policy"]["min_margin"], 0.5);
        assert_eq!(d["policy"]["max_entropy"], 0.9);
        assert_eq!(d["policy"]["max_share"], 0.3);
    }

    /// A simulated device whose wanted share rises with σ: the loop settles near the
    /// target, from above and from below, and follows the target when load lowers it.
    #[test]
    fn the_loop_settles_on_the_target() {
        let device = |s: f64| (s * s * 0.8).min(1.0); // wanted share for sensitivity s
        for (start, target) in [(0.5, 0.05), (0.1, 0.3), (0.9, 0.15)] {
            let mut s = start;
            for _ in 0..60 {
                s = step(s, target, device(s));
            }
            assert!(
                (device(s) - target).abs() < 0.01,
                "from {start} to target {target}: wanted {}",
                device(s)
            );
        }
        let mut s = 0.5;
        for _ in 0..60 {
            s = step(s, 0.2 * pressure(1_000, 512), device(s));
        }
        assert!(device(s) < 0.2 * 0.7);
    }
}
