//! Every class of bad input gets a clear 4xx naming the line and field, and a rejected
//! request stores nothing — against the running HTTP server.

use e2e::{record, Agent};

struct Case {
    name: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    line: Option<u64>,
    field: Option<&'static str>,
}

fn good(n: i64) -> String {
    record("press-01", 1_700_000_000_000 + n, &format!("g{n}"))
}

fn with(f: impl Fn(&mut serde_json::Value)) -> String {
    let mut v: serde_json::Value = serde_json::from_str(&good(99)).expect("json");
    f(&mut v);
    v.to_string()
}

#[test]
fn bad_input_is_refused_with_line_and_field_and_nothing_is_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        "[ingest]\nmax_body_bytes = 65536\nmax_line_bytes = 2048\nmax_records_per_request = 100\n",
    )
    .expect("config");
    let agent = Agent::start(
        &dir.path().join("store"),
        &["--config", cfg.to_str().expect("utf-8")],
    );
    let nd = Some("application/x-ndjson");
    let js = Some("application/json");
    let two_good_then = |bad: String| format!("{}\n{}\n{bad}\n", good(1), good(2)).into_bytes();
    let cases = vec![
        Case {
            name: "malformed JSON",
            content_type: nd,
            body: two_good_then("{\"machine\": \"x\",".into()),
            status: 400,
            line: Some(3),
            field: Some("record"),
        },
        Case {
            name: "not an object",
            content_type: nd,
            body: two_good_then("[1,2]".into()),
            status: 400,
            line: Some(3),
            field: Some("record"),
        },
        Case {
            name: "missing reading",
            content_type: nd,
            body: two_good_then(with(|v| {
                v["readings"].as_object_mut().expect("o").remove("pressure");
            })),
            status: 400,
            line: Some(3),
            field: Some("readings.pressure"),
        },
        Case {
            name: "non-finite reading (string NaN)",
            content_type: nd,
            body: two_good_then(with(|v| v["readings"]["temperature"] = "NaN".into())),
            status: 400,
            line: Some(3),
            field: Some("readings.temperature"),
        },
        Case {
            name: "non-finite reading (overflow)",
            content_type: nd,
            body: two_good_then(good(3).replace("\"current\":10.0", "\"current\":1e999")),
            status: 400,
            line: Some(3),
            field: Some("record"),
        },
        Case {
            name: "reading not a number",
            content_type: nd,
            body: two_good_then(with(|v| {
                v["readings"]["vibration"] = serde_json::json!(null)
            })),
            status: 400,
            line: Some(3),
            field: Some("readings.vibration"),
        },
        Case {
            name: "bad machine id",
            content_type: nd,
            body: two_good_then(with(|v| v["machine"] = "press 07/../x".into())),
            status: 400,
            line: Some(3),
            field: Some("machine"),
        },
        Case {
            name: "machine id too long",
            content_type: nd,
            body: two_good_then(with(|v| v["machine"] = "m".repeat(65).into())),
            status: 400,
            line: Some(3),
            field: Some("machine"),
        },
        Case {
            name: "missing machine",
            content_type: nd,
            body: two_good_then(with(|v| {
                v.as_object_mut().expect("o").remove("machine");
            })),
            status: 400,
            line: Some(3),
            field: Some("machine"),
        },
        Case {
            name: "bad timestamp",
            content_type: nd,
            body: two_good_then(with(|v| v["ts"] = "23/11/2026 07:00".into())),
            status: 400,
            line: Some(3),
            field: Some("ts"),
        },
        Case {
            name: "negative timestamp",
            content_type: nd,
            body: two_good_then(with(|v| v["ts"] = serde_json::json!(-1))),
            status: 400,
            line: Some(3),
            field: Some("ts"),
        },
        Case {
            name: "message not a string",
            content_type: nd,
            body: two_good_then(with(|v| v["message"] = serde_json::json!({"a": 1}))),
            status: 400,
            line: Some(3),
            field: Some("message"),
        },
        Case {
            name: "oversized line",
            content_type: nd,
            body: two_good_then(with(|v| v["message"] = "x".repeat(2000).into())),
            status: 413,
            line: Some(3),
            field: None,
        },
        Case {
            name: "oversized body",
            content_type: nd,
            body: (0..600)
                .map(good)
                .collect::<Vec<_>>()
                .join("\n")
                .into_bytes(),
            status: 413,
            line: None,
            field: None,
        },
        Case {
            name: "too many records",
            content_type: nd,
            body: (0..150)
                .map(good)
                .collect::<Vec<_>>()
                .join("\n")
                .into_bytes(),
            status: 413,
            line: None,
            field: None,
        },
        Case {
            name: "wrong content type",
            content_type: Some("text/csv"),
            body: good(1).into_bytes(),
            status: 415,
            line: None,
            field: None,
        },
        Case {
            name: "missing content type",
            content_type: None,
            body: good(1).into_bytes(),
            status: 415,
            line: None,
            field: None,
        },
        Case {
            name: "empty body",
            content_type: nd,
            body: b"\n\n".to_vec(),
            status: 400,
            line: None,
            field: None,
        },
        Case {
            name: "JSON array with a bad element",
            content_type: js,
            body: format!(
                "[{},{}]",
                good(1),
                with(|v| v["readings"]["current"] = "high".into())
            )
            .into_bytes(),
            status: 400,
            line: Some(2),
            field: Some("readings.current"),
        },
        Case {
            name: "malformed single JSON",
            content_type: js,
            body: b"{\"machine\": \"press-01\", \"ts\": }".to_vec(),
            status: 400,
            line: Some(1),
            field: Some("record"),
        },
        Case {
            name: "invalid UTF-8",
            content_type: nd,
            body: vec![b'{', 0xff, 0xfe, b'}'],
            status: 400,
            line: Some(1),
            field: Some("record"),
        },
    ];
    for c in &cases {
        let (status, body, _) = agent.post("/v1/logs", c.content_type, c.body.clone());
        assert_eq!(status, c.status, "{}: {body}", c.name);
        let error = body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no error message in {body}", c.name));
        assert!(!error.is_empty(), "{}", c.name);
        assert_eq!(body["line"].as_u64(), c.line, "{}: {body}", c.name);
        assert_eq!(body["field"].as_str(), c.field, "{}: {body}", c.name);
        println!("{:<34} {} {}", c.name, status, error);
    }
    // Nothing of any rejected request was stored (each held valid records before the bad one).
    let (_, status) = agent.get("/v1/status");
    assert_eq!(status["store"]["records"], 0, "{status}");
    assert_eq!(status["store"]["open_window_records"], 0, "{status}");

    // The read API refuses bad parameters clearly too.
    assert_eq!(agent.get("/v1/cases/not-a-case-id").0, 400);
    assert_eq!(
        agent.get("/v1/cases/00000000000000000000000000000000").0,
        404
    );
    assert_eq!(agent.get("/v1/cases?decision=maybe").0, 400);
    assert_eq!(agent.get("/v1/cases?limit=0").0, 400);
    assert_eq!(
        agent
            .put("/v1/policy", serde_json::json!({"max_share": 2.0}))
            .0,
        400
    );
    assert_eq!(
        agent
            .put("/v1/policy", serde_json::json!({"no_such_knob": 1}))
            .0,
        400
    );

    // And the agent still works: a good request is stored.
    let (status, body, _) = agent.post(
        "/v1/logs",
        nd,
        format!("{}\n{}", good(1), good(2)).into_bytes(),
    );
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 2);
    let (_, metrics) = (
        0,
        e2e::client()
            .get(format!("{}/metrics", agent.url))
            .send()
            .expect("metrics")
            .text()
            .expect("text"),
    );
    assert!(
        metrics.contains("edge_requests_rejected_total"),
        "{metrics}"
    );
    assert!(metrics.contains("edge_records_accepted_total"), "{metrics}");
}
