//! The LoRA unit's backend primitives: their named operands and their dispatch to the CPU
//! reference (`cpu.rs`) or the CUDA launchers (`cuda*.rs`).
//!
//! Shapes: `x` `[M, in]` and `y`, `g` `[M, out]` are rank-2 views of any float dtype (the base);
//! `a` `[r, in]`, `b` `[out, r]`, `z`, `dz` `[M, r]` share one adapter dtype (f32, or f64 under
//! an f64 base: [`DType::accumulation`]) and the maths runs in it. `drop(x)[m, i] = x[m, i] ·
//! mask(m·in + i)` with the mask of `dropout_mask(p, seed)` in the adapter dtype over x's row-major
//! `[M, in]` (no mask when `p == 0`).

use super::cpu;
#[cfg(feature = "cuda")]
use super::{cuda, cuda_wide};
use crate::backend::checks::dims2;
use crate::backend::cpu::dropout::keyed;
use crate::backend::{BackendStorage, BinaryOp};
use crate::fused::{on_backend, operands};
use crate::{DType, Error, Layout, Result, Storage};

operands! {
    /// `z = drop(x) Aᵀ` `[M, r]` in A's dtype.
    pub struct Codes {
        x: Operand, // [M, in] base
        a: Operand, // [r, in] adapter
    }
}

operands! {
    /// `y + s · z Bᵀ` `[M, out]` in y's dtype.
    pub struct ExpandAdd {
        y: Operand, // [M, out] base
        z: Operand, // [M, r] adapter
        b: Operand, // [out, r] adapter
    }
}

operands! {
    /// `(dz, dB) = (s · g B, s · gᵀ z)` (`[M, r]`, `[out, r]`, adapter dtype).
    pub struct GradCodes {
        g: Operand, // [M, out] base
        z: Operand, // [M, r] adapter
        b: Operand, // [out, r] adapter
    }
}

operands! {
    /// `dA = dzᵀ drop(x)` `[r, in]` in dz's dtype.
    pub struct GradA {
        x: Operand,  // [M, in] base
        dz: Operand, // [M, r] adapter
    }
}

operands! {
    /// `dx = mask ⊙ (dz A)` `[M, in]` in a given dtype.
    pub struct GradX {
        dz: Operand, // [M, r] adapter
        a: Operand,  // [r, in] adapter
    }
}

operands! {
    /// `base + mask ⊙ (dz A)` `[M, in]` in base's dtype: [`GradX`] added to the rest of x's
    /// gradient (`linear_lora`'s `g W`).
    pub struct GradXAdd {
        dz: Operand,   // [M, r] adapter
        a: Operand,    // [r, in] adapter
        base: Operand, // [M, in] base
    }
}

operands! {
    /// A product with dropout on one side, `drop(lhs) · rhs` or `lhs · drop(rhs)`
    /// (`[1, m, k] x [1, k, n]` as in `BackendStorage::matmul`), in lhs's accumulation dtype.
    pub struct Product {
        lhs: Operand, // [1, m, k]
        rhs: Operand, // [1, k, n]
    }
}

operands! {
    /// `base + drop(a) + drop(b)`, all of one shape and dtype.
    pub struct AddDropped2 {
        base: Operand,
        a: Operand,
        b: Operand,
    }
}

// The dropout key ([`crate::set_dropout_key`]): the CPU branches below key their seed here, on
// the calling thread, once (`cpu.rs` takes it as given); the CUDA kernels read the key
// themselves. The composed paths key inside `dropout_apply` on either backend.

pub fn codes(o: Codes<'_, Storage>, p: f64, seed: u64) -> Result<Storage> {
    on_backend!("lora_codes", o, o => cpu::codes(o, p, keyed(seed)), cuda::codes(o, p, seed))
}

pub fn expand_add(o: ExpandAdd<'_, Storage>, scale: f64) -> Result<Storage> {
    on_backend!("lora_expand_add", o, o => cpu::expand_add(o, scale), cuda::expand_add(o, scale))
}

pub fn grad_codes(o: GradCodes<'_, Storage>, scale: f64) -> Result<(Storage, Storage)> {
    on_backend!("lora_grad_codes", o, o => cpu::grad_codes(o, scale), cuda::grad_codes(o, scale))
}

pub fn grad_a(o: GradA<'_, Storage>, p: f64, seed: u64) -> Result<Storage> {
    on_backend!("lora_grad_a", o, o => cpu::grad_a(o, p, keyed(seed)), cuda::grad_a(o, p, seed))
}

pub fn grad_x(o: GradX<'_, Storage>, p: f64, seed: u64, dtype: DType) -> Result<Storage> {
    on_backend!(
        "lora_grad_x",
        o,
        o => cpu::grad_x(o, p, keyed(seed), dtype),
        cuda::grad_x(o, p, seed, dtype)
    )
}

/// On the CPU the two steps ([`grad_x`], then an add); on the GPU one pass where it applies
/// (rounded once).
pub fn grad_x_add(o: GradXAdd<'_, Storage>, p: f64, seed: u64) -> Result<Storage> {
    on_backend!(
        "lora_grad_x_add",
        o,
        o => {
            let (m, n) = (o.dz.l.dims()[0], o.a.l.dims()[1]);
            let (gx, seed) = (GradX { dz: o.dz, a: o.a }, keyed(seed));
            let dx = cpu::grad_x(gx, p, seed, o.base.s.dtype())?;
            o.base.s.binary(o.base.l, &dx, &Layout::contiguous([m, n]), BinaryOp::Add)
        },
        cuda::grad_x_add(o, p, seed)
    )
}

/// Which side of a [`Product`] the dropout applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropSide {
    Lhs,
    Rhs,
}

/// `drop(lhs) · rhs` or `lhs · drop(rhs)` in lhs's accumulation dtype: the product of the dropped
/// copy rounded to lhs's dtype on the CPU (the separate ops); on the GPU, for a bf16 `x` against
/// a wide operand (all experts' LoRA-A at once), one tensor-core pass over `x` with the mask drawn
/// on the fly, summed in f32.
pub fn dropped_product(
    o: Product<'_, Storage>,
    p: f64,
    seed: u64,
    side: DropSide,
) -> Result<Storage> {
    on_backend!(
        "dropped_product",
        o,
        o => dropped_product_composed(o.lhs.s, o.lhs.l, o.rhs.s, o.rhs.l, (p, seed), side),
        match cuda_wide::dropped_product(&o, p, seed, side)? {
            Some(y) => Ok(y),
            None => dropped_product_composed(o.lhs.s, o.lhs.l, o.rhs.s, o.rhs.l, (p, seed), side),
        }
    )
}

/// `base + drop(a) + drop(b)` in their dtype, each step rounded as the separate ops (dropout,
/// add, dropout, add) round it: those ops on the CPU, one pass on the GPU for bf16.
pub fn add_dropped2(o: AddDropped2<'_, Storage>, p: f64, seeds: (u64, u64)) -> Result<Storage> {
    on_backend!(
        "add_dropped2",
        o,
        o => add_dropped2_composed(&o, p, seeds),
        match cuda_wide::add_dropped2(&o, p, seeds)? {
            Some(y) => Ok(y),
            None => add_dropped2_composed(&o, p, seeds),
        }
    )
}

/// [`dropped_product`] as separate ops: the dropped copy, the product in x's dtype, its
/// conversion to the accumulation dtype.
fn dropped_product_composed<S: BackendStorage>(
    x: &S,
    l: &Layout,
    rhs: &S,
    rhs_l: &Layout,
    (p, seed): (f64, u64),
    side: DropSide,
) -> Result<S> {
    let y = if p == 0.0 {
        x.matmul(l, rhs, rhs_l)?
    } else if side == DropSide::Rhs {
        let d = rhs.dropout_apply(rhs_l, p, seed)?; // [1, k, n] contiguous
        x.matmul(l, &d, &Layout::contiguous(rhs_l.dims().to_vec()))?
    } else {
        let d = x.dropout_apply(l, p, seed)?; // [1, m, k] contiguous
        d.matmul(&Layout::contiguous(l.dims().to_vec()), rhs, rhs_l)?
    };
    let acc = x.dtype().accumulation();
    if y.dtype() == acc {
        return Ok(y); // an f32 or f64 product: already in its accumulation dtype
    }
    y.to_dtype(&Layout::contiguous([l.dims()[1], rhs_l.dims()[2]]), acc)
}

/// [`add_dropped2`] as the separate ops.
fn add_dropped2_composed<S: BackendStorage>(
    o: &AddDropped2<'_, S>,
    p: f64,
    seeds: (u64, u64),
) -> Result<S> {
    let (base, l) = (o.base.s, o.base.l);
    let c = Layout::contiguous(l.dims().to_vec());
    if p == 0.0 {
        return base.binary(l, o.a.s, o.a.l, BinaryOp::Add)?.binary(
            &c,
            o.b.s,
            o.b.l,
            BinaryOp::Add,
        );
    }
    let da = o.a.s.dropout_apply(o.a.l, p, seeds.0)?; // contiguous
    let s1 = base.binary(l, &da, &c, BinaryOp::Add)?;
    let db = o.b.s.dropout_apply(o.b.l, p, seeds.1)?;
    s1.binary(&c, &db, &c, BinaryOp::Add)
}

// ----- checks shared by the backends ---------------------------------------------------------

/// Errors unless `dims2(l) == want`.
pub(super) fn expect_dims(
    op: &'static str,
    l: &Layout,
    want: (usize, usize),
    other: &Layout,
) -> Result<()> {
    if dims2(op, l)? != want {
        return Err(Error::ShapeMismatch {
            op,
            lhs: other.shape().clone(),
            rhs: l.shape().clone(),
        });
    }
    Ok(())
}

/// Checks the dropout probability; `Some(keep = 1/(1-p))` when a mask applies.
pub(super) fn keep_of(op: &'static str, p: f64) -> Result<Option<f64>> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid(
            op,
            format!("dropout probability {p} is not in [0, 1)"),
        ));
    }
    Ok((p > 0.0).then(|| 1.0 / (1.0 - p)))
}
