//! Dropout: `x ⊙ mask` with a seeded, counter-based mask of `0` and `1/(1-p)`.

use super::float_only;
use crate::{Error, Result, Storage, Tensor};

impl Tensor {
    /// Zeroes each element with probability `p` and scales the rest by `1/(1-p)`, so the
    /// expectation is unchanged. The mask is a pure function of `(seed, element index)`: the same
    /// seed gives the same mask on every backend. The identity when `!train` or `p == 0`
    /// (`p` must be in `[0, 1)` either way).
    ///
    /// Backward: `dx = g ⊙ mask` (the rule of the product with a constant mask).
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
        let mask = Storage::dropout_mask(self.device(), self.shape(), self.dtype(), p, seed)?;
        let mask = Tensor::from_storage(mask, self.shape().clone(), None); // same shape as x
        self.mul(&mask)
    }
}
