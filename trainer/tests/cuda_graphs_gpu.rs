//! On a GPU: training micro-steps recorded as CUDA graphs (`--cuda-graphs on`) give the losses
//! and the adapter of the same fixed-shape steps run kernel by kernel (`eager`) bit for bit, for
//! fused MixLoRA and LoRA in bf16 with dropout, over micro-batches of several lengths (several
//! graphs sharing one memory). Skips, saying why, without a
//! GPU or a build with the `cuda` feature.

mod common;

use std::path::Path;

use common::{gpu, losses};
use engine::Device;
use model::adapters::PeftType;
use trainer::config::{CudaGraphs, DTypeName, TrainConfig};
use trainer::run::train;

fn config(out: &Path, device: Device, adapter: PeftType, graphs: CudaGraphs) -> TrainConfig {
    TrainConfig {
        out_dir: out.to_path_buf(),
        device,
        dtype: DTypeName::Bf16,
        adapter,
        batch_size: 4,
        micro_batch_size: 2,
        cutoff_len: 320,
        epochs: 1,
        max_steps: Some(12),
        save_every: 0,
        eval_every: 0,
        eval_limit: Some(2),
        log_every: 1,
        lr: 2e-3,
        dropout: 0.05,
        cuda_graphs: graphs,
        ..TrainConfig::default()
    }
}

#[test]
fn replayed_steps_equal_the_eager_fixed_shape_steps_bit_for_bit() {
    let Some(device) = gpu() else { return };
    for adapter in [PeftType::MixLora, PeftType::Lora] {
        let run = |graphs: CudaGraphs| {
            let out = common::out_dir("graphs-gpu", &format!("{adapter}-{graphs:?}"));
            let mut lines = Vec::new();
            train(&config(&out, device, adapter, graphs), |l| {
                lines.push(l.to_string())
            })
            .unwrap();
            let bytes = std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
            let l = losses(&out);
            let _ = std::fs::remove_dir_all(&out);
            let summary = lines
                .into_iter()
                .find(|l| l.starts_with("fixed-shape micro-steps"))
                .expect("summary line");
            (l, bytes, summary)
        };
        let (eager, eager_bytes, _) = run(CudaGraphs::Eager);
        let (again, again_bytes, _) = run(CudaGraphs::Eager);
        let (graphs, graph_bytes, summary) = run(CudaGraphs::On);
        assert_eq!(eager.len(), 12, "{adapter}: steps");
        // The eager steps repeat themselves (else no comparison could be bit for bit).
        assert_eq!(eager, again, "{adapter}: two eager runs differ");
        assert!(
            eager_bytes == again_bytes,
            "{adapter}: two eager adapters differ"
        );
        assert_eq!(eager, graphs, "{adapter}: graphs against eager, losses");
        assert!(
            eager_bytes == graph_bytes,
            "{adapter}: graphs against eager, adapter files"
        );
        // Several lengths were seen and recorded.
        let recorded: usize = summary
            .split(", ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{adapter}: cannot read {summary}"));
        assert!(recorded >= 2, "{adapter}: {summary}");
        println!("{adapter}: {summary}");
    }
}
