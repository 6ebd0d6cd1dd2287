//! Creation of CPU storages: constants, host data and counter-based random fills.

use half::bf16;
use rayon::prelude::*;

use super::CpuStorage;
use crate::backend::BackendDevice;
use crate::{rng, DType, Error, Result, Shape};

#[derive(Debug, Clone, Copy, Default)]
pub struct CpuDevice;

pub(super) fn fill_with(
    n: usize,
    dtype: DType,
    f: impl Fn(u64) -> f64 + Sync + Send,
) -> CpuStorage {
    let vals: Vec<f64> = (0..n as u64).into_par_iter().map(f).collect();
    from_f64(&vals, dtype)
}

fn from_f64(data: &[f64], dtype: DType) -> CpuStorage {
    match dtype {
        DType::F32 => CpuStorage::F32(data.iter().map(|&x| x as f32).collect()),
        DType::F64 => CpuStorage::F64(data.to_vec()),
        DType::BF16 => CpuStorage::BF16(data.iter().map(|&x| bf16::from_f64(x)).collect()),
        DType::U32 => CpuStorage::U32(data.iter().map(|&x| x as u32).collect()),
    }
}

impl BackendDevice for CpuDevice {
    type Storage = CpuStorage;

    fn zeros(&self, shape: &Shape, dtype: DType) -> Result<CpuStorage> {
        self.full(shape, dtype, 0.0)
    }

    fn full(&self, shape: &Shape, dtype: DType, value: f64) -> Result<CpuStorage> {
        let n = shape.elem_count();
        Ok(match dtype {
            DType::F32 => CpuStorage::F32(vec![value as f32; n]),
            DType::F64 => CpuStorage::F64(vec![value; n]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::from_f64(value); n]),
            DType::U32 => CpuStorage::U32(vec![value as u32; n]),
        })
    }

    fn upload_f64(&self, data: &[f64], dtype: DType) -> Result<CpuStorage> {
        Ok(from_f64(data, dtype))
    }

    fn randn(
        &self,
        shape: &Shape,
        dtype: DType,
        mean: f64,
        std: f64,
        seed: u64,
    ) -> Result<CpuStorage> {
        if !dtype.is_float() {
            return Err(Error::UnsupportedDType { op: "randn", dtype });
        }
        Ok(fill_with(shape.elem_count(), dtype, |i| {
            mean + std * rng::normal(seed, i)
        }))
    }

    fn rand_uniform(
        &self,
        shape: &Shape,
        dtype: DType,
        lo: f64,
        hi: f64,
        seed: u64,
    ) -> Result<CpuStorage> {
        if !dtype.is_float() {
            return Err(Error::UnsupportedDType {
                op: "rand_uniform",
                dtype,
            });
        }
        Ok(fill_with(shape.elem_count(), dtype, |i| {
            lo + (hi - lo) * rng::uniform(seed, i)
        }))
    }

    fn dropout_mask(&self, shape: &Shape, dtype: DType, p: f64, seed: u64) -> Result<CpuStorage> {
        super::dropout::dropout_mask(shape, dtype, p, seed)
    }
}
