//! The router unit's launchers (`kernels/src/moe_route.cu`): one thread per token row. Operands
//! are made contiguous first; nothing is read back to the host, so these never synchronise the
//! stream.

use cudarc::driver::LaunchConfig;
use kernels::MOE_ROUTE;

use super::primitives::{check_k, RouteTopk, RouteTopkBackward};
use crate::backend::checks::{dims2, shape_mismatch};
use crate::backend::cuda::launch::launch;
use crate::backend::cuda::layout::to_u32;
use crate::backend::cuda::{check3, float_only, CudaStorage};
use crate::{DType, Result};

const THREADS: u32 = 256;

/// One thread per item, `THREADS` per block.
fn per_item(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(THREADS as usize).max(1) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(super) fn route_topk(
    o: RouteTopk<'_, CudaStorage>,
    k: usize,
) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
    const OP: &str = "moe_route_topk";
    let (x, l) = (o.logits.s, o.logits.l);
    float_only(OP, x.dtype)?;
    let (n, e) = dims2(OP, l)?;
    check_k(OP, k, e, l)?;
    let probs = CudaStorage::alloc(&x.dev, OP, n * e, x.dtype)?;
    let ids = CudaStorage::alloc(&x.dev, OP, n * k, DType::U32)?;
    let w = CudaStorage::alloc(&x.dev, OP, n * k, x.dtype)?;
    if n == 0 {
        return Ok((probs, ids, w));
    }
    let xc = x.contiguous(OP, l)?;
    to_u32(OP, n * e)?;
    let (n32, e32, k32) = (to_u32(OP, n)?, to_u32(OP, e)?, to_u32(OP, k)?);
    let (xp, pp, ip, wp) = (xc.ptr, probs.ptr(), ids.ptr(), w.ptr());
    let name = format!("{OP}_{}", x.dtype);
    // SAFETY: logits are a contiguous [n, e] of x's dtype; probs [n, e], ids [n, k] u32 and
    // weights [n, k] were allocated above; one thread per row, guarded by `t < n`.
    unsafe {
        launch!(
            &x.dev,
            OP,
            MOE_ROUTE,
            name,
            per_item(n),
            [n32, e32, k32, xp, pp, ip, wp]
        )
    }?;
    Ok((probs, ids, w))
}

pub(super) fn route_topk_backward(
    o: RouteTopkBackward<'_, CudaStorage>,
    e: usize,
) -> Result<CudaStorage> {
    const OP: &str = "moe_route_topk_backward";
    let (w, wl, ids, il, gw, gl) = (o.w.s, o.w.l, o.ids.s, o.ids.l, o.gw.s, o.gw.l);
    check3(OP, w, (ids, DType::U32), (gw, w.dtype))?;
    let (n, k) = dims2(OP, wl)?;
    if il.dims() != [n, k] || gl.dims() != [n, k] {
        return Err(shape_mismatch(OP, wl, gl));
    }
    let out = CudaStorage::alloc(&w.dev, OP, n * e, w.dtype)?;
    if n * e == 0 {
        return Ok(out);
    }
    let (wc, ic, gc) = (
        w.contiguous(OP, wl)?,
        ids.contiguous(OP, il)?,
        gw.contiguous(OP, gl)?,
    );
    let (n32, e32, k32) = (to_u32(OP, n)?, to_u32(OP, e)?, to_u32(OP, k)?);
    to_u32(OP, n * e)?;
    let (wp, ip, gp, op) = (wc.ptr, ic.ptr, gc.ptr, out.ptr());
    let name = format!("{OP}_{}", w.dtype);
    // SAFETY: weights, ids and gw are contiguous [n, k]; the output [n, e] is written whole by
    // its row's thread (ids ≥ e are skipped); one thread per row.
    unsafe {
        launch!(
            &w.dev,
            OP,
            MOE_ROUTE,
            name,
            per_item(n),
            [n32, e32, k32, wp, ip, gp, op]
        )
    }?;
    Ok(out)
}
