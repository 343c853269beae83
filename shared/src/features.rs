//! Window → feature vector: the student model's input layout, defined once.
//!
//! Per channel (in [`CHANNELS`] order) seven statistics, then two message shares:
//! `mean, std, min, max, slope, max_step, flat_share` × 4, `warn_share, error_share`.
//! The training script in `onnx/` reads these names from the dataset header that
//! `edge-agent dataset` writes, so the layout lives only here.

use std::borrow::Borrow;

use crate::record::Record;
use crate::schema::CHANNELS;

/// Statistics computed per channel, in order.
pub const CHANNEL_STATS: [&str; 7] = [
    "mean",
    "std",
    "min",
    "max",
    "slope",
    "max_step",
    "flat_share",
];

/// Features computed over the log lines of the window, in order.
pub const MESSAGE_STATS: [&str; 2] = ["warn_share", "error_share"];

/// Length of the feature vector.
pub const NUM_FEATURES: usize = CHANNELS.len() * CHANNEL_STATS.len() + MESSAGE_STATS.len();

/// The feature names, in vector order (`vibration.mean`, …, `error_share`).
pub fn feature_names() -> Vec<String> {
    let mut names = Vec::with_capacity(NUM_FEATURES);
    for ch in CHANNELS {
        for st in CHANNEL_STATS {
            names.push(format!("{ch}.{st}"));
        }
    }
    names.extend(MESSAGE_STATS.iter().map(|s| s.to_string()));
    names
}

/// Severity of a log line, as the features count it.
pub fn message_severity(message: &str) -> u8 {
    let head: String = message
        .chars()
        .take(16)
        .collect::<String>()
        .to_ascii_uppercase();
    if head.starts_with("ERROR") || head.starts_with("ALARM") || head.starts_with("FAULT") {
        2
    } else if head.starts_with("WARN") {
        1
    } else {
        0
    }
}

/// Computes the feature vector of a window (records in arrival order).
///
/// An empty window gives all zeros; the statistics never produce NaN or infinity for
/// finite readings (which validation guarantees).
pub fn extract<R: Borrow<Record>>(window: &[R]) -> [f32; NUM_FEATURES] {
    let mut out = [0f32; NUM_FEATURES];
    let n = window.len();
    if n == 0 {
        return out;
    }
    let mut values = Vec::with_capacity(n);
    for (c, _) in CHANNELS.iter().enumerate() {
        values.clear();
        values.extend(window.iter().map(|r| r.borrow().channel(c)));
        let stats = channel_stats(&values);
        let base = c * CHANNEL_STATS.len();
        for (i, s) in stats.iter().enumerate() {
            out[base + i] = clamp_f32(*s);
        }
    }
    let mut warn = 0usize;
    let mut error = 0usize;
    for r in window {
        match r.borrow().message.as_deref().map(message_severity) {
            Some(1) => warn += 1,
            Some(2) => error += 1,
            _ => {}
        }
    }
    let base = CHANNELS.len() * CHANNEL_STATS.len();
    out[base] = warn as f32 / n as f32;
    out[base + 1] = error as f32 / n as f32;
    out
}

fn clamp_f32(x: f64) -> f32 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(-1e30, 1e30) as f32
    }
}

fn channel_stats(v: &[f64]) -> [f64; 7] {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    // Least-squares slope per sample.
    let tm = (n - 1.0) / 2.0;
    let mut num = 0.0;
    let mut den = 0.0;
    for (i, x) in v.iter().enumerate() {
        let dt = i as f64 - tm;
        num += dt * (x - mean);
        den += dt * dt;
    }
    let slope = if den > 0.0 { num / den } else { 0.0 };
    let mut max_step: f64 = 0.0;
    let mut flat = 0usize;
    for w in v.windows(2) {
        let d = (w[1] - w[0]).abs();
        max_step = max_step.max(d);
        if d == 0.0 {
            flat += 1;
        }
    }
    let flat_share = if v.len() > 1 {
        flat as f64 / (v.len() - 1) as f64
    } else {
        0.0
    };
    [mean, var.sqrt(), min, max, slope, max_step, flat_share]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn rec(v: f64, t: f64, msg: Option<&str>) -> Record {
        let mut readings = BTreeMap::new();
        readings.insert("vibration".to_string(), v);
        readings.insert("temperature".to_string(), t);
        readings.insert("current".to_string(), 10.0);
        readings.insert("pressure".to_string(), 3.0);
        Record {
            machine: "m".into(),
            ts_ms: 0,
            readings,
            message: msg.map(str::to_string),
            id: None,
            extra: None,
        }
    }

    #[test]
    fn layout_matches_names() {
        assert_eq!(feature_names().len(), NUM_FEATURES);
        assert_eq!(feature_names()[0], "vibration.mean");
        assert_eq!(feature_names()[NUM_FEATURES - 1], "error_share");
    }

    #[test]
    fn statistics_are_right_on_a_ramp() {
        let w: Vec<Record> = (0..4)
            .map(|i| {
                rec(
                    i as f64,
                    50.0,
                    if i == 0 {
                        Some("WARN hot")
                    } else {
                        Some("ERROR x")
                    },
                )
            })
            .collect();
        let f = extract(&w);
        assert_eq!(f[0], 1.5); // mean
        assert_eq!(f[2], 0.0); // min
        assert_eq!(f[3], 3.0); // max
        assert!((f[4] - 1.0).abs() < 1e-6); // slope
        assert_eq!(f[5], 1.0); // max step
        assert_eq!(f[6], 0.0); // flat share
        assert_eq!(f[7 + 6], 1.0); // temperature is flat
        assert_eq!(f[NUM_FEATURES - 2], 0.25);
        assert_eq!(f[NUM_FEATURES - 1], 0.75);
        assert!(extract::<Record>(&[]).iter().all(|x| *x == 0.0));
    }
}
