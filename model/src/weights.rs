//! One way to get named LLaMA weights, whatever the file: a GGUF file or a Hugging Face folder.

use std::path::Path;

use engine::{DType, Device, Tensor};

use crate::config::LlamaConfig;
use crate::convert::from_f32;
use crate::error::{file_name, Error, Result};
use crate::gguf::{GgufFile, MAGIC};
use crate::safetensors::SafetensorsFolder;

enum Source {
    Gguf(GgufFile),
    Safetensors(SafetensorsFolder),
}

/// Weights by Hugging Face name (`model.layers.3.self_attn.q_proj.weight`), loaded on demand from a
/// memory map as `dtype` on `device`.
pub struct Weights {
    source: Source,
    dtype: DType,
    device: Device,
    n_head: usize,
    n_kv_head: usize,
}

/// Opens `path`: a GGUF file, or a Hugging Face folder with `config.json` and safetensors weights.
pub fn load(path: &Path, dtype: DType, device: Device) -> Result<(LlamaConfig, Weights)> {
    Weights::load(path, dtype, device)
}

/// Whether `path` starts with the GGUF magic.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == MAGIC
}

impl Weights {
    /// See [`load`].
    pub fn load(path: &Path, dtype: DType, device: Device) -> Result<(LlamaConfig, Weights)> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F64) {
            return Err(Error::format(
                &file_name(path),
                format!("cannot load weights as {dtype} (use f32, bf16 or f64)"),
            ));
        }
        let (config, source) = if path.is_dir() {
            let config = LlamaConfig::from_json_file(&path.join("config.json"))?;
            (config, Source::Safetensors(SafetensorsFolder::open(path)?))
        } else if path.extension().is_some_and(|e| e == "gguf") || is_gguf(path) {
            let g = GgufFile::open(path)?;
            let mut config = LlamaConfig::from_gguf(g.file(), g.header())?;
            // Llama 3.1+ files carry their RoPE scaling as per-frequency factors.
            if let Some(t) = g.tensor_info("rope_freqs.weight") {
                let (_, factors) = g.dequantize(t)?;
                config = config.with_gguf_freq_factors(g.file(), &factors)?;
            }
            (config, Source::Gguf(g))
        } else {
            return Err(Error::format(
                &file_name(path),
                "neither a GGUF file nor a Hugging Face folder",
            ));
        };
        let weights = Weights {
            source,
            dtype,
            device,
            n_head: config.num_attention_heads,
            n_kv_head: config.num_key_value_heads,
        };
        Ok((config, weights))
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The file `name` comes from (for messages).
    pub fn file_of(&self, name: &str) -> &str {
        match &self.source {
            Source::Gguf(g) => g.file(),
            Source::Safetensors(s) => s.file_of(name),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.found_shape(name).is_some()
    }

    /// Hugging Face names of all tensors, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = match &self.source {
            Source::Gguf(g) => g.hf_names().map(str::to_string).collect(),
            Source::Safetensors(s) => s.names().map(str::to_string).collect(),
        };
        v.sort();
        v
    }

    fn found_shape(&self, name: &str) -> Option<Vec<usize>> {
        match &self.source {
            Source::Gguf(g) => g.tensor_info(name).map(|t| t.shape()),
            Source::Safetensors(s) => s.shape(name).map(<[usize]>::to_vec),
        }
    }

    /// The tensor `name`, which must have `expected_shape` (as the config implies, see
    /// [`LlamaConfig::weight_shape`]). The shape is checked before any data is read.
    pub fn get(&self, name: &str, expected_shape: &[usize]) -> Result<Tensor> {
        let found = self.found_shape(name).ok_or_else(|| Error::MissingTensor {
            file: self.file_of(name).to_string(),
            tensor: name.to_string(),
        })?;
        if found != expected_shape {
            return Err(Error::ShapeMismatch {
                file: self.file_of(name).to_string(),
                tensor: name.to_string(),
                expected: expected_shape.to_vec(),
                found,
            });
        }
        self.get_unchecked(name)
    }

    /// The tensor `name` with whatever shape the file gives it.
    pub fn get_unchecked(&self, name: &str) -> Result<Tensor> {
        match &self.source {
            Source::Gguf(g) => {
                let (shape, v) = g.load_hf(name, self.n_head, self.n_kv_head)?;
                from_f32(g.file(), name, v, &shape, self.dtype, self.device)
            }
            Source::Safetensors(s) => s.load(name, self.dtype, self.device),
        }
    }
}
