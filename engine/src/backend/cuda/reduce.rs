//! Reductions over one dim (one warp per output element, reading the reduced dim in place
//! through its stride), and softmax / log-softmax over the last dim (one block per row).

use kernels::REDUCE;

use super::launch::launch;
use super::layout::{to_u32, to_u32s, StridedArg};
use super::{check_extent, float_only, CudaDevice, CudaStorage};
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

pub(crate) fn softmax(s: &CudaStorage, l: &Layout, log: bool) -> Result<CudaStorage> {
    let op = if log { "log_softmax" } else { "softmax" };
    float_only(op, s.dtype)?;
    let n = l.dims().last().copied().unwrap_or(1);
    let total = l.elem_count();
    let out = CudaStorage::alloc(&s.dev, op, total, s.dtype)?;
    if total == 0 {
        return Ok(out);
    }
    let x = s.contiguous(op, l)?; // [rows, n]
    let rows = total / n;
    let (r32, n32, xp, y) = (to_u32(op, rows)?, to_u32(op, n)?, x.ptr, out.ptr());
    let name = format!("{op}_{}", s.dtype);
    // SAFETY: `x` is a contiguous [rows, n] run of `s.dtype` and the output holds rows * n
    // elements; one block per row touches only its own row.
    unsafe {
        launch!(
            &s.dev,
            op,
            REDUCE,
            name,
            CudaDevice::rows(rows, 256),
            [r32, n32, xp, y]
        )
    }?;
    Ok(out)
}
