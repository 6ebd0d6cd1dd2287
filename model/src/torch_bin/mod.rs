//! PyTorch's `torch.save` files (`adapter_model.bin`), read and written without PyTorch.
//!
//! The format: a zip archive of stored entries ([`zip`]) under one folder, the *archive name*
//! (`torch.save(obj, "x/adapter_model.bin")` uses `adapter_model`):
//! - `{archive}/data.pkl`: the object, pickled (protocol 2), each tensor as
//!   `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)` and
//!   each storage as a persistent id `('storage', torch.FloatStorage, key, location, numel)`;
//! - `{archive}/data/{key}`: each storage's bytes, little-endian, starting on a multiple of 64;
//! - `{archive}/byteorder` (`little`), `{archive}/version` (`3`), and in recent PyTorch
//!   `{archive}/.data/serialization_id`.
//!
//! [`read_bytes`] accepts a dict or `OrderedDict` of f32, f16 or bf16 tensors (or parameters),
//! views with any strides and offsets included, and nothing that would need code to run
//! ([`unpickle`]). [`to_bytes`] writes what `torch.save` writes for a plain dict of contiguous
//! tensors, each on its own storage.

pub mod pickle;
mod torch_globals;
pub mod unpickle;
pub mod zip;

use std::collections::{HashMap, HashSet};
use std::path::Path;

use crate::error::{file_name, Error, Result};
use unpickle::{TensorRef, Value};

/// The element types of the storages read and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TorchDType {
    F32,
    F16,
    BF16,
}

impl TorchDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            TorchDType::F32 => 4,
            TorchDType::F16 | TorchDType::BF16 => 2,
        }
    }

    /// The storage class in the pickle: `FloatStorage`, `HalfStorage` or `BFloat16Storage`.
    pub fn storage_name(self) -> &'static str {
        match self {
            TorchDType::F32 => "FloatStorage",
            TorchDType::F16 => "HalfStorage",
            TorchDType::BF16 => "BFloat16Storage",
        }
    }
}

/// One tensor of a state dict: contiguous, row-major, little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct TorchTensor {
    pub name: String,
    pub dtype: TorchDType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// The tensors of the `torch.save` file at `path`, in the file's order.
pub fn read(path: &Path) -> Result<Vec<TorchTensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    read_bytes(&file_name(path), &bytes)
}

/// The tensors of a `torch.save` archive held in `bytes`; `file` names it in errors.
pub fn read_bytes(file: &str, bytes: &[u8]) -> Result<Vec<TorchTensor>> {
    let entries = zip::read_entries(bytes).map_err(|e| Error::format(file, e))?;
    let pkl = entries
        .iter()
        .find(|e| {
            e.name
                .strip_suffix("/data.pkl")
                .is_some_and(|p| !p.is_empty() && !p.contains('/'))
        })
        .ok_or_else(|| {
            Error::format(file, "no {archive}/data.pkl record: not a torch.save file")
        })?;
    let prefix = pkl
        .name
        .strip_suffix("data.pkl")
        .unwrap_or_default()
        .to_string();
    let record = |name: &str| {
        entries
            .iter()
            .find(|e| e.name.strip_prefix(&prefix) == Some(name))
            .map(|e| e.data)
    };
    if let Some(order) = record("byteorder") {
        if order != b"little" {
            return Err(Error::format(
                file,
                format!(
                    "byte order `{}` is not supported (only little)",
                    String::from_utf8_lossy(order)
                ),
            ));
        }
    }
    let storages: HashMap<&str, &[u8]> = entries
        .iter()
        .filter_map(|e| Some((e.name.strip_prefix(&prefix)?.strip_prefix("data/")?, e.data)))
        .collect();

    let root = unpickle::unpickle(pkl.data)
        .map_err(|e| Error::format(file, format!("{}: {e}", pkl.name)))?;
    let Value::Dict(dict) = root else {
        return Err(Error::format(
            file,
            format!(
                "the pickled object is a {}, not a dict of tensors",
                root.kind()
            ),
        ));
    };
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(dict.items.len());
    for (k, v) in &dict.items {
        let Value::Str(name) = k else {
            return Err(Error::format(
                file,
                format!("a key of the state dict is a {}, not a string", k.kind()),
            ));
        };
        let Value::Tensor(t) = v else {
            return Err(Error::tensor(
                file,
                name,
                format!("the value is a {}, not a tensor", v.kind()),
            ));
        };
        if !seen.insert(name.to_string()) {
            return Err(Error::tensor(file, name, "appears twice"));
        }
        let storage = storages.get(t.storage.key.as_str()).ok_or_else(|| {
            Error::tensor(
                file,
                name,
                format!("its storage record data/{} is missing", t.storage.key),
            )
        })?;
        let data = materialize(t, storage).map_err(|e| Error::tensor(file, name, e))?;
        out.push(TorchTensor {
            name: name.to_string(),
            dtype: t.storage.dtype,
            shape: t.size.clone(),
            data,
        });
    }
    Ok(out)
}

/// The elements the view `t` selects from `storage`, contiguous.
fn materialize(t: &TensorRef, storage: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let es = t.storage.dtype.size();
    let numel = t.storage.numel;
    if numel.checked_mul(es) != Some(storage.len()) {
        return Err(format!(
            "storage data/{} holds {} bytes, not {numel} {} elements",
            t.storage.key,
            storage.len(),
            t.storage.dtype.storage_name()
        ));
    }
    let overflow = || "size or stride overflows".to_string();
    let n = t
        .size
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(overflow)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let last = t
        .size
        .iter()
        .zip(&t.stride)
        .try_fold(t.offset, |a, (&d, &s)| {
            a.checked_add((d - 1).checked_mul(s)?)
        })
        .ok_or_else(overflow)?;
    if last >= numel {
        return Err(format!(
            "the view (offset {}, size {:?}, stride {:?}) reaches element {last} of a storage of {numel}",
            t.offset, t.size, t.stride
        ));
    }
    if t.stride == pickle::contiguous_strides(&t.size) {
        return Ok(storage[t.offset * es..(t.offset + n) * es].to_vec());
    }
    // A strided view: walk the indices in row-major order.
    let mut out = Vec::with_capacity(n * es);
    let mut idx = vec![0usize; t.size.len()];
    for _ in 0..n {
        let at: usize = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
        out.extend_from_slice(&storage[at * es..(at + 1) * es]);
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < t.size[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok(out)
}

/// A `torch.save` archive named `archive` of `{name: tensor}`, tensors in the given order, each
/// on its own storage (`data/0`, `data/1`, ...): what `torch.save(dict, f"{archive}.bin")` writes.
/// `file` names the destination in errors (a tensor whose bytes do not match its shape, or an
/// archive over 4 GiB).
pub fn to_bytes(file: &str, archive: &str, tensors: &[TorchTensor]) -> Result<Vec<u8>> {
    for t in tensors {
        let want = t.shape.iter().product::<usize>() * t.dtype.size();
        if t.data.len() != want {
            return Err(Error::tensor(
                file,
                &t.name,
                format!(
                    "{} bytes for shape {:?} ({want} expected)",
                    t.data.len(),
                    t.shape
                ),
            ));
        }
    }
    let pickled: Vec<pickle::Pickled> = tensors
        .iter()
        .map(|t| pickle::Pickled {
            name: &t.name,
            dtype: t.dtype,
            shape: &t.shape,
        })
        .collect();
    let mut records = vec![
        (
            format!("{archive}/data.pkl"),
            pickle::pickle_state_dict(&pickled),
        ),
        (format!("{archive}/byteorder"), b"little".to_vec()),
    ];
    // torch writes the storages in the order of their keys as strings.
    let mut keys: Vec<(String, usize)> = (0..tensors.len()).map(|i| (i.to_string(), i)).collect();
    keys.sort();
    for (key, i) in keys {
        records.push((format!("{archive}/data/{key}"), tensors[i].data.clone()));
    }
    records.push((format!("{archive}/version"), b"3\n".to_vec()));
    let id = serialization_id(&records);
    records.push((format!("{archive}/.data/serialization_id"), id.into_bytes()));
    zip::write_stored(&records).map_err(|e| Error::format(file, e))
}

/// A deterministic id made of digits, like torch's: a hash of the record names and one of
/// their CRC-32s, 20 digits each.
fn serialization_id(records: &[(String, Vec<u8>)]) -> String {
    let mut names: u64 = 0xcbf2_9ce4_8422_2325; // FNV-1a
    let mut crcs: u64 = 0;
    for (name, data) in records {
        for b in name.bytes() {
            names = (names ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        crcs = crcs.rotate_left(5) ^ crc32fast::hash(data) as u64;
    }
    format!("{names:020}{crcs:020}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, dtype: TorchDType, shape: &[usize], seed: u8) -> TorchTensor {
        let n: usize = shape.iter().product::<usize>() * dtype.size();
        TorchTensor {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            data: (0..n)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect(),
        }
    }

    #[test]
    fn writes_and_reads_back_every_dtype_and_shape() {
        let ts = vec![
            tensor("a.lora_A.weight", TorchDType::F32, &[4, 8], 1),
            tensor("b", TorchDType::BF16, &[3, 1, 2, 5], 2),
            tensor("scalar", TorchDType::F16, &[], 3),
            tensor("empty", TorchDType::F32, &[0, 3], 4),
        ];
        let bytes = to_bytes("x.bin", "adapter_model", &ts).unwrap();
        assert_eq!(read_bytes("x.bin", &bytes).unwrap(), ts);
        // Deterministic.
        assert_eq!(bytes, to_bytes("x.bin", "adapter_model", &ts).unwrap());
        // More than one SETITEMS batch and memo slots past 255.
        let many: Vec<TorchTensor> = (0..1100)
            .map(|i| tensor(&format!("t{i}"), TorchDType::F32, &[2], i as u8))
            .collect();
        let bytes = to_bytes("x.bin", "archive", &many).unwrap();
        assert_eq!(read_bytes("x.bin", &bytes).unwrap(), many);
    }

    #[test]
    fn strided_and_offset_views_are_gathered() {
        let storage: Vec<u8> = (0..12u32).flat_map(|v| (v as f32).to_le_bytes()).collect();
        let view = |offset, size: &[usize], stride: &[usize]| TensorRef {
            storage: unpickle::StorageRef {
                key: "0".into(),
                dtype: TorchDType::F32,
                numel: 12,
            },
            offset,
            size: size.to_vec(),
            stride: stride.to_vec(),
        };
        let floats = |b: Vec<u8>| -> Vec<f32> {
            b.chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        // The transpose of a [3, 4] matrix, and its second row starting at element 4.
        let t = materialize(&view(0, &[4, 3], &[1, 4]), &storage).unwrap();
        assert_eq!(
            floats(t),
            [0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.]
        );
        let r = materialize(&view(4, &[4], &[1]), &storage).unwrap();
        assert_eq!(floats(r), [4., 5., 6., 7.]);
        let e = materialize(&view(10, &[4], &[1]), &storage).unwrap_err();
        assert!(e.contains("reaches element 13"), "{e}");
    }
}
