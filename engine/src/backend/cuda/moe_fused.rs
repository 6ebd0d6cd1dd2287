//! Launchers of the fused MixLoRA FFN kernels (module `MOE_FUSED` of `mixlora-kernels`; the
//! operands and results of each are documented on the `BackendStorage` methods). `G` and `U` are
//! read in place through their row stride (they are column halves of one `[T, 2I]` product);
//! every other operand is copied when it is not contiguous. Every operand's element count is
//! checked against the sizes in [`MoeDims`] before a launch.

use cudarc::driver::LaunchConfig;
use kernels::MOE_FUSED;

use super::launch::launch;
use super::layout::to_u32;
use super::{check_extent, Contig, CudaDevice, CudaStorage};
use crate::backend::MoeDims;
use crate::{DType, Error, Layout, Result};

type Args<'a> = [(&'a CudaStorage, &'a Layout)];

/// Threads per block of every fused kernel (a multiple of 32: the block reductions need it).
const THREADS: u32 = 256;
/// Limits of the kernels' per-thread arrays (`MOE_MAX_K`, `MOE_MAX_KR`, `MOE_MAX_R` in
/// moe_fused.cu).
const MAX_K: usize = 8;
const MAX_KR: usize = 64;
const MAX_R: usize = 64;

/// What an operand is.
#[derive(Clone, Copy)]
enum Kind {
    /// Base dtype, read in place through a row stride (`[rows, cols]` with unit column stride).
    Rows,
    /// Base dtype, contiguous.
    Base,
    /// Adapter dtype (f64 under an f64 base, else f32), contiguous.
    Adapter,
    /// u32, contiguous.
    Index,
}

/// Checked device pointers of a kernel's operands (and the copies that keep them alive).
struct Operands {
    dev: CudaDevice,
    base: DType,
    adapter: DType,
    ptrs: Vec<u64>,
    /// The row stride of each operand (its column count when contiguous).
    lds: Vec<u32>,
    _hold: Vec<Contig>,
}

fn operands(op: &'static str, args: &Args<'_>, spec: &[(Kind, usize)]) -> Result<Operands> {
    if args.len() != spec.len() {
        return Err(Error::invalid(
            op,
            format!("{} operands, expected {}", args.len(), spec.len()),
        ));
    }
    let first = args[0].0;
    let base = first.dtype;
    if base == DType::U32 {
        return Err(Error::UnsupportedDType {
            op,
            dtype: DType::U32,
        });
    }
    let adapter = if base == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let mut out = Operands {
        dev: first.dev.clone(),
        base,
        adapter,
        ptrs: Vec::with_capacity(spec.len()),
        lds: Vec::with_capacity(spec.len()),
        _hold: Vec::new(),
    };
    for (&(s, l), &(kind, len)) in args.iter().zip(spec) {
        first.same_device(op, s)?;
        let want = match kind {
            Kind::Rows | Kind::Base => base,
            Kind::Adapter => adapter,
            Kind::Index => DType::U32,
        };
        if s.dtype != want {
            return Err(Error::DTypeMismatch {
                op,
                lhs: s.dtype,
                rhs: want,
            });
        }
        if l.elem_count() != len {
            return Err(Error::invalid(
                op,
                format!(
                    "an operand of shape {} where {len} elements are expected",
                    l.shape()
                ),
            ));
        }
        check_extent(op, l, s.len)?;
        let rows_in_place = matches!(kind, Kind::Rows)
            && l.dims().len() == 2
            && l.strides()[1] == 1
            && l.strides()[0] >= l.dims()[1];
        if rows_in_place {
            out.ptrs.push(s.ptr_at(l.offset()));
            out.lds.push(to_u32(op, l.strides()[0])?);
        } else {
            let c = s.contiguous(op, l)?;
            out.ptrs.push(c.ptr);
            out.lds.push(to_u32(op, *l.dims().last().unwrap_or(&1))?);
            out._hold.push(c);
        }
    }
    Ok(out)
}

fn check_limits(op: &'static str, d: &MoeDims) -> Result<()> {
    if d.k > MAX_K || d.k * d.r > MAX_KR || d.r > MAX_R {
        return Err(Error::invalid(
            op,
            format!(
                "k = {}, r = {}: the CUDA kernels support k ≤ {MAX_K}, r ≤ {MAX_R}, k·r ≤ {MAX_KR}",
                d.k, d.r
            ),
        ));
    }
    for v in [d.t * d.k * d.i, d.t * d.e * d.r, d.e * d.i * d.r, d.t * d.h] {
        to_u32(op, v)?;
    }
    Ok(())
}

/// The kernel for `d`'s sizes: the `k2r16` variant (compile-time k = 2, r = 16: the default
/// MixLoRA shape, its per-thread partials stay in registers) when it applies.
fn kernel_name(op: &'static str, d: &MoeDims, base: DType) -> String {
    if d.k == 2 && d.r == 16 {
        format!("{op}_k2r16_{base}")
    } else {
        format!("{op}_{base}")
    }
}

/// `(scale, dropout, keep, seed)` kernel arguments.
fn settings(d: &MoeDims) -> (f64, f64, f64, u64) {
    let keep = if d.dropout > 0.0 {
        1.0 / (1.0 - d.dropout)
    } else {
        1.0
    };
    (d.scale, d.dropout, keep, d.seed)
}

/// One block per token.
fn per_token(t: usize) -> LaunchConfig {
    CudaDevice::rows(t, THREADS)
}

/// One thread per (column, expert).
fn per_expert_column(cols: usize, e: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (cols.div_ceil(THREADS as usize).max(1) as u32, e as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn sizes(op: &'static str, d: &MoeDims) -> Result<[u32; 6]> {
    Ok([
        to_u32(op, d.t)?,
        to_u32(op, d.k)?,
        to_u32(op, d.e)?,
        to_u32(op, d.r)?,
        to_u32(op, d.i)?,
        to_u32(op, d.h)?,
    ])
}

pub(crate) fn act_forward(args: &Args<'_>, d: &MoeDims) -> Result<Vec<CudaStorage>> {
    const OP: &str = "moe_act_forward";
    check_limits(OP, d)?;
    let (t, k, e, r, i) = (d.t, d.k, d.e, d.r, d.i);
    let o = operands(
        OP,
        args,
        &[
            (Kind::Rows, t * i),        // G
            (Kind::Rows, t * i),        // U
            (Kind::Adapter, t * e * r), // Z_g
            (Kind::Adapter, t * e * r), // Z_u
            (Kind::Adapter, e * i * r), // B_g
            (Kind::Adapter, e * i * r), // B_u
            (Kind::Adapter, e * r * i), // A_d
            (Kind::Index, t * k),       // ids
            (Kind::Adapter, t * k),     // w
        ],
    )?;
    let abar = CudaStorage::alloc(&o.dev, OP, t * i, o.base)?; // [T, I]
    let zd = CudaStorage::alloc(&o.dev, OP, t * k * r, o.adapter)?; // [T, k, r]
    if t == 0 {
        return Ok(vec![abar, zd]);
    }
    let [t32, k32, e32, r32, i32_, _] = sizes(OP, d)?;
    let (scale, pdrop, keep, seed) = settings(d);
    let [g, u, zg, zu, bg, bu, ad, ids, w] = o.ptrs[..] else {
        return Err(Error::invalid(OP, "operand count"));
    };
    let (ldg, ldu) = (o.lds[0], o.lds[1]);
    let (pa, pz) = (abar.ptr(), zd.ptr());
    let name = kernel_name(OP, d, o.base);
    // SAFETY: every operand was checked above to hold exactly the elements its role needs (G, U
    // [T, I] with row strides ldg, ldu ≥ I; Z_g, Z_u [T, E·r]; B_g, B_u [E, I, r]; A_d [E, r, I];
    // ids, w [T, k]) in the dtype the kernel reads; ids are < E (the op takes them from top-k);
    // the outputs hold T·I and T·k·r elements; k ≤ MOE_MAX_K and k·r ≤ MOE_MAX_KR (check_limits);
    // one block of 256 threads per token.
    unsafe {
        launch!(
            &o.dev,
            OP,
            MOE_FUSED,
            name,
            per_token(t),
            [
                t32, k32, e32, r32, i32_, g, ldg, u, ldu, zg, zu, bg, bu, ad, ids, w, pa, pz,
                scale, pdrop, keep, seed
            ]
        )
    }?;
    Ok(vec![abar, zd])
}

pub(crate) fn down_forward(args: &Args<'_>, d: &MoeDims) -> Result<Vec<CudaStorage>> {
    const OP: &str = "moe_down_forward";
    check_limits(OP, d)?;
    let (t, k, e, r, h) = (d.t, d.k, d.e, d.r, d.h);
    let o = operands(
        OP,
        args,
        &[
            (Kind::Base, t * h),        // Y₀
            (Kind::Adapter, t * k * r), // Z_d
            (Kind::Adapter, t * k),     // w
            (Kind::Index, t * k),       // ids
            (Kind::Adapter, e * h * r), // B_d
        ],
    )?;
    let y = CudaStorage::alloc(&o.dev, OP, t * h, o.base)?; // [T, H]
    if t == 0 {
        return Ok(vec![y]);
    }
    let [t32, k32, _, r32, _, h32] = sizes(OP, d)?;
    let (scale, _, _, _) = settings(d);
    let [y0, zd, w, ids, bd] = o.ptrs[..] else {
        return Err(Error::invalid(OP, "operand count"));
    };
    let py = y.ptr();
    let name = format!("{OP}_{}", o.base);
    // SAFETY: Y₀ and the output hold T·H elements of the base dtype, Z_d T·k·r, w and ids T·k,
    // B_d E·H·r (checked above); ids < E; k·r ≤ MOE_MAX_KR; one block per token.
    unsafe {
        launch!(
            &o.dev,
            OP,
            MOE_FUSED,
            name,
            per_token(t),
            [t32, k32, r32, h32, y0, zd, w, ids, bd, py, scale]
        )
    }?;
    Ok(vec![y])
}

pub(crate) fn down_backward(args: &Args<'_>, d: &MoeDims) -> Result<Vec<CudaStorage>> {
    const OP: &str = "moe_down_backward";
    check_limits(OP, d)?;
    let (t, k, e, r, h) = (d.t, d.k, d.e, d.r, d.h);
    let o = operands(
        OP,
        args,
        &[
            (Kind::Base, t * h),        // dY
            (Kind::Adapter, t * k * r), // Z_d
            (Kind::Adapter, t * k),     // w
            (Kind::Index, t * k),       // ids
            (Kind::Adapter, e * h * r), // B_d
        ],
    )?;
    let dzd = CudaStorage::alloc(&o.dev, OP, t * k * r, o.adapter)?; // [T, k, r]
    let dw = CudaStorage::alloc(&o.dev, OP, t * k, o.adapter)?; // [T, k]
    if t == 0 {
        return Ok(vec![dzd, dw]);
    }
    let [t32, k32, _, r32, _, h32] = sizes(OP, d)?;
    let (scale, _, _, _) = settings(d);
    let [dy, zd, w, ids, bd] = o.ptrs[..] else {
        return Err(Error::invalid(OP, "operand count"));
    };
    let (pdz, pdw) = (dzd.ptr(), dw.ptr());
    let name = format!("{OP}_{}", o.base);
    // SAFETY: dY holds T·H base elements, Z_d T·k·r, w and ids T·k, B_d E·H·r (checked above);
    // the outputs hold T·k·r and T·k elements; ids < E; k·r ≤ MOE_MAX_KR; one block per token.
    unsafe {
        launch!(
            &o.dev,
            OP,
            MOE_FUSED,
            name,
            per_token(t),
            [t32, k32, r32, h32, dy, zd, w, ids, bd, pdz, pdw, scale]
        )
    }?;
    Ok(vec![dzd, dw])
}

pub(crate) fn act_backward(args: &Args<'_>, d: &MoeDims) -> Result<Vec<CudaStorage>> {
    const OP: &str = "moe_act_backward";
    check_limits(OP, d)?;
    let (t, k, e, r, i) = (d.t, d.k, d.e, d.r, d.i);
    let o = operands(
        OP,
        args,
        &[
            (Kind::Rows, t * i),        // G
            (Kind::Rows, t * i),        // U
            (Kind::Adapter, t * e * r), // Z_g
            (Kind::Adapter, t * e * r), // Z_u
            (Kind::Adapter, e * i * r), // B_g
            (Kind::Adapter, e * i * r), // B_u
            (Kind::Adapter, e * r * i), // A_d
            (Kind::Index, t * k),       // ids
            (Kind::Adapter, t * k),     // w
            (Kind::Base, t * i),        // dĀ
            (Kind::Adapter, t * k * r), // dZ_d
        ],
    )?;
    let dg = CudaStorage::alloc(&o.dev, OP, t * i, o.base)?; // [T, I]
    let du = CudaStorage::alloc(&o.dev, OP, t * i, o.base)?; // [T, I]
    let dzg = CudaStorage::alloc(&o.dev, OP, t * e * r, o.adapter)?; // [T, E·r]
    let dzu = CudaStorage::alloc(&o.dev, OP, t * e * r, o.adapter)?; // [T, E·r]
    let dw = CudaStorage::alloc(&o.dev, OP, t * k, o.adapter)?; // [T, k]
    if t == 0 {
        return Ok(vec![dg, du, dzg, dzu, dw]);
    }
    let [t32, k32, e32, r32, i32_, _] = sizes(OP, d)?;
    let (scale, pdrop, keep, seed) = settings(d);
    let [g, u, zg, zu, bg, bu, ad, ids, w, dabar, dzd] = o.ptrs[..] else {
        return Err(Error::invalid(OP, "operand count"));
    };
    let (ldg, ldu) = (o.lds[0], o.lds[1]);
    let (pdg, pdu, pdzg, pdzu, pdw) = (dg.ptr(), du.ptr(), dzg.ptr(), dzu.ptr(), dw.ptr());
    let name = kernel_name(OP, d, o.base);
    // SAFETY: the operands hold exactly the elements of their roles (checked above: G, U [T, I]
    // with row strides ≥ I, Z_g, Z_u [T, E·r], B_g, B_u [E, I, r], A_d [E, r, I], ids, w [T, k],
    // dĀ [T, I], dZ_d [T, k, r]); the outputs hold T·I, T·I, T·E·r, T·E·r and T·k elements, and
    // each block writes only its token's rows (all E·r columns of dZ_g, dZ_u: zeros, then the
    // slots' codes); ids < E; 2·k·r + k ≤ MOE_MAX_RED; one block per token.
    unsafe {
        launch!(
            &o.dev,
            OP,
            MOE_FUSED,
            name,
            per_token(t),
            [
                t32, k32, e32, r32, i32_, g, ldg, u, ldu, zg, zu, bg, bu, ad, ids, w, dabar, dzd,
                pdg, pdu, pdzg, pdzu, pdw, scale, pdrop, keep, seed
            ]
        )
    }?;
    Ok(vec![dg, du, dzg, dzu, dw])
}

/// `perm` `[T·k]` and `offsets` `[E+1]` are read on the device only (a host copy per layer is
/// what the fused path avoids): the kernels trust `offsets` to be non-decreasing from 0 to `T·k`
/// and `perm` to hold slots `< T·k`, as the op's grouping guarantees (the CPU backend checks it).
pub(crate) fn act_weight_grads(args: &Args<'_>, d: &MoeDims) -> Result<Vec<CudaStorage>> {
    const OP: &str = "moe_act_weight_grads";
    check_limits(OP, d)?;
    let (t, k, e, r, i) = (d.t, d.k, d.e, d.r, d.i);
    let o = operands(
        OP,
        args,
        &[
            (Kind::Rows, t * i),        // G
            (Kind::Rows, t * i),        // U
            (Kind::Adapter, t * e * r), // Z_g
            (Kind::Adapter, t * e * r), // Z_u
            (Kind::Adapter, e * i * r), // B_g
            (Kind::Adapter, e * i * r), // B_u
            (Kind::Adapter, e * r * i), // A_d
            (Kind::Index, t * k),       // ids (unused: perm and offsets say the expert)
            (Kind::Adapter, t * k),     // w
            (Kind::Base, t * i),        // dĀ
            (Kind::Adapter, t * k * r), // dZ_d
            (Kind::Index, t * k),       // perm
            (Kind::Index, e + 1),       // offsets
        ],
    )?;
    let dbg = CudaStorage::alloc(&o.dev, OP, e * i * r, o.adapter)?; // [E, I, r]
    let dbu = CudaStorage::alloc(&o.dev, OP, e * i * r, o.adapter)?; // [E, I, r]
    let dad = CudaStorage::alloc(&o.dev, OP, e * r * i, o.adapter)?; // [E, r, I]
    if e * i * r == 0 {
        return Ok(vec![dbg, dbu, dad]);
    }
    let [_, k32, e32, r32, i32_, _] = sizes(OP, d)?;
    let (scale, pdrop, keep, seed) = settings(d);
    let [g, u, zg, zu, bg, bu, ad, _ids, w, dabar, dzd, perm, offsets] = o.ptrs[..] else {
        return Err(Error::invalid(OP, "operand count"));
    };
    let (ldg, ldu) = (o.lds[0], o.lds[1]);
    let (pbg, pbu, pad) = (dbg.ptr(), dbu.ptr(), dad.ptr());
    let name = kernel_name(OP, d, o.base);
    // SAFETY: the operands hold exactly the elements of their roles (checked above); perm holds
    // T·k slot indices < T·k and offsets E+1 non-decreasing bounds within [0, T·k] (the op's
    // grouping); thread (e, i) writes only row i of expert e of each output (E·I·r elements
    // each, every one written); r ≤ MOE_MAX_R; grid ⌈I/256⌉ × E.
    unsafe {
        launch!(
            &o.dev,
            OP,
            MOE_FUSED,
            name,
            per_expert_column(i, e),
            [
                k32, e32, r32, i32_, g, ldg, u, ldu, zg, zu, bg, bu, ad, w, dabar, dzd, perm,
                offsets, pbg, pbu, pad, scale, pdrop, keep, seed
            ]
        )
    }?;
    Ok(vec![dbg, dbu, dad])
}

pub(crate) fn down_weight_grad(args: &Args<'_>, d: &MoeDims) -> Result<Vec<CudaStorage>> {
    const OP: &str = "moe_down_weight_grad";
    check_limits(OP, d)?;
    let (t, k, e, r, h) = (d.t, d.k, d.e, d.r, d.h);
    let o = operands(
        OP,
        args,
        &[
            (Kind::Base, t * h),        // dY
            (Kind::Adapter, t * k * r), // Z_d
            (Kind::Adapter, t * k),     // w
            (Kind::Index, t * k),       // perm
            (Kind::Index, e + 1),       // offsets
        ],
    )?;
    let dbd = CudaStorage::alloc(&o.dev, OP, e * h * r, o.adapter)?; // [E, H, r]
    if e * h * r == 0 {
        return Ok(vec![dbd]);
    }
    let [_, k32, e32, r32, _, h32] = sizes(OP, d)?;
    let (scale, _, _, _) = settings(d);
    let [dy, zd, w, perm, offsets] = o.ptrs[..] else {
        return Err(Error::invalid(OP, "operand count"));
    };
    let pbd = dbd.ptr();
    let name = format!("{OP}_{}", o.base);
    // SAFETY: dY holds T·H base elements, Z_d T·k·r, w T·k (checked above); perm and offsets are
    // the op's grouping (slots < T·k, bounds within [0, T·k]); thread (e, h) writes only row h of
    // expert e (E·H·r elements, every one written); r ≤ MOE_MAX_R; grid ⌈H/256⌉ × E.
    unsafe {
        launch!(
            &o.dev,
            OP,
            MOE_FUSED,
            name,
            per_expert_column(h, e),
            [k32, e32, r32, h32, dy, zd, w, perm, offsets, pbd, scale]
        )
    }?;
    Ok(vec![dbd])
}
