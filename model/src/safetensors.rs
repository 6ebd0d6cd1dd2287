//! Hugging Face safetensors weights: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json` (`weight_map`: tensor name -> shard file), each memory-mapped.
//! Tensors in bf16, f16 or f32 are read; see [`crate::convert`] for the copies made.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use engine::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};

use crate::convert::{from_bytes, FileDType};
use crate::error::{file_name, Error, Result};
use crate::mmap::map_file;

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One tensor record of a safetensors header.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: usize,
    pub end: usize,
}

/// Parses and validates the header of a whole safetensors file (`bytes`); `file` names it in errors.
/// Offsets are checked to tile the data section exactly and to agree with shapes and dtypes.
pub fn parse_header(file: &str, bytes: &[u8]) -> Result<HashMap<String, Entry>> {
    let (n, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::format(file, format!("invalid safetensors header: {e}")))?;
    let base = n
        .checked_add(8)
        .ok_or_else(|| Error::format(file, "header size overflows"))?;
    meta.tensors()
        .into_iter()
        .map(|(name, info)| {
            let (s, e) = info.data_offsets;
            let range = base.checked_add(s).zip(base.checked_add(e));
            let Some((start, end)) = range.filter(|&(s, e)| s <= e && e <= bytes.len()) else {
                return Err(Error::tensor(file, &name, "data range outside the file"));
            };
            let entry = Entry {
                dtype: info.dtype,
                shape: info.shape.clone(),
                start,
                end,
            };
            Ok((name, entry))
        })
        .collect()
}

struct Shard {
    file: String,
    mmap: Mmap,
    tensors: HashMap<String, Entry>,
}

/// The safetensors weights of a Hugging Face folder.
pub struct SafetensorsFolder {
    shards: Vec<Shard>,
    /// tensor name -> index into `shards`
    index: HashMap<String, usize>,
}

impl SafetensorsFolder {
    /// Opens `dir/model.safetensors`, or the shards named by `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<SafetensorsFolder> {
        let single = dir.join(SINGLE_FILE);
        let index_path = dir.join(INDEX_FILE);
        if index_path.is_file() {
            Self::open_index(dir, &index_path)
        } else if single.is_file() {
            Self::open_files(&[single])
        } else {
            Err(Error::format(
                &file_name(dir),
                format!("neither {SINGLE_FILE} nor {INDEX_FILE} found"),
            ))
        }
    }

    fn open_index(dir: &Path, index_path: &Path) -> Result<SafetensorsFolder> {
        let file = file_name(index_path);
        let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(&file, format!("invalid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::key(&file, "weight_map", "missing or not an object"))?;
        let mut shard_names: Vec<&str> = Vec::new();
        for (tensor, shard) in map {
            let shard = shard
                .as_str()
                .ok_or_else(|| Error::key(&file, tensor, "shard name is not a string"))?;
            let plain = Path::new(shard).file_name().and_then(|f| f.to_str()) == Some(shard);
            if !plain {
                return Err(Error::key(
                    &file,
                    tensor,
                    format!("shard `{shard}` is not a file name inside the folder"),
                ));
            }
            if !shard_names.contains(&shard) {
                shard_names.push(shard);
            }
        }
        let paths: Vec<PathBuf> = shard_names.iter().map(|s| dir.join(s)).collect();
        let folder = Self::open_files(&paths)?;
        // Every tensor the index names must be in the shard it names.
        for (tensor, shard) in map {
            let shard_path = dir.join(shard.as_str().unwrap_or_default());
            let shard_file = file_name(&shard_path);
            let found = folder
                .index
                .get(tensor)
                .is_some_and(|&i| folder.shards[i].file == shard_file);
            if !found {
                return Err(Error::MissingTensor {
                    file: shard_file,
                    tensor: tensor.clone(),
                });
            }
        }
        Ok(folder)
    }

    fn open_files(paths: &[PathBuf]) -> Result<SafetensorsFolder> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for path in paths {
            let file = file_name(path);
            let mmap = map_file(path)?;
            let tensors = parse_header(&file, &mmap)?;
            for name in tensors.keys() {
                if let Some(&other) = index.get(name) {
                    let other: &Shard = &shards[other];
                    return Err(Error::tensor(
                        &file,
                        name,
                        format!("also stored in {}", other.file),
                    ));
                }
                index.insert(name.clone(), shards.len());
            }
            shards.push(Shard {
                file,
                mmap,
                tensors,
            });
        }
        Ok(SafetensorsFolder { shards, index })
    }

    /// The file that holds `name` (or the first file when none does), for messages.
    pub fn file_of(&self, name: &str) -> &str {
        let i = self.index.get(name).copied().unwrap_or(0);
        self.shards.get(i).map_or("", |s| s.file.as_str())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The row-major shape of `name`, when present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        let &i = self.index.get(name)?;
        self.shards[i].tensors.get(name).map(|e| e.shape.as_slice())
    }

    /// Loads `name` as `dtype` on `device`.
    pub fn load(&self, name: &str, dtype: DType, device: Device) -> Result<Tensor> {
        let missing = || Error::MissingTensor {
            file: self.file_of(name).to_string(),
            tensor: name.to_string(),
        };
        let &i = self.index.get(name).ok_or_else(missing)?;
        let shard = &self.shards[i];
        let e = shard.tensors.get(name).ok_or_else(missing)?;
        let src = match e.dtype {
            Dtype::F32 => FileDType::F32,
            Dtype::F16 => FileDType::F16,
            Dtype::BF16 => FileDType::BF16,
            other => {
                return Err(Error::tensor(
                    &shard.file,
                    name,
                    format!("unsupported safetensors dtype {other:?} (bf16, f16 and f32 are read)"),
                ))
            }
        };
        let bytes = shard
            .mmap
            .get(e.start..e.end)
            .ok_or_else(|| Error::tensor(&shard.file, name, "data range outside the file"))?;
        from_bytes(&shard.file, name, bytes, src, &e.shape, dtype, device)
    }
}
