//! The HTTP server end to end on loopback: the OpenAI-compatible API (plain and
//! streamed, log-probs, stop strings, JSON schemas, concurrent requests batched together),
//! verdicts, authentication and errors — on the V3 fixture's random weights.

mod common;

use std::net::SocketAddr;
use std::path::Path;

use cloud_core::engine::backend::cpu::Cpu;
use cloud_core::engine::generate::{generate, Request};
use cloud_core::engine::model::Model;
use cloud_core::engine::sampler::SamplingParams;
use cloud_core::engine::scheduler::SchedulerConfig;
use cloud_core::engine::service::{CpuSettings, Device, Engine};
use cloud_core::server::{serve, AppState};
use cloud_core::verdict::VerdictService;
use serde_json::{json, Value};

const TOKEN: &str = "test-token-0123456789";

struct Server {
    addr: SocketAddr,
    client: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Server {
    async fn start(dir: &Path) -> Server {
        Server::start_on(dir, Device::Cpu(CpuSettings::default())).await
    }

    async fn start_on(dir: &Path, device: Device) -> Server {
        let engine =
            Engine::load(dir, "fixture-v3", SchedulerConfig::default(), device).expect("engine");
        let verdicts = VerdictService::new(engine.clone()).expect("verdicts");
        let state = AppState::new(engine, verdicts, TOKEN, None);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, state, async move {
            let _ = stopped.await;
        }));
        Server {
            addr,
            client: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(120))
                .build()
                .expect("client"),
            _stop: stop,
        }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, String) {
        let r = self
            .client
            .post(format!("http://{}{path}", self.addr))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("request");
        (r.status().as_u16(), r.text().await.expect("body"))
    }

    async fn post_json(&self, path: &str, body: Value) -> Value {
        let (status, text) = self.post(path, body).await;
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).expect("JSON")
    }

    /// The engine's status once it shows the KV cache (the backend's figures are
    /// published after the step that empties the batch, which may come after the last
    /// answer).
    async fn engine_status(&self) -> Value {
        for _ in 0..100 {
            let status: Value = serde_json::from_str(
                &self
                    .client
                    .get(format!("http://{}/api/v1/engine", self.addr))
                    .bearer_auth(TOKEN)
                    .send()
                    .await
                    .expect("status")
                    .text()
                    .await
                    .expect("body"),
            )
            .expect("json");
            if !status["kv_cache"].is_null() && status["running"] == 0 {
                return status;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("the engine's status never showed its KV cache");
    }

    /// Posts a streaming request; returns the parsed `data:` events (without `[DONE]`)
    /// and whether `[DONE]` ended the stream.
    async fn post_stream(&self, path: &str, body: Value) -> (Vec<Value>, bool) {
        let (status, text) = self.post(path, body).await;
        assert_eq!(status, 200, "{text}");
        let mut events = Vec::new();
        let mut done = false;
        for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
            let data = block
                .lines()
                .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
                .collect::<Vec<_>>()
                .join("\n");
            assert!(!done, "nothing after [DONE]");
            if data == "[DONE]" {
                done = true;
            } else {
                events.push(serde_json::from_str(&data).expect("event JSON"));
            }
        }
        (events, done)
    }
}

fn checkpoint() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    common::write_fixture_checkpoint(dir.path());
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_plain_streamed_and_the_library_agree() {
    let dir = checkpoint();
    let srv = Server::start(dir.path()).await;
    let req = json!({"model": "fixture-v3", "prompt": "Pump 3 vibrates", "max_tokens": 12,
                     "temperature": 0, "logprobs": 3});
    let plain = srv.post_json("/v1/completions", req.clone()).await;
    let choice = &plain["choices"][0];
    assert_eq!(plain["object"], "text_completion");
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(plain["usage"]["completion_tokens"], 12);
    assert_eq!(plain["usage"]["prompt_tokens"], "Pump 3 vibrates".len());
    let lp = &choice["logprobs"];
    assert_eq!(lp["tokens"].as_array().map(Vec::len), Some(12));
    assert_eq!(lp["token_logprobs"].as_array().map(Vec::len), Some(12));
    assert!(lp["top_logprobs"]
        .as_array()
        .expect("top")
        .iter()
        .all(|m| m.as_object().is_some_and(|m| (1..=3).contains(&m.len()))));

    // The same tokens as the library's greedy generation on the same weights.
    let model = Model::load(dir.path(), Cpu::default()).expect("model");
    let ids: Vec<u32> = "Pump 3 vibrates".bytes().map(u32::from).collect();
    let out = generate(
        &model,
        vec![Request::new(
            ids,
            SamplingParams {
                max_tokens: 12,
                stop_tokens: vec![255],
                ..Default::default()
            },
        )],
    )
    .expect("generate")
    .remove(0);
    let lib_text =
        String::from_utf8_lossy(&out.tokens.iter().map(|t| *t as u8).collect::<Vec<_>>())
            .into_owned();
    assert_eq!(choice["text"], lib_text.as_str());
    for (a, b) in lp["token_logprobs"]
        .as_array()
        .expect("lp")
        .iter()
        .zip(&out.steps)
    {
        assert!((a.as_f64().expect("f") - f64::from(b.logprob)).abs() < 1e-5);
    }

    // Streamed: the deltas add up to the same text, then one finish, usage and [DONE].
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let (events, done) = srv.post_stream("/v1/completions", sreq).await;
    assert!(done);
    let text: String = events
        .iter()
        .filter_map(|e| e["choices"].get(0).and_then(|c| c["text"].as_str()))
        .collect();
    assert_eq!(text, lib_text);
    let finishes: Vec<&Value> = events
        .iter()
        .filter_map(|e| e["choices"].get(0).map(|c| &c["finish_reason"]))
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, vec![&json!("length")]);
    let usage = events.last().expect("usage chunk");
    assert_eq!(usage["usage"]["completion_tokens"], 12);

    // A stop string ends the text before it, with finish_reason "stop".
    let chars: Vec<char> = lib_text.chars().collect();
    if chars.len() >= 6 {
        let stop: String = chars[3..5].iter().collect();
        let expect = &lib_text[..lib_text.find(&stop).expect("present")];
        for stream in [false, true] {
            let mut r = req.clone();
            r["stop"] = json!([stop]);
            r["stream"] = json!(stream);
            let (text, finish) = if stream {
                let (ev, _) = srv.post_stream("/v1/completions", r).await;
                let text: String = ev
                    .iter()
                    .filter_map(|e| e["choices"][0]["text"].as_str())
                    .collect();
                let finish = ev
                    .iter()
                    .rev()
                    .find_map(|e| e["choices"][0]["finish_reason"].as_str())
                    .map(str::to_string);
                (text, finish)
            } else {
                let v = srv.post_json("/v1/completions", r).await;
                (
                    v["choices"][0]["text"].as_str().expect("text").to_string(),
                    v["choices"][0]["finish_reason"]
                        .as_str()
                        .map(str::to_string),
                )
            };
            assert_eq!(text, expect, "stream {stream}");
            assert_eq!(finish.as_deref(), Some("stop"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_batched_and_answer_as_alone() {
    let dir = checkpoint();
    let srv = Server::start(dir.path()).await;
    let req = |i: u64| {
        json!({"prompt": format!("machine {i} reports"), "max_tokens": 6 + i as usize,
               "temperature": 0.9, "seed": i})
    };
    let mut alone = Vec::new();
    for i in 0..6 {
        alone.push(srv.post_json("/v1/completions", req(i)).await["choices"][0]["text"].clone());
    }
    let together =
        futures_util::future::join_all((0..6).map(|i| srv.post_json("/v1/completions", req(i))))
            .await;
    for (i, v) in together.iter().enumerate() {
        assert_eq!(v["choices"][0]["text"], alone[i], "request {i}");
    }
    let status = srv.engine_status().await;
    assert_eq!(status["completed_requests"], 12);
    // The CPU backend, holding the checkpoint's matrices as stored, and its paged cache
    // within its budget (half the host's available memory).
    assert!(
        status["backend"]
            .as_str()
            .is_some_and(|b| b.starts_with("cpu (")
                && b.contains(" threads, ")
                && b.ends_with(", matrices as stored)")),
        "{status}"
    );
    let kv = &status["kv_cache"];
    let bytes = |k: &str| kv[k].as_u64().unwrap_or_else(|| panic!("{k}: {status}"));
    assert!(
        bytes("held_bytes") <= bytes("allocated_bytes")
            && 0 < bytes("allocated_bytes")
            && bytes("allocated_bytes") <= bytes("limit_bytes"),
        "{status}"
    );
    assert!(status["device_memory"].is_null(), "{status}");
    assert!(status["graphs"].is_null(), "{status}");
    // Twelve requests of 6..=11 tokens, but batching took fewer steps than tokens.
    assert!(
        status["steps"].as_u64().expect("steps")
            < status["generated_tokens"].as_u64().expect("tokens")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_prompt_prefix_is_run_once_and_changes_nothing() {
    let dir = checkpoint();
    let srv = Server::start(dir.path()).await;
    let header = "You are the diagnosis model of a factory. Readings of one machine follow. ";
    let model = Model::load(dir.path(), Cpu::default()).expect("model");
    for (i, tail) in ["pump-01 hot", "lathe-02 loud", "fan-03 fine"]
        .iter()
        .enumerate()
    {
        let prompt = format!("{header}{tail}");
        let v = srv
            .post_json(
                "/v1/completions",
                json!({"prompt": prompt, "max_tokens": 8, "temperature": 0}),
            )
            .await;
        // The library, with no prefix cache, gives the same tokens.
        let ids: Vec<u32> = prompt.bytes().map(u32::from).collect();
        let out = generate(
            &model,
            vec![Request::new(
                ids,
                SamplingParams {
                    max_tokens: 8,
                    stop_tokens: vec![255],
                    ..Default::default()
                },
            )],
        )
        .expect("generate")
        .remove(0);
        let text =
            String::from_utf8_lossy(&out.tokens.iter().map(|t| *t as u8).collect::<Vec<_>>())
                .into_owned();
        assert_eq!(v["choices"][0]["text"], text.as_str(), "prompt {i}");
    }
    let status = srv.engine_status().await;
    assert_eq!(status["prefix_cache_hits"], 2, "{status}");
    assert!(
        status["prefix_tokens_reused"].as_u64().expect("n") >= 2 * header.len() as u64,
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_with_a_json_schema_and_verdicts_parse() {
    let dir = checkpoint();
    let srv = Server::start(dir.path()).await;
    let schema = json!({"type": "object", "properties": {
        "machine": {"type": "string", "maxLength": 12},
        "ok": {"type": "boolean"}}, "required": ["machine", "ok"], "additionalProperties": false});
    for stream in [false, true] {
        let body = json!({"messages": [{"role": "system", "content": "Answer in JSON."},
                                       {"role": "user", "content": "Is pump 3 ok?"}],
                          "temperature": 1.0, "seed": 5, "max_tokens": 200, "stream": stream,
                          "logprobs": true, "top_logprobs": 2,
                          "response_format": {"type": "json_schema",
                                              "json_schema": {"name": "status", "schema": schema}}});
        let content = if stream {
            let (ev, done) = srv.post_stream("/v1/chat/completions", body).await;
            assert!(done);
            assert_eq!(ev[0]["choices"][0]["delta"]["role"], "assistant");
            assert!(ev.iter().all(|e| e["object"] == "chat.completion.chunk"));
            ev.iter()
                .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
                .collect::<String>()
        } else {
            let v = srv.post_json("/v1/chat/completions", body).await;
            assert_eq!(v["object"], "chat.completion");
            assert_eq!(v["choices"][0]["finish_reason"], "stop");
            let lp = v["choices"][0]["logprobs"]["content"]
                .as_array()
                .expect("logprobs");
            assert_eq!(
                lp.len(),
                v["usage"]["completion_tokens"].as_u64().expect("n") as usize
            );
            assert!(lp
                .iter()
                .all(|t| t["top_logprobs"].as_array().map(Vec::len) == Some(2)));
            v["choices"][0]["message"]["content"]
                .as_str()
                .expect("content")
                .to_string()
        };
        let parsed: Value =
            serde_json::from_str(&content).unwrap_or_else(|e| panic!("{e}: {content}"));
        assert!(
            parsed["ok"].is_boolean() && parsed["machine"].is_string(),
            "{content}"
        );
    }

    // A verdict for a case, decoded against the verdict schema: it always parses.
    let mut sim = shared::sim::Simulator::new(shared::sim::SimConfig {
        machines: 1,
        ..Default::default()
    });
    let records: Vec<Value> = (0..16)
        .map(|_| sim.tick()[0].to_record().to_json())
        .collect();
    let case = json!({"records": records, "probs": {"normal": 0.55, "overheating": 0.45}});
    let v = srv.post_json("/api/v1/verdicts", case).await;
    let class = v["verdict"]["class"].as_str().expect("class");
    assert!(shared::schema::CLASSES.contains(&class), "{v}");
    assert!(v["verdict"]["confidence"]
        .as_f64()
        .is_some_and(|c| (0.0..=1.0).contains(&c)));
    assert_eq!(v["case_id"].as_str().map(str::len), Some(32));
    let (status, body) = srv
        .post(
            "/api/v1/verdicts",
            json!({"records": [{"machine": "m"}], "probs": {}}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(body.contains("records[0].ts"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_what_is_wrong() {
    let dir = checkpoint();
    let srv = Server::start(dir.path()).await;
    let url = |p: &str| format!("http://{}{p}", srv.addr);
    // Authentication.
    let r = srv
        .client
        .post(url("/v1/completions"))
        .body("{}")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 401);
    let r = srv
        .client
        .get(url("/v1/models"))
        .bearer_auth("wrong-token-0123456789")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 401);
    let r = srv.client.get(url("/healthz")).send().await.expect("send");
    assert_eq!(r.status().as_u16(), 200);
    let models: Value = serde_json::from_str(
        &srv.client
            .get(url("/v1/models"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("send")
            .text()
            .await
            .expect("body"),
    )
    .expect("json");
    assert_eq!(models["data"][0]["id"], "fixture-v3");
    // Bad requests: status and the parameter named.
    let cases = [
        (json!({"prompt": "x", "n": 2}), 400, "n"),
        (
            json!({"prompt": "x", "temperature": -1}),
            400,
            "temperature",
        ),
        (json!({"prompt": "x", "top_p": 0}), 400, "top_p"),
        (json!({"prompt": "x", "echo": true}), 400, "echo"),
        (
            json!({"prompt": "x", "presence_penalty": 0.5}),
            400,
            "presence_penalty",
        ),
        (json!({"prompt": "x", "max_tokens": 100000}), 400, "context"),
        (json!({"prompt": "", "max_tokens": 1}), 400, "prompt"),
        (json!({"prompt": "x", "model": "gpt-9"}), 404, "gpt-9"),
        (
            json!({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}}),
            400,
            "response_format",
        ),
        (
            json!({"prompt": "x", "response_format": {"type": "yaml"}}),
            400,
            "yaml",
        ),
        (json!({"prompt": 5}), 400, "invalid request"),
    ];
    for (body, status, needle) in cases {
        let (s, text) = srv.post("/v1/completions", body.clone()).await;
        assert_eq!(s, status, "{body}: {text}");
        let v: Value = serde_json::from_str(&text).expect("error JSON");
        assert!(text.contains(needle), "{body}: {text}");
        assert!(v["error"]["message"].is_string());
    }
    let (s, text) = srv
        .post("/v1/chat/completions", json!({"messages": []}))
        .await;
    assert_eq!(s, 400, "{text}");
    let (s, text) = srv
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "tools": []}),
        )
        .await;
    assert_eq!(s, 400);
    assert!(text.contains("tools"));
    let (s, _) = srv.post("/v1/completions", json!("not an object")).await;
    assert_eq!(s, 400);
}

/// A request that does not fit the KV cache's budget beside the others is refused with a
/// 503 that says so (the client may try again), streamed or not; the server goes on
/// serving what fits, and its status shows the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_beyond_the_kv_budget_is_refused_and_the_server_goes_on() {
    let dir = checkpoint();
    // 64 KiB: a few blocks of 16 positions of the fixture's latent cache, far from the
    // 900 positions of the long prompt.
    let device = Device::Cpu(CpuSettings {
        kv_cache_bytes: Some(64 << 10),
        ..CpuSettings::default()
    });
    let srv = Server::start_on(dir.path(), device).await;
    let long = "temperature 81.5 C; ".repeat(45);
    for stream in [false, true] {
        let req = json!({"model": "fixture-v3", "prompt": long, "max_tokens": 4,
                         "temperature": 0, "stream": stream});
        let (code, text) = srv.post("/v1/completions", req).await;
        if stream {
            assert_eq!(code, 200, "{text}");
            assert!(text.contains("overloaded_error"), "{text}");
        } else {
            assert_eq!(code, 503, "{text}");
            let body: Value = serde_json::from_str(&text).expect("JSON");
            assert_eq!(body["error"]["type"], "overloaded_error", "{text}");
        }
        assert!(text.contains("KV cache is full"), "{text}");
        let short = json!({"model": "fixture-v3", "prompt": "Pump 3 vibrates", "max_tokens": 4,
                           "temperature": 0});
        let done = srv.post_json("/v1/completions", short).await;
        assert_eq!(done["usage"]["completion_tokens"], 4);
    }
    let status = srv.engine_status().await;
    assert_eq!(status["kv_cache"]["limit_bytes"], 64 << 10, "{status}");
}
