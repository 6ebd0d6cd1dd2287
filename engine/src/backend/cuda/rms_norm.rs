//! RMSNorm (forward, fused backward) launchers. Operands that are not contiguous are copied
//! first.

use kernels::RMS_NORM;

use super::launch::launch;
use super::layout::to_u32;
use super::{check_float3, CudaDevice, CudaStorage};
use crate::{Error, Layout, Result};

/// Threads per row of the row kernels.
const ROW_THREADS: u32 = 256;

/// Checks `x: [.., n]` against `w: [n]` and returns `n`.
fn norm_dims(op: &'static str, l: &Layout, wl: &Layout) -> Result<usize> {
    let Some(&n) = l.dims().last() else {
        return Err(Error::RankMismatch {
            op,
            expected: 1,
            shape: l.shape().clone(),
        });
    };
    if wl.dims() != [n] {
        return Err(Error::ShapeMismatch {
            op,
            lhs: l.shape().clone(),
            rhs: wl.shape().clone(),
        });
    }
    Ok(n)
}

pub(crate) fn rms_norm(
    x: &CudaStorage,
    l: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    eps: f64,
) -> Result<CudaStorage> {
    const OP: &str = "rms_norm";
    check_float3(OP, x, w, w)?;
    let n = norm_dims(OP, l, wl)?;
    let total = l.elem_count();
    let out = CudaStorage::alloc(&x.dev, OP, total, x.dtype)?;
    if total == 0 || n == 0 {
        return Ok(out);
    }
    let rows = total / n;
    let (xc, wc) = (x.contiguous(OP, l)?, w.contiguous(OP, wl)?);
    let (r32, n32, xp, wp, y) = (to_u32(OP, rows)?, to_u32(OP, n)?, xc.ptr, wc.ptr, out.ptr());
    let name = format!("{OP}_{}", x.dtype);
    // SAFETY: x is a contiguous [rows, n] run, w a contiguous [n], the output holds rows * n
    // elements, all of one dtype; one block per row.
    unsafe {
        launch!(
            &x.dev,
            OP,
            RMS_NORM,
            name,
            CudaDevice::rows(rows, ROW_THREADS),
            [r32, n32, xp, wp, y, eps]
        )
    }?;
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn rms_norm_backward(
    x: &CudaStorage,
    l: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    eps: f64,
    need_dw: bool,
) -> Result<(CudaStorage, Option<CudaStorage>)> {
    const OP: &str = "rms_norm_backward";
    check_float3(OP, x, w, g)?;
    let n = norm_dims(OP, l, wl)?;
    if gl.shape() != l.shape() {
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs: l.shape().clone(),
            rhs: gl.shape().clone(),
        });
    }
    let dev = &x.dev;
    let total = l.elem_count();
    let dx = CudaStorage::alloc(dev, OP, total, x.dtype)?;
    if n == 0 {
        return Ok((
            dx,
            need_dw
                .then(|| CudaStorage::alloc(dev, OP, 0, x.dtype))
                .transpose()?,
        ));
    }
    if total == 0 {
        let dw = need_dw.then(|| super::elementwise::fill(dev, n, x.dtype, 0.0));
        return Ok((dx, dw.transpose()?));
    }
    let rows = total / n;
    // Per-row 1/rms in the accumulation type (f64 for f64, else f32).
    let acc = x.dtype.accumulation();
    let rstd = CudaStorage::alloc(dev, OP, rows, acc)?;
    let (xc, wc, gc) = (
        x.contiguous(OP, l)?,
        w.contiguous(OP, wl)?,
        g.contiguous(OP, gl)?,
    );
    let (r32, n32, xp, wp, gp) = (to_u32(OP, rows)?, to_u32(OP, n)?, xc.ptr, wc.ptr, gc.ptr);
    let (dxp, rp) = (dx.ptr(), rstd.ptr());
    let name = format!("{OP}_{}", x.dtype);
    // SAFETY: x, g, dx are contiguous [rows, n] runs, w a contiguous [n], rstd holds `rows`
    // accumulators; one block per row writes its dx row and rstd[row].
    unsafe {
        launch!(
            dev,
            OP,
            RMS_NORM,
            name,
            CudaDevice::rows(rows, ROW_THREADS),
            [r32, n32, xp, wp, gp, dxp, rp, eps]
        )
    }?;
    if !need_dw {
        return Ok((dx, None));
    }
    let dw = CudaStorage::alloc(dev, OP, n, x.dtype)?;
    let dwp = dw.ptr();
    let name = format!("rms_norm_dw_{}", x.dtype);
    // SAFETY: one thread per column j < n reads column j of the [rows, n] x and g and the `rows`
    // rstd values, and writes dw[j] (dw holds n elements).
    unsafe {
        launch!(
            dev,
            OP,
            RMS_NORM,
            name,
            CudaDevice::grid(n),
            [r32, n32, xp, gp, rp, dwp]
        )
    }?;
    Ok((dx, Some(dw)))
}
