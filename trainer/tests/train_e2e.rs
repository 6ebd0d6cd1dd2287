//! End-to-end runs of the training loop on the built-in tiny model and synthetic tasks: the loss
//! falls, a killed and resumed run follows the uninterrupted one exactly, a diverging run stops
//! with its step and keeps the last good checkpoint, and bad input gives one-line errors.

mod common;

use std::path::{Path, PathBuf};

use common::losses;
use trainer::config::TrainConfig;
use trainer::run::{train, train_until};

fn out_dir(name: &str) -> PathBuf {
    common::out_dir("e2e", name)
}

/// A small, fast run: batch 4 in micro-batches of 2, short sequences.
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

#[test]
fn loss_falls_on_the_synthetic_tasks() {
    let out = out_dir("falls");
    let cfg = TrainConfig {
        lr: 3e-3,
        max_steps: Some(30),
        save_every: 0,
        ..small(&out)
    };
    let s = train(&cfg, |_| {}).unwrap();
    let l = losses(&out);
    assert_eq!(l.len(), 30);
    let first: f64 = l[..3].iter().map(|x| x.1).sum::<f64>() / 3.0;
    let last: f64 = l[27..].iter().map(|x| x.1).sum::<f64>() / 3.0;
    assert!(
        last < 0.7 * first,
        "loss did not fall: {first:.3} -> {last:.3}"
    );
    assert!(s.adapter_dir.join("adapter_model.safetensors").is_file());
    assert!(s.eval.is_some());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn killed_and_resumed_run_follows_the_uninterrupted_one() {
    let a = out_dir("whole");
    let whole = small(&a);
    train(&whole, |_| {}).unwrap();

    let b = out_dir("resumed");
    let first = small(&b);
    // Killed right after the step-3 checkpoint, then resumed from it.
    train_until(&first, Some(3), |_| {}).unwrap();
    assert!(b.join("checkpoint-3").is_dir());
    let resumed = TrainConfig {
        resume: true,
        ..small(&b)
    };
    train(&resumed, |_| {}).unwrap();

    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 6);
    assert_eq!(
        la, lb,
        "the resumed run must repeat the uninterrupted loss trajectory exactly"
    );
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&b);
}

/// A resumed run computes its MoE FFNs as its settings say (here the fused path, whose rounding
/// differs from the default loop's on the CPU): it follows the uninterrupted run exactly.
#[test]
fn a_resumed_run_keeps_its_moe_implementation() {
    let fused = |out: &Path| TrainConfig {
        moe_impl: Some(model::MoeImpl::Fused(Default::default())),
        ..small(out)
    };
    let a = out_dir("fused-whole");
    train(&fused(&a), |_| {}).unwrap();
    let b = out_dir("fused-resumed");
    train_until(&fused(&b), Some(3), |_| {}).unwrap();
    let resumed = TrainConfig {
        resume: true,
        ..fused(&b)
    };
    train(&resumed, |_| {}).unwrap();
    assert_eq!(losses(&a), losses(&b));
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&b);
}

/// `--packing`: a run whose rows pack several examples records the setting, takes more tokens
/// per step than the unpacked run, continues exactly after a kill and resume (the cursor stops
/// between packed rows), and refuses to resume with packing turned off.
#[test]
fn a_packed_run_resumes_exactly_and_keeps_its_packing() {
    // Rows of 1024 tokens hold three or four of the synthetic examples (about 265 tokens).
    let unpacked = |out: &Path| TrainConfig {
        cutoff_len: 1024,
        ..small(out)
    };
    let packed = |out: &Path| TrainConfig {
        packing: true,
        ..unpacked(out)
    };
    let a = out_dir("packed-whole");
    let mut lines = Vec::new();
    train(&packed(&a), |l| lines.push(l.to_string())).unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("packed rows of up to 1024 tokens")),
        "{lines:?}"
    );
    let settings = std::fs::read_to_string(a.join("train_config.toml")).unwrap();
    assert!(settings.contains("packing = true"), "{settings}");
    let tokens = |out: &Path| -> u64 {
        let state = out.join("checkpoint-6").join("trainer_state.json");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(state).unwrap()).unwrap();
        v["tokens_seen"].as_u64().unwrap()
    };
    let plain = out_dir("packed-plain");
    train(&unpacked(&plain), |_| {}).unwrap();
    assert!(
        tokens(&a) > 2 * tokens(&plain),
        "packed rows hold several examples: {} vs {} tokens",
        tokens(&a),
        tokens(&plain)
    );

    let b = out_dir("packed-resumed");
    train_until(&packed(&b), Some(3), |_| {}).unwrap();
    let unpacked_resume = TrainConfig {
        resume: true,
        ..unpacked(&b)
    };
    let e = train(&unpacked_resume, |_| {}).unwrap_err().to_string();
    assert!(e.contains("packing is true there but false here"), "{e}");
    let resumed = TrainConfig {
        resume: true,
        ..packed(&b)
    };
    train(&resumed, |_| {}).unwrap();
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 6);
    assert!(la.iter().all(|(_, l)| l.is_finite()));
    assert_eq!(
        la, lb,
        "the resumed packed run must repeat the whole one exactly"
    );
    for d in [a, b, plain] {
        let _ = std::fs::remove_dir_all(&d);
    }
}

/// The step that a run's error `step N: ...` names.
fn failed_step(err: &str) -> usize {
    let after = err.split("step ").nth(1).expect("the error names a step");
    after.split(':').next().unwrap().parse().unwrap()
}

#[test]
fn diverging_run_stops_and_keeps_the_last_good_checkpoint() {
    let out = out_dir("nan");
    let cfg = TrainConfig {
        lr: 1e12,
        max_grad_norm: 1e30,
        save_every: 1,
        warmup_steps: Some(0),
        ..small(&out)
    };
    let err = train(&cfg, |_| {}).unwrap_err().to_string();
    assert!(err.contains("not finite"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");
    let step = failed_step(&err);
    assert!(step >= 2, "{err}");
    let kept = out.join(format!("checkpoint-{}", step - 1));
    assert!(err.contains(&kept.display().to_string()), "{err}");
    assert!(kept.join("adapter_model.safetensors").is_file());
    let _ = std::fs::remove_dir_all(&out);
}

/// The metrics' train records (every field but the timings) of the run in `out`.
fn train_records(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|mut v| {
            let o = v.as_object_mut().unwrap();
            o.remove("tokens_per_s");
            o.remove("elapsed_s");
            v
        })
        .collect()
}

/// A step is read back after the next one is queued, unless a checkpoint (or the end) reads its
/// parameters: with a checkpoint after every step, every step is read before the next. Both
/// give the same metrics (loss, gradient norm, learning rate, epoch, expert loads) and the same
/// adapter bit for bit.
#[test]
fn queued_steps_train_as_steps_read_one_by_one() {
    let (queued, one_by_one) = (out_dir("queued"), out_dir("one-by-one"));
    for (out, save_every) in [(&queued, 0), (&one_by_one, 1)] {
        let cfg = TrainConfig {
            max_steps: Some(5),
            save_every,
            ..small(out)
        };
        train(&cfg, |_| {}).unwrap();
    }
    let (a, b) = (train_records(&queued), train_records(&one_by_one));
    assert_eq!(a.len(), 5);
    assert!(a[0].get("expert_load").is_some(), "{:?}", a[0]);
    assert_eq!(a, b);
    let adapter = |d: &Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(adapter(&queued), adapter(&one_by_one));
    for d in [queued, one_by_one] {
        let _ = std::fs::remove_dir_all(&d);
    }
}

/// A run whose loss turns non-finite on a step that is read back late (no checkpoint at it)
/// stops there all the same: one line naming that step and the last good checkpoint (the one
/// before it), and no final adapter.
#[test]
fn a_divergence_found_a_step_late_still_keeps_the_last_good_checkpoint() {
    let out = out_dir("nan-queued");
    let cfg = TrainConfig {
        lr: 1e4, // diverges after a few steps (step 5 here)
        max_grad_norm: 1e30,
        save_every: 4,
        max_steps: Some(12),
        warmup_steps: Some(0),
        ..small(&out)
    };
    let err = train(&cfg, |_| {}).unwrap_err().to_string();
    eprintln!("{err}");
    assert!(err.contains("not finite"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");
    let step = failed_step(&err);
    assert!(step >= 2, "{err}");
    let saved = (step - 1) / 4 * 4;
    if saved > 0 {
        let kept = out.join(format!("checkpoint-{saved}"));
        assert!(err.contains(&kept.display().to_string()), "{err}");
        assert!(kept.join("adapter_model.safetensors").is_file());
    } else {
        assert!(err.contains("none yet"), "{err}");
    }
    assert!(!out.join("adapter").exists());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn bad_input_gives_one_line_errors() {
    let out = out_dir("bad");
    let missing = TrainConfig {
        model: Some(out.join("nope.gguf")),
        ..small(&out)
    };
    let e = train(&missing, |_| {}).unwrap_err().to_string();
    assert!(e.contains("nope.gguf") && !e.contains('\n'), "{e}");

    std::fs::create_dir_all(&out).unwrap();
    let empty = out.join("empty.json");
    std::fs::write(&empty, "[]").unwrap();
    let cfg = TrainConfig {
        data: vec![empty.clone()],
        ..small(&out)
    };
    let e = train(&cfg, |_| {}).unwrap_err().to_string();
    assert!(e.contains("empty.json") && !e.contains('\n'), "{e}");

    let bad = out.join("bad.json");
    std::fs::write(
        &bad,
        r#"[{"instruction": "x", "output": "y"}, {"instruction": 3}]"#,
    )
    .unwrap();
    let cfg = TrainConfig {
        data: vec![bad],
        ..small(&out)
    };
    let e = train(&cfg, |_| {}).unwrap_err().to_string();
    assert!(e.contains("bad.json") && e.contains("1"), "{e}");
    let _ = std::fs::remove_dir_all(&out);
}

/// `mixlora eval --routing`: per task and MoE layer, the expert shares of the scored tokens (each
/// layer's shares sum to 1, E = 8 experts, one row per layer of the built-in model), next to the
/// same accuracy report as a plain eval; a LoRA adapter is refused with a one-line error.
#[test]
fn eval_writes_routing_statistics_per_task_and_layer() {
    let out = out_dir("routing");
    let s = train(&small(&out), |_| {}).unwrap();
    let routing = out.join("routing.json");
    let args = |routing: Option<PathBuf>| trainer::config::EvalArgs {
        model: None,
        adapter: vec![s.adapter_dir.clone()],
        data: vec![],
        limit: Some(3),
        batch_size: 8,
        cutoff_len: 320,
        device: engine::Device::Cpu,
        dtype: trainer::config::DTypeName::F32,
        base_dtype: Default::default(),
        output: None,
        routing,
        moe: Default::default(),
    };
    let plain = trainer::scoring::eval(&args(None)).unwrap();
    let with = trainer::scoring::eval(&args(Some(routing.clone()))).unwrap();
    assert_eq!(plain.to_json_pretty(), with.to_json_pretty());
    // The fused MoE path (the GPU default) scores the same answers as the naive one (the CPU's).
    let fused = trainer::scoring::eval(&trainer::config::EvalArgs {
        moe: trainer::config::MoeArgs {
            moe_impl: Some(model::MoeImpl::Fused(Default::default())),
            ..Default::default()
        },
        ..args(None)
    })
    .unwrap();
    assert_eq!(plain.to_json_pretty(), fused.to_json_pretty());
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&routing).unwrap()).unwrap();
    assert_eq!(j["num_experts"], 8);
    let layers = j["layers"].as_u64().unwrap() as usize;
    assert!(layers >= 1);
    let tasks = j["tasks"].as_object().unwrap();
    assert_eq!(tasks.len(), 4, "the four synthetic tasks");
    for (task, per_layer) in tasks {
        let per_layer = per_layer.as_array().unwrap();
        assert_eq!(per_layer.len(), layers, "{task}");
        for shares in per_layer {
            let v: Vec<f64> = shares
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert_eq!(v.len(), 8);
            assert!((v.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{task}: {v:?}");
            assert!(v.iter().all(|&x| (0.0..=1.0).contains(&x)));
        }
        // Top-2 routing: twice as many (token, slot) pairs as real tokens, in every layer.
        let counts = j["counts"][task].as_array().unwrap();
        let totals: Vec<f64> = counts
            .iter()
            .map(|c| {
                c.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .sum()
            })
            .collect();
        assert!(
            totals.iter().all(|t| *t == totals[0] && t % 2.0 == 0.0),
            "{totals:?}"
        );
    }
    // A plain LoRA adapter has no router.
    let lora_out = out_dir("routing-lora");
    let cfg = TrainConfig {
        adapter: model::PeftType::Lora,
        ..small(&lora_out)
    };
    let ls = train(&cfg, |_| {}).unwrap();
    let mut a = args(Some(lora_out.join("r.json")));
    a.adapter = vec![ls.adapter_dir.clone()];
    let e = trainer::scoring::eval(&a).unwrap_err().to_string();
    assert!(
        e.contains("--routing needs a MixLoRA adapter") && !e.contains('\n'),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&lora_out);
}
