//! Five MixLoRA training steps of a real model on the CPU and on the GPU, in f32, with the same
//! data, seeds and dropout masks: the GPU's losses must follow the CPU's within 1e-3 relative.
//!
//! Both devices run the same MoE implementation, `fused` (the trainer's default on a GPU) unless
//! a third argument names another (`naive`, `paper`, `grouped`): the dropout masks of different
//! implementations differ, so only the same one on both devices can be compared.
//!
//! Run (GPU machine): `cuda_train_parity MODEL.gguf DATA.json [IMPL]` (built with the CUDA backend:
//! `cargo build --release -p mixlora-benches --features mixlora-engine/cuda --example cuda_train_parity`).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use engine::Device;
use model::MoeImpl;
use trainer::config::{CudaGraphs, TrainConfig};

fn losses(out: &std::path::Path) -> Result<Vec<f64>, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    let mut v = Vec::new();
    for line in text.lines() {
        let j: serde_json::Value = serde_json::from_str(line)?;
        if j["kind"] == "train" {
            v.push(j["loss"].as_f64().ok_or("no loss")?);
        }
    }
    Ok(v)
}

fn run() -> Result<bool, Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (model, data) = match (args.next(), args.next()) {
        (Some(m), Some(d)) => (PathBuf::from(m), PathBuf::from(d)),
        _ => {
            return Err(
                "usage: cuda_train_parity MODEL DATA.json [naive|paper|grouped|fused]".into(),
            )
        }
    };
    let moe_impl: MoeImpl = args.next().as_deref().unwrap_or("fused").parse()?;
    eprintln!("MoE implementation on both devices: {moe_impl}");
    mixlora_benches::cuda_from_env()?;
    let base = std::env::temp_dir().join(format!("mixlora-train-parity-{}", std::process::id()));
    let mut all = Vec::new();
    for device in [Device::Cpu, Device::Cuda(0)] {
        let cfg = TrainConfig {
            model: Some(model.clone()),
            data: vec![data.clone()],
            max_steps: Some(5),
            batch_size: 4,
            micro_batch_size: 2,
            cutoff_len: 128,
            save_every: 0,
            eval_every: 0,
            log_every: 1,
            device,
            out_dir: base.join(device.to_string()),
            moe_impl: Some(moe_impl),
            // Kernel by kernel on both devices, whatever the default (CUDA graphs draw their
            // dropout masks under a device key, not as the CPU's `off` does).
            cuda_graphs: CudaGraphs::Off,
            ..TrainConfig::default()
        };
        let t = std::time::Instant::now();
        trainer::run::train(&cfg, |l| eprintln!("[{device}] {l}"))?;
        eprintln!("[{device}] 5 steps in {:.1}s", t.elapsed().as_secs_f64());
        all.push(losses(&cfg.out_dir)?);
    }
    let _ = std::fs::remove_dir_all(&base);
    println!("| step | CPU loss | GPU loss | relative difference |\n|---|---|---|---|");
    let mut worst: f64 = 0.0;
    for (i, (c, g)) in all[0].iter().zip(&all[1]).enumerate() {
        let rel = (c - g).abs() / c.abs();
        worst = worst.max(rel);
        println!("| {} | {c:.6} | {g:.6} | {rel:.2e} |", i + 1);
    }
    let ok = all[0].len() == 5 && all[1].len() == 5 && worst <= 1e-3;
    println!(
        "worst relative difference {worst:.2e}: {}",
        if ok { "ok (<= 1e-3)" } else { "FAILED" }
    );
    Ok(ok)
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
