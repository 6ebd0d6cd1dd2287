//! On one GPU: a data-parallel world of one rank through NCCL (the rendezvous-free path: rank 0
//! makes the unique id itself) trains exactly as today's single-GPU path, the same losses and
//! adapter bytes, for fused MixLoRA and LoRA: each micro-batch's gradients leave the parameters,
//! go through an NCCL all-gather and are replayed in order. Skips, saying why, without a GPU, when
//! built without the `cuda` feature, or when libnccl cannot be opened
//! (scripts/dev/run-gpu-tests.sh links it from the machine's NCCL install).

mod common;

use std::path::Path;

use common::{gpu, losses};
use engine::dist::Communicator;
use engine::Device;
use model::adapters::PeftType;
use trainer::config::{DTypeName, PlannedAdapter, RunPlan, SharedSettings, TrainConfig};
use trainer::run::{train_plan, RunControl};

/// NCCL on GPU 0 as rank 0 of a world of one, or `None` after printing why the test skips.
fn nccl_world_of_one() -> Option<Box<dyn Communicator>> {
    #[cfg(feature = "cuda")]
    {
        use engine::dist::{nccl_unique_id, NcclComm};
        let timeout = std::time::Duration::from_secs(60);
        match nccl_unique_id(1).and_then(|id| NcclComm::new(0, 0, 1, &id, timeout)) {
            Ok(c) => Some(Box::new(c)),
            Err(e) => {
                testutil::skip(format_args!("NCCL unusable: {e}"));
                None
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    None
}

fn plan(root: &Path, device: Device) -> RunPlan {
    let base = TrainConfig {
        device,
        dtype: DTypeName::Bf16,
        batch_size: 4,
        micro_batch_size: 1,
        cutoff_len: 200,
        max_steps: Some(4),
        save_every: 0,
        eval_every: 0,
        eval_limit: Some(2),
        log_every: 1,
        lr: 1e-3,
        ..TrainConfig::default()
    };
    let adapters: Vec<PlannedAdapter> = [
        ("mix", base.clone()),
        (
            "lora",
            TrainConfig {
                adapter: PeftType::Lora,
                lr: 3e-3,
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
    .collect();
    RunPlan {
        shared: SharedSettings::of(&adapters[0].config),
        adapters,
    }
}

fn adapter_bytes(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("adapter/adapter_model.safetensors")).expect("adapter file")
}

#[test]
fn a_world_of_one_through_nccl_trains_as_the_single_gpu_path() {
    let Some(device) = gpu() else { return };
    let Some(comm) = nccl_world_of_one() else {
        return;
    };
    let root = common::out_dir("dp-gpu", "world-of-one");
    let run = |dir: &str, comm: Option<&dyn Communicator>| {
        let p = plan(&root.join(dir), device);
        let ctl = RunControl {
            comm,
            ..RunControl::default()
        };
        train_plan(&p, ctl, |_| {}).expect("run");
        p
    };
    let single = run("single", None);
    let again = run("again", None);
    let nccl = run("nccl", Some(comm.as_ref()));
    for ((s, a), n) in single
        .adapters
        .iter()
        .zip(&again.adapters)
        .zip(&nccl.adapters)
    {
        let (ls, la, ln) = (
            losses(&s.config.out_dir),
            losses(&a.config.out_dir),
            losses(&n.config.out_dir),
        );
        assert_eq!(ls.len(), 4, "{}: steps", s.name);
        // The single-GPU path repeats itself bit for bit (else the comparison below could not be
        // exact: say so rather than blame the data-parallel path).
        assert_eq!(ls, la, "{}: two single-GPU runs differ", s.name);
        assert_eq!(ls, ln, "{}: NCCL world of one against one GPU", s.name);
        assert!(
            adapter_bytes(&s.config.out_dir) == adapter_bytes(&n.config.out_dir),
            "{}: the adapter files differ",
            s.name
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}
