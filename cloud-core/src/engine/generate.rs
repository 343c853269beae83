//! Generation: many requests decoded together, each with its own sampler, stop tokens,
//! token budget and (optionally) grammar.
//!
//! A [`Sequence`] is one request in flight: its cache, sampler and output so far. Every
//! [`step`] runs all given sequences as one batch (the first step of a sequence is its
//! whole prompt) and samples one token for each. [`generate`] drives a fixed set of
//! requests to the end; the serving scheduler ([`super::scheduler`]) drives the same
//! sequences while requests join and leave at every step.

use super::backend::Backend;
use super::constrain::Constraint;
use super::model::{Cache, EngineError, Model, PickRows};
use super::sampler::{set_bits, Pick, Sampled, Sampler, SamplingParams};

/// One generation request.
pub struct Request {
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Sampling.
    pub params: SamplingParams,
    /// A grammar the output must follow (a JSON schema, usually).
    pub constraint: Option<Constraint>,
}

impl Request {
    /// An unconstrained request.
    pub fn new(prompt: Vec<u32>, params: SamplingParams) -> Request {
        Request {
            prompt,
            params,
            constraint: None,
        }
    }
}

impl Request {
    /// Checks the request against a model with `vocab` tokens and a context of `ctx`
    /// positions; the error says what is wrong.
    pub fn check(&self, vocab: usize, ctx: usize) -> Result<(), EngineError> {
        if self.prompt.is_empty() {
            return Err(EngineError::Request("the prompt is empty".into()));
        }
        self.params.validate().map_err(EngineError::Request)?;
        if let Some(bad) = self.prompt.iter().find(|t| **t as usize >= vocab) {
            return Err(EngineError::Request(format!(
                "prompt token {bad} is outside the vocabulary ({vocab})"
            )));
        }
        if self.prompt.len() + self.params.max_tokens > ctx {
            return Err(EngineError::Request(format!(
                "the prompt ({} tokens) plus max_tokens ({}) exceed the model's context of {ctx}",
                self.prompt.len(),
                self.params.max_tokens,
            )));
        }
        Ok(())
    }
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// A stop token was sampled (for a constrained request: the answer is complete).
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

/// What one step did to one sequence.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// A new token (the sequence goes on unless `finish` is set).
    Token(Sampled, Option<Finish>),
    /// The sequence ended without a new token (a stop token was sampled).
    Done(Finish),
}

/// One request in flight.
pub struct Sequence<B: Backend> {
    cache: Cache<B>,
    sampler: Sampler,
    history: Vec<u32>,
    /// The tokens of `history` as bits (see [`set_bits`]), kept for a repetition penalty.
    seen: Option<Vec<u32>>,
    next_input: Vec<u32>,
    constraint: Option<Constraint>,
    produced: usize,
    finish: Option<Finish>,
}

impl<B: Backend> Sequence<B> {
    /// Checks the request against the model and starts it.
    pub fn new(model: &Model<B>, request: Request) -> Result<Sequence<B>, EngineError> {
        Sequence::with_prefix(model, request, model.new_cache())
    }

    /// Starts the request from `prefix`, the cache of the first `prefix.len()` tokens of
    /// its prompt (from [`Model::cache_prefix`]): only the rest of the prompt is run.
    /// The caller guarantees the cached tokens are the prompt's; at least one prompt token
    /// must remain to be run.
    pub fn with_prefix(
        model: &Model<B>,
        request: Request,
        prefix: Cache<B>,
    ) -> Result<Sequence<B>, EngineError> {
        let cfg = model.config();
        request.check(cfg.vocab_size, cfg.max_position_embeddings)?;
        if prefix.len() >= request.prompt.len() {
            return Err(EngineError::Request(
                "a cached prefix must leave at least one prompt token to run".into(),
            ));
        }
        let finish = (request.params.max_tokens == 0).then_some(Finish::Length);
        let seen = (request.params.repetition_penalty != 1.0).then(|| {
            let mut bits = vec![0u32; cfg.vocab_size.div_ceil(32)];
            set_bits(&mut bits, &request.prompt);
            bits
        });
        Ok(Sequence {
            seen,
            next_input: request.prompt[prefix.len()..].to_vec(),
            cache: prefix,
            history: request.prompt,
            sampler: Sampler::new(request.params),
            constraint: request.constraint,
            produced: 0,
            finish,
        })
    }

    /// Why it ended, once it has.
    pub fn finished(&self) -> Option<Finish> {
        self.finish
    }

    /// Tokens the next step will run (the prompt first, then one at a time).
    pub fn pending(&self) -> usize {
        self.next_input.len()
    }

    /// Positions in its cache.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// The cache (to keep a copy of a prompt's prefix).
    pub fn cache(&self) -> &Cache<B> {
        &self.cache
    }

    /// The prompt followed by the tokens generated so far.
    pub fn tokens(&self) -> &[u32] {
        &self.history
    }

    /// Takes the logits of the last position, samples, and advances.
    fn accept(&mut self, logits: &[f32]) -> Result<Step, EngineError> {
        let s = match &mut self.constraint {
            None => self.sampler.sample(logits, &self.history),
            Some(c) => {
                let mut allowed = logits.to_vec();
                c.mask(&mut allowed)
                    .map_err(|e| EngineError::Request(e.to_string()))?;
                self.sampler.sample_from(logits, allowed, &self.history)
            }
        };
        self.advance(s)
    }

    /// Takes the sampled token and advances.
    fn advance(&mut self, s: Sampled) -> Result<Step, EngineError> {
        if let Some(c) = &mut self.constraint {
            if c.advance(s.token)
                .map_err(|e| EngineError::Request(e.to_string()))?
            {
                self.finish = Some(Finish::Stop);
                return Ok(Step::Done(Finish::Stop));
            }
        } else if self.sampler.params().stop_tokens.contains(&s.token) {
            self.finish = Some(Finish::Stop);
            return Ok(Step::Done(Finish::Stop));
        }
        self.history.push(s.token);
        if let Some(bits) = &mut self.seen {
            set_bits(bits, &[s.token]);
        }
        self.next_input = vec![s.token];
        self.produced += 1;
        if self.produced >= self.sampler.params().max_tokens {
            self.finish = Some(Finish::Length);
        }
        Ok(Step::Token(s, self.finish))
    }
}

/// Where a step's tokens are picked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Picking {
    /// Where the logits are (on the device for a GPU backend): only the picks come back.
    Backend,
    /// By each sequence's sampler, from the logits copied back: the reference.
    Host,
}

/// Runs one batched step over `seqs` (all unfinished) and samples a token for each.
/// The outer error is the batch's (nothing advanced); an inner error is one sequence's
/// (a grammar failure, say), which then counts as finished.
pub fn step<B: Backend>(
    model: &Model<B>,
    seqs: &mut [&mut Sequence<B>],
) -> Result<Vec<Result<Step, EngineError>>, EngineError> {
    step_picking(model, seqs, Picking::Backend)
}

/// [`step`] with the tokens picked where `picking` says (the same tokens either way).
pub fn step_picking<B: Backend>(
    model: &Model<B>,
    seqs: &mut [&mut Sequence<B>],
    picking: Picking,
) -> Result<Vec<Result<Step, EngineError>>, EngineError> {
    if seqs
        .iter()
        .any(|s| s.finish.is_some() || s.next_input.is_empty())
    {
        return Err(EngineError::Request(
            "a finished sequence was given to step".into(),
        ));
    }
    // The backend picks — greedy or sampled by each sampler's draw, after each one's
    // repetition penalty, among the tokens of each one's grammar (the masks made here),
    // with the alternatives each one reports — where the logits are. When a grammar fails
    // to make its mask (or the caller asks for it), the last logits come back to each
    // sampler instead, where such an error is that sequence's own.
    let words = model.config().vocab_size.div_ceil(32);
    let mut on_backend = picking == Picking::Backend;
    let mut allowed = None;
    if on_backend && seqs.iter().any(|s| s.constraint.is_some()) {
        let mut bits = vec![u32::MAX; seqs.len() * words];
        on_backend = seqs
            .iter_mut()
            .zip(bits.chunks_mut(words))
            .all(|(s, w)| s.constraint.as_mut().is_none_or(|c| c.allowed(w).is_ok()));
        allowed = Some(bits);
    }
    let picks: Vec<Pick> = if on_backend {
        seqs.iter_mut().map(|s| s.sampler.plan()).collect()
    } else {
        Vec::new()
    };
    let penalised = picks.iter().any(|p| p.repetition_penalty != 1.0);
    let seen = penalised.then(|| {
        let mut bits = vec![0u32; seqs.len() * words];
        for (s, w) in seqs.iter().zip(bits.chunks_mut(words)) {
            if let Some(seen) = &s.seen {
                w.copy_from_slice(seen);
            }
        }
        bits
    });
    let inputs: Vec<Vec<u32>> = seqs
        .iter_mut()
        .map(|s| std::mem::take(&mut s.next_input))
        .collect();
    let mut batch: Vec<(&[u32], &mut Cache<B>)> = inputs
        .iter()
        .zip(seqs.iter_mut())
        .map(|(ids, s)| (ids.as_slice(), &mut s.cache))
        .collect();
    enum Outcome {
        Picks(Vec<Sampled>),
        Logits(Vec<Vec<f32>>),
    }
    let outcome = if on_backend {
        let how = PickRows {
            allowed: allowed.as_deref(),
            seen: seen.as_deref(),
            picks: (penalised || picks.iter().any(|p| !p.greedy() || p.alternatives > 0))
                .then_some(picks.as_slice()),
        };
        model
            .forward_batch_pick(&mut batch, how)
            .map(Outcome::Picks)
    } else {
        model.forward_batch_last(&mut batch).map(Outcome::Logits)
    };
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            for (s, ids) in seqs.iter_mut().zip(inputs) {
                s.next_input = ids;
                if on_backend {
                    s.sampler.unplan();
                }
            }
            return Err(e);
        }
    };
    let finish = |s: &mut Sequence<B>, r: Result<Step, EngineError>| {
        if r.is_err() {
            s.finish = Some(Finish::Stop);
        }
        r
    };
    Ok(match outcome {
        Outcome::Picks(picks) => seqs
            .iter_mut()
            .zip(picks)
            .map(|(s, p)| {
                let r = s.advance(p);
                finish(s, r)
            })
            .collect(),
        Outcome::Logits(logits) => seqs
            .iter_mut()
            .zip(&logits)
            .map(|(s, l)| {
                let r = s.accept(l);
                finish(s, r)
            })
            .collect(),
    })
}

/// Generates for every request, batching all of them at every step.
pub fn generate<B: Backend>(
    model: &Model<B>,
    requests: Vec<Request>,
) -> Result<Vec<Output>, EngineError> {
    generate_picking(model, requests, Picking::Backend)
}

/// [`generate`] with every step's tokens picked where `picking` says.
pub fn generate_picking<B: Backend>(
    model: &Model<B>,
    requests: Vec<Request>,
    picking: Picking,
) -> Result<Vec<Output>, EngineError> {
    let mut seqs = Vec::with_capacity(requests.len());
    for (i, r) in requests.into_iter().enumerate() {
        seqs.push(
            Sequence::new(model, r)
                .map_err(|e| EngineError::Request(format!("request {i}: {e}")))?,
        );
    }
    let mut outputs: Vec<Output> = seqs
        .iter()
        .map(|_| Output {
            tokens: Vec::new(),
            steps: Vec::new(),
            finish: Finish::Length,
        })
        .collect();
    loop {
        let (idx, mut active): (Vec<usize>, Vec<&mut Sequence<B>>) = seqs
            .iter_mut()
            .enumerate()
            .filter(|(_, s)| s.finish.is_none())
            .unzip();
        if active.is_empty() {
            break;
        }
        let results = step_picking(model, &mut active, picking)?;
        for (i, r) in idx.into_iter().zip(results) {
            match r.map_err(|e| EngineError::Request(format!("request {i}: {e}")))? {
                Step::Token(s, finish) => {
                    outputs[i].tokens.push(s.token);
                    outputs[i].steps.push(s);
                    if let Some(f) = finish {
                        outputs[i].finish = f;
                    }
                }
                Step::Done(f) => outputs[i].finish = f,
            }
        }
    }
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::backend::cpu::Cpu;

    fn request(prompt: &[u32], temperature: f32, penalty: f32, top_logprobs: usize) -> Request {
        Request::new(
            prompt.to_vec(),
            SamplingParams {
                temperature,
                repetition_penalty: penalty,
                top_k: 50,
                top_p: 0.9,
                seed: prompt.len() as u64,
                max_tokens: 6,
                top_logprobs,
                ..SamplingParams::default()
            },
        )
    }

    /// Greedy and sampled requests, with and without a repetition penalty and
    /// alternatives, are picked by the backend (`forward_batch_pick`, the samplers' draws
    /// made before the step) as each sampler picks them from the logits: the same tokens,
    /// log-probabilities and alternatives, alone or mixed in one batch.
    #[test]
    fn picks_by_the_backend_are_the_samplers_picks() {
        let cfg = crate::engine::bench::shape("tiny").expect("shape");
        let model = Model::random(cfg, Cpu::default(), 5).expect("model");
        let prompts: [&[u32]; 2] = [&[3, 1, 4, 1, 5], &[9, 2, 6]];
        for (temperature, penalty) in [(0.0, 1.0), (1.0, 1.0), (0.0, 1.5), (1.0, 1.5)] {
            let run = |top_logprobs: [usize; 2], picking| {
                let reqs = prompts
                    .iter()
                    .zip(top_logprobs)
                    .map(|(p, n)| request(p, temperature, penalty, n))
                    .collect();
                generate_picking(&model, reqs, picking).expect("generate")
            };
            let by_backend = run([0, 0], Picking::Backend);
            for alternatives in [[0, 0], [3, 3], [0, 5]] {
                let on_backend = run(alternatives, Picking::Backend);
                let on_host = run(alternatives, Picking::Host);
                for (i, (b, h)) in on_backend.iter().zip(&on_host).enumerate() {
                    let what = format!(
                        "temperature {temperature}, penalty {penalty}, {alternatives:?}, \
                         request {i}"
                    );
                    assert_eq!(b.tokens.len(), 6, "{what}");
                    assert_eq!(b.tokens, h.tokens, "{what}: tokens");
                    assert_eq!(b.tokens, by_backend[i].tokens, "{what}: tokens when mixed");
                    assert_eq!(b.steps, h.steps, "{what}: log-probabilities, alternatives");
                    for s in &b.steps {
                        assert_eq!(s.top.len(), alternatives[i], "{what}");
                        assert!(s.logprob <= 0.0 && s.logprob.is_finite());
                        assert!(s.top.windows(2).all(|w| w[0].1 >= w[1].1), "{what}");
                        if temperature == 0.0 && penalty == 1.0 && !s.top.is_empty() {
                            assert_eq!(s.top[0], (s.token, s.logprob), "{what}");
                        }
                    }
                }
            }
            if temperature > 0.0 {
                // Sampled: not simply the greedy tokens.
                let greedy = generate(
                    &model,
                    prompts.iter().map(|p| request(p, 0.0, 1.0, 0)).collect(),
                )
                .expect("greedy");
                assert_ne!(
                    greedy.iter().map(|o| &o.tokens).collect::<Vec<_>>(),
                    by_backend.iter().map(|o| &o.tokens).collect::<Vec<_>>()
                );
            }
        }
    }
}
