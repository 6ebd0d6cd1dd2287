//! The chunked linear cross-entropy unit: cross-entropy of a linear layer's output (the LM head)
//! computed over vocabulary chunks, so that the `[N, V]` logits are never held: at most one
//! `[N, C]` chunk of them exists at a time ([`Tensor::linear_cross_entropy_rows`]).
//!
//! Files: the primitives' named operands and dispatch (`primitives.rs`), the CPU reference
//! (`cpu.rs`), the CUDA launchers (`cuda.rs`) over the kernels of
//! `kernels/src/linear_cross_entropy.cu`.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub mod primitives;

use self::primitives::{self as prim, ChunkBackward, ChunkUpdate};
use crate::autograd::{no_grad, Input, Node, Output};
use crate::fused::{read, OperandMut};
use crate::ops::{float_only, same_device, same_dtype, u32_only};
use crate::{Error, Layout, Result, Tensor};

/// `(v0, c)` of each chunk of `chunk` vocabulary rows (the last one shorter when `chunk` does not
/// divide `v`).
fn chunks(v: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..v).step_by(chunk).map(move |v0| (v0, chunk.min(v - v0)))
}

impl Tensor {
    /// Per-row cross-entropy of the logits `self · weightᵀ` without materialising them:
    /// `loss[r] = logsumexp_j(h[r]·w[j]) − h[r]·w[t[r]]`, 0 where `t[r] == ignore_index`; the same
    /// values as `self.matmul(&weight.t()?)?.cross_entropy_rows(targets, ignore_index)`.
    ///
    /// `self`: hidden states `[.., H]`; `weight`: `[V, H]` (the LM head, same dtype); `targets`:
    /// u32 with `self`'s shape without the last dim; `chunk`: vocabulary rows per chunk (> 0).
    /// The result has `targets`' shape, f32 for f32/bf16 and f64 for f64.
    ///
    /// Forward: for each chunk `W_c = weight[v0..v0+C]`, `logits_c = h · W_cᵀ` `[N, C]` (one
    /// matmul), folded into per-row running `(max m, Σ exp(x − m), target logit)` by one fused
    /// primitive (an online log-sum-exp); `lse = m + ln Σ`, `loss = lse − x_t`.
    ///
    /// Backward (recomputes each chunk's logits): with `g` the gradient of the rows,
    /// `dlogits_c = (exp(logits_c − lse) − onehot_c(t)) · g` (one fused primitive, zero rows where
    /// ignored), `dh = Σ_c dlogits_c · W_c` (accumulated in f32 for bf16), and, only when `weight`
    /// needs a gradient, `dW_c = dlogits_cᵀ · h`.
    pub fn linear_cross_entropy_rows(
        &self,
        weight: &Tensor,
        targets: &Tensor,
        ignore_index: u32,
        chunk: usize,
    ) -> Result<Tensor> {
        const OP: &str = "linear_cross_entropy";
        float_only(OP, self)?;
        same_dtype(OP, self, weight)?;
        same_device(OP, self, weight)?;
        u32_only(OP, targets)?;
        same_device(OP, self, targets)?;
        let r = self.rank();
        let shape_err = |rhs: &Tensor| Error::ShapeMismatch {
            op: OP,
            lhs: self.shape().clone(),
            rhs: rhs.shape().clone(),
        };
        if r == 0 || targets.dims() != &self.dims()[..r - 1] {
            return Err(shape_err(targets));
        }
        let h = self.dims()[r - 1];
        if weight.rank() != 2 || weight.dims()[1] != h {
            return Err(shape_err(weight));
        }
        let v = weight.dims()[0];
        if chunk == 0 || v == 0 {
            return Err(Error::invalid(
                OP,
                format!("chunk of {chunk} rows over a vocabulary of {v}"),
            ));
        }
        if r != 2 {
            // Fold the leading dims into rows: [.., H] -> [N, H], [..] -> [N].
            let n = targets.elem_count();
            let rows = self.reshape([n, h])?.linear_cross_entropy_rows(
                weight,
                &targets.reshape(n)?,
                ignore_index,
                chunk,
            )?;
            return rows.reshape(targets.shape().clone());
        }
        let n = self.dims()[0];
        let (rows, lse) = no_grad(|| forward(self, weight, targets, ignore_index, chunk))?;
        let saved_lse = lse.clone();
        let inputs = [Input::Keep(self), Input::Keep(weight), Input::Keep(targets)];
        let node = Node::record_with(OP, &inputs, Output::Unread, move |x, _, g| {
            backward(&x[0], &x[1], &x[2], g, &lse, ignore_index, chunk)
        })
        .map(|n| n.capturing(&[&saved_lse]));
        Ok(match node {
            None => rows,
            Some(node) => rows.view(Layout::contiguous(n), Some(node)),
        })
    }
}

/// The forward of [`Tensor::linear_cross_entropy_rows`] for `h` `[N, H]`, `weight` `[V, H]` and
/// `targets` `[N]` (checked): the loss rows `[N]` and the rows' log-sum-exp `[N]`, both in the
/// accumulation dtype.
fn forward(
    h: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    ignore_index: u32,
    chunk: usize,
) -> Result<(Tensor, Tensor)> {
    let (n, v) = (h.dims()[0], weight.dims()[0]);
    let acc = h.dtype().accumulation();
    // [N, 3]: running max, running Σ exp(x − max), target logit.
    let init: Vec<f64> = (0..n).flat_map(|_| [f64::NEG_INFINITY, 0.0, 0.0]).collect();
    let state = Tensor::from_f64(&init, [n, 3], acc, h.device())?;
    for (v0, c) in chunks(v, chunk) {
        let logits = h.matmul(&weight.narrow(0, v0, c)?.t()?)?; // [N, C]
        read([&logits, targets], |[x, targets]| {
            let mut st = state.storage_mut();
            let state = OperandMut {
                s: &mut *st,
                l: state.layout(),
            };
            let o = ChunkUpdate { x, targets, state };
            prim::chunk_update(o, v0, v, ignore_index)
        })?;
    }
    let m = state.narrow(1, 0, 1)?; // [N, 1]
    let lse = m.add(&state.narrow(1, 1, 1)?.log()?)?.reshape(n)?; // [N]
    let diff = lse.sub(&state.narrow(1, 2, 1)?.reshape(n)?)?; // [N]
    let keep = targets.ne_scalar(ignore_index as f64)?; // [N] u32
    let rows = keep.where_cond(&diff, &diff.zeros_like()?)?;
    Ok((rows, lse))
}

/// The backward of [`Tensor::linear_cross_entropy_rows`]: `[dhidden, dweight, None]` given the
/// gradient `g` `[N]` of the loss rows and the rows' log-sum-exp `lse` `[N]` of the forward.
fn backward(
    hid: &Tensor,
    w: &Tensor,
    t: &Tensor,
    g: &Tensor,
    lse: &Tensor,
    ignore_index: u32,
    chunk: usize,
) -> Result<Vec<Option<Tensor>>> {
    let (n, h, v) = (hid.dims()[0], hid.dims()[1], w.dims()[0]);
    let g = g.to_dtype(hid.dtype().accumulation())?; // [N]

    // bf16 partial products are summed in f32.
    let dh_dtype = hid.dtype().accumulation();
    let mut dh: Option<Tensor> = None; // [N, H]
    let dw = w
        .tracks_grad()
        .then(|| Tensor::zeros([v, h], w.dtype(), w.device()))
        .transpose()?; // [V, H]
    for (v0, c) in chunks(v, chunk) {
        let wc = w.narrow(0, v0, c)?; // [C, H]
        let logits = hid.matmul(&wc.t()?)?; // [N, C]
        let dl = read([&logits, t, lse, &g], |[x, targets, lse, grad_rows]| {
            let o = ChunkBackward {
                x,
                targets,
                lse,
                grad_rows,
            };
            prim::chunk_backward(o, v0, ignore_index)
        })?;
        drop(logits);
        let dl = Tensor::from_storage(dl, [n, c], None); // [N, C], hidden's dtype
        if hid.tracks_grad() {
            let part = dl.matmul(&wc)?.to_dtype(dh_dtype)?; // [N, H]
            dh = Some(match dh {
                None => part,
                Some(acc) => acc.add(&part)?,
            });
        }
        if let Some(dw) = &dw {
            dw.narrow(0, v0, c)?.assign(&dl.t()?.matmul(hid)?)?; // [C, H]
        }
    }
    let dh = dh.map(|d| d.to_dtype(hid.dtype())).transpose()?;
    Ok(vec![dh, dw, None])
}
