//! CPU training speed of SmolLM2-135M-Instruct (f32): forward + backward of a 4 × 128 batch of
//! random tokens, loss = mean cross-entropy over every position (+ the router loss for MixLoRA),
//! with (a) LoRA r = 16 on all seven projections and (b) MixLoRA's defaults (E = 8, top-2,
//! r = 16). One warm-up step, then the best of 3.
//!
//! Run: `cargo run --release -p mixlora-benches --example smollm2_train_speed -- PATH.gguf [lora|mixlora]`
//! With `MIXLORA_PROFILE=1`, one more step per adapter is timed op by op (forward and backward
//! separately) and the table of the CPU backend's ops is printed.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use engine::profile;
use engine::{DType, Device, Tensor, IGNORE_INDEX};
use model::adapters::AdapterConfig;
use model::Llama;

/// One training step's forward and backward; returns (forward, backward) seconds.
fn step(
    model: &Llama,
    ids: &Tensor,
    targets: &Tensor,
) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let t0 = Instant::now();
    let out = model.forward_train(ids, None, Some(7))?;
    let mut loss = out.logits.cross_entropy(targets, IGNORE_INDEX)?;
    if let Some(aux) = &out.aux_loss {
        loss = loss.add(aux)?;
    }
    let t1 = Instant::now();
    loss.backward()?;
    let t2 = Instant::now();
    for (_, p) in model.trainable_params() {
        p.zero_grad();
    }
    Ok(((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64()))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rows = mixlora_benches::profile_from_env();
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: smollm2_train_speed PATH.gguf [lora|mixlora]")?;
    let which = args.next();
    let mut model = Llama::load(std::path::Path::new(&path), DType::F32, Device::Cpu)?;
    let v = model.config.vocab_size as u64;

    let (b, t) = (4, 128);
    let tok = |i: usize| (engine::rng::hash(1, i as u64) % v) as u32;
    let ids: Vec<u32> = (0..b * t).map(tok).collect();
    // Next-token targets; the last position of each row predicts an arbitrary token.
    let tg: Vec<u32> = (0..b * t).map(|i| tok(i + 1)).collect();
    let ids = Tensor::from_vec(ids, [b, t], Device::Cpu)?;
    let targets = Tensor::from_vec(tg, [b, t], Device::Cpu)?;

    let configs = [
        (
            "lora",
            "LoRA r=16, all 7 projections",
            AdapterConfig::lora_default(),
        ),
        (
            "mixlora",
            "MixLoRA E=8 top-2 r=16",
            AdapterConfig::mixlora_default(),
        ),
    ];
    for (key, name, cfg) in configs {
        if which.as_deref().is_some_and(|w| w != key) {
            continue;
        }
        model.add_adapters(&cfg, 1)?;
        step(&model, &ids, &targets)?; // warm-up
        let mut best = (f64::MAX, 0.0, 0.0);
        for _ in 0..3 {
            let (f, bw) = step(&model, &ids, &targets)?;
            if f + bw < best.0 {
                best = (f + bw, f, bw);
            }
        }
        println!(
            "{name}: forward+backward {b}x{t}: {:.3} s (forward {:.3}, backward {:.3}), {:.0} tokens/s (best of 3)",
            best.0,
            best.1,
            best.2,
            (b * t) as f64 / best.0
        );
        if profile::enabled() {
            profile::take();
            let t0 = Instant::now();
            let out = model.forward_train(&ids, None, Some(7))?;
            let mut loss = out.logits.cross_entropy(&targets, IGNORE_INDEX)?;
            if let Some(aux) = &out.aux_loss {
                loss = loss.add(aux)?;
            }
            let tf = t0.elapsed().as_secs_f64();
            println!("-- forward: {:.1} ms wall", tf * 1e3);
            print!("{}", profile::report(rows.unwrap_or(25)));
            let t0 = Instant::now();
            loss.backward()?;
            let tb = t0.elapsed().as_secs_f64();
            println!("-- backward: {:.1} ms wall", tb * 1e3);
            print!("{}", profile::report(rows.unwrap_or(40)));
            for (_, p) in model.trainable_params() {
                p.zero_grad();
            }
        }
    }
    Ok(())
}
