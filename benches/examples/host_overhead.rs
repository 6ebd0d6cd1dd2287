//! Host cost of one engine op on tiny tensors (the CPU backend, so the kernel itself is a few
//! nanoseconds): what the tensor layer (shape checks, storage dispatch, tape records, buffers)
//! costs per op, apart from any device work.
//!
//!     cargo run --release -p mixlora-benches --example host_overhead
use std::time::Instant;

use engine::{DType, Device, Tensor};

fn main() -> engine::Result<()> {
    let n = 200_000;
    let a = Tensor::ones([4, 4], DType::F32, Device::Cpu)?;
    let b = Tensor::ones([4, 4], DType::F32, Device::Cpu)?;
    let t0 = Instant::now();
    for _ in 0..n {
        std::hint::black_box(a.add(&b)?);
    }
    let plain = t0.elapsed().as_secs_f64() / n as f64;
    let av = a.to_var()?;
    let t0 = Instant::now();
    for _ in 0..n {
        std::hint::black_box(av.add(&b)?);
    }
    let taped = t0.elapsed().as_secs_f64() / n as f64;
    let t0 = Instant::now();
    for _ in 0..n {
        std::hint::black_box(av.t()?.reshape([16])?);
    }
    let views = t0.elapsed().as_secs_f64() / n as f64;
    println!(
        "add [4, 4]: {:.2} µs without a tape, {:.2} µs recorded; two views: {:.2} µs",
        plain * 1e6,
        taped * 1e6,
        views * 1e6
    );
    Ok(())
}
