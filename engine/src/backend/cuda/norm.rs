//! RMSNorm (forward, fused backward) and RoPE launchers. Operands that are not contiguous are
//! copied first, except `x` of rope, which is read through its rank-4 strides.

use kernels::NORM;

use super::launch::launch;
use super::layout::{to_u32, to_u32s, StridedArg};
use super::{check_extent, float_only, CudaDevice, CudaStorage};
use crate::{Error, Layout, Result};

/// Threads per row of the row kernels.
const ROW_THREADS: u32 = 256;

fn check_float3(op: &'static str, a: &CudaStorage, b: &CudaStorage, c: &CudaStorage) -> Result<()> {
    for o in [b, c] {
        if o.dtype != a.dtype {
            return Err(Error::DTypeMismatch {
                op,
                lhs: a.dtype,
                rhs: o.dtype,
            });
        }
        a.same_device(op, o)?;
    }
    float_only(op, a.dtype)?;
    Ok(())
}

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
            NORM,
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
            NORM,
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
            NORM,
            name,
            CudaDevice::grid(n),
            [r32, n32, xp, gp, rp, dwp]
        )
    }?;
    Ok((dx, Some(dw)))
}

pub(crate) fn rope(
    x: &CudaStorage,
    l: &Layout,
    cos: &CudaStorage,
    cl: &Layout,
    sin: &CudaStorage,
    sl: &Layout,
    seq_dim: usize,
) -> Result<CudaStorage> {
    const OP: &str = "rope";
    check_float3(OP, x, cos, sin)?;
    let [b, n1, n2, d, bc, _] = crate::backend::rope_dims(l, cl, sl, seq_dim)?;
    check_extent(OP, l, x.len)?;
    let total = l.elem_count();
    let out = CudaStorage::alloc(&x.dev, OP, total, x.dtype)?;
    if total == 0 {
        return Ok(out);
    }
    let xs = StridedArg::rank4(OP, l)?;
    let (cc, sc) = (cos.contiguous(OP, cl)?, sin.contiguous(OP, sl)?);
    let [b32, n1_32, n2_32, d32, bc32, sd32] = to_u32s(OP, [b, n1, n2, d, bc, seq_dim])?;
    let (xp, cp, sp, y) = (x.ptr(), cc.ptr, sc.ptr, out.ptr());
    let width = rope_width(&xs, d, x.dtype.size_in_bytes(), [xp, cp, sp, y]);
    let name = format!("{OP}_{}", x.dtype);
    // SAFETY: x is read through its rank-4 strides (checked inside its buffer); cos and sin are
    // contiguous [bc, t, d/2] with t = x's dim seq_dim (1 or 2; `rope_dims`); the output holds
    // b·n1·n2·d elements. Each thread takes one pair
    // (row, i < d/2), or V consecutive pairs of one row through V-wide accesses that touch the
    // same elements, where the kernel has checked that x's last stride is 1 and that V divides
    // d/2, x's offset and strides and the four base addresses (in bytes, V·elem size).
    unsafe {
        launch!(
            &x.dev,
            OP,
            NORM,
            name,
            CudaDevice::grid(total / 2 / width),
            [b32, n1_32, n2_32, d32, bc32, sd32, xs, xp, cp, sp, y]
        )
    }?;
    Ok(out)
}

/// The pairs per thread of the rope kernel (`rope_vec_ok` in norm.cu): the widest V of
/// 16 / `es`, halved down to 2, for which x's last stride is 1, `d / 2`, x's offset and its other
/// strides (of dims longer than 1) are multiples of V and the four buffers start on a V·`es`
/// byte boundary; else 1. Only sizes the grid: the kernel makes the choice itself and its
/// grid-stride loops cover any grid.
fn rope_width(xs: &StridedArg, d: usize, es: usize, ptrs: [u64; 4]) -> usize {
    let mut v = 16 / es;
    while v >= 2 {
        let vu = v as u32;
        let ok = xs.strides[3] == 1
            && (d / 2) % v == 0
            && xs.offset % vu == 0
            && (0..3).all(|k| xs.dims[k] == 1 || xs.strides[k] % vu == 0)
            && ptrs.iter().all(|&p| p % (v * es) as u64 == 0);
        if ok {
            return v;
        }
        v /= 2;
    }
    1
}
