//! Agent configuration: a TOML file, with command-line flags overriding it.
//!
//! Every field has a default, so an empty file (or none) is a working configuration.
//! The policy section can also be changed while the agent runs (`PUT /v1/policy`, or
//! `SIGHUP` to re-read the file).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::policy::PolicyConfig;

/// The whole configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory of the durable store.
    pub data_dir: PathBuf,
    /// HTTP listen address.
    pub listen: SocketAddr,
    /// Cloud core address (HOST:PORT) for the QUIC uplink; without it hard cases queue.
    pub cloud: Option<String>,
    /// Directory with this device's identity: `device.pem`, `device.key`, `ca.pem`
    /// (from `cloud-core device issue`). Required with `cloud`.
    pub identity: Option<PathBuf>,
    /// The name in the cloud's certificate [default: the host part of `cloud`].
    pub cloud_name: Option<String>,
    /// This gateway's device id (reported in status; the cloud will derive it from the
    /// device certificate).
    pub device_id: String,
    /// Student model (`.onnx`, with its `.json` metadata beside it); the embedded model
    /// when absent.
    pub model: Option<PathBuf>,
    /// Ingest limits.
    pub ingest: IngestConfig,
    /// Store, retention and disk cap.
    pub store: StoreConfig,
    /// Hard-case policy.
    pub policy: PolicyConfig,
    /// Serve from a store that lost acknowledged data (after damage) instead of refusing.
    #[serde(skip)]
    pub accept_data_loss: bool,
}

/// Ingest limits.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Longest NDJSON line (one record), bytes.
    pub max_line_bytes: usize,
    /// Most records in one request.
    pub max_records_per_request: usize,
}

/// Store, retention and disk cap.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// sled page cache, MiB (part of the agent's memory budget).
    pub cache_mib: u64,
    /// How long raw records of handled cases are kept, hours.
    pub record_retention_hours: f64,
    /// How long case summaries of handled cases are kept, hours.
    pub case_retention_hours: f64,
    /// Cap on the stored data, MiB (live keys and values; see README for sled's overhead).
    pub max_data_mib: f64,
    /// Seconds a device is told to wait when the store is full of undelivered hard cases.
    pub retry_after_secs: u64,
    /// How often retention and the cap are enforced, seconds.
    pub janitor_interval_secs: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("edge-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            cloud: None,
            identity: None,
            cloud_name: None,
            device_id: "edge-local".to_string(),
            model: None,
            ingest: IngestConfig::default(),
            store: StoreConfig::default(),
            policy: PolicyConfig::default(),
            accept_data_loss: false,
        }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_body_bytes: 8 << 20,
            max_line_bytes: 16 << 10,
            max_records_per_request: 10_000,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            cache_mib: 8,
            record_retention_hours: 24.0 * 7.0,
            case_retention_hours: 24.0 * 90.0,
            max_data_mib: 4096.0,
            retry_after_secs: 30,
            janitor_interval_secs: 1.0,
        }
    }
}

impl Config {
    /// Reads a TOML file; unknown keys are errors that name the key.
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        let cfg: Config =
            toml::from_str(&text).with_context(|| format!("config file {}", path.display()))?;
        cfg.validate()
            .with_context(|| format!("config file {}", path.display()))?;
        Ok(cfg)
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.cloud.is_some() {
            anyhow::ensure!(
                self.identity.is_some(),
                "cloud is set but identity is not: the link needs this device's certificate \
                 (--identity DIR with device.pem, device.key, ca.pem from `cloud-core device issue`)"
            );
        }
        anyhow::ensure!(
            self.ingest.max_line_bytes >= 256,
            "ingest.max_line_bytes must be at least 256"
        );
        anyhow::ensure!(
            self.ingest.max_body_bytes >= self.ingest.max_line_bytes,
            "ingest.max_body_bytes must be at least ingest.max_line_bytes"
        );
        anyhow::ensure!(
            self.ingest.max_records_per_request >= 1,
            "ingest.max_records_per_request must be at least 1"
        );
        anyhow::ensure!(
            self.store.cache_mib >= 1,
            "store.cache_mib must be at least 1"
        );
        anyhow::ensure!(
            self.store.max_data_mib > 0.0,
            "store.max_data_mib must be positive"
        );
        anyhow::ensure!(
            self.store.record_retention_hours > 0.0,
            "store.record_retention_hours must be positive"
        );
        anyhow::ensure!(
            self.store.case_retention_hours > 0.0,
            "store.case_retention_hours must be positive"
        );
        anyhow::ensure!(
            self.store.janitor_interval_secs > 0.0,
            "store.janitor_interval_secs must be positive"
        );
        anyhow::ensure!(
            !self.device_id.is_empty() && shared::schema::valid_machine(&self.device_id),
            "device_id must be 1–64 characters of A-Za-z0-9._-"
        );
        self.policy
            .validate()
            .map_err(|e| anyhow::anyhow!("policy: {e}"))?;
        Ok(())
    }

    /// The cap in bytes.
    pub fn max_data_bytes(&self) -> u64 {
        (self.store.max_data_mib * 1024.0 * 1024.0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default_and_unknown_keys_are_named() {
        let cfg: Config = toml::from_str("").expect("empty");
        cfg.validate().expect("defaults are valid");
        let e = toml::from_str::<Config>("[store]\nmax_data_mb = 3\n").expect_err("unknown");
        assert!(e.to_string().contains("max_data_mb"), "{e}");
        let cfg: Config = toml::from_str("[policy]\nmin_max_prob = 0.7\n").expect("partial");
        assert_eq!(cfg.policy.min_max_prob, 0.7);
    }
}
