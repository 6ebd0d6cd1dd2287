//! Fixed-shape micro-steps (`--cuda-graphs eager`, the path CUDA graphs record) on the CPU: with
//! dropout off they train as the default path does (the padding to length buckets and full rows
//! adds nothing; only the loss normalisation's rounding differs), with dropout on they are
//! deterministic and a killed run resumes exactly; `on` without a GPU and several adapters in one
//! batch (`--group-mode shared`) are refused with one-line errors, while `auto` runs them kernel
//! by kernel. (Several adapters each on its own: tests/multi_adapter_train.rs.)

mod common;

use std::path::Path;

use common::losses;
use model::adapters::PeftType;
use trainer::config::{CudaGraphs, PlannedAdapter, RunPlan, SharedSettings, TrainConfig};
use trainer::run::{train, train_plan, train_until, RunControl};

/// Batch 4 in micro-batches of 2, the synthetic tasks' ragged lengths (several buckets of 64
/// below the cutoff).
fn small(out: &Path, graphs: CudaGraphs) -> TrainConfig {
    TrainConfig {
        out_dir: out.to_path_buf(),
        batch_size: 4,
        micro_batch_size: 2,
        cutoff_len: 320,
        epochs: 1,
        max_steps: Some(6),
        save_every: 3,
        eval_every: 0,
        eval_limit: Some(2),
        log_every: 1,
        lr: 3e-3,
        cuda_graphs: graphs,
        ..TrainConfig::default()
    }
}

/// Adapters `a` and `b`, each [`small`] in its folder under `root`, in one run.
fn two_adapters(root: &Path, graphs: CudaGraphs) -> RunPlan {
    let adapters: Vec<PlannedAdapter> = ["a", "b"]
        .into_iter()
        .map(|n| PlannedAdapter {
            name: n.into(),
            config: small(&root.join(n), graphs),
        })
        .collect();
    RunPlan {
        shared: SharedSettings::of(&adapters[0].config),
        adapters,
    }
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-30)
}

#[test]
fn without_dropout_fixed_shapes_train_as_the_default_path() {
    for adapter in [PeftType::MixLora, PeftType::Lora] {
        let run = |graphs| {
            let out = common::out_dir("fixed", &format!("nodrop-{adapter}-{graphs:?}"));
            let cfg = TrainConfig {
                dropout: 0.0,
                adapter,
                ..small(&out, graphs)
            };
            let mut lines = Vec::new();
            train(&cfg, |l| lines.push(l.to_string())).unwrap();
            let l = losses(&out);
            let _ = std::fs::remove_dir_all(&out);
            (l, lines)
        };
        let (off, _) = run(CudaGraphs::Off);
        let (fixed, lines) = run(CudaGraphs::Eager);
        assert_eq!(off.len(), 6);
        assert_eq!(fixed.len(), 6);
        // The same sums in another order of rounding: the loss scale is a device scalar in f32
        // where the default path multiplies by a host f64. A wrong padding, normalisation or
        // gradient sum would move the losses by far more than f32 rounding.
        for ((s, a), (_, b)) in off.iter().zip(&fixed) {
            assert!(
                relative(*a, *b) < 1e-5,
                "{adapter} step {s}: default {a} vs fixed-shape {b}"
            );
        }
        let summary = lines
            .iter()
            .find(|l| l.starts_with("fixed-shape micro-steps"))
            .expect("the run says how many shapes it used");
        assert!(
            summary.contains("of 2 rows, 0 recorded"),
            "eager records nothing: {summary}"
        );
    }
}

#[test]
fn with_dropout_fixed_shapes_repeat_themselves_and_resume_exactly() {
    let a = common::out_dir("fixed", "whole");
    train(&small(&a, CudaGraphs::Eager), |_| {}).unwrap();
    let again = common::out_dir("fixed", "again");
    train(&small(&again, CudaGraphs::Eager), |_| {}).unwrap();
    let b = common::out_dir("fixed", "resumed");
    train_until(&small(&b, CudaGraphs::Eager), Some(3), |_| {}).unwrap();
    let resumed = TrainConfig {
        resume: true,
        ..small(&b, CudaGraphs::Eager)
    };
    train(&resumed, |_| {}).unwrap();
    let (la, lg, lb) = (losses(&a), losses(&again), losses(&b));
    assert_eq!(la.len(), 6);
    assert!(la.iter().all(|(_, l)| l.is_finite()));
    assert_eq!(la, lg, "two fixed-shape runs differ");
    assert_eq!(
        la, lb,
        "the resumed run must repeat the uninterrupted one exactly"
    );
    // Dropout is on: the keyed masks are not the default path's, so the losses differ from it
    // (while the first step's forward, before any update, already does).
    let off = common::out_dir("fixed", "off");
    train(&small(&off, CudaGraphs::Off), |_| {}).unwrap();
    assert_ne!(
        losses(&off),
        la,
        "dropout masks did not change with the key"
    );
    for d in [a, again, b, off] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn graphs_on_the_cpu_and_adapters_in_one_batch_are_refused() {
    let out = common::out_dir("fixed", "cpu-on");
    let e = train(&small(&out, CudaGraphs::On), |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--cuda-graphs on") && e.contains("--device cuda") && !e.contains('\n'),
        "{e}"
    );
    assert!(!out.exists(), "nothing is written for a refused run");
    let root = common::out_dir("fixed", "two");
    let mut plan = two_adapters(&root, CudaGraphs::Eager);
    plan.shared.group_mode = Some(model::GroupMode::Shared);
    let e = train_plan(&plan, RunControl::default(), |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--cuda-graphs eager") && e.contains("--group-mode shared") && !e.contains('\n'),
        "{e}"
    );
    assert!(!root.exists());
    // More adapters than a device has lanes (each adapter's graphs need one of their own).
    let many: Vec<PlannedAdapter> = (0..=engine::LANES)
        .map(|i| PlannedAdapter {
            name: format!("a{i}"),
            config: small(&root.join(format!("a{i}")), CudaGraphs::Eager),
        })
        .collect();
    let plan = RunPlan {
        shared: SharedSettings::of(&many[0].config),
        adapters: many,
    };
    let e = train_plan(&plan, RunControl::default(), |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("at most 64 adapters together; this run has 65") && !e.contains('\n'),
        "{e}"
    );
    assert!(!root.exists());
}

#[test]
fn auto_runs_kernel_by_kernel_on_the_cpu_for_one_adapter_and_several() {
    // One adapter on the CPU: `auto` is `off`, bit for bit (dropout on).
    let (auto, off) = (
        common::out_dir("fixed", "auto-one"),
        common::out_dir("fixed", "off-one"),
    );
    train(&small(&auto, CudaGraphs::Auto), |_| {}).unwrap();
    train(&small(&off, CudaGraphs::Off), |_| {}).unwrap();
    assert_eq!(losses(&auto).len(), 6);
    assert_eq!(losses(&auto), losses(&off));
    // Two adapters: each trains as `off` alone.
    let root = common::out_dir("fixed", "auto-two");
    for o in train_plan(
        &two_adapters(&root, CudaGraphs::Auto),
        RunControl::default(),
        |_| {},
    )
    .unwrap()
    {
        o.result.unwrap();
    }
    assert_eq!(losses(&root.join("a")), losses(&off));
    for d in [auto, off, root] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Five examples, batch 4 in micro-batches of 2: the epoch's last step is one example, a micro-
/// batch of one row that fixed shapes pad to two (a row of padding only).
fn five_examples(dir: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let items: Vec<serde_json::Value> = (0..5)
        .map(|i| {
            let q = "Which is larger?".repeat(i + 1);
            serde_json::json!({
                "instruction": format!("{q} Answer1: {i} Answer2: {}", i + 1),
                "input": "",
                "output": "the correct answer is answer2",
                "answer": "answer2",
            })
        })
        .collect();
    let p = dir.join("five.json");
    std::fs::write(&p, serde_json::to_string(&items).unwrap()).unwrap();
    p
}

#[test]
fn a_partial_micro_batch_padded_to_full_rows_trains_as_unpadded() {
    let data_dir = common::out_dir("fixed", "five-data");
    let data = five_examples(&data_dir);
    let run = |graphs| {
        let out = common::out_dir("fixed", &format!("five-{graphs:?}"));
        let cfg = TrainConfig {
            data: vec![data.clone()],
            dropout: 0.0,
            epochs: 2,
            max_steps: None,
            save_every: 0,
            eval_limit: Some(1),
            ..small(&out, graphs)
        };
        train(&cfg, |_| {}).unwrap();
        let l = losses(&out);
        let _ = std::fs::remove_dir_all(&out);
        l
    };
    let (off, fixed) = (run(CudaGraphs::Off), run(CudaGraphs::Eager));
    assert_eq!(
        off.len(),
        4,
        "two steps an epoch, the second of one example"
    );
    assert_eq!(fixed.len(), 4);
    for ((s, a), (_, b)) in off.iter().zip(&fixed) {
        assert!(
            relative(*a, *b) < 1e-5,
            "step {s}: default {a} vs fixed-shape {b}"
        );
    }
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// A fixed-shape run that ends in an error (here an interrupt) leaves no dropout key behind: a
/// kernel-by-kernel run afterwards on the same thread draws the masks of a fresh one, bit for bit.
#[test]
fn an_interrupted_fixed_shape_run_leaves_the_dropout_key_at_zero() {
    let (before, fixed, after) = (
        common::out_dir("fixed", "key-before"),
        common::out_dir("fixed", "key-fixed"),
        common::out_dir("fixed", "key-after"),
    );
    train(&small(&before, CudaGraphs::Off), |_| {}).unwrap();
    // Interrupted from the first step on: the run stops with an error after its first step.
    let flag = std::sync::atomic::AtomicBool::new(false);
    let raise = |_: &trainer::run::StepDone| flag.store(true, std::sync::atomic::Ordering::SeqCst);
    let ctl = RunControl {
        interrupt: Some(&flag),
        on_step: Some(&raise),
        ..RunControl::default()
    };
    let cfg = small(&fixed, CudaGraphs::Eager);
    let e = trainer::run::train_with(&cfg, ctl, |_| {}).unwrap_err();
    assert!(matches!(e, trainer::Error::Interrupted { .. }), "{e}");
    train(&small(&after, CudaGraphs::Off), |_| {}).unwrap();
    assert_eq!(losses(&before).len(), 6);
    assert_eq!(
        losses(&after),
        losses(&before),
        "a dropout key was left set"
    );
    for d in [before, fixed, after] {
        let _ = std::fs::remove_dir_all(d);
    }
}
