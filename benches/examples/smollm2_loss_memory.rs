//! One SmolLM2-135M training step on the CPU (f32, LoRA r = 16 on all seven projections, 4 × 128
//! random tokens) with the LM loss computed either from the full logits (`forward_train` +
//! `cross_entropy`, the `[B·T, V]` logits and their gradient held) or over vocabulary chunks
//! (`forward_train_hidden` + `linear_cross_entropy_rows`, one `[B·T, C]` chunk at a time, as the
//! trainer does). Prints the best forward+backward time of 3 steps and the process's peak RSS
//! (VmHWM), so run each mode in its own process:
//!
//! `cargo run --release -p mixlora-benches --example smollm2_loss_memory -- PATH.gguf full`
//! `cargo run --release -p mixlora-benches --example smollm2_loss_memory -- PATH.gguf chunked [C]`

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use engine::{DType, Device, Tensor, IGNORE_INDEX};
use model::adapters::AdapterConfig;
use model::Llama;

/// The process's peak resident set (VmHWM), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let usage = "usage: smollm2_loss_memory PATH.gguf full|chunked [CHUNK]";
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or(usage)?;
    let mode = args.next().ok_or(usage)?;
    let chunk: usize = args.next().map_or(Ok(8192), |c| c.parse())?;
    let chunked = match mode.as_str() {
        "full" => false,
        "chunked" => true,
        _ => return Err(usage.into()),
    };
    let mut model = Llama::load(std::path::Path::new(&path), DType::F32, Device::Cpu)?;
    model.add_adapters(&AdapterConfig::lora_default(), 1)?;
    let v = model.config.vocab_size as u64;
    let (b, t) = (4, 128);
    let tok = |i: usize| (engine::rng::hash(1, i as u64) % v) as u32;
    let ids = Tensor::from_vec(
        (0..b * t).map(tok).collect::<Vec<u32>>(),
        [b, t],
        Device::Cpu,
    )?;
    let targets: Vec<u32> = (0..b * t).map(|i| tok(i + 1)).collect();
    let targets = Tensor::from_vec(targets, b * t, Device::Cpu)?;
    let rss0 = peak_rss_mib().unwrap_or(f64::NAN);
    let mut best = (f64::MAX, 0.0, 0.0, 0.0);
    for _ in 0..4 {
        let t0 = Instant::now();
        let loss = if chunked {
            let out = model.forward_train_hidden(&ids, None, Some(7))?;
            let h = out.hidden.dim(-1)?;
            out.hidden
                .reshape([b * t, h])?
                .linear_cross_entropy_rows(model.lm_head_weight(), &targets, IGNORE_INDEX, chunk)?
                .mean_all()?
        } else {
            let out = model.forward_train(&ids, None, Some(7))?;
            let vv = out.logits.dim(-1)?;
            out.logits
                .reshape([b * t, vv])?
                .cross_entropy(&targets, IGNORE_INDEX)?
        };
        let t1 = Instant::now();
        loss.backward()?;
        let t2 = Instant::now();
        let lv = loss.to_scalar()?;
        for (_, p) in model.trainable_params() {
            p.zero_grad();
        }
        let (f, bw) = ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64());
        if f + bw < best.0 {
            best = (f + bw, f, bw, lv);
        }
    }
    println!(
        "{}: forward+backward {b}x{t}: {:.3} s (forward {:.3}, backward {:.3}), loss {:.6}; peak RSS {:.0} MiB (after loading {:.0} MiB)",
        if chunked { format!("chunked C={chunk}") } else { "full logits".into() },
        best.0,
        best.1,
        best.2,
        best.3,
        peak_rss_mib().unwrap_or(f64::NAN),
        rss0
    );
    Ok(())
}
