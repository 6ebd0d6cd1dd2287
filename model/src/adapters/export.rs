//! Converting adapter folders between this crate's format (`adapter_model.safetensors`) and
//! MoE-PEFT's (`adapter_model.bin`, `torch.save`'s format), without the base model: the
//! tensors are copied bit for bit, in their dtype, and the config is rewritten with the keys
//! and JSON number types MoE-PEFT and the `mixlora` package assert.

use std::path::Path;

use super::io::{layer_of, read_weights, to_safetensors, unexpected, write_folder};
use super::{param_names, AdapterConfig, ParamKind, BIN_FILE, CONFIG_FILE, WEIGHTS_FILE};
use crate::error::{file_name, Error, Result};
use crate::torch_bin::{self, TorchTensor};

/// The weights format an adapter folder is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// MoE-PEFT's: `adapter_model.bin` that `torch.load(path, weights_only=True)` reads.
    MoePeft,
    /// This crate's: `adapter_model.safetensors`.
    Safetensors,
}

impl ExportFormat {
    /// The command-line name: `moe-peft` or `safetensors`.
    pub fn name(self) -> &'static str {
        match self {
            ExportFormat::MoePeft => "moe-peft",
            ExportFormat::Safetensors => "safetensors",
        }
    }
}

impl std::str::FromStr for ExportFormat {
    type Err = String;
    /// Parses `moe-peft` or `safetensors`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        [ExportFormat::MoePeft, ExportFormat::Safetensors]
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| format!("unknown format `{s}` (expected moe-peft or safetensors)"))
    }
}

impl std::fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An adapter folder's contents: its config and its tensors in the order the config lists them.
#[derive(Debug, Clone)]
pub struct AdapterFiles {
    pub config: AdapterConfig,
    pub tensors: Vec<TorchTensor>,
    /// The number of decoder layers the tensors cover.
    pub layers: usize,
}

/// Reads the adapter folder `dir` (either format) and checks its tensors against its config as
/// far as that goes without the base model: every name the config calls for is there for each
/// layer, no other tensor is, and each rank and expert count matches the config.
pub fn read_folder(dir: &Path) -> Result<AdapterFiles> {
    let config = AdapterConfig::from_json_file(&dir.join(CONFIG_FILE))?;
    let (file, mut tensors) = read_weights(dir)?;
    let layers = tensors
        .iter()
        .filter_map(|t| layer_of(&t.name))
        .max()
        .map_or(0, |l| l + 1);
    let mut ordered = Vec::with_capacity(tensors.len());
    for (name, kind) in param_names(&config, layers) {
        let i =
            tensors
                .iter()
                .position(|t| t.name == name)
                .ok_or_else(|| Error::MissingTensor {
                    file: file.clone(),
                    tensor: name.clone(),
                })?;
        let t = tensors.swap_remove(i);
        let (dim, want, key) = match kind {
            ParamKind::LoraA => (0, config.r, "r"),
            ParamKind::LoraB => (1, config.r, "r"),
            ParamKind::Router => (0, config.num_experts, "num_experts"),
        };
        if t.shape.len() != 2 || t.shape[dim] != want {
            return Err(Error::tensor(
                &file,
                &name,
                format!(
                    "shape {:?} does not fit {key} = {want} of {CONFIG_FILE}",
                    t.shape
                ),
            ));
        }
        ordered.push(t);
    }
    if let Some(extra) = tensors.iter().map(|t| &t.name).min() {
        return Err(unexpected(&file, extra, &config));
    }
    Ok(AdapterFiles {
        config,
        tensors: ordered,
        layers,
    })
}

/// Writes the adapter folder `src` to the folder `dst` in `format`, atomically (like
/// [`super::save`]; other files in `dst` are kept). `base_model` replaces
/// `base_model_name_or_path` when given. Returns what was written.
pub fn export(
    src: &Path,
    dst: &Path,
    format: ExportFormat,
    base_model: Option<&str>,
) -> Result<AdapterFiles> {
    let mut files = read_folder(src)?;
    if let Some(name) = base_model {
        files.config.base_model_name_or_path = name.to_string();
    }
    let cfg = &files.config;
    match format {
        ExportFormat::MoePeft => {
            let config_file = file_name(&src.join(CONFIG_FILE));
            if cfg.integral_alpha().is_none_or(|a| a <= 0) {
                return Err(Error::key(
                    &config_file,
                    "lora_alpha",
                    format!(
                        "{}: MoE-PEFT requires a positive integer alpha",
                        cfg.lora_alpha
                    ),
                ));
            }
            let mut json = cfg.to_json_value();
            if let Some(obj) = json.as_object_mut() {
                obj.insert("bias".into(), "none".into());
            }
            let config = serde_json::to_string_pretty(&json).unwrap_or_default() + "\n";
            let archive = BIN_FILE.trim_end_matches(".bin");
            let bin =
                torch_bin::to_bytes(&file_name(&dst.join(BIN_FILE)), archive, &files.tensors)?;
            write_folder(dst, &[(CONFIG_FILE, config.into_bytes()), (BIN_FILE, bin)])?;
        }
        ExportFormat::Safetensors => {
            let weights = to_safetensors(&file_name(&dst.join(WEIGHTS_FILE)), &files.tensors)?;
            write_folder(
                dst,
                &[
                    (CONFIG_FILE, cfg.to_json_string().into_bytes()),
                    (WEIGHTS_FILE, weights),
                ],
            )?;
        }
    }
    Ok(files)
}
