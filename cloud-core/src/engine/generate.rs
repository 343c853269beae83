//! Generation: many requests decoded together, each with its own sampler, stop tokens and
//! token budget. Every step runs all unfinished sequences as one batch (the first step of
//! a sequence is its prompt); a sequence leaves the batch as soon as it finishes.

use super::backend::Backend;
use super::model::{EngineError, Model};
use super::sampler::{Sampled, Sampler, SamplingParams};

/// One generation request.
#[derive(Clone, Debug)]
pub struct Request {
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Sampling.
    pub params: SamplingParams,
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// A stop token was sampled.
    Stop,
    /// `max_tokens` were produced.
    Length,
}

impl Finish {
    /// OpenAI's `finish_reason`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// One request's result.
#[derive(Clone, Debug)]
pub struct Output {
    /// Generated tokens (without the stop token).
    pub tokens: Vec<u32>,
    /// Each generated token with its log-probability and alternatives.
    pub steps: Vec<Sampled>,
    /// Why it ended.
    pub finish: Finish,
}

/// Generates for every request, batching all of them at every step.
pub fn generate<B: Backend>(
    model: &Model<B>,
    requests: &[Request],
) -> Result<Vec<Output>, EngineError> {
    for (i, r) in requests.iter().enumerate() {
        if r.prompt.is_empty() {
            return Err(EngineError::Request(format!(
                "request {i}: the prompt is empty"
            )));
        }
        r.params
            .validate()
            .map_err(|e| EngineError::Request(format!("request {i}: {e}")))?;
        let need = r.prompt.len() + r.params.max_tokens;
        if need > model.config().max_position_embeddings {
            return Err(EngineError::Request(format!(
                "request {i}: prompt ({}) plus max_tokens ({}) exceed the model's context of {}",
                r.prompt.len(),
                r.params.max_tokens,
                model.config().max_position_embeddings
            )));
        }
    }
    let vocab = model.config().vocab_size;
    let mut caches: Vec<_> = requests.iter().map(|_| model.new_cache()).collect();
    let mut samplers: Vec<Sampler> = requests
        .iter()
        .map(|r| Sampler::new(r.params.clone()))
        .collect();
    let mut history: Vec<Vec<u32>> = requests.iter().map(|r| r.prompt.clone()).collect();
    let mut outputs: Vec<Output> = requests
        .iter()
        .map(|_| Output {
            tokens: Vec::new(),
            steps: Vec::new(),
            finish: Finish::Length,
        })
        .collect();
    let mut next_input: Vec<Vec<u32>> = requests.iter().map(|r| r.prompt.clone()).collect();
    let mut active: Vec<usize> = (0..requests.len())
        .filter(|i| requests[*i].params.max_tokens > 0)
        .collect();
    while !active.is_empty() {
        let inputs: Vec<Vec<u32>> = active
            .iter()
            .map(|i| std::mem::take(&mut next_input[*i]))
            .collect();
        let mut cache_refs: Vec<_> = caches
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| active.contains(i))
            .map(|(_, c)| c)
            .collect();
        let mut batch: Vec<(&[u32], &mut _)> = inputs
            .iter()
            .map(|v| v.as_slice())
            .zip(cache_refs.iter_mut().map(|c| &mut **c))
            .collect();
        let logits = model.forward_batch(&mut batch)?;
        let mut still = Vec::with_capacity(active.len());
        for (&i, l) in active.iter().zip(&logits) {
            let last = &l[l.len() - vocab..];
            let s = samplers[i].sample(last, &history[i]);
            let params = samplers[i].params();
            if params.stop_tokens.contains(&s.token) {
                outputs[i].finish = Finish::Stop;
                continue;
            }
            history[i].push(s.token);
            outputs[i].tokens.push(s.token);
            next_input[i] = vec![s.token];
            outputs[i].steps.push(s);
            if outputs[i].tokens.len() < params.max_tokens {
                still.push(i);
            }
        }
        active = still;
    }
    Ok(outputs)
}
