//! Typed errors. Every variant names the op that raised it and carries the shapes or dtypes involved,
//! so that a user sees one clear line.

use crate::{DType, Device, Shape};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: shape mismatch, lhs {lhs} vs rhs {rhs}")]
    ShapeMismatch {
        op: &'static str,
        lhs: Shape,
        rhs: Shape,
    },

    #[error("{op}: shapes {lhs} and {rhs} cannot be broadcast together")]
    BroadcastIncompatible {
        op: &'static str,
        lhs: Shape,
        rhs: Shape,
    },

    #[error("{op}: dtype mismatch, {lhs:?} vs {rhs:?}")]
    DTypeMismatch {
        op: &'static str,
        lhs: DType,
        rhs: DType,
    },

    #[error("{op}: unsupported dtype {dtype:?}")]
    UnsupportedDType { op: &'static str, dtype: DType },

    #[error("{op}: device mismatch, {lhs:?} vs {rhs:?}")]
    DeviceMismatch {
        op: &'static str,
        lhs: Device,
        rhs: Device,
    },

    #[error("{op}: dim {dim} out of range for a tensor of shape {shape}")]
    DimOutOfRange {
        op: &'static str,
        dim: isize,
        shape: Shape,
    },

    #[error("{op}: expected rank {expected}, got shape {shape}")]
    RankMismatch {
        op: &'static str,
        expected: usize,
        shape: Shape,
    },

    #[error("{op}: {numel} elements do not fit shape {shape}")]
    ElementCountMismatch {
        op: &'static str,
        numel: usize,
        shape: Shape,
    },

    #[error("{op}: index {index} out of range for size {size}")]
    IndexOutOfRange {
        op: &'static str,
        index: usize,
        size: usize,
    },

    #[error("{op}: {msg}")]
    InvalidArgument { op: &'static str, msg: String },

    /// A collective of a data-parallel run failed: a rank left, timed out or the transport broke.
    #[error("rank {rank} of {world}: {op}: {msg}")]
    Collective {
        op: &'static str,
        rank: usize,
        world: usize,
        msg: String,
    },

    #[error("{op}: device {device:?} is not available: {msg}")]
    DeviceUnavailable {
        op: &'static str,
        device: Device,
        msg: String,
    },

    #[error("{op}: out of memory on {device}: asked for {requested} bytes, {free} bytes free")]
    OutOfMemory {
        op: &'static str,
        device: Device,
        requested: usize,
        free: usize,
    },

    #[error("NVRTC could not compile kernel module `{module}` for {arch}:\n{log}")]
    KernelCompile {
        module: &'static str,
        arch: String,
        log: String,
    },

    #[error("{op}: CUDA error on {device}: {msg}")]
    Cuda {
        op: &'static str,
        device: Device,
        msg: String,
    },

    #[error("backward: {msg}")]
    Backward { msg: String },

    #[error(
        "{op}: this {shape} tensor is a graph-only reference held by the tape node of \
         `{consumer}`: it has no values"
    )]
    GraphOnly {
        op: &'static str,
        consumer: &'static str,
        shape: Shape,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op,
            msg: msg.into(),
        }
    }
}
