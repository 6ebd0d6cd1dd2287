//! Fused LoRA: `y + s · (drop(x) Aᵀ) Bᵀ` as one autograd op that keeps only the rank-r codes.

use super::{float_only, same_device, same_dtype};
use crate::autograd::Node;
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
    /// (`lora_expand_add`, one pass over `y`). The tape keeps `x` (the base matmul keeps it too:
    /// one shared buffer), `y`, `a`, `b` and the unscaled codes `z`: no f32 copy of `x`, no mask,
    /// no `[M, out]` f32 delta. Per token and projection, beyond `x`, that is `2·out + 4r` bytes
    /// on a bf16 base (`y`, `z`) where the composite kept `12·in + 8·out + 8r` (f32 `x`, the mask,
    /// the dropped `x`, the f32 and bf16 deltas, `y`, the codes twice): at in = out = 4096,
    /// r = 16, 8.3 KB instead of 82 KB.
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
        float_only(OP, self)?;
        same_dtype(OP, self, x)?;
        same_dtype(OP, a, b)?;
        for t in [x, a, b] {
            same_device(OP, self, t)?;
        }
        if !matches!(a.dtype(), DType::F32 | DType::F64) {
            return Err(Error::UnsupportedDType {
                op: OP,
                dtype: a.dtype(),
            });
        }
        let (p, seed) = dropout.unwrap_or((0.0, 0));
        if !(0.0..1.0).contains(&p) {
            return Err(Error::invalid(
                OP,
                format!("dropout probability {p} is not in [0, 1)"),
            ));
        }
        let bad = |lhs: &Tensor, rhs: &Tensor| Error::ShapeMismatch {
            op: OP,
            lhs: lhs.shape().clone(),
            rhs: rhs.shape().clone(),
        };
        let (yr, xr) = (self.rank(), x.rank());
        if yr == 0 || xr != yr || self.dims()[..yr - 1] != x.dims()[..xr - 1] {
            return Err(bad(self, x));
        }
        let (n_out, n_in) = (self.dims()[yr - 1], x.dims()[xr - 1]);
        if a.rank() != 2 || a.dims()[1] != n_in {
            return Err(bad(x, a));
        }
        let r = a.dims()[0];
        if b.dims() != [n_out, r] {
            return Err(bad(self, b));
        }
        if yr != 2 {
            // Fold the leading dims into rows: [.., in] -> [M, in], [.., out] -> [M, out].
            let m: usize = self.dims()[..yr - 1].iter().product();
            let out =
                self.reshape([m, n_out])?
                    .lora_add(&x.reshape([m, n_in])?, a, b, scale, dropout)?;
            return out.reshape(self.shape().clone());
        }
        let z = x
            .storage()
            .lora_codes(x.layout(), &a.storage(), a.layout(), p, seed)?; // [M, r], adapter dtype
        let z = Tensor::from_storage(z, [x.dims()[0], r], None);
        let s = self.storage().lora_expand_add(
            self.layout(),
            &z.storage(),
            z.layout(),
            &b.storage(),
            b.layout(),
            scale,
        )?; // [M, out], y's dtype
        let node = Node::record(OP, &[self, x, a, b], move |inp, _, g| {
            let (y, x, a, b) = (&inp[0], &inp[1], &inp[2], &inp[3]);
            let dy = y.tracks_grad().then(|| g.clone());
            if !(x.tracks_grad() || a.tracks_grad() || b.tracks_grad()) {
                return Ok(vec![dy, None, None, None]);
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
                let da =
                    x.storage()
                        .lora_grad_a(x.layout(), &dz.storage(), dz.layout(), p, seed)?; // [r, in]
                Some(Tensor::from_storage(da, a.shape().clone(), None))
            } else {
                None
            };
            let dx = if x.tracks_grad() {
                let dx = dz.storage().lora_grad_x(
                    dz.layout(),
                    &a.storage(),
                    a.layout(),
                    p,
                    seed,
                    x.dtype(),
                )?; // [M, in], x's dtype
                Some(Tensor::from_storage(dx, x.shape().clone(), None))
            } else {
                None
            };
            Ok(vec![dy, dx, da, db])
        });
        Ok(Tensor::from_storage(s, self.shape().clone(), node))
    }
}
