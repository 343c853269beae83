//! A damaged store is recovered or refused with a clear message — never silently emptied.

use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::{bin, record, Agent};

fn fill(dir: &std::path::Path) -> u64 {
    let agent = Agent::start(dir, &[]);
    for round in 0..20 {
        let body: Vec<String> = (0..100)
            .map(|i| {
                record(
                    "press-01",
                    1_700_000_000_000 + (round * 100 + i) * 1000,
                    &format!("{round}-{i}"),
                )
            })
            .collect();
        let (code, body, _) = agent.post(
            "/v1/logs",
            Some("application/x-ndjson"),
            body.join("\n").into_bytes(),
        );
        assert_eq!(code, 202, "{body}");
    }
    let (_, s) = agent.get("/v1/status");
    agent.stop();
    s["store"]["records"].as_u64().expect("records")
}

/// Starts the agent on `dir`: Ok(records) if it served, Err(stderr) if it refused.
fn try_start(dir: &std::path::Path) -> Result<u64, String> {
    let mut child = Command::new(bin("edge-agent"))
        .args(["run", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("edge-agent listening on ") {
                let _ = tx.send(a.to_string());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(url) => {
            let s: serde_json::Value = e2e::client()
                .get(format!("{url}/v1/status"))
                .send()
                .expect("status")
                .json()
                .expect("json");
            let _ = child.kill();
            let _ = child.wait();
            Ok(s["store"]["records"].as_u64().expect("records"))
        }
        Err(_) => {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).expect("copy");
        }
    }
}

#[test]
fn damaged_store_is_recovered_or_refused_never_emptied() {
    let base = tempfile::tempdir().expect("tempdir");
    let good = base.path().join("good");
    let stored = fill(&good);
    assert_eq!(stored, 2000);
    let db_len = std::fs::metadata(good.join("db")).expect("db file").len();
    type Damage = Box<dyn Fn(&std::path::Path)>;
    let damages: Vec<(&str, Damage)> = vec![
        (
            "garbage over the middle of the data file",
            Box::new(move |d| {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("db"))
                    .expect("open");
                f.seek(SeekFrom::Start(db_len / 2)).expect("seek");
                f.write_all(&vec![0xA5; 64 * 1024]).expect("write");
            }),
        ),
        (
            "data file truncated to half",
            Box::new(move |d| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("db"))
                    .expect("open")
                    .set_len(db_len / 2)
                    .expect("truncate");
            }),
        ),
        (
            "data file zeroed at the start",
            Box::new(|d| {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("db"))
                    .expect("open");
                f.write_all(&[0u8; 4096]).expect("write");
            }),
        ),
        (
            "configuration file garbled",
            Box::new(|d| std::fs::write(d.join("conf"), b"\x00\x01garbage").expect("write")),
        ),
        (
            "torn tail: garbage appended",
            Box::new(|d| {
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(d.join("db"))
                    .expect("open");
                f.write_all(&[0x5A; 1000]).expect("write");
            }),
        ),
    ];
    for (name, damage) in damages {
        let dir = base.path().join(name.replace([' ', ':'], "_"));
        copy_dir(&good, &dir);
        damage(&dir);
        match try_start(&dir) {
            Ok(records) => {
                println!("{name}: recovered, {records} records");
                assert_eq!(
                    records, stored,
                    "{name}: the agent started but the store lost records"
                );
            }
            Err(stderr) => {
                println!("{name}: refused: {}", stderr.trim());
                assert!(
                    stderr.contains("store") && stderr.contains("damaged"),
                    "{name}: the refusal must say what is wrong: {stderr}"
                );
                assert!(
                    !stderr.contains("panicked"),
                    "{name}: a damaged store is refused, not a panic: {stderr}"
                );
                assert!(
                    dir.join("db").exists(),
                    "{name}: a refused store is left in place"
                );
            }
        }
    }
}
