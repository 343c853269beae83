//! `POST /api/v1/verdicts`: a hard case (its JSON form, see
//! [`shared::case::HardCase::to_json`]) in, a verdict out.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use shared::case::HardCase;

use super::VerdictError;
use crate::engine::scheduler::SubmitError;
use crate::server::openai::ApiError;
use crate::server::AppState;

/// Judges the posted case.
pub async fn judge(State(st): State<AppState>, body: axum::body::Bytes) -> Response {
    let value: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return ApiError::bad("case", format!("malformed JSON: {e}")).into_response(),
    };
    let case = match HardCase::from_json(&value) {
        Ok(c) => c,
        Err(e) => return ApiError::bad("case", e.to_string()).into_response(),
    };
    match st.verdicts.judge(&case).await {
        Ok(j) => Json(json!({
            "case_id": case.id.to_string(),
            "verdict": j.verdict,
            "model": j.model,
            "prompt_tokens": j.prompt_tokens,
            "completion_tokens": j.completion_tokens,
            "seconds": j.seconds,
        }))
        .into_response(),
        Err(VerdictError::Submit(e @ SubmitError::Busy(_))) => ApiError::from(e).into_response(),
        Err(VerdictError::Refused(m)) => {
            ApiError::status(StatusCode::SERVICE_UNAVAILABLE, m).into_response()
        }
        Err(VerdictError::Submit(SubmitError::Invalid(m))) => {
            ApiError::bad("case", m).into_response()
        }
        Err(e) => {
            ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        }
    }
}
