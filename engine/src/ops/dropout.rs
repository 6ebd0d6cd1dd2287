//! Dropout: `x ⊙ mask` with a seeded, counter-based mask of `0` and `1/(1-p)`.

use super::float_only;
use crate::autograd::{Input, Node, Output};
use crate::backend::BackendStorage;
use crate::{Error, Result, Tensor};

impl Tensor {
    /// Zeroes each element with probability `p` and scales the rest by `1/(1-p)`, so the
    /// expectation is unchanged. The mask is a pure function of `(seed, element index)`: the same
    /// seed gives the same mask on every backend. The identity when `!train` or `p == 0`
    /// (`p` must be in `[0, 1)` either way).
    ///
    /// One pass (`BackendStorage::dropout_apply`), with the same values as the product with a
    /// `dropout_mask` tensor of x's dtype. Backward: `dx = g ⊙ mask`, the mask drawn again from
    /// the seed, so the tape keeps nothing.
    pub fn dropout(&self, p: f64, seed: u64, train: bool) -> Result<Tensor> {
        float_only("dropout", self)?;
        if !(0.0..1.0).contains(&p) {
            return Err(Error::invalid(
                "dropout",
                format!("probability {p} is not in [0, 1)"),
            ));
        }
        if !train || p == 0.0 {
            return Ok(self.clone());
        }
        let y = self.storage().dropout_apply(self.layout(), p, seed)?; // contiguous, x's shape
        let node = Node::record_with(
            "dropout",
            &[Input::GraphOnly(self)],
            Output::Unread,
            move |_, _, g| Ok(vec![Some(g.dropout(p, seed, true)?)]),
        );
        Ok(Tensor::from_storage(y, self.shape().clone(), node))
    }
}
