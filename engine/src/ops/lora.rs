//! Fused LoRA: `y + s · (drop(x) Aᵀ) Bᵀ` as one autograd op that keeps only the rank-r codes.

use super::{float_only, same_device, same_dtype};
use crate::autograd::{Input, NoGradGuard, Node, Output};
use crate::backend::BackendStorage;
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
    let z = x
        .storage()
        .lora_codes(x.layout(), &a.storage(), a.layout(), p, seed)?; // [M, r], adapter dtype
    let z = Tensor::from_storage(z, [x.dims()[0], r], None);
    let s = y.storage().lora_expand_add(
        y.layout(),
        &z.storage(),
        z.layout(),
        &b.storage(),
        b.layout(),
        scale,
    )?; // [M, out], y's dtype
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
    let (dz, db) = g.storage().lora_grad_codes(
        g.layout(),
        &z.storage(),
        z.layout(),
        &b.storage(),
        b.layout(),
        scale,
    )?; // [M, r], [out, r]
    let dz = Tensor::from_storage(dz, z.shape().clone(), None);
    let db = b
        .tracks_grad()
        .then(|| Tensor::from_storage(db, b.shape().clone(), None));
    let da = if a.tracks_grad() {
        let da = x
            .storage()
            .lora_grad_a(x.layout(), &dz.storage(), dz.layout(), p, seed)?; // [r, in]
        Some(Tensor::from_storage(da, a.shape().clone(), None))
    } else {
        None
    };
    let dx = if x.tracks_grad() {
        let (ds, al) = (dz.storage(), a.layout());
        let dx = match &dx_base {
            // [M, in] in base's dtype: the rest of x's gradient plus this term, in one pass.
            Some(base) => ds.lora_grad_x_add(
                dz.layout(),
                &a.storage(),
                al,
                p,
                seed,
                &base.storage(),
                base.layout(),
            )?,
            None => ds.lora_grad_x(dz.layout(), &a.storage(), al, p, seed, x.dtype())?, // [M, in], x's dtype
        };
        Some(Tensor::from_storage(dx, x.shape().clone(), None))
    } else {
        None
    };
    Ok((dx, da, db))
}
