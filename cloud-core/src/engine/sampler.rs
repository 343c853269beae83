//! Turning logits into the next token: greedy, temperature, top-k, top-p, repetition
//! penalty, seeded — with the log-probabilities the API reports.
//!
//! Log-probabilities are those of the model's own distribution (log-softmax of the raw
//! logits), not of the distribution after penalties and truncation; that is what
//! `logprobs` means in the OpenAI API.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The most alternatives a step reports (`top_logprobs`, as the OpenAI API allows).
pub const MAX_ALTERNATIVES: usize = 20;

/// How to sample. The defaults are greedy decoding.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 for greedy; otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1: all).
    pub top_p: f32,
    /// HF-style repetition penalty over the prompt and the output so far (1: none).
    pub repetition_penalty: f32,
    /// Seed of this request's random stream.
    pub seed: u64,
    /// Most new tokens.
    pub max_tokens: usize,
    /// Tokens that end the output (not included in it).
    pub stop_tokens: Vec<u32>,
    /// How many alternatives to report per step (0: none).
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
            max_tokens: 16,
            stop_tokens: Vec::new(),
            top_logprobs: 0,
        }
    }
}

impl SamplingParams {
    /// Checks ranges; the error names the parameter.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!(
                "temperature must be ≥ 0 (got {})",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be within (0, 1] (got {})", self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(format!(
                "repetition_penalty must be > 0 (got {})",
                self.repetition_penalty
            ));
        }
        if self.top_logprobs > MAX_ALTERNATIVES {
            return Err(format!(
                "top_logprobs must be at most {MAX_ALTERNATIVES} (got {})",
                self.top_logprobs
            ));
        }
        Ok(())
    }
}

/// One sampled step.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    /// The token.
    pub token: u32,
    /// Its log-probability under the model.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
}

/// A request's sampler (owns its random stream).
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// The stream before the last [`Sampler::plan`].
    planned_from: Option<StdRng>,
}

/// How one token is picked from a row of logits, once any penalty and grammar mask are
/// applied: what a backend needs to pick it where the logits are.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pick {
    /// 0: greedy; otherwise the logits are divided by it.
    pub temperature: f32,
    /// Only the `top_k` largest (0: all).
    pub top_k: usize,
    /// Only the fewest, largest first, whose probabilities reach `top_p` (1: all).
    pub top_p: f32,
    /// The uniform draw in [0, 1) that chooses along the cumulative probabilities, in
    /// order from the largest (unused when greedy).
    pub draw: f64,
    /// HF-style repetition penalty of the tokens seen so far (1: none), applied by
    /// [`penalize`] before the pick.
    pub repetition_penalty: f32,
    /// How many of the most likely tokens of the model's own distribution to report
    /// with their log-probabilities ([`alternatives`]; at most [`MAX_ALTERNATIVES`]).
    pub alternatives: usize,
}

/// Token `t`'s bit in a row of bits (`t % 32` of word `t / 32`): grammar masks and the
/// tokens a sequence has seen, as backends take them.
pub fn bit(words: &[u32], t: usize) -> bool {
    words.get(t / 32).is_some_and(|w| (w >> (t % 32)) & 1 == 1)
}

/// Sets the bits of `tokens` in a row of `words` (see [`bit`]).
pub fn set_bits(words: &mut [u32], tokens: &[u32]) {
    for &t in tokens {
        if let Some(w) = words.get_mut(t as usize / 32) {
            *w |= 1 << (t % 32);
        }
    }
}

/// The HF repetition penalty: every value of a token whose bit is set in `seen` is divided
/// by `penalty` if positive, multiplied by it otherwise.
pub fn penalize(x: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    for (t, v) in x.iter_mut().enumerate() {
        if bit(seen, t) {
            *v = if *v > 0.0 { *v / penalty } else { *v * penalty };
        }
    }
}

impl Pick {
    /// A greedy pick without a penalty.
    pub const GREEDY: Pick = Pick {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        draw: 0.0,
        repetition_penalty: 1.0,
        alternatives: 0,
    };

    /// Words per pick of [`Pick::words`].
    pub const WORDS: usize = 6;

    /// The pick as the CUDA backend's `sample_rows` kernel reads it: temperature, top_k,
    /// top_p, draw, penalty and alternatives, one 64-bit word each (floats by their bits).
    pub fn words(&self) -> [u64; Pick::WORDS] {
        [
            u64::from(self.temperature.to_bits()),
            self.top_k as u64,
            u64::from(self.top_p.to_bits()),
            self.draw.to_bits(),
            u64::from(self.repetition_penalty.to_bits()),
            self.alternatives as u64,
        ]
    }

    /// Picks from the row of raw `logits` as [`Pick::pick`] does after `allowed` (a
    /// grammar's mask: forbidden tokens weigh nothing) and the penalty of the tokens in
    /// `seen` (bits as [`bit`] reads them), with the pick's log-probability and the
    /// alternatives under the model's own distribution.
    pub fn sample(&self, logits: &[f32], allowed: Option<&[u32]>, seen: Option<&[u32]>) -> Sampled {
        let mut x = logits.to_vec();
        if let Some(a) = allowed {
            for (t, l) in x.iter_mut().enumerate() {
                if !bit(a, t) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        self.sample_masked(logits, x, seen)
    }

    /// [`Pick::sample`] with the mask already applied: `masked` is `logits` with every
    /// forbidden token at −∞.
    fn sample_masked(&self, logits: &[f32], mut masked: Vec<f32>, seen: Option<&[u32]>) -> Sampled {
        if let Some(s) = seen {
            penalize(&mut masked, s, self.repetition_penalty);
        }
        let token = self.pick(&masked);
        let lse = log_sum_exp(logits);
        Sampled {
            token: token as u32,
            logprob: logits[token] - lse,
            top: alternatives(logits, lse, self.alternatives),
        }
    }

    /// The largest value is picked.
    pub fn greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// The index it picks from `x` (ties: the lower index first).
    pub fn pick(&self, x: &[f32]) -> usize {
        if self.greedy() {
            return argmax(x);
        }
        let x: Vec<f32> = x.iter().map(|v| v / self.temperature).collect();
        let mut order: Vec<usize> = (0..x.len()).collect();
        order.sort_by(|a, b| x[*b].total_cmp(&x[*a]).then(a.cmp(b)));
        if self.top_k > 0 {
            order.truncate(self.top_k);
        }
        let max = x[order[0]];
        let mut probs: Vec<f64> = order.iter().map(|&i| ((x[i] - max) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if self.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, q) in probs.iter().enumerate() {
                acc += q;
                if acc >= f64::from(self.top_p) {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            order.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|q| *q /= total);
        }
        let mut acc = 0.0;
        for (i, q) in order.iter().zip(&probs) {
            acc += q;
            if self.draw < acc {
                return *i;
            }
        }
        order[order.len() - 1]
    }
}

/// `log Σ exp(logits)`, summed in f64 from the maximum.
fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|l| ((l - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

/// The `n` largest of the raw `logits` (the lower index first among equals: the order of
/// the probabilities), each with its log-probability `logit - lse`, `lse` being the
/// row's log-sum-exp.
pub fn alternatives(logits: &[f32], lse: f32, n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let n = n.min(idx.len());
    let by_rank = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    if n < idx.len() {
        idx.select_nth_unstable_by(n - 1, by_rank);
        idx.truncate(n);
    }
    idx.sort_by(by_rank);
    idx.into_iter()
        .map(|i| (i as u32, logits[i] - lse))
        .collect()
}

/// Log-softmax.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let lse = log_sum_exp(logits);
    logits.iter().map(|l| l - lse).collect()
}

/// The log-softmax of `logits` at `i` alone (what [`log_softmax`] gives there).
pub fn log_softmax_at(logits: &[f32], i: usize) -> f32 {
    logits[i] - log_sum_exp(logits)
}

/// Index of the largest value (the first one on ties): greedy decoding.
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

impl Sampler {
    /// A sampler seeded by `params.seed`.
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler {
            params,
            rng,
            planned_from: None,
        }
    }

    /// How the next token is to be picked, for a backend to pick it where the logits are
    /// (drawing from the stream as [`Sampler::sample`] would). [`Sampler::unplan`] puts
    /// the draw back when the step is not taken.
    pub fn plan(&mut self) -> Pick {
        self.planned_from = Some(self.rng.clone());
        self.next_pick()
    }

    /// The next pick, its draw taken from the stream unless it is greedy.
    fn next_pick(&mut self) -> Pick {
        let p = &self.params;
        let mut pick = Pick {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            draw: 0.0,
            repetition_penalty: p.repetition_penalty,
            alternatives: p.top_logprobs,
        };
        if !pick.greedy() {
            pick.draw = self.rng.random();
        }
        pick
    }

    /// Undoes the last [`Sampler::plan`]'s draw.
    pub fn unplan(&mut self) {
        if let Some(rng) = self.planned_from.take() {
            self.rng = rng;
        }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits`, given every token of the sequence so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Sampled {
        self.sample_from(logits, logits.to_vec(), history)
    }

    /// Picks the next token from `allowed` — the logits with every forbidden token at −∞
    /// (a grammar's mask) — while the reported log-probabilities stay those of the
    /// model's own `logits`.
    pub fn sample_from(&mut self, logits: &[f32], allowed: Vec<f32>, history: &[u32]) -> Sampled {
        let pick = self.next_pick();
        let seen = (pick.repetition_penalty != 1.0).then(|| {
            let mut seen = vec![0u32; logits.len().div_ceil(32)];
            set_bits(&mut seen, history);
            seen
        });
        pick.sample_masked(logits, allowed, seen.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOGITS: [f32; 5] = [1.0, 3.0, 2.5, -1.0, 0.0];

    #[test]
    fn greedy_and_top_k_1_pick_the_best() {
        let mut s = Sampler::new(SamplingParams {
            top_logprobs: 2,
            ..Default::default()
        });
        let out = s.sample(&LOGITS, &[]);
        assert_eq!(out.token, 1);
        assert_eq!(out.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((out.logprob - log_softmax(&LOGITS)[1]).abs() < 1e-6);
        let mut s = Sampler::new(SamplingParams {
            temperature: 5.0,
            top_k: 1,
            ..Default::default()
        });
        assert!((0..50).all(|_| s.sample(&LOGITS, &[]).token == 1));
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_follows_the_distribution() {
        let params = SamplingParams {
            temperature: 1.0,
            seed: 42,
            ..Default::default()
        };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..2000)
                .map(|_| s.sample(&LOGITS, &[]).token)
                .collect::<Vec<_>>()
        };
        let a = draw(&params);
        assert_eq!(a, draw(&params));
        assert_ne!(
            a,
            draw(&SamplingParams {
                seed: 43,
                ..params.clone()
            })
        );
        let p1 = (log_softmax(&LOGITS)[1] as f64).exp();
        let share = a.iter().filter(|t| **t == 1).count() as f64 / a.len() as f64;
        assert!((share - p1).abs() < 0.04, "{share} vs {p1}");
    }

    #[test]
    fn top_p_and_top_k_truncate() {
        // top_p 0.5: token 1 alone carries more than half of the probability.
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: 1,
            ..Default::default()
        });
        assert!((0..200).all(|_| s.sample(&LOGITS, &[]).token == 1));
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 2,
            seed: 1,
            ..Default::default()
        });
        assert!((0..500).all(|_| matches!(s.sample(&LOGITS, &[]).token, 1 | 2)));
    }

    #[test]
    fn repetition_penalty_discourages_what_was_said() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&LOGITS, &[1]).token, 2); // 3.0 / 2 = 1.5 < 2.5
        assert!(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
    }

    /// `unplan` puts a planned draw back (what `generate::step` does when the step fails),
    /// so the retried step draws what it would have.
    #[test]
    fn unplan_puts_the_draw_back() {
        let mut a = Sampler::new(SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..SamplingParams::default()
        });
        let first = a.plan();
        a.unplan();
        assert_eq!(a.plan(), first);
        let second = a.plan();
        assert_ne!(first.draw, second.draw);
    }
}
