//! Continuous batching: one engine thread owns the model and steps every running
//! sequence together; requests join at the next step and leave the moment they finish,
//! so a long answer never holds up a short one and a new prompt never waits for a batch
//! to drain.
//!
//! Admission is bounded: at most `max_batch` sequences run at once, a step takes in at
//! most `max_prefill_tokens` of new prompts (a long prompt still gets in alone), and at
//! most `max_queue` requests wait — beyond that [`Handle::submit`] answers
//! [`SubmitError::Busy`] at once. A request whose receiver is dropped (the client went
//! away) is cancelled at the next step.
//!
//! Prefix cache: the caches of the last few prompts are kept; a new prompt that shares at
//! least `min_prefix` leading tokens with one of them (the verdict prompt's fixed
//! instructions, a chat's system prompt) starts from a copy of that cache and runs only
//! the rest of its prompt.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::backend::{Backend, DeviceError, DeviceMemory, GraphStats, KvCacheUsage};
use super::generate::{step, Finish, Request, Sequence, Step};
use super::model::{Cache, EngineError, Model};
use super::sampler::Sampled;

/// Limits of the scheduler.
#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// Most requests waiting to start.
    pub max_queue: usize,
    /// Most prompt tokens taken into one step.
    pub max_prefill_tokens: usize,
    /// Prompts whose caches are kept for reuse (0: no prefix cache).
    pub prefix_cache_entries: usize,
    /// Shortest shared prefix worth reusing, in tokens.
    pub min_prefix: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_batch: 16,
            max_queue: 256,
            max_prefill_tokens: 2048,
            prefix_cache_entries: 8,
            min_prefix: 32,
        }
    }
}

/// What a request's receiver gets, in order: tokens, then exactly one end.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The next token.
    Token(Sampled),
    /// The request is complete.
    Finished(Finish),
    /// The request failed; nothing more follows.
    Failed(String),
    /// The request does not fit the KV cache beside the sequences running (the message
    /// says by how much); nothing more follows. It may fit once they finish.
    Refused(String),
}

/// Why a request was not taken.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The request itself is unusable (the message says why).
    #[error("{0}")]
    Invalid(String),
    /// The queue is full; try again later.
    #[error("the engine's queue is full ({0} requests waiting)")]
    Busy(usize),
    /// The engine thread has stopped.
    #[error("the engine has stopped")]
    Stopped,
}

/// Counters of the engine, for status pages.
#[derive(Debug, Default)]
pub struct Stats {
    /// Sequences being decoded.
    pub running: AtomicUsize,
    /// Requests waiting to start.
    pub waiting: AtomicUsize,
    /// Prompt tokens processed.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Requests completed (finished or failed).
    pub completed: AtomicU64,
    /// Batched steps run.
    pub steps: AtomicU64,
    /// Requests that started from a cached prompt prefix.
    pub prefix_hits: AtomicU64,
    /// Prompt tokens not run again thanks to the prefix cache.
    pub prefix_tokens_reused: AtomicU64,
    /// What the backend reports of itself: at start, then after steps (at most every
    /// [`PUBLISH_EVERY`] while sequences run, and whenever the batch empties).
    pub backend: std::sync::Mutex<BackendFigures>,
}

/// How often the backend's figures are read while sequences run: reading them (locks,
/// a driver call for the device's memory) is kept off most decode steps.
pub const PUBLISH_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// What a backend reports of itself ([`Stats::backend`]), each `None` where it has
/// nothing of the kind (the CPU backend: no device, no graphs; no paged cache before its
/// first row).
#[derive(Clone, Debug, Default)]
pub struct BackendFigures {
    /// What runs the model, as it runs now ([`Backend::describe`]).
    pub description: String,
    /// The paged KV cache's memory.
    pub kv_cache: Option<KvCacheUsage>,
    /// The device's memory.
    pub device_memory: Option<DeviceMemory>,
    /// How its steps ran.
    pub graphs: Option<GraphStats>,
}

impl Stats {
    /// [`Stats::backend`].
    pub fn backend(&self) -> BackendFigures {
        self.backend
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

struct Job {
    request: Request,
    events: UnboundedSender<Event>,
}

/// A handle to the engine thread; cheap to clone.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Job>,
    stats: Arc<Stats>,
    cfg: SchedulerConfig,
    vocab: usize,
    ctx: usize,
}

impl Handle {
    /// Queues a request; its events arrive on the returned receiver.
    pub fn submit(&self, request: Request) -> Result<UnboundedReceiver<Event>, SubmitError> {
        request
            .check(self.vocab, self.ctx)
            .map_err(|e| SubmitError::Invalid(e.to_string()))?;
        let waiting = self.stats.waiting.load(Ordering::Relaxed);
        if waiting >= self.cfg.max_queue {
            return Err(SubmitError::Busy(waiting));
        }
        let (events, rx) = unbounded_channel();
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        self.tx.send(Job { request, events }).map_err(|_| {
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            SubmitError::Stopped
        })?;
        Ok(rx)
    }

    /// The engine's counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The model's vocabulary size (logits per step).
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// The model's context length.
    pub fn context(&self) -> usize {
        self.ctx
    }

    /// The scheduler's limits.
    pub fn config(&self) -> SchedulerConfig {
        self.cfg
    }
}

/// Starts the engine thread with `model`. It runs until every [`Handle`] is dropped.
pub fn start<B>(model: Model<B>, cfg: SchedulerConfig) -> Handle
where
    B: Backend + Send + 'static,
    Model<B>: Send,
{
    let (tx, rx) = mpsc::channel();
    let stats = Arc::new(Stats::default());
    let handle = Handle {
        tx,
        stats: stats.clone(),
        cfg: SchedulerConfig {
            max_batch: cfg.max_batch.max(1),
            ..cfg
        },
        vocab: model.config().vocab_size,
        ctx: model.config().max_position_embeddings,
    };
    let cfg = handle.cfg;
    // Before the thread starts: the status names the backend from the first.
    publish_backend(model.backend(), &stats);
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || run(model, cfg, rx, stats))
        .map(|_| ())
        .unwrap_or_else(|e| tracing::error!("cannot start the engine thread: {e}"));
    handle
}

/// The caches of recent prompts.
struct PrefixCache<B: Backend> {
    entries: Vec<(Vec<u32>, Cache<B>, u64)>,
    capacity: usize,
    min: usize,
    clock: u64,
}

impl<B: Backend> PrefixCache<B> {
    /// The longest cached prefix of `prompt` worth reusing: (entry, length), leaving at
    /// least one prompt token to run.
    fn lookup(&mut self, prompt: &[u32]) -> Option<(usize, usize)> {
        let best = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, (t, _, _))| (i, t.iter().zip(prompt).take_while(|(a, b)| a == b).count()))
            .max_by_key(|(_, n)| *n)?;
        let n = best.1.min(prompt.len().saturating_sub(1));
        if n < self.min.max(1) {
            return None;
        }
        self.clock += 1;
        self.entries[best.0].2 = self.clock;
        Some((best.0, n))
    }

    /// Drops the least recently used entry (its cache blocks go back to the device).
    fn evict_oldest(&mut self) {
        if let Some(oldest) = self
            .entries
            .iter()
            .enumerate()
            .min_by_key(|(_, e)| e.2)
            .map(|(i, _)| i)
        {
            self.entries.swap_remove(oldest);
        }
    }

    fn insert(&mut self, tokens: Vec<u32>, cache: Cache<B>) {
        if self.capacity == 0 || tokens.len() < self.min.max(1) {
            return;
        }
        self.clock += 1;
        if let Some(e) = self.entries.iter_mut().find(|e| e.0 == tokens) {
            e.2 = self.clock;
            return;
        }
        if self.entries.len() >= self.capacity {
            self.evict_oldest();
        }
        self.entries.push((tokens, cache, self.clock));
    }
}

struct Active<B: Backend> {
    seq: Sequence<B>,
    events: UnboundedSender<Event>,
    /// Prompt length, until its prefill has run (then its cache is offered to the
    /// prefix cache).
    prefill: Option<usize>,
}

fn run<B: Backend>(
    model: Model<B>,
    cfg: SchedulerConfig,
    rx: mpsc::Receiver<Job>,
    stats: Arc<Stats>,
) {
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut active: Vec<Active<B>> = Vec::new();
    let mut prefixes = PrefixCache::<B> {
        entries: Vec::new(),
        capacity: cfg.prefix_cache_entries,
        min: cfg.min_prefix,
        clock: 0,
    };
    // Counted before the request hears it ended, so that a status read after an answer
    // includes it.
    let mut published = Instant::now();
    let finish = |stats: &Stats, outcome: &str| {
        stats.completed.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("engine_requests_total", "outcome" => outcome.to_string()).increment(1);
    };
    loop {
        if active.is_empty() && waiting.is_empty() {
            match rx.recv() {
                Ok(job) => waiting.push_back(job),
                Err(_) => return,
            }
        }
        while let Ok(job) = rx.try_recv() {
            waiting.push_back(job);
        }
        // Admit waiting requests while there is room in the batch and the step's prompt
        // budget (the first one always gets in, however long its prompt).
        let mut prefill = 0;
        while active.len() < cfg.max_batch {
            let Some(job) = waiting.front() else { break };
            let len = job.request.prompt.len();
            if prefill > 0 && prefill + len > cfg.max_prefill_tokens {
                break;
            }
            let Some(job) = waiting.pop_front() else {
                break;
            };
            stats.waiting.fetch_sub(1, Ordering::Relaxed);
            if job.events.is_closed() {
                finish(&stats, "cancelled");
                continue;
            }
            let mcfg = model.config();
            let usable = job
                .request
                .check(mcfg.vocab_size, mcfg.max_position_embeddings)
                .is_ok();
            let started = match prefixes.lookup(&job.request.prompt) {
                Some((entry, n)) if usable => {
                    let cache = model.cache_prefix(&prefixes.entries[entry].1, n);
                    stats.prefix_hits.fetch_add(1, Ordering::Relaxed);
                    stats
                        .prefix_tokens_reused
                        .fetch_add(n as u64, Ordering::Relaxed);
                    metrics::counter!("engine_prefix_cache_reused_tokens_total")
                        .increment(n as u64);
                    Sequence::with_prefix(&model, job.request, cache)
                }
                _ => Sequence::new(&model, job.request),
            };
            match started {
                Ok(seq) => {
                    prefill += seq.pending();
                    stats.prompt_tokens.fetch_add(len as u64, Ordering::Relaxed);
                    metrics::counter!("engine_prompt_tokens_total").increment(len as u64);
                    if seq.finished().is_some() {
                        finish(&stats, "length");
                        let _ = job.events.send(Event::Finished(Finish::Length));
                    } else {
                        active.push(Active {
                            seq,
                            events: job.events,
                            prefill: Some(len),
                        });
                    }
                }
                Err(e) => {
                    finish(&stats, "failed");
                    let _ = job.events.send(Event::Failed(e.to_string()));
                }
            }
        }
        // Cancel sequences nobody listens to any more.
        active.retain(|a| {
            let open = !a.events.is_closed();
            if !open {
                finish(&stats, "cancelled");
            }
            open
        });
        stats.running.store(active.len(), Ordering::Relaxed);
        metrics::gauge!("engine_running").set(active.len() as f64);
        metrics::gauge!("engine_waiting").set(waiting.len() as f64);
        if active.is_empty() {
            continue;
        }
        let started = Instant::now();
        let mut refs: Vec<&mut Sequence<B>> = active.iter_mut().map(|a| &mut a.seq).collect();
        let results = step(&model, &mut refs);
        metrics::histogram!("engine_step_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("engine_batch_size").record(active.len() as f64);
        stats.steps.fetch_add(1, Ordering::Relaxed);
        match results {
            // The step's sequences do not all fit the device's KV cache (nothing advanced,
            // every cache as before): free what cached prompts hold, else refuse the
            // newest request, and run the step again with the rest.
            Err(EngineError::Device(DeviceError::CacheFull(full))) if !active.is_empty() => {
                if !prefixes.entries.is_empty() {
                    prefixes.evict_oldest();
                    metrics::counter!("engine_prefix_cache_evictions_total").increment(1);
                    continue;
                }
                if let Some(a) = active.pop() {
                    let msg = format!(
                        "refused: the request does not fit the KV cache beside the {} \
                         running ({full})",
                        active.len()
                    );
                    tracing::warn!("{msg}");
                    finish(&stats, "refused");
                    let _ = a.events.send(Event::Refused(msg));
                }
            }
            Err(e) => {
                let msg = format!("engine step failed: {e}");
                tracing::error!("{msg}");
                for a in active.drain(..) {
                    finish(&stats, "failed");
                    let _ = a.events.send(Event::Failed(msg.clone()));
                }
            }
            Ok(results) => {
                let mut done = vec![false; active.len()];
                for a in active.iter_mut() {
                    // The prompt has run: its cache may serve later prompts.
                    if let Some(len) = a.prefill.take() {
                        if len >= cfg.min_prefix && cfg.prefix_cache_entries > 0 {
                            let tokens = a.seq.tokens()[..len].to_vec();
                            prefixes.insert(tokens, model.cache_prefix(a.seq.cache(), len));
                        }
                    }
                }
                for (i, r) in results.into_iter().enumerate() {
                    let events = &active[i].events;
                    match r {
                        Ok(Step::Token(s, end)) => {
                            stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
                            metrics::counter!("engine_generated_tokens_total").increment(1);
                            let _ = events.send(Event::Token(s));
                            if let Some(f) = end {
                                finish(&stats, f.as_str());
                                let _ = events.send(Event::Finished(f));
                                done[i] = true;
                            }
                        }
                        Ok(Step::Done(f)) => {
                            finish(&stats, f.as_str());
                            let _ = events.send(Event::Finished(f));
                            done[i] = true;
                        }
                        Err(e) => {
                            finish(&stats, "failed");
                            let _ = events.send(Event::Failed(e.to_string()));
                            done[i] = true;
                        }
                    }
                }
                let mut i = 0;
                active.retain(|_| {
                    i += 1;
                    !done[i - 1]
                });
            }
        }
        stats.running.store(active.len(), Ordering::Relaxed);
        if active.is_empty() || published.elapsed() >= PUBLISH_EVERY {
            publish_backend(model.backend(), &stats);
            published = Instant::now();
        }
    }
}

/// The backend's figures after a step, into `stats` and the metrics.
fn publish_backend<B: Backend>(be: &B, stats: &Stats) {
    let figures = BackendFigures {
        description: be.describe(),
        kv_cache: be.kv_cache(),
        device_memory: be.device_memory(),
        graphs: be.graph_stats(),
    };
    if let Some(kv) = figures.kv_cache {
        metrics::gauge!("engine_kv_cache_held_bytes").set(kv.held_bytes as f64);
        metrics::gauge!("engine_kv_cache_allocated_bytes").set(kv.allocated_bytes as f64);
        metrics::gauge!("engine_kv_cache_allocations").set(kv.allocations as f64);
        metrics::gauge!("engine_kv_cache_limit_bytes").set(kv.limit_bytes as f64);
    }
    if let Some(mem) = figures.device_memory {
        metrics::gauge!("engine_device_memory_free_bytes").set(mem.free_bytes as f64);
        metrics::gauge!("engine_device_memory_total_bytes").set(mem.total_bytes as f64);
    }
    if let Some(g) = figures.graphs {
        for (how, n) in g.counts() {
            metrics::counter!("engine_steps_total", "how" => how).absolute(n);
        }
    }
    *stats
        .backend
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = figures;
}

/// Waits for all events of a request: the tokens and how it ended.
pub async fn collect(
    mut rx: UnboundedReceiver<Event>,
) -> Result<(Vec<Sampled>, Finish), EngineError> {
    let mut steps = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token(s) => steps.push(s),
            Event::Finished(f) => return Ok((steps, f)),
            Event::Failed(e) => return Err(EngineError::Request(e)),
            Event::Refused(e) => return Err(EngineError::Refused(e)),
        }
    }
    Err(EngineError::Request("the engine stopped".into()))
}
