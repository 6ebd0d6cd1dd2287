//! The plan of a `mixlora train` run: the settings shared by the whole run and, per adapter, its
//! complete [`TrainConfig`]. A run trains one adapter, or several from the `[[adapter]]` tables of
//! the `--config` file or from `--sweep KEY=V1,V2,...` (the product of the values).
//!
//! Per adapter, settings are laid over each other in this order, each overriding the one before:
//! the defaults, the file's top level, the flags, then the adapter's own table (or its `--sweep`
//! values): the table is the more specific statement. An adapter's `out_dir` defaults to
//! `<out_dir>/<name>`, `out_dir` being the run's (top level or `--out-dir`).

use std::num::NonZeroUsize;
use std::path::PathBuf;

use clap::{Args, Command};
use engine::{Device, MoeKernels};
use serde::Serialize;

use super::tables::{self, absolute, check_name, ConfigFile};
use super::words::{self, GroupModeChoice, MoeImplChoice};
use super::CudaGraphs;
use super::{given, BaseDTypeName, DTypeName, TrainArgs, TrainConfig, BUILTIN_MODEL_LR};
use crate::error::{Error, Result};
use model::AttentionImpl;

/// The settings of the whole run, which one base model and one device serve: refused inside an
/// `[[adapter]]` table and by `--sweep`. Every adapter's [`TrainConfig`] holds them too.
pub const SHARED_KEYS: [&str; 13] = [
    "model",
    "device",
    "dtype",
    "base_dtype",
    "resume",
    "overwrite",
    "gradient_checkpointing",
    "moe_impl",
    "moe_kernels",
    "moe_chunk_tokens",
    "group_mode",
    "attention",
    "cuda_graphs",
];

/// The values of [`SHARED_KEYS`] (the TOML keys are the field names).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SharedSettings {
    pub model: Option<PathBuf>,
    #[serde(with = "words")]
    pub device: Device,
    pub dtype: DTypeName,
    pub base_dtype: BaseDTypeName,
    pub resume: bool,
    pub overwrite: bool,
    pub gradient_checkpointing: bool,
    #[serde(with = "words")]
    pub moe_impl: MoeImplChoice,
    #[serde(with = "words")]
    pub moe_kernels: MoeKernels,
    pub moe_chunk_tokens: Option<NonZeroUsize>,
    #[serde(with = "words")]
    pub group_mode: GroupModeChoice,
    #[serde(with = "words")]
    pub attention: AttentionImpl,
    #[serde(with = "words")]
    pub cuda_graphs: CudaGraphs,
}

impl SharedSettings {
    /// The shared settings of `c`.
    pub fn of(c: &TrainConfig) -> SharedSettings {
        SharedSettings {
            model: c.model.clone(),
            device: c.device,
            dtype: c.dtype,
            base_dtype: c.base_dtype,
            resume: c.resume,
            overwrite: c.overwrite,
            gradient_checkpointing: c.gradient_checkpointing,
            moe_impl: c.moe_impl,
            moe_kernels: c.moe_kernels,
            moe_chunk_tokens: c.moe_chunk_tokens,
            group_mode: c.group_mode,
            attention: c.attention,
            cuda_graphs: c.cuda_graphs,
        }
    }
}

/// One adapter of a plan.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedAdapter {
    /// Its table's `name`, its `--sweep` values (`lr2e-4_seed42`), or for a run of one adapter
    /// the last component of its output folder.
    pub name: String,
    /// Its settings, complete and validated (the shared ones equal to the plan's).
    pub config: TrainConfig,
}

/// What `mixlora train` is asked to do.
#[derive(Clone, Debug, PartialEq)]
pub struct RunPlan {
    pub shared: SharedSettings,
    /// At least one, with distinct names and output folders.
    pub adapters: Vec<PlannedAdapter>,
}

impl RunPlan {
    /// The settings of a plan of one adapter; a plan of several is refused (for a caller that
    /// serves one adapter: `mixlora train` itself takes every plan).
    pub fn single(mut self) -> Result<TrainConfig> {
        if self.adapters.len() == 1 {
            return Ok(self.adapters.remove(0).config);
        }
        let names: Vec<&str> = self.adapters.iter().map(|a| a.name.as_str()).collect();
        Err(Error::Config(format!(
            "{} adapters ({}) where the settings of one are expected",
            names.len(),
            names.join(", ")
        )))
    }

    /// The plan of a run of one adapter with settings `config`, named after its output folder.
    pub fn of_one(config: TrainConfig) -> RunPlan {
        let name = config
            .out_dir
            .file_name()
            .map_or("adapter".into(), |n| n.to_string_lossy().into_owned());
        RunPlan {
            shared: SharedSettings::of(&config),
            adapters: vec![PlannedAdapter { name, config }],
        }
    }
}

/// A flag parsed alone (a `--sweep` value), with the parsers of `mixlora train`'s flags.
#[derive(clap::Parser)]
#[command(no_binary_name = true)]
struct OneFlag {
    #[command(flatten)]
    args: TrainArgs,
}

/// Lays `over` over `settings`: a layer that gives a warmup replaces both warmup settings.
fn lay(settings: &mut toml::Table, over: toml::Table) {
    if over.contains_key("warmup_steps") || over.contains_key("warmup_ratio") {
        settings.remove("warmup_steps");
        settings.remove("warmup_ratio");
    }
    settings.extend(over);
}

impl TrainArgs {
    /// The plan of the run: defaults, then the `--config` file's top level, then the flags, then
    /// per adapter its `[[adapter]]` table or `--sweep` values; each adapter's settings
    /// validated, names and output folders distinct.
    pub fn resolve_plan(self) -> Result<RunPlan> {
        let file = match &self.config {
            Some(p) => ConfigFile::read(p)?,
            None => ConfigFile::default(),
        };
        let mut settings = given(&file.top)?;
        lay(&mut settings, given(&self)?);
        // The embedded default (no file, no model): a frozen random tiny model learns only through
        // its adapters and needs a larger step than the real-model default.
        if self.config.is_none() && self.model.is_none() && self.lr.is_none() {
            settings.insert("lr".into(), BUILTIN_MODEL_LR.into());
        }
        let run = TrainConfig::over_defaults(settings.clone())?;
        if file.tables.is_empty() && self.sweep.is_empty() {
            run.validate()?;
            return Ok(RunPlan::of_one(run));
        }
        let config_file = self.config.clone().unwrap_or_default();
        if !file.tables.is_empty() && !self.sweep.is_empty() {
            return Err(Error::Config(format!(
                "--sweep and the [[adapter]] tables of {} both list adapters: give one of them",
                config_file.display()
            )));
        }
        // (name, line in the file or 0, settings the adapter gives)
        let layers = if self.sweep.is_empty() {
            file.tables
                .into_iter()
                .map(|t| Ok((t.name, t.line, given(&t.args)?)))
                .collect::<Result<Vec<_>>>()?
        } else {
            let flags = given(&self)?;
            sweep_combinations(&self.sweep, &flags)?
                .into_iter()
                .map(|(name, s)| (name, 0, s))
                .collect()
        };
        let mut adapters: Vec<PlannedAdapter> = Vec::new();
        for (name, line, own) in layers {
            let err = |why: String| match line {
                0 => Error::Config(format!("adapter `{name}`: {why}")),
                _ => tables::table_error(&config_file, line, &name, why),
            };
            if let Some(i) = adapters.iter().position(|a| a.name == name) {
                return Err(err(format!(
                    "the name is taken by adapter {} already",
                    i + 1
                )));
            }
            let mut s = settings.clone();
            if !own.contains_key("out_dir") {
                let out = run.out_dir.join(&name);
                s.insert("out_dir".into(), out.display().to_string().into());
            }
            lay(&mut s, own);
            let config = TrainConfig::over_defaults(s)
                .and_then(|c| c.validate().map(|()| c))
                .map_err(|e| err(e.to_string().trim_start_matches("config: ").into()))?;
            let out = absolute(&config.out_dir);
            if let Some(other) = adapters.iter().find(|a| absolute(&a.config.out_dir) == out) {
                return Err(err(format!(
                    "writes to {}, as adapter `{}` does: give each adapter its own out_dir",
                    config.out_dir.display(),
                    other.name
                )));
            }
            adapters.push(PlannedAdapter { name, config });
        }
        check_builtin_base_seed(&adapters)?;
        Ok(RunPlan {
            shared: SharedSettings::of(&run),
            adapters,
        })
    }
}

/// The built-in base model is made from `seed`: the adapters of a run on it must share the seed
/// (each trained alone would otherwise have had another base).
fn check_builtin_base_seed(adapters: &[PlannedAdapter]) -> Result<()> {
    let Some(first) = adapters.first() else {
        return Ok(());
    };
    if first.config.model.is_some() {
        return Ok(());
    }
    match adapters.iter().find(|a| a.config.seed != first.config.seed) {
        None => Ok(()),
        Some(other) => Err(Error::Config(format!(
            "adapters `{}` (seed {}) and `{}` (seed {}) differ in seed, which on the built-in \
             model also makes the base model they share: give `model`, or one seed",
            first.name, first.config.seed, other.name, other.config.seed
        ))),
    }
}

/// The settings `--sweep` may vary: every setting of `mixlora train` but the shared ones, by
/// TOML key, with the flag's argument.
fn sweepable() -> Vec<clap::Arg> {
    TrainArgs::augment_args(Command::new("sweep"))
        .get_arguments()
        .filter(|a| {
            let id = a.get_id().as_str();
            !SHARED_KEYS.contains(&id) && id != "config" && id != "sweep"
        })
        .cloned()
        .collect()
}

/// One `--sweep KEY=V1,V2,...`: the key and, per value, its spelling and the setting it gives.
type Axis = (String, Vec<(String, toml::Table)>);

/// Parses one `--sweep` argument; `flags` are the settings the flags give (a key may not be both).
fn sweep_axis(arg: &str, flags: &toml::Table, keys: &[clap::Arg]) -> Result<Axis> {
    let bad = |msg: String| Err(Error::Config(format!("--sweep {arg}: {msg}")));
    let Some((key, values)) = arg.split_once('=') else {
        return bad("expected KEY=V1,V2,...".into());
    };
    let key = key.trim().replace('-', "_");
    if SHARED_KEYS.contains(&key.as_str()) {
        return bad(format!(
            "`{key}` is a setting of the whole run, not of one adapter: it cannot be swept"
        ));
    }
    let Some(flag) = keys.iter().find(|a| a.get_id() == key.as_str()) else {
        return bad(format!("unknown setting `{key}`"));
    };
    if flags.contains_key(&key) {
        return bad(format!("`{key}` is given by its flag too: give it one way"));
    }
    let long = format!("--{}", flag.get_long().unwrap_or(&key));
    let list = matches!(flag.get_action(), clap::ArgAction::Append);
    let mut out: Vec<(String, toml::Table)> = Vec::new();
    for value in values.split(',') {
        if value.is_empty() {
            return bad(format!("an empty value of `{key}`"));
        }
        if out.iter().any(|(v, _)| v == value) {
            return bad(format!("`{key}` value `{value}` is given twice"));
        }
        let items: Vec<&str> = if list {
            value.split('+').collect()
        } else {
            vec![value]
        };
        let argv = items.iter().flat_map(|i| [long.as_str(), i]);
        let one = <OneFlag as clap::Parser>::try_parse_from(argv).map_err(|e| {
            let e = e.to_string();
            let first = e.lines().next().unwrap_or_default();
            Error::Config(format!(
                "--sweep {key}: bad value `{value}`: {}",
                first.trim_start_matches("error: ")
            ))
        })?;
        out.push((value.to_string(), given(&one.args)?));
    }
    Ok((key, out))
}

/// The adapters of the `--sweep` arguments: one per combination of their values (the first
/// argument varying slowest), each named from its values and giving them as settings.
fn sweep_combinations(args: &[String], flags: &toml::Table) -> Result<Vec<(String, toml::Table)>> {
    let keys = sweepable();
    let mut axes: Vec<Axis> = Vec::new();
    for a in args {
        let axis = sweep_axis(a, flags, &keys)?;
        if axes.iter().any(|(k, _)| *k == axis.0) {
            return Err(Error::Config(format!(
                "--sweep {a}: `{}` is swept twice: give all its values in one --sweep",
                axis.0
            )));
        }
        axes.push(axis);
    }
    let mut combos: Vec<(Vec<String>, toml::Table)> = vec![(Vec::new(), toml::Table::new())];
    for (key, values) in &axes {
        combos = combos
            .into_iter()
            .flat_map(|(name, s)| {
                values.iter().map(move |(v, given)| {
                    let mut s = s.clone();
                    lay(&mut s, given.clone());
                    let mut name = name.clone();
                    name.push(format!("{key}{}", folder_safe(v)));
                    (name, s)
                })
            })
            .collect();
    }
    combos
        .into_iter()
        .map(|(parts, s)| {
            let name = parts.join("_");
            check_name(&name)
                .map_err(|why| Error::Config(format!("--sweep: adapter `{name}`: {why}")))?;
            Ok((name, s))
        })
        .collect()
}

/// `value` with every character that a folder name should not hold replaced by `-` (a path's
/// `/`, ...).
fn folder_safe(value: &str) -> String {
    value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-+".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect()
}
