//! Softmax and log-softmax over the last dim, and the causal, key- or segment-masked, scaled
//! softmax of attention scores.

use super::{float_only, same_device, u32_only};
use crate::autograd::{Input, Node, Output};
use crate::backend::BackendStorage;
use crate::{Result, Tensor};

/// The gradient of a (masked, scaled) softmax from its output `y` and output gradient `g`:
/// the backend's fused `dx = scale · y ⊙ (g − Σ_j g ⊙ y)`.
fn softmax_grad(y: &Tensor, g: &Tensor, scale: f64) -> Result<Tensor> {
    let dx = y
        .storage()
        .softmax_backward(y.layout(), &g.storage(), g.layout(), scale)?;
    Ok(Tensor::from_storage(dx, y.shape().clone(), None))
}

impl Tensor {
    /// `y = softmax(x)` over the last dim; `dx = y ⊙ (g − Σ g⊙y)` (one fused backward op).
    pub fn softmax_last_dim(&self) -> Result<Tensor> {
        float_only("softmax", self)?;
        let s = self.storage().softmax_last_dim(self.layout())?;
        let node = Node::record_with(
            "softmax",
            &[Input::GraphOnly(self)],
            Output::Read,
            |_, y, g| Ok(vec![Some(softmax_grad(y, g, 1.0)?)]),
        );
        Ok(Tensor::from_storage(s, self.shape().clone(), node))
    }

    /// `y = log_softmax(x)` over the last dim; `dx = g − exp(y) Σ g`.
    pub fn log_softmax_last_dim(&self) -> Result<Tensor> {
        float_only("log_softmax", self)?;
        let s = self.storage().log_softmax_last_dim(self.layout())?;
        let node = Node::record_with(
            "log_softmax",
            &[Input::GraphOnly(self)],
            Output::Read,
            |_, y, g| {
                let total = g.sum_keepdim(-1)?;
                Ok(vec![Some(g.sub(&y.exp()?.mul(&total)?)?)])
            },
        );
        Ok(Tensor::from_storage(s, self.shape().clone(), node))
    }

    /// The attention softmax, fused: `self` is scores `[b, h, t, s]`; query `i` sits at key
    /// position `p = q_offset + i` and sees key `j` when `j <= p` and, with a `key_mask` (u32
    /// `[b, s]`: 0 for padding, else the token's segment), `key_mask[b, j] != 0` and, when the
    /// query's own `key_mask[b, p]` is not 0, `key_mask[b, j] == key_mask[b, p]`. So a 0/1 mask
    /// is plain padding, and segment ids `1, 2, ..` give the block-diagonal causal mask of
    /// packed sequences (no sequence sees another); a padding query sees every real key before
    /// it. Over the visible keys
    /// `y = softmax(scale · x)`; `y = 0` exactly at every other key (masked scores are never
    /// used, so a NaN there does not spread). Statistics in f32 (f64 for f64).
    ///
    /// A row with no visible key (a left-padding query) is all zero, and so is its gradient:
    /// such rows are padding and must stay out of the loss.
    ///
    /// Backward (one fused op): `dx = scale · y ⊙ (g − Σ_j g ⊙ y)`, which is 0 at masked keys.
    /// It reads only `y`: the tape keeps the probabilities, never the scores.
    pub fn causal_masked_softmax(
        &self,
        scale: f64,
        q_offset: usize,
        key_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        const OP: &str = "causal_masked_softmax";
        float_only(OP, self)?;
        if let Some(m) = key_mask {
            u32_only(OP, m)?;
            same_device(OP, self, m)?;
        }
        let s = {
            let ms = key_mask.map(|m| m.storage());
            let mask = ms.as_deref().zip(key_mask.map(|m| m.layout()));
            self.storage()
                .causal_softmax(self.layout(), scale, q_offset, mask)?
        };
        let node = Node::record_with(
            OP,
            &[Input::GraphOnly(self)],
            Output::Read,
            move |_, y, g| Ok(vec![Some(softmax_grad(y, g, scale)?)]),
        );
        Ok(Tensor::from_storage(s, self.shape().clone(), node))
    }
}
