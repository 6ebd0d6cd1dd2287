//! The training variants beyond the paper (docs/DESIGN.md, "Variants"), end to end on the
//! built-in tiny model: each flag given at its default trains bit for bit as without it (through
//! the binary), changes training when on, is recorded in `train_config.toml` and kept by a
//! resumed run (which follows the uninterrupted one exactly), and a resume with another value is
//! refused. Also the optimizer's router learning rate against separate optimizers.
//! (`--router-z-loss`, `--router-lr-scale`, `--expert-b-init-std`.)

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::losses;
use engine::{DType, Device, Tensor};
use trainer::config::TrainConfig;
use trainer::optim::{AdamW, AdamWConfig};
use trainer::run::{train, train_until};

fn out_dir(name: &str) -> PathBuf {
    common::out_dir("variants", name)
}

/// A small, fast run: batch 4 in micro-batches of 2, short sequences, 6 steps.
fn small(out: &Path) -> TrainConfig {
    TrainConfig {
        out_dir: out.to_path_buf(),
        batch_size: 4,
        micro_batch_size: 2,
        cutoff_len: 320,
        epochs: 1,
        max_steps: Some(6),
        save_every: 3,
        eval_every: 0,
        eval_limit: Some(4),
        log_every: 1,
        ..TrainConfig::default()
    }
}

/// The bytes of `out`'s final adapter weights.
fn adapter_bytes(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("adapter").join("adapter_model.safetensors")).unwrap()
}

/// The `key` values of every train line of `out`'s metrics.jsonl.
fn metric(out: &Path, key: &str) -> Vec<Option<f64>> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| v[key].as_f64())
        .collect()
}

/// `mixlora train` on the built-in model for 4 steps with `flags`.
fn run_binary(out: &Path, flags: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_mixlora"))
        .args(["train", "--max-steps", "4", "--eval-limit", "2", "--out"])
        .arg(out)
        .args(flags)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{flags:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Each variant's flag given at its default trains exactly as without it: same losses, same
/// adapter bytes (the paper's behaviour).
#[test]
fn every_variant_flag_at_its_default_trains_bit_for_bit_as_without_it() {
    let plain = out_dir("default-plain");
    run_binary(&plain, &[]);
    let explicit = out_dir("default-explicit");
    run_binary(
        &explicit,
        &[
            "--router-z-loss",
            "0",
            "--router-lr-scale",
            "1",
            "--expert-b-init-std",
            "0",
        ],
    );
    assert_eq!(losses(&plain), losses(&explicit));
    assert_eq!(adapter_bytes(&plain), adapter_bytes(&explicit));
    assert!(metric(&plain, "z_loss").iter().all(Option::is_none));
    let settings = std::fs::read_to_string(plain.join("train_config.toml")).unwrap();
    assert!(settings.contains("router_z_loss = 0.0"), "{settings}");
    assert!(settings.contains("router_lr_scale = 1.0"), "{settings}");
    assert!(settings.contains("expert_b_init_std = 0.0"), "{settings}");
    for d in [plain, explicit] {
        let _ = std::fs::remove_dir_all(&d);
    }
}

/// A variant on: the run records it, trains differently from the paper's, and a kill and resume
/// follows the uninterrupted run exactly; resuming with the variant changed is refused.
/// `same_start`: whether the first step's LM loss is the paper's (a variant of the updates) or
/// not (a variant of the initial adapter).
fn resumes_exactly_and_keeps(
    name: &str,
    on: impl Fn(&Path) -> TrainConfig,
    key: &str,
    same_start: bool,
) {
    let paper = out_dir(&format!("{name}-paper"));
    train(&small(&paper), |_| {}).unwrap();
    let a = out_dir(&format!("{name}-whole"));
    train(&on(&a), |_| {}).unwrap();
    let (lp, la) = (losses(&paper), losses(&a));
    assert_eq!(la.len(), 6);
    assert!(la.iter().all(|(_, l)| l.is_finite()));
    assert_eq!(
        lp[0] == la[0],
        same_start,
        "{name}: the first step's LM loss is the paper's unless the variant changes the init"
    );
    assert_ne!(lp, la, "{name}: the variant must change training");
    assert_ne!(adapter_bytes(&paper), adapter_bytes(&a));
    let settings = std::fs::read_to_string(a.join("train_config.toml")).unwrap();
    assert!(settings.contains(key), "{settings}");

    let b = out_dir(&format!("{name}-resumed"));
    train_until(&on(&b), Some(3), |_| {}).unwrap();
    let e = train(
        &TrainConfig {
            resume: true,
            ..small(&b)
        },
        |_| {},
    )
    .unwrap_err()
    .to_string();
    let key_name = key.split(' ').next().unwrap();
    assert!(e.contains(key_name), "{name}: {e}");
    train(
        &TrainConfig {
            resume: true,
            ..on(&b)
        },
        |_| {},
    )
    .unwrap();
    assert_eq!(
        la,
        losses(&b),
        "{name}: the resumed run must repeat the whole one"
    );
    assert_eq!(adapter_bytes(&a), adapter_bytes(&b));
    for d in [paper, a, b] {
        let _ = std::fs::remove_dir_all(&d);
    }
}

#[test]
fn router_z_loss_changes_training_is_reported_and_resumes() {
    let on = |out: &Path| TrainConfig {
        router_z_loss: 0.5,
        ..small(out)
    };
    resumes_exactly_and_keeps("zloss", on, "router_z_loss = 0.5", true);
    // Reported like the aux loss: every train line, already times its coefficient.
    let out = out_dir("zloss-metrics");
    train_until(&on(&out), Some(2), |_| {}).unwrap();
    let z = metric(&out, "z_loss");
    assert_eq!(z.len(), 2);
    assert!(
        z.iter()
            .all(|z| z.is_some_and(|z| z > 0.0 && z.is_finite())),
        "{z:?}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn router_lr_scale_changes_training_and_resumes() {
    let on = |out: &Path| TrainConfig {
        router_lr_scale: 10.0,
        ..small(out)
    };
    resumes_exactly_and_keeps("routerlr", on, "router_lr_scale = 10.0", true);
}

#[test]
fn expert_b_init_changes_training_and_resumes() {
    let on = |out: &Path| TrainConfig {
        expert_b_init_std: 0.05,
        ..small(out)
    };
    resumes_exactly_and_keeps("binit", on, "expert_b_init_std = 0.05", false);
}

#[test]
fn router_variants_are_refused_for_plain_lora() {
    for (cfg, key) in [
        (
            TrainConfig {
                adapter: model::PeftType::Lora,
                router_z_loss: 0.1,
                ..TrainConfig::default()
            },
            "router_z_loss",
        ),
        (
            TrainConfig {
                adapter: model::PeftType::Lora,
                router_lr_scale: 2.0,
                ..TrainConfig::default()
            },
            "router_lr_scale",
        ),
        (
            TrainConfig {
                adapter: model::PeftType::Lora,
                expert_b_init_std: 0.1,
                ..TrainConfig::default()
            },
            "expert_b_init_std",
        ),
        (
            TrainConfig {
                expert_b_init_std: f64::NAN,
                ..TrainConfig::default()
            },
            "expert_b_init_std",
        ),
        (
            TrainConfig {
                router_z_loss: -1.0,
                ..TrainConfig::default()
            },
            "router_z_loss",
        ),
        (
            TrainConfig {
                router_lr_scale: 0.0,
                ..TrainConfig::default()
            },
            "router_lr_scale",
        ),
    ] {
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains(key), "{e}");
    }
}

/// `AdamW::scale_lr`: the parameters it picks take `scale·lr`, the others `lr`, exactly as two
/// optimizers of their own would give; a scale of 1 changes nothing.
#[test]
fn scaled_parameters_step_as_with_their_own_optimizer() {
    let cfg = AdamWConfig::default();
    let make = |names: &[&str]| -> Vec<(String, Tensor)> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let t = Tensor::rand_uniform(37, -1.0, 1.0, 10 + i as u64, DType::F32, Device::Cpu)
                    .unwrap()
                    .to_var()
                    .unwrap();
                (n.to_string(), t)
            })
            .collect()
    };
    let names = [
        "mixlora.layers.0.mlp.moe_gate.weight",
        "mixlora.layers.0.mlp.up_proj.experts.0.lora_A.weight",
        "mixlora.layers.1.mlp.moe_gate.weight",
    ];
    let set_grads = |ps: &[(String, Tensor)]| {
        for (i, (_, p)) in ps.iter().enumerate() {
            let c = Tensor::rand_uniform(37, -1.0, 1.0, 50 + i as u64, DType::F32, Device::Cpu)
                .unwrap();
            p.mul(&c).unwrap().sum_all().unwrap().backward().unwrap();
        }
    };
    let values = |ps: &[(String, Tensor)]| -> Vec<Vec<f32>> {
        ps.iter().map(|(_, p)| p.to_vec_f32().unwrap()).collect()
    };
    let lr = 1e-2;
    for (scale, fused) in [(4.0, true), (4.0, false), (1.0, true)] {
        let grouped = make(&names);
        let mut opt = AdamW::new(grouped.clone(), cfg).unwrap();
        assert_eq!(opt.scale_lr(scale, model::adapters::is_router_param), 2);
        let alone = make(&names);
        let (routers, rest): (Vec<_>, Vec<_>) = alone
            .iter()
            .cloned()
            .partition(|(n, _)| model::adapters::is_router_param(n));
        let mut opt_r = AdamW::new(routers, cfg).unwrap();
        let mut opt_o = AdamW::new(rest, cfg).unwrap();
        for _ in 0..3 {
            set_grads(&grouped);
            set_grads(&alone);
            if fused {
                opt.step(lr, 0.5).unwrap();
            } else {
                opt.step_reference(lr, 0.5).unwrap();
            }
            opt_r.step(lr * scale, 0.5).unwrap();
            opt_o.step(lr, 0.5).unwrap();
            opt.zero_grad();
            opt_r.zero_grad();
            opt_o.zero_grad();
        }
        assert_eq!(
            values(&grouped),
            values(&alone),
            "scale {scale} fused {fused}"
        );
    }
}
