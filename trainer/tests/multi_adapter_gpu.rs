//! On the GPU: adapters trained together on one bf16 base end where each trained alone ends,
//! within bf16 tolerance (the GPU path of the grouped forward need not be bit-exact: it may run
//! the frozen projections once over all adapters' rows); recorded as CUDA graphs and replayed
//! side by side, bit for bit. Skips, saying why, without a GPU or
//! when built without the `cuda` feature (scripts/dev/build-gpu.sh builds it with it).

mod common;

use std::path::Path;

use common::{gpu, losses};
use engine::Device;
use model::adapters::PeftType;
use trainer::config::{
    CudaGraphs, DTypeName, PlannedAdapter, RunPlan, SharedSettings, TrainConfig,
};
use trainer::run::{train, train_plan, RunControl};

fn adapters(root: &Path, device: Device) -> Vec<PlannedAdapter> {
    let base = TrainConfig {
        device,
        dtype: DTypeName::Bf16,
        batch_size: 4,
        micro_batch_size: 2,
        cutoff_len: 320,
        epochs: 1,
        max_steps: Some(6),
        save_every: 0,
        eval_every: 0,
        eval_limit: Some(4),
        log_every: 1,
        // Kernel by kernel alone too, whatever the default (`auto` records a single run's steps
        // as CUDA graphs, which draw their dropout masks differently): the same computation
        // together and alone.
        cuda_graphs: CudaGraphs::Off,
        ..TrainConfig::default()
    };
    [
        (
            "lora",
            TrainConfig {
                adapter: PeftType::Lora,
                lr: 3e-3,
                ..base.clone()
            },
        ),
        (
            "mix",
            TrainConfig {
                lr: 1e-3,
                cutoff_len: 200,
                micro_batch_size: 1,
                max_steps: Some(4),
                ..base.clone()
            },
        ),
    ]
    .into_iter()
    .map(|(name, c)| PlannedAdapter {
        name: name.into(),
        config: TrainConfig {
            out_dir: root.join(name),
            ..c
        },
    })
    .collect()
}

/// The f32 values of every tensor of an adapter file, in the file's order.
fn adapter_values(dir: &Path) -> Vec<f64> {
    let bytes = std::fs::read(dir.join("adapter/adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    names
        .iter()
        .flat_map(|n| {
            let t = st.tensor(n).unwrap();
            t.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn adapters_trained_together_on_the_gpu_match_each_alone_within_bf16_tolerance() {
    let Some(device) = gpu() else { return };
    let root = common::out_dir("multi-gpu", "bf16");
    let together = adapters(&root.join("group"), device);
    let plan = RunPlan {
        shared: SharedSettings::of(&together[0].config),
        adapters: together.clone(),
    };
    for o in train_plan(&plan, RunControl::default(), |_| {}).unwrap() {
        o.result.unwrap();
    }
    for (t, a) in together.iter().zip(adapters(&root.join("alone"), device)) {
        train(&a.config, |_| {}).unwrap();
        let (lt, la) = (losses(&t.config.out_dir), losses(&a.config.out_dir));
        assert_eq!(lt.len(), la.len(), "{}", t.name);
        for ((s, x), (_, y)) in lt.iter().zip(&la) {
            let rel = (x - y).abs() / y.abs().max(1e-6);
            assert!(
                rel <= 1e-2,
                "{} step {s}: loss {x} together, {y} alone",
                t.name
            );
        }
        let (vt, va) = (
            adapter_values(&t.config.out_dir),
            adapter_values(&a.config.out_dir),
        );
        let err = testutil::gpu::rel_err(&va, &vt);
        eprintln!("{}: adapter weights, relative difference {err:.2e}", t.name);
        assert!(
            err <= 2e-2,
            "{}: adapter weights differ by {err:.2e}",
            t.name
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// With `--cuda-graphs on` each adapter records its own micro-steps (its own graphs and lane),
/// replayed side by side (`exact`, each adapter its own graph memory) or one after another
/// (`sequential`, one graph memory for all): each adapter still ends bit for bit where it ends
/// alone with `on` (losses and adapter file), and every adapter's steps were replayed as graphs.
#[test]
fn adapters_trained_together_as_cuda_graphs_equal_each_alone_bit_for_bit() {
    let Some(device) = gpu() else { return };
    let root = common::out_dir("multi-gpu", "graphs");
    let on = |root: &Path| -> Vec<PlannedAdapter> {
        let mut v = adapters(root, device);
        // A third adapter: the second's settings, another seed and learning rate.
        let mut third = v[1].clone();
        third.name = "mix_seed7".into();
        third.config.seed = 7;
        third.config.lr = 2e-3;
        third.config.out_dir = root.join("mix_seed7");
        v.push(third);
        for a in &mut v {
            a.config.cuda_graphs = CudaGraphs::On;
        }
        v
    };
    let alone = on(&root.join("alone"));
    for a in &alone {
        train(&a.config, |_| {}).unwrap();
    }
    for mode in [model::GroupMode::Exact, model::GroupMode::Sequential] {
        let together = on(&root.join(format!("{mode:?}")));
        let mut plan = RunPlan {
            shared: SharedSettings::of(&together[0].config),
            adapters: together.clone(),
        };
        plan.shared.group_mode = Some(mode);
        let mut lines = Vec::new();
        for o in train_plan(&plan, RunControl::default(), |l| lines.push(l.to_string())).unwrap() {
            o.result.unwrap();
        }
        for t in &together {
            let tag = format!("[{}] fixed-shape micro-steps:", t.name);
            let line = lines.iter().find(|l| l.starts_with(&tag));
            let line = line.unwrap_or_else(|| panic!("{mode:?}: no line {tag:?} in {lines:#?}"));
            assert!(!line.contains(" 0 recorded"), "{mode:?}: {line}");
        }
        for (t, a) in together.iter().zip(&alone) {
            assert_eq!(
                losses(&t.config.out_dir),
                losses(&a.config.out_dir),
                "{mode:?}, {}: the losses differ",
                t.name
            );
            let file = "adapter/adapter_model.safetensors";
            let (ft, fa) = (t.config.out_dir.join(file), a.config.out_dir.join(file));
            assert!(
                std::fs::read(ft).unwrap() == std::fs::read(fa).unwrap(),
                "{mode:?}, {}: {file} differs",
                t.name
            );
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}
