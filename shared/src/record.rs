//! The sensor record: the contract with factory devices.
//!
//! A record arrives as JSON (see `architecture.md`), is validated here field by field, and
//! is stored as postcard. Validation never panics: every problem is a [`RecordError`] that
//! names the field and says what is wrong with it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::schema::{
    valid_machine, CHANNELS, ID_MAX_LEN, MACHINE_MAX_LEN, MAX_READINGS, MESSAGE_MAX_LEN,
    READING_NAME_MAX_LEN,
};

/// Latest accepted timestamp: 9999-12-31T23:59:59.999Z in Unix milliseconds.
pub const MAX_TS_MS: i64 = 253_402_300_799_999;

/// One validated sensor record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Machine name (validated: 1–64 characters of `A-Za-z0-9._-`).
    pub machine: String,
    /// Timestamp, Unix milliseconds (UTC).
    pub ts_ms: i64,
    /// Named readings; the four of [`CHANNELS`] are always present and finite.
    pub readings: BTreeMap<String, f64>,
    /// Optional log line.
    pub message: Option<String>,
    /// Optional idempotency key, unique per machine.
    pub id: Option<String>,
    /// Unknown fields, kept as the JSON text of an object (for audits and tests), if any.
    pub extra: Option<String>,
}

/// Why a record was rejected: the field and what is wrong with it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("field `{field}`: {reason}")]
pub struct RecordError {
    /// The offending field (`readings.temperature`, `ts`, … or `record` for the whole).
    pub field: String,
    /// What is wrong, in words a device integrator can act on.
    pub reason: String,
}

fn err(field: impl Into<String>, reason: impl Into<String>) -> RecordError {
    RecordError {
        field: field.into(),
        reason: reason.into(),
    }
}

impl Record {
    /// Parses and validates one JSON record.
    pub fn from_json_slice(bytes: &[u8]) -> Result<Record, RecordError> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| err("record", format!("malformed JSON: {e}")))?;
        Record::from_json_value(value)
    }

    /// Validates an already parsed JSON value.
    pub fn from_json_value(value: Value) -> Result<Record, RecordError> {
        let Value::Object(mut obj) = value else {
            return Err(err("record", "expected a JSON object"));
        };
        let machine = match obj.remove("machine") {
            Some(Value::String(s)) => {
                if !valid_machine(&s) {
                    return Err(err(
                        "machine",
                        format!(
                            "must be 1–{MACHINE_MAX_LEN} characters of A-Za-z0-9._- (got {:?})",
                            truncate(&s, 80)
                        ),
                    ));
                }
                s
            }
            Some(_) => return Err(err("machine", "must be a string")),
            None => return Err(err("machine", "missing")),
        };
        let ts_ms = match obj.remove("ts") {
            Some(v) => parse_ts(&v)?,
            None => return Err(err("ts", "missing")),
        };
        let readings = match obj.remove("readings") {
            Some(Value::Object(r)) => parse_readings(r)?,
            Some(_) => return Err(err("readings", "must be an object of named numbers")),
            None => return Err(err("readings", "missing")),
        };
        let message = match obj.remove("message") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => {
                if s.len() > MESSAGE_MAX_LEN {
                    return Err(err(
                        "message",
                        format!("longer than {MESSAGE_MAX_LEN} bytes ({} bytes)", s.len()),
                    ));
                }
                Some(s)
            }
            Some(_) => return Err(err("message", "must be a string")),
        };
        let id = match obj.remove("id") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => {
                if s.is_empty() || s.len() > ID_MAX_LEN {
                    return Err(err("id", format!("must be 1–{ID_MAX_LEN} bytes")));
                }
                Some(s)
            }
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(_) => return Err(err("id", "must be a string or an integer")),
        };
        let extra = if obj.is_empty() {
            None
        } else {
            Some(Value::Object(obj).to_string())
        };
        Ok(Record {
            machine,
            ts_ms,
            readings,
            message,
            id,
            extra,
        })
    }

    /// The value of a required channel (always present after validation).
    pub fn channel(&self, index: usize) -> f64 {
        CHANNELS
            .get(index)
            .and_then(|name| self.readings.get(*name))
            .copied()
            .unwrap_or(0.0)
    }

    /// The record as JSON, in the contract's format (`ts` as RFC 3339), with unknown
    /// fields restored.
    pub fn to_json(&self) -> Value {
        let mut obj = Map::new();
        if let Some(extra) = &self.extra {
            if let Ok(Value::Object(e)) = serde_json::from_str::<Value>(extra) {
                obj.extend(e);
            }
        }
        obj.insert("machine".into(), Value::String(self.machine.clone()));
        obj.insert("ts".into(), Value::String(format_ts(self.ts_ms)));
        let readings: Map<String, Value> = self
            .readings
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::json!(v)))
            .collect();
        obj.insert("readings".into(), Value::Object(readings));
        if let Some(m) = &self.message {
            obj.insert("message".into(), Value::String(m.clone()));
        }
        if let Some(id) = &self.id {
            obj.insert("id".into(), Value::String(id.clone()));
        }
        Value::Object(obj)
    }

    /// A field of the unknown-field object, e.g. the simulator's `label`.
    pub fn extra_field(&self, name: &str) -> Option<Value> {
        let extra = self.extra.as_ref()?;
        match serde_json::from_str::<Value>(extra).ok()? {
            Value::Object(mut o) => o.remove(name),
            _ => None,
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

pub(crate) fn parse_ts(v: &Value) -> Result<i64, RecordError> {
    match v {
        Value::Number(n) => {
            let ms = n
                .as_i64()
                .ok_or_else(|| err("ts", "integer Unix milliseconds expected"))?;
            if !(0..=MAX_TS_MS).contains(&ms) {
                return Err(err("ts", format!("{ms} ms is outside 1970–9999")));
            }
            Ok(ms)
        }
        Value::String(s) => {
            let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map_err(|e| {
                    err(
                        "ts",
                        format!("not an RFC 3339 timestamp ({:?}): {e}", truncate(s, 40)),
                    )
                })?;
            let ms = i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
                .map_err(|_| err("ts", "out of range"))?;
            if !(0..=MAX_TS_MS).contains(&ms) {
                return Err(err("ts", "outside 1970–9999"));
            }
            Ok(ms)
        }
        _ => Err(err(
            "ts",
            "must be an RFC 3339 string or integer Unix milliseconds",
        )),
    }
}

fn parse_readings(r: Map<String, Value>) -> Result<BTreeMap<String, f64>, RecordError> {
    if r.len() > MAX_READINGS {
        return Err(err(
            "readings",
            format!("more than {MAX_READINGS} readings ({})", r.len()),
        ));
    }
    let mut out = BTreeMap::new();
    for (name, v) in r {
        if name.is_empty() || name.len() > READING_NAME_MAX_LEN {
            return Err(err(
                "readings",
                format!("reading names must be 1–{READING_NAME_MAX_LEN} bytes"),
            ));
        }
        let x = match &v {
            Value::Number(n) => n.as_f64(),
            _ => None,
        };
        match x {
            Some(x) if x.is_finite() => {
                out.insert(name, x);
            }
            _ => {
                return Err(err(
                    format!("readings.{}", truncate(&name, READING_NAME_MAX_LEN)),
                    format!(
                        "must be a finite number (got {})",
                        truncate(&v.to_string(), 40)
                    ),
                ))
            }
        }
    }
    for ch in CHANNELS {
        if !out.contains_key(ch) {
            return Err(err(format!("readings.{ch}"), "missing (required reading)"));
        }
    }
    Ok(out)
}

/// Formats Unix milliseconds as RFC 3339 (UTC, millisecond precision).
pub fn format_ts(ms: i64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(t) => {
            let fmt = time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            );
            t.format(&fmt).unwrap_or_else(|_| ms.to_string())
        }
        Err(_) => ms.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Value {
        serde_json::json!({"machine": "press-07", "ts": "2026-11-23T07:00:00.125Z",
            "readings": {"vibration": 2.31, "temperature": 61.5, "current": 9.8, "pressure": 3.12, "rpm": 1200},
            "message": "WARN spindle temp rising", "id": "press-07-000123", "label": "overheating"})
    }

    #[test]
    fn accepts_the_contract_example_and_keeps_unknown_fields() {
        let r = Record::from_json_value(good()).expect("valid");
        assert_eq!(r.machine, "press-07");
        assert_eq!(r.ts_ms, 1_795_417_200_125);
        assert_eq!(r.readings.len(), 5);
        assert_eq!(
            r.extra_field("label"),
            Some(Value::String("overheating".into()))
        );
        let back = Record::from_json_value(r.to_json()).expect("round trip");
        assert_eq!(back, r);
    }

    #[test]
    fn integer_milliseconds_are_accepted() {
        let mut v = good();
        v["ts"] = serde_json::json!(1_700_000_000_000i64);
        assert_eq!(
            Record::from_json_value(v).expect("valid").ts_ms,
            1_700_000_000_000
        );
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases: Vec<(&str, Value, &str)> = vec![
            ("machine", serde_json::json!("bad name!"), "machine"),
            ("machine", serde_json::json!(""), "machine"),
            ("ts", serde_json::json!("yesterday"), "ts"),
            ("ts", serde_json::json!(-5), "ts"),
            (
                "readings",
                serde_json::json!({"vibration": 1.0}),
                "readings.temperature",
            ),
            ("readings", serde_json::json!([1, 2]), "readings"),
            ("message", serde_json::json!(5), "message"),
            ("id", serde_json::json!(""), "id"),
        ];
        for (key, value, field) in cases {
            let mut v = good();
            v[key] = value;
            let e = Record::from_json_value(v).expect_err(key);
            assert_eq!(e.field, field, "{e}");
        }
        let mut v = good();
        v["readings"]["current"] = serde_json::json!("NaN");
        assert_eq!(
            Record::from_json_value(v).expect_err("nan").field,
            "readings.current"
        );
        let mut v = good();
        v.as_object_mut().expect("object").remove("machine");
        assert_eq!(
            Record::from_json_value(v).expect_err("missing").field,
            "machine"
        );
        assert_eq!(
            Record::from_json_slice(b"{\"machine\": ")
                .expect_err("json")
                .field,
            "record"
        );
    }
}
