//! GFLOP/s of the CPU matmul at SmolLM2's training shapes, for each operand layout.
//!
//! Run: `cargo run --release -p mixlora-benches --example matmul_speed`

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use engine::{DType, Device, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let r = |s: [usize; 2], seed| Tensor::randn(s, 0.0, 1.0, seed, DType::F32, Device::Cpu);
    // (m, k, n): x [m, k] times a weight stored [n, k] (NT), [k, n] (NN); and Aᵀ B (TN).
    let shapes = [
        (512, 576, 1536),
        (512, 1536, 576),
        (512, 576, 576),
        (512, 576, 192),
        (512, 576, 49152),
        (512, 49152, 576),
        (512, 576, 16),
        (512, 16, 1536),
        (576, 512, 16),
    ];
    for (m, k, n) in shapes {
        let a = r([m, k], 1)?;
        let at = r([k, m], 1)?.t()?;
        let bn = r([k, n], 2)?;
        let bt = r([n, k], 2)?.t()?;
        for (name, a, b) in [
            ("NN", &a, &bn),
            ("NT", &a, &bt),
            ("TN", &at, &bn),
            ("TT", &at, &bt),
        ] {
            let reps = (2e9 / (2 * m * n * k) as f64).clamp(2.0, 200.0) as usize;
            let mut best = f64::MAX;
            for _ in 0..3 {
                let t0 = Instant::now();
                for _ in 0..reps {
                    a.matmul(b)?;
                }
                best = best.min(t0.elapsed().as_secs_f64() / reps as f64);
            }
            print!(
                "{m}x{k}x{n} {name}: {:6.1} GF/s  ",
                2.0 * (m * n * k) as f64 / best / 1e9
            );
        }
        println!();
    }
    Ok(())
}
