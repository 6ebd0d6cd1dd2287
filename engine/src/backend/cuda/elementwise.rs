//! Elementwise ops: casts, unary maps, broadcasting binary ops, comparisons, select, strided
//! copies. Every kernel takes its operands as strided views ([`StridedArg`]), so broadcast and
//! transposed operands are read in place; outputs are contiguous.

use kernels::ELEMENTWISE;

use super::launch::launch;
use super::layout::{to_u32, StridedArg};
use super::{check_extent, float_only, CudaDevice, CudaStorage};
use crate::backend::{BinaryOp, CmpOp, UnaryOp};
use crate::{DType, Error, Layout, Result};

fn same_shape(op: &'static str, a: &Layout, b: &Layout) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::ShapeMismatch {
            op,
            lhs: a.shape().clone(),
            rhs: b.shape().clone(),
        });
    }
    Ok(())
}

fn same_dtype(op: &'static str, a: &CudaStorage, b: &CudaStorage) -> Result<()> {
    if a.dtype != b.dtype {
        return Err(Error::DTypeMismatch {
            op,
            lhs: a.dtype,
            rhs: b.dtype,
        });
    }
    Ok(())
}

/// A contiguous copy of the view `l` of `s`.
pub(crate) fn gather_view(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    let dev = &s.dev;
    let out = CudaStorage::alloc(dev, "copy", l.elem_count(), s.dtype)?;
    copy_raw(s, l, out.ptr(), &Layout::contiguous(l.shape().clone()))?;
    Ok(out)
}

/// Copies the view `sl` of `s` into the view `dl` of the buffer at `dst` (same dtype as `s`).
///
/// Moves whole 16-byte units (copy_u128), else whole 8-byte units (copy_u64), when both views
/// and both buffers allow it ([`StridedArg::in_units`] and unit-aligned base pointers); otherwise
/// one element per thread (copy_{dtype}, which takes 16-byte steps itself when both views are one
/// aligned run).
fn copy_raw(s: &CudaStorage, sl: &Layout, dst: u64, dl: &Layout) -> Result<()> {
    let n = sl.elem_count();
    if n == 0 {
        return Ok(());
    }
    let dev = &s.dev;
    let _detail = super::launch::profile_detail(|| format!("{} {}", s.dtype, sl.shape()));
    let (ls, ld) = (StridedArg::new("copy", sl)?, StridedArg::new("copy", dl)?);
    let (n32, x) = (to_u32("copy", n)?, s.ptr());
    let es = s.dtype.size_in_bytes();
    for (unit, name) in [(16usize, "copy_u128"), (8, "copy_u64")] {
        // A unit of one element gains nothing over copy_{dtype}.
        if unit <= es || x % unit as u64 != 0 || dst % unit as u64 != 0 {
            continue;
        }
        let u = (unit / es) as u32;
        let (Some(us), Some(ud)) = (ls.in_units(u), ld.in_units(u)) else {
            continue;
        };
        let units = n32 / u;
        // SAFETY: both views were checked against their buffers by the callers (check_extent).
        // Both have a last dim of stride 1 whose length is a multiple of u and every other stride
        // and offset a multiple of u, so unit i < n / u of `us` (of `ud`) is exactly elements
        // i·u .. i·u + u of the view `ls` (`ld`), inside its buffer, and the same elements of the
        // copy on both sides; both base pointers are `unit`-byte aligned, so every unit is too.
        return unsafe {
            launch!(
                dev,
                "copy",
                ELEMENTWISE,
                name,
                CudaDevice::grid(units as usize),
                [units, us, ud, x, dst]
            )
        };
    }
    let runs = [ls, ld].iter().all(|l| l.rank == 1 && l.strides[0] == 1);
    // 8 elements per thread when both views are one run, else one.
    let threads = if runs { n.div_ceil(8) } else { n };
    let name = format!("copy_{}", s.dtype);
    // SAFETY: both views were checked against their buffers by the callers (check_extent), so
    // every `at(ls, i)` and `at(ld, i)` for i < n is inside them; both hold `s.dtype` elements.
    unsafe {
        launch!(
            dev,
            "copy",
            ELEMENTWISE,
            name,
            CudaDevice::grid(threads),
            [n32, ls, ld, x, dst]
        )
    }
}

pub(crate) fn copy_to_view(
    s: &CudaStorage,
    sl: &Layout,
    dst: &mut CudaStorage,
    dl: &Layout,
) -> Result<()> {
    const OP: &str = "copy_to_view";
    same_shape(OP, sl, dl)?;
    same_dtype(OP, s, dst)?;
    s.same_device(OP, dst)?;
    check_extent(OP, sl, s.len)?;
    if dl.max_extent() > dst.len {
        return Err(Error::invalid(OP, "destination view exceeds its buffer"));
    }
    copy_raw(s, sl, dst.ptr(), dl)
}

/// Adds the view `sl` of `s` into the view `dl` of `dst`, in place (same shape and float dtype).
pub(crate) fn add_to_view(
    s: &CudaStorage,
    sl: &Layout,
    dst: &mut CudaStorage,
    dl: &Layout,
) -> Result<()> {
    const OP: &str = "add_to_view";
    same_shape(OP, sl, dl)?;
    same_dtype(OP, s, dst)?;
    float_only(OP, s.dtype)?;
    s.same_device(OP, dst)?;
    check_extent(OP, sl, s.len)?;
    if dl.max_extent() > dst.len {
        return Err(Error::invalid(OP, "destination view exceeds its buffer"));
    }
    let n = sl.elem_count();
    if n == 0 {
        return Ok(());
    }
    let (ls, ld) = (StridedArg::new(OP, sl)?, StridedArg::new(OP, dl)?);
    let (n32, x, y) = (to_u32(OP, n)?, s.ptr(), dst.ptr());
    let runs = [&ls, &ld].iter().all(|l| l.rank == 1 && l.strides[0] == 1);
    let threads = if runs { n.div_ceil(8) } else { n };
    let name = format!("add_to_{}", s.dtype);
    let _detail = super::launch::profile_detail(|| format!("{} {}", s.dtype, sl.shape()));
    // SAFETY: both views were checked against their buffers above, so every `at(ls, i)` and
    // `at(ld, i)` for i < n is inside them; both hold `s.dtype` elements. Each destination
    // element is read and written by the one thread that owns index i (callers pass a
    // destination view of distinct elements: a tensor's own layout).
    unsafe {
        launch!(
            &s.dev,
            OP,
            ELEMENTWISE,
            name,
            CudaDevice::grid(threads),
            [n32, ls, ld, x, y]
        )
    }
}

pub(crate) fn to_dtype(s: &CudaStorage, l: &Layout, dtype: DType) -> Result<CudaStorage> {
    check_extent("to_dtype", l, s.len)?;
    if dtype == s.dtype {
        return gather_view(s, l);
    }
    let n = l.elem_count();
    let out = CudaStorage::alloc(&s.dev, "to_dtype", n, dtype)?;
    if n == 0 {
        return Ok(out);
    }
    let (la, n32, x, y) = (
        StridedArg::new("to_dtype", l)?,
        to_u32("to_dtype", n)?,
        s.ptr(),
        out.ptr(),
    );
    let name = format!("cast_{}_{}", s.dtype, dtype);
    let _detail = super::launch::profile_detail(|| l.shape().to_string());
    // SAFETY: `l` lies inside `s` (checked), the output holds `n` elements of `dtype`; the kernel
    // reads `s.dtype` and writes `dtype` as its name says.
    unsafe {
        launch!(
            &s.dev,
            "to_dtype",
            ELEMENTWISE,
            name,
            CudaDevice::grid(n.div_ceil(8)), // 8 elements per thread on contiguous runs
            [n32, la, x, y]
        )
    }?;
    Ok(out)
}

fn unary_name(op: UnaryOp) -> (&'static str, f64, f64) {
    match op {
        UnaryOp::Neg => ("neg", 0.0, 0.0),
        UnaryOp::Exp => ("exp", 0.0, 0.0),
        UnaryOp::Log => ("log", 0.0, 0.0),
        UnaryOp::Silu => ("silu", 0.0, 0.0),
        UnaryOp::Sigmoid => ("sigmoid", 0.0, 0.0),
        UnaryOp::Sqrt => ("sqrt", 0.0, 0.0),
        UnaryOp::Recip => ("recip", 0.0, 0.0),
        UnaryOp::Sqr => ("sqr", 0.0, 0.0),
        UnaryOp::Abs => ("abs", 0.0, 0.0),
        UnaryOp::Tanh => ("tanh", 0.0, 0.0),
        UnaryOp::Cos => ("cos", 0.0, 0.0),
        UnaryOp::Sin => ("sin", 0.0, 0.0),
        UnaryOp::Affine { mul, add } => ("affine", mul, add),
        UnaryOp::Powf(e) => ("powf", e, 0.0),
        UnaryOp::MaxScalar(v) => ("max_scalar", v, 0.0),
        UnaryOp::MinScalar(v) => ("min_scalar", v, 0.0),
    }
}

pub(crate) fn unary(s: &CudaStorage, l: &Layout, op: UnaryOp) -> Result<CudaStorage> {
    float_only("unary", s.dtype)?;
    check_extent("unary", l, s.len)?;
    let n = l.elem_count();
    let out = CudaStorage::alloc(&s.dev, "unary", n, s.dtype)?;
    if n == 0 {
        return Ok(out);
    }
    let (base, p0, p1) = unary_name(op);
    let (la, n32, x, y) = (
        StridedArg::new("unary", l)?,
        to_u32("unary", n)?,
        s.ptr(),
        out.ptr(),
    );
    let name = format!("{base}_{}", s.dtype);
    // SAFETY: `l` lies inside `s` (checked); the output holds `n` elements of the same dtype.
    unsafe {
        launch!(
            &s.dev,
            "unary",
            ELEMENTWISE,
            name,
            CudaDevice::grid(n.div_ceil(8)), // 8 elements per thread on contiguous runs
            [n32, la, x, y, p0, p1]
        )
    }?;
    Ok(out)
}

/// Checks two same-shape, same-dtype operands on one GPU and returns their strided views.
fn two_views(
    op: &'static str,
    a: &CudaStorage,
    al: &Layout,
    b: &CudaStorage,
    bl: &Layout,
) -> Result<(StridedArg, StridedArg)> {
    same_dtype(op, a, b)?;
    a.same_device(op, b)?;
    same_shape(op, al, bl)?;
    check_extent(op, al, a.len)?;
    check_extent(op, bl, b.len)?;
    Ok((StridedArg::new(op, al)?, StridedArg::new(op, bl)?))
}

pub(crate) fn binary(
    a: &CudaStorage,
    al: &Layout,
    b: &CudaStorage,
    bl: &Layout,
    op: BinaryOp,
) -> Result<CudaStorage> {
    let (la, lb) = two_views("binary", a, al, b, bl)?;
    float_only("binary", a.dtype)?;
    let n = al.elem_count();
    let out = CudaStorage::alloc(&a.dev, "binary", n, a.dtype)?;
    if n == 0 {
        return Ok(out);
    }
    let base = match op {
        BinaryOp::Add => "add",
        BinaryOp::Sub => "sub",
        BinaryOp::Mul => "mul",
        BinaryOp::Div => "div",
        BinaryOp::Maximum => "maximum",
        BinaryOp::Minimum => "minimum",
        BinaryOp::SiluMul => "silu_mul",
    };
    let (n32, x, z, y) = (to_u32("binary", n)?, a.ptr(), b.ptr(), out.ptr());
    let name = format!("{base}_{}", a.dtype);
    // SAFETY: both views have the output's shape and lie inside their buffers (checked); the
    // output holds `n` elements of the operands' dtype.
    unsafe {
        launch!(
            &a.dev,
            "binary",
            ELEMENTWISE,
            name,
            CudaDevice::grid(n.div_ceil(8)), // 8 elements per thread on contiguous runs
            [n32, la, lb, x, z, y]
        )
    }?;
    Ok(out)
}

pub(crate) fn cmp(
    a: &CudaStorage,
    al: &Layout,
    b: &CudaStorage,
    bl: &Layout,
    op: CmpOp,
) -> Result<CudaStorage> {
    let (la, lb) = two_views("cmp", a, al, b, bl)?;
    let n = al.elem_count();
    let out = CudaStorage::alloc(&a.dev, "cmp", n, DType::U32)?;
    if n == 0 {
        return Ok(out);
    }
    let base = match op {
        CmpOp::Eq => "eq",
        CmpOp::Ne => "ne",
        CmpOp::Lt => "lt",
        CmpOp::Le => "le",
        CmpOp::Gt => "gt",
        CmpOp::Ge => "ge",
    };
    let (n32, x, z, y) = (to_u32("cmp", n)?, a.ptr(), b.ptr(), out.ptr());
    let name = format!("{base}_{}", a.dtype);
    // SAFETY: both views have the output's shape and lie inside their buffers (checked); the
    // output holds `n` u32s.
    unsafe {
        launch!(
            &a.dev,
            "cmp",
            ELEMENTWISE,
            name,
            CudaDevice::grid(n),
            [n32, la, lb, x, z, y]
        )
    }?;
    Ok(out)
}

pub(crate) fn where_cond(
    c: &CudaStorage,
    cl: &Layout,
    t: &CudaStorage,
    tl: &Layout,
    f: &CudaStorage,
    fl: &Layout,
) -> Result<CudaStorage> {
    const OP: &str = "where_cond";
    let (lt, lf) = two_views(OP, t, tl, f, fl)?;
    c.same_device(OP, t)?;
    same_shape(OP, cl, tl)?;
    check_extent(OP, cl, c.len)?;
    let lc = StridedArg::new(OP, cl)?;
    let n = tl.elem_count();
    let out = CudaStorage::alloc(&t.dev, OP, n, t.dtype)?;
    if n == 0 {
        return Ok(out);
    }
    let (n32, cp, tp, fp, y) = (to_u32(OP, n)?, c.ptr(), t.ptr(), f.ptr(), out.ptr());
    let name = format!("where_{}_{}", c.dtype, t.dtype);
    // SAFETY: the three views share the output's shape and lie inside their buffers (checked);
    // the output holds `n` elements of the value dtype.
    unsafe {
        launch!(
            &t.dev,
            OP,
            ELEMENTWISE,
            name,
            CudaDevice::grid(n),
            [n32, lc, lt, lf, cp, tp, fp, y]
        )
    }?;
    Ok(out)
}

/// A buffer of `n` elements of `dtype`, all `v` (Rust `as` conversion from f64).
pub(crate) fn fill(dev: &CudaDevice, n: usize, dtype: DType, v: f64) -> Result<CudaStorage> {
    let out = CudaStorage::alloc(dev, "full", n, dtype)?;
    if n == 0 {
        return Ok(out);
    }
    let (n32, y) = (to_u32("full", n)?, out.ptr());
    let name = format!("fill_{dtype}");
    let _detail = super::launch::profile_detail(|| format!("[{n}]"));
    // SAFETY: the output holds `n` elements of `dtype`; the kernel writes y[0..n] (16-byte stores
    // over whole groups of 8 only when y is 16-byte aligned, which it checks).
    unsafe {
        launch!(
            dev,
            "full",
            ELEMENTWISE,
            name,
            CudaDevice::grid(n.div_ceil(8)), // 8 elements per thread
            [n32, y, v]
        )
    }?;
    Ok(out)
}
