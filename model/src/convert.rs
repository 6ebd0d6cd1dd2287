//! Host data to engine tensors in the requested dtype.
//!
//! The engine owns its buffers (`Tensor::from_vec` takes a `Vec`) and has no way to wrap borrowed
//! memory, so a tensor whose file dtype equals the requested dtype is copied exactly once, straight
//! from the memory map into its buffer; other dtypes go through one f32 conversion.

use engine::{DType, Device, Tensor};
use half::{bf16, f16};

use crate::error::{Error, Result};

/// A floating-point encoding found in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileDType {
    F32,
    F16,
    BF16,
}

fn unsupported(file: &str, tensor: &str, dtype: DType) -> Error {
    Error::tensor(
        file,
        tensor,
        format!("cannot load weights as {dtype} (use f32, bf16 or f64)"),
    )
}

/// `v` (row-major, `shape`) as a tensor of `dtype`.
pub fn from_f32(
    file: &str,
    tensor: &str,
    v: Vec<f32>,
    shape: &[usize],
    dtype: DType,
    device: Device,
) -> Result<Tensor> {
    let shape = shape.to_vec();
    Ok(match dtype {
        DType::F32 => Tensor::from_vec(v, shape, device)?,
        DType::BF16 => Tensor::from_vec(
            v.into_iter().map(bf16::from_f32).collect::<Vec<_>>(),
            shape,
            device,
        )?,
        DType::F64 => Tensor::from_vec(
            v.into_iter().map(f64::from).collect::<Vec<_>>(),
            shape,
            device,
        )?,
        DType::U32 => return Err(unsupported(file, tensor, dtype)),
    })
}

/// Little-endian `bytes` of encoding `src` as a tensor of `dtype`.
pub fn from_bytes(
    file: &str,
    tensor: &str,
    bytes: &[u8],
    src: FileDType,
    shape: &[usize],
    dtype: DType,
    device: Device,
) -> Result<Tensor> {
    match (src, dtype) {
        // The one copy: file bytes straight into the tensor's buffer.
        (FileDType::BF16, DType::BF16) => {
            let v: Vec<bf16> = bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                .collect();
            Ok(Tensor::from_vec(v, shape.to_vec(), device)?)
        }
        _ => from_f32(file, tensor, to_f32(bytes, src), shape, dtype, device),
    }
}

/// Little-endian `bytes` of encoding `src` decoded to f32.
pub fn to_f32(bytes: &[u8], src: FileDType) -> Vec<f32> {
    match src {
        FileDType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        FileDType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        FileDType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}
