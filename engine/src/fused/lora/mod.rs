//! The LoRA projection unit: `y + s · (drop(x) Aᵀ) Bᵀ` as one autograd op that keeps only the
//! rank-r codes ([`Tensor::lora_add`], [`Tensor::linear_lora`]), and the products of a dropped
//! input with many adapters' LoRA-A at once that the MixLoRA FFN runs on ([`dropped_codes`],
//! [`dropped_grad_a`], [`add_dropped2`]).
//!
//! Files: the primitives' named operands and dispatch (`primitives.rs`), the CPU reference
//! (`cpu.rs`), the CUDA launchers (`cuda.rs`: cuBLAS and elementwise kernels in general;
//! `cuda_rank.rs` and `cuda_mma.rs`: custom kernels for a bf16 base at r = 8 and 16;
//! `cuda_wide.rs`: the wide products), over the kernels of `kernels/src/lora.cu`,
//! `lora_mma.cu` and `lora_wide.cu`.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod cuda_mma;
#[cfg(feature = "cuda")]
mod cuda_rank;
#[cfg(feature = "cuda")]
mod cuda_wide;
pub mod primitives;

use self::primitives as prim;
use crate::autograd::{Input, NoGradGuard, Node, Output};
use crate::fused::read;
use crate::ops::{float_only, same_device, same_dtype};
use crate::{DType, Error, Result, Tensor};

impl Tensor {
    /// `self + scale · (drop(x) Aᵀ) Bᵀ` in `self`'s dtype, the maths in the adapter dtype.
    ///
    /// `self` is the base output `y = x Wᵀ` `[.., out]`; `x` `[.., in]` has `y`'s dtype and leading
    /// dims; `a` `[r, in]` and `b` `[out, r]` share the adapter dtype (f32, or f64). `dropout =
    /// Some((p, seed))` applies exactly the mask `x.to_dtype(adapter).dropout(p, seed, true)`
    /// would (element `m·in + i` of the row-major `[M, in]`); the mask is never stored: the
    /// backward recomputes it from `(seed, index)`.
    ///
    /// Forward: `z = drop(x) Aᵀ` `[M, r]` (`lora_codes`), then `y + s · z Bᵀ`
    /// (`lora_expand_add`, one pass over `y`). The tape keeps `x` (for `dA`; the base matmul
    /// keeps it too when `W` trains: one shared buffer), `a`, `b` and the unscaled codes `z`; `y`
    /// only as a graph-only reference (its gradient is `g`, its values are never read): no f32
    /// copy of `x`, no mask, no `[M, out]` f32 delta. Per token and projection, beyond `x`, that
    /// is `4r` bytes (`z`) where the composite kept `12·in + 8·out + 8r` (f32 `x`, the mask, the
    /// dropped `x`, the f32 and bf16 deltas, `y`, the codes twice).
    ///
    /// Backward, with `g = dL/d(out)`:
    /// `dy = g`; `dz = s · g B` and `dB = s · gᵀ z` (`lora_grad_codes`);
    /// `dA = dzᵀ drop(x)` (`lora_grad_a`); `dx = mask ⊙ (dz A)` in x's dtype (`lora_grad_x`).
    pub fn lora_add(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        scale: f64,
        dropout: Option<(f64, u64)>,
    ) -> Result<Tensor> {
        const OP: &str = "lora_add";
        let (p, seed) = check_lora(OP, self, x, a, b, dropout)?;
        let yr = self.rank();
        if yr != 2 {
            // Fold the leading dims into rows: [.., in] -> [M, in], [.., out] -> [M, out].
            let (m, n_in, n_out) = fold(self, x);
            let out =
                self.reshape([m, n_out])?
                    .lora_add(&x.reshape([m, n_in])?, a, b, scale, dropout)?;
            return out.reshape(self.shape().clone());
        }
        let (s, z) = lora_forward(self, x, a, b, scale, p, seed)?;
        let codes = z.clone();
        // `y` is never read (its gradient is `g`); `x` only for `dA`, `A` only for `dx`.
        let inputs = [
            Input::GraphOnly(self),
            Input::keep_if(x, a.tracks_grad()),
            Input::keep_if(a, x.tracks_grad()),
            Input::Keep(b),
        ];
        let node = Node::record_with(OP, &inputs, Output::Unread, move |inp, _, g| {
            let (y, x, a, b) = (&inp[0], &inp[1], &inp[2], &inp[3]);
            let dy = y.tracks_grad().then(|| g.clone());
            let (dx, da, db) = lora_backward(g, x, a, b, &z, scale, p, seed, None)?;
            Ok(vec![dy, dx, da, db])
        })
        .map(|n| n.capturing(&[&codes]));
        Ok(Tensor::from_storage(s, self.shape().clone(), node))
    }

    /// `x Wᵀ + scale · (drop(x) Aᵀ) Bᵀ` for `self` = `x` `[.., in]` and a weight `w` `[out, in]`
    /// of `x`'s dtype: [`Tensor::lora_add`] with the base matmul inside the op, so the base
    /// output `x Wᵀ` is a temporary, never on the tape, and one node stands for both ops. The
    /// tape keeps `x` when `A` or `W` trains, `W` and `A` when `x` needs a gradient, `B` and the
    /// rank-r codes. The same values and gradients: `dx = g W + drop'(s·(g B) A)`, `dW = gᵀ x`
    /// when `w` needs one, the LoRA gradients as in [`Tensor::lora_add`].
    pub fn linear_lora(
        &self,
        w: &Tensor,
        a: &Tensor,
        b: &Tensor,
        scale: f64,
        dropout: Option<(f64, u64)>,
    ) -> Result<Tensor> {
        const OP: &str = "linear_lora";
        let x = self;
        same_dtype(OP, x, w)?;
        same_device(OP, x, w)?;
        let xr = x.rank();
        if xr == 0 || w.rank() != 2 || w.dims()[1] != x.dims()[xr - 1] {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: x.shape().clone(),
                rhs: w.shape().clone(),
            });
        }
        if xr != 2 {
            let n_in = x.dims()[xr - 1];
            let m: usize = x.dims()[..xr - 1].iter().product();
            let out = x.reshape([m, n_in])?.linear_lora(w, a, b, scale, dropout)?;
            let mut dims = x.dims().to_vec();
            dims[xr - 1] = w.dims()[0];
            return out.reshape(dims);
        }
        let y = {
            let _ng = NoGradGuard::new();
            x.matmul(&w.t()?)? // [M, out], no node: a temporary
        };
        let (p, seed) = check_lora(OP, &y, x, a, b, dropout)?;
        let (s, z) = lora_forward(&y, x, a, b, scale, p, seed)?;
        let shape = y.shape().clone();
        drop(y);
        let codes = z.clone();
        // `x` is read only for `dA` and `dW`; `W` and `A` only for `dx`.
        let inputs = [
            Input::keep_if(x, a.tracks_grad() || w.tracks_grad()),
            Input::keep_if(w, x.tracks_grad()),
            Input::keep_if(a, x.tracks_grad()),
            Input::Keep(b),
        ];
        let node = Node::record_with(OP, &inputs, Output::Unread, move |inp, _, g| {
            let (x, w, a, b) = (&inp[0], &inp[1], &inp[2], &inp[3]);
            // dx = g W + drop'(s·(g B) A): the LoRA term added onto the base term in one pass.
            let dx_base = x.tracks_grad().then(|| g.matmul(w)).transpose()?; // [M, out] [out, in]
            let (dx, da, db) = lora_backward(g, x, a, b, &z, scale, p, seed, dx_base)?;
            let dw = w.tracks_grad().then(|| g.t()?.matmul(x)).transpose()?; // [out, in]
            Ok(vec![dx, dw, da, db])
        })
        .map(|n| n.capturing(&[&codes]));
        Ok(Tensor::from_storage(s, shape, node))
    }
}

/// `(M, in, out)` of `y` `[.., out]` and `x` `[.., in]` with the leading dims folded into rows.
fn fold(y: &Tensor, x: &Tensor) -> (usize, usize, usize) {
    let yr = y.rank();
    let m: usize = y.dims()[..yr - 1].iter().product();
    (m, x.dims()[x.rank() - 1], y.dims()[yr - 1])
}

/// The checks of the fused LoRA ops on `y` `[.., out]`, `x` `[.., in]`, `a` `[r, in]`, `b`
/// `[out, r]`; returns the dropout `(p, seed)` (`(0, 0)` without).
fn check_lora(
    op: &'static str,
    y: &Tensor,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    dropout: Option<(f64, u64)>,
) -> Result<(f64, u64)> {
    float_only(op, y)?;
    same_dtype(op, y, x)?;
    same_dtype(op, a, b)?;
    for t in [x, a, b] {
        same_device(op, y, t)?;
    }
    if !matches!(a.dtype(), DType::F32 | DType::F64) {
        return Err(Error::UnsupportedDType {
            op,
            dtype: a.dtype(),
        });
    }
    let (p, seed) = dropout.unwrap_or((0.0, 0));
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid(
            op,
            format!("dropout probability {p} is not in [0, 1)"),
        ));
    }
    let bad = |lhs: &Tensor, rhs: &Tensor| Error::ShapeMismatch {
        op,
        lhs: lhs.shape().clone(),
        rhs: rhs.shape().clone(),
    };
    let (yr, xr) = (y.rank(), x.rank());
    if yr == 0 || xr != yr || y.dims()[..yr - 1] != x.dims()[..xr - 1] {
        return Err(bad(y, x));
    }
    let (n_out, n_in) = (y.dims()[yr - 1], x.dims()[xr - 1]);
    if a.rank() != 2 || a.dims()[1] != n_in {
        return Err(bad(x, a));
    }
    let r = a.dims()[0];
    if b.dims() != [n_out, r] {
        return Err(bad(y, b));
    }
    Ok((p, seed))
}

/// The forward on 2-D operands: `(y + s·z Bᵀ` in `y`'s dtype, the unscaled codes `z = drop(x)
/// Aᵀ` `[M, r]` in the adapter dtype`)`.
fn lora_forward(
    y: &Tensor,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    p: f64,
    seed: u64,
) -> Result<(crate::Storage, Tensor)> {
    let r = a.dims()[0];
    let z = read([x, a], |[x, a]| prim::codes(prim::Codes { x, a }, p, seed))?; // [M, r], adapter
    let z = Tensor::from_storage(z, [x.dims()[0], r], None);
    let s = read([y, &z, b], |[y, z, b]| {
        prim::expand_add(prim::ExpandAdd { y, z, b }, scale)
    })?; // [M, out], y's dtype
    Ok((s, z))
}

/// The LoRA part of the backward for the output gradient `g` `[M, out]`: `(dx = drop'(dz A)` in
/// x's dtype, `dA = dzᵀ drop(x)`, `dB = s·gᵀ z)` with `dz = s·g B`, each when needed; with
/// `dx_base` (the rest of x's gradient) `dx` is `dx_base + drop'(dz A)` in its dtype.
#[allow(clippy::too_many_arguments)]
fn lora_backward(
    g: &Tensor,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    z: &Tensor,
    scale: f64,
    p: f64,
    seed: u64,
    dx_base: Option<Tensor>,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    if !(x.tracks_grad() || a.tracks_grad() || b.tracks_grad()) {
        return Ok((None, None, None));
    }
    let (dz, db) = read([g, z, b], |[g, z, b]| {
        prim::grad_codes(prim::GradCodes { g, z, b }, scale)
    })?; // [M, r], [out, r]
    let dz = Tensor::from_storage(dz, z.shape().clone(), None);
    let db = b
        .tracks_grad()
        .then(|| Tensor::from_storage(db, b.shape().clone(), None));
    let da = if a.tracks_grad() {
        let da = read([x, &dz], |[x, dz]| {
            prim::grad_a(prim::GradA { x, dz }, p, seed)
        })?; // [r, in]
        Some(Tensor::from_storage(da, a.shape().clone(), None))
    } else {
        None
    };
    let dx = if x.tracks_grad() {
        let dx = match &dx_base {
            // [M, in] in base's dtype: the rest of x's gradient plus this term, in one pass.
            Some(base) => read([&dz, a, base], |[dz, a, base]| {
                prim::grad_x_add(prim::GradXAdd { dz, a, base }, p, seed)
            })?,
            // [M, in], x's dtype
            None => read([&dz, a], |[dz, a]| {
                prim::grad_x(prim::GradX { dz, a }, p, seed, x.dtype())
            })?,
        };
        Some(Tensor::from_storage(dx, x.shape().clone(), None))
    } else {
        None
    };
    Ok((dx, da, db))
}

/// `drop(x) · Aᵀ` `[T, n]` in the accumulation dtype of x's, for `x` `[T, H]` and `a` `[n, H]` in
/// x's dtype (many adapters' LoRA-A stacked, e.g. every MixLoRA expert's): on the GPU one
/// tensor-core pass over x for bf16, the mask drawn on the fly. No node: the caller's own backward
/// covers it.
pub(crate) fn dropped_codes(x: &Tensor, a: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    let (x3, a3) = (x.unsqueeze(0)?, a.t()?.unsqueeze(0)?); // [1, T, H], [1, H, n]
    let s = read([&x3, &a3], |[lhs, rhs]| {
        prim::dropped_product(prim::Product { lhs, rhs }, p, seed, prim::DropSide::Lhs)
    })?;
    Ok(Tensor::from_storage(s, [x.dims()[0], a.dims()[0]], None))
}

/// `dzᵀ · drop(x)` `[n, H]` in the accumulation dtype of x's, for `dz` `[T, n]` and `x` `[T, H]`
/// in x's dtype: the LoRA-A gradient of [`dropped_codes`]. No node.
pub(crate) fn dropped_grad_a(dz: &Tensor, x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    let (d3, x3) = (dz.t()?.unsqueeze(0)?, x.unsqueeze(0)?); // [1, n, T], [1, T, H]
    let s = read([&d3, &x3], |[lhs, rhs]| {
        prim::dropped_product(prim::Product { lhs, rhs }, p, seed, prim::DropSide::Rhs)
    })?;
    Ok(Tensor::from_storage(s, [dz.dims()[1], x.dims()[1]], None))
}

/// `base + a.dropout(p, seed_a) + b.dropout(p, seed_b)` (one shape, one dtype), bit for bit as
/// those ops: on the GPU one pass where the separate ops take four. No node.
pub(crate) fn add_dropped2(
    base: &Tensor,
    a: &Tensor,
    b: &Tensor,
    p: f64,
    seeds: (u64, u64),
) -> Result<Tensor> {
    let s = read([base, a, b], |[base, a, b]| {
        prim::add_dropped2(prim::AddDropped2 { base, a, b }, p, seeds)
    })?;
    Ok(Tensor::from_storage(s, base.shape().clone(), None))
}

/// [`Tensor::matmul_cast`] on the LoRA primitives: `x` `[M, K]`, `rhs` `[K, N]` in x's
/// accumulation dtype (`rhsᵀ` as the `A` of rank N, no dropout).
pub(crate) fn matmul_cast_rank(x: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    const OP: &str = "matmul_cast";
    same_device(OP, x, rhs)?;
    let (m, k, n) = (x.dims()[0], x.dims()[1], rhs.dims()[1]);
    if rhs.dims()[0] != k {
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs: x.shape().clone(),
            rhs: rhs.shape().clone(),
        });
    }
    let a = rhs.t()?; // [N, K]: the rank-N "A" of x Aᵀ
    let out = read([x, &a], |[x, a]| prim::codes(prim::Codes { x, a }, 0.0, 0))?; // [M, N]
    let inputs = [
        Input::keep_if(x, rhs.tracks_grad()),
        Input::keep_if(rhs, x.tracks_grad()),
    ];
    let node = Node::record_with(OP, &inputs, Output::Unread, move |inp, _, g| {
        let (x, w) = (&inp[0], &inp[1]);
        let g = g.contiguous()?; // [M, N], rhs's dtype
        let dx = x
            .tracks_grad()
            .then(|| -> Result<Tensor> {
                let a = w.t()?; // [N, K]
                let s = read([&g, &a], |[dz, a]| {
                    prim::grad_x(prim::GradX { dz, a }, 0.0, 0, x.dtype())
                })?;
                Ok(Tensor::from_storage(s, [m, k], None)) // g rhsᵀ in x's dtype
            })
            .transpose()?;
        let dw = w
            .tracks_grad()
            .then(|| -> Result<Tensor> {
                let s = read([x, &g], |[x, dz]| {
                    prim::grad_a(prim::GradA { x, dz }, 0.0, 0)
                })?;
                Tensor::from_storage(s, [n, k], None).t() // (gᵀ x)ᵀ = xᵀ g [K, N]
            })
            .transpose()?;
        Ok(vec![dx, dw])
    });
    let out = Tensor::from_storage(out, [m, n], None);
    Ok(match node {
        Some(node) => out.view(out.layout().clone(), Some(node)),
        None => out,
    })
}
