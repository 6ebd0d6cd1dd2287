//! Matrix products. `matmul` broadcasts batch dims; a rank-2 right operand (a weight, often a
//! transposed view) is applied to all leading dims of the left one as one GEMM.

use super::{float_only, same_device, same_dtype};
use crate::autograd::{Input, Node, Output};
use crate::backend::BackendStorage;
use crate::{Error, Result, Shape, Tensor};

impl Tensor {
    /// The primitive: `[b, m, k] x [b, k, n] -> [b, m, n]`. `dA = G Bᵀ`, `dB = Aᵀ G`, each
    /// computed in its operand's orientation: for an operand that is a transposed view (each
    /// matrix column-major, as `k.t()` in `q kᵀ`), the product runs transposed (`dBᵀ = Gᵀ A`)
    /// and its transpose is returned, so that the gradient reaching the tensor under the view is
    /// row-major, as that tensor is (kernels that read it, such as rope's, then take their
    /// contiguous paths).
    fn matmul3(&self, rhs: &Tensor) -> Result<Tensor> {
        let (a, b) = (self.dims(), rhs.dims());
        let shape = Shape::from([a[0], a[1], b[2]]);
        let s = self
            .storage()
            .matmul(self.layout(), &rhs.storage(), rhs.layout())?;
        // Each operand is read for the other's gradient only.
        let inputs = [
            Input::keep_if(self, rhs.tracks_grad()),
            Input::keep_if(rhs, self.tracks_grad()),
        ];
        let node = Node::record_with("matmul", &inputs, Output::Unread, |x, _, g| {
            let da = x[0]
                .tracks_grad()
                .then(|| {
                    if column_major(&x[0]) {
                        x[1].matmul3(&g.transpose(1, 2)?)?.transpose(1, 2)
                    } else {
                        g.matmul3(&x[1].transpose(1, 2)?)
                    }
                })
                .transpose()?;
            let db = x[1]
                .tracks_grad()
                .then(|| {
                    if column_major(&x[1]) {
                        g.transpose(1, 2)?.matmul3(&x[0])?.transpose(1, 2)
                    } else {
                        x[0].transpose(1, 2)?.matmul3(g)
                    }
                })
                .transpose()?;
            Ok(vec![da, db])
        });
        Ok(Tensor::from_storage(s, shape, node))
    }

    /// Matrix product over the last two dims, batch dims broadcast: `[.., m, k] x [.., k, n]`.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        same_dtype("matmul", self, rhs)?;
        same_device("matmul", self, rhs)?;
        float_only("matmul", self)?;
        let mismatch = || Error::ShapeMismatch {
            op: "matmul",
            lhs: self.shape().clone(),
            rhs: rhs.shape().clone(),
        };
        let (ar, br) = (self.rank(), rhs.rank());
        if ar < 2 || br < 2 || self.dims()[ar - 1] != rhs.dims()[br - 2] {
            return Err(mismatch());
        }
        let (m, k, n) = (self.dims()[ar - 2], self.dims()[ar - 1], rhs.dims()[br - 1]);
        if br == 2 {
            // x @ W: fold every leading dim of x into the rows of one GEMM.
            let rows = self.elem_count() / k.max(1);
            let out = self.reshape([1, rows, k])?.matmul3(&rhs.unsqueeze(0)?)?;
            let mut dims = self.dims().to_vec();
            dims[ar - 1] = n;
            return out.reshape(dims);
        }
        let batch = Shape::from(&self.dims()[..ar - 2])
            .broadcast_with("matmul", &Shape::from(&rhs.dims()[..br - 2]))?;
        let b: usize = batch.elem_count();
        let mut ad = batch.dims().to_vec();
        ad.extend([m, k]);
        let mut bd = batch.dims().to_vec();
        bd.extend([k, n]);
        let a3 = self.broadcast_as(ad)?.reshape([b, m, k])?;
        let b3 = rhs.broadcast_as(bd)?.reshape([b, k, n])?;
        let mut od = batch.dims().to_vec();
        od.extend([m, n]);
        a3.matmul3(&b3)?.reshape(od)
    }

    /// `self` converted to `rhs`'s dtype, times `rhs`: `x.to_dtype(w.dtype()).matmul(w)` with the
    /// same values and gradients, but the tape keeps `self` (not its converted copy): e.g. a
    /// bf16 `[N, H]` input to an f32 router keeps no `[N, H]` f32 buffer. Both operands rank 2
    /// (`[M, K] × [K, N]`).
    ///
    /// When `rhs` is in `self`'s accumulation dtype (an f32 router over bf16 activations), the
    /// product and its gradients run on the LoRA rank-r primitives (`rhsᵀ` as the `A` of rank N,
    /// no dropout): they read `self` in its own dtype, so no converted copy of it is written at
    /// all, forward or backward (on the GPU, custom kernels for N = 8 and 16; elsewhere the same
    /// maths in the adapter dtype, rounded once).
    pub fn matmul_cast(&self, rhs: &Tensor) -> Result<Tensor> {
        const OP: &str = "matmul_cast";
        if self.dtype() == rhs.dtype() {
            return self.matmul(rhs);
        }
        if self.rank() != 2 || rhs.rank() != 2 {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: self.shape().clone(),
                rhs: rhs.shape().clone(),
            });
        }
        float_only(OP, self)?;
        let dt = rhs.dtype();
        if self.dtype().is_float() && dt == self.dtype().accumulation() {
            return crate::fused::lora::matmul_cast_rank(self, rhs);
        }
        let out = {
            let _ng = crate::autograd::NoGradGuard::new();
            self.to_dtype(dt)?.matmul(rhs)? // [M, N]
        };
        // Each operand is read for the other's gradient only.
        let inputs = [
            Input::keep_if(self, rhs.tracks_grad()),
            Input::keep_if(rhs, self.tracks_grad()),
        ];
        let node = Node::record_with(OP, &inputs, Output::Unread, move |inp, _, g| {
            let (x, w) = (&inp[0], &inp[1]);
            let dx = x
                .tracks_grad()
                .then(|| g.matmul(&w.t()?)?.to_dtype(x.dtype()))
                .transpose()?; // [M, K] in x's dtype
            let dw = w
                .tracks_grad()
                .then(|| x.to_dtype(dt)?.t()?.matmul(g))
                .transpose()?; // [K, N]
            Ok(vec![dx, dw])
        });
        Ok(match node {
            Some(node) => out.view(out.layout().clone(), Some(node)),
            None => out,
        })
    }
}

/// Whether the rank-3 `t` stores each of its (at least 2 × 2) matrices column-major: a transposed
/// view of a row-major tensor.
fn column_major(t: &Tensor) -> bool {
    let (d, s) = (t.dims(), t.layout().strides());
    d[1] > 1 && d[2] > 1 && s[1] == 1 && s[2] == d[1]
}
