//! On a GPU (compute capability 8.9 or newer): training on an FP8 base (`--base-dtype fp8`) with
//! its products through cuBLASLt follows the CPU reference of the same run (f32 activations, the
//! same codes; only the order of the f32 sums differs) for fused MixLoRA and LoRA, and in bf16
//! stays near the bf16 run on the dense base; an FP8 run also replays as CUDA graphs bit for bit
//! as it runs kernel by kernel (nothing is read back inside a step). Skips, saying why, without
//! a GPU or a build with the `cuda` feature.

mod common;

use std::path::Path;

use common::{gpu, losses};
use engine::Device;
use model::adapters::PeftType;
use trainer::config::{BaseDTypeName, CudaGraphs, DTypeName, TrainConfig};
use trainer::run::train;

fn config(out: &Path, device: Device, adapter: PeftType, dtype: DTypeName) -> TrainConfig {
    TrainConfig {
        out_dir: out.to_path_buf(),
        device,
        dtype,
        base_dtype: BaseDTypeName::Fp8,
        adapter,
        batch_size: 4,
        micro_batch_size: 2,
        cutoff_len: 320,
        epochs: 1,
        max_steps: Some(10),
        save_every: 0,
        eval_every: 0,
        eval_limit: Some(2),
        lr: 2e-3,
        dropout: 0.0,
        ..TrainConfig::default()
    }
}

fn run(name: &str, cfg: impl Fn(&Path) -> TrainConfig) -> Vec<f64> {
    let out = common::out_dir("fp8-gpu", name);
    train(&cfg(&out), |_| {}).unwrap();
    let l = losses(&out).into_iter().map(|x| x.1).collect();
    let _ = std::fs::remove_dir_all(&out);
    l
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs())
        .fold(0.0, f64::max)
}

#[test]
fn fp8_training_on_the_gpu_follows_the_cpu_reference() {
    let Some(dev) = gpu() else { return };
    for adapter in [PeftType::MixLora, PeftType::Lora] {
        // The fused MoE path on both devices (the CPU's default for training is `naive`).
        let fused = |c: TrainConfig| TrainConfig {
            moe_impl: Some(model::MoeImpl::Fused(Default::default())),
            ..c
        };
        let cpu = run("cpu", |o| {
            fused(config(o, Device::Cpu, adapter, DTypeName::F32))
        });
        let gpu = run("gpu", |o| fused(config(o, dev, adapter, DTypeName::F32)));
        let e = max_rel(&gpu, &cpu);
        assert!(
            e < 1e-3,
            "{adapter:?}: GPU FP8 losses off the CPU's by {e}: {gpu:?} {cpu:?}"
        );
        // bf16 activations on the FP8 base against the bf16 dense base.
        let fp8 = run("bf16-fp8", |o| config(o, dev, adapter, DTypeName::Bf16));
        let dense = run("bf16-dense", |o| TrainConfig {
            base_dtype: BaseDTypeName::Same,
            ..config(o, dev, adapter, DTypeName::Bf16)
        });
        let e = max_rel(&fp8, &dense);
        assert!(
            e < 0.10,
            "{adapter:?}: FP8 losses off the dense base's by {e}"
        );
        assert_ne!(fp8, dense);
    }
}

#[test]
fn fp8_steps_replay_as_cuda_graphs_bit_for_bit() {
    let Some(dev) = gpu() else { return };
    let with = |graphs| {
        move |o: &Path| TrainConfig {
            cuda_graphs: graphs,
            ..config(o, dev, PeftType::MixLora, DTypeName::Bf16)
        }
    };
    let eager = run("eager", with(CudaGraphs::Eager));
    let on = run("on", with(CudaGraphs::On));
    assert_eq!(eager, on);
}
