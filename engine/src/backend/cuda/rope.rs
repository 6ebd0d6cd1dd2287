//! The rotary position embedding launcher: `x` is read through its rank-4 strides; `cos` and
//! `sin` are copied first when they are not contiguous.

use kernels::ROPE;

use super::launch::launch;
use super::layout::{to_u32s, StridedArg};
use super::{check_extent, check_float3, CudaDevice, CudaStorage};
use crate::{Layout, Result};

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
    let [b, n1, n2, d, bc, _] = crate::backend::checks::rope_dims(l, cl, sl, seq_dim)?;
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
            ROPE,
            name,
            CudaDevice::grid(total / 2 / width),
            [b32, n1_32, n2_32, d32, bc32, sd32, xs, xp, cp, sp, y]
        )
    }?;
    Ok(out)
}

/// The pairs per thread of the rope kernel (`rope_vec_ok` in rope.cu): the widest V of
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
