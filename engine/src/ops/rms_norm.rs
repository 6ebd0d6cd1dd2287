//! RMSNorm: one fused forward kernel and one fused backward kernel.

use super::{float_only, same_device, same_dtype};
use crate::autograd::{Input, Node, Output};
use crate::backend::BackendStorage;
use crate::{Error, Result, Tensor};

impl Tensor {
    /// `y = x / sqrt(mean(x², last dim) + eps) ⊙ w`, with `x: [.., n]` and `w: [n]`.
    ///
    /// Backward (the backend's fused `rms_norm_backward`), with `r = (mean(x²) + eps)^(-1/2)` per
    /// row: `dx = r (g ⊙ w) − (r³ / n) x Σ(g ⊙ w ⊙ x)`, `dw = Σ_rows r (g ⊙ x)`.
    pub fn rms_norm(&self, w: &Tensor, eps: f64) -> Result<Tensor> {
        same_dtype("rms_norm", self, w)?;
        same_device("rms_norm", self, w)?;
        float_only("rms_norm", self)?;
        let n = match self.dims().last() {
            Some(&n) => n,
            None => {
                return Err(Error::RankMismatch {
                    op: "rms_norm",
                    expected: 1,
                    shape: self.shape().clone(),
                })
            }
        };
        if w.dims() != [n] {
            return Err(Error::ShapeMismatch {
                op: "rms_norm",
                lhs: self.shape().clone(),
                rhs: w.shape().clone(),
            });
        }
        let s = self
            .storage()
            .rms_norm(self.layout(), &w.storage(), w.layout(), eps)?;
        let inputs = [Input::Keep(self), Input::Keep(w)];
        let node = Node::record_with("rms_norm", &inputs, Output::Unread, move |x, _, g| {
            let (dx, dw) = x[0].storage().rms_norm_backward(
                x[0].layout(),
                &x[1].storage(),
                x[1].layout(),
                &g.storage(),
                g.layout(),
                eps,
                x[1].tracks_grad(),
            )?;
            Ok(vec![
                Some(Tensor::from_storage(dx, x[0].shape().clone(), None)),
                dw.map(|dw| Tensor::from_storage(dw, x[1].shape().clone(), None)),
            ])
        });
        Ok(Tensor::from_storage(s, self.shape().clone(), node))
    }
}
