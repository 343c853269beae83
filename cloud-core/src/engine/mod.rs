//! The DeepSeek engine: loads Hugging Face checkpoints as published and runs them.
//!
//! Built so far: [`config`] (`config.json` of DeepSeek-V2/V3, Qwen2 and Llama, in both the
//! published and the transformers-5 spelling) and [`weights`] (single or sharded
//! safetensors, memory-mapped, bf16/f16/f32). The forward pass, backends, tokenizer,
//! generation and serving are not built yet.

pub mod backend;
pub mod chat;
pub mod config;
pub mod generate;
pub mod model;
pub mod rope;
pub mod sampler;
pub mod tokenizer;
pub mod weights;
