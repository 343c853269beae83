//! The operator's view of the fleet: devices (registry, link, sync, steering), cases with
//! their verdicts, and writes to a device's shared state — desired config, labels — and
//! its hard-case target. Writes go into the device's sync replica and reach the device
//! when it is connected, or when it next connects.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use shared::sync::Scope;

use super::openai::ApiError;
use super::AppState;
use crate::fleet::ca::valid_device_id;
use crate::fleet::server::{now_ms, Fleet};

fn fleet(st: &AppState) -> Result<&Arc<Fleet>, ApiError> {
    st.fleet.as_ref().ok_or_else(|| {
        ApiError::status(
            StatusCode::NOT_FOUND,
            "the QUIC link is not served (--listen-quic)",
        )
    })
}

fn internal(e: impl std::fmt::Display) -> Response {
    ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
}

fn device_id(id: &str) -> Result<(), ApiError> {
    if valid_device_id(id) {
        Ok(())
    } else {
        Err(ApiError::bad(
            "device",
            format!("{id:?} is not a device id (letters, digits, '-', '_', '.'; 1–64 characters)"),
        ))
    }
}

/// `GET /api/v1/fleet`: devices, link, sync and steering, queue and counts.
pub async fn status(State(st): State<AppState>) -> Response {
    let fleet = match fleet(&st) {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    let connected = fleet.connected().await;
    let steering = fleet.steering.devices();
    let devices = match fleet.store.devices() {
        Ok(d) => d,
        Err(e) => return internal(e),
    };
    let devices: Vec<serde_json::Value> = devices
        .into_iter()
        .map(|d| {
            let mut v = serde_json::to_value(&d).unwrap_or_default();
            v["connected"] = json!(connected.contains(&d.id));
            v["steering"] = json!(steering.get(&d.id));
            v["sync"] = fleet
                .with_replica(&d.id, |r| {
                    Ok((
                        json!({
                            "entries": r.map().len(),
                            "pending": r.pending(),
                            "received": r.received(),
                        }),
                        false,
                    ))
                })
                .unwrap_or_else(|e| json!({"error": e.to_string()}));
            v
        })
        .collect();
    Json(json!({
        "devices": devices,
        "connected": connected.len(),
        "verdict_queue": fleet.store.queue_len(),
        "verdicts": fleet.store.verdict_count(),
        "engine_runs": fleet.engine_runs.load(Ordering::Relaxed),
        "verdicts_at_start": fleet.verdicts_at_start,
        "steering_pressure": fleet.steering.pressure(),
    }))
    .into_response()
}

/// `GET /api/v1/fleet/devices/{id}/state`: the device's shared state, every scope.
pub async fn state(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    let fleet = match fleet(&st) {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = device_id(&id) {
        return e.into_response();
    }
    let out = fleet.with_replica(&id, |r| {
        let mut v = r.describe();
        v["device"] = json!(id);
        Ok((v, false))
    });
    match out {
        Ok(v) => Json(v).into_response(),
        Err(e) => internal(e),
    }
}

fn scope_of(kind: &str) -> Result<Scope, ApiError> {
    match kind {
        "config" => Ok(Scope::DesiredConfig),
        "labels" => Ok(Scope::Labels),
        "assignments" => Ok(Scope::ModelAssignments),
        other => Err(ApiError::status(
            StatusCode::NOT_FOUND,
            format!("no writable scope {other:?} (config, labels, assignments)"),
        )),
    }
}

/// `PUT /api/v1/fleet/devices/{id}/{config|labels|assignments}/{key}` with a JSON body;
/// `DELETE` to remove.
pub async fn put(
    State(st): State<AppState>,
    Path((id, kind, key)): Path<(String, String, String)>,
    body: axum::body::Bytes,
) -> Response {
    write(st, id, kind, key, Some(body)).await
}

/// `DELETE /api/v1/fleet/devices/{id}/{config|labels|assignments}/{key}`.
pub async fn delete(
    State(st): State<AppState>,
    Path((id, kind, key)): Path<(String, String, String)>,
) -> Response {
    write(st, id, kind, key, None).await
}

async fn write(
    st: AppState,
    id: String,
    kind: String,
    key: String,
    body: Option<axum::body::Bytes>,
) -> Response {
    let fleet = match fleet(&st) {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = device_id(&id) {
        return e.into_response();
    }
    let scope = match scope_of(&kind) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    if scope == Scope::DesiredConfig && key == crate::fleet::steer::KEY {
        return ApiError::bad(
            "key",
            "desired config `steering` is written by the steering controller; set a target \
             with PUT /api/v1/fleet/devices/ID/target",
        )
        .into_response();
    }
    let value = match body {
        Some(b) => {
            if let Err(e) = serde_json::from_slice::<serde_json::Value>(&b) {
                return ApiError::bad("body", format!("the value must be JSON: {e}"))
                    .into_response();
            }
            Some(b.to_vec())
        }
        None => None,
    };
    let deleted = value.is_none();
    let now = now_ms();
    match fleet.with_replica(&id, |r| {
        let ts = r.write(scope, &key, value, now)?;
        Ok((ts, true))
    }) {
        Ok(ts) => Json(json!({
            "device": id,
            "scope": scope.name(),
            "key": key,
            "deleted": deleted,
            "written_ms": ts.wall_ms,
        }))
        .into_response(),
        Err(e) => match e.downcast_ref::<shared::sync::SyncError>() {
            Some(se) => ApiError::bad("key", se.to_string()).into_response(),
            None => internal(e),
        },
    }
}

/// `PUT /api/v1/fleet/devices/{id}/target` with `{"share": 0.1}` (or `null`: the fleet
/// default).
pub async fn target(
    State(st): State<AppState>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let fleet = match fleet(&st) {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = device_id(&id) {
        return e.into_response();
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        share: Option<f64>,
    }
    let b: Body = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return ApiError::bad("body", format!("expected {{\"share\": 0–1 or null}}: {e}"))
                .into_response()
        }
    };
    if let Some(s) = b.share {
        if !(0.0..=1.0).contains(&s) {
            return ApiError::bad("share", format!("a share is within 0–1 (got {s})"))
                .into_response();
        }
    }
    match fleet.store.update_device(&id, |d| d.target_share = b.share) {
        Ok(d) => Json(json!({"device": d.id, "target_share": d.target_share})).into_response(),
        Err(e) => internal(e),
    }
}
