//! Tensor-level ops: each checks its operands (typed errors naming the op and the shapes), runs
//! the backend primitive, and records its backward rule when an input needs a gradient.
//! One file per op family. Most ops are `Tensor` methods; free functions are re-exported here.

mod assign;
mod attention;
mod concat;
mod cross_entropy;
mod dropout;
mod elementwise;
mod index;
mod matmul;
mod reduce;
mod rms_norm;
mod rope;
mod softmax;
mod stack;
mod view;

pub use attention::*;
pub use concat::*;
pub use cross_entropy::*;
pub use dropout::{set_dropout_key, set_lane, LANES};
pub use rope::*;
pub use stack::*;

use crate::{DType, Error, Result, Tensor};

pub(crate) fn same_dtype(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dtype() != b.dtype() {
        return Err(Error::DTypeMismatch {
            op,
            lhs: a.dtype(),
            rhs: b.dtype(),
        });
    }
    Ok(())
}

pub(crate) fn same_device(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.device() != b.device() {
        return Err(Error::DeviceMismatch {
            op,
            lhs: a.device(),
            rhs: b.device(),
        });
    }
    Ok(())
}

pub(crate) fn float_only(op: &'static str, t: &Tensor) -> Result<()> {
    if !t.dtype().is_float() {
        return Err(Error::UnsupportedDType {
            op,
            dtype: t.dtype(),
        });
    }
    Ok(())
}

pub(crate) fn u32_only(op: &'static str, t: &Tensor) -> Result<()> {
    if t.dtype() != DType::U32 {
        return Err(Error::UnsupportedDType {
            op,
            dtype: t.dtype(),
        });
    }
    Ok(())
}
