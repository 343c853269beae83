//! Parsing and validating an ingest request: one JSON record, a JSON array of records,
//! or NDJSON. The whole request is validated before anything is stored, so a rejected
//! request stores nothing. Errors name the line (1-based) and the field.

use serde::Serialize;
use shared::record::Record;

use crate::config::IngestConfig;

/// How the body is framed, from the `Content-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// `application/json`: one record (an object) or an array of records.
    Json,
    /// `application/x-ndjson` (also `application/ndjson`, `application/jsonl`): one record a line.
    Ndjson,
}

/// A rejected request: the HTTP status and what to tell the device.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct IngestError {
    /// HTTP status code.
    #[serde(skip)]
    pub status: u16,
    /// What is wrong.
    pub error: String,
    /// 1-based line (NDJSON) or array index + 1 (JSON array), when one record is at fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// The field at fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl IngestError {
    /// A request-level error.
    pub fn new(status: u16, error: impl Into<String>) -> IngestError {
        IngestError {
            status,
            error: error.into(),
            line: None,
            field: None,
        }
    }
}

/// Accepted content types, for error messages.
pub const ACCEPTED_TYPES: &str = "application/json, application/x-ndjson";

/// Picks the body kind from a `Content-Type` header value.
pub fn body_kind(content_type: Option<&str>) -> Result<BodyKind, IngestError> {
    let Some(ct) = content_type else {
        return Err(IngestError::new(
            415,
            format!("missing Content-Type (use {ACCEPTED_TYPES})"),
        ));
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Ok(BodyKind::Json),
        "application/x-ndjson"
        | "application/ndjson"
        | "application/jsonl"
        | "application/x-jsonlines" => Ok(BodyKind::Ndjson),
        _ => Err(IngestError::new(
            415,
            format!("unsupported Content-Type {ct:?} (use {ACCEPTED_TYPES})"),
        )),
    }
}

/// Parses and validates a whole body. Either every record is valid, or nothing is returned.
pub fn parse_body(
    body: &[u8],
    kind: BodyKind,
    limits: &IngestConfig,
) -> Result<Vec<Record>, IngestError> {
    if body.len() > limits.max_body_bytes {
        return Err(IngestError::new(
            413,
            format!(
                "body of {} bytes is over the limit of {} bytes",
                body.len(),
                limits.max_body_bytes
            ),
        ));
    }
    let records = match kind {
        BodyKind::Ndjson => parse_ndjson(body, limits)?,
        BodyKind::Json => parse_json(body, limits)?,
    };
    if records.is_empty() {
        return Err(IngestError::new(400, "the body holds no records"));
    }
    Ok(records)
}

fn too_many(limits: &IngestConfig) -> IngestError {
    IngestError::new(
        413,
        format!(
            "more than {} records in one request",
            limits.max_records_per_request
        ),
    )
}

fn record_error(line: usize, e: shared::record::RecordError) -> IngestError {
    IngestError {
        status: 400,
        error: format!("line {line}: {e}"),
        line: Some(line),
        field: Some(e.field),
    }
}

fn parse_ndjson(body: &[u8], limits: &IngestConfig) -> Result<Vec<Record>, IngestError> {
    let mut out = Vec::new();
    for (i, raw) in body.split(|b| *b == b'\n').enumerate() {
        let line_no = i + 1;
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.len() > limits.max_line_bytes {
            return Err(IngestError {
                status: 413,
                error: format!(
                    "line {line_no}: {} bytes is over the line limit of {} bytes",
                    line.len(),
                    limits.max_line_bytes
                ),
                line: Some(line_no),
                field: None,
            });
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if out.len() == limits.max_records_per_request {
            return Err(too_many(limits));
        }
        out.push(Record::from_json_slice(line).map_err(|e| record_error(line_no, e))?);
    }
    Ok(out)
}

fn parse_json(body: &[u8], limits: &IngestConfig) -> Result<Vec<Record>, IngestError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| IngestError {
        status: 400,
        error: format!(
            "malformed JSON at line {}, column {}: {e}",
            e.line(),
            e.column()
        ),
        line: Some(e.line()),
        field: Some("record".into()),
    })?;
    match value {
        serde_json::Value::Array(items) => {
            if items.len() > limits.max_records_per_request {
                return Err(too_many(limits));
            }
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| Record::from_json_value(v).map_err(|e| record_error(i + 1, e)))
                .collect()
        }
        v => Ok(vec![
            Record::from_json_value(v).map_err(|e| record_error(1, e))?
        ]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"machine":"m1","ts":1,"readings":{"vibration":1,"temperature":2,"current":3,"pressure":4}}"#;

    #[test]
    fn ndjson_errors_name_the_line_and_nothing_is_returned() {
        let body = format!(
            "{GOOD}\n{GOOD}\n{}\n",
            GOOD.replace("\"current\":3", "\"current\":\"x\"")
        );
        let e = parse_body(body.as_bytes(), BodyKind::Ndjson, &IngestConfig::default())
            .expect_err("bad line 3");
        assert_eq!(
            (e.status, e.line, e.field.as_deref()),
            (400, Some(3), Some("readings.current"))
        );
        let ok = parse_body(
            format!("{GOOD}\r\n\n{GOOD}\n").as_bytes(),
            BodyKind::Ndjson,
            &IngestConfig::default(),
        )
        .expect("ok");
        assert_eq!(ok.len(), 2);
    }

    #[test]
    fn limits_and_content_types() {
        let limits = IngestConfig {
            max_line_bytes: 256,
            max_body_bytes: 1024,
            max_records_per_request: 2,
        };
        let long = format!("{{\"machine\":\"{}\"}}", "a".repeat(300));
        assert_eq!(
            parse_body(long.as_bytes(), BodyKind::Ndjson, &limits)
                .expect_err("line")
                .status,
            413
        );
        let three = format!("{GOOD}\n{GOOD}\n{GOOD}");
        assert_eq!(
            parse_body(three.as_bytes(), BodyKind::Ndjson, &limits)
                .expect_err("count")
                .status,
            413
        );
        assert_eq!(
            parse_body(b"", BodyKind::Ndjson, &limits)
                .expect_err("empty")
                .status,
            400
        );
        assert_eq!(
            parse_body(
                format!("[{GOOD},{GOOD}]").as_bytes(),
                BodyKind::Json,
                &limits
            )
            .expect("array")
            .len(),
            2
        );
        assert_eq!(
            body_kind(Some("application/json; charset=utf-8")),
            Ok(BodyKind::Json)
        );
        assert_eq!(body_kind(Some("text/csv")).expect_err("415").status, 415);
        assert_eq!(body_kind(None).expect_err("415").status, 415);
    }
}
