//! Rotary position embedding (Hugging Face half-rotation layout) and its cos / sin tables.

use super::{float_only, same_device, same_dtype, u32_only};
use crate::autograd::{Input, Node, Output};
use crate::backend::BackendStorage;
use crate::{DType, Device, Error, Result, Shape, Tensor};

impl Tensor {
    /// Rotates pairs `(x[i], x[i + d/2])` of `x: [b, h, t, d]` (any strides) by the angles whose
    /// cosines and sines are `cos`, `sin`: `[b or 1, t, d/2]` (see [`rope_tables`]):
    /// `out[i] = x[i] cos − x[i+d/2] sin`, `out[i+d/2] = x[i+d/2] cos + x[i] sin`.
    ///
    /// Backward: each pair goes through a rotation matrix `R(θ)`, whose transpose is `R(−θ)`, so
    /// `dx = rope(g, cos, −sin)`. The tables get no gradient. The tape keeps the tables, not `x`.
    pub fn rope(&self, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        same_dtype("rope", self, cos)?;
        same_dtype("rope", self, sin)?;
        same_device("rope", self, cos)?;
        same_device("rope", self, sin)?;
        float_only("rope", self)?;
        if self.rank() != 4 {
            return Err(Error::RankMismatch {
                op: "rope",
                expected: 4,
                shape: self.shape().clone(),
            });
        }
        let (b, t, d) = (self.dims()[0], self.dims()[2], self.dims()[3]);
        if d % 2 != 0 {
            return Err(Error::invalid(
                "rope",
                format!("head dim {d} of {} is odd", self.shape()),
            ));
        }
        for tab in [cos, sin] {
            let c = tab.dims();
            if c.len() != 3 || !(c[0] == 1 || c[0] == b) || c[1] != t || c[2] != d / 2 {
                return Err(Error::ShapeMismatch {
                    op: "rope",
                    lhs: self.shape().clone(),
                    rhs: tab.shape().clone(),
                });
            }
        }
        if cos.shape() != sin.shape() {
            return Err(Error::ShapeMismatch {
                op: "rope",
                lhs: cos.shape().clone(),
                rhs: sin.shape().clone(),
            });
        }
        let node = if self.tracks_grad() && crate::grad_enabled() {
            // The backward tables, built only when the op is recorded.
            let (cos, neg_sin) = (cos.detach(), sin.detach().neg()?);
            let tables = [cos.clone(), neg_sin.clone()];
            // x laid out [b, t, h, d] in memory (the heads of a projection's output viewed as
            // [b, h, t, d]): dx is written in that order too, so that it reaches the projection
            // as a view, not as a copy.
            let (dims, st) = (self.dims(), self.layout().strides());
            let seq_outer = dims[1] > 1 && dims[2] > 1 && st[2] > st[1];
            Node::record_with(
                "rope",
                &[Input::GraphOnly(self)],
                Output::Unread,
                move |_, _, g| {
                    let dx = if seq_outer {
                        g.transpose(1, 2)?
                            .rope_along(&cos, &neg_sin, 1)?
                            .transpose(1, 2)?
                    } else {
                        g.rope_along(&cos, &neg_sin, 2)?
                    };
                    Ok(vec![Some(dx)])
                },
            )
            .map(|n| n.capturing(&[&tables[0], &tables[1]]))
        } else {
            None
        };
        let y = self.rope_along(cos, sin, 2)?;
        Ok(y.view(y.layout().clone(), node))
    }

    /// The rotation of `self` `[b, n1, n2, d]` whose positions run along dim `seq_dim` (1 or 2),
    /// contiguous, recording nothing (the backend checks the shapes).
    fn rope_along(&self, cos: &Tensor, sin: &Tensor, seq_dim: usize) -> Result<Tensor> {
        let s = self.storage().rope(
            self.layout(),
            &cos.storage(),
            cos.layout(),
            &sin.storage(),
            sin.layout(),
            seq_dim,
        )?;
        Ok(Tensor::from_storage(s, self.shape().clone(), None))
    }
}

/// RoPE inverse frequencies `[head_dim / 2]`: `inv_freq[i] = theta^(−2i / head_dim)`, computed in
/// f64 and stored as `dtype`.
pub fn rope_inv_freq(head_dim: usize, theta: f64, dtype: DType, device: Device) -> Result<Tensor> {
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(Error::invalid(
            "rope_inv_freq",
            format!("head dim {head_dim} must be even and positive"),
        ));
    }
    if !(theta.is_finite() && theta > 0.0) {
        return Err(Error::invalid(
            "rope_inv_freq",
            format!("theta {theta} must be finite and positive"),
        ));
    }
    if !dtype.is_float() {
        return Err(Error::UnsupportedDType {
            op: "rope_inv_freq",
            dtype,
        });
    }
    let half = head_dim / 2;
    let v: Vec<f64> = (0..half)
        .map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64))
        .collect(); // [d/2]
    Tensor::from_f64(&v, half, dtype, device)
}

/// The cos and sin tables for [`Tensor::rope`]: `positions` is u32 `[t]` (shared by the batch) or
/// `[b, t]` (per sequence), `inv_freq` is `[d/2]`. Returns `(cos, sin)`, each `[1 or b, t, d/2]`
/// of `inv_freq`'s dtype, from the angles `position · inv_freq`. The angles are computed in
/// `inv_freq`'s dtype, in f32 when that is bf16 (bf16 angles would be off by whole radians).
pub fn rope_tables(positions: &Tensor, inv_freq: &Tensor) -> Result<(Tensor, Tensor)> {
    u32_only("rope_tables", positions)?;
    float_only("rope_tables", inv_freq)?;
    same_device("rope_tables", positions, inv_freq)?;
    if inv_freq.rank() != 1 {
        return Err(Error::RankMismatch {
            op: "rope_tables",
            expected: 1,
            shape: inv_freq.shape().clone(),
        });
    }
    let (b, t) = match *positions.dims() {
        [t] => (1, t),
        [b, t] => (b, t),
        _ => {
            return Err(Error::RankMismatch {
                op: "rope_tables",
                expected: 2,
                shape: positions.shape().clone(),
            })
        }
    };
    let half = inv_freq.dims()[0];
    let out_dtype = inv_freq.dtype();
    let work = if out_dtype == DType::BF16 {
        DType::F32
    } else {
        out_dtype
    };
    let pos = positions.to_dtype(work)?.reshape(Shape::from([b, t, 1]))?; // [b, t, 1]
    let freq = inv_freq
        .to_dtype(work)?
        .reshape(Shape::from([1, 1, half]))?; // [1, 1, d/2]
    let angles = pos.mul(&freq)?; // [b, t, d/2]
    let cos = angles.cos()?.to_dtype(out_dtype)?;
    let sin = angles.sin()?.to_dtype(out_dtype)?;
    Ok((cos, sin))
}
