//! Fused cross-entropy launchers: logits are read in place through their rank-2 strides.

use kernels::CROSS_ENTROPY;

use super::launch::launch;
use super::layout::{to_u32, to_u32s};
use super::{check_extent, float_only, CudaDevice, CudaStorage};
use crate::{DType, Error, Layout, Result};

const ROW_THREADS: u32 = 256;

/// Checks logits `[n, v]` and targets `[n]` u32; returns `(n, v)`. Also the check of the
/// chunked linear cross-entropy's chunks (`fused::linear_cross_entropy`).
pub(crate) fn check(
    op: &'static str,
    x: &CudaStorage,
    l: &Layout,
    t: &CudaStorage,
    tl: &Layout,
) -> Result<(usize, usize)> {
    if l.dims().len() != 2 {
        return Err(Error::RankMismatch {
            op,
            expected: 2,
            shape: l.shape().clone(),
        });
    }
    let (n, v) = (l.dims()[0], l.dims()[1]);
    if tl.dims() != [n] {
        return Err(Error::ShapeMismatch {
            op,
            lhs: l.shape().clone(),
            rhs: tl.shape().clone(),
        });
    }
    if t.dtype != DType::U32 {
        return Err(Error::UnsupportedDType { op, dtype: t.dtype });
    }
    float_only(op, x.dtype)?;
    x.same_device(op, t)?;
    check_extent(op, l, x.len)?;
    Ok((n, v))
}

pub(crate) fn cross_entropy(
    x: &CudaStorage,
    l: &Layout,
    t: &CudaStorage,
    tl: &Layout,
    ignore: u32,
) -> Result<CudaStorage> {
    const OP: &str = "cross_entropy";
    let (n, v) = check(OP, x, l, t, tl)?;
    let out = CudaStorage::alloc(&x.dev, OP, n, x.dtype.accumulation())?;
    if n == 0 {
        return Ok(out);
    }
    let tc = t.contiguous(OP, tl)?;
    let (n32, v32) = (to_u32(OP, n)?, to_u32(OP, v)?);
    let [s0, s1, off] = to_u32s(OP, [l.strides()[0], l.strides()[1], l.offset()])?;
    let (xp, tp, y) = (x.ptr(), tc.ptr, out.ptr());
    let name = format!("{OP}_{}", x.dtype);
    // SAFETY: the logits view lies inside `x` (checked), targets are a contiguous [n] u32, the
    // output holds n accumulators; one block per row.
    unsafe {
        launch!(
            &x.dev,
            OP,
            CROSS_ENTROPY,
            name,
            CudaDevice::rows(n, ROW_THREADS),
            [n32, v32, s0, s1, off, xp, tp, ignore, y]
        )
    }?;
    Ok(out)
}

pub(crate) fn cross_entropy_backward(
    x: &CudaStorage,
    l: &Layout,
    t: &CudaStorage,
    tl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    ignore: u32,
) -> Result<CudaStorage> {
    const OP: &str = "cross_entropy_backward";
    let (n, v) = check(OP, x, l, t, tl)?;
    if gl.dims() != [n] {
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs: l.shape().clone(),
            rhs: gl.shape().clone(),
        });
    }
    float_only(OP, g.dtype)?;
    x.same_device(OP, g)?;
    let out = CudaStorage::alloc(&x.dev, OP, n * v, x.dtype)?;
    if n * v == 0 {
        return Ok(out);
    }
    // Row gradients in the accumulation dtype, contiguous [n].
    let gc = super::elementwise::to_dtype(g, gl, x.dtype.accumulation())?;
    let tc = t.contiguous(OP, tl)?;
    let (n32, v32) = (to_u32(OP, n)?, to_u32(OP, v)?);
    let [s0, s1, off] = to_u32s(OP, [l.strides()[0], l.strides()[1], l.offset()])?;
    let (xp, tp, gp, y) = (x.ptr(), tc.ptr, gc.ptr(), out.ptr());
    let name = format!("{OP}_{}", x.dtype);
    // SAFETY: as in the forward; g is a contiguous [n] of the accumulation type and the output
    // a contiguous [n, v] that each row's block fills completely.
    unsafe {
        launch!(
            &x.dev,
            OP,
            CROSS_ENTROPY,
            name,
            CudaDevice::rows(n, ROW_THREADS),
            [n32, v32, s0, s1, off, xp, tp, ignore, gp, y]
        )
    }?;
    Ok(out)
}
