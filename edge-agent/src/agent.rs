//! Starting and stopping an agent: store, student, committer, HTTP server.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::Context;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::api::{self, App};
use crate::config::Config;
use crate::infer::Student;
use crate::pipeline::Pipeline;
use crate::policy::PolicyConfig;

/// The process-wide metrics recorder (one per process, shared by agents in tests).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1,
                    0.5, 1.0,
                ])
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed");
            }
            handle
        })
        .clone()
}

/// A running agent.
pub struct RunningAgent {
    /// Where the HTTP API listens.
    pub addr: SocketAddr,
    /// Shared state (status, counts).
    pub app: Arc<App>,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
    committer: JoinHandle<()>,
    uplink: Option<JoinHandle<()>>,
    reporter: JoinHandle<()>,
}

impl RunningAgent {
    /// Changes the local policy at run time (as `PUT /v1/policy` does); desired config
    /// from the cloud still applies over it.
    pub async fn set_policy(&self, cfg: PolicyConfig) -> anyhow::Result<()> {
        self.app
            .sync
            .set_local_policy(cfg)
            .await
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!(e))
    }

    /// Stops accepting requests, lets those in flight finish, flushes and returns.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.server.await.context("HTTP server task")?;
        if let Some(u) = self.uplink {
            u.await.context("uplink task")?;
        }
        self.reporter.await.context("sync reporter task")?;
        let RunningAgent { app, committer, .. } = self;
        // The committer ends when the last sender (held by the app) is gone.
        drop(app);
        committer.await.context("committer task")?;
        Ok(())
    }
}

/// Opens the store, loads the student and starts serving.
pub async fn start(cfg: Config) -> anyhow::Result<RunningAgent> {
    cfg.validate()?;
    let student = Arc::new(match &cfg.model {
        Some(path) => Student::from_file(path)?,
        None => Student::embedded()?,
    });
    let db = crate::store::open(&cfg.data_dir, cfg.store.cache_mib * 1024 * 1024)?;
    let (pipeline, shared) = Pipeline::new(
        cfg.data_dir.clone(),
        cfg.accept_data_loss,
        db.clone(),
        student.clone(),
        cfg.policy.clone(),
        cfg.store.clone(),
        cfg.max_data_bytes(),
    )
    .with_context(|| format!("recovering the store in {}", cfg.data_dir.display()))?;
    let (tx, rx) = mpsc::channel(4096);
    let committer = tokio::spawn(pipeline.run(rx));
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let link: crate::uplink::LinkStatus = Default::default();
    let (stop, mut stopped) = watch::channel(false);
    // The sync node is the certified device id when there is an identity.
    let device = match &cfg.identity {
        Some(identity) => crate::uplink::client(identity)?.1,
        None => cfg.device_id.clone(),
    };
    let sync = crate::sync::EdgeSync::open(&db, &device, cfg.policy.clone(), tx.clone())?;
    // Desired config stored from earlier connections applies from the start (an invalid
    // one is logged and shown in the status).
    let _ = sync.apply().await;
    let reporter = tokio::spawn(sync.clone().report(
        shared.clone(),
        student.sha256().to_string(),
        stop.subscribe(),
    ));
    let uplink = match (&cfg.cloud, &cfg.identity) {
        (Some(cloud), Some(identity)) => {
            let server_name = cfg.cloud_name.clone().unwrap_or_else(|| {
                cloud
                    .rsplit_once(':')
                    .map_or(cloud.as_str(), |(h, _)| h)
                    .trim_matches(|c| c == '[' || c == ']')
                    .to_string()
            });
            let ucfg = crate::uplink::UplinkConfig {
                cloud: cloud.clone(),
                server_name,
                identity: identity.clone(),
            };
            Some(tokio::spawn(crate::uplink::run(
                ucfg,
                crate::uplink::Agent {
                    db: db.clone(),
                    tx: tx.clone(),
                    status: link.clone(),
                    sync: sync.clone(),
                    shared: shared.clone(),
                    model_sha256: student.sha256().to_string(),
                },
                stop.subscribe(),
            )))
        }
        _ => None,
    };
    let app = Arc::new(App {
        db,
        tx,
        shared,
        cfg,
        student,
        metrics: metrics_handle(),
        started: Instant::now(),
        link,
        sync,
    });
    let router = api::router(app.clone());
    let server = tokio::spawn(async move {
        let result = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!("HTTP server: {e}");
        }
    });
    tracing::info!(%addr, "edge agent listening");
    Ok(RunningAgent {
        addr,
        app,
        stop,
        server,
        committer,
        uplink,
        reporter,
    })
}
