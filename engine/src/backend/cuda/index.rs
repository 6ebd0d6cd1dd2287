//! index_select, index_add, gather, scatter_add and top-k launchers. Operands are made
//! contiguous and seen as `[outer, size, inner]` around the indexed dim. bf16 accumulations run
//! in f32 (widened copies, one rounding at the end), like the CPU.

use crate::backend::checks::{check_dim, check_same_but, split};
use kernels::INDEX;

use super::elementwise::{gather_view, to_dtype};
use super::launch::launch;
use super::layout::{to_u32, to_u32s};
use super::{check_extent, float_only, CudaDevice, CudaStorage};
use crate::{DType, Error, Layout, Result};

fn check_ids(op: &'static str, s: &CudaStorage, ids: &CudaStorage, il: &Layout) -> Result<()> {
    if ids.dtype != DType::U32 {
        return Err(Error::UnsupportedDType {
            op,
            dtype: ids.dtype,
        });
    }
    s.same_device(op, ids)?;
    check_extent(op, il, ids.len)
}

fn rank1(op: &'static str, il: &Layout) -> Result<()> {
    if il.dims().len() != 1 {
        return Err(Error::RankMismatch {
            op,
            expected: 1,
            shape: il.shape().clone(),
        });
    }
    Ok(())
}

pub(crate) fn index_select(
    s: &CudaStorage,
    l: &Layout,
    ids: &CudaStorage,
    il: &Layout,
    dim: usize,
) -> Result<CudaStorage> {
    const OP: &str = "index_select";
    check_dim(OP, l, dim)?;
    rank1(OP, il)?;
    check_ids(OP, s, ids, il)?;
    let (outer, size, inner) = split(l.dims(), dim);
    let n_ids = il.elem_count();
    let n_out = outer * n_ids * inner;
    let out = CudaStorage::alloc(&s.dev, OP, n_out, s.dtype)?;
    if n_out == 0 {
        return Ok(out);
    }
    let (src, idc) = (s.contiguous(OP, l)?, ids.contiguous(OP, il)?);
    let [n32, size32, inner32, nid32] = to_u32s(OP, [n_out, size, inner, n_ids])?;
    let (sp, ip, y) = (src.ptr, idc.ptr, out.ptr());
    let name = format!("{OP}_{}", s.dtype);
    // SAFETY: src is a contiguous [outer, size, inner] run, ids a contiguous [n_ids] u32, the
    // output holds outer·n_ids·inner elements; ids ≥ size are never read through.
    unsafe {
        launch!(
            &s.dev,
            OP,
            INDEX,
            name,
            CudaDevice::grid(n_out),
            [n32, size32, inner32, nid32, sp, ip, y]
        )
    }?;
    Ok(out)
}

pub(crate) fn gather(
    s: &CudaStorage,
    l: &Layout,
    ids: &CudaStorage,
    il: &Layout,
    dim: usize,
) -> Result<CudaStorage> {
    const OP: &str = "gather";
    check_dim(OP, l, dim)?;
    check_same_but(OP, l.shape(), il.shape(), dim)?;
    check_ids(OP, s, ids, il)?;
    let (_, size, inner) = split(l.dims(), dim);
    let m = il.dims()[dim];
    let n_out = il.elem_count();
    let out = CudaStorage::alloc(&s.dev, OP, n_out, s.dtype)?;
    if n_out == 0 {
        return Ok(out);
    }
    let (src, idc) = (s.contiguous(OP, l)?, ids.contiguous(OP, il)?);
    let [n32, size32, m32, inner32] = to_u32s(OP, [n_out, size, m, inner])?;
    let (sp, ip, y) = (src.ptr, idc.ptr, out.ptr());
    let name = format!("{OP}_{}", s.dtype);
    // SAFETY: src is a contiguous [outer, size, inner] run, ids and the output contiguous
    // [outer, m, inner]; ids ≥ size are never read through.
    unsafe {
        launch!(
            &s.dev,
            OP,
            INDEX,
            name,
            CudaDevice::grid(n_out),
            [n32, size32, m32, inner32, sp, ip, y]
        )
    }?;
    Ok(out)
}

/// Runs an accumulating kernel (`index_add` or `scatter_add`): `out = a; out[..] += src[..]`, in
/// f32 for bf16. `three` are the kernel's size arguments after `n_src`, in its order.
#[allow(clippy::too_many_arguments)]
fn accumulate(
    op: &'static str,
    s: &CudaStorage,
    l: &Layout,
    ids: &CudaStorage,
    il: &Layout,
    src: &CudaStorage,
    sl: &Layout,
    three: (usize, usize, usize),
) -> Result<CudaStorage> {
    if s.dtype != src.dtype {
        return Err(Error::DTypeMismatch {
            op,
            lhs: s.dtype,
            rhs: src.dtype,
        });
    }
    float_only(op, s.dtype)?;
    s.same_device(op, src)?;
    check_extent(op, l, s.len)?;
    check_extent(op, sl, src.len)?;
    let work = if s.dtype == DType::BF16 {
        DType::F32
    } else {
        s.dtype
    };
    // The base, contiguous, in the working dtype: the kernel adds into it.
    let out = if work == s.dtype {
        gather_view(s, l)?
    } else {
        to_dtype(s, l, work)?
    };
    let n_src = sl.elem_count();
    if n_src > 0 && l.elem_count() > 0 {
        let srcw = if work == src.dtype {
            gather_view(src, sl)?
        } else {
            to_dtype(src, sl, work)?
        };
        let idc = ids.contiguous(op, il)?;
        let (a, b, c) = three;
        let [n32, a32, b32, c32] = to_u32s(op, [n_src, a, b, c])?;
        let (sp, ip, y) = (srcw.ptr(), idc.ptr, out.ptr());
        let name = format!("{op}_{work}");
        // SAFETY: src is a contiguous run of n_src elements and ids its index tensor (contiguous,
        // [n_ids] or src's shape); `out` is the contiguous [outer, size, inner] base; ids ≥ size
        // are skipped, so every atomic add lands inside `out`.
        unsafe {
            launch!(
                &s.dev,
                op,
                INDEX,
                name,
                CudaDevice::grid(n_src),
                [n32, a32, b32, c32, sp, ip, y]
            )
        }?;
    }
    if work == s.dtype {
        Ok(out)
    } else {
        to_dtype(&out, &Layout::contiguous(l.shape().clone()), s.dtype)
    }
}

pub(crate) fn index_add(
    s: &CudaStorage,
    l: &Layout,
    ids: &CudaStorage,
    il: &Layout,
    src: &CudaStorage,
    sl: &Layout,
    dim: usize,
) -> Result<CudaStorage> {
    const OP: &str = "index_add";
    check_dim(OP, l, dim)?;
    rank1(OP, il)?;
    check_ids(OP, s, ids, il)?;
    check_same_but(OP, l.shape(), sl.shape(), dim)?;
    if sl.dims()[dim] != il.elem_count() {
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs: il.shape().clone(),
            rhs: sl.shape().clone(),
        });
    }
    let (_, size, inner) = split(l.dims(), dim);
    // Kernel sizes after n_src: (size, inner, n_ids).
    accumulate(OP, s, l, ids, il, src, sl, (size, inner, il.elem_count()))
}

pub(crate) fn scatter_add(
    s: &CudaStorage,
    l: &Layout,
    ids: &CudaStorage,
    il: &Layout,
    src: &CudaStorage,
    sl: &Layout,
    dim: usize,
) -> Result<CudaStorage> {
    const OP: &str = "scatter_add";
    check_dim(OP, l, dim)?;
    check_same_but(OP, l.shape(), sl.shape(), dim)?;
    if il.shape() != sl.shape() {
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs: il.shape().clone(),
            rhs: sl.shape().clone(),
        });
    }
    check_ids(OP, s, ids, il)?;
    let (_, size, inner) = split(l.dims(), dim);
    // Kernel sizes after n_src: (size, m, inner).
    accumulate(OP, s, l, ids, il, src, sl, (size, sl.dims()[dim], inner))
}

/// Warps (rows) per block of the top-k kernel.
const TOPK_WARPS: usize = 8;

pub(crate) fn topk_indices(s: &CudaStorage, l: &Layout, k: usize) -> Result<CudaStorage> {
    const OP: &str = "topk";
    let Some(&n) = l.dims().last() else {
        return Err(Error::RankMismatch {
            op: OP,
            expected: 1,
            shape: l.shape().clone(),
        });
    };
    if k > n {
        return Err(Error::invalid(
            OP,
            format!("k = {k} exceeds the last dim of shape {}", l.shape()),
        ));
    }
    let rows = l.elem_count() / n.max(1);
    let out = CudaStorage::alloc(&s.dev, OP, rows * k, DType::U32)?;
    if rows * k == 0 {
        return Ok(out);
    }
    let x = s.contiguous(OP, l)?; // [rows, n]
    let (r32, n32, k32, xp, y) = (
        to_u32(OP, rows)?,
        to_u32(OP, n)?,
        to_u32(OP, k)?,
        x.ptr,
        out.ptr(),
    );
    let name = format!("{OP}_{}", s.dtype);
    let cfg = CudaDevice::rows(rows.div_ceil(TOPK_WARPS), (TOPK_WARPS * 32) as u32);
    // SAFETY: x is a contiguous [rows, n] run and the output holds rows·k u32s; one warp per row
    // writes its k picks.
    unsafe { launch!(&s.dev, OP, INDEX, name, cfg, [r32, n32, k32, xp, y]) }?;
    Ok(out)
}
