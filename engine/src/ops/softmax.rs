//! Softmax and log-softmax over the last dim.

use super::float_only;
use crate::autograd::Node;
use crate::backend::BackendStorage;
use crate::{Result, Tensor};

impl Tensor {
    /// `y = softmax(x)` over the last dim; `dx = y ⊙ (g − Σ g⊙y)`.
    pub fn softmax_last_dim(&self) -> Result<Tensor> {
        float_only("softmax", self)?;
        let s = self.storage().softmax_last_dim(self.layout())?;
        let node = Node::record("softmax", &[self], |_, y, g| {
            let dot = g.mul(y)?.sum_keepdim(-1)?;
            Ok(vec![Some(y.mul(&g.sub(&dot)?)?)])
        });
        Ok(Tensor::from_storage(s, self.shape().clone(), node))
    }

    /// `y = log_softmax(x)` over the last dim; `dx = g − exp(y) Σ g`.
    pub fn log_softmax_last_dim(&self) -> Result<Tensor> {
        float_only("log_softmax", self)?;
        let s = self.storage().log_softmax_last_dim(self.layout())?;
        let node = Node::record("log_softmax", &[self], |_, y, g| {
            let total = g.sum_keepdim(-1)?;
            Ok(vec![Some(g.sub(&y.exp()?.mul(&total)?)?)])
        });
        Ok(Tensor::from_storage(s, self.shape().clone(), node))
    }
}
