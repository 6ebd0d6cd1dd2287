//! Launchers of the fused MixLoRA FFN kernels (module `MOE_FFN` of `mixlora-kernels`,
//! kernels/src/moe_ffn.cu; the operands and results of each are documented on the primitives
//! and operand structs of `primitives.rs`). `G` and `U` are read in place through their row
//! stride (they are column halves of one `[T, 2I]` product); every other operand is copied when
//! it is not contiguous. Every operand's element count is checked against the sizes in
//! [`MoeDims`] before a launch. Expert ids are trusted to be `< E` (the op takes them from its
//! top-k; the CPU reference checks them).

use cudarc::driver::LaunchConfig;
use kernels::MOE_FFN;

use super::primitives::{
    BlockCodes, Blocks, ExpandCodes, GatherCodes, MoeDims, SwigluBackward, SwigluForward,
    SwigluGrads,
};
use crate::backend::cuda::launch::launch;
use crate::backend::cuda::layout::{to_u32, to_u32s};
use crate::backend::cuda::{check_extent, float_only, Contig, CudaDevice, CudaStorage};
use crate::fused::Operand;
use crate::{DType, Error, Result};

/// An operand on the GPU.
pub(super) type Op<'a> = Operand<'a, CudaStorage>;

/// Threads per block of the SwiGLU kernels (a multiple of 32: the block reductions need it).
const THREADS: u32 = 256;
/// The most slots per token the kernels' per-thread arrays hold (`MOE_MAX_K` in moe_ffn.cu).
const MAX_K: usize = 8;

/// What an operand is.
#[derive(Clone, Copy)]
pub(super) enum Kind {
    /// Base dtype, read in place through a row stride (`[rows, cols]` with unit column stride).
    Rows,
    /// Base dtype, contiguous.
    Base,
    /// The first operand's dtype, whatever float it is, contiguous.
    Any,
    /// Adapter dtype (f64 under an f64 base, else f32), contiguous.
    Adapter,
    /// u32, contiguous.
    Index,
    /// Base dtype, read in place through a row stride when that stride is a multiple of 8
    /// elements and the first element 16-byte aligned, else copied (the tensor-core kernels
    /// move 16-byte units).
    AlignedRows,
    /// Base dtype, contiguous and 16-byte aligned (copied when it is not).
    Aligned,
}

/// Checked device pointers of a kernel's operands (and the copies that keep them alive).
pub(super) struct Operands {
    pub(super) dev: CudaDevice,
    pub(super) base: DType,
    pub(super) adapter: DType,
    pub(super) ptrs: Vec<u64>,
    /// The row stride of each operand (its column count when contiguous).
    pub(super) lds: Vec<u32>,
    _hold: Vec<Contig>,
}

/// The operands of one launch, in the kernel's order, each with what it is and its expected
/// element count.
pub(super) fn operands(op: &'static str, spec: &[(Op<'_>, Kind, usize)]) -> Result<Operands> {
    let Some(&(first, _, _)) = spec.first() else {
        return Err(Error::invalid(op, "no operands"));
    };
    let first = first.s;
    let base = first.dtype;
    float_only(op, base)?;
    let adapter = base.accumulation();
    let mut out = Operands {
        dev: first.dev.clone(),
        base,
        adapter,
        ptrs: Vec::with_capacity(spec.len()),
        lds: Vec::with_capacity(spec.len()),
        _hold: Vec::new(),
    };
    for &(Operand { s, l }, kind, len) in spec {
        first.same_device(op, s)?;
        let want = match kind {
            Kind::Rows | Kind::Base | Kind::Any | Kind::AlignedRows | Kind::Aligned => base,
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
        let aligned = |ptr: u64, ld: usize| ptr % 16 == 0 && ld % 8 == 0;
        let rows_in_place = matches!(kind, Kind::Rows | Kind::AlignedRows)
            && l.dims().len() == 2
            && l.strides()[1] == 1
            && l.strides()[0] >= l.dims()[1]
            && (matches!(kind, Kind::Rows) || aligned(s.ptr_at(l.offset()), l.strides()[0]));
        if rows_in_place {
            out.ptrs.push(s.ptr_at(l.offset()));
            out.lds.push(to_u32(op, l.strides()[0])?);
        } else {
            let mut c = s.contiguous(op, l)?;
            if matches!(kind, Kind::AlignedRows | Kind::Aligned) && c.ptr % 16 != 0 {
                c = Contig::copy_of(s, op, l)?;
            }
            out.ptrs.push(c.ptr);
            out.lds.push(to_u32(op, *l.dims().last().unwrap_or(&1))?);
            out._hold.push(c);
        }
    }
    Ok(out)
}

fn check_sizes(op: &'static str, d: &MoeDims) -> Result<()> {
    if d.k > MAX_K {
        return Err(Error::invalid(
            op,
            format!("k = {}: the CUDA kernels support k ≤ {MAX_K}", d.k),
        ));
    }
    for v in [d.t * d.k * d.i, d.t * d.k * d.e * d.r, d.t * 2 * d.i] {
        to_u32(op, v)?;
    }
    Ok(())
}

/// `(dropout, keep, seed)` kernel arguments.
pub(super) fn settings(d: &MoeDims) -> (f64, f64, u64) {
    let keep = if d.dropout > 0.0 {
        1.0 / (1.0 - d.dropout)
    } else {
        1.0
    };
    (d.dropout, keep, d.seed)
}

/// One block per token row (the kernels loop over rows beyond the grid).
fn per_token(t: usize) -> LaunchConfig {
    CudaDevice::rows(t.min(1 << 20), THREADS)
}

/// The two kernels that move codes between the slot layout `[T·k, r]` and the expert-block
/// layout `[rows, E·r]`; both take `(T, k, E, r, flag, input, ids, out)`.
#[derive(Clone, Copy)]
enum Codes {
    /// `moe_gather_codes`: src `[rows, E·r]` → `[T, k, r]` in the adapter dtype, where rows
    /// (the flag `per_slot`) is T·k when src holds that many rows and k ≠ 1, else T.
    Gather,
    /// `moe_expand_codes`: codes `[T·k, r]` → `[rows, E·r]` in their own dtype, where rows is T
    /// when `summed` (the flag) and T·k otherwise.
    Expand { summed: bool },
}

pub(super) fn gather_codes(o: &GatherCodes<'_, CudaStorage>, d: &MoeDims) -> Result<CudaStorage> {
    move_codes(o.src, o.ids, d, Codes::Gather)
}

pub(super) fn expand_codes(
    o: &ExpandCodes<'_, CudaStorage>,
    d: &MoeDims,
    summed: bool,
) -> Result<CudaStorage> {
    move_codes(o.codes, o.ids, d, Codes::Expand { summed })
}

/// `input`: the gather's `src` or the expansion's `codes`.
fn move_codes(input: Op<'_>, ids: Op<'_>, d: &MoeDims, which: Codes) -> Result<CudaStorage> {
    let op = match which {
        Codes::Gather => "moe_gather_codes",
        Codes::Expand { .. } => "moe_expand_codes",
    };
    check_sizes(op, d)?;
    let (t, k, e, r) = (d.t, d.k, d.e, d.r);
    // (flag, input elements, output elements)
    let (flag, in_len, out_len) = match which {
        Codes::Gather => {
            let src_len = input.l.elem_count();
            let per_slot = src_len == t * k * e * r && k != 1;
            let rows = if per_slot { t * k } else { t };
            (per_slot, rows * e * r, t * k * r)
        }
        Codes::Expand { summed } => {
            let rows = if summed { t } else { t * k };
            (summed, t * k * r, rows * e * r)
        }
    };
    let o = operands(
        op,
        &[
            (input, Kind::Any, in_len), // src or codes
            (ids, Kind::Index, t * k),
        ],
    )?;
    let out_dtype = match which {
        Codes::Gather => o.adapter,
        Codes::Expand { .. } => o.base,
    };
    let out = CudaStorage::alloc(&o.dev, op, out_len, out_dtype)?;
    if out_len == 0 {
        return Ok(out);
    }
    let [input, ids] = o.ptrs[..] else {
        return Err(Error::invalid(op, "operand count"));
    };
    let [t32, k32, e32, r32] = to_u32s(op, [t, k, e, r])?;
    let (po, flag32) = (out.ptr(), u32::from(flag));
    let name = format!("{op}_{}", o.base);
    // SAFETY: the input holds in_len elements and ids T·k (checked above), each id < E (the op's
    // top-k). Gather reads src[row·E·r + id·r + c] with row < rows (T·k when the flag is set,
    // else T) and c < r, inside the rows·E·r = in_len elements; expand reads codes[p·r + c] with
    // p < T·k, c < r. Each writes the out_len elements of `out` (T·k·r for gather, rows·E·r for
    // expand) once, grid-stride.
    unsafe {
        launch!(
            &o.dev,
            op,
            MOE_FFN,
            name,
            CudaDevice::grid(out_len),
            [t32, k32, e32, r32, flag32, input, ids, po]
        )
    }?;
    Ok(out)
}

pub(super) fn block_codes(
    x: &Blocks<'_, CudaStorage>,
    d: &MoeDims,
    how: &BlockCodes,
) -> Result<CudaStorage> {
    const OP: &str = "moe_block_codes";
    check_sizes(OP, d)?;
    let (t, k, er) = (d.t, d.k, d.e * d.r);
    let weighted = x.w.is_some();
    if weighted && how.summed {
        return Err(Error::invalid(OP, "weights go with per-slot codes only"));
    }
    let (src_rows, out_rows) = if how.summed { (t * k, t) } else { (t, t * k) };
    let mut spec = vec![
        (x.src, Kind::Any, src_rows * er),
        (x.ids, Kind::Index, t * k),
    ];
    if let Some(w) = x.w {
        spec.push((w, Kind::Adapter, t * k));
    }
    let o = operands(OP, &spec)?;
    let wide = o.base == DType::F64;
    if !how.dtype.is_float() || wide != (how.dtype == DType::F64) {
        return Err(Error::invalid(
            OP,
            format!("{} codes into {}", o.base, how.dtype),
        ));
    }
    let out = CudaStorage::alloc(&o.dev, OP, out_rows * er, how.dtype)?;
    if out_rows * er == 0 {
        return Ok(out);
    }
    let (src, ids) = (o.ptrs[0], o.ptrs[1]);
    let w = if weighted { o.ptrs[2] } else { 0 };
    let [t32, k32, e32, r32] = to_u32s(OP, [t, k, d.e, d.r])?;
    let (summed, scale, po) = (u32::from(how.summed), how.scale, out.ptr());
    let name = format!("{OP}_{}_{}", o.base, how.dtype);
    // SAFETY: src holds src_rows·E·r elements, ids and (when present) w T·k (checked above;
    // check_sizes keeps T·k·E·r within u32); each id < E (the op's top-k). The kernel reads
    // src[row·E·r + col] for row < src_rows, col < E·r, ids[p] and w[p] for p < T·k, and writes
    // each of the out_rows·E·r elements of `out` once, grid-stride; w = 0 (null) means none.
    unsafe {
        launch!(
            &o.dev,
            OP,
            MOE_FFN,
            name,
            CudaDevice::grid(out_rows * er),
            [t32, k32, e32, r32, summed, scale, src, ids, w, po]
        )
    }?;
    Ok(out)
}

/// The SwiGLU kernel `op` for `k` slots a token: the `_k2` build (per-slot arrays of 2, about
/// half the registers) for k ≤ 2, else the general one (k ≤ `MOE_MAX_K`).
fn swiglu_kernel(op: &str, k: usize, base: DType) -> String {
    if k <= 2 {
        format!("{op}_k2_{base}")
    } else {
        format!("{op}_{base}")
    }
}

pub(super) fn swiglu_forward(
    x: &SwigluForward<'_, CudaStorage>,
    d: &MoeDims,
) -> Result<(CudaStorage, CudaStorage)> {
    const OP: &str = "moe_swiglu_forward";
    check_sizes(OP, d)?;
    let (t, k, i) = (d.t, d.k, d.i);
    let o = operands(
        OP,
        &[
            (x.g, Kind::Rows, t * i),
            (x.u, Kind::Rows, t * i),
            (x.dg, Kind::Base, t * k * i),
            (x.du, Kind::Base, t * k * i),
            (x.w, Kind::Adapter, t * k),
        ],
    )?;
    let abar = CudaStorage::alloc(&o.dev, OP, t * i, o.base)?; // [T, I]
    let am = CudaStorage::alloc(&o.dev, OP, t * k * i, o.base)?; // [T·k, I]
    if t * i == 0 || k == 0 {
        return Ok((abar, am));
    }
    let [g, u, dg, du, w] = o.ptrs[..] else {
        return Err(Error::invalid(OP, "operand count"));
    };
    let (ldg, ldu) = (o.lds[0], o.lds[1]);
    let [t32, k32, i32_, t0] = to_u32s(OP, [t, k, i, d.t0])?;
    let (pdrop, keep, seed) = settings(d);
    let (pa, pm) = (abar.ptr(), am.ptr());
    let name = swiglu_kernel(OP, k, o.base);
    let key = o.dev.dropout_key_ptr();
    // SAFETY: G, U hold T rows of I elements at row strides ldg, ldu ≥ I; ΔG, ΔU T·k·I and w T·k
    // elements (checked above); k ≤ MOE_MAX_K (check_sizes); the outputs hold T·I and T·k·I
    // elements, each written once by the block of its row.
    // `key` is the device's 8-byte dropout key, owned by the device for its lifetime; read only.
    unsafe {
        launch!(
            &o.dev,
            OP,
            MOE_FFN,
            name,
            per_token(t),
            [t32, k32, i32_, t0, g, ldg, u, ldu, dg, du, w, pa, pm, pdrop, keep, seed, key]
        )
    }?;
    Ok((abar, am))
}

pub(super) fn swiglu_backward(
    x: &SwigluBackward<'_, CudaStorage>,
    d: &MoeDims,
) -> Result<SwigluGrads<CudaStorage>> {
    const OP: &str = "moe_swiglu_backward";
    check_sizes(OP, d)?;
    let (t, k, i) = (d.t, d.k, d.i);
    let o = operands(
        OP,
        &[
            (x.g, Kind::Rows, t * i),
            (x.u, Kind::Rows, t * i),
            (x.dg, Kind::Base, t * k * i),
            (x.du, Kind::Base, t * k * i),
            (x.dd, Kind::Base, t * k * i),
            (x.dabar, Kind::Base, t * i),
            (x.w, Kind::Adapter, t * k),
        ],
    )?;
    let dgu = CudaStorage::alloc(&o.dev, OP, t * 2 * i, o.base)?; // [T, 2I]
    let dg = CudaStorage::alloc(&o.dev, OP, t * k * i, o.base)?; // [T·k, I]
    let du = CudaStorage::alloc(&o.dev, OP, t * k * i, o.base)?; // [T·k, I]
    let am = CudaStorage::alloc(&o.dev, OP, t * k * i, o.base)?; // [T·k, I]
    let dw = CudaStorage::alloc(&o.dev, OP, t * k, o.adapter)?; // [T, k]
    if t == 0 || k == 0 {
        return Ok(SwigluGrads {
            dgu,
            dg,
            du,
            am,
            dw,
        });
    }
    let [g, u, lg, lu, ld, dabar, w] = o.ptrs[..] else {
        return Err(Error::invalid(OP, "operand count"));
    };
    let (ldg, ldu) = (o.lds[0], o.lds[1]);
    let [t32, k32, i32_, t0] = to_u32s(OP, [t, k, i, d.t0])?;
    let (pdrop, keep, seed) = settings(d);
    let (pgu, pg, pu, pm, pw) = (dgu.ptr(), dg.ptr(), du.ptr(), am.ptr(), dw.ptr());
    let name = swiglu_kernel(OP, k, o.base);
    let key = o.dev.dropout_key_ptr();
    // SAFETY: G, U hold T rows of I elements at row strides ldg, ldu ≥ I; ΔG, ΔU, ΔD T·k·I, dĀ
    // T·I and w T·k elements (checked above); k ≤ MOE_MAX_K (check_sizes); the outputs hold
    // T·2I, 3 × T·k·I and T·k elements, each written once by the block of its row; 256 threads
    // per block (the block reduction of dw needs a multiple of 32).
    // `key` is the device's 8-byte dropout key, owned by the device for its lifetime; read only.
    unsafe {
        launch!(
            &o.dev,
            OP,
            MOE_FFN,
            name,
            per_token(t),
            [
                t32, k32, i32_, t0, g, ldg, u, ldu, lg, lu, ld, dabar, w, pgu, pg, pu, pm, pw,
                pdrop, keep, seed, key
            ]
        )
    }?;
    Ok(SwigluGrads {
        dgu,
        dg,
        du,
        am,
        dw,
    })
}
