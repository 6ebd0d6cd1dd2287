//! The base model of a run or an evaluation, and how adapter files name it: a GGUF file or Hugging
//! Face folder, or the built-in tiny random LLaMA (named by its seed, so an adapter trained on it
//! can be evaluated again).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use engine::{DType, Device};
use model::adapters::{AdapterConfig, PeftType};
use model::{Llama, Tokenizer};

use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::synthetic;

/// A fresh scratch folder path for `what` (`train`, `eval`), unique to this process and this call:
/// library calls may run concurrently in one process (tests do), and each removes its own.
pub fn scratch_dir(what: &str) -> PathBuf {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("mixlora-{what}-{}-{n}", std::process::id()))
}

/// The base model and its tokenizer: a file or folder, or the built-in tiny random LLaMA with the
/// byte-level tokenizer (its tokenizer.json is written into `scratch`).
pub fn load_base_model(
    model: Option<&Path>,
    seed: u64,
    dtype: DType,
    device: Device,
    scratch: &Path,
) -> Result<(Llama, Tokenizer)> {
    match model {
        Some(p) => {
            if !p.exists() {
                return Err(Error::Config(format!(
                    "model {}: no such file or folder",
                    p.display()
                )));
            }
            let m = Llama::load(p, dtype, device)?;
            let t = Tokenizer::load(p, &m.config)?;
            Ok((m, t))
        }
        None => {
            let init = model::RandomInit::frozen_base();
            let m = Llama::random_with(synthetic::tiny_llama_config(), seed, dtype, device, init)?;
            Ok((m, synthetic::load_byte_tokenizer(scratch)?))
        }
    }
}

/// The adapter settings of a run on the base model `base` ([`BaseModel`]).
pub fn adapter_config(cfg: &TrainConfig, base: &BaseModel) -> AdapterConfig {
    let mut a = AdapterConfig::default_for(cfg.adapter);
    a.r = cfg.rank;
    a.lora_alpha = cfg.alpha;
    a.lora_dropout = cfg.dropout;
    a.use_rslora = cfg.rslora;
    a.target_modules = cfg.target_modules.clone();
    a.base_model_name_or_path = base.name.clone();
    a.mixlora_base_model_path = base.path.clone();
    if a.peft_type == PeftType::MixLora {
        a.num_experts = cfg.num_experts;
        a.top_k = cfg.top_k;
        a.top_p = cfg.top_p;
        a.routing_strategy = cfg.routing;
        a.router_aux_loss_coef = cfg.aux_loss_coef;
        a.router_init_range = cfg.router_init_range;
    }
    a
}

/// How the built-in base is named in adapter files: its seed makes it reproducible.
const BUILTIN_PREFIX: &str = "builtin:tiny-random-llama:seed=";

/// How an adapter file names its base model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseModel {
    /// `base_model_name_or_path`: a Hugging Face name or folder
    /// ([`model::adapters::base_model_name`]).
    pub name: String,
    /// `mixlora_base_model_path`: the exact file or folder given, or the built-in base with its
    /// seed.
    pub path: String,
}

impl BaseModel {
    /// The base model at `model`, or the built-in one made with `seed`.
    pub fn new(model: Option<&Path>, seed: u64) -> BaseModel {
        match model {
            None => {
                let builtin = format!("{BUILTIN_PREFIX}{seed}");
                BaseModel {
                    name: builtin.clone(),
                    path: builtin,
                }
            }
            Some(p) => BaseModel {
                name: model::adapters::base_model_name(p),
                path: p.display().to_string(),
            },
        }
    }
}

/// The seed of the built-in base an adapter was trained on (42 when the adapter does not say).
pub(crate) fn builtin_seed(adapter_dir: Option<&Path>) -> u64 {
    adapter_dir
        .and_then(|d| AdapterConfig::from_json_file(&d.join("adapter_config.json")).ok())
        .and_then(|c| {
            [&c.mixlora_base_model_path, &c.base_model_name_or_path]
                .into_iter()
                .find_map(|s| s.strip_prefix(BUILTIN_PREFIX)?.parse().ok())
        })
        .unwrap_or(42)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_call_gets_its_own_scratch_folder() {
        // Runs in one process share no scratch folder: one removing its own cannot pull the
        // built-in tokenizer from under another (run_safety's tests train concurrently).
        let (a, b) = (scratch_dir("train"), scratch_dir("train"));
        assert_ne!(a, b);
        assert!(a.starts_with(std::env::temp_dir()));
    }

    #[test]
    fn adapter_files_name_the_base_for_hugging_face_and_keep_the_exact_path() {
        let gguf = Path::new("models/cache/Qwen2.5-0.5B-Instruct-Q4_K_M.gguf");
        let base = BaseModel::new(Some(gguf), 1);
        let a = adapter_config(&TrainConfig::default(), &base);
        // The file cannot be read here: its stem without the quantisation.
        assert_eq!(a.base_model_name_or_path, "Qwen2.5-0.5B-Instruct");
        assert_eq!(a.mixlora_base_model_path, gguf.display().to_string());
        let v: serde_json::Value = serde_json::from_str(&a.to_json_string()).unwrap();
        assert_eq!(v["mixlora_base_model_path"], gguf.display().to_string());
        // The built-in base keeps its seed, which eval reads back.
        let builtin = adapter_config(&TrainConfig::default(), &BaseModel::new(None, 7));
        assert_eq!(
            builtin.mixlora_base_model_path,
            "builtin:tiny-random-llama:seed=7"
        );
        let dir = std::env::temp_dir().join(format!("mixlora-basemodel-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("adapter_config.json"), builtin.to_json_string()).unwrap();
        assert_eq!(builtin_seed(Some(&dir)), 7);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
