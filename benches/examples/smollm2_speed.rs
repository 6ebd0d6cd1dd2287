//! CPU generation speed of SmolLM2-135M-Instruct: batched prefill (4 × 128 tokens) and greedy
//! decoding with the KV cache (64 new tokens after a 5-token prompt), f32.
//!
//! Run: `cargo run --release -p mixlora-benches --example smollm2_speed -- PATH.gguf`
//! (`MIXLORA_PROFILE=1`: also the per-op table of one prefill).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use engine::{no_grad, DType, Device, Tensor};
use model::generate::{generate, GenerateOptions};
use model::sampling::Sampler;
use model::Llama;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rows = mixlora_benches::profile_from_env().unwrap_or(25);
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: smollm2_speed PATH.gguf")?;
    let model = Llama::load(std::path::Path::new(&path), DType::F32, Device::Cpu)?;
    let v = model.config.vocab_size as u32;

    // Prefill: 4 sequences of 128 random tokens, logits at every position (as training needs).
    let (b, t) = (4, 128);
    let ids: Vec<u32> = (0..b * t)
        .map(|i| (engine::rng::hash(1, i as u64) % v as u64) as u32)
        .collect();
    let x = Tensor::from_vec(ids, [b, t], Device::Cpu)?;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t0 = Instant::now();
        no_grad(|| model.forward(&x, None))?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    println!(
        "prefill {b}x{t}: {:.3} s, {:.0} tokens/s (best of 3)",
        best,
        (b * t) as f64 / best
    );
    if engine::profile::enabled() {
        engine::profile::take();
        let t0 = Instant::now();
        no_grad(|| model.forward(&x, None))?;
        println!(
            "-- prefill: {:.1} ms wall",
            t0.elapsed().as_secs_f64() * 1e3
        );
        print!("{}", engine::profile::report(rows));
    }

    // Decode: greedy, 64 tokens, no early stop.
    let prompt = [504u32, 3575, 282, 4649, 314];
    let mut best = f64::MAX;
    for _ in 0..3 {
        let mut first = None;
        let t0 = Instant::now();
        let opts = GenerateOptions {
            max_new_tokens: 65,
            ..GenerateOptions::default()
        };
        let out = generate(
            &model,
            &prompt,
            &opts,
            &mut Sampler::greedy(),
            &[],
            |_, _| {},
            |_| {
                first.get_or_insert_with(Instant::now);
            },
        )?;
        let first = first.ok_or("no token")?;
        let dt = first.elapsed().as_secs_f64();
        best = best.min(dt / (out.len() - 1) as f64);
        let _ = t0;
    }
    println!(
        "decode: {:.1} tokens/s (64 tokens after a 5-token prompt, KV cache, best of 3)",
        1.0 / best
    );
    Ok(())
}
