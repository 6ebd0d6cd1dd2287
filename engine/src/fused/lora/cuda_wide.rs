//! `drop(x) Aᵀ` and `dzᵀ drop(x)` for a bf16 `x` against a wide bf16 operand (MixLoRA's stacked
//! expert LoRA-A, `[E·r, H]`, and its codes' gradient `[T, E·r]`) on the tensor-core kernels of
//! kernels/src/lora_wide.cu: x is read once, its dropout mask drawn on the fly, and the product
//! summed in f32, where the composition wrote the dropped copy of x and ran cuBLAS on a shape
//! with one side of 128 (32 blocks for 132 SMs, a quarter of the memory rate). Partial sums over
//! runs of the long dimension are added in a fixed order (`cuda_rank::sum_partials`). Other
//! operands take the composition (`None`).

use cudarc::driver::LaunchConfig;
use kernels::{DROPOUT, LORA};

use super::cuda_rank::{dropout_args, runs_of_32, sum_partials};
use super::primitives::{AddDropped2, DropSide, Product};
use crate::backend::cuda::launch::launch;
use crate::backend::cuda::layout::to_u32;
use crate::backend::cuda::{CudaDevice, CudaStorage};
use crate::{rng, DType, Error, Layout, Result};

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

/// `drop(lhs) · rhs` or `lhs · drop(rhs)` on the kernels below; `None` when the operands do not
/// suit them.
pub(super) fn dropped_product(
    o: &Product<'_, CudaStorage>,
    p: f64,
    seed: u64,
    side: DropSide,
) -> Result<Option<CudaStorage>> {
    let (lhs, l, rhs, rl) = (o.lhs.s, o.lhs.l, o.rhs.s, o.rhs.l);
    match side {
        DropSide::Lhs => dropout_matmul(lhs, l, rhs, rl, p, seed),
        DropSide::Rhs => matmul_dropout(lhs, l, rhs, rl, p, seed),
    }
}

/// `drop(x) · Aᵀ` `[m, n]` f32 for `x` `[1, m, k]` and `rhs` = Aᵀ `[1, k, n]` (A `[n, k]` with
/// 16-byte rows), both bf16; `None` when the operands do not suit the kernel.
fn dropout_matmul(
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
    let key = x.dev.dropout_key_ptr();
    // SAFETY: x `[m, k]` and A `[n, k]` are bf16 views inside their buffers (`rows_of`: extent
    // checked) whose rows start 16-byte aligned with k a multiple of 8, read by 16-byte loads at
    // [row < m or n][c .. + 8] for c < k; `part` holds parts·m·n f32, block (s, y, z) writing
    // [s, row < m, col < n] (8-byte stores, n a multiple of 8); 8 KiB of static shared memory.
    // `key` is the device's 8-byte dropout key, owned by the device for its lifetime; read only.
    unsafe {
        launch!(
            &x.dev,
            OP,
            LORA,
            "lora_codes_wide_bf16",
            config((parts, m.div_ceil(64), n.div_ceil(128))),
            [m32, n32, k32, px, ldx, pa, lda, pp, cps, seed, key, thr, keep, drop]
        )
    }?;
    sum_partials(&x.dev, OP, (&part, parts), (m, n), false, 1.0).map(Some)
}

/// `dzᵀ · drop(x)` `[n, k]` f32 for `lhs` = dzᵀ `[1, n, m]` (dz `[m, n]` with 16-byte rows) and
/// `x` `[1, m, k]`, both bf16; `None` when the operands do not suit the kernel.
fn matmul_dropout(
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
    let key = x.dev.dropout_key_ptr();
    // SAFETY: dz `[m, n]` and x `[m, k]` are bf16 views inside their buffers (`rows_of`) whose
    // rows start 16-byte aligned with n and k multiples of 8, read by 16-byte loads at
    // [row < m][c .. + 8] for c < n or k; `part` holds parts·n·k f32, block (x, s, z) writing
    // [s, code < n, col < k] (8-byte stores); 26 KiB of static shared memory.
    // `key` is the device's 8-byte dropout key, owned by the device for its lifetime; read only.
    unsafe {
        launch!(
            &x.dev,
            OP,
            LORA,
            "lora_grad_a_wide_bf16",
            config((k.div_ceil(64), parts, n.div_ceil(128))),
            [m32, n32, k32, pd, ldz, px, ldx, pp, rps, seed, key, thr, keep, drop]
        )
    }?;
    sum_partials(&x.dev, OP, (&part, parts), (n, k), false, 1.0).map(Some)
}

/// `base + a.dropout(p, seed_a) + b.dropout(p, seed_b)` of three contiguous bf16 tensors of one
/// shape, bit for bit as the separate ops, in one pass (`add_dropped2_bf16` of the dropout
/// kernels); `None` for other
/// operands (the caller then runs the separate ops).
pub(super) fn add_dropped2(
    o: &AddDropped2<'_, CudaStorage>,
    p: f64,
    (seed_a, seed_b): (u64, u64),
) -> Result<Option<CudaStorage>> {
    const OP: &str = "add_dropped2";
    let (base, l, a, al, b, bl) = (o.base.s, o.base.l, o.a.s, o.a.l, o.b.s, o.b.l);
    let fits = |s: &CudaStorage, sl: &Layout| {
        s.dtype == DType::BF16
            && sl.is_contiguous()
            && sl.dims() == l.dims()
            && sl.offset() + sl.elem_count() <= s.len
            && s.ptr_at(sl.offset()) % 8 == 0
    };
    let n = l.elem_count();
    if !(fits(base, l) && fits(a, al) && fits(b, bl)) || n == 0 || u32::try_from(n).is_err() {
        return Ok(None);
    }
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid(
            OP,
            format!("probability {p} is not in [0, 1)"),
        ));
    }
    base.same_device(OP, a)?;
    base.same_device(OP, b)?;
    let out = CudaStorage::alloc(&base.dev, OP, n, DType::BF16)?;
    // The kept value as a bf16 mask holds it (dropout_apply in x's own dtype); 1 without dropout.
    let keep = half::bf16::from_f64(1.0 / (1.0 - p)).to_f32();
    let (n32, thr) = (to_u32(OP, n)?, rng::dropout_threshold(p));
    let (pb, pa, pv, po) = (
        base.ptr_at(l.offset()),
        a.ptr_at(al.offset()),
        b.ptr_at(bl.offset()),
        out.ptr(),
    );
    let key = base.dev.dropout_key_ptr();
    // SAFETY: base, a and b hold n contiguous bf16 from their offsets inside their buffers
    // (checked above), starting 8-byte aligned; `out` holds n bf16. Thread g reads and writes
    // elements 4g .. 4g + 4 below n (8-byte accesses for whole groups of four).
    // `key` is the device's 8-byte dropout key, owned by the device for its lifetime; read only.
    unsafe {
        launch!(
            &base.dev,
            OP,
            DROPOUT,
            "add_dropped2_bf16",
            CudaDevice::grid(n.div_ceil(4)),
            [n32, pb, pa, pv, seed_a, seed_b, key, thr, keep, po]
        )
    }?;
    Ok(Some(out))
}
