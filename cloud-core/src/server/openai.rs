//! The OpenAI-compatible API: `POST /v1/completions`, `POST /v1/chat/completions` (both
//! streaming as server-sent events or not, with `logprobs`, stop strings, seeds and
//! `response_format` JSON schemas) and `GET /v1/models`.
//!
//! What the engine does not do is refused with a 400 that names the parameter (`n` > 1,
//! `echo`, presence and frequency penalties, tools), never silently ignored.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::AppState;
use crate::engine::chat::Message;
use crate::engine::constrain::Constraint;
use crate::engine::generate::{Finish, Request};
use crate::engine::sampler::{Sampled, SamplingParams};
use crate::engine::scheduler::{Event, SubmitError};
use crate::engine::service::Engine;
use crate::engine::tokenizer::TextStream;

/// An API error, in OpenAI's shape.
pub struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
}

impl ApiError {
    /// 400 about `param`.
    pub fn bad(param: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param),
        }
    }

    /// Any status.
    pub fn status(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            param: None,
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> ApiError {
        match e {
            SubmitError::Invalid(m) => ApiError::status(StatusCode::BAD_REQUEST, m),
            SubmitError::Busy(_) => {
                ApiError::status(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            SubmitError::Stopped => {
                ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status {
            StatusCode::BAD_REQUEST => "invalid_request_error",
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
            _ => "server_error",
        };
        let body = json!({"error": {
            "message": self.message, "type": kind, "param": self.param, "code": Value::Null,
        }});
        let mut r = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// A string or a list of strings (`stop`).
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A completion prompt: text, or token ids.
#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct JsonSchemaFormat {
    schema: Option<Value>,
}

#[derive(Deserialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
    json_schema: Option<JsonSchemaFormat>,
}

/// Parameters both endpoints share.
#[derive(Deserialize)]
struct Common {
    model: Option<String>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    repetition_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<OneOrMany>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<usize>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    response_format: Option<ResponseFormat>,
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    #[serde(default)]
    echo: bool,
    logprobs: Option<usize>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<usize>,
    tools: Option<Value>,
    #[serde(flatten)]
    common: Common,
}

/// A request ready for the engine, and how to answer.
struct Prepared {
    prompt: Vec<u32>,
    params: SamplingParams,
    constraint: Option<Constraint>,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
    logprobs: Option<usize>,
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad("body", format!("invalid request: {e}")))
}

fn prepare(
    engine: &Engine,
    c: Common,
    prompt: Vec<u32>,
    logprobs: Option<usize>,
) -> Result<Prepared, ApiError> {
    if let Some(m) = &c.model {
        if m != engine.name() {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "the model `{m}` does not exist (this server runs `{}`)",
                    engine.name()
                ),
                param: Some("model"),
            });
        }
    }
    if c.n.unwrap_or(1) != 1 {
        return Err(ApiError::bad("n", "only n = 1 is supported"));
    }
    if c.presence_penalty.unwrap_or(0.0) != 0.0 {
        return Err(ApiError::bad(
            "presence_penalty",
            "not supported (use repetition_penalty)",
        ));
    }
    if c.frequency_penalty.unwrap_or(0.0) != 0.0 {
        return Err(ApiError::bad(
            "frequency_penalty",
            "not supported (use repetition_penalty)",
        ));
    }
    if prompt.is_empty() {
        return Err(ApiError::bad("prompt", "the prompt is empty"));
    }
    let ctx = engine.handle().context();
    let room = ctx.saturating_sub(prompt.len());
    if room == 0 {
        return Err(ApiError::bad(
            "prompt",
            format!(
                "the prompt has {} tokens; the model's context is {ctx}",
                prompt.len()
            ),
        ));
    }
    let max_tokens = c
        .max_completion_tokens
        .or(c.max_tokens)
        .unwrap_or(room.min(4096));
    let stops = match c.stop {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    };
    if stops.len() > 4 {
        return Err(ApiError::bad("stop", "at most 4 stop strings"));
    }
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::bad(
                "top_k",
                format!("must be -1 or positive (got {k})"),
            ))
        }
    };
    let params = SamplingParams {
        temperature: c.temperature.unwrap_or(1.0),
        top_k,
        top_p: c.top_p.unwrap_or(1.0),
        repetition_penalty: c.repetition_penalty.unwrap_or(1.0),
        seed: c.seed.unwrap_or_else(rand::random),
        max_tokens,
        stop_tokens: engine.stop_tokens().to_vec(),
        top_logprobs: logprobs.unwrap_or(0),
    };
    params.validate().map_err(|e| {
        let param = e.split_whitespace().next().map_or("body", |p| match p {
            "temperature" => "temperature",
            "top_p" => "top_p",
            "repetition_penalty" => "repetition_penalty",
            "top_logprobs" => "logprobs",
            _ => "body",
        });
        ApiError::bad(param, e)
    })?;
    let constraint = match c.response_format {
        None => None,
        Some(f) => {
            let grammars = || {
                engine.grammars().ok_or_else(|| {
                    ApiError::bad("response_format", "this model has no end-of-sequence token, so structured output is unavailable")
                })
            };
            match f.kind.as_str() {
                "text" => None,
                "json_object" => Some(
                    grammars()?
                        .json_object()
                        .map_err(|e| ApiError::bad("response_format", e.to_string()))?,
                ),
                "json_schema" => {
                    let schema = f.json_schema.and_then(|j| j.schema).ok_or_else(|| {
                        ApiError::bad("response_format", "json_schema.schema is missing")
                    })?;
                    Some(
                        grammars()?
                            .json_schema(&schema)
                            .map_err(|e| ApiError::bad("response_format", e.to_string()))?,
                    )
                }
                other => {
                    return Err(ApiError::bad(
                        "response_format",
                        format!("unknown type {other:?} (text, json_object, json_schema)"),
                    ))
                }
            }
        }
    };
    Ok(Prepared {
        prompt,
        params,
        constraint,
        stops,
        stream: c.stream,
        include_usage: c.stream_options.is_some_and(|o| o.include_usage),
        logprobs,
    })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}-{:016x}{:08x}",
        rand::random::<u64>(),
        rand::random::<u32>()
    )
}

/// `POST /v1/completions`.
pub async fn completions(State(st): State<AppState>, body: axum::body::Bytes) -> Response {
    match completions_inner(st, &body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn completions_inner(st: AppState, body: &[u8]) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_json(body)?;
    if req.echo {
        return Err(ApiError::bad("echo", "not supported"));
    }
    if req.logprobs.is_some_and(|n| n > 20) {
        return Err(ApiError::bad("logprobs", "at most 20"));
    }
    let engine = &st.engine;
    let ids = match req.prompt {
        Prompt::Text(t) => encode(engine, &t, true)?,
        Prompt::Texts(mut v) if v.len() == 1 => encode(engine, &v.remove(0), true)?,
        Prompt::Texts(_) => return Err(ApiError::bad("prompt", "exactly one prompt per request")),
        Prompt::Ids(ids) => ids,
    };
    let p = prepare(engine, req.common, ids, req.logprobs)?;
    run(st, p, Kind::Completion).await
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(State(st): State<AppState>, body: axum::body::Bytes) -> Response {
    match chat_inner(st, &body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(st: AppState, body: &[u8]) -> Result<Response, ApiError> {
    let req: ChatRequest = parse_json(body)?;
    if req.tools.is_some() {
        return Err(ApiError::bad("tools", "tool calls are not supported"));
    }
    if req.messages.is_empty() {
        return Err(ApiError::bad(
            "messages",
            "at least one message is required",
        ));
    }
    let engine = &st.engine;
    let template = engine.chat_template().ok_or_else(|| {
        ApiError::bad(
            "messages",
            "this model has no chat template; use /v1/completions",
        )
    })?;
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            "system" | "developer" | "user" | "assistant"
        ) {
            return Err(ApiError::bad(
                "messages",
                format!("messages[{i}].role {:?} is not supported", m.role),
            ));
        }
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::bad(
                                "messages",
                                format!("messages[{i}]: only text content parts are supported"),
                            ))
                        }
                    }
                }
                text
            }
        };
        let role = if m.role == "developer" {
            "system".into()
        } else {
            m.role
        };
        messages.push(Message { role, content });
    }
    let text = template
        .render(&messages, true)
        .map_err(|e| ApiError::bad("messages", e.to_string()))?;
    let ids = encode(engine, &text, false)?;
    let logprobs = if req.logprobs {
        Some(req.top_logprobs.unwrap_or(0))
    } else if req.top_logprobs.is_some() {
        return Err(ApiError::bad("top_logprobs", "needs logprobs: true"));
    } else {
        None
    };
    let p = prepare(engine, req.common, ids, logprobs)?;
    run(st, p, Kind::Chat).await
}

fn encode(engine: &Engine, text: &str, special: bool) -> Result<Vec<u32>, ApiError> {
    let tok = engine.tokenizer();
    let r = if special {
        tok.encode(text)
    } else {
        tok.encode_raw(text)
    };
    r.map_err(|e| ApiError::bad("prompt", e.to_string()))
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

/// One generated token as the API reports it.
struct Reported {
    text: String,
    sampled: Sampled,
}

async fn run(st: AppState, p: Prepared, kind: Kind) -> Result<Response, ApiError> {
    let engine = st.engine.clone();
    let prompt_tokens = p.prompt.len();
    let rx = engine.handle().submit(Request {
        prompt: p.prompt,
        params: p.params,
        constraint: p.constraint,
    })?;
    let id = new_id(if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    });
    let created = now_secs();
    let text = TextStream::new(p.stops);
    if p.stream {
        let stream = stream_events(
            engine,
            rx,
            text,
            kind,
            id,
            created,
            prompt_tokens,
            p.include_usage,
            p.logprobs,
        );
        return Ok(Sse::new(stream).into_response());
    }
    let mut rx = rx;
    let mut text = text;
    let mut tokens = Vec::new();
    let mut finish = Finish::Length;
    let mut stopped = false;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token(s) => {
                let (_, hit) = text.push(engine.tokenizer(), s.token).map_err(|e| {
                    ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
                })?;
                tokens.push(Reported {
                    text: engine.piece(s.token).to_string(),
                    sampled: s,
                });
                if hit {
                    stopped = true;
                    break; // dropping rx cancels the sequence
                }
            }
            Event::Finished(f) => {
                finish = f;
                break;
            }
            Event::Failed(e) => return Err(ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, e)),
            Event::Refused(e) => return Err(ApiError::status(StatusCode::SERVICE_UNAVAILABLE, e)),
        }
    }
    if stopped {
        finish = Finish::Stop;
    } else {
        text.finish(engine.tokenizer());
    }
    let completion_tokens = tokens.len();
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    });
    let logprobs = p.logprobs.map(|_| logprobs_json(&engine, kind, &tokens));
    let body = match kind {
        Kind::Completion => json!({
            "id": id, "object": "text_completion", "created": created, "model": engine.name(),
            "choices": [{"index": 0, "text": text.text(), "logprobs": logprobs, "finish_reason": finish.as_str()}],
            "usage": usage,
        }),
        Kind::Chat => json!({
            "id": id, "object": "chat.completion", "created": created, "model": engine.name(),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text.text()},
                         "logprobs": logprobs, "finish_reason": finish.as_str()}],
            "usage": usage,
        }),
    };
    Ok(Json(body).into_response())
}

fn logprobs_json(engine: &Engine, kind: Kind, tokens: &[Reported]) -> Value {
    match kind {
        Kind::Completion => {
            let mut offset = 0usize;
            let mut offsets = Vec::with_capacity(tokens.len());
            for t in tokens {
                offsets.push(offset);
                offset += t.text.len();
            }
            json!({
                "tokens": tokens.iter().map(|t| t.text.as_str()).collect::<Vec<_>>(),
                "token_logprobs": tokens.iter().map(|t| t.sampled.logprob).collect::<Vec<_>>(),
                "top_logprobs": tokens.iter().map(|t| {
                    let m: serde_json::Map<String, Value> = t.sampled.top.iter()
                        .map(|(id, lp)| (engine.piece(*id).to_string(), json!(lp))).collect();
                    Value::Object(m)
                }).collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
        Kind::Chat => json!({
            "content": tokens.iter().map(|t| json!({
                "token": t.text,
                "logprob": t.sampled.logprob,
                "bytes": t.text.as_bytes(),
                "top_logprobs": t.sampled.top.iter().map(|(id, lp)| {
                    let piece = engine.piece(*id);
                    json!({"token": piece, "logprob": lp, "bytes": piece.as_bytes()})
                }).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        }),
    }
}

#[allow(clippy::too_many_arguments)]
fn stream_events(
    engine: Engine,
    rx: UnboundedReceiver<Event>,
    text: TextStream,
    kind: Kind,
    id: String,
    created: u64,
    prompt_tokens: usize,
    include_usage: bool,
    logprobs: Option<usize>,
) -> impl futures_util::Stream<Item = Result<SseEvent, Infallible>> {
    struct S {
        engine: Engine,
        rx: Option<UnboundedReceiver<Event>>,
        text: TextStream,
        kind: Kind,
        id: String,
        created: u64,
        prompt_tokens: usize,
        completion_tokens: usize,
        include_usage: bool,
        logprobs: bool,
        started: bool,
        tail: Vec<Value>,
        done: bool,
    }
    impl S {
        fn chunk(&self, delta: &str, finish: Option<Finish>, lp: Option<Value>) -> Value {
            let choice = match self.kind {
                Kind::Completion => json!({"index": 0, "text": delta, "logprobs": lp,
                                           "finish_reason": finish.map(|f| f.as_str())}),
                Kind::Chat => {
                    let mut d = json!({"content": delta});
                    if !self.started {
                        d["role"] = json!("assistant");
                    }
                    json!({"index": 0, "delta": d, "logprobs": lp,
                           "finish_reason": finish.map(|f| f.as_str())})
                }
            };
            let object = match self.kind {
                Kind::Completion => "text_completion",
                Kind::Chat => "chat.completion.chunk",
            };
            let mut c = json!({"id": self.id, "object": object, "created": self.created,
                               "model": self.engine.name(), "choices": [choice]});
            if self.include_usage {
                c["usage"] = Value::Null;
            }
            c
        }
        fn end(&mut self, finish: Finish) {
            let rest = self.text.finish(self.engine.tokenizer());
            let last = self.chunk(&rest, Some(finish), None);
            self.tail.push(last);
            if self.include_usage {
                let mut u = self.chunk("", None, None);
                u["choices"] = json!([]);
                u["usage"] = json!({
                    "prompt_tokens": self.prompt_tokens,
                    "completion_tokens": self.completion_tokens,
                    "total_tokens": self.prompt_tokens + self.completion_tokens,
                });
                self.tail.push(u);
            }
            self.rx = None;
        }
    }
    let state = S {
        engine,
        rx: Some(rx),
        text,
        kind,
        id,
        created,
        prompt_tokens,
        completion_tokens: 0,
        include_usage,
        logprobs: logprobs.is_some(),
        started: false,
        tail: Vec::new(),
        done: false,
    };
    futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if !s.tail.is_empty() {
                let c = s.tail.remove(0);
                return Some((Ok(SseEvent::default().data(c.to_string())), s));
            }
            if s.done {
                return None;
            }
            let Some(rx) = s.rx.as_mut() else {
                s.done = true;
                return Some((Ok(SseEvent::default().data("[DONE]")), s));
            };
            match rx.recv().await {
                Some(Event::Token(t)) => {
                    s.completion_tokens += 1;
                    let (delta, hit) = match s.text.push(s.engine.tokenizer(), t.token) {
                        Ok(x) => x,
                        Err(e) => {
                            let err = json!({"error": {"message": e.to_string(), "type": "server_error"}});
                            s.tail.push(err);
                            s.rx = None;
                            continue;
                        }
                    };
                    let lp = s.logprobs.then(|| {
                        let r = Reported {
                            text: s.engine.piece(t.token).to_string(),
                            sampled: t,
                        };
                        logprobs_json(&s.engine, s.kind, std::slice::from_ref(&r))
                    });
                    let c = s.chunk(&delta, None, lp);
                    s.started = true;
                    s.tail.push(c);
                    if hit {
                        s.end(Finish::Stop);
                    }
                }
                Some(Event::Finished(f)) => s.end(f),
                Some(Event::Failed(e)) => {
                    s.tail
                        .push(json!({"error": {"message": e, "type": "server_error"}}));
                    s.rx = None;
                }
                Some(Event::Refused(e)) => {
                    s.tail
                        .push(json!({"error": {"message": e, "type": "overloaded_error"}}));
                    s.rx = None;
                }
                None => {
                    s.tail.push(
                        json!({"error": {"message": "the engine stopped", "type": "server_error"}}),
                    );
                    s.rx = None;
                }
            }
        }
    })
}
