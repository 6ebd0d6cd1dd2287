//! Adapter folders: `adapter_config.json` + `adapter_model.safetensors` (f32), or, as MoE-PEFT
//! writes them, `adapter_model.bin` (`torch.save`'s format, [`crate::torch_bin`]), which [`load`]
//! reads when there is no safetensors file.
//!
//! [`save`] is atomic: both files are written and fsynced in a temporary sibling folder
//! (`.{name}.tmp`), which then replaces the target in one step ([`crate::atomic_dir`]: an atomic
//! exchange on Linux, two renames elsewhere), so a kill at any point leaves either the old
//! adapter or the new one, complete. [`load`] checks every tensor name and shape
//! against the config and the base model and reports the first problem in one line naming the
//! file and the tensor.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};

use super::{AdapterConfig, Adapters, ParamKind, ParamSpec};
use crate::convert::{from_bytes, FileDType};
use crate::error::{file_name, Error, Result};
use crate::llama::Llama;
use crate::safetensors::parse_header;
use crate::torch_bin::{self, TorchDType, TorchTensor};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// MoE-PEFT's weights file: `torch.save` of the adapter's state dict.
pub const BIN_FILE: &str = "adapter_model.bin";

/// Writes the model's adapters to the folder `dir` (created if needed), replacing any adapter
/// there only once the new one is complete. Other files already in `dir` are kept.
pub fn save(dir: &Path, model: &Llama) -> Result<()> {
    let adapters = model.adapters().ok_or_else(|| {
        Error::Invalid(format!(
            "{}: the model has no adapters to save",
            file_name(dir)
        ))
    })?;
    save_adapters(dir, adapters)
}

/// Writes the adapter set `adapters` (attached to a model or not: one of a group trained
/// together) to the folder `dir`, as [`save`] does.
pub fn save_adapters(dir: &Path, adapters: &Adapters) -> Result<()> {
    let config = adapters.config.to_json_string();
    let weights = serialize(dir, adapters)?;
    write_folder(
        dir,
        &[(CONFIG_FILE, config.into_bytes()), (WEIGHTS_FILE, weights)],
    )
}

/// Writes `files` (name, bytes) into the folder `dir` atomically: into a temporary sibling
/// folder first, synced, then swapped in. Other files already in `dir` are kept, except the
/// adapter files of either format (a stale weights file of the other format would shadow or
/// contradict the new one).
pub(crate) fn write_folder(dir: &Path, files: &[(&str, Vec<u8>)]) -> Result<()> {
    let name = dir
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a folder name", file_name(dir))))?
        .to_string_lossy()
        .into_owned();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = parent.join(format!(".{name}.tmp"));
    let old = parent.join(format!(".{name}.old"));
    fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    remove_if_present(&tmp)?;
    fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    for (file, bytes) in files {
        write_synced(&tmp.join(file), bytes)?;
    }
    let exists = dir.exists();
    if exists {
        if !dir.is_dir() {
            return Err(Error::Invalid(format!(
                "{}: exists and is not a folder",
                file_name(dir)
            )));
        }
        link_others(dir, &tmp)?;
    }
    sync_dir(&tmp)?;
    crate::atomic_dir::replace_dir(&tmp, dir, &old).map_err(|e| Error::io(dir, e))?;
    sync_dir(&parent)
}

/// The adapters' tensors as one safetensors buffer, f32, with `{"format": "pt"}` metadata.
fn serialize(dir: &Path, adapters: &Adapters) -> Result<Vec<u8>> {
    let params = adapters.named_params();
    let mut tensors = Vec::with_capacity(params.len());
    for (name, t) in params {
        let data: Vec<u8> = t
            .to_vec_f32()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        tensors.push(TorchTensor {
            name,
            dtype: TorchDType::F32,
            shape: t.dims().to_vec(),
            data,
        });
    }
    to_safetensors(&file_name(&dir.join(WEIGHTS_FILE)), &tensors)
}

/// `tensors` as one safetensors buffer in their own dtypes, with `{"format": "pt"}` metadata;
/// `file` names the destination in errors.
pub(crate) fn to_safetensors(file: &str, tensors: &[TorchTensor]) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|t| {
            let dtype = match t.dtype {
                TorchDType::F32 => Dtype::F32,
                TorchDType::F16 => Dtype::F16,
                TorchDType::BF16 => Dtype::BF16,
            };
            TensorView::new(dtype, t.shape.clone(), &t.data)
                .map(|v| (t.name.as_str(), v))
                .map_err(|e| Error::tensor(file, &t.name, e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize(views, Some(meta))
        .map_err(|e| Error::format(file, e.to_string()))
}

/// The weights of the adapter folder `dir`: `adapter_model.safetensors`, or, when there is
/// none, `adapter_model.bin`; returned with the file's name for messages, in file order.
pub(crate) fn read_weights(dir: &Path) -> Result<(String, Vec<TorchTensor>)> {
    let st = dir.join(WEIGHTS_FILE);
    let bin = dir.join(BIN_FILE);
    if !st.exists() && bin.exists() {
        return Ok((file_name(&bin), torch_bin::read(&bin)?));
    }
    let file = file_name(&st);
    let bytes = fs::read(&st).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::format(
            &file,
            format!("not found, and no {BIN_FILE} beside it: not an adapter folder"),
        ),
        _ => Error::io(&st, e),
    })?;
    let mut entries: Vec<_> = parse_header(&file, &bytes)?.into_iter().collect();
    entries.sort_by_key(|(_, e)| e.start);
    let mut out = Vec::with_capacity(entries.len());
    for (name, e) in entries {
        let dtype = match e.dtype {
            Dtype::F32 => TorchDType::F32,
            Dtype::F16 => TorchDType::F16,
            Dtype::BF16 => TorchDType::BF16,
            other => {
                return Err(Error::tensor(
                    &file,
                    &name,
                    format!("unsupported dtype {other:?} (f32, bf16 and f16 are read)"),
                ))
            }
        };
        let data = bytes
            .get(e.start..e.end)
            .ok_or_else(|| Error::tensor(&file, &name, "data range outside the file"))?
            .to_vec();
        out.push(TorchTensor {
            name,
            dtype,
            shape: e.shape,
            data,
        });
    }
    Ok((file, out))
}

fn write_synced(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(data).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))
}

fn remove_if_present(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(dir, e)),
        _ => Ok(()),
    }
}

/// Hard-links (or copies) into `to` every entry of `from` other than the adapter files, so that
/// replacing the folder keeps what else it held (a trainer's state, say).
fn link_others(from: &Path, to: &Path) -> Result<()> {
    for entry in fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let entry = entry.map_err(|e| Error::io(from, e))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let adapter_file = [CONFIG_FILE, WEIGHTS_FILE, BIN_FILE]
            .iter()
            .any(|f| entry.file_name() == *f);
        if dst.exists() || adapter_file {
            continue; // our own new file, or the old adapter's
        }
        let ty = entry.file_type().map_err(|e| Error::io(&src, e))?;
        if ty.is_dir() {
            fs::create_dir(&dst).map_err(|e| Error::io(&dst, e))?;
            link_others(&src, &dst)?;
        } else if fs::hard_link(&src, &dst).is_err() {
            fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
        }
    }
    Ok(())
}

/// Reads the adapter in `dir` and attaches it to `model` (replacing any adapters), after
/// checking every tensor: a missing, unexpected or misshapen tensor, an adapter made for a base
/// with another layer count or hidden size, or a malformed file is a one-line error naming the
/// file and the tensor. The loaded tensors are trainable variables in the adapter dtype; each
/// MixLoRA layer's expert matrices of one kind are laid out in one buffer
/// ([`Adapters::stack_experts`]).
pub fn load(dir: &Path, model: &mut Llama) -> Result<()> {
    let cfg = AdapterConfig::from_json_file(&dir.join(CONFIG_FILE))?;
    let (file, tensors) = read_weights(dir)?;
    let entries: HashMap<&str, &TorchTensor> =
        tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mc = model.config.clone();

    // Layer count first: it explains a whole family of missing or unexpected names at once.
    let layers_in_file = entries
        .keys()
        .filter_map(|n| layer_of(n))
        .max()
        .map(|l| l + 1);
    if let Some(n) = layers_in_file.filter(|&n| n != mc.num_hidden_layers) {
        return Err(Error::format(
            &file,
            format!(
                "the adapter has {n} layers but the base model has {} (an adapter for another base model?)",
                mc.num_hidden_layers
            ),
        ));
    }

    let dtype = model.dtype().accumulation();
    let device = model.device();
    let mut used = HashSet::new();
    let adapters = Adapters::build(&cfg, &mc, |spec| {
        let e = entries
            .get(spec.name.as_str())
            .ok_or_else(|| Error::MissingTensor {
                file: file.clone(),
                tensor: spec.name.clone(),
            })?;
        if e.shape != spec.shape {
            return Err(Error::tensor(
                &file,
                &spec.name,
                shape_message(spec, &e.shape, &cfg, &mc),
            ));
        }
        let src = match e.dtype {
            TorchDType::F32 => FileDType::F32,
            TorchDType::F16 => FileDType::F16,
            TorchDType::BF16 => FileDType::BF16,
        };
        used.insert(spec.name.clone());
        Ok(from_bytes(&file, &spec.name, &e.data, src, &e.shape, dtype, device)?.to_var()?)
    })?;
    let mut extra: Vec<&str> = entries
        .keys()
        .copied()
        .filter(|n| !used.contains(*n))
        .collect();
    extra.sort();
    if let Some(name) = extra.first() {
        return Err(unexpected(&file, name, &cfg));
    }
    // Each layer's expert matrices of one kind in one buffer, as `Adapters::init` lays them out.
    model.set_adapters(adapters.with_stacked_experts()?)?;
    Ok(())
}

/// The error for a tensor the config does not call for (a MoE-PEFT classifier head, say).
pub(crate) fn unexpected(file: &str, name: &str, cfg: &AdapterConfig) -> Error {
    Error::tensor(
        file,
        name,
        format!(
            "unexpected tensor: not part of a {} adapter with target_modules {:?}{}",
            if cfg.is_mixlora() { "MIXLORA" } else { "LORA" },
            cfg.target_modules,
            if cfg.is_mixlora() {
                format!(" and num_experts {}", cfg.num_experts)
            } else {
                String::new()
            }
        ),
    )
}

/// The layer index in a name like `mixlora.layers.3.mlp...` or `base_model.model.model.layers.3...`.
pub(crate) fn layer_of(name: &str) -> Option<usize> {
    let rest = &name[name.find("layers.")? + "layers.".len()..];
    rest.split('.').next()?.parse().ok()
}

/// Why a tensor's shape is wrong: the rank or expert count of the config, or the base model.
fn shape_message(
    spec: &ParamSpec,
    found: &[usize],
    cfg: &AdapterConfig,
    mc: &crate::LlamaConfig,
) -> String {
    let from_config = match spec.kind {
        ParamKind::LoraA | ParamKind::Router => 0,
        ParamKind::LoraB => 1,
    };
    let base_dims_differ = found.len() != spec.shape.len()
        || (0..found.len()).any(|d| d != from_config && found[d] != spec.shape[d]);
    let why = if base_dims_differ {
        format!(
            "an adapter for another base model? this one has hidden_size {}, intermediate_size {}, {} heads and {} key/value heads of {}",
            mc.hidden_size, mc.intermediate_size, mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim
        )
    } else if spec.kind == ParamKind::Router {
        format!("num_experts is {} in {CONFIG_FILE}", cfg.num_experts)
    } else {
        format!("r is {} in {CONFIG_FILE}", cfg.r)
    };
    format!("expected shape {:?}, found {:?} ({why})", spec.shape, found)
}
