//! Writes a labelled feature dataset from the simulator, for training the student model.
//!
//! ```text
//! cargo run --release -p factory-shared --example dataset -- schema
//! cargo run --release -p factory-shared --example dataset -- csv SEED MACHINES TICKS FAULT_SHARE > data.csv
//! ```
//!
//! `schema` prints the class list, the feature names and the window length as JSON; `csv`
//! writes one row per complete window: the true class (majority label) and the features,
//! computed by exactly the code the edge agent runs.

use std::collections::HashMap;
use std::io::Write;

use shared::features::{extract, feature_names};
use shared::schema::{CLASSES, WINDOW_LEN};
use shared::sim::{window_label, SimConfig, Simulator};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("schema") => {
            let v = serde_json::json!({
                "classes": CLASSES,
                "features": feature_names(),
                "window_len": WINDOW_LEN,
            });
            println!("{v}");
        }
        Some("csv") if args.len() == 5 => {
            let parse = |i: usize| -> f64 {
                args[i].parse().unwrap_or_else(|_| {
                    eprintln!("argument {i} ({:?}) is not a number", args[i]);
                    std::process::exit(2)
                })
            };
            let cfg = SimConfig {
                seed: parse(1) as u64,
                machines: parse(2) as usize,
                fault_share: parse(4),
                ..SimConfig::default()
            };
            let ticks = parse(3) as usize;
            let mut sim = Simulator::new(cfg);
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let header: Vec<String> = std::iter::once("label".to_string())
                .chain(feature_names())
                .collect();
            let _ = writeln!(out, "{}", header.join(","));
            let mut windows: HashMap<String, Vec<(shared::record::Record, &'static str)>> =
                HashMap::new();
            for _ in 0..ticks {
                for r in sim.tick() {
                    let w = windows.entry(r.machine.clone()).or_default();
                    w.push((r.to_record(), r.label));
                    if w.len() == WINDOW_LEN {
                        let recs: Vec<_> = w.iter().map(|(r, _)| r.clone()).collect();
                        let label = window_label(w.iter().map(|(_, l)| *l));
                        let f = extract(&recs);
                        let row: Vec<String> = f.iter().map(|x| format!("{x}")).collect();
                        let _ = writeln!(out, "{label},{}", row.join(","));
                        w.clear();
                    }
                }
            }
        }
        _ => {
            eprintln!("usage: dataset schema | dataset csv SEED MACHINES TICKS FAULT_SHARE");
            std::process::exit(2);
        }
    }
}
