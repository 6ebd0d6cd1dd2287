//! `drop(x) Aᵀ` and `dzᵀ drop(x)` for a bf16 `x` against a wide bf16 operand (MixLoRA's stacked
//! expert LoRA-A, `[E·r, H]`, and its codes' gradient `[T, E·r]`) on the tensor-core kernels of
//! kernels/src/lora_wide.cu: x is read once, its dropout mask drawn on the fly, and the product
//! summed in f32, where the composition wrote the dropped copy of x and ran cuBLAS on a shape
//! with one side of 128 (32 blocks for 132 SMs, a quarter of the memory rate). Partial sums over
//! runs of the long dimension are added in a fixed order (`lora_rank::sum_partials`). Other
//! operands take the composition (`None`).

use cudarc::driver::LaunchConfig;
use kernels::LORA;

use super::launch::launch;
use super::layout::to_u32;
use super::lora_rank::{dropout_args, runs_of_32, sum_partials};
use super::CudaStorage;
use crate::{DType, Error, Layout, Result};

/// Blocks a launch aims for: three per SM of an H200, as many as its registers hold (64
/// accumulators a thread); with two, too few bytes of x were in flight (37 µs for 32 MB).
const TARGET_BLOCKS: usize = 3 * 132;

/// A bf16 matrix with unit column stride whose rows are 16-byte runs: rows, columns, the row
/// stride and the address of its first element.
struct Rows {
    rows: usize,
    cols: usize,
    ld: u32,
    ptr: u64,
}

/// `l` (logical `[1, r, c]`) of `s` as [`Rows`]: bf16, not empty, unit column stride, `c`, the
/// row stride and the offset multiples of 8, sizes within u32; `None` otherwise.
fn rows_of(s: &CudaStorage, l: &Layout) -> Option<Rows> {
    let (d, st) = (l.dims(), l.strides());
    let ok = s.dtype == DType::BF16
        && d.len() == 3
        && d[0] == 1
        && d[1] > 0
        && d[2] > 0
        && (st[2] == 1 || d[2] == 1)
        && d[2] % 8 == 0
        && (st[1] % 8 == 0 || d[1] == 1)
        && l.offset() % 8 == 0
        && l.max_extent() <= s.len
        && u32::try_from(l.max_extent()).is_ok()
        && u32::try_from(d[1] * d[2]).is_ok();
    ok.then(|| Rows {
        rows: d[1],
        cols: d[2],
        ld: if d[1] == 1 { d[2] as u32 } else { st[1] as u32 },
        ptr: s.ptr_at(l.offset()),
    })
}

fn config(grid: (usize, usize, usize)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `(splits, per_split)` of `len` (not empty): at most TARGET_BLOCKS blocks (one wave) with
/// `others` blocks a split, at least one split.
fn splits(len: usize, others: usize) -> (usize, usize) {
    runs_of_32(len, TARGET_BLOCKS / others)
}

/// Errors unless `p` is a dropout probability and both operands live on one GPU.
fn check(op: &'static str, a: &CudaStorage, b: &CudaStorage, p: f64) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid(
            op,
            format!("probability {p} is not in [0, 1)"),
        ));
    }
    a.same_device(op, b)
}

/// `drop(x) · Aᵀ` `[m, n]` f32 for `x` `[1, m, k]` and `rhs` = Aᵀ `[1, k, n]` (A `[n, k]` with
/// 16-byte rows), both bf16; `None` when the operands do not suit the kernel.
pub(super) fn dropout_matmul(
    x: &CudaStorage,
    l: &Layout,
    rhs: &CudaStorage,
    rl: &Layout,
    p: f64,
    seed: u64,
) -> Result<Option<CudaStorage>> {
    const OP: &str = "dropout_matmul";
    check(OP, x, rhs, p)?;
    let (Some(xr), Some(ar)) = (rows_of(x, l), rows_of(rhs, &rl.transpose(1, 2))) else {
        return Ok(None);
    };
    let (m, k, n) = (xr.rows, xr.cols, ar.rows);
    if ar.cols != k || n % 8 != 0 || u32::try_from(m * n).is_err() {
        return Ok(None);
    }
    let blocks = m.div_ceil(64) * n.div_ceil(128);
    let (parts, per) = splits(k, blocks);
    let part = CudaStorage::alloc(&x.dev, OP, parts * m * n, DType::F32)?; // [parts, m, n]
    let (m32, n32, k32, cps) = (
        to_u32(OP, m)?,
        to_u32(OP, n)?,
        to_u32(OP, k)?,
        to_u32(OP, per)?,
    );
    let (px, ldx, pa, lda, pp) = (xr.ptr, xr.ld, ar.ptr, ar.ld, part.ptr());
    let (thr, keep, drop) = dropout_args(p);
    // SAFETY: x `[m, k]` and A `[n, k]` are bf16 views inside their buffers (`rows_of`: extent
    // checked) whose rows start 16-byte aligned with k a multiple of 8, read by 16-byte loads at
    // [row < m or n][c .. + 8] for c < k; `part` holds parts·m·n f32, block (s, y, z) writing
    // [s, row < m, col < n] (8-byte stores, n a multiple of 8); 8 KiB of static shared memory.
    unsafe {
        launch!(
            &x.dev,
            OP,
            LORA,
            "lora_codes_wide_bf16",
            config((parts, m.div_ceil(64), n.div_ceil(128))),
            [m32, n32, k32, px, ldx, pa, lda, pp, cps, seed, thr, keep, drop]
        )
    }?;
    sum_partials(&x.dev, OP, (&part, parts), (m, n), false, 1.0).map(Some)
}

/// `dzᵀ · drop(x)` `[n, k]` f32 for `lhs` = dzᵀ `[1, n, m]` (dz `[m, n]` with 16-byte rows) and
/// `x` `[1, m, k]`, both bf16; `None` when the operands do not suit the kernel.
pub(super) fn matmul_dropout(
    lhs: &CudaStorage,
    l: &Layout,
    x: &CudaStorage,
    xl: &Layout,
    p: f64,
    seed: u64,
) -> Result<Option<CudaStorage>> {
    const OP: &str = "matmul_dropout";
    check(OP, lhs, x, p)?;
    let (Some(dr), Some(xr)) = (rows_of(lhs, &l.transpose(1, 2)), rows_of(x, xl)) else {
        return Ok(None);
    };
    let (m, n, k) = (dr.rows, dr.cols, xr.cols);
    if xr.rows != m || u32::try_from(n * k).is_err() {
        return Ok(None);
    }
    let blocks = k.div_ceil(64) * n.div_ceil(128);
    let (parts, per) = splits(m, blocks);
    let part = CudaStorage::alloc(&x.dev, OP, parts * n * k, DType::F32)?; // [parts, n, k]
    let (m32, n32, k32, rps) = (
        to_u32(OP, m)?,
        to_u32(OP, n)?,
        to_u32(OP, k)?,
        to_u32(OP, per)?,
    );
    let (pd, ldz, px, ldx, pp) = (dr.ptr, dr.ld, xr.ptr, xr.ld, part.ptr());
    let (thr, keep, drop) = dropout_args(p);
    // SAFETY: dz `[m, n]` and x `[m, k]` are bf16 views inside their buffers (`rows_of`) whose
    // rows start 16-byte aligned with n and k multiples of 8, read by 16-byte loads at
    // [row < m][c .. + 8] for c < n or k; `part` holds parts·n·k f32, block (x, s, z) writing
    // [s, code < n, col < k] (8-byte stores); 26 KiB of static shared memory.
    unsafe {
        launch!(
            &x.dev,
            OP,
            LORA,
            "lora_grad_a_wide_bf16",
            config((k.div_ceil(64), parts, n.div_ceil(128))),
            [m32, n32, k32, pd, ldz, px, ldx, pp, rps, seed, thr, keep, drop]
        )
    }?;
    sum_partials(&x.dev, OP, (&part, parts), (n, k), false, 1.0).map(Some)
}
