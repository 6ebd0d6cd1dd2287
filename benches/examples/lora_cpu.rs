//! CPU timing of one LoRA projection, forward + backward, the fused `lora_add` against the
//! composite it replaced (`y + LoraLinear::delta`), at SmolLM2-like shapes (M = 512 tokens,
//! in = 576, out = 1536, r = 16, dropout 0.05), f32 and bf16 base. Prints the median of the runs.
//!
//! `cargo run --release -p mixlora-benches --example lora_cpu [-- ITERS]`

use std::time::Instant;

use engine::{DType, Device, Result, Tensor};
use model::adapters::lora::linear;
use model::adapters::LoraLinear;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `mode`: 0 the base matmul alone, 1 the composite, 2 the fused op.
fn step(mode: u8, base: DType, iters: usize) -> Result<f64> {
    let (m, n_in, n_out, r) = (512, 576, 1536, 16);
    let dev = Device::Cpu;
    let x0 = Tensor::randn([m, n_in], 0.0, 1.0, 1, base, dev)?;
    let w = Tensor::randn([n_out, n_in], 0.0, 0.05, 2, base, dev)?;
    let a = Tensor::randn([r, n_in], 0.0, 0.05, 3, DType::F32, dev)?.to_var()?;
    let b = Tensor::randn([n_out, r], 0.0, 0.05, 4, DType::F32, dev)?.to_var()?;
    let g = Tensor::randn([m, n_out], 0.0, 1.0, 5, base, dev)?;
    let l = LoraLinear::new(a.clone(), b.clone(), 2.0, 0.05);
    let mut times = Vec::new();
    for i in 0..iters + 2 {
        // x tracks a gradient, as it does inside a model (the previous layer's output).
        let x = x0.to_var()?;
        let t0 = Instant::now();
        let y = linear(&x, &w).map_err(|e| engine::Error::invalid("bench", e.to_string()))?;
        let out = if mode == 0 {
            y
        } else if mode == 2 {
            y.lora_add(&x, &a, &b, 2.0, Some((0.05, 9)))?
        } else {
            let d = l
                .delta(&x, Some(9))
                .map_err(|e| engine::Error::invalid("bench", e.to_string()))?;
            y.add(&d)?
        };
        out.backward_with_grad(&g)?;
        let dt = t0.elapsed().as_secs_f64();
        if i >= 2 {
            times.push(dt);
        }
        a.zero_grad();
        b.zero_grad();
    }
    Ok(median(times))
}

fn main() -> Result<()> {
    let iters = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    println!(
        "one projection M=512 in=576 out=1536 r=16, forward + backward (base matmul included), \
         median of {iters}, {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    for base in [DType::F32, DType::BF16] {
        // Alternate the modes in short rounds so that background load hits all of them alike.
        let (mut t0, mut t1, mut t2) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..5 {
            t0.push(step(0, base, iters)?);
            t1.push(step(1, base, iters)?);
            t2.push(step(2, base, iters)?);
        }
        let (b0, c, f) = (median(t0), median(t1), median(t2));
        println!(
            "{base}: base matmul alone {:.3} ms; composite {:.3} ms (LoRA part {:.3} ms); fused \
             {:.3} ms (LoRA part {:.3} ms): LoRA part {:.2}x faster",
            b0 * 1e3,
            c * 1e3,
            (c - b0) * 1e3,
            f * 1e3,
            (f - b0) * 1e3,
            (c - b0) / (f - b0)
        );
    }
    Ok(())
}
