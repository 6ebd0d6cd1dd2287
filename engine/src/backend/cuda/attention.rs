//! Launchers of the attention softmax kernels (kernels/src/attention.cu): the causal, key-masked,
//! scaled softmax and the fused softmax backward, one block per row. Operands that are not
//! contiguous are copied first.

use kernels::ATTENTION;

use super::launch::launch;
use super::layout::{to_u32, to_u32s};
use super::{float_only, CudaDevice, CudaStorage};
use crate::backend::checks::{causal_softmax_dims, softmax_backward_dims};
use crate::{Error, Layout, Result};

/// Threads per row: a warp per 32 elements, at most 256 (wider rows loop).
fn row_threads(n: usize) -> u32 {
    (n.div_ceil(32) * 32).clamp(32, 256) as u32
}

pub(crate) fn causal_softmax(
    x: &CudaStorage,
    l: &Layout,
    scale: f64,
    q_offset: usize,
    key_mask: Option<(&CudaStorage, &Layout)>,
) -> Result<CudaStorage> {
    const OP: &str = "causal_softmax";
    float_only(OP, x.dtype)?;
    let [_, h, t, s] = causal_softmax_dims(OP, l, key_mask.map(|(m, ml)| (m.dtype, ml)))?;
    if let Some((m, _)) = key_mask {
        x.same_device(OP, m)?;
    }
    let total = l.elem_count();
    let out = CudaStorage::alloc(&x.dev, OP, total, x.dtype)?;
    if total == 0 {
        return Ok(out);
    }
    let rows = total / s;
    let xc = x.contiguous(OP, l)?; // [b, h, t, s]
    let mc = key_mask.map(|(m, ml)| m.contiguous(OP, ml)).transpose()?; // [b, s] u32
                                                                        // Every query at or past the last key sees them all: clamping keeps q_offset + i in range.
    let [r32, h32, t32, s32, off] = to_u32s(OP, [rows, h, t, s, q_offset.min(s)])?;
    let (xp, mp, y) = (xc.ptr, mc.as_ref().map_or(0u64, |m| m.ptr), out.ptr());
    let name = format!("{OP}_{}", x.dtype);
    // SAFETY: x is a contiguous [b, h, t, s] run (rows = b·h·t rows of s) of `x.dtype`, the
    // output holds rows·s elements of it, the mask (when its pointer is not null) a contiguous
    // [b, s] run of u32; one block per row reads its own row and its sequence's mask row and
    // writes only its own output row.
    unsafe {
        launch!(
            &x.dev,
            OP,
            ATTENTION,
            name,
            CudaDevice::rows(rows, row_threads(s)),
            [r32, h32, t32, s32, off, scale, xp, mp, y]
        )
    }?;
    Ok(out)
}

pub(crate) fn softmax_backward(
    y: &CudaStorage,
    l: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    scale: f64,
) -> Result<CudaStorage> {
    const OP: &str = "softmax_backward";
    float_only(OP, y.dtype)?;
    if g.dtype != y.dtype {
        return Err(Error::DTypeMismatch {
            op: OP,
            lhs: y.dtype,
            rhs: g.dtype,
        });
    }
    y.same_device(OP, g)?;
    let n = softmax_backward_dims(OP, l, gl)?;
    let total = l.elem_count();
    let dx = CudaStorage::alloc(&y.dev, OP, total, y.dtype)?;
    if total == 0 {
        return Ok(dx);
    }
    let rows = total / n;
    let (yc, gc) = (y.contiguous(OP, l)?, g.contiguous(OP, gl)?); // [rows, n] each
    let (r32, n32, yp, gp, dp) = (to_u32(OP, rows)?, to_u32(OP, n)?, yc.ptr, gc.ptr, dx.ptr());
    let name = format!("{OP}_{}", y.dtype);
    // SAFETY: y and g are contiguous [rows, n] runs of one dtype and dx holds rows·n elements of
    // it; one block per row reads its rows of y and g and writes its row of dx.
    unsafe {
        launch!(
            &y.dev,
            OP,
            ATTENTION,
            name,
            CudaDevice::rows(rows, row_threads(n)),
            [r32, n32, scale, yp, gp, dp]
        )
    }?;
    Ok(dx)
}
