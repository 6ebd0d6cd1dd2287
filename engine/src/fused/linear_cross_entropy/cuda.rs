//! Launchers of the chunked linear cross-entropy's kernels (kernels/src/linear_cross_entropy.cu):
//! the online log-sum-exp update of one chunk of logits, and the fused gradient of one chunk.
//! Logits are read in place through their rank-2 strides; one block per row.

use kernels::LINEAR_CROSS_ENTROPY;

use super::primitives::{ChunkBackward, ChunkUpdate};
use crate::backend::cuda::launch::launch;
use crate::backend::cuda::layout::to_u32;
use crate::backend::cuda::{elementwise, float_only, CudaDevice, CudaStorage};
use crate::fused::Operand;
use crate::{Error, Layout, Result};

const ROW_THREADS: u32 = 256;

/// Checks chunk logits `[n, c]` and targets `[n]` u32; returns `(n, c)` and the view's
/// `(s0, s1, off)` as u32.
fn check(
    op: &'static str,
    x: &CudaStorage,
    l: &Layout,
    t: &CudaStorage,
    tl: &Layout,
) -> Result<(usize, usize, [u32; 3])> {
    let (n, c) = crate::backend::cuda::cross_entropy::check(op, x, l, t, tl)?;
    let strides = [
        to_u32(op, l.strides()[0])?,
        to_u32(op, l.strides()[1])?,
        to_u32(op, l.offset())?,
    ];
    Ok((n, c, strides))
}

pub(super) fn chunk_update(
    o: ChunkUpdate<'_, CudaStorage>,
    v0: usize,
    v_total: usize,
    ignore: u32,
) -> Result<()> {
    const OP: &str = "cross_entropy_chunk_update";
    let (Operand { s: x, l }, Operand { s: t, l: tl }) = (o.x, o.targets);
    let state = o.state.s;
    let (n, c, [s0, s1, off]) = check(OP, x, l, t, tl)?;
    x.same_device(OP, state)?;
    let acc = x.dtype.accumulation();
    if state.dtype != acc {
        return Err(Error::DTypeMismatch {
            op: OP,
            lhs: acc,
            rhs: state.dtype,
        });
    }
    if state.len != 3 * n {
        return Err(Error::invalid(
            OP,
            format!("state of {} elements for {n} rows (3 per row)", state.len),
        ));
    }
    if n == 0 || c == 0 {
        return Ok(());
    }
    let tc = t.contiguous(OP, tl)?;
    let (n32, c32) = (to_u32(OP, n)?, to_u32(OP, c)?);
    let (v0, v_total) = (to_u32(OP, v0)?, to_u32(OP, v_total)?);
    let (xp, tp, sp) = (x.ptr(), tc.ptr, state.ptr());
    let name = format!("{OP}_{}", x.dtype);
    // SAFETY: the logits view [n, c] lies inside `x` (checked), targets are a contiguous [n] u32,
    // the state a contiguous [n, 3] of the accumulation type (checked); one block per row, and
    // only thread 0 of row r writes state[3r..3r+3].
    unsafe {
        launch!(
            &x.dev,
            OP,
            LINEAR_CROSS_ENTROPY,
            name,
            CudaDevice::rows(n, ROW_THREADS),
            [n32, c32, s0, s1, off, xp, tp, ignore, v0, v_total, sp]
        )
    }
}

pub(super) fn chunk_backward(
    o: ChunkBackward<'_, CudaStorage>,
    v0: usize,
    ignore: u32,
) -> Result<CudaStorage> {
    const OP: &str = "cross_entropy_chunk_backward";
    let (Operand { s: x, l }, Operand { s: t, l: tl }) = (o.x, o.targets);
    let (Operand { s: lse, l: lse_l }, Operand { s: g, l: gl }) = (o.lse, o.grad_rows);
    let (n, c, [s0, s1, off]) = check(OP, x, l, t, tl)?;
    for (s, sl) in [(lse, lse_l), (g, gl)] {
        if sl.dims() != [n] {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: l.shape().clone(),
                rhs: sl.shape().clone(),
            });
        }
        float_only(OP, s.dtype)?;
        x.same_device(OP, s)?;
    }
    let out = CudaStorage::alloc(&x.dev, OP, n * c, x.dtype)?;
    if n * c == 0 {
        return Ok(out);
    }
    // Row statistics in the accumulation dtype, contiguous [n].
    let acc = x.dtype.accumulation();
    let lc = elementwise::to_dtype(lse, lse_l, acc)?;
    let gc = elementwise::to_dtype(g, gl, acc)?;
    let tc = t.contiguous(OP, tl)?;
    let (n32, c32, v0) = (to_u32(OP, n)?, to_u32(OP, c)?, to_u32(OP, v0)?);
    let (xp, tp, lp, gp, y) = (x.ptr(), tc.ptr, lc.ptr(), gc.ptr(), out.ptr());
    let name = format!("{OP}_{}", x.dtype);
    // SAFETY: as in the update; lse and g are contiguous [n] of the accumulation type and the
    // output a contiguous [n, c] that each row's block fills completely.
    unsafe {
        launch!(
            &x.dev,
            OP,
            LINEAR_CROSS_ENTROPY,
            name,
            CudaDevice::rows(n, ROW_THREADS),
            [n32, c32, s0, s1, off, xp, tp, ignore, v0, lp, gp, y]
        )
    }?;
    Ok(out)
}
