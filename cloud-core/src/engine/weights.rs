//! Checkpoint weights: single or sharded safetensors files, memory-mapped, read as they
//! are published (bf16, f16 or f32).
//!
//! Opening a checkpoint checks everything that can be checked before any weight is used:
//! every shard the index names exists and is a complete safetensors file, and every tensor
//! the index lists is in the shard it names. Reading a tensor checks its dtype and shape.
//! Every error names the file and the tensor; nothing here panics on a bad file.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensors};

/// Problems with checkpoint files.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// Neither `model.safetensors` nor `model.safetensors.index.json` is in the directory.
    #[error("{0}: no model.safetensors or model.safetensors.index.json")]
    NoWeights(PathBuf),
    /// A file could not be read.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The index is not what Hugging Face writes.
    #[error("{file}: {reason}")]
    BadIndex {
        /// The index file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A shard named by the index is missing.
    #[error("{file}: missing shard (the index names it for {tensors} tensors, e.g. {example})")]
    MissingShard {
        /// The missing file.
        file: PathBuf,
        /// How many tensors it should hold.
        tensors: usize,
        /// One of them.
        example: String,
    },
    /// A shard is truncated or is not a safetensors file.
    #[error("{file}: not a complete safetensors file ({reason})")]
    BadShard {
        /// The file.
        file: PathBuf,
        /// The parser's reason.
        reason: String,
    },
    /// The index names a tensor its shard does not hold.
    #[error("{file}: tensor {tensor} is listed in the index for this shard but is not in it")]
    IndexMismatch {
        /// The shard.
        file: PathBuf,
        /// The tensor.
        tensor: String,
    },
    /// A tensor the model needs is not in the checkpoint.
    #[error("{dir}: tensor {tensor} is missing from the checkpoint")]
    MissingTensor {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The tensor.
        tensor: String,
    },
    /// A tensor has a dtype the engine does not read.
    #[error("{file}: tensor {tensor} has dtype {dtype}; bf16, f16 or f32 expected")]
    WrongDtype {
        /// The shard.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its dtype.
        dtype: String,
    },
    /// A tensor's shape differs from what the configuration implies.
    #[error("{file}: tensor {tensor} has shape {found:?}; the configuration implies {expected:?}")]
    ShapeMismatch {
        /// The shard.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// From the configuration.
        expected: Vec<usize>,
        /// In the file.
        found: Vec<usize>,
    },
}

struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Offset of the data section (8-byte length + header).
    data_start: usize,
    meta: Metadata,
}

/// An opened checkpoint.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// tensor name → shard index
    where_is: HashMap<String, usize>,
}

/// A tensor's bytes as stored, with its dtype and shape.
pub struct RawTensor<'a> {
    /// Dtype as stored.
    pub dtype: Dtype,
    /// Shape.
    pub shape: &'a [usize],
    /// Little-endian element bytes.
    pub bytes: &'a [u8],
}

fn map_file(path: &Path) -> Result<Mmap, WeightsError> {
    let file = File::open(path).map_err(|source| WeightsError::Io {
        file: path.to_path_buf(),
        source,
    })?;
    // SAFETY: the map is read-only, and checkpoint files are immutable inputs: another
    // process truncating a checkpoint while the engine runs is outside what we support
    // (the same contract as every mmap-based loader, safetensors' own included).
    #[allow(unsafe_code)]
    let map = unsafe { Mmap::map(&file) }.map_err(|source| WeightsError::Io {
        file: path.to_path_buf(),
        source,
    })?;
    Ok(map)
}

fn open_shard(path: &Path) -> Result<Shard, WeightsError> {
    let map = map_file(path)?;
    let (n, meta) = SafeTensors::read_metadata(&map).map_err(|e| WeightsError::BadShard {
        file: path.to_path_buf(),
        reason: match e {
            safetensors::SafeTensorError::MetadataIncompleteBuffer => {
                "the file is truncated: its header describes more data than it holds".to_string()
            }
            other => other.to_string(),
        },
    })?;
    Ok(Shard {
        path: path.to_path_buf(),
        map,
        data_start: 8 + n,
        meta,
    })
}

impl Checkpoint {
    /// Opens the checkpoint in `dir`.
    pub fn open(dir: &Path) -> Result<Checkpoint, WeightsError> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut shards = Vec::new();
        let mut where_is = HashMap::new();
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|source| WeightsError::Io {
                file: index_path.clone(),
                source,
            })?;
            let bad = |reason: String| WeightsError::BadIndex {
                file: index_path.clone(),
                reason,
            };
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| bad("no `weight_map` object".into()))?;
            // Shard file → tensors the index puts there, in a stable order.
            let mut by_file: Vec<(String, Vec<String>)> = Vec::new();
            for (tensor, file) in map {
                let file = file
                    .as_str()
                    .ok_or_else(|| bad(format!("weight_map.{tensor} is not a file name")))?;
                if file.contains('/') || file.contains('\\') || file == ".." {
                    return Err(bad(format!(
                        "weight_map.{tensor} names {file:?}, outside the checkpoint directory"
                    )));
                }
                match by_file.iter_mut().find(|(f, _)| f == file) {
                    Some((_, ts)) => ts.push(tensor.clone()),
                    None => by_file.push((file.to_string(), vec![tensor.clone()])),
                }
            }
            by_file.sort();
            for (file, tensors) in by_file {
                let path = dir.join(&file);
                if !path.exists() {
                    return Err(WeightsError::MissingShard {
                        file: path,
                        tensors: tensors.len(),
                        example: tensors[0].clone(),
                    });
                }
                let shard = open_shard(&path)?;
                for t in tensors {
                    if shard.meta.info(&t).is_none() {
                        return Err(WeightsError::IndexMismatch {
                            file: path.clone(),
                            tensor: t,
                        });
                    }
                    where_is.insert(t, shards.len());
                }
                shards.push(shard);
            }
        } else if single.exists() {
            let shard = open_shard(&single)?;
            for name in shard.meta.tensors().keys() {
                where_is.insert(name.clone(), 0);
            }
            shards.push(shard);
        } else {
            return Err(WeightsError::NoWeights(dir.to_path_buf()));
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            shards,
            where_is,
        })
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.where_is.len()
    }

    /// `true` if the checkpoint holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.where_is.is_empty()
    }

    /// Whether a tensor is present.
    pub fn contains(&self, name: &str) -> bool {
        self.where_is.contains_key(name)
    }

    /// Whether a tensor is stored as bf16 (false for one that is missing).
    pub fn is_bf16(&self, name: &str) -> bool {
        self.raw(name).is_ok_and(|r| r.dtype == Dtype::BF16)
    }

    /// The stored bytes of a tensor (no copy).
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>, WeightsError> {
        let shard = self
            .where_is
            .get(name)
            .and_then(|i| self.shards.get(*i))
            .ok_or_else(|| WeightsError::MissingTensor {
                dir: self.dir.clone(),
                tensor: name.to_string(),
            })?;
        let info = shard
            .meta
            .info(name)
            .ok_or_else(|| WeightsError::IndexMismatch {
                file: shard.path.clone(),
                tensor: name.to_string(),
            })?;
        let (start, end) = info.data_offsets;
        // read_metadata checked the offsets against the file length.
        let bytes = shard
            .map
            .get(shard.data_start + start..shard.data_start + end)
            .ok_or_else(|| WeightsError::BadShard {
                file: shard.path.clone(),
                reason: format!("tensor {name} lies outside the file"),
            })?;
        Ok(RawTensor {
            dtype: info.dtype,
            shape: &info.shape,
            bytes,
        })
    }

    fn file_of(&self, name: &str) -> PathBuf {
        self.where_is
            .get(name)
            .map(|i| self.shards[*i].path.clone())
            .unwrap_or_default()
    }

    /// The stored bytes of a tensor, checked against the shape the configuration implies.
    fn checked(&self, name: &str, expected: &[usize]) -> Result<RawTensor<'_>, WeightsError> {
        let raw = self.raw(name)?;
        if raw.shape != expected {
            return Err(WeightsError::ShapeMismatch {
                file: self.file_of(name),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                found: raw.shape.to_vec(),
            });
        }
        Ok(raw)
    }

    /// A tensor as bf16 (bf16 checkpoints: the stored values, no rounding through f32),
    /// checked against the shape the configuration implies.
    pub fn bf16(&self, name: &str, expected: &[usize]) -> Result<Vec<half::bf16>, WeightsError> {
        let raw = self.checked(name, expected)?;
        if raw.dtype == Dtype::BF16 {
            return Ok(raw
                .bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
                .collect());
        }
        Ok(self
            .f32(name, expected)?
            .into_iter()
            .map(half::bf16::from_f32)
            .collect())
    }

    /// A tensor converted to f32, checked against the shape the configuration implies.
    pub fn f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, WeightsError> {
        let raw = self.checked(name, expected)?;
        let file = || self.file_of(name);
        let b = raw.bytes;
        Ok(match raw.dtype {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(WeightsError::WrongDtype {
                    file: file(),
                    tensor: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn bytes_f32(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn write(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| {
                (
                    n.to_string(),
                    TensorView::new(*d, s.clone(), b).expect("view"),
                )
            })
            .collect();
        let data = safetensors::tensor::serialize(views, None).expect("serialize");
        std::fs::write(path, data).expect("write");
    }

    #[test]
    fn single_file_in_all_three_dtypes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vals = [1.0f32, -2.5, 0.15625, 1024.0];
        let bf: Vec<u8> = vals
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect();
        let hf: Vec<u8> = vals
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect();
        write(
            &dir.path().join("model.safetensors"),
            &[
                ("a", Dtype::F32, vec![2, 2], bytes_f32(&vals)),
                ("b", Dtype::BF16, vec![4], bf),
                ("c", Dtype::F16, vec![4], hf),
            ],
        );
        let ck = Checkpoint::open(dir.path()).expect("open");
        assert_eq!(ck.len(), 3);
        assert_eq!(ck.f32("a", &[2, 2]).expect("a"), vals);
        assert_eq!(ck.f32("b", &[4]).expect("b"), vals); // all exactly representable
        assert_eq!(ck.f32("c", &[4]).expect("c"), vals);
    }

    fn sharded(dir: &Path) {
        write(
            &dir.join("model-00001-of-00002.safetensors"),
            &[("x", Dtype::F32, vec![2], bytes_f32(&[1.0, 2.0]))],
        );
        write(
            &dir.join("model-00002-of-00002.safetensors"),
            &[("y", Dtype::I32, vec![1], vec![1, 0, 0, 0])],
        );
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            r#"{"metadata": {"total_size": 12}, "weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}"#,
        )
        .expect("index");
    }

    #[test]
    fn sharded_checkpoints_and_each_kind_of_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        sharded(dir.path());
        let ck = Checkpoint::open(dir.path()).expect("open");
        assert_eq!(ck.f32("x", &[2]).expect("x"), vec![1.0, 2.0]);
        let msg = |e: WeightsError| e.to_string();
        // Wrong dtype, shape mismatch, missing tensor: named.
        let e = msg(ck.f32("y", &[1]).expect_err("dtype"));
        assert!(
            e.contains("tensor y has dtype I32") && e.contains("00002"),
            "{e}"
        );
        let e = msg(ck.f32("x", &[3]).expect_err("shape"));
        assert!(
            e.contains("tensor x has shape [2]") && e.contains("[3]"),
            "{e}"
        );
        let e = msg(ck.f32("z", &[1]).expect_err("missing"));
        assert!(e.contains("tensor z is missing"), "{e}");
        drop(ck);

        // Truncated shard.
        let p = dir.path().join("model-00001-of-00002.safetensors");
        let len = std::fs::metadata(&p).expect("meta").len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .expect("open")
            .set_len(len - 3)
            .expect("truncate");
        let e = msg(Checkpoint::open(dir.path()).err().expect("truncated"));
        assert!(e.contains("00001") && e.contains("truncated"), "{e}");

        // Missing shard.
        std::fs::remove_file(&p).expect("rm");
        let e = msg(Checkpoint::open(dir.path()).err().expect("missing shard"));
        assert!(
            e.contains("missing shard") && e.contains("00001") && e.contains("x"),
            "{e}"
        );

        // Garbage instead of a shard.
        std::fs::write(&p, b"definitely not safetensors").expect("write");
        let e = msg(Checkpoint::open(dir.path()).err().expect("garbage"));
        assert!(e.contains("not a complete safetensors file"), "{e}");

        // Index naming a tensor its shard lacks; index escaping the directory; no weights.
        write(&p, &[("other", Dtype::F32, vec![1], bytes_f32(&[0.0]))]);
        let e = msg(Checkpoint::open(dir.path()).err().expect("mismatch"));
        assert!(e.contains("tensor x is listed in the index"), "{e}");
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"weight_map": {"x": "../evil.safetensors"}}"#,
        )
        .expect("index");
        assert!(msg(Checkpoint::open(dir.path()).err().expect("escape")).contains("outside"));
        let empty = tempfile::tempdir().expect("tempdir");
        assert!(msg(Checkpoint::open(empty.path()).err().expect("none"))
            .contains("no model.safetensors"));
    }
}
