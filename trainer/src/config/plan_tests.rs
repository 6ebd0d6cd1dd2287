//! The plan of a run: `[[adapter]]` tables, `--sweep`, and a plain run as a plan of one.

use std::path::{Path, PathBuf};

use clap::Parser;
use model::PeftType;

use super::*;
use crate::schedule::ScheduleKind;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: TrainArgs,
}

fn args(flags: &[&str]) -> TrainArgs {
    let mut v = vec!["mixlora"];
    v.extend_from_slice(flags);
    Cli::try_parse_from(v).unwrap().args
}

fn plan(flags: &[&str]) -> Result<RunPlan> {
    args(flags).resolve_plan()
}

/// Writes `text` to a fresh file `name`; returns its path as a string.
fn toml_file(name: &str, text: &str) -> String {
    let d = std::env::temp_dir().join(format!("mixlora-plan-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

fn err(r: Result<RunPlan>) -> String {
    let e = r.unwrap_err().to_string();
    assert!(!e.contains('\n'), "{e}");
    e
}

fn names(p: &RunPlan) -> Vec<&str> {
    p.adapters.iter().map(|a| a.name.as_str()).collect()
}

const TWO_TABLES: &str = "\
model = \"m.gguf\"
kind = \"lora\"
lr = 1e-3
rank = 8
out_dir = \"runs\"
warmup_steps = 5

[[adapter]]
name = \"a\"
lr = 3e-4
adapter = \"mixlora\"
warmup_ratio = 0.1
data = [\"d/a.json\"]

[[adapter]]
name = \"b\"
seed = 7
out_dir = \"elsewhere/b\"
target_modules = [\"q_proj\", \"v_proj\"]
";

#[test]
fn tables_inherit_the_top_level_and_flags_but_their_own_settings_win() {
    let f = toml_file("two.toml", TWO_TABLES);
    let dir = Path::new(&f).parent().unwrap().to_path_buf();
    let p = plan(&["--config", &f, "--lr", "5e-4", "--epochs", "3"]).unwrap();
    assert_eq!(names(&p), ["a", "b"]);
    let (a, b) = (&p.adapters[0].config, &p.adapters[1].config);
    // The table's own lr wins over the flag, which wins over the top level.
    assert_eq!((a.lr, b.lr), (3e-4, 5e-4));
    assert_eq!((a.epochs, b.epochs), (3, 3));
    assert_eq!((a.rank, b.rank), (8, 8), "the top level");
    assert_eq!((a.adapter, b.adapter), (PeftType::MixLora, PeftType::Lora));
    assert_eq!((a.seed, b.seed), (42, 7));
    // A table's warmup replaces the top level's of either kind.
    assert_eq!((a.warmup_steps, a.warmup_ratio), (None, Some(0.1)));
    assert_eq!((b.warmup_steps, b.warmup_ratio), (Some(5), None));
    // Paths relative to the file; out_dir by default `<out_dir>/<name>`.
    assert_eq!(a.data, vec![dir.join("d/a.json")]);
    assert_eq!(a.out_dir, dir.join("runs/a"));
    assert_eq!(b.out_dir, dir.join("elsewhere/b"));
    assert_eq!(b.target_modules, ["q_proj", "v_proj"]);
    assert_eq!(a.target_modules.len(), 7);
    // Shared settings are the run's, in the plan and in every adapter.
    assert_eq!(p.shared.model, Some(dir.join("m.gguf")));
    for x in &p.adapters {
        assert_eq!(SharedSettings::of(&x.config), p.shared);
    }
    // --out moves the folders that the tables leave to the run.
    let p = plan(&["--config", &f, "--out", "o"]).unwrap();
    assert_eq!(p.adapters[0].config.out_dir, PathBuf::from("o/a"));
    assert_eq!(p.adapters[1].config.out_dir, dir.join("elsewhere/b"));
}

#[test]
fn a_shared_key_in_a_table_is_refused_naming_table_key_and_line() {
    for key in SHARED_KEYS {
        let value = match key {
            "model" => "\"x.gguf\"",
            "device" => "\"cpu\"",
            "dtype" => "\"f32\"",
            "moe_impl" => "\"naive\"",
            "moe_kernels" => "\"gemms\"",
            "moe_chunk_tokens" => "8",
            "group_mode" => "\"shared\"",
            _ => "true",
        };
        let text =
            format!("lr = 1e-3\n\n[[adapter]]\nname = \"fast\"\nrank = 4\n{key} = {value}\n");
        let f = toml_file("shared.toml", &text);
        let e = err(plan(&["--config", &f]));
        assert!(e.starts_with(&format!("{f}: line 6: ")), "{e}");
        assert!(
            e.contains(&format!("`{key}`")) && e.contains("`fast`"),
            "{e}"
        );
        assert!(e.contains("whole run"), "{e}");
    }
}

#[test]
fn a_bad_table_names_the_key_the_table_the_file_and_the_line() {
    let f = toml_file(
        "unknown.toml",
        "[[adapter]]\nname = \"a\"\n\n[[adapter]]\nname = \"b\"\nlearning_rat = 2\n",
    );
    let e = err(plan(&["--config", &f]));
    assert!(
        e.starts_with(&format!("{f}: line 6: unknown key `learning_rat`")),
        "{e}"
    );
    assert!(e.contains("[[adapter]] `b`"), "{e}");
    let f = toml_file(
        "badvalue.toml",
        "[[adapter]]\nname = \"a\"\nrouting = \"top2\"\n",
    );
    let e = err(plan(&["--config", &f]));
    assert!(
        e.starts_with(&format!("{f}: line 3: unknown routing `top2`")),
        "{e}"
    );
    let f = toml_file("noname.toml", "lr = 1e-3\n[[adapter]]\nrank = 4\n");
    let e = err(plan(&["--config", &f]));
    assert!(e.contains("[[adapter]] 1 has no name"), "{e}");
    // Per-adapter validation names the adapter and where its table is.
    let f = toml_file(
        "invalid.toml",
        "[[adapter]]\nname = \"a\"\n\n[[adapter]]\nname = \"b\"\ntop_k = 9\n",
    );
    let e = err(plan(&["--config", &f]));
    assert!(
        e.starts_with(&format!("{f}: line 5: [[adapter]] `b`: top_k 9")),
        "{e}"
    );
}

#[test]
fn names_must_be_safe_and_unique_and_folders_distinct() {
    for (tables, needle) in [
        ("name = \"a\"\n[[adapter]]\nname = \"a\"\n", "line 5: [[adapter]] `a`: the name is taken"),
        ("name = \"../up\"\n", "line 3: [[adapter]] `../up`: the name has `/`"),
        ("name = \".hidden\"\n", "may not start with"),
        ("name = \"\"\n", "1 to 100 characters"),
        (
            "name = \"a\"\nout_dir = \"shared\"\n[[adapter]]\nname = \"b\"\nout_dir = \"shared/\"\n",
            "line 6: [[adapter]] `b`: writes to",
        ),
        (
            "name = \"a\"\nout_dir = \"out/b\"\n[[adapter]]\nname = \"b\"\n",
            "as adapter `a` does",
        ),
    ] {
        let f = toml_file("names.toml", &format!("out_dir = \"out\"\n[[adapter]]\n{tables}"));
        let e = err(plan(&["--config", &f]));
        assert!(e.starts_with(&format!("{f}: ")) && e.contains(needle), "{tables}: {e}");
    }
}

#[test]
fn sweep_is_the_product_of_its_values_named_by_them() {
    let p = plan(&[
        "--model",
        "m.gguf",
        "--out",
        "runs",
        "--sweep",
        "lr=2e-4,5e-4,1e-3",
        "--sweep",
        "seed=42,43",
        "--rank",
        "4",
    ])
    .unwrap();
    assert_eq!(
        names(&p),
        [
            "lr2e-4_seed42",
            "lr2e-4_seed43",
            "lr5e-4_seed42",
            "lr5e-4_seed43",
            "lr1e-3_seed42",
            "lr1e-3_seed43"
        ]
    );
    for a in &p.adapters {
        let want = TrainConfig {
            model: Some("m.gguf".into()),
            rank: 4,
            lr: a.config.lr,
            seed: a.config.seed,
            out_dir: PathBuf::from("runs").join(&a.name),
            ..TrainConfig::default()
        };
        assert_eq!(a.config, want);
    }
    let lrs: Vec<f64> = p.adapters.iter().map(|a| a.config.lr).collect();
    assert_eq!(lrs, [2e-4, 2e-4, 5e-4, 5e-4, 1e-3, 1e-3]);
    // Words, lists (items joined with `+`), dashes in the key.
    let p = plan(&[
        "--model",
        "m.gguf",
        "--sweep",
        "adapter=lora,mixlora",
        "--sweep",
        "target-modules=q_proj+v_proj,down_proj",
    ])
    .unwrap();
    assert_eq!(
        names(&p),
        [
            "adapterlora_target_modulesq_proj+v_proj",
            "adapterlora_target_modulesdown_proj",
            "adaptermixlora_target_modulesq_proj+v_proj",
            "adaptermixlora_target_modulesdown_proj"
        ]
    );
    assert_eq!(p.adapters[0].config.adapter, PeftType::Lora);
    assert_eq!(p.adapters[0].config.target_modules, ["q_proj", "v_proj"]);
    assert_eq!(p.adapters[3].config.target_modules, ["down_proj"]);
    // A path's characters that a folder name should not hold become `-`.
    let p = plan(&["--model", "m.gguf", "--sweep", "data=t/a.json,t/b.json"]).unwrap();
    assert_eq!(names(&p), ["datat-a.json", "datat-b.json"]);
    assert_eq!(p.adapters[1].config.data, [PathBuf::from("t/b.json")]);
}

#[test]
fn sweep_refuses_what_it_cannot_vary_and_names_bad_values() {
    let f = toml_file("tables.toml", "[[adapter]]\nname = \"a\"\n");
    for (flags, needle) in [
        (&["--sweep", "device=cpu,cuda"][..], "--sweep device=cpu,cuda: `device` is a setting of the whole run"),
        (&["--sweep", "model=a,b"][..], "`model` is a setting of the whole run"),
        (&["--sweep", "learning_rate=1,2"][..], "unknown setting `learning_rate`"),
        (&["--sweep", "lr"][..], "expected KEY=V1,V2,..."),
        (&["--sweep", "lr=1e-3,,2e-3"][..], "an empty value of `lr`"),
        (&["--sweep", "lr=1e-3,1e-3"][..], "`lr` value `1e-3` is given twice"),
        (&["--sweep", "lr=1e-3", "--sweep", "lr=2e-3"][..], "`lr` is swept twice"),
        (&["--sweep", "lr=1e-3,2e-3", "--lr", "1e-4"][..], "given by its flag too"),
        (&["--sweep", "lr=1e-3,fast"][..], "--sweep lr: bad value `fast`: invalid value 'fast' for '--lr <LR>'"),
        (&["--sweep", "routing=topk,top2"][..], "--sweep routing: bad value `top2`: invalid value 'top2' for '--routing <ROUTING>': unknown routing `top2`"),
        (&["--sweep", "target_modules=q_proj+qproj"][..], "unknown module `qproj`"),
        (&["--sweep", "top_k=2,9"][..], "adapter `top_k9`: top_k 9 is not in 1..=8"),
        (&["--sweep", "lr=1e-3,2e-3", "--config", &f][..], "--sweep and the [[adapter]] tables of"),
    ] {
        let mut all = vec!["--model", "m.gguf"];
        all.extend_from_slice(flags);
        let e = err(plan(&all));
        assert!(e.starts_with("config: ") && e.contains(needle), "{flags:?}: {e}");
    }
}

#[test]
fn the_builtin_base_is_made_from_the_seed_which_adapters_must_then_share() {
    let e = err(plan(&["--sweep", "seed=42,43"]));
    assert!(
        e.contains("`seed42` (seed 42) and `seed43` (seed 43) differ in seed"),
        "{e}"
    );
    // The embedded default's larger step applies to every adapter of a sweep on it.
    let p = plan(&["--sweep", "rank=4,8"]).unwrap();
    assert!(p.adapters.iter().all(|a| a.config.lr == BUILTIN_MODEL_LR));
    assert!(plan(&["--model", "m.gguf", "--sweep", "seed=42,43"]).is_ok());
}

#[test]
fn a_plain_run_is_a_plan_of_one_equal_to_resolve() {
    let f = toml_file(
        "plain.toml",
        "lr = 1e-3\nout_dir = \"runs/x\"\nschedule = \"cosine\"\n",
    );
    let dir = Path::new(&f).parent().unwrap().to_path_buf();
    for flags in [
        &[][..],
        &["--model", "m.gguf", "--rank", "4"][..],
        &["--config", &f, "--warmup-ratio", "0.1"][..],
    ] {
        let p = plan(flags).unwrap();
        assert_eq!(p.adapters.len(), 1);
        let c = args(flags).resolve().unwrap();
        assert_eq!(p.adapters[0].config, c, "{flags:?}");
        assert_eq!(p.shared, SharedSettings::of(&c));
    }
    let p = plan(&["--config", &f]).unwrap();
    assert_eq!(names(&p), ["x"]);
    let c = &p.adapters[0].config;
    assert_eq!((c.lr, c.schedule), (1e-3, ScheduleKind::Cosine));
    assert_eq!(c.out_dir, dir.join("runs/x"));
}

#[test]
fn resolve_takes_a_plan_of_one_adapter_only() {
    let e = args(&["--model", "m.gguf", "--sweep", "lr=1e-3,2e-3"])
        .resolve()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("2 adapters (lr1e-3, lr2e-3) where the settings of one are expected"),
        "{e}"
    );
    let f = toml_file(
        "one.toml",
        "model = \"m.gguf\"\n[[adapter]]\nname = \"solo\"\nrank = 2\n",
    );
    let c = args(&["--config", &f]).resolve().unwrap();
    assert_eq!(c.rank, 2);
    assert!(c.out_dir.ends_with("out/solo"));
}

#[test]
fn every_adapter_of_a_plan_round_trips_through_its_train_config_toml() {
    let f = toml_file("rt.toml", TWO_TABLES);
    let from_tables = plan(&["--config", &f, "--moe-chunk-tokens", "64"]).unwrap();
    let from_sweep = plan(&[
        "--model",
        "m.gguf",
        "--sweep",
        "routing=topk,topp",
        "--sweep",
        "max_steps=3,9",
    ])
    .unwrap();
    for p in [from_tables, from_sweep] {
        for a in &p.adapters {
            for c in [a.config.clone(), a.config.recorded()] {
                let text = c.to_toml_string().unwrap();
                assert_eq!(
                    TrainConfig::from_toml_str("x", &text).unwrap(),
                    c,
                    "{}",
                    a.name
                );
            }
            // Read back with --config, a record (absolute paths) is a plan of one with the same
            // settings.
            let c = a.config.recorded();
            let rec = toml_file("record.toml", &c.to_toml_string().unwrap());
            assert_eq!(args(&["--config", &rec]).resolve().unwrap(), c);
        }
    }
}

#[test]
fn shared_keys_are_the_shared_settings_and_settings_of_a_run() {
    let c = TrainConfig {
        model: Some("m".into()),
        moe_chunk_tokens: std::num::NonZeroUsize::new(4),
        ..TrainConfig::default()
    };
    let shared = toml::Table::try_from(SharedSettings::of(&c)).unwrap();
    let mut keys: Vec<&str> = shared.keys().map(String::as_str).collect();
    let mut want = SHARED_KEYS.to_vec();
    keys.sort();
    want.sort();
    assert_eq!(keys, want);
    let all = toml::Table::try_from(TrainConfig {
        overwrite: true,
        ..c
    })
    .unwrap();
    assert!(SHARED_KEYS
        .iter()
        .all(|k| all.contains_key(*k) || *k == "overwrite"));
}

#[test]
fn target_modules_from_flags_and_toml_and_what_the_adapter_gets() {
    let c = args(&[
        "--target-modules",
        "q_proj,v_proj",
        "--target-modules",
        "up_proj",
    ])
    .resolve()
    .unwrap();
    assert_eq!(c.target_modules, ["q_proj", "v_proj", "up_proj"]);
    let base = crate::base_model::BaseModel::new(None, 42);
    let a = crate::base_model::adapter_config(&c, &base);
    assert_eq!(a.target_modules, ["q_proj", "v_proj", "up_proj"]);
    let a = crate::base_model::adapter_config(&TrainConfig::default(), &base);
    assert_eq!(a.target_modules, ALL_MODULES);
    for (flag, needle) in [
        (
            "q_proj,qproj",
            "target_modules: unknown module `qproj` (expected q_proj, k_proj",
        ),
        ("q_proj,q_proj", "names `q_proj` twice"),
    ] {
        let e = args(&["--target-modules", flag])
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("config: ") && e.contains(needle), "{e}");
    }
    let e = TrainConfig::from_toml_str("t.toml", "target_modules = []\n")
        .unwrap()
        .validate()
        .unwrap_err();
    assert!(e.to_string().contains("target_modules is empty"), "{e}");
}
