//! GGUF files (llama.cpp): the header reader, dequantisation, and the mapping of llama.cpp tensors to
//! Hugging Face names and layouts.

mod header;
mod names;
mod quant;

use std::collections::HashMap;
use std::path::Path;

pub use header::{Array, Header, TensorInfo, Value, MAGIC};
pub use names::{gguf_to_hf, unpermute_rows};
pub use quant::{dequantize, GgmlType};

use crate::error::{file_name, Error, Result};
use crate::mmap::map_file;

/// A GGUF file mapped in memory with its parsed header.
pub struct GgufFile {
    file: String,
    mmap: memmap2::Mmap,
    header: Header,
    /// Hugging Face name -> index into `header.tensors` (unknown llama.cpp names map to themselves).
    by_hf_name: HashMap<String, usize>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = file_name(path);
        let mmap = map_file(path)?;
        let header = Header::parse(&file, &mmap)?;
        let by_hf_name = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (gguf_to_hf(&t.name).unwrap_or_else(|| t.name.clone()), i))
            .collect();
        Ok(GgufFile {
            file,
            mmap,
            header,
            by_hf_name,
        })
    }

    /// The file as it appears in errors.
    pub fn file(&self) -> &str {
        &self.file
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The record of the tensor with Hugging Face name `hf_name`.
    pub fn tensor_info(&self, hf_name: &str) -> Option<&TensorInfo> {
        self.by_hf_name
            .get(hf_name)
            .map(|&i| &self.header.tensors[i])
    }

    /// Hugging Face names of all tensors.
    pub fn hf_names(&self) -> impl Iterator<Item = &str> {
        self.by_hf_name.keys().map(String::as_str)
    }

    /// The raw bytes of a tensor (bounds were checked when the header was parsed).
    fn data(&self, t: &TensorInfo) -> Result<&[u8]> {
        let Some(size) = t.ty.byte_size(&t.dims).map_err(|m| self.err(t, m))? else {
            return Err(self.unsupported(t));
        };
        let start = self
            .header
            .data_offset
            .checked_add(t.offset)
            .ok_or_else(|| self.err(t, "offset overflows"))?;
        let end = start
            .checked_add(size)
            .ok_or_else(|| self.err(t, "size overflows"))?;
        usize::try_from(start)
            .ok()
            .zip(usize::try_from(end).ok())
            .and_then(|(s, e)| self.mmap.get(s..e))
            .ok_or_else(|| self.err(t, "data lies past the end of the file"))
    }

    fn err(&self, t: &TensorInfo, msg: impl Into<String>) -> Error {
        Error::tensor(&self.file, &t.name, msg)
    }

    fn unsupported(&self, t: &TensorInfo) -> Error {
        Error::UnsupportedGgufType {
            file: self.file.clone(),
            tensor: t.name.clone(),
            ty: t.ty.to_string(),
        }
    }

    /// A tensor dequantised to f32 in GGUF row order, with its row-major shape.
    pub fn dequantize(&self, t: &TensorInfo) -> Result<(Vec<usize>, Vec<f32>)> {
        let data = self.data(t)?;
        let v = dequantize(t.ty, data, t.elem_count()).ok_or_else(|| self.unsupported(t))?;
        Ok((t.shape(), v))
    }

    /// The tensor with Hugging Face name `hf_name` dequantised to f32 in the Hugging Face layout:
    /// q/k rows are un-permuted with `n_head` / `n_kv_head` heads.
    pub fn load_hf(
        &self,
        hf_name: &str,
        n_head: usize,
        n_kv_head: usize,
    ) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = self
            .tensor_info(hf_name)
            .ok_or_else(|| Error::MissingTensor {
                file: self.file.clone(),
                tensor: hf_name.to_string(),
            })?;
        let (shape, v) = self.dequantize(t)?;
        let heads = match names::permuted(&t.name) {
            Some(names::Permuted::Query) => n_head,
            Some(names::Permuted::Key) => n_kv_head,
            None => return Ok((shape, v)),
        };
        let &[rows, cols] = shape.as_slice() else {
            return Err(self.err(t, format!("expected a matrix, found shape {shape:?}")));
        };
        let v = unpermute_rows(&v, rows, heads, cols).map_err(|m| self.err(t, m))?;
        Ok((shape, v))
    }
}
