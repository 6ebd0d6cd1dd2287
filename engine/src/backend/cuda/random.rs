//! Creation of device storages: constants, host data and counter-based random fills (the same
//! numbers as the CPU backend for every (seed, index)).

use kernels::RANDOM;

use super::elementwise::fill;
use super::launch::launch;
use super::layout::to_u32;
use super::{CudaDevice, CudaStorage};
use crate::backend::cpu::CpuDevice;
use crate::backend::BackendDevice;
use crate::{DType, Error, Result, Shape};

/// Launches `{op}_{dtype}(n, y, seed, a, b)` of random.cu (`randn`, `rand_uniform`: unkeyed,
/// initialisation is not dropout) over a new buffer of `shape`, one element to a thread.
fn random(
    dev: &CudaDevice,
    op: &'static str,
    shape: &Shape,
    dtype: DType,
    seed: u64,
    (a, b): (f64, f64),
) -> Result<CudaStorage> {
    if !dtype.is_float() {
        return Err(Error::UnsupportedDType { op, dtype });
    }
    let n = shape.elem_count();
    let out = CudaStorage::alloc(dev, op, n, dtype)?;
    if n == 0 {
        return Ok(out);
    }
    let (n32, y) = (to_u32(op, n)?, out.ptr());
    let name = format!("{op}_{dtype}");
    // SAFETY: the output holds `n` elements of `dtype`; element i is written by one thread.
    unsafe {
        launch!(
            dev,
            op,
            RANDOM,
            name,
            CudaDevice::grid(n),
            [n32, y, seed, a, b]
        )
    }?;
    Ok(out)
}

impl BackendDevice for CudaDevice {
    type Storage = CudaStorage;

    fn zeros(&self, shape: &Shape, dtype: DType) -> Result<CudaStorage> {
        fill(self, shape.elem_count(), dtype, 0.0)
    }

    fn full(&self, shape: &Shape, dtype: DType, value: f64) -> Result<CudaStorage> {
        fill(self, shape.elem_count(), dtype, value)
    }

    fn for_overwrite(&self, shape: &Shape, dtype: DType) -> Result<CudaStorage> {
        CudaStorage::alloc(self, "for_overwrite", shape.elem_count(), dtype)
    }

    fn upload_f64(&self, data: &[f64], dtype: DType) -> Result<CudaStorage> {
        CudaStorage::from_cpu(self, &CpuDevice.upload_f64(data, dtype)?)
    }

    fn randn(
        &self,
        shape: &Shape,
        dtype: DType,
        mean: f64,
        std: f64,
        seed: u64,
    ) -> Result<CudaStorage> {
        random(self, "randn", shape, dtype, seed, (mean, std))
    }

    fn rand_uniform(
        &self,
        shape: &Shape,
        dtype: DType,
        lo: f64,
        hi: f64,
        seed: u64,
    ) -> Result<CudaStorage> {
        random(self, "rand_uniform", shape, dtype, seed, (lo, hi))
    }

    fn dropout_mask(&self, shape: &Shape, dtype: DType, p: f64, seed: u64) -> Result<CudaStorage> {
        super::dropout::dropout_mask(self, shape, dtype, p, seed)
    }
}
