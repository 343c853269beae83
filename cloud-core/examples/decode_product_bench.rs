//! Benchmark of the CPU backend's decode products: `y[m, n] = x[m, k] · wᵀ` for the
//! `m` rows of a decode step (1–8), with the weight held as bf16 and as f32, through
//! the backend's `linear` (threads, SIMD level and all).
//!
//! ```sh
//! cargo build --release -p cloud-core --examples
//! target/release/examples/decode_product_bench [N K [M...]]   # default 8960 1536, m 1..8: the 1.5B shape's MLP
//! ```
//!
//! Prints the time per product, per row, and the weight's bytes per second.

use cloud_core::engine::backend::cpu::Cpu;
use cloud_core::engine::backend::{Backend, Weight};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| {
            a.parse()
                .expect("N, K and the row counts are whole numbers")
        })
        .collect();
    let (n, k) = match args[..] {
        [n, k, ..] => (n, k),
        _ => (8960, 1536),
    };
    let rows: Vec<usize> = match args.get(2..) {
        Some(rows) if !rows.is_empty() => rows.to_vec(),
        _ => (1..=8).collect(),
    };
    let cpu = Cpu::default();
    let vals: Vec<f32> = (0..n * k)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
        .collect();
    let bf: Vec<half::bf16> = vals.iter().map(|v| half::bf16::from_f32(*v)).collect();
    println!("{n} × {k}; {}", cpu.describe());
    for (name, w, bytes) in [
        ("bf16", cpu.upload_weight(Weight::Bf16(&bf), &[n, k]), 2),
        ("f32", cpu.upload_weight(Weight::F32(&vals), &[n, k]), 4),
    ] {
        for &m in &rows {
            let x = cpu.upload(
                &(0..m * k)
                    .map(|i| ((i * 13 % 29) as f32 - 14.0) / 8.0)
                    .collect::<Vec<_>>(),
            );
            for _ in 0..3 {
                cpu.linear(&x, m, &w, n, k);
            }
            let reps = 30;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                std::hint::black_box(cpu.linear(&x, m, &w, n, k));
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{name} m={m}: {:.2} ms, {:.2} ms per row, {:.1} GB/s of weights",
                s * 1e3,
                s * 1e3 / m as f64,
                (n * k * bytes) as f64 / s / 1e9
            );
        }
    }
}
