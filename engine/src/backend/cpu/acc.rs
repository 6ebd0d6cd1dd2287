//! Float views in the accumulation type, for CPU references that compute f32 and bf16 in f32
//! (bf16 rounded once on write) and f64 in f64: [`vec_t`] reads a view, [`store`] writes the
//! result back in a storage dtype, [`by_acc!`] picks the type.

use super::{CpuFloat, CpuStorage};
use crate::backend::BackendStorage;
use crate::{DType, Error, Layout, Result};

/// Errors on a u32 storage: the op runs on floats only.
pub(crate) fn float_only(op: &'static str, s: &CpuStorage) -> Result<()> {
    if s.dtype() == DType::U32 {
        return Err(Error::UnsupportedDType {
            op,
            dtype: DType::U32,
        });
    }
    Ok(())
}

/// A float view as a contiguous `Vec<T>` (T is f32 for f32/bf16 storages, f64 for f64).
pub(crate) fn vec_t<T: CpuFloat>(op: &'static str, s: &CpuStorage, l: &Layout) -> Result<Vec<T>> {
    match s {
        CpuStorage::F64(v) => Ok(CpuStorage::gather_view(v, l)
            .into_iter()
            .map(|x| T::from(x).unwrap_or_else(T::nan))
            .collect()),
        _ => Ok(s
            .view_f32(op, l)?
            .into_iter()
            .map(|x| T::from(x).unwrap_or_else(T::nan))
            .collect()),
    }
}

/// A `Vec<T>` stored as `dtype` (bf16 rounds once).
pub(crate) fn store<T: CpuFloat>(v: Vec<T>, dtype: DType) -> CpuStorage {
    let f32s = || {
        v.iter()
            .map(|x| x.to_f32().unwrap_or(f32::NAN))
            .collect::<Vec<_>>()
    };
    match dtype {
        DType::F64 => CpuStorage::F64(v.iter().map(|x| x.to_f64().unwrap_or(f64::NAN)).collect()),
        DType::BF16 => CpuStorage::bf16_from_f32(f32s()),
        _ => CpuStorage::F32(f32s()),
    }
}

/// Runs `$body` with `T` = f64 for f64 storages and f32 otherwise.
macro_rules! by_acc {
    ($d:expr, $t:ident => $body:expr) => {
        if $d == $crate::DType::F64 {
            type $t = f64;
            $body
        } else {
            type $t = f32;
            $body
        }
    };
}
pub(crate) use by_acc;
