//! The DeepSeek engine: loads Hugging Face checkpoints as published and runs them.
//!
//! - [`config`]: `config.json` of DeepSeek-V2/V3, Qwen2 and Llama, in both the published
//!   and the transformers-5 spelling; [`weights`]: single or sharded safetensors,
//!   memory-mapped, bf16/f16/f32.
//! - [`backend`]: the operations the model is written against, and the CPU backend.
//! - [`model`]: one implementation of all architectures (MLA, MoE routing, GQA) with
//!   batched forward passes; [`rope`]: rotary embeddings and their scalings.
//! - [`sampler`], [`constrain`], [`generate`]: sampling, grammar-constrained decoding
//!   (llguidance) and batched generation; [`scheduler`]: continuous batching for serving.
//! - [`tokenizer`], [`chat`]: `tokenizer.json`, the chat template and stop tokens.

pub mod backend;
pub mod bench;
pub mod chat;
pub mod config;
pub mod constrain;
pub mod generate;
pub mod model;
pub mod paged;
pub mod rope;
pub mod sampler;
pub mod scheduler;
pub mod service;
pub mod tokenizer;
pub mod weights;
