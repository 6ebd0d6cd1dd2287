//! The LoRA primitives' rank-r products on the tensor cores (kernels/src/lora_mma.cu), for the
//! custom-kernel case of `cuda_rank` whose base rows are 16-byte runs: `n`, the row stride and
//! the offset multiples of 8 bf16. The kernels split the f32 adapter operands (A, Bᵀ, dz) into
//! bf16 high and low parts as they read them, and each product takes both, so the results agree
//! with the CUDA-core kernels to f32 rounding. The codes and grad_a kernels write partial sums
//! over runs of columns or rows that `cuda_rank` adds in a fixed order, as before.

use cudarc::driver::LaunchConfig;
use kernels::LORA;

use super::cuda_rank::{dropout_args, runs_of_32, view_args, Small};
use crate::backend::cuda::launch::launch;
use crate::backend::cuda::layout::to_u32;
use crate::backend::cuda::{CudaDevice, CudaStorage};
use crate::{DType, Layout, Result};

/// Warps per block, and the columns (32 a warp) or rows (32 a warp, codes) a block covers.
const WARPS: usize = 4;
const BLOCK_COLS: usize = 32 * WARPS;
const BLOCK_ROWS: usize = 32 * WARPS;
/// Blocks a launch aims for (four per SM of an H200): enough warps in flight to cover the
/// memory latency, few enough partial sums.
const TARGET_BLOCKS: usize = 4 * 132;
/// The expand kernel's rows per block are a multiple of this (its unrolled m16 tiles).
const EXPAND_ROW_STEP: usize = 64;

/// Whether a bf16 base view that `cuda_rank::applies` to (rank 2, unit column stride) also
/// suits the tensor-core kernels: not empty, `n`, the row stride and the offset multiples of 8.
pub(super) fn applies(l: &Layout) -> bool {
    let (dims, strides) = (l.dims(), l.strides());
    dims[0] > 0
        && dims[1] > 0
        && dims[1] % 8 == 0
        && (strides[0] % 8 == 0 || dims[0] == 1)
        && l.offset() % 8 == 0
}

fn config(grid: (usize, usize)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0.max(1) as u32, grid.1.max(1) as u32, 1),
        block_dim: ((WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Partial sums `[splits, m, r]` of `drop(x) Aᵀ` over runs of columns (x `[m, n]` bf16 that
/// [`applies`], `a` `[r, n]` f32), with their count.
pub(super) fn codes_partials(
    op: &'static str,
    x: &CudaStorage,
    l: &Layout,
    a: Small,
    r: usize,
    p: f64,
    seed: u64,
) -> Result<(CudaStorage, usize)> {
    let (m, n) = (l.dims()[0], l.dims()[1]);
    let row_blocks = m.div_ceil(BLOCK_ROWS).max(1);
    let (splits, per_split) = runs_of_32(n, TARGET_BLOCKS.div_ceil(row_blocks));
    let part = CudaStorage::alloc(&x.dev, op, splits * m * r, DType::F32)?; // [splits, m, r]
    let (m32, n32, ld32, px) = view_args(op, x, l)?;
    let (pa, at, pp, cps) = (
        a.ptr,
        i32::from(a.transposed),
        part.ptr(),
        to_u32(op, per_split)?,
    );
    let (thr, keep, drop) = dropout_args(p);
    let name = format!("lora_codes_mma_bf16_r{r}");
    let key = x.dev.dropout_key_ptr();
    // SAFETY: x's view `[m, n]` (row stride ld32) lies inside its buffer and starts 16-byte
    // aligned, with n and ld multiples of 8 (`applies`, `cuda_rank::applies` and the caller's
    // extent check), so the kernel's 16-byte loads x[row·ld + c .. + 8] for row < m, c < n stay
    // in the view; `a` `[r, n]` (or its transpose `[n, r]`, `at`) is an f32 run inside its
    // buffer starting 16-byte aligned (`Small`), read at [code][c .. + 8] for c < n (16-byte
    // loads: n a multiple of 8) or element by element; `part` holds splits·m·r f32, block column
    // s writing [s, row < m, ..r] (8-byte stores).
    // `key` is the device's 8-byte dropout key, owned by the device for its lifetime; read only.
    unsafe {
        launch!(
            &x.dev,
            op,
            LORA,
            name,
            config((splits, row_blocks)),
            [m32, n32, px, ld32, pa, at, pp, cps, seed, key, thr, keep, drop]
        )
    }?;
    Ok((part, splits))
}

/// Partial sums `[splits, r, n]` of `dzᵀ drop(x)` over runs of rows (x `[m, n]` bf16 that
/// [`applies`], `dz` `[m, r]` f32 row-major), with their count.
pub(super) fn grad_a_partials(
    op: &'static str,
    x: &CudaStorage,
    l: &Layout,
    dz: Small,
    r: usize,
    p: f64,
    seed: u64,
) -> Result<(CudaStorage, usize)> {
    let (m, n) = (l.dims()[0], l.dims()[1]);
    let col_blocks = n.div_ceil(BLOCK_COLS).max(1);
    let (splits, per_split) = runs_of_32(m, TARGET_BLOCKS.div_ceil(col_blocks));
    let part = CudaStorage::alloc(&x.dev, op, splits * r * n, DType::F32)?; // [splits, r, n]
    let (m32, n32, ld32, px) = view_args(op, x, l)?;
    let (pd, pp, rps) = (dz.ptr, part.ptr(), to_u32(op, per_split)?);
    let (thr, keep, drop) = dropout_args(p);
    let name = format!("lora_grad_a_mma_bf16_r{r}");
    let key = x.dev.dropout_key_ptr();
    // SAFETY: x as in `codes_partials`; `dz` `[m, r]` is a row-major f32 run inside its buffer
    // starting 16-byte aligned (`Small`; the caller passes no transposed one), read by 16-byte
    // loads at [row < m][..r]; `part` holds splits·r·n f32, block row s writing [s, ..r, c .. + 8]
    // for c < n (16-byte stores; n a multiple of 8); the block's 18 KiB of shared memory are
    // static.
    // `key` is the device's 8-byte dropout key, owned by the device for its lifetime; read only.
    unsafe {
        launch!(
            &x.dev,
            op,
            LORA,
            name,
            config((col_blocks, splits)),
            [m32, n32, px, ld32, pd, pp, rps, seed, key, thr, keep, drop]
        )
    }?;
    Ok((part, splits))
}

/// `y + f ⊙ (z Bᵀ)` `[m, n]` bf16 (m, n > 0; n a multiple of 8), rounded once, with `y` (a bf16
/// view that [`applies`]) optional and `f` the dropout multipliers of `p` (1 when `p = 0`); `z`
/// `[m, r]` f32 row-major, `bt` Bᵀ `[r, n]` f32. Expand-add is `y + zs Bᵀ`; grad_x is `mask ⊙
/// (dz A)` (no `y`, `bt` = A), and with `y` the base gradient added to it.
#[allow(clippy::too_many_arguments)]
pub(super) fn expand(
    dev: &CudaDevice,
    op: &'static str,
    z: Small,
    bt: Small,
    y: Option<(&CudaStorage, &Layout)>,
    (m, r, n): (usize, usize, usize),
    p: f64,
    seed: u64,
) -> Result<CudaStorage> {
    let out = CudaStorage::alloc(dev, op, m * n, DType::BF16)?; // [m, n]
    let (py, ldy) = match y {
        Some((ys, yl)) => {
            let (_, _, ld, ptr) = view_args(op, ys, yl)?;
            (ptr, ld)
        }
        None => (0u64, 0u32),
    };
    // Rows per block: a multiple of EXPAND_ROW_STEP, about TARGET_BLOCKS blocks in all.
    let col_blocks = n.div_ceil(BLOCK_COLS);
    let row_blocks = TARGET_BLOCKS
        .div_ceil(col_blocks)
        .clamp(1, m.div_ceil(EXPAND_ROW_STEP));
    let rows = m.div_ceil(row_blocks).next_multiple_of(EXPAND_ROW_STEP);
    let (m32, n32, rows32) = (to_u32(op, m)?, to_u32(op, n)?, to_u32(op, rows)?);
    let (pz, pb, bt_t, po) = (z.ptr, bt.ptr, i32::from(bt.transposed), out.ptr());
    let (thr, keep, drop) = dropout_args(p);
    let name = format!("lora_expand_mma_bf16_r{r}");
    let grid = (col_blocks, m.div_ceil(rows));
    let key = dev.dropout_key_ptr();
    // SAFETY: `z` `[m, r]` is a row-major f32 run inside its buffer starting 16-byte aligned
    // (`Small`), read by 8-byte loads at [row < m, ..r]; `bt` `[r, n]` (or its transpose
    // `[n, r]`, bt_t) is an f32 run inside its buffer starting 16-byte aligned, read at
    // [..r][col < n] (by 8-byte loads of pairs of r when transposed); y (when given) is a view `[m, n]` that
    // [`applies`] (16-byte aligned rows, n a multiple of 8) read at [row < m][c .. + 8] for c < n;
    // `out` holds m·n bf16, written 8 at a time at [row < m, c .. + 8].
    // `key` is the device's 8-byte dropout key, owned by the device for its lifetime; read only.
    unsafe {
        launch!(
            dev,
            op,
            LORA,
            name,
            config(grid),
            [m32, n32, pz, pb, bt_t, py, ldy, po, rows32, seed, key, thr, keep, drop]
        )
    }?;
    Ok(out)
}
