//! What a resumed run, and an adapter read back, must agree with: the settings the run was
//! started with, which it records in each checkpoint and in its output folder
//! (`train_config.toml`).
//!
//! `--resume` continues a run only with the run's own settings: every setting that shapes the
//! adapter, the data or the trajectory must be the recorded one. Those of
//! [`MAY_CHANGE_ON_RESUME`] may differ: they change how often the run logs, saves and evaluates,
//! and where and how its steps are computed, not what they compute (up to the rounding of
//! another device or MoE implementation).

use std::path::{Path, PathBuf};

use model::adapters::AdapterConfig;

use crate::checkpoint;
use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::out_dir;

/// The settings that may differ between a run and its resumption.
pub const MAY_CHANGE_ON_RESUME: [&str; 16] = [
    "out_dir",
    "resume",
    "overwrite",
    "log_every",
    "save_every",
    "save_total_limit",
    "eval_every",
    "device",
    "gradient_checkpointing",
    "moe_impl",
    "moe_kernels",
    "moe_chunk_tokens",
    "group_mode",
    "attention",
    "cuda_graphs",
    "pack_micro_batches",
];

/// The recorded settings of the run that wrote checkpoint `ckpt` in `out_dir`: the
/// checkpoint's own `train_config.toml`, else (a checkpoint of an older version) the output
/// folder's. Returns the file read and its settings.
pub fn recorded_settings(ckpt: &Path, out_dir: &Path) -> Result<(PathBuf, TrainConfig)> {
    let own = ckpt.join(checkpoint::SETTINGS_FILE);
    let file = if own.is_file() {
        own
    } else {
        out_dir.join(out_dir::SETTINGS_FILE)
    };
    if !file.is_file() {
        return Err(Error::Resume(format!(
            "{}: the run's settings ({}) are missing, so the checkpoint cannot be checked \
             against this run's",
            ckpt.display(),
            out_dir::SETTINGS_FILE
        )));
    }
    Ok((file.clone(), read_settings(&file)?))
}

/// A `train_config.toml` as written by a run.
fn read_settings(file: &Path) -> Result<TrainConfig> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    TrainConfig::from_toml_str(&file.display().to_string(), &text)
}

/// A path as one file, whatever folder it was named from: its canonical form where it exists,
/// else the absolute one.
fn same_file_form(p: &Path) -> PathBuf {
    std::fs::canonicalize(p)
        .or_else(|_| std::path::absolute(p))
        .unwrap_or_else(|_| p.to_path_buf())
}

/// The settings by TOML key, paths in [`same_file_form`].
fn by_key(c: &TrainConfig) -> Result<toml::Table> {
    let c = TrainConfig {
        model: c.model.as_deref().map(same_file_form),
        data: c.data.iter().map(|p| same_file_form(p)).collect(),
        eval_data: c.eval_data.iter().map(|p| same_file_form(p)).collect(),
        ..c.clone()
    };
    toml::Table::try_from(&c).map_err(|e| Error::Config(format!("cannot compare settings: {e}")))
}

fn shown(v: Option<&toml::Value>) -> String {
    v.map_or_else(|| "unset".to_string(), ToString::to_string)
}

/// The settings outside [`MAY_CHANGE_ON_RESUME`] in which `now` differs from `recorded`:
/// `(key, recorded value, value now)`.
pub fn differences(
    now: &TrainConfig,
    recorded: &TrainConfig,
) -> Result<Vec<(String, String, String)>> {
    let (a, b) = (by_key(now)?, by_key(recorded)?);
    let keys: Vec<&String> = b.keys().chain(a.keys()).collect();
    let mut seen = std::collections::HashSet::new();
    Ok(keys
        .into_iter()
        .filter(|k| seen.insert(*k) && !MAY_CHANGE_ON_RESUME.contains(&k.as_str()))
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| (k.clone(), shown(b.get(k)), shown(a.get(k))))
        .collect())
}

/// Refuses to resume the run recorded in `source` with the settings `now` when they differ in
/// a setting outside [`MAY_CHANGE_ON_RESUME`]; the one-line error names each such setting with
/// the run's value and this one's.
pub fn check_settings(now: &TrainConfig, recorded: &TrainConfig, source: &Path) -> Result<()> {
    let diffs = differences(now, recorded)?;
    if diffs.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = diffs
        .iter()
        .map(|(k, was, is)| format!("{k} is {was} there but {is} here"))
        .collect();
    Err(Error::Resume(format!(
        "the run was started with other settings ({}): {}; resume with the run's settings \
         (only {} may change), or start a new run with --overwrite or another --out",
        source.display(),
        list.join("; "),
        MAY_CHANGE_ON_RESUME[3..].join(", ")
    )))
}

/// An `adapter_config.json` as a map of its keys (a LoRA file has no router keys).
fn adapter_keys(c: &AdapterConfig) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::from_str(&c.to_json_string()) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    }
}

/// Refuses the adapter config `found` (read from `file`) unless it is `expected`, the one the
/// run's settings (recorded in `run`) give: an edited `adapter_config.json` would silently
/// train or evaluate another adapter. The base model's name is not compared (it is the
/// settings' model, already checked, spelled from another folder perhaps).
pub fn check_adapter_config(
    file: &Path,
    found: &AdapterConfig,
    expected: &AdapterConfig,
    run: &Path,
) -> Result<()> {
    let (f, e) = (adapter_keys(found), adapter_keys(expected));
    let mut keys: Vec<&String> = e.keys().chain(f.keys()).collect();
    keys.sort();
    keys.dedup();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| k.as_str() != "base_model_name_or_path" && f.get(*k) != e.get(*k))
        .map(|k| {
            let v = |m: &serde_json::Map<String, serde_json::Value>| {
                m.get(k).map_or("absent".to_string(), ToString::to_string)
            };
            format!("{k} is {} here but {} in the run's settings", v(&f), v(&e))
        })
        .collect();
    if diffs.is_empty() {
        return Ok(());
    }
    Err(Error::AdapterMismatch {
        file: file.display().to_string(),
        msg: format!(
            "differs from the run that wrote it ({}): {} (an edited file? restore it, or copy \
             the adapter out of the run's folder to use it as it is)",
            run.display(),
            diffs.join("; ")
        ),
    })
}

/// The settings of the run an adapter folder comes from, if it is in one: `OUT/adapter` or
/// `OUT/checkpoint-N` with `OUT/train_config.toml` (a checkpoint's own file first).
pub fn run_of_adapter(dir: &Path) -> Result<Option<(PathBuf, TrainConfig)>> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name != out_dir::ADAPTER_DIR && !checkpoint::is_checkpoint_entry(&name) {
        return Ok(None);
    }
    let own = dir.join(checkpoint::SETTINGS_FILE);
    let beside = dir
        .parent()
        .map(|p| p.join(out_dir::SETTINGS_FILE))
        .filter(|p| p.is_file());
    match (own.is_file(), beside) {
        (true, _) => Ok(Some((own.clone(), read_settings(&own)?))),
        (false, Some(f)) => Ok(Some((f.clone(), read_settings(&f)?))),
        (false, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::RoutingStrategy;

    #[test]
    fn every_shaping_setting_is_compared() {
        let run = TrainConfig {
            data: vec!["d/train.json".into()],
            ..TrainConfig::default()
        };
        assert!(differences(&run.recorded(), &run).unwrap().is_empty());
        // Free to change: logging, saving, evaluation cadence, device and MoE implementation.
        let free = TrainConfig {
            log_every: 5,
            save_every: 7,
            save_total_limit: 1,
            eval_every: 3,
            device: engine::Device::Cuda(0),
            gradient_checkpointing: true,
            moe_impl: Some(model::MoeImpl::Grouped),
            out_dir: "elsewhere".into(),
            resume: true,
            ..run.clone()
        };
        assert!(differences(&free, &run).unwrap().is_empty());
        for (changed, key, was, is) in [
            (
                TrainConfig {
                    num_experts: 4,
                    ..run.clone()
                },
                "num_experts",
                "8",
                "4",
            ),
            (
                TrainConfig {
                    seed: 7,
                    ..run.clone()
                },
                "seed",
                "42",
                "7",
            ),
            (
                TrainConfig {
                    top_k: 3,
                    ..run.clone()
                },
                "top_k",
                "2",
                "3",
            ),
            (
                TrainConfig {
                    routing: RoutingStrategy::TopP,
                    ..run.clone()
                },
                "routing",
                "\"topk\"",
                "\"topp\"",
            ),
            (
                TrainConfig {
                    max_steps: Some(9),
                    ..run.clone()
                },
                "max_steps",
                "unset",
                "9",
            ),
            (
                TrainConfig {
                    lr: 1e-3,
                    ..run.clone()
                },
                "lr",
                "0.0002",
                "0.001",
            ),
            (
                TrainConfig {
                    cutoff_len: 256,
                    ..run.clone()
                },
                "cutoff_len",
                "512",
                "256",
            ),
            (
                TrainConfig {
                    packing: true,
                    ..run.clone()
                },
                "packing",
                "false",
                "true",
            ),
            (
                TrainConfig {
                    eval_limit: Some(5),
                    ..run.clone()
                },
                "eval_limit",
                "unset",
                "5",
            ),
        ] {
            let d = differences(&changed, &run).unwrap();
            assert_eq!(d, [(key.to_string(), was.to_string(), is.to_string())]);
            let e = check_settings(
                &changed,
                &run,
                Path::new("o/checkpoint-3/train_config.toml"),
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.starts_with("--resume: the run was started with other settings (o/checkpoint-3/")
                    && e.contains(&format!("{key} is {was} there but {is} here")),
                "{e}"
            );
            assert!(!e.contains('\n'));
        }
        let other_data = TrainConfig {
            data: vec!["d/other.json".into()],
            ..run.clone()
        };
        assert_eq!(differences(&other_data, &run).unwrap()[0].0, "data");
    }

    #[test]
    fn an_edited_adapter_config_is_named_with_both_values() {
        let expected = AdapterConfig::mixlora_default();
        let found = AdapterConfig {
            top_k: 3,
            base_model_name_or_path: "spelled/otherwise".into(),
            ..expected.clone()
        };
        let e = check_adapter_config(
            Path::new("o/checkpoint-3/adapter_config.json"),
            &found,
            &expected,
            Path::new("o/train_config.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("o/checkpoint-3/adapter_config.json: differs from the run that wrote it (o/train_config.toml): top_k is 3 here but 2 in the run's settings ("),
            "{e}"
        );
        let renamed = AdapterConfig {
            base_model_name_or_path: "spelled/otherwise".into(),
            ..expected.clone()
        };
        check_adapter_config(Path::new("a"), &renamed, &expected, Path::new("r")).unwrap();
    }
}
