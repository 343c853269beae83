//! The local HTTP API: ingest, status, cases, policy, metrics.
//!
//! Handlers validate everything before they hand work to the committer, and they answer
//! an ingest request only with what the committer replied after its flush. They never
//! panic on input: every problem is a 4xx with a JSON body naming it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use shared::case::{CaseId, Decision};
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::infer::Student;
use crate::ingest::{body_kind, parse_body, IngestError};
use crate::pipeline::{Command, Shared};
use crate::policy::PolicyConfig;
use crate::store::{self, CaseQuery};

/// What every handler can reach.
pub struct App {
    /// The store (read side; the committer is the only writer).
    pub db: sled::Db,
    /// The committer's queue.
    pub tx: mpsc::Sender<Command>,
    /// Counts and flags shared with the committer.
    pub shared: Arc<Shared>,
    /// The configuration the agent started with.
    pub cfg: Config,
    /// The student model.
    pub student: Arc<Student>,
    /// Prometheus rendering.
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Start time.
    pub started: Instant,
    /// The uplink's state.
    pub link: crate::uplink::LinkStatus,
    /// The state shared with the cloud.
    pub sync: std::sync::Arc<crate::sync::EdgeSync>,
}

/// The router.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/logs", post(post_logs))
        .route("/v1/status", get(status))
        .route("/v1/cases", get(list_cases))
        .route("/v1/cases/{id}", get(get_case))
        .route("/v1/policy", get(get_policy).put(put_policy))
        .route("/v1/sync", get(get_sync))
        .route(
            "/v1/labels/{key}",
            axum::routing::put(put_label).delete(delete_label),
        )
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(app)
}

fn error_response(e: IngestError, retry_after: Option<u64>) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    metrics::counter!("edge_requests_rejected_total", "status" => e.status.to_string())
        .increment(1);
    let mut resp = (status, Json(e)).into_response();
    if let Some(s) = retry_after {
        if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    resp
}

async fn post_logs(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    let retry = app.cfg.store.retry_after_secs;
    let limits = &app.cfg.ingest;
    let kind = match body_kind(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    ) {
        Ok(k) => k,
        Err(e) => return error_response(e, None),
    };
    if app.shared.full.load(Ordering::Relaxed) {
        return error_response(
            IngestError::new(
                503,
                "the store is full of hard cases not yet delivered to the cloud; retry later",
            ),
            Some(retry),
        );
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes as u64) {
        return error_response(
            IngestError::new(
                413,
                format!(
                    "body of {} bytes is over the limit of {} bytes",
                    declared.unwrap_or(0),
                    limits.max_body_bytes
                ),
            ),
            None,
        );
    }
    let bytes = match axum::body::to_bytes(body, limits.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => {
            let msg = format!("{e}");
            let over = std::error::Error::source(&e)
                .is_some_and(|s| s.to_string().contains("length limit"))
                || msg.contains("length limit");
            return if over {
                error_response(
                    IngestError::new(
                        413,
                        format!("body is over the limit of {} bytes", limits.max_body_bytes),
                    ),
                    None,
                )
            } else {
                error_response(
                    IngestError::new(400, format!("could not read the body: {msg}")),
                    None,
                )
            };
        }
    };
    let parsed = if bytes.len() > 64 << 10 {
        let limits = limits.clone();
        let b = bytes.clone();
        match tokio::task::spawn_blocking(move || parse_body(&b, kind, &limits)).await {
            Ok(r) => r,
            Err(_) => Err(IngestError::new(500, "parser task failed")),
        }
    } else {
        parse_body(&bytes, kind, limits)
    };
    let records = match parsed {
        Ok(r) => r,
        Err(e) => return error_response(e, None),
    };
    let est_bytes = bytes.len() as u64 + 64 * records.len() as u64;
    let (reply, rx) = oneshot::channel();
    if app
        .tx
        .send(Command::Ingest {
            records,
            est_bytes,
            reply,
        })
        .await
        .is_err()
    {
        return error_response(
            IngestError::new(503, "the agent is shutting down"),
            Some(retry),
        );
    }
    match rx.await {
        Ok(Ok(outcome)) => (StatusCode::ACCEPTED, Json(outcome)).into_response(),
        Ok(Err(e)) => {
            let retry_after = (e.status == 503).then_some(retry);
            error_response(e, retry_after)
        }
        Err(_) => error_response(
            IngestError::new(503, "the agent is shutting down"),
            Some(retry),
        ),
    }
}

/// The status document (also printed by `demo`).
pub fn status_json(app: &App) -> serde_json::Value {
    let counts = app
        .shared
        .counts
        .lock()
        .map(|c| c.clone())
        .unwrap_or_default();
    let totals = app
        .shared
        .totals
        .lock()
        .map(|t| t.clone())
        .unwrap_or_default();
    let policy = app
        .shared
        .policy
        .read()
        .map(|p| p.clone())
        .unwrap_or_default();
    let failed = app.shared.failed.lock().ok().and_then(|f| f.clone());
    let decided = totals.cases_local + totals.cases_hard;
    let disk = app.db.size_on_disk().unwrap_or(0);
    serde_json::json!({
        "agent": {
            "version": env!("CARGO_PKG_VERSION"),
            "device_id": app.cfg.device_id,
            "uptime_s": app.started.elapsed().as_secs_f64(),
            "data_dir": app.cfg.data_dir,
        },
        "cloud": match &app.cfg.cloud {
            None => serde_json::json!({"link": "offline", "note": "no cloud configured: hard cases wait in the outbox"}),
            Some(_) => {
                let l = app.link.lock().map(|l| l.clone()).unwrap_or_default();
                let mut v = serde_json::to_value(&l).unwrap_or_default();
                v["link"] = serde_json::json!(l.state);
                v
            }
        },
        "model": {
            "source": app.student.source(),
            "sha256": app.student.sha256(),
            "classes": app.student.meta().classes,
            "trained": app.student.meta().trained,
        },
        "store": {
            "records": counts.records,
            "open_window_records": counts.pending_records,
            "cases": counts.cases,
            "cases_local": counts.cases_local,
            "cases_hard": counts.cases_hard,
            "outbox": counts.outbox,
            "outbox_audit": counts.outbox_audit,
            "live_bytes": counts.live_bytes,
            "disk_bytes": disk,
            "cap_bytes": app.cfg.max_data_bytes(),
            "full": app.shared.full.load(Ordering::Relaxed),
            "failed": failed,
        },
        "since_start": totals,
        "hard_share": if decided > 0 { totals.cases_hard as f64 / decided as f64 } else { 0.0 },
        "policy": policy,
        "sync": app.sync.status_json(),
    })
}

async fn status(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    Json(status_json(&app))
}

#[derive(Deserialize)]
struct CasesParams {
    machine: Option<String>,
    decision: Option<String>,
    before: Option<u64>,
    limit: Option<usize>,
}

fn bad_request(msg: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({"error": msg.into()})),
    )
        .into_response()
}

async fn list_cases(State(app): State<Arc<App>>, Query(p): Query<CasesParams>) -> Response {
    let decision = match p.decision.as_deref() {
        None => None,
        Some("local") => Some(Decision::Local),
        Some("hard") => Some(Decision::Hard),
        Some(other) => {
            return bad_request(format!("decision must be local or hard (got {other:?})"))
        }
    };
    let limit = p.limit.unwrap_or(50);
    if limit == 0 || limit > 1000 {
        return bad_request("limit must be within 1–1000");
    }
    let q = CaseQuery {
        machine: p.machine,
        decision,
        before: p.before,
        limit,
    };
    let db = app.db.clone();
    match tokio::task::spawn_blocking(move || store::list_cases(&db, &q)).await {
        Ok(Ok((cases, next))) => Json(serde_json::json!({
            "cases": cases.iter().map(|c| c.to_json()).collect::<Vec<_>>(),
            "next_before": next,
        }))
        .into_response(),
        Ok(Err(e)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({"error": format!("{e:#}")})),
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "listing failed").into_response(),
    }
}

async fn get_case(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    let Some(id) = CaseId::parse(&id) else {
        return bad_request("a case id is 32 hexadecimal digits");
    };
    match store::get_case(&app.db, &id) {
        Ok(Some(c)) => {
            let mut v = c.to_json();
            let records: Vec<serde_json::Value> =
                c.records.iter().map(|r| r.record.to_json()).collect();
            v["records"] = serde_json::Value::Array(records);
            if let Ok(Some(verdict)) = store::get_verdict(&app.db, &id) {
                v["verdict"] = verdict;
            }
            Json(v).into_response()
        }
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": format!("no case {id}")})),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({"error": format!("{e:#}")})),
        )
            .into_response(),
    }
}

async fn get_policy(State(app): State<Arc<App>>) -> Json<PolicyConfig> {
    Json(
        app.shared
            .policy
            .read()
            .map(|p| p.clone())
            .unwrap_or_default(),
    )
}

async fn put_policy(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    // Fields not given keep their current (local) value; desired config from the cloud
    // still applies over the result.
    let current = app.sync.local_policy();
    let mut merged = match serde_json::to_value(&current) {
        Ok(v) => v,
        Err(e) => return bad_request(e.to_string()),
    };
    let patch: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(serde_json::Value::Object(o)) => serde_json::Value::Object(o),
        Ok(_) => return bad_request("expected a JSON object of policy fields"),
        Err(e) => return bad_request(format!("malformed JSON: {e}")),
    };
    if let (Some(m), Some(p)) = (merged.as_object_mut(), patch.as_object()) {
        for (k, v) in p {
            m.insert(k.clone(), v.clone());
        }
    }
    let cfg: PolicyConfig = match serde_json::from_value(merged) {
        Ok(c) => c,
        Err(e) => return bad_request(format!("policy: {e}")),
    };
    if let Err(e) = cfg.validate() {
        return bad_request(format!("policy: {e}"));
    }
    match app.sync.set_local_policy(cfg.clone()).await {
        Ok(effective) => {
            tracing::info!(?cfg, "local policy changed at run time");
            Json(effective).into_response()
        }
        Err(e) => (
            StatusCode::CONFLICT,
            Json(serde_json::json!({"error": format!("the local policy is stored, but {e}")})),
        )
            .into_response(),
    }
}

async fn get_sync(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    Json(app.sync.entries_json())
}

async fn put_label(
    State(app): State<Arc<App>>,
    Path(key): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if let Err(e) = serde_json::from_slice::<serde_json::Value>(&body) {
        return bad_request(format!("the label must be JSON: {e}"));
    }
    label(&app, &key, Some(body.to_vec()))
}

async fn delete_label(State(app): State<Arc<App>>, Path(key): Path<String>) -> Response {
    label(&app, &key, None)
}

fn label(app: &App, key: &str, value: Option<Vec<u8>>) -> Response {
    let deleted = value.is_none();
    match app.sync.write(shared::sync::Scope::Labels, key, value) {
        Ok(ts) => {
            Json(serde_json::json!({"key": key, "deleted": deleted, "written_ms": ts.wall_ms}))
                .into_response()
        }
        Err(e) => match e.downcast_ref::<shared::sync::SyncError>() {
            Some(se) => bad_request(format!("label {key:?}: {se}")),
            None => (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(serde_json::json!({"error": format!("{e:#}")})),
            )
                .into_response(),
        },
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}
