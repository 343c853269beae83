//! The cloud core: QUIC server for edge fleets, device registry and fleet status, the
//! verdict service and the DeepSeek engine (CPU, CUDA and remote backends), operator API
//! and dashboard.
//!
//! None of that is built yet: this binary only says so, and exits with status 2. It must
//! never pretend to serve. The README's "Status" section lists what arrives with which
//! piece of work.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--version" || a == "-V") {
        println!("cloud-core {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "cloud-core {}: not built yet. The QUIC server, fleet registry, verdict service and DeepSeek \
         engine are planned (see README, \"Status\"); until then edge agents run offline and queue \
         their hard cases in their outbox.",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
