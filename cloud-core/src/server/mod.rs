//! The cloud core's HTTP server: the OpenAI-compatible API ([`openai`]), verdicts,
//! engine status, Prometheus metrics and a health check.
//!
//! Every endpoint except `/healthz` and `/metrics` needs `Authorization: Bearer TOKEN`
//! with the operator token.

pub mod fleet_api;
pub mod openai;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::engine::service::Engine;
use crate::verdict::VerdictService;
use openai::ApiError;

/// What every handler sees.
#[derive(Clone)]
pub struct AppState {
    /// The served checkpoint.
    pub engine: Engine,
    /// Verdicts on hard cases.
    pub verdicts: Arc<VerdictService>,
    /// SHA-256 of the operator token.
    token_hash: [u8; 32],
    metrics: Option<PrometheusHandle>,
    /// The fleet (when the QUIC link is served).
    pub fleet: Option<Arc<crate::fleet::server::Fleet>>,
}

impl AppState {
    /// State for a server that accepts `token`; `metrics` renders `/metrics`.
    pub fn new(
        engine: Engine,
        verdicts: VerdictService,
        token: &str,
        metrics: Option<PrometheusHandle>,
    ) -> AppState {
        AppState {
            engine,
            verdicts: Arc::new(verdicts),
            token_hash: Sha256::digest(token.as_bytes()).into(),
            metrics,
            fleet: None,
        }
    }

    /// With the fleet served over QUIC: its devices and cases show in the API.
    pub fn with_fleet(mut self, fleet: Arc<crate::fleet::server::Fleet>) -> AppState {
        self.fleet = Some(fleet);
        self
    }
}

/// The router.
pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/api/v1/verdicts", post(crate::verdict::http::judge))
        .route("/api/v1/engine", get(engine_status))
        .route("/api/v1/fleet", get(fleet_api::status))
        .route("/api/v1/fleet/cases/{id}", get(fleet_case))
        .route("/api/v1/fleet/devices/{id}/state", get(fleet_api::state))
        .route("/api/v1/fleet/devices/{id}/target", put(fleet_api::target))
        .route(
            "/api/v1/fleet/devices/{id}/{kind}/{key}",
            put(fleet_api::put).delete(fleet_api::delete),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(protected)
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn auth(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        // Compare digests, so the comparison takes the same time whatever the token.
        Some(t) if <[u8; 32]>::from(Sha256::digest(t.trim().as_bytes())) == st.token_hash => {
            next.run(req).await
        }
        Some(_) => ApiError::status(StatusCode::UNAUTHORIZED, "the bearer token is not valid")
            .into_response(),
        None => ApiError::status(
            StatusCode::UNAUTHORIZED,
            "missing `Authorization: Bearer TOKEN` (the operator token)",
        )
        .into_response(),
    }
}

async fn models(State(st): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": st.engine.name(),
            "object": "model",
            "created": 0,
            "owned_by": "cloud-core",
            "max_model_len": st.engine.handle().context(),
        }],
    }))
}

async fn engine_status(State(st): State<AppState>) -> Json<serde_json::Value> {
    let h = st.engine.handle();
    let s = h.stats();
    let b = s.backend();
    let cfg = h.config();
    Json(json!({
        "model": st.engine.name(),
        "checkpoint": st.engine.dir().display().to_string(),
        "backend": b.description,
        "context": h.context(),
        "vocab": h.vocab(),
        "structured_output": st.engine.grammars().is_some(),
        "chat_template": st.engine.chat_template().is_some(),
        "running": s.running.load(Ordering::Relaxed),
        "waiting": s.waiting.load(Ordering::Relaxed),
        "max_batch": cfg.max_batch,
        "max_queue": cfg.max_queue,
        "prompt_tokens": s.prompt_tokens.load(Ordering::Relaxed),
        "generated_tokens": s.generated_tokens.load(Ordering::Relaxed),
        "completed_requests": s.completed.load(Ordering::Relaxed),
        "steps": s.steps.load(Ordering::Relaxed),
        "prefix_cache_hits": s.prefix_hits.load(Ordering::Relaxed),
        "prefix_tokens_reused": s.prefix_tokens_reused.load(Ordering::Relaxed),
        "graphs": b.graphs.map(|g| g
            .counts()
            .into_iter()
            .map(|(how, n)| (how.to_string(), json!(n)))
            .collect::<serde_json::Map<_, _>>()),
        "device_memory": b.device_memory.map(|m| json!({
            "free_bytes": m.free_bytes,
            "total_bytes": m.total_bytes,
        })),
        "kv_cache": b.kv_cache.map(|kv| json!({
            "held_bytes": kv.held_bytes,
            "allocated_bytes": kv.allocated_bytes,
            "allocations": kv.allocations,
            "limit_bytes": kv.limit_bytes,
        })),
        "verdicts": st.verdicts.count(),
    }))
}

async fn fleet_case(
    State(st): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let Some(fleet) = &st.fleet else {
        return ApiError::status(
            StatusCode::NOT_FOUND,
            "the QUIC link is not served (--listen-quic)",
        )
        .into_response();
    };
    let Some(case_id) = shared::case::CaseId::parse(&id) else {
        return ApiError::bad("id", "a case id is 32 hex digits").into_response();
    };
    let (case, verdict) = match (fleet.store.case(&case_id), fleet.store.verdict(&case_id)) {
        (Ok(c), Ok(v)) => (c, v),
        (Err(e), _) | (_, Err(e)) => {
            return ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
                .into_response()
        }
    };
    let Some(case) = case else {
        return ApiError::status(StatusCode::NOT_FOUND, format!("no case {id}")).into_response();
    };
    Json(json!({
        "device": case.device,
        "received_ms": case.received_ms,
        "case": case.case.to_json(),
        "verdict": verdict.map(|v| json!({
            "class": v.verdict.class, "confidence": v.verdict.confidence,
            "explanation": v.verdict.explanation, "action": v.verdict.action,
            "model": v.verdict.model, "at_ms": v.at_ms, "seconds": v.seconds,
        })),
    }))
    .into_response()
}

async fn metrics(State(st): State<AppState>) -> Response {
    match &st.metrics {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled").into_response(),
    }
}

/// Serves `state` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// Options of `cloud-core serve`.
pub struct ServeOptions {
    /// State directory (operator token; later the fleet store).
    pub data_dir: std::path::PathBuf,
    /// HTTP listen address.
    pub listen_http: SocketAddr,
    /// Checkpoint directory.
    pub model: std::path::PathBuf,
    /// Name the API reports for the model.
    pub model_name: String,
    /// Operator token; `None`: read or create `DATA_DIR/operator-token`.
    pub token: Option<String>,
    /// Scheduler limits.
    pub scheduler: crate::engine::scheduler::SchedulerConfig,
    /// The engine's backend.
    pub device: crate::engine::service::Device,
    /// QUIC listen address for edge agents, and the fleet CA directory.
    pub quic: Option<(SocketAddr, std::path::PathBuf)>,
    /// Steering of the edges' hard-case share.
    pub steer: crate::fleet::steer::SteerConfig,
}

/// Reads the operator token file, creating it (owner-only) with a random token the first
/// time.
pub fn operator_token(data_dir: &std::path::Path) -> anyhow::Result<(String, std::path::PathBuf)> {
    use anyhow::Context;
    let file = data_dir.join("operator-token");
    if file.exists() {
        let t = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let t = t.trim().to_string();
        anyhow::ensure!(
            t.len() >= 16,
            "{}: the token is shorter than 16 characters",
            file.display()
        );
        return Ok((t, file));
    }
    let token: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let tmp = data_dir.join("operator-token.tmp");
    {
        use std::io::Write;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        writeln!(f, "{token}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &file).with_context(|| format!("creating {}", file.display()))?;
    Ok((token, file))
}

/// `cloud-core serve`: loads the model, starts the engine and the HTTP server, and runs
/// until `shutdown` resolves.
pub async fn run(
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(&opts.data_dir)
        .with_context(|| format!("creating {}", opts.data_dir.display()))?;
    let (token, token_file) = match opts.token {
        Some(t) => {
            anyhow::ensure!(
                t.len() >= 16,
                "the operator token must have at least 16 characters"
            );
            (t, None)
        }
        None => {
            let (t, f) = operator_token(&opts.data_dir)?;
            (t, Some(f))
        }
    };
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .ok();
    let started = std::time::Instant::now();
    let model = opts.model.clone();
    let name = opts.model_name.clone();
    let sched = opts.scheduler;
    let device = opts.device;
    let engine = tokio::task::spawn_blocking(move || Engine::load(&model, &name, sched, device))
        .await
        .context("loading the model")??;
    tracing::info!(
        model = %opts.model.display(),
        seconds = started.elapsed().as_secs_f64(),
        "model loaded"
    );
    let verdicts = VerdictService::new(engine.clone())?;
    let listener = tokio::net::TcpListener::bind(opts.listen_http)
        .await
        .with_context(|| format!("binding {}", opts.listen_http))?;
    let addr = listener.local_addr()?;
    println!(
        "cloud-core listening on http://{addr} (model {})",
        engine.name()
    );
    if let Some(f) = token_file {
        println!("operator token in {}", f.display());
    }
    {
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    let mut state = AppState::new(engine, verdicts, &token, metrics);
    if let Some((addr, ca_dir)) = &opts.quic {
        let (tls, revoked) = crate::fleet::server::tls_from_ca(ca_dir)?;
        let store = crate::fleet::store::FleetStore::open(&opts.data_dir.join("fleet"))?;
        let fleet = crate::fleet::server::Fleet::new(
            store,
            state.verdicts.clone(),
            opts.scheduler.max_batch,
        );
        fleet.set_revoked(revoked);
        let endpoint = quinn::Endpoint::server(tls, *addr)
            .with_context(|| format!("binding QUIC on {addr}"))?;
        println!("cloud-core QUIC link on {}", endpoint.local_addr()?);
        tokio::spawn(crate::fleet::server::serve(
            endpoint,
            fleet.clone(),
            opts.steer,
            Some(ca_dir.clone()),
        ));
        state = state.with_fleet(fleet);
    }
    serve(listener, state, shutdown).await?;
    Ok(())
}
