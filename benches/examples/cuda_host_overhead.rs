//! Host cost of one engine op on the GPU: tiny tensors, so that each kernel runs for about as
//! long as a launch takes, and the loop's issue time per op is what the host spends on it (the
//! tensor layer, the allocator, the launch itself). Prints, per op, the issue time per call and
//! the time per call once the device has caught up; when the two agree, the host bounds the loop.
//!
//! Build: `cargo build --release -p mixlora-benches --features mixlora-engine/cuda --example
//! cuda_host_overhead` (scripts/dev/build-gpu.sh does it); run `gpu-bin/example-cuda_host_overhead`
//! on the GPU machine.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use engine::backend::cuda::{synchronize, CudaDevice};
use engine::{DType, Device, Tensor};

const GPU: Device = Device::Cuda(0);

/// One op of the table, run once per call.
type Op<'a> = Box<dyn FnMut() -> engine::Result<Tensor> + 'a>;

/// Runs `f` `n` times, returning (issue µs per call, µs per call after the device caught up).
fn time_per_call(
    n: usize,
    mut f: impl FnMut() -> engine::Result<Tensor>,
) -> engine::Result<(f64, f64)> {
    for _ in 0..100 {
        std::hint::black_box(f()?); // warm-up: kernels compiled, allocator cache filled
    }
    synchronize(GPU)?;
    let t0 = Instant::now();
    for _ in 0..n {
        std::hint::black_box(f()?);
    }
    let issued = t0.elapsed().as_secs_f64();
    synchronize(GPU)?;
    let done = t0.elapsed().as_secs_f64();
    Ok((issued * 1e6 / n as f64, done * 1e6 / n as f64))
}

fn main() -> engine::Result<()> {
    if let Err(e) = mixlora_benches::cuda_from_env().and_then(|()| CudaDevice::get(0)) {
        println!("skipping: no CUDA device ({e})");
        return Ok(());
    }
    let device = GPU;
    let n = 20_000;
    let a = Tensor::ones([4, 4], DType::BF16, device)?;
    let b = Tensor::ones([4, 4], DType::BF16, device)?;
    let w = Tensor::ones([4], DType::BF16, device)?;
    let av = Tensor::ones([4, 4], DType::BF16, device)?.to_var()?;
    let cases: Vec<(&str, Op)> = vec![
        ("add [4, 4] bf16", Box::new(|| a.add(&b))),
        (
            "add [4, 4] bf16, recorded on the tape",
            Box::new(|| av.add(&b)),
        ),
        (
            "matmul [4, 4] x [4, 4]ᵀ bf16 (cuBLAS)",
            Box::new(|| a.matmul(&b.t()?)),
        ),
        ("rms_norm [4, 4] bf16", Box::new(|| a.rms_norm(&w, 1e-6))),
        (
            "to_dtype bf16 -> f32 [4, 4]",
            Box::new(|| a.to_dtype(DType::F32)),
        ),
    ];
    println!("| op | issue µs/call | µs/call with the device |");
    println!("|---|---:|---:|");
    for (name, mut f) in cases {
        let (issued, done) = time_per_call(n, &mut f)?;
        println!("| {name} | {issued:.2} | {done:.2} |");
    }
    Ok(())
}
