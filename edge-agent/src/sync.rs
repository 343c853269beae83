//! The state this agent shares with the cloud: its sync replica (`shared::replica`),
//! stored in the agent's sled database (tree `sync`, flushed before any acknowledgement
//! leaves), and what the agent does with it.
//!
//! - **Desired config** (written by operators and the cloud's steering, applied here at run
//!   time): the policy in force is the local policy (config file, `PUT /v1/policy`,
//!   `SIGHUP`) with the fields of desired config `policy` (the operator's) laid over it,
//!   then those of `steering` (the cloud's hard-case share controller, under its `policy`
//!   key). The cloud owns this scope: its values win over the local file for the fields
//!   they name. A desired config that does not make a valid policy is not applied; the
//!   error shows in `/v1/status` (`sync.desired_error`) and the last valid policy stays.
//! - **Reported state** (written here): `stats`, the agent's cumulative decision counts
//!   (what the steering controller reads), and `agent`, its version and model.
//! - **Labels** (either side; the later write wins): `PUT /v1/labels/{key}` here.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use shared::hlc::Timestamp;
use shared::replica::{node_id, Replica, SyncStep};
use shared::sync::{Role, Scope};
use tokio::sync::{mpsc, oneshot, watch};

use crate::pipeline::{now_ms, Command, Shared};
use crate::policy::PolicyConfig;

const KEY: &str = "replica";

/// The agent's shared state with the cloud.
pub struct EdgeSync {
    tree: sled::Tree,
    db: sled::Db,
    replica: Mutex<Replica>,
    local_policy: Mutex<PolicyConfig>,
    desired_error: Mutex<Option<String>>,
    tx: mpsc::Sender<Command>,
}

fn ms() -> u64 {
    now_ms().max(0) as u64
}

impl EdgeSync {
    /// Opens (or creates) the replica of `device` in `db`.
    pub fn open(
        db: &sled::Db,
        device: &str,
        local_policy: PolicyConfig,
        tx: mpsc::Sender<Command>,
    ) -> anyhow::Result<Arc<EdgeSync>> {
        let tree = db.open_tree("sync").context("opening the sync tree")?;
        let node = node_id(Role::Edge, device);
        let replica = match tree.get(KEY)? {
            Some(b) => Replica::from_bytes(&b, node)
                .map_err(|e| anyhow::anyhow!("the stored sync state is unreadable: {e}"))?,
            None => Replica::new(Role::Edge, node, node_id(Role::Cloud, "cloud")),
        };
        Ok(Arc::new(EdgeSync {
            tree,
            db: db.clone(),
            replica: Mutex::new(replica),
            local_policy: Mutex::new(local_policy),
            desired_error: Mutex::new(None),
            tx,
        }))
    }

    /// Runs `f` on the replica; stores it durably before returning when `f` says it
    /// changed.
    pub fn with<R>(
        &self,
        f: impl FnOnce(&mut Replica) -> anyhow::Result<(R, bool)>,
    ) -> anyhow::Result<R> {
        let mut r = self
            .replica
            .lock()
            .map_err(|_| anyhow::anyhow!("the sync replica is poisoned"))?;
        let (out, dirty) = f(&mut r)?;
        if dirty {
            self.tree.insert(KEY, r.to_bytes()?)?;
            self.db.flush().context("flushing the sync state")?;
        }
        Ok(out)
    }

    /// A local write (a delete when `value` is `None`).
    pub fn write(
        &self,
        scope: Scope,
        key: &str,
        value: Option<Vec<u8>>,
    ) -> anyhow::Result<Timestamp> {
        let now = ms();
        self.with(|r| Ok((r.write(scope, key, value, now)?, true)))
    }

    /// Handles a message of the sync stream; applies desired config when it changed.
    pub async fn handle(&self, msg: shared::frame::Message) -> anyhow::Result<SyncStep> {
        let now = ms();
        let step = self.with(|r| {
            let st = r.handle(msg, now)?;
            let dirty = st.dirty;
            Ok((st, dirty))
        })?;
        for r in &step.rejected {
            tracing::warn!(scope = %r.scope, key = %r.key, "sync entry refused: {}", r.reason);
        }
        if step.changed.iter().any(|k| k.scope == Scope::DesiredConfig) {
            // An invalid desired config is logged and shown in the status by `apply`.
            let _ = self.apply().await;
        }
        Ok(step)
    }

    /// The policy in force: local, then desired `policy`, then `steering.policy`.
    pub fn effective_policy(&self) -> Result<PolicyConfig, String> {
        let local = self
            .local_policy
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default();
        let (operator, steering) = self
            .with(|r| {
                let get = |k: &str| {
                    r.get(Scope::DesiredConfig, k)
                        .map(serde_json::from_slice::<serde_json::Value>)
                };
                Ok(((get("policy"), get("steering")), false))
            })
            .map_err(|e| e.to_string())?;
        let mut merged = serde_json::to_value(&local).map_err(|e| e.to_string())?;
        let mut overlay = |name: &str, v: Option<serde_json::Value>| -> Result<(), String> {
            let Some(v) = v else { return Ok(()) };
            let serde_json::Value::Object(o) = v else {
                return Err(format!("desired config `{name}` is not a JSON object"));
            };
            if let Some(m) = merged.as_object_mut() {
                for (k, v) in o {
                    m.insert(k, v);
                }
            }
            Ok(())
        };
        let parse = |name: &str, v: Option<Result<serde_json::Value, serde_json::Error>>| {
            v.transpose()
                .map_err(|e| format!("desired config `{name}` is not JSON: {e}"))
        };
        overlay("policy", parse("policy", operator)?)?;
        let steering = parse("steering", steering)?.and_then(|s| s.get("policy").cloned());
        overlay("steering", steering)?;
        let cfg: PolicyConfig =
            serde_json::from_value(merged).map_err(|e| format!("desired config: {e}"))?;
        cfg.validate().map_err(|e| format!("desired config: {e}"))?;
        Ok(cfg)
    }

    /// Puts the effective policy in force and returns it, or records (and returns) why it
    /// cannot be; the policy in force then stays.
    pub async fn apply(&self) -> Result<PolicyConfig, String> {
        let result = self.effective_policy();
        if let Ok(mut d) = self.desired_error.lock() {
            *d = result.as_ref().err().cloned();
        }
        match &result {
            Ok(cfg) => {
                let (reply, done) = oneshot::channel();
                if self
                    .tx
                    .send(Command::SetPolicy(cfg.clone(), reply))
                    .await
                    .is_ok()
                    && done.await.is_ok()
                {
                    tracing::info!(?cfg, "policy in force (local + desired config)");
                }
            }
            Err(e) => tracing::error!("keeping the current policy: {e}"),
        }
        result
    }

    /// Replaces the local policy and puts the effective one in force; returns it.
    pub async fn set_local_policy(&self, cfg: PolicyConfig) -> Result<PolicyConfig, String> {
        if let Ok(mut p) = self.local_policy.lock() {
            *p = cfg;
        }
        self.apply().await
    }

    /// The local policy (before desired config).
    pub fn local_policy(&self) -> PolicyConfig {
        self.local_policy
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default()
    }

    /// For `/v1/status`.
    pub fn status_json(&self) -> serde_json::Value {
        let desired_error = self.desired_error.lock().ok().and_then(|e| e.clone());
        self.with(|r| {
            let desired: serde_json::Map<String, serde_json::Value> = r
                .map()
                .values(Scope::DesiredConfig)
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        serde_json::from_slice(v).unwrap_or(serde_json::Value::Null),
                    )
                })
                .collect();
            Ok((
                json!({
                    "entries": r.map().len(),
                    "pending": r.pending(),
                    "received": r.received(),
                    "desired": desired,
                    "desired_error": desired_error,
                }),
                false,
            ))
        })
        .unwrap_or_else(|e| json!({"error": e.to_string()}))
    }

    /// Every entry, by scope, for `GET /v1/sync`.
    pub fn entries_json(&self) -> serde_json::Value {
        self.with(|r| Ok((r.describe(), false)))
            .unwrap_or_else(|e| json!({"error": e.to_string()}))
    }

    /// Reports the agent's decision counts under reported state `stats` every two seconds
    /// while they change, until `stop`.
    pub async fn report(
        self: Arc<Self>,
        shared: Arc<Shared>,
        model_sha256: String,
        mut stop: watch::Receiver<bool>,
    ) {
        let started_ms = ms();
        let agent = json!({
            "version": env!("CARGO_PKG_VERSION"),
            "model_sha256": model_sha256,
            "started_ms": started_ms,
        });
        if let Err(e) = self.write(
            Scope::ReportedState,
            "agent",
            Some(agent.to_string().into_bytes()),
        ) {
            tracing::warn!("reporting the agent's state: {e:#}");
        }
        let mut last = serde_json::Value::Null;
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let t = shared.totals.lock().map(|t| t.clone()).unwrap_or_default();
            let stats = json!({
                "started_ms": started_ms,
                "cases_local": t.cases_local,
                "cases_hard": t.cases_hard,
                "over_budget": t.cases_over_budget,
            });
            if stats != last {
                match self.write(
                    Scope::ReportedState,
                    "stats",
                    Some(stats.to_string().into_bytes()),
                ) {
                    Ok(_) => last = stats,
                    Err(e) => tracing::warn!("reporting stats: {e:#}"),
                }
            }
        }
    }
}
