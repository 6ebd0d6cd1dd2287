//! Launchers of the softmax kernels (kernels/src/softmax.cu): softmax and log-softmax over the
//! last dim, the causal, key- or segment-masked, scaled softmax and the fused softmax backward.
//! Rows that fit in one warp's registers as 16-byte chunks, at 16-byte-aligned addresses, run one
//! warp per row; others one block per row.
//! Operands that are not contiguous are copied first.

use cudarc::driver::LaunchConfig;
use kernels::SOFTMAX;

use super::launch::launch;
use super::layout::{to_u32, to_u32s};
use super::{float_only, CudaDevice, CudaStorage};
use crate::backend::checks::{causal_softmax_dims, softmax_backward_dims};
use crate::{DType, Error, Layout, Result};

/// Threads per row of the block-per-row kernels: a warp per 32 elements, at most 256 (wider rows
/// loop).
fn row_threads(n: usize) -> u32 {
    (n.div_ceil(32) * 32).clamp(32, 256) as u32
}

/// Warps (rows) per block of the warp-per-row kernels (`SOFTMAX_WARPS` in attention.cu).
const WARP_ROWS: usize = 8;

/// Chunks of 16 bytes per lane that the warp-per-row kernels come in (`_warp{C}`).
const LANE_CHUNKS: [usize; 4] = [1, 2, 4, 8];

/// Chunks per lane of the warp-per-row kernel for rows of `n` elements of `dtype` whose operands
/// start at the device addresses `ptrs` (0 for an absent one): the least C with n ≤ 32·C·V, where
/// V = 16 / size of `dtype` must divide n, and only when every address is 16-byte aligned (every
/// row and chunk then is too). None: the block-per-row kernel.
fn lane_chunks(dtype: DType, n: usize, ptrs: &[u64]) -> Option<usize> {
    let v = 16 / dtype.size_in_bytes();
    if n % v != 0 || ptrs.iter().any(|&p| p % 16 != 0) {
        return None;
    }
    LANE_CHUNKS.into_iter().find(|&c| n <= 32 * c * v)
}

/// The kernel of `op` for `rows` rows of `n` elements of `dtype` at `ptrs`, and its launch shape:
/// one warp per row when [`lane_chunks`] allows it, else one block per row.
fn kernel(op: &str, dtype: DType, rows: usize, n: usize, ptrs: &[u64]) -> (String, LaunchConfig) {
    match lane_chunks(dtype, n, ptrs) {
        Some(c) => (
            format!("{op}_warp{c}_{dtype}"),
            CudaDevice::rows(rows.div_ceil(WARP_ROWS), (WARP_ROWS * 32) as u32),
        ),
        None => (
            format!("{op}_{dtype}"),
            CudaDevice::rows(rows, row_threads(n)),
        ),
    }
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
    let (name, cfg) = kernel(OP, x.dtype, rows, s, &[xp, mp, y]);
    // SAFETY: x is a contiguous [b, h, t, s] run (rows = b·h·t rows of s) of `x.dtype`, the
    // output holds rows·s elements of it, the mask (when its pointer is not null) a contiguous
    // [b, s] run of u32. One block, or one warp, per row reads its own row and its sequence's
    // mask row (the query's segment word only at q_offset + i < s, inside that row) and writes
    // only its own output row; the warp kernel's 16-byte accesses stay within
    // the row (V divides s) at 16-byte-aligned addresses (checked by `lane_chunks`), and its
    // grid has a warp for every row (ceil(rows / WARP_ROWS) blocks of WARP_ROWS warps).
    unsafe {
        launch!(
            &x.dev,
            OP,
            SOFTMAX,
            name,
            cfg,
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
    let (name, cfg) = kernel(OP, y.dtype, rows, n, &[yp, gp, dp]);
    // SAFETY: y and g are contiguous [rows, n] runs of one dtype and dx holds rows·n elements of
    // it. One block, or one warp, per row reads its rows of y and g and writes its row of dx; the
    // warp kernel's 16-byte accesses stay within the row (V divides n) at 16-byte-aligned
    // addresses (checked by `lane_chunks`), and its grid has a warp for every row.
    unsafe {
        launch!(
            &y.dev,
            OP,
            SOFTMAX,
            name,
            cfg,
            [r32, n32, scale, yp, gp, dp]
        )
    }?;
    Ok(dx)
}

/// Softmax or log-softmax (`log`) over the last dim: one block per row.
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
            SOFTMAX,
            name,
            CudaDevice::rows(rows, 256),
            [r32, n32, xp, y]
        )
    }?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warp_kernel_choice() {
        let aligned = [0x1000, 0, 0x2000];
        // The least C with n ≤ 32·C·V (V = 8 bf16, 4 f32, 2 f64).
        assert_eq!(lane_chunks(DType::BF16, 64, &aligned), Some(1));
        assert_eq!(lane_chunks(DType::BF16, 512, &aligned), Some(2));
        assert_eq!(lane_chunks(DType::BF16, 2048, &aligned), Some(8));
        assert_eq!(lane_chunks(DType::F32, 1000, &aligned), Some(8));
        assert_eq!(lane_chunks(DType::F32, 512, &aligned), Some(4));
        assert_eq!(lane_chunks(DType::F64, 512, &aligned), Some(8));
        // Past the registers, or V does not divide n: one block per row.
        assert_eq!(lane_chunks(DType::BF16, 2056, &aligned), None);
        assert_eq!(lane_chunks(DType::F32, 1028, &aligned), None);
        assert_eq!(lane_chunks(DType::F64, 514, &aligned), None);
        assert_eq!(lane_chunks(DType::BF16, 500, &aligned), None);
        assert_eq!(lane_chunks(DType::F32, 7, &aligned), None);
        // A pointer off a 16-byte boundary.
        assert_eq!(lane_chunks(DType::BF16, 512, &[0x1000, 0x2008]), None);
        assert_eq!(lane_chunks(DType::F64, 512, &[0x1004]), None);
        // 9 rows: two blocks of 8 warps, or nine blocks.
        let (name, cfg) = kernel("softmax_backward", DType::BF16, 9, 512, &aligned);
        assert_eq!(name, "softmax_backward_warp2_bf16");
        assert_eq!((cfg.grid_dim, cfg.block_dim), ((2, 1, 1), (256, 1, 1)));
        let (name, cfg) = kernel("causal_softmax", DType::F32, 9, 7, &aligned);
        assert_eq!(name, "causal_softmax_f32");
        assert_eq!((cfg.grid_dim, cfg.block_dim), ((9, 1, 1), (32, 1, 1)));
    }
}
