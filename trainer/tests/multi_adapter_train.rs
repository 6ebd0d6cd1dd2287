//! Several adapters trained in one run on one base (`train_plan`) end exactly where each trained
//! alone ends: the same losses at every step, the same adapter and optimizer files, bit for bit
//! on the CPU (one of them packs its micro-batches' examples into shared rows), kernel by kernel
//! and in fixed-shape micro-steps (what CUDA graphs record). Also: an adapter whose loss turns
//! non-finite stops alone, finished adapters leave the batch, and an interrupted run of several
//! adapters resumes to the same end.

mod common;

use std::path::{Path, PathBuf};

use common::losses;
use model::adapters::PeftType;
use trainer::config::{CudaGraphs, PlannedAdapter, RunPlan, SharedSettings, TrainConfig};
use trainer::run::{train, train_plan, RunControl};

fn out_dir(name: &str) -> PathBuf {
    common::out_dir("multi", name)
}

/// A task file of `n` short examples (a tiny instruction-following task of its own).
fn task_file(dir: &Path, n: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let items: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            serde_json::json!({
                "instruction": format!("Is {i} an even number?"),
                "input": "",
                "output": if i % 2 == 0 { "yes" } else { "no" },
            })
        })
        .collect();
    let path = dir.join("parity.json");
    std::fs::write(&path, serde_json::to_string(&items).unwrap()).unwrap();
    path
}

/// Adapters that differ in kind, rank, dropout, learning rate, schedule, data, sequence length,
/// micro-batching and step count (the built-in base is made from the seed, which they share).
fn mixed_adapters(root: &Path) -> Vec<PlannedAdapter> {
    let base = TrainConfig {
        batch_size: 4,
        micro_batch_size: 2,
        cutoff_len: 320,
        epochs: 1,
        save_every: 2,
        eval_every: 0,
        eval_limit: Some(4),
        log_every: 1,
        ..TrainConfig::default()
    };
    let data = task_file(&root.join("data"), 24);
    let configs = [
        (
            "lora",
            TrainConfig {
                adapter: PeftType::Lora,
                rank: 4,
                alpha: 8.0,
                dropout: 0.1,
                lr: 3e-3,
                max_steps: Some(5),
                ..base.clone()
            },
        ),
        (
            "mix",
            TrainConfig {
                lr: 1e-3,
                micro_batch_size: 1, // four micro-batches a step
                cutoff_len: 200,
                max_steps: Some(7),
                ..base.clone()
            },
        ),
        (
            "mix_data",
            TrainConfig {
                data: vec![data],
                lr: 2e-3,
                num_experts: 4,
                top_k: 1,
                batch_size: 2,
                // Its two short examples a micro-batch share one row.
                pack_micro_batches: true,
                max_steps: Some(3),
                ..base.clone()
            },
        ),
    ];
    configs
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

/// [`mixed_adapters`] with their micro-steps run as `graphs` says.
fn mixed_adapters_in(root: &Path, graphs: CudaGraphs) -> Vec<PlannedAdapter> {
    let mut v = mixed_adapters(root);
    for a in &mut v {
        a.config.cuda_graphs = graphs;
    }
    v
}

fn plan(adapters: Vec<PlannedAdapter>) -> RunPlan {
    RunPlan {
        shared: SharedSettings::of(&adapters[0].config),
        adapters,
    }
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Asserts that the runs in `a` and `b` ended the same: losses, final adapter, last checkpoint's
/// optimizer state.
fn assert_same_run(name: &str, a: &Path, b: &Path, steps: usize) {
    let (la, lb) = (losses(a), losses(b));
    assert_eq!(la.len(), steps, "{name}");
    assert_eq!(la, lb, "{name}: the losses differ");
    for f in [
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
    ] {
        assert!(
            bytes(&a.join(f)) == bytes(&b.join(f)),
            "{name}: {f} differs"
        );
    }
    let opt = format!("checkpoint-{steps}/optimizer.safetensors");
    assert!(
        bytes(&a.join(&opt)) == bytes(&b.join(&opt)),
        "{name}: {opt} differs"
    );
}

#[test]
fn adapters_trained_together_equal_each_trained_alone() {
    let root = out_dir("together");
    let together = mixed_adapters(&root.join("group"));
    let outcomes = train_plan(&plan(together.clone()), RunControl::default(), |_| {}).unwrap();
    let alone = mixed_adapters(&root.join("alone"));
    for ((t, a), o) in together.iter().zip(&alone).zip(&outcomes) {
        let s = o.result.as_ref().unwrap();
        let steps = t.config.max_steps.unwrap();
        assert_eq!(s.steps, steps, "{}", t.name);
        train(&a.config, |_| {}).unwrap();
        assert_same_run(&t.name, &t.config.out_dir, &a.config.out_dir, steps);
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn adapters_trained_together_with_gradient_checkpointing_equal_each_alone() {
    let root = out_dir("ckpt");
    let with_ckpt = |mut v: Vec<PlannedAdapter>| {
        v.truncate(2);
        for a in &mut v {
            a.config.gradient_checkpointing = true;
            a.config.max_steps = Some(3);
        }
        v
    };
    let together = with_ckpt(mixed_adapters(&root.join("group")));
    train_plan(&plan(together.clone()), RunControl::default(), |_| {}).unwrap();
    for (t, a) in together
        .iter()
        .zip(with_ckpt(mixed_adapters(&root.join("alone"))))
    {
        train(&a.config, |_| {}).unwrap();
        assert_same_run(&t.name, &t.config.out_dir, &a.config.out_dir, 3);
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// On an FP8 base (`--base-dtype fp8`, a setting the adapters share), adapters trained together
/// also end as each alone: the base is quantised once, and each adapter's micro-batch runs its
/// own products. (In `--group-mode shared` the adapters' rows share the FP8 products, which
/// scale each row on its own; f32 rounding differences then flip an FP8 code now and then, and
/// MixLoRA's losses drifted from the single run's by up to 4e-3 in 7 steps, against 1e-7 on a
/// dense base.)
#[test]
fn adapters_trained_together_on_an_fp8_base_equal_each_alone() {
    let root = out_dir("fp8");
    let on_fp8 = |mut v: Vec<PlannedAdapter>| {
        v.truncate(2);
        for a in &mut v {
            a.config.base_dtype = trainer::config::BaseDTypeName::Fp8;
            a.config.max_steps = Some(3);
        }
        v
    };
    let together = on_fp8(mixed_adapters(&root.join("group")));
    let mut log = Vec::new();
    train_plan(&plan(together.clone()), RunControl::default(), |l| {
        log.push(l.to_string())
    })
    .unwrap();
    let quantised = log
        .iter()
        .filter(|l| l.starts_with("base projections in FP8"))
        .count();
    assert_eq!(quantised, 1, "{log:?}");
    for (t, a) in together
        .iter()
        .zip(on_fp8(mixed_adapters(&root.join("alone"))))
    {
        train(&a.config, |_| {}).unwrap();
        assert_same_run(&t.name, &t.config.out_dir, &a.config.out_dir, 3);
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// With fixed-shape micro-steps (`--cuda-graphs eager`, what `on` records as CUDA graphs), each
/// adapter of a run of several runs its own micro-steps in its own lane (its own dropout key):
/// each ends bit for bit where it ends trained alone with `eager`, in kind, settings, micro-
/// batching, packing and step count as different as above.
#[test]
fn adapters_trained_together_in_fixed_shapes_equal_each_trained_alone() {
    let root = out_dir("fixed");
    let together = mixed_adapters_in(&root.join("group"), CudaGraphs::Eager);
    let mut lines = Vec::new();
    let outcomes = train_plan(&plan(together.clone()), RunControl::default(), |l| {
        lines.push(l.to_string())
    })
    .unwrap();
    // Every adapter's line counts its shapes, also of those that finished first (whose shapes
    // were given back then).
    for t in &together {
        let tag = format!("[{}] fixed-shape micro-steps:", t.name);
        let line = lines.iter().find(|l| l.starts_with(&tag));
        let line = line.unwrap_or_else(|| panic!("no line {tag:?} in {lines:#?}"));
        assert!(!line.contains(": 0 shape(s)"), "{line}");
    }
    for ((t, a), o) in together
        .iter()
        .zip(mixed_adapters_in(&root.join("alone"), CudaGraphs::Eager))
        .zip(&outcomes)
    {
        let steps = t.config.max_steps.unwrap();
        assert_eq!(o.result.as_ref().unwrap().steps, steps, "{}", t.name);
        train(&a.config, |_| {}).unwrap();
        assert_same_run(&t.name, &t.config.out_dir, &a.config.out_dir, steps);
    }
    // The fixed shapes did change the draws: dropout masks keyed per micro-batch differ from
    // the kernel-by-kernel run's.
    let off = mixed_adapters(&root.join("off"));
    train(&off[0].config, |_| {}).unwrap();
    assert_ne!(
        losses(&off[0].config.out_dir),
        losses(&together[0].config.out_dir)
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// `--group-mode sequential` (each adapter's micro-batch forward and backward before the next
/// adapter's), kernel by kernel and in fixed shapes: each adapter ends bit for bit where it ends
/// alone in the same mode.
#[test]
fn adapters_trained_one_after_another_equal_each_trained_alone() {
    let root = out_dir("sequential");
    for graphs in [CudaGraphs::Off, CudaGraphs::Eager] {
        let with = |mut v: Vec<PlannedAdapter>| {
            v.truncate(2);
            for a in &mut v {
                a.config.max_steps = Some(3);
            }
            v
        };
        let dir = root.join(format!("{graphs:?}"));
        let together = with(mixed_adapters_in(&dir.join("group"), graphs));
        let mut p = plan(together.clone());
        p.shared.group_mode = Some(model::GroupMode::Sequential);
        train_plan(&p, RunControl::default(), |_| {}).unwrap();
        for (t, a) in together
            .iter()
            .zip(with(mixed_adapters_in(&dir.join("alone"), graphs)))
        {
            train(&a.config, |_| {}).unwrap();
            assert_same_run(&t.name, &t.config.out_dir, &a.config.out_dir, 3);
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_diverging_adapter_stops_alone_and_the_others_go_on() {
    let root = out_dir("nan");
    let mut adapters = mixed_adapters(&root.join("group"));
    adapters.truncate(2);
    let bad = &mut adapters[1].config;
    bad.lr = 1e12;
    bad.max_grad_norm = 1e30;
    bad.warmup_steps = Some(0);
    bad.save_every = 1;
    let outcomes = train_plan(&plan(adapters.clone()), RunControl::default(), |_| {}).unwrap();
    let err = outcomes[1].result.as_ref().unwrap_err().to_string();
    assert!(err.contains("not finite") && !err.contains('\n'), "{err}");
    let step: usize = err
        .split("step ")
        .nth(1)
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let kept = adapters[1]
        .config
        .out_dir
        .join(format!("checkpoint-{}", step - 1));
    assert!(err.contains(&kept.display().to_string()), "{err}");
    assert!(kept.join("adapter_model.safetensors").is_file());
    assert!(!adapters[1].config.out_dir.join("adapter").exists());
    // The healthy adapter went on to its end, as it would have alone.
    let alone = mixed_adapters(&root.join("alone")).remove(0);
    train(&alone.config, |_| {}).unwrap();
    assert_same_run(
        "lora",
        &adapters[0].config.out_dir,
        &alone.config.out_dir,
        5,
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn an_interrupted_run_of_several_adapters_resumes_to_the_same_end() {
    // Kernel by kernel, and in fixed shapes (each adapter its own micro-steps and lane).
    for graphs in [CudaGraphs::Off, CudaGraphs::Eager] {
        let root = out_dir(&format!("resume-{graphs:?}"));
        let whole = mixed_adapters_in(&root.join("whole"), graphs);
        train_plan(&plan(whole.clone()), RunControl::default(), |_| {}).unwrap();

        // Stopped after step 4 (the checkpoint of step 4 is due: save_every 2); by then
        // `mix_data` (3 steps) has finished and left the run, which then resumes the other two.
        let parts = mixed_adapters_in(&root.join("parts"), graphs);
        let ctl = RunControl {
            stop_after: Some(4),
            ..RunControl::default()
        };
        train_plan(&plan(parts.clone()), ctl, |_| {}).unwrap();
        assert!(parts[2].config.out_dir.join("adapter").is_dir());
        assert!(!parts[0].config.out_dir.join("adapter").exists());
        let mut resumed = parts.clone();
        resumed.iter_mut().for_each(|a| a.config.resume = true);
        let mut lines = Vec::new();
        let outcomes = train_plan(&plan(resumed), RunControl::default(), |l| {
            lines.push(l.to_string())
        })
        .unwrap();
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("[mix_data] finished already")),
            "{graphs:?}: {lines:?}"
        );
        assert!(outcomes.iter().all(|o| o.result.is_ok()));
        for (w, p) in whole.iter().zip(&parts) {
            let steps = w.config.max_steps.unwrap();
            assert_same_run(&w.name, &w.config.out_dir, &p.config.out_dir, steps);
        }
        let _ = std::fs::remove_dir_all(&root);
    }
}

/// `mixlora train --sweep`: one adapter per value, each in its own folder, the evaluations as one
/// JSON object keyed by adapter; on Ctrl-C (SIGINT) every adapter keeps its last step and the
/// printed command continues them all to the end of the uninterrupted sweep.
#[cfg(unix)]
#[test]
fn the_binary_trains_a_sweep_and_resumes_it_after_ctrl_c() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let bin = env!("CARGO_BIN_EXE_mixlora");
    let args = |out: &Path| {
        let mut a: Vec<String> = [
            "train",
            "--sweep",
            "lr=1e-3,3e-3",
            "--max-steps",
            "16",
            "--batch",
            "4",
            "--micro-batch",
            "2",
            "--cutoff-len",
            "320",
            "--eval-limit",
            "2",
            "--out",
        ]
        .map(String::from)
        .to_vec();
        a.push(out.display().to_string());
        a
    };
    let names = ["lr1e-3", "lr3e-3"];
    let whole = out_dir("sweep-whole");
    let done = Command::new(bin).args(args(&whole)).output().unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{stderr}");
    let evals: serde_json::Value = serde_json::from_slice(&done.stdout).unwrap();
    for n in names {
        assert!(evals[n]["average"].is_number(), "{evals}");
        assert!(
            stderr.contains(&format!("[{n}] trained 16 steps")),
            "{stderr}"
        );
        assert_eq!(losses(&whole.join(n)).len(), 16);
    }
    assert_ne!(losses(&whole.join(names[0])), losses(&whole.join(names[1])));

    let out = out_dir("sweep-int");
    let mut child = Command::new(bin)
        .args(args(&out))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = out.join(names[1]).join("metrics.jsonl");
    let t0 = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 2 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no step logged");
        assert!(child.try_wait().unwrap().is_none(), "ended early");
        std::thread::sleep(Duration::from_millis(5));
    }
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let stopped = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert_eq!(stopped.status.code(), Some(130), "{stderr}");
    let steps = losses(&out.join(names[0])).len();
    assert!((2..16).contains(&steps), "{stderr}");
    let kept: Vec<String> = names
        .iter()
        .map(|n| {
            out.join(n)
                .join(format!("checkpoint-{steps}"))
                .display()
                .to_string()
        })
        .collect();
    assert!(
        stderr.contains(&format!(
            "interrupted after step {steps} of 16; {} hold them",
            kept.join(", ")
        )),
        "{stderr}"
    );
    let last = stderr.lines().last().unwrap().trim();
    assert!(last.ends_with("--resume"), "{stderr}");
    let resumed = Command::new("sh").args(["-c", last]).output().unwrap();
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    for n in names {
        assert_eq!(losses(&out.join(n)), losses(&whole.join(n)), "{n}");
        let f = "adapter/adapter_model.safetensors";
        assert!(
            bytes(&out.join(n).join(f)) == bytes(&whole.join(n).join(f)),
            "{n}"
        );
    }
    let _ = std::fs::remove_dir_all(&whole);
    let _ = std::fs::remove_dir_all(&out);
}

/// The f32 values of every tensor of an adapter folder's weights, in name order.
fn adapter_values(dir: &Path) -> Vec<f64> {
    let bytes = bytes(&dir.join("adapter/adapter_model.safetensors"));
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

/// `--group-mode shared` (one padded batch through the base, the LoRAs grouped) trains each
/// adapter as alone up to f32 rounding.
#[test]
fn adapters_trained_together_in_shared_mode_match_each_alone_within_rounding() {
    let root = out_dir("shared");
    let same_batch = |mut v: Vec<PlannedAdapter>| {
        v.truncate(2);
        v[1].config.micro_batch_size = 2; // one batch size: the shared mode applies
        v
    };
    let mut together = same_batch(mixed_adapters(&root.join("group")));
    for a in &mut together {
        a.config.group_mode = Some(model::GroupMode::Shared);
    }
    train_plan(&plan(together.clone()), RunControl::default(), |_| {}).unwrap();
    for (t, a) in together
        .iter()
        .zip(same_batch(mixed_adapters(&root.join("alone"))))
    {
        train(&a.config, |_| {}).unwrap();
        let (lt, la) = (losses(&t.config.out_dir), losses(&a.config.out_dir));
        assert_eq!(lt.len(), la.len());
        for ((s, x), (_, y)) in lt.iter().zip(&la) {
            assert!(
                (x - y).abs() <= 1e-5 * y.abs(),
                "{} step {s}: {x} vs {y}",
                t.name
            );
        }
        let (vt, va) = (
            adapter_values(&t.config.out_dir),
            adapter_values(&a.config.out_dir),
        );
        let err = testutil::gpu::rel_err(&va, &vt);
        assert!(
            err <= 1e-4,
            "{}: adapter weights differ by {err:.2e}",
            t.name
        );
        // The setting reached the model: the shared mode's rounding is not the single run's.
        assert!(
            vt != va,
            "{}: bit-identical, so the shared mode did not run",
            t.name
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}
