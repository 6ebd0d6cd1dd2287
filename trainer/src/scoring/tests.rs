//! `mixlora eval --adapter A --adapter B`: a LoRA and a MixLoRA adapter, trained briefly on the
//! built-in model, scored together give each the scores and the report it gets alone; bad
//! adapter lists are refused with one-line errors naming the folder.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use model::PeftType;

use super::*;
use crate::config::{DTypeName, TrainConfig};
use crate::eval::encode_question;
use crate::run::train;

/// Relative tolerance between a candidate's score alone (plain LoRAs merged into the base,
/// `(W + s·B·A)·x`) and in the group (unmerged, `W·x + s·B·(A·x)`), as `|Δ| / max(|score|, 1)`:
/// both are f32 and differ by the rounding of the merge and of the two orders of summation, a
/// few units in the last place of a projection's outputs (f32's unit is 1.2e-7), carried through
/// the layers into log-likelihoods of tens of nats. Measured: at most 2.4e-7 on the CPU; 5e-6
/// leaves a margin of 20 for other CPUs' kernels and stays far below what separates the
/// adapters from each other and from the base (more than 2e-1).
const REL_TOL: f64 = 5e-6;

/// A LoRA and a MixLoRA adapter of the built-in model (seed 42), trained a few steps with a high
/// learning rate so that their B matrices are far from 0: `(lora, mixlora)` adapter folders.
fn trained() -> &'static (PathBuf, PathBuf) {
    static TRAINED: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    TRAINED.get_or_init(|| {
        let root = temp_dir("trained");
        let run = |kind: PeftType, name: &str| {
            let cfg = TrainConfig {
                adapter: kind,
                out_dir: root.join(name),
                batch_size: 4,
                micro_batch_size: 2,
                cutoff_len: 320,
                epochs: 1,
                max_steps: Some(8),
                lr: 5e-3,
                save_every: 0,
                eval_limit: Some(1),
                ..TrainConfig::default()
            };
            train(&cfg, |_| {}).unwrap().adapter_dir
        };
        (
            run(PeftType::Lora, "lora"),
            run(PeftType::MixLora, "mixlora"),
        )
    })
}

/// A fresh folder under the temporary folder, unique to this process and `name`.
fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mixlora-eval-group-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `mixlora eval` of `adapters` on the synthetic tasks, 5 questions per task, 3 candidates per
/// forward pass (so the last batch of a task is short).
fn args(adapters: &[&Path]) -> EvalArgs {
    EvalArgs {
        model: None,
        adapter: adapters.iter().map(|p| p.to_path_buf()).collect(),
        data: vec![],
        limit: Some(5),
        batch_size: 3,
        cutoff_len: 320,
        device: engine::Device::Cpu,
        dtype: DTypeName::F32,
        base_dtype: Default::default(),
        output: None,
        routing: None,
        moe: Default::default(),
    }
}

/// Every candidate's score of every task for each adapter of `a`, scored as `mixlora eval`
/// scores them.
fn all_scores(a: &EvalArgs) -> Vec<Vec<f64>> {
    let m = load_eval_model(a).unwrap();
    let mut pairs = Vec::new();
    for qs in eval::all_questions(&m.tasks, a.limit).unwrap() {
        for q in &qs {
            pairs.extend(encode_question(&m.tok, q, a.cutoff_len).unwrap());
        }
    }
    let mut scores = vec![Vec::new(); m.scorers()];
    for chunk in pairs.chunks(a.batch_size) {
        for (all, s) in scores.iter_mut().zip(m.score(chunk).unwrap()) {
            all.extend(s);
        }
    }
    scores
}

fn max_rel_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f64::max)
}

#[test]
fn each_adapter_of_a_group_scores_as_it_does_alone() {
    let (lora, mixlora) = trained();
    let alone = [
        all_scores(&args(&[lora])).remove(0),
        all_scores(&args(&[mixlora])).remove(0),
    ];
    let base = all_scores(&args(&[])).remove(0);
    let together = all_scores(&args(&[lora, mixlora]));
    assert_eq!(together.len(), 2);
    for (name, (t, a)) in ["lora", "mixlora"].iter().zip(together.iter().zip(&alone)) {
        let d = max_rel_diff(t, a);
        eprintln!(
            "{name}: {} scores, largest relative difference {d:.3e}",
            a.len()
        );
        assert!(d <= REL_TOL, "{name}: {d:e}");
        // The adapter changes the scores, far beyond the tolerance.
        let from_base = max_rel_diff(a, &base);
        eprintln!("{name}: largest relative difference from the base {from_base:.3e}");
        assert!(from_base > 1e4 * REL_TOL, "{name} is the base");
    }
    let between = max_rel_diff(&alone[0], &alone[1]);
    eprintln!("lora vs mixlora: largest relative difference {between:.3e}");
    assert!(between > 1e4 * REL_TOL);
    // In the other order, each adapter still gets its own scores.
    let swapped = all_scores(&args(&[mixlora, lora]));
    assert!(max_rel_diff(&swapped[0], &alone[1]) <= REL_TOL);
    assert!(max_rel_diff(&swapped[1], &alone[0]) <= REL_TOL);
}

#[test]
fn eval_of_a_group_reports_each_adapter_as_alone() {
    let (lora, mixlora) = trained();
    let dir = temp_dir("report");
    let out = dir.join("eval.json");
    let together = eval(&EvalArgs {
        output: Some(out.clone()),
        ..args(&[lora, mixlora])
    })
    .unwrap();
    let Evaluation::PerAdapter(per) = &together else {
        panic!("one report for two adapters: {together:?}");
    };
    let names: Vec<&PathBuf> = per.iter().map(|(p, _)| p).collect();
    assert_eq!(names, [lora, mixlora]);
    let json: serde_json::Value = serde_json::from_str(&together.to_json_pretty()).unwrap();
    let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 2);
    for (dir, report) in per {
        let alone = eval(&args(&[dir])).unwrap();
        assert_eq!(alone, Evaluation::One(report.clone()), "{}", dir.display());
        let alone: serde_json::Value = serde_json::from_str(&alone.to_json_pretty()).unwrap();
        assert_eq!(json[dir.display().to_string()], alone);
    }
    // The keys in the order given.
    let text = together.to_json_pretty();
    let at = |p: &Path| text.find(&format!("\"{}\"", p.display())).unwrap();
    assert!(at(lora) < at(mixlora));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), text);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The one-line error of `eval(a)`.
fn error_of(a: &EvalArgs) -> String {
    let e = eval(a).unwrap_err().to_string();
    assert!(!e.contains('\n'), "{e}");
    e
}

/// A copy of the adapter files of `from` in a new folder `name` (outside any run), with `edit`
/// applied to its adapter_config.json.
fn edited_copy(from: &Path, name: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let dir = temp_dir(name);
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(from.join(f), dir.join(f)).unwrap();
    }
    let file = dir.join("adapter_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&file, cfg.to_string()).unwrap();
    dir
}

#[test]
fn bad_adapter_lists_are_refused_naming_the_folder() {
    let (lora, mixlora) = trained();
    // The same folder twice, however it is written.
    let again = mixlora.join(".");
    let e = error_of(&args(&[mixlora, lora, &again]));
    assert_eq!(
        e,
        format!(
            "config: --adapter {}: the same folder as --adapter {} (give each adapter once)",
            again.display(),
            mixlora.display()
        )
    );
    // A folder that does not exist.
    let missing = lora.with_file_name("nowhere");
    let e = error_of(&args(&[lora, &missing]));
    assert!(
        e.starts_with(&format!("config: --adapter {}: ", missing.display())),
        "{e}"
    );
    // Routing statistics are one adapter's.
    let e = error_of(&EvalArgs {
        routing: Some(PathBuf::from("routing.json")),
        ..args(&[lora, mixlora])
    });
    assert!(
        e.contains("--routing routing.json: takes one --adapter, 2 are given"),
        "{e}"
    );
    // An adapter of another built-in model.
    let other = edited_copy(lora, "seed43", |c| {
        for key in ["base_model_name_or_path", "mixlora_base_model_path"] {
            let v = c[key].as_str().unwrap().replace("seed=42", "seed=43");
            c[key] = v.into();
        }
    });
    let e = error_of(&args(&[mixlora, &other]));
    assert_eq!(
        e,
        format!(
            "config: --adapter {}: made for the built-in model of seed 43, --adapter {} for seed \
             42 (one eval has one base)",
            other.display(),
            mixlora.display()
        )
    );
    // An adapter whose shapes are not the base's (or its config's): its file is named.
    let rank = edited_copy(lora, "rank", |c| c["r"] = 4.into());
    let e = error_of(&args(&[mixlora, &rank]));
    assert!(e.starts_with(&rank.display().to_string()), "{e}");
    // A run's adapter whose config was edited: refused as a single eval refuses it.
    let run = temp_dir("edited-run");
    let src = mixlora.parent().unwrap();
    std::fs::copy(src.join("train_config.toml"), run.join("train_config.toml")).unwrap();
    let edited = run.join("adapter");
    std::fs::create_dir_all(&edited).unwrap();
    let copy = edited_copy(mixlora, "edited-src", |c| c["top_k"] = 3.into());
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(copy.join(f), edited.join(f)).unwrap();
    }
    let alone = eval(&args(&[&edited])).unwrap_err().to_string();
    let e = error_of(&args(&[lora, &edited]));
    assert_eq!(e, alone);
    assert!(e.contains("top_k is 3 here but 2"), "{e}");
    for d in [other, rank, run, copy] {
        let _ = std::fs::remove_dir_all(d);
    }
}
