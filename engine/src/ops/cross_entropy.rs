//! Losses: fused cross-entropy over the last dim of logits.

use super::{float_only, same_device, u32_only};
use crate::autograd::{Input, Node, Output};
use crate::backend::BackendStorage;
use crate::{Error, Result, Tensor};

/// The target id that marks a position without a loss (padding, prompt tokens).
pub const IGNORE_INDEX: u32 = u32::MAX;

impl Tensor {
    /// Per-position cross-entropy of logits `self` (`[.., V]`) against u32 `targets` (`[..]`, the
    /// logits' shape without the last dim): `loss[r] = logsumexp(x[r]) − x[r, t[r]]`, and 0 where
    /// `t[r] == ignore_index`. The result has `targets`' shape, f32 for f32/bf16 logits and f64
    /// for f64 logits. One fused kernel, no `[.., V]` intermediate.
    ///
    /// Backward (fused): `dx[r] = (softmax(x[r]) − onehot(t[r])) · g[r]`, a zero row where
    /// ignored; `dx` has the logits' dtype.
    pub fn cross_entropy_rows(&self, targets: &Tensor, ignore_index: u32) -> Result<Tensor> {
        const OP: &str = "cross_entropy";
        float_only(OP, self)?;
        u32_only(OP, targets)?;
        same_device(OP, self, targets)?;
        let r = self.rank();
        if r == 0 || targets.dims() != &self.dims()[..r - 1] {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: self.shape().clone(),
                rhs: targets.shape().clone(),
            });
        }
        if r != 2 {
            // Fold the leading dims into rows: [.., V] -> [N, V], [..] -> [N].
            let v = self.dims()[r - 1];
            let n = targets.elem_count();
            let rows = self
                .reshape([n, v])?
                .cross_entropy_rows(&targets.reshape(n)?, ignore_index)?;
            return rows.reshape(targets.shape().clone());
        }
        let s = self.storage().cross_entropy(
            self.layout(),
            &targets.storage(),
            targets.layout(),
            ignore_index,
        )?;
        let inputs = [Input::Keep(self), Input::Keep(targets)];
        let node = Node::record_with(OP, &inputs, Output::Unread, move |x, _, g| {
            let (logits, t) = (&x[0], &x[1]);
            let dx = logits.storage().cross_entropy_backward(
                logits.layout(),
                &t.storage(),
                t.layout(),
                &g.storage(),
                g.layout(),
                ignore_index,
            )?; // [N, V], logits' dtype
            Ok(vec![
                Some(Tensor::from_storage(dx, logits.shape().clone(), None)),
                None,
            ])
        });
        Ok(Tensor::from_storage(s, targets.shape().clone(), node))
    }

    /// Mean cross-entropy over the positions whose target is not `ignore_index`, as a scalar
    /// (f32 for f32/bf16 logits, f64 for f64); 0 when every position is ignored. Logits `[.., V]`,
    /// u32 targets with the logits' shape without the last dim.
    ///
    /// `loss = Σ_r rows[r] / max(count, 1)` with `count = #{r: t[r] ≠ ignore}` computed on the
    /// device (no host read). Backward: the fused row kernel with `grad_rows = g / max(count, 1)`.
    pub fn cross_entropy(&self, targets: &Tensor, ignore_index: u32) -> Result<Tensor> {
        let rows = self.cross_entropy_rows(targets, ignore_index)?; // [..]
        let count = targets
            .ne_scalar(ignore_index as f64)?
            .count_nonzero()? // [] f32
            .to_dtype(rows.dtype())?
            .clamp_min(1.0)?;
        rows.sum_all()?.div(&count)
    }
}
