//! Student inference with tract-onnx.
//!
//! The student is an ONNX classifier (`features` `[batch, F]` → `probs` `[batch, C]`)
//! with a JSON sidecar describing its classes, feature layout and per-class feature
//! statistics (for the out-of-distribution score). The agent refuses a model whose
//! sidecar disagrees with the layout in `shared` — a mismatched model would silently
//! misclassify every case. The default model is embedded in the binary.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use shared::features::{feature_names, NUM_FEATURES};
use shared::schema::{CLASSES, NUM_CLASSES, WINDOW_LEN};
use tract_onnx::prelude::*;

/// The embedded student model (trained by `onnx/train.py`).
pub const EMBEDDED_ONNX: &[u8] = include_bytes!("../../../onnx/student.onnx");
/// The embedded model's metadata.
pub const EMBEDDED_META: &str = include_str!("../../../onnx/student.json");

/// The model's sidecar metadata (`student.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StudentMeta {
    /// Sidecar format version (1).
    pub format: u32,
    /// Output classes, in order.
    pub classes: Vec<String>,
    /// Input features, in order.
    pub features: Vec<String>,
    /// Records per window the model was trained on.
    pub window_len: usize,
    /// Name of the input.
    pub input: String,
    /// Name of the output.
    pub output: String,
    /// Per-class mean of the raw features.
    pub class_mean: Vec<Vec<f32>>,
    /// Per-class standard deviation of the raw features.
    pub class_std: Vec<Vec<f32>>,
    /// Percentiles of the OOD score on the training set.
    pub ood: serde_json::Value,
    /// How it was trained.
    pub trained: serde_json::Value,
}

/// A loaded student.
pub struct Student {
    plan: Arc<TypedRunnableModel>,
    meta: StudentMeta,
    sha256: String,
    source: String,
}

/// One case's inference result.
#[derive(Clone, Debug, PartialEq)]
pub struct Inference {
    /// Class probabilities.
    pub probs: Vec<f32>,
    /// Out-of-distribution score.
    pub ood: f32,
}

/// Smallest per-class standard deviation used in the OOD score.
const STD_FLOOR: f32 = 0.01;

impl Student {
    /// The embedded model.
    pub fn embedded() -> anyhow::Result<Student> {
        Student::from_bytes(EMBEDDED_ONNX, EMBEDDED_META, "embedded")
    }

    /// A model file, with its `.json` sidecar beside it (same stem).
    pub fn from_file(path: &Path) -> anyhow::Result<Student> {
        let onnx =
            std::fs::read(path).with_context(|| format!("reading model {}", path.display()))?;
        let meta_path = path.with_extension("json");
        let meta = std::fs::read_to_string(&meta_path).with_context(|| {
            format!(
                "reading model metadata {} (expected beside the model)",
                meta_path.display()
            )
        })?;
        Student::from_bytes(&onnx, &meta, &path.display().to_string())
    }

    /// A model from bytes.
    pub fn from_bytes(onnx: &[u8], meta: &str, source: &str) -> anyhow::Result<Student> {
        let meta: StudentMeta =
            serde_json::from_str(meta).with_context(|| format!("model metadata of {source}"))?;
        check_meta(&meta).with_context(|| format!("model metadata of {source}"))?;
        let mut reader = onnx;
        let plan = tract_onnx::onnx()
            .model_for_read(&mut reader)
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(|e| anyhow::anyhow!("loading ONNX model {source}: {e:#}"))?;
        let sha256 = hex::encode(sha2::Sha256::digest(onnx));
        let student = Student {
            plan,
            meta,
            sha256,
            source: source.to_string(),
        };
        // A model that loads but cannot run one case is refused now, not at the first case.
        let probe = student
            .infer(&[[0f32; NUM_FEATURES]])
            .with_context(|| format!("running model {source}"))?;
        anyhow::ensure!(
            probe.len() == 1,
            "model {source} returned {} rows for 1 input",
            probe.len()
        );
        Ok(student)
    }

    /// SHA-256 of the ONNX file, hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Where the model came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The metadata.
    pub fn meta(&self) -> &StudentMeta {
        &self.meta
    }

    /// Runs a batch of feature vectors.
    pub fn infer(&self, batch: &[[f32; NUM_FEATURES]]) -> anyhow::Result<Vec<Inference>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let flat: Vec<f32> = batch.iter().flat_map(|r| r.iter().copied()).collect();
        let input = Tensor::from_shape(&[batch.len(), NUM_FEATURES], &flat)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let out = self
            .plan
            .run(tvec![input.into()])
            .map_err(|e| anyhow::anyhow!("inference failed: {e:#}"))?;
        let Some(probs) = out.first() else {
            bail!("model returned no output")
        };
        let view = probs
            .to_plain_array_view::<f32>()
            .map_err(|e| anyhow::anyhow!("model output: {e}"))?;
        if view.shape() != [batch.len(), NUM_CLASSES] {
            bail!(
                "model output has shape {:?}, expected [{}, {NUM_CLASSES}]",
                view.shape(),
                batch.len()
            );
        }
        let flat = view.iter().copied().collect::<Vec<f32>>();
        Ok(batch
            .iter()
            .zip(flat.chunks(NUM_CLASSES))
            .map(|(x, p)| Inference {
                probs: p.to_vec(),
                ood: self.ood_score(x),
            })
            .collect())
    }

    /// Out-of-distribution score: the smallest, over classes, RMS z-distance of the
    /// features to that class's training mean (per-class std floored at 0.01).
    pub fn ood_score(&self, x: &[f32; NUM_FEATURES]) -> f32 {
        let mut best = f32::INFINITY;
        for (mean, std) in self.meta.class_mean.iter().zip(&self.meta.class_std) {
            let mut sum = 0f32;
            for j in 0..NUM_FEATURES {
                let z = (x[j] - mean[j]) / std[j].max(STD_FLOOR);
                sum += z * z;
            }
            best = best.min((sum / NUM_FEATURES as f32).sqrt());
        }
        if best.is_finite() {
            best
        } else {
            f32::MAX
        }
    }
}

fn check_meta(meta: &StudentMeta) -> anyhow::Result<()> {
    anyhow::ensure!(
        meta.format == 1,
        "unsupported metadata format {}",
        meta.format
    );
    anyhow::ensure!(
        meta.classes
            .iter()
            .map(String::as_str)
            .eq(CLASSES.iter().copied()),
        "classes {:?} differ from this agent's {:?}: retrain the model (onnx/train.py)",
        meta.classes,
        CLASSES
    );
    anyhow::ensure!(
        meta.features == feature_names(),
        "feature layout differs from this agent's ({} features expected): retrain the model",
        NUM_FEATURES
    );
    anyhow::ensure!(
        meta.window_len == WINDOW_LEN,
        "window_len {} differs from this agent's {WINDOW_LEN}",
        meta.window_len
    );
    anyhow::ensure!(
        meta.class_mean.len() == NUM_CLASSES
            && meta.class_std.len() == NUM_CLASSES
            && meta
                .class_mean
                .iter()
                .chain(&meta.class_std)
                .all(|r| r.len() == NUM_FEATURES && r.iter().all(|x| x.is_finite())),
        "class_mean/class_std must be {NUM_CLASSES} rows of {NUM_FEATURES} finite numbers"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Parity {
        inputs: Vec<Vec<f32>>,
        probs: Vec<Vec<f32>>,
        /// The OOD score of each row, computed by the training script.
        ood: Vec<f32>,
    }

    #[test]
    fn tract_matches_onnxruntime_on_the_parity_fixtures() {
        let student = Student::embedded().expect("embedded model loads");
        let fixtures: Parity =
            serde_json::from_str(include_str!("../../../onnx/fixtures/parity.json"))
                .expect("fixtures");
        let batch: Vec<[f32; NUM_FEATURES]> = fixtures
            .inputs
            .iter()
            .map(|r| r.as_slice().try_into().expect("30 features"))
            .collect();
        let got = student.infer(&batch).expect("infer");
        let mut max_diff = 0f32;
        for (g, want) in got.iter().zip(&fixtures.probs) {
            for (a, b) in g.probs.iter().zip(want) {
                max_diff = max_diff.max((a - b).abs());
            }
        }
        println!(
            "tract vs onnxruntime on {} fixture rows: max |Δprob| = {max_diff:e}",
            batch.len()
        );
        assert!(max_diff <= 1e-5, "max abs diff {max_diff}");
        // The OOD score is the same formula as the training script's.
        for (g, want) in got.iter().zip(&fixtures.ood) {
            let tol = 1e-4 * want.abs().max(1.0);
            assert!((g.ood - want).abs() <= tol, "ood {} vs {want}", g.ood);
        }
        // Batched and one-at-a-time inference agree.
        for (row, g) in batch.iter().zip(&got).take(8) {
            let one = student.infer(std::slice::from_ref(row)).expect("single");
            assert_eq!(one[0].probs.len(), g.probs.len());
            for (a, b) in one[0].probs.iter().zip(&g.probs) {
                assert!((a - b).abs() <= 1e-6);
            }
        }
    }

    #[test]
    fn mismatched_metadata_is_refused_with_a_reason() {
        let mut meta: serde_json::Value = serde_json::from_str(EMBEDDED_META).expect("meta");
        meta["classes"][0] = serde_json::json!("fine");
        let e = Student::from_bytes(EMBEDDED_ONNX, &meta.to_string(), "test")
            .err()
            .expect("refused");
        assert!(format!("{e:#}").contains("classes"), "{e:#}");
        let e = Student::from_bytes(b"not onnx", EMBEDDED_META, "garbage")
            .err()
            .expect("refused");
        assert!(format!("{e:#}").contains("garbage"), "{e:#}");
    }
}
