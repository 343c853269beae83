//! The cloud's durable fleet store (sled): cases from the edges, deduplicated by case id;
//! the verdict queue in front of the engine; verdicts; the verdicts each device has not
//! yet acknowledged; and the device registry.
//!
//! A case is acknowledged to its edge only after [`FleetStore::store_cases`] returned,
//! which flushes (fsyncs) first. A verdict is stored and queued for its device in one
//! atomic batch, so after any crash each stored case is either still queued for the
//! engine or has exactly one verdict.
//!
//! ```text
//! cases    case id → (device, received, case)        once per case id
//! queue    seq → case id                              waiting for the engine
//! verdicts case id → verdict                          exactly one per judged case
//! outbox   device \0 case id → ()                     verdicts not yet acknowledged by the device
//! devices  device → registry entry (JSON)
//! sync     device → its sync replica (map, cursors, clock: shared::replica)
//! ```

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use shared::case::{CaseId, HardCase};
use shared::frame::VerdictMsg;
use sled::Transactional;

/// A stored case.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredCase {
    /// The device that sent it.
    pub device: String,
    /// When it was first received (Unix ms).
    pub received_ms: u64,
    /// The case.
    pub case: HardCase,
}

/// A stored verdict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredVerdict {
    /// The verdict as the link carries it.
    pub verdict: VerdictMsg,
    /// When it was given (Unix ms).
    pub at_ms: u64,
    /// Engine time, seconds.
    pub seconds: f64,
}

/// A device in the registry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// The device id.
    pub id: String,
    /// First connection (Unix ms).
    pub first_seen_ms: u64,
    /// Latest message (Unix ms).
    pub last_seen_ms: u64,
    /// Remote address of the latest connection.
    pub address: String,
    /// Agent version it reported.
    pub agent_version: String,
    /// Student model hash it reported.
    pub model_sha256: String,
    /// Outbox backlog it reported.
    pub backlog: u64,
    /// Cases received from it (first deliveries).
    pub cases: u64,
    /// Verdicts it acknowledged.
    pub verdicts_delivered: u64,
    /// The share of its cases it should send to the cloud, set by an operator (the fleet
    /// default applies when absent).
    #[serde(default)]
    pub target_share: Option<f64>,
}

/// The store.
#[derive(Clone)]
pub struct FleetStore {
    db: sled::Db,
    cases: sled::Tree,
    queue: sled::Tree,
    verdicts: sled::Tree,
    outbox: sled::Tree,
    devices: sled::Tree,
    sync: sled::Tree,
}

fn outbox_key(device: &str, id: &CaseId) -> Vec<u8> {
    let mut k = Vec::with_capacity(device.len() + 17);
    k.extend_from_slice(device.as_bytes());
    k.push(0);
    k.extend_from_slice(&id.0);
    k
}

fn id_of(bytes: &[u8]) -> Option<CaseId> {
    <[u8; 16]>::try_from(bytes).ok().map(CaseId)
}

impl FleetStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<FleetStore> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(64 << 20)
            .open()
            .with_context(|| format!("opening the fleet store in {}", dir.display()))?;
        Ok(FleetStore {
            cases: db.open_tree("cases")?,
            queue: db.open_tree("queue")?,
            verdicts: db.open_tree("verdicts")?,
            outbox: db.open_tree("outbox")?,
            devices: db.open_tree("devices")?,
            sync: db.open_tree("sync")?,
            db,
        })
    }

    /// Stores cases from `device` durably. Returns the ids that were new (queued for the
    /// engine); a case id seen before is not stored or queued again. Every case of the
    /// batch is durable when this returns, so all of them may be acknowledged.
    pub fn store_cases(
        &self,
        device: &str,
        cases: Vec<HardCase>,
        now_ms: u64,
    ) -> anyhow::Result<Vec<CaseId>> {
        let mut fresh = Vec::new();
        for case in cases {
            let id = case.id;
            let stored = StoredCase {
                device: device.to_string(),
                received_ms: now_ms,
                case,
            };
            let bytes = postcard::to_stdvec(&stored)?;
            // Insert only if absent: concurrent deliveries of one case store it once.
            let inserted = self
                .cases
                .compare_and_swap(id.0, None::<&[u8]>, Some(bytes))?
                .is_ok();
            if inserted {
                let seq = self.db.generate_id()?;
                self.queue.insert(seq.to_be_bytes(), &id.0)?;
                fresh.push(id);
            }
        }
        if !fresh.is_empty() {
            self.update_device(device, |d| d.cases += fresh.len() as u64)?;
        }
        self.db.flush()?;
        Ok(fresh)
    }

    /// A stored case.
    pub fn case(&self, id: &CaseId) -> anyhow::Result<Option<StoredCase>> {
        self.cases
            .get(id.0)?
            .map(|v| postcard::from_bytes(&v).context("a stored case is unreadable"))
            .transpose()
    }

    /// The oldest queued cases (up to `n`), with their queue keys.
    pub fn queued(&self, n: usize) -> anyhow::Result<Vec<(Vec<u8>, StoredCase)>> {
        let mut out = Vec::new();
        for item in self.queue.iter() {
            if out.len() >= n {
                break;
            }
            let (k, v) = item?;
            let Some(id) = id_of(&v) else { continue };
            match self.case(&id)? {
                Some(c) => out.push((k.to_vec(), c)),
                None => {
                    self.queue.remove(k)?;
                }
            }
        }
        Ok(out)
    }

    /// Cases waiting for the engine.
    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// Stores the verdict of a queued case: removes it from the queue and puts it in its
    /// device's outbox, atomically. A case that already has a verdict keeps the first one.
    pub fn store_verdict(
        &self,
        queue_key: &[u8],
        device: &str,
        v: StoredVerdict,
    ) -> anyhow::Result<bool> {
        let id = v.verdict.case_id;
        let bytes = postcard::to_stdvec(&v)?;
        let res: sled::transaction::TransactionResult<bool, ()> =
            (&self.queue, &self.verdicts, &self.outbox).transaction(|(q, vs, ob)| {
                q.remove(queue_key)?;
                if vs.get(id.0)?.is_some() {
                    return Ok(false);
                }
                vs.insert(&id.0, bytes.as_slice())?;
                ob.insert(outbox_key(device, &id), &[])?;
                Ok(true)
            });
        let stored = res.map_err(|e| anyhow::anyhow!("storing a verdict: {e:?}"))?;
        self.db.flush()?;
        Ok(stored)
    }

    /// A verdict.
    pub fn verdict(&self, id: &CaseId) -> anyhow::Result<Option<StoredVerdict>> {
        self.verdicts
            .get(id.0)?
            .map(|v| postcard::from_bytes(&v).context("a stored verdict is unreadable"))
            .transpose()
    }

    /// Number of verdicts stored.
    pub fn verdict_count(&self) -> usize {
        self.verdicts.len()
    }

    /// Verdicts `device` has not acknowledged yet (oldest case ids first, up to `n`).
    pub fn undelivered(&self, device: &str, n: usize) -> anyhow::Result<Vec<VerdictMsg>> {
        let mut prefix = device.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for item in self.outbox.scan_prefix(&prefix) {
            if out.len() >= n {
                break;
            }
            let (k, _) = item?;
            let Some(id) = id_of(&k[prefix.len()..]) else {
                continue;
            };
            if let Some(v) = self.verdict(&id)? {
                out.push(v.verdict);
            }
        }
        Ok(out)
    }

    /// The device acknowledged these verdicts.
    pub fn delivered(&self, device: &str, ids: &[CaseId]) -> anyhow::Result<()> {
        let mut n = 0;
        for id in ids {
            if self.outbox.remove(outbox_key(device, id))?.is_some() {
                n += 1;
            }
        }
        if n > 0 {
            self.update_device(device, |d| d.verdicts_delivered += n)?;
        }
        self.db.flush()?;
        Ok(())
    }

    /// Changes a registry entry (creating it).
    pub fn update_device(&self, id: &str, f: impl Fn(&mut Device)) -> anyhow::Result<Device> {
        let mut out = Device::default();
        self.devices.fetch_and_update(id, |old| {
            let mut d: Device = old
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or_else(|| Device {
                    id: id.to_string(),
                    ..Device::default()
                });
            f(&mut d);
            out = d.clone();
            serde_json::to_vec(&d).ok()
        })?;
        Ok(out)
    }

    /// A device's stored sync replica.
    pub fn replica(&self, device: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.sync.get(device)?.map(|v| v.to_vec()))
    }

    /// Stores a device's sync replica durably.
    pub fn store_replica(&self, device: &str, bytes: &[u8]) -> anyhow::Result<()> {
        self.sync.insert(device, bytes)?;
        self.db.flush()?;
        Ok(())
    }

    /// Every registered device.
    pub fn devices(&self) -> anyhow::Result<Vec<Device>> {
        self.devices
            .iter()
            .values()
            .map(|v| Ok(serde_json::from_slice(&v?)?))
            .collect()
    }
}
