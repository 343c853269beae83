//! The verdict prompt: how a hard case is put to the model.
//!
//! [`render`] writes a compact text summary of a case — the machine, the student's
//! guesses, the window's log lines (deduplicated, with counts and the records they
//! appeared on) and, per channel, the statistics that tell faults apart: level, spread,
//! record-to-record noise, trend, the largest level change and where it happens, the
//! longest run of identical readings, and the range. The prompt ends where the answer
//! starts: the model continues it with the verdict JSON.
//!
//! [`target`] is the verdict the demo model is trained to give for a case of a known
//! class: the explanation names the evidence of that class in the same numbers the prompt
//! shows, so a model can learn to copy them.
//!
//! Numbers are written with few digits (three significant at most, exponent form for
//! extreme values) so that a small byte-level tokenizer spells them in a few tokens.

use std::fmt::Write as _;

use shared::case::HardCase;
use shared::record::Record;
use shared::schema::{CHANNELS, CLASSES};

use super::{Verdict, TEXT_MAX_LEN};

/// The text the prompt ends with; the verdict JSON follows it directly.
pub const ANSWER_CUE: &str = "verdict:";

/// Longest log line quoted in a prompt (characters); longer ones are cut.
const MESSAGE_PROMPT_LEN: usize = 48;
/// Most distinct log lines listed in a prompt.
const MESSAGES_LISTED: usize = 4;

/// The prompt text for a case.
///
/// ```text
/// machine press-01 rpm 1426 records 16
/// student normal 0.72 bearing_wear 0.26 (small_margin)
/// log: INFO cycle complete x5 @1-10; WARN door opened during cycle x1 @3
/// vibration mean 2.70 sd 0.29 noise 0.14 slope +0.053 step +0.55 @11 z4 flat 0 range 2.33..3.27
/// temperature mean 59.9 sd 0.30 noise 0.44 slope -0.012 step -0.29 @5 z1 flat 0 range 59.4..60.4
/// current …
/// pressure …
/// verdict:
/// ```
///
/// Record positions count from 1. `step D @K zZ`: the window's mean level changes by `D`
/// from record `K` on (the split that best separates two levels), `Z` times the noise.
/// `flat N @K`: `N` consecutive repeats of one value, from record `K`.
pub fn render(case: &HardCase) -> String {
    let mut out = String::with_capacity(640);
    let n = case.records.len();
    let _ = write!(out, "machine {}", clean(&case.machine, 64));
    if let Some(rpm) = mean_reading(&case.records, "rpm") {
        let _ = write!(out, " rpm {}", num(rpm));
    }
    let _ = writeln!(out, " records {n}");

    // The student's two best guesses and why it was unsure.
    let mut guesses: Vec<(usize, f32)> = case.probs.iter().copied().enumerate().collect();
    guesses.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    out.push_str("student");
    for (c, p) in guesses.iter().take(2) {
        if let Some(name) = CLASSES.get(*c) {
            let _ = write!(out, " {name} {}", prob(*p));
        }
    }
    let _ = writeln!(out, " ({})", case.reason.code());

    out.push_str("log:");
    let messages = message_groups(&case.records);
    if messages.is_empty() {
        out.push_str(" none");
    }
    for (i, g) in messages.iter().take(MESSAGES_LISTED).enumerate() {
        let sep = if i == 0 { " " } else { "; " };
        let _ = write!(out, "{sep}{} x{} @{}", g.text, g.count, g.span());
    }
    if messages.len() > MESSAGES_LISTED {
        let _ = write!(out, "; +{} more", messages.len() - MESSAGES_LISTED);
    }
    out.push('\n');

    for (c, name) in CHANNELS.iter().enumerate() {
        let s = Summary::of(&channel_values(&case.records, c));
        let _ = write!(
            out,
            "{name} mean {} sd {} noise {} slope {} step {} @{} z{} flat {}",
            num(s.mean),
            num(s.sd),
            num(s.noise),
            signed(s.slope),
            signed(s.step),
            s.step_at + 1,
            s.z,
            s.flat,
        );
        if s.flat > 0 {
            let _ = write!(out, " @{}", s.flat_at + 1);
        }
        let _ = write!(out, " range {}..{}", num(s.min), num(s.max));
        out.push('\n');
    }
    out.push_str(ANSWER_CUE);
    out
}

/// The verdict the demo model is trained to give for `case` when its true class is
/// `label`: class = `label`; confidence = the share of the window's records that carry
/// `label` themselves (records of simulated machines carry their own `label` field; a
/// window that straddles the start or end of a fault scores about 0.5, one wholly in one
/// state 1.0; 0.9 when no record carries a label), rounded to 2 decimals; an explanation
/// naming that class's evidence in this window, in the numbers the prompt shows; and a
/// class-specific action. Both texts fit in [`TEXT_MAX_LEN`] characters.
pub fn target(case: &HardCase, label: &str) -> Verdict {
    let labelled: Vec<String> = case
        .records
        .iter()
        .filter_map(|r| {
            r.extra_field("label")
                .and_then(|v| v.as_str().map(str::to_string))
        })
        .collect();
    let confidence = if labelled.is_empty() {
        0.9
    } else {
        let share =
            labelled.iter().filter(|l| l.as_str() == label).count() as f64 / labelled.len() as f64;
        (share * 100.0).round() / 100.0
    };
    let stats: Vec<Summary> = (0..CHANNELS.len())
        .map(|c| Summary::of(&channel_values(&case.records, c)))
        .collect();
    let messages = message_groups(&case.records);
    let (explanation, action) = evidence(label, &stats, &messages);
    Verdict {
        class: label.to_string(),
        confidence,
        explanation: cut(&explanation, TEXT_MAX_LEN),
        action: cut(&action, TEXT_MAX_LEN),
    }
}

/// The explanation and the action for a class.
fn evidence(label: &str, s: &[Summary], messages: &[MessageGroup]) -> (String, String) {
    let [vib, temp, cur, pres] = [&s[0], &s[1], &s[2], &s[3]];
    let step = |x: &Summary| format!("step {} at record {}", signed(x.step), x.step_at + 1);
    let (mut text, action) = match label {
        "normal" => (
            format!(
                "readings steady: vibration {}, temperature {}, current {}, pressure {}",
                num(vib.mean),
                num(temp.mean),
                num(cur.mean),
                num(pres.mean)
            ),
            "No action needed; keep monitoring.".to_string(),
        ),
        "bearing_wear" => (
            format!(
                "vibration {} mm/s, noise {}, {}",
                num(vib.mean),
                num(vib.noise),
                step(vib)
            ),
            "Schedule a bearing inspection and lubrication; plan a replacement if vibration keeps rising."
                .to_string(),
        ),
        "overheating" => (
            format!(
                "temperature {} with slope {} per record, {}",
                num(temp.mean),
                signed(temp.slope),
                step(temp)
            ),
            "Check coolant flow and spindle load; reduce duty until the temperature is back in range."
                .to_string(),
        ),
        "misalignment" => (
            format!(
                "vibration {} noise {}, current {} {}, pressure noise {}",
                num(vib.mean),
                num(vib.noise),
                num(cur.mean),
                step(cur),
                num(pres.noise)
            ),
            "Check shaft and coupling alignment at the next stop; inspect the mounts.".to_string(),
        ),
        "electrical_fault" => (
            format!(
                "current jumps: sd {}, noise {}, range {}..{}",
                num(cur.sd),
                num(cur.noise),
                num(cur.min),
                num(cur.max)
            ),
            "Inspect the supply, wiring and motor drive; check the breaker log.".to_string(),
        ),
        "sensor_fault" => {
            let c = suspect_sensor(s);
            let x = &s[c];
            let text = if x.flat >= 3 {
                format!(
                    "{} stuck: {} identical readings from record {}",
                    CHANNELS[c],
                    x.flat + 1,
                    x.flat_at + 1
                )
            } else {
                format!(
                    "{} implausible: range {}..{}, sd {}",
                    CHANNELS[c],
                    num(x.min),
                    num(x.max),
                    num(x.sd)
                )
            };
            (
                text,
                format!(
                    "Inspect and recalibrate the {} sensor; do not trust its readings meanwhile.",
                    CHANNELS[c]
                ),
            )
        }
        other => (
            format!(
                "{}: vibration {}, temperature {}, current {}, pressure {}",
                clean(other, 32),
                num(vib.mean),
                num(temp.mean),
                num(cur.mean),
                num(pres.mean)
            ),
            "Review the case with maintenance.".to_string(),
        ),
    };
    // The log lines that speak for the class: warnings and errors for a fault, the
    // routine lines for normal operation.
    let wanted = |g: &MessageGroup| {
        let severity = shared::features::message_severity(&g.text);
        if label == "normal" {
            severity == 0
        } else {
            severity > 0
        }
    };
    if let Some(g) = messages.iter().find(|g| wanted(g)) {
        let _ = write!(text, "; log: {} x{}", g.text, g.count);
    }
    (text, action)
}

/// The channel a sensor fault most likely sits on: the longest run of repeats if there is
/// one, else the most extreme reading relative to the channel's noise.
fn suspect_sensor(s: &[Summary]) -> usize {
    let stuck = (0..s.len()).max_by_key(|&c| (s[c].flat, std::cmp::Reverse(c)));
    if let Some(c) = stuck.filter(|&c| s[c].flat >= 3) {
        return c;
    }
    (0..s.len())
        .max_by(|&a, &b| s[a].outlier().total_cmp(&s[b].outlier()))
        .unwrap_or(0)
}

/// Per-channel statistics of a window.
#[derive(Clone, Debug, Default)]
struct Summary {
    mean: f64,
    sd: f64,
    /// Median absolute change from one record to the next.
    noise: f64,
    /// Least-squares slope per record.
    slope: f64,
    /// Mean after minus mean before the split that best separates two levels.
    step: f64,
    /// Index of the first record after that split.
    step_at: usize,
    /// |step| in units of the noise, rounded, capped at 99.
    z: u32,
    /// Longest run of exact repeats (number of repeated steps).
    flat: usize,
    /// Index of the first record of that run.
    flat_at: usize,
    min: f64,
    max: f64,
    median: f64,
}

impl Summary {
    fn of(v: &[f64]) -> Summary {
        let n = v.len();
        if n == 0 {
            return Summary::default();
        }
        let nf = n as f64;
        let mean = v.iter().sum::<f64>() / nf;
        let sd = (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / nf).sqrt();
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mid = median(v.to_vec());
        let tm = (nf - 1.0) / 2.0;
        let (mut num, mut den) = (0.0, 0.0);
        for (i, x) in v.iter().enumerate() {
            let dt = i as f64 - tm;
            num += dt * (x - mean);
            den += dt * dt;
        }
        let slope = if den > 0.0 { num / den } else { 0.0 };
        let noise = median(v.windows(2).map(|w| (w[1] - w[0]).abs()).collect());
        // The split maximising |mean after − mean before| · sqrt(k (n − k) / n).
        let (mut step, mut step_at, mut best) = (0.0, 0, 0.0);
        let mut prefix = 0.0;
        let total: f64 = v.iter().sum();
        for k in 1..n {
            prefix += v[k - 1];
            let before = prefix / k as f64;
            let after = (total - prefix) / (n - k) as f64;
            let d = after - before;
            let score = d.abs() * ((k * (n - k)) as f64 / nf).sqrt();
            if score > best {
                (step, step_at, best) = (d, k, score);
            }
        }
        let z = if step == 0.0 {
            0
        } else {
            let r = step.abs() / noise.max(step.abs() * 1e-3).max(1e-9);
            r.round().min(99.0) as u32
        };
        let (mut flat, mut flat_at, mut run) = (0, 0, 0);
        for (i, w) in v.windows(2).enumerate() {
            run = if w[1] == w[0] { run + 1 } else { 0 };
            if run > flat {
                flat = run;
                flat_at = i + 1 - run;
            }
        }
        Summary {
            mean,
            sd,
            noise,
            slope,
            step,
            step_at,
            z,
            flat,
            flat_at,
            min,
            max,
            median: mid,
        }
    }

    /// The reading farthest from the median, in units of the noise.
    fn outlier(&self) -> f64 {
        let far = (self.max - self.median)
            .abs()
            .max((self.median - self.min).abs());
        let r = far / self.noise.max(1e-6);
        if r.is_finite() {
            r
        } else {
            0.0
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Distinct log lines in order of first appearance, with counts and positions.
#[derive(Clone, Debug)]
struct MessageGroup {
    text: String,
    count: usize,
    first: usize,
    last: usize,
}

impl MessageGroup {
    fn span(&self) -> String {
        span(self.first, self.last)
    }
}

/// `3` or `3-11`: records `first..=last` (indices from 0) counted from 1.
fn span(first: usize, last: usize) -> String {
    if first == last {
        format!("{}", first + 1)
    } else {
        format!("{}-{}", first + 1, last + 1)
    }
}

fn message_groups(records: &[Record]) -> Vec<MessageGroup> {
    let mut groups: Vec<MessageGroup> = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let Some(m) = r.message.as_deref() else {
            continue;
        };
        let text = clean(m, MESSAGE_PROMPT_LEN);
        if text.is_empty() {
            continue;
        }
        match groups.iter_mut().find(|g| g.text == text) {
            Some(g) => {
                g.count += 1;
                g.last = i;
            }
            None => groups.push(MessageGroup {
                text,
                count: 1,
                first: i,
                last: i,
            }),
        }
    }
    groups
}

/// The values of a required channel, in record order.
fn channel_values(records: &[Record], c: usize) -> Vec<f64> {
    records.iter().map(|r| r.channel(c)).collect()
}

/// The mean of an optional reading over the records that carry it.
fn mean_reading(records: &[Record], name: &str) -> Option<f64> {
    let values: Vec<f64> = records
        .iter()
        .filter_map(|r| r.readings.get(name).copied())
        .collect();
    if values.is_empty() {
        None
    } else {
        Some(values.iter().sum::<f64>() / values.len() as f64)
    }
}

/// Text on one line, whitespace collapsed, at most `max` characters (cut with `…`).
fn clean(s: &str, max: usize) -> String {
    let collapsed = s
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    cut(&collapsed, max)
}

/// At most `max` characters; a cut text ends with `…`.
fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// A number with at most three significant digits (two below 1), in exponent form
/// when very large or very small.
fn num(x: f64) -> String {
    if !x.is_finite() {
        return "nan".into();
    }
    let a = x.abs();
    let s = if a >= 1e5 {
        format!("{x:.1e}")
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if !(5e-4..0.1).contains(&a) {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    };
    // "-0.00" says nothing more than "0.00".
    if s.starts_with('-') && s[1..].chars().all(|c| c == '0' || c == '.') {
        s[1..].to_string()
    } else {
        s
    }
}

/// [`num`] with an explicit sign.
fn signed(x: f64) -> String {
    let s = num(x);
    if s.starts_with('-') || s == "nan" {
        s
    } else {
        format!("+{s}")
    }
}

/// A probability with two decimals.
fn prob(p: f32) -> String {
    let p = if p.is_finite() {
        p.clamp(0.0, 1.0)
    } else {
        0.0
    };
    format!("{p:.2}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::case::{CaseId, Reason};
    use shared::sim::{window_label, SimConfig, Simulator};

    fn sim_cases(seed: u64, count: usize) -> Vec<(HardCase, String)> {
        let mut sim = Simulator::new(SimConfig {
            machines: 3,
            seed,
            fault_share: 0.6,
            ..SimConfig::default()
        });
        let mut windows: Vec<Vec<shared::sim::SimRecord>> = vec![Vec::new(); 3];
        let mut out = Vec::new();
        while out.len() < count {
            for (i, r) in sim.tick().into_iter().enumerate() {
                windows[i].push(r);
                if windows[i].len() == 16 {
                    let w = std::mem::take(&mut windows[i]);
                    let label = window_label(w.iter().map(|r| r.label)).to_string();
                    let records: Vec<Record> = w.iter().map(|r| r.to_record()).collect();
                    out.push((case_of(records), label));
                }
            }
        }
        out
    }

    fn case_of(records: Vec<Record>) -> HardCase {
        HardCase {
            id: CaseId::of_window(&records[0].machine, &records),
            machine: records[0].machine.clone(),
            start_ms: records[0].ts_ms,
            end_ms: records[records.len() - 1].ts_ms,
            features: shared::features::extract(&records).to_vec(),
            probs: vec![0.4, 0.35, 0.1, 0.1, 0.05, 0.0],
            reason: Reason::SmallMargin { margin: 0.05 },
            records,
        }
    }

    fn record(v: serde_json::Value) -> Record {
        Record::from_json_value(v).expect("valid record")
    }

    #[test]
    fn renders_simulated_cases_compactly_and_deterministically() {
        for (case, label) in sim_cases(7, 60) {
            let p = render(&case);
            assert_eq!(p, render(&case));
            assert!(p.ends_with(ANSWER_CUE), "{p}");
            assert!(p.starts_with("machine "), "{p}");
            assert_eq!(p.lines().count(), 8, "{p}");
            assert!(p.len() < 700, "{} bytes: {p}", p.len());
            for ch in CHANNELS {
                assert!(p.contains(&format!("\n{ch} mean ")), "{p}");
            }
            let v = target(&case, &label);
            assert_eq!(v, target(&case, &label));
            assert_eq!(v.class, label);
            assert!((0.0..=1.0).contains(&v.confidence));
            assert!(v.confidence >= 0.5, "the label is the window's majority");
            for t in [&v.explanation, &v.action] {
                assert!(!t.is_empty() && t.chars().count() <= TEXT_MAX_LEN, "{t}");
            }
            let json = serde_json::to_string(&v).expect("serialises");
            assert!(json.starts_with(&format!("{{\"class\":\"{label}\",\"confidence\":")));
        }
    }

    #[test]
    fn every_class_gets_evidence_within_limits() {
        let cases = sim_cases(3, 40);
        for (case, _) in &cases {
            for class in CLASSES.iter().copied().chain(["melted", ""]) {
                let v = target(case, class);
                assert_eq!(v.class, class);
                for t in [&v.explanation, &v.action] {
                    assert!(!t.is_empty() && t.chars().count() <= TEXT_MAX_LEN, "{t}");
                }
            }
        }
    }

    #[test]
    fn odd_cases_never_panic() {
        let long: String = "ERROR ☢ überhitzt \n\t "
            .repeat(100)
            .chars()
            .take(1000)
            .collect();
        let extreme = [
            0.0,
            -0.0,
            1e300,
            -1e300,
            f64::MIN_POSITIVE,
            123456.789,
            -4e-7,
        ];
        for n in [1usize, 2, 3, 16, 64] {
            for (k, x) in extreme.iter().enumerate() {
                let records: Vec<Record> = (0..n)
                    .map(|i| {
                        let mut v = serde_json::json!({
                            "machine": "m",
                            "ts": i as i64,
                            "readings": {
                                "vibration": if i % 2 == 0 { *x } else { 1.0 },
                                "temperature": x,
                                "current": -x,
                                "pressure": (i as f64) * x,
                                "rpm": x,
                            },
                        });
                        if (i + k) % 3 == 0 {
                            v["message"] = serde_json::json!(long);
                        } else if i % 5 == 1 {
                            v["message"] = serde_json::json!(format!("WARN note {i}"));
                        }
                        record(v)
                    })
                    .collect();
                let mut case = case_of(records);
                case.probs = vec![f32::NAN, 2.0, -1.0];
                case.machine = "x".repeat(200);
                let p = render(&case);
                assert!(p.ends_with(ANSWER_CUE));
                assert!(p.len() < 2000, "{} bytes", p.len());
                assert!(!p.contains('\t') && !p.contains("inf"), "{p}");
                for label in CLASSES {
                    let v = target(&case, label);
                    assert!(v.explanation.chars().count() <= TEXT_MAX_LEN);
                    assert!(v.action.chars().count() <= TEXT_MAX_LEN);
                    assert_eq!(v.confidence, 0.9, "no record carries a label");
                }
            }
        }
    }

    #[test]
    fn messages_are_grouped_and_cut() {
        let records: Vec<Record> = (0..16)
            .map(|i| {
                let mut v = serde_json::json!({
                    "machine": "m", "ts": i,
                    "readings": {"vibration": 2.0, "temperature": 50.0, "current": 10.0, "pressure": 3.0},
                });
                match i % 4 {
                    0 => v["message"] = serde_json::json!("INFO cycle complete"),
                    1 => v["message"] = serde_json::json!(format!("WARN {}", "é".repeat(300))),
                    _ => {}
                }
                record(v)
            })
            .collect();
        let p = render(&case_of(records));
        assert!(
            p.contains("log: INFO cycle complete x4 @1-13; WARN "),
            "{p}"
        );
        assert!(p.contains("… x4 @2-14"), "{p}");
        // Constant readings: no step, a flat run over the whole window.
        assert!(
            p.contains("vibration mean 2.00 sd 0.00 noise 0.00 slope +0.00 step +0.00 @1 z0 flat 15 @1 range 2.00..2.00\n"),
            "{p}"
        );
    }

    #[test]
    fn numbers_are_short() {
        assert_eq!(num(2.697), "2.70");
        assert_eq!(num(59.912), "59.9");
        assert_eq!(num(1426.0), "1426");
        assert_eq!(num(0.0347), "0.035");
        assert_eq!(num(-0.0001), "0.00");
        assert_eq!(num(1e300), "1.0e300");
        assert_eq!(signed(0.05), "+0.050");
        assert_eq!(signed(-1.5), "-1.50");
        assert_eq!(prob(0.7244), "0.72");
    }
}
