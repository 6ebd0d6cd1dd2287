//! Reductions over one dim (one warp per output element, reading the reduced dim in place
//! through its stride).

use kernels::REDUCE;

use super::launch::launch;
use super::layout::{to_u32s, StridedArg};
use super::{check_extent, CudaDevice, CudaStorage};
use crate::backend::ReduceOp;
use crate::{DType, Error, Layout, Result};

/// Warps per block of the reduce kernels (`WARPS_PER_BLOCK` in reduce.cu).
const WARPS: usize = 8;

pub(crate) fn reduce(s: &CudaStorage, l: &Layout, dim: usize, op: ReduceOp) -> Result<CudaStorage> {
    const OP: &str = "reduce";
    if dim >= l.dims().len() {
        return Err(Error::DimOutOfRange {
            op: OP,
            dim: dim as isize,
            shape: l.shape().clone(),
        });
    }
    check_extent(OP, l, s.len)?;
    let (base, out_dtype) = match op {
        ReduceOp::Sum => ("sum", s.dtype),
        ReduceOp::Max => ("max", s.dtype),
        ReduceOp::Min => ("min", s.dtype),
        ReduceOp::ArgMax => ("argmax", DType::U32),
        ReduceOp::ArgMin => ("argmin", DType::U32),
    };
    let n_out: usize = l
        .dims()
        .iter()
        .enumerate()
        .filter(|&(d, _)| d != dim)
        .map(|(_, &n)| n)
        .product();
    let out = CudaStorage::alloc(&s.dev, OP, n_out, out_dtype)?;
    if n_out == 0 {
        return Ok(out);
    }
    // Row `o` starts at `at(lo, o)`; its elements are `stride` apart.
    let lo = StridedArg::new(OP, &l.narrow(dim, 0, 1))?;
    let [n32, len, stride] = to_u32s(OP, [n_out, l.dims()[dim], l.strides()[dim]])?;
    let (x, y) = (s.ptr(), out.ptr());
    let name = format!("{base}_{}", s.dtype);
    let cfg = CudaDevice::rows(n_out.div_ceil(WARPS), (WARPS * 32) as u32);
    // SAFETY: `l` lies inside `s` (checked), so every row start plus `j * stride` for j < len is
    // inside it; one warp per output element o < n_out writes y[o] of `out_dtype`.
    unsafe { launch!(&s.dev, OP, REDUCE, name, cfg, [n32, len, stride, lo, x, y]) }?;
    Ok(out)
}
