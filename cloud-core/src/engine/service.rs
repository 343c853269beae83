//! A checkpoint being served: the scheduler's engine thread plus everything needed to
//! turn text into requests and tokens back into text — tokenizer, chat template, stop
//! tokens and grammars.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::backend::cpu::{Cpu, CpuWeights};
use super::backend::Backend;
use super::chat::{generation_eos, ChatTemplate};
use super::constrain::Grammars;
use super::model::Model;
use super::scheduler::{self, Handle, SchedulerConfig};
use super::tokenizer::Tokenizer;

/// A loaded, running checkpoint. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    dir: PathBuf,
    handle: Handle,
    tokenizer: Tokenizer,
    chat: Option<ChatTemplate>,
    grammars: Option<Grammars>,
    stop_tokens: Vec<u32>,
    pieces: Vec<String>,
}

/// Which backend runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The CPU backend.
    Cpu(CpuSettings),
    /// The CUDA backend (built with the `cuda` feature).
    Cuda(CudaSettings),
}

/// What an operator chooses of the CPU backend (`serve --engine cpu`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuSettings {
    /// How matrices are held.
    pub weights: CpuWeights,
    /// Bytes for the KV cache; `None`: half of the host memory available once the
    /// weights are loaded.
    pub kv_cache_bytes: Option<usize>,
    /// Keys and values kept as bf16 (half the memory) instead of f32.
    pub kv_bf16: bool,
}

impl From<CpuSettings> for Cpu {
    fn from(s: CpuSettings) -> Cpu {
        let mut cpu = Cpu::with_weights(s.weights);
        cpu.kv.cache_bytes = s.kv_cache_bytes;
        cpu.kv.bf16 = s.kv_bf16;
        cpu
    }
}

/// What an operator chooses of the CUDA backend (`serve --engine cuda`), in plain values
/// that builds without the `cuda` feature take too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaSettings {
    /// Device ordinal.
    pub device: usize,
    /// Bytes for the KV cache; `None`: 90% of what is free, less 2 GiB kept for
    /// activations, once the weights are loaded.
    pub kv_cache_bytes: Option<usize>,
    /// Decode steps captured into CUDA graphs and replayed.
    pub graphs: bool,
    /// The tensor-core kernels where the device has them (attention, grouped experts).
    pub tensor_core_kernels: bool,
    /// The least query heads per key head whose decode steps run attention on the
    /// tensor cores ([`super::backend::MMA_DECODE_GROUP`] by default; 1: all).
    pub mma_decode_group: usize,
    /// Programmatic dependent launch where the device has it (sm_90 and later).
    pub pdl: bool,
}

impl Default for CudaSettings {
    fn default() -> Self {
        CudaSettings {
            device: 0,
            kv_cache_bytes: None,
            graphs: true,
            tensor_core_kernels: true,
            mma_decode_group: super::backend::MMA_DECODE_GROUP,
            pdl: true,
        }
    }
}

#[cfg(feature = "cuda")]
impl From<CudaSettings> for super::backend::cuda::CudaOptions {
    fn from(s: CudaSettings) -> Self {
        super::backend::cuda::CudaOptions {
            device: s.device,
            kv_cache_bytes: s.kv_cache_bytes,
            graphs: s.graphs,
            tensor_core_kernels: s.tensor_core_kernels,
            mma_decode_group: s.mma_decode_group,
            pdl: s.pdl,
            ..Default::default()
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Device, String> {
        match s {
            "cpu" => Ok(Device::Cpu(CpuSettings::default())),
            "cuda" => Ok(Device::Cuda(CudaSettings::default())),
            other => Err(format!("unknown engine backend {other:?} (cpu, cuda)")),
        }
    }
}

impl Engine {
    /// Loads the checkpoint in `dir` on the CPU backend and starts its engine thread.
    /// `name` is the model name the API reports and accepts.
    pub fn load_cpu(dir: &Path, name: &str, cfg: SchedulerConfig) -> anyhow::Result<Engine> {
        Engine::load(dir, name, cfg, Device::Cpu(CpuSettings::default()))
    }

    /// Loads the checkpoint in `dir` on `device` and starts its engine thread.
    pub fn load(
        dir: &Path,
        name: &str,
        cfg: SchedulerConfig,
        device: Device,
    ) -> anyhow::Result<Engine> {
        match device {
            Device::Cpu(settings) => {
                let be = Cpu::from(settings);
                tracing::info!("CPU backend: {}", super::backend::Backend::describe(&be));
                Engine::start(dir, name, cfg, be)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(settings) => {
                let be = super::backend::cuda::Cuda::new(settings.into())?;
                tracing::info!("CUDA backend: {}", super::backend::Backend::describe(&be));
                Engine::start(dir, name, cfg, be)
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => anyhow::bail!(
                "this cloud-core was built without the CUDA backend (cargo feature `cuda`)"
            ),
        }
    }

    fn start<B>(dir: &Path, name: &str, cfg: SchedulerConfig, be: B) -> anyhow::Result<Engine>
    where
        B: Backend + Send + 'static,
        Model<B>: Send,
    {
        let tokenizer = Tokenizer::load(dir)?;
        let chat = ChatTemplate::load(dir)?;
        let model = Model::load(dir, be)?;
        let mut stop_tokens = model.config().eos_token_ids.clone();
        for t in generation_eos(dir)? {
            if !stop_tokens.contains(&t) {
                stop_tokens.push(t);
            }
        }
        let vocab = model.config().vocab_size;
        // Structured output needs a token that ends the answer.
        let grammars = match stop_tokens.first() {
            Some(&eos) => Some(Grammars::load(dir, vocab, eos)?),
            None => {
                tracing::warn!(
                    "{}: no eos_token_id in config.json or generation_config.json: \
                     structured output (response_format, verdicts) is unavailable",
                    dir.display()
                );
                None
            }
        };
        let pieces = (0..vocab as u32)
            .map(|t| tokenizer.decode_keep_special(&[t]).unwrap_or_default())
            .collect();
        let handle = scheduler::start(model, cfg);
        Ok(Engine {
            inner: Arc::new(Inner {
                name: name.to_string(),
                dir: dir.to_path_buf(),
                handle,
                tokenizer,
                chat,
                grammars,
                stop_tokens,
                pieces,
            }),
        })
    }

    /// The model name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// What runs the model, as it runs now ([`Backend::describe`]).
    pub fn backend(&self) -> String {
        self.inner.handle.stats().backend().description
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The scheduler.
    pub fn handle(&self) -> &Handle {
        &self.inner.handle
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner.tokenizer
    }

    /// The chat template, if the checkpoint has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.inner.chat.as_ref()
    }

    /// Grammars for structured output (absent without an end-of-sequence token).
    pub fn grammars(&self) -> Option<&Grammars> {
        self.inner.grammars.as_ref()
    }

    /// Tokens that end an answer.
    pub fn stop_tokens(&self) -> &[u32] {
        &self.inner.stop_tokens
    }

    /// The text of one token on its own (special tokens spelled out); partial UTF-8
    /// sequences come out as U+FFFD.
    pub fn piece(&self, token: u32) -> &str {
        self.inner
            .pieces
            .get(token as usize)
            .map_or("", String::as_str)
    }
}
