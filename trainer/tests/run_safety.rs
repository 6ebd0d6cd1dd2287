//! Runs that cannot mix or lose work, on the built-in tiny model: every input is checked before
//! the first step, an output folder with another run is refused unless `--resume` or
//! `--overwrite`, `--resume` continues only the run's own settings, data and adapter, and an
//! interrupt saves the last step done and says how to go on.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use common::losses;
use trainer::config::TrainConfig;
use trainer::run::{train, train_until, train_with, RunControl};

fn out_dir(name: &str) -> PathBuf {
    common::out_dir("safety", name)
}

/// A small, fast run: batch 4 in micro-batches of 2, short sequences, a checkpoint every 3 steps.
fn small(out: &Path) -> TrainConfig {
    TrainConfig {
        out_dir: out.to_path_buf(),
        batch_size: 4,
        micro_batch_size: 2,
        cutoff_len: 320,
        epochs: 1,
        max_steps: Some(6),
        save_every: 3,
        eval_limit: Some(4),
        lr: 2e-3,
        ..TrainConfig::default()
    }
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    n.sort();
    n
}

/// An LLM-Adapters file of `n` two-choice questions.
fn write_tasks(path: &Path, n: usize, answer_format: bool) {
    let items: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let a = if i % 2 == 0 { "true" } else { "false" };
            let fmt = if answer_format {
                "\n\nAnswer format: true/false"
            } else {
                ""
            };
            serde_json::json!({
                "instruction": format!("Is {i} even?{fmt}"),
                "input": "",
                "output": format!("the correct answer is {a}"),
                "answer": a,
            })
        })
        .collect();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_string(&items).unwrap()).unwrap();
}

#[test]
fn an_unscorable_eval_file_is_refused_before_the_first_step() {
    let dir = out_dir("bad-eval");
    let (train_file, eval_file) = (dir.join("data/even.json"), dir.join("data/valid.json"));
    write_tasks(&train_file, 16, true);
    // Item 1's answer is not among its candidates: evaluation could only fail on it, after the
    // last step.
    let mut items: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&train_file).unwrap()).unwrap();
    items[1]["answer"] = "maybe".into();
    items[1]["output"] = "the correct answer is maybe".into();
    std::fs::write(&eval_file, serde_json::to_string(&items).unwrap()).unwrap();
    let out = dir.join("out");
    let cfg = TrainConfig {
        data: vec![train_file.clone()],
        eval_data: vec![eval_file.clone()],
        ..small(&out)
    };
    let e = train(&cfg, |_| {}).unwrap_err().to_string();
    assert!(
        e.contains(&format!(
            "{}: item 1: answer `maybe` is not one of true/false",
            eval_file.display()
        )),
        "{e}"
    );
    assert!(!e.contains('\n'), "{e}");
    assert!(!out.exists(), "nothing may be written: {:?}", names(&out));

    // Held out of the training data (val_set_size), the same: refused up front.
    // Every item's answer is outside its candidates: trainable, not scorable.
    let no_format = dir.join("data/nofmt/train.json");
    write_tasks(&no_format, 16, true);
    let mut items: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&no_format).unwrap()).unwrap();
    for it in &mut items {
        it["answer"] = "maybe".into();
        it["output"] = "the correct answer is maybe".into();
    }
    std::fs::write(&no_format, serde_json::to_string(&items).unwrap()).unwrap();
    let cfg = TrainConfig {
        data: vec![no_format.clone()],
        val_set_size: 4,
        ..small(&out)
    };
    let e = train(&cfg, |_| {}).unwrap_err().to_string();
    assert!(e.contains("held out by val_set_size"), "{e}");
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_output_folder_with_another_run_is_refused() {
    let out = out_dir("reuse");
    train(&small(&out), |_| {}).unwrap();
    let before = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let adapter = std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
    let again = TrainConfig {
        max_steps: Some(2),
        seed: 7,
        ..small(&out)
    };
    let e = train(&again, |_| {}).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "{}: holds another run (adapter/, checkpoint-3/, checkpoint-6/, ",
            out.display()
        )),
        "{e}"
    );
    assert!(
        e.contains("--resume") && e.contains("--overwrite") && e.contains("another --out"),
        "{e}"
    );
    assert!(!e.contains('\n'));
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), before);
    assert_eq!(
        std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap(),
        adapter
    );
    assert!(out.join("checkpoint-6").is_dir());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn overwrite_removes_the_previous_run_and_keeps_other_files() {
    let out = out_dir("overwrite");
    train(&small(&out), |_| {}).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    std::fs::create_dir_all(out.join("checkpoint-notes")).unwrap();
    let again = TrainConfig {
        max_steps: Some(2),
        save_every: 1,
        overwrite: true,
        ..small(&out)
    };
    let mut lines = Vec::new();
    train(&again, |l| lines.push(l.to_string())).unwrap();
    let said = lines
        .iter()
        .find(|l| l.starts_with("--overwrite: removed"))
        .unwrap();
    assert_eq!(
        said,
        &format!(
            "--overwrite: removed the previous run's adapter/, checkpoint-3/, checkpoint-6/, \
             eval.json, metrics.jsonl, train_config.toml from {}",
            out.display()
        )
    );
    assert_eq!(
        names(&out),
        [
            "adapter",
            "checkpoint-1",
            "checkpoint-2",
            "checkpoint-notes",
            "eval.json",
            "metrics.jsonl",
            "notes.txt",
            "train_config.toml"
        ]
    );
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    assert_eq!(losses(&out).len(), 2, "the new run's metrics only");
    // --resume and --overwrite exclude each other.
    let both = TrainConfig {
        resume: true,
        ..again
    };
    let e = train(&both, |_| {}).unwrap_err().to_string();
    assert!(e.contains("give one of them"), "{e}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn resume_refuses_other_settings_naming_them() {
    let out = out_dir("settings");
    train_until(&small(&out), Some(3), |_| {}).unwrap();
    let metrics = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let resume = TrainConfig {
        resume: true,
        ..small(&out)
    };
    for (changed, needle) in [
        (
            TrainConfig {
                num_experts: 4,
                ..resume.clone()
            },
            "num_experts is 8 there but 4 here",
        ),
        (
            TrainConfig {
                seed: 7,
                ..resume.clone()
            },
            "seed is 42 there but 7 here",
        ),
        (
            TrainConfig {
                max_steps: Some(9),
                ..resume.clone()
            },
            "max_steps is 6 there but 9 here",
        ),
    ] {
        let e = train(&changed, |_| {}).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "--resume: the run was started with other settings ({}",
                out.join("checkpoint-3").display()
            )) && e.contains(needle),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), metrics);
    }
    // What may change does not stop it.
    let ok = TrainConfig {
        log_every: 2,
        save_total_limit: 1,
        ..resume
    };
    let s = train(&ok, |_| {}).unwrap();
    assert_eq!(s.steps, 6);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn an_edited_adapter_config_is_refused_on_resume_and_eval() {
    let out = out_dir("edited");
    train_until(&small(&out), Some(3), |_| {}).unwrap();
    let file = out.join("checkpoint-3/adapter_config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(c["top_k"], 2);
    c["top_k"] = 3.into();
    std::fs::write(&file, serde_json::to_string_pretty(&c).unwrap()).unwrap();
    let resume = TrainConfig {
        resume: true,
        ..small(&out)
    };
    let e = train(&resume, |_| {}).unwrap_err().to_string();
    let want = format!(
        "{}: differs from the run that wrote it ({}): top_k is 3 here but 2 in the run's settings",
        file.display(),
        out.join("checkpoint-3/train_config.toml").display()
    );
    assert!(e.starts_with(&want), "{e}");
    let args = trainer::config::EvalArgs {
        model: None,
        adapter: vec![out.join("checkpoint-3")],
        data: vec![],
        limit: Some(2),
        batch_size: 8,
        cutoff_len: 320,
        device: engine::Device::Cpu,
        dtype: trainer::config::DTypeName::F32,
        base_dtype: Default::default(),
        output: None,
        routing: None,
        moe: Default::default(),
    };
    let e = trainer::scoring::eval(&args).unwrap_err().to_string();
    assert!(e.starts_with(&want), "{e}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn resume_needs_a_checkpoint_of_an_unfinished_run_on_the_same_data() {
    let out = out_dir("nothing");
    let resume = |out: &Path| TrainConfig {
        resume: true,
        ..small(out)
    };
    let e = train(&resume(&out), |_| {}).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "--resume: {} has no checkpoint to continue from: run without --resume to start a \
             new run",
            out.display()
        )
    );
    assert!(!out.exists());

    // A finished run: nothing to continue (once it said "loss NaN -> NaN" and wrote the
    // adapter again).
    train(&small(&out), |_| {}).unwrap();
    let e = train(&resume(&out), |_| {}).unwrap_err().to_string();
    assert!(e.contains("is finished (step 6 of 6"), "{e}");

    // A data file edited between the run and its resumption.
    let data_dir = out_dir("edited-data");
    let f = data_dir.join("even.json");
    write_tasks(&f, 40, true);
    let run = TrainConfig {
        data: vec![f.clone()],
        ..small(&data_dir.join("out"))
    };
    train_until(&run, Some(3), |_| {}).unwrap();
    let text = std::fs::read_to_string(&f).unwrap();
    std::fs::write(&f, text.replacen("Is 0 even?", "Is zero even?", 1)).unwrap();
    let e = train(
        &TrainConfig {
            resume: true,
            ..run
        },
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("the training data differs from the run's"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// An interrupt mid-run saves the last step done; the resumed run repeats the uninterrupted
/// one's losses exactly.
#[test]
fn an_interrupted_run_saves_its_last_step_and_resumes_exactly() {
    let whole = out_dir("int-whole");
    let cfg = |out: &Path| TrainConfig {
        max_steps: Some(12),
        save_every: 0,
        ..small(out)
    };
    train(&cfg(&whole), |_| {}).unwrap();

    let out = out_dir("int-stopped");
    let flag = AtomicBool::new(false);
    let metrics = out.join("metrics.jsonl");
    let stopped = std::thread::scope(|s| {
        s.spawn(|| {
            // Interrupt once two steps are logged.
            while !flag.load(Ordering::SeqCst) {
                let n = std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count());
                if n >= 2 {
                    flag.store(true, Ordering::SeqCst);
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        });
        let ctl = RunControl {
            interrupt: Some(&flag),
            ..Default::default()
        };
        let r = train_with(&cfg(&out), ctl, |_| {});
        flag.store(true, Ordering::SeqCst);
        r
    });
    let e = stopped.unwrap_err();
    let trainer::Error::Interrupted {
        step,
        total,
        checkpoints,
    } = &e
    else {
        panic!("{e}");
    };
    assert!((2..12).contains(step) && *total == 12, "{e}");
    let ckpt = out.join(format!("checkpoint-{step}"));
    assert_eq!(checkpoints, &[ckpt.display().to_string()]);
    assert!(ckpt.join("trainer_state.json").is_file());
    assert!(!out.join("adapter").exists(), "the run is not finished");
    assert!(e.to_string().contains("--resume"), "{e}");

    let resumed = TrainConfig {
        resume: true,
        ..cfg(&out)
    };
    train(&resumed, |_| {}).unwrap();
    assert_eq!(losses(&out), losses(&whole));
    let _ = std::fs::remove_dir_all(&whole);
    let _ = std::fs::remove_dir_all(&out);
}

/// The binary on Ctrl-C (SIGINT): it stops with status 130 and prints the command that
/// continues the run, which does.
#[cfg(unix)]
#[test]
fn ctrl_c_prints_the_command_that_resumes_the_run() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let bin = env!("CARGO_BIN_EXE_mixlora");
    let out = out_dir("sigint");
    let args = |out: &Path| {
        let mut a: Vec<String> = [
            "train",
            "--max-steps",
            "30",
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
    let mut child = Command::new(bin)
        .args(args(&out))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = out.join("metrics.jsonl");
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
    let done = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("interrupt: stopping at the next micro-batch"),
        "{stderr}"
    );
    let last = stderr.lines().last().unwrap().trim();
    assert!(
        last.starts_with(bin) && last.ends_with(&format!("--out {} --resume", out.display())),
        "{stderr}"
    );
    let steps = losses(&out).len();
    assert!(
        stderr.contains(&format!(
            "interrupted after step {steps} of 30; {} holds it",
            out.join(format!("checkpoint-{steps}")).display()
        )),
        "{stderr}"
    );
    // The printed command continues the run to its end.
    let resumed = Command::new("sh").args(["-c", last]).output().unwrap();
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let l = losses(&out);
    assert_eq!(
        l.iter().map(|x| x.0).collect::<Vec<_>>(),
        (1..=30).collect::<Vec<_>>()
    );
    assert!(out.join("adapter/adapter_model.safetensors").is_file());
    let _ = std::fs::remove_dir_all(&out);
}
