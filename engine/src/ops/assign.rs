//! In-place writes into a tensor's buffer, seen by every view of it and recorded on no tape:
//! `assign` (another tensor's elements), `add_assign` (another tensor's elements added, one
//! rounding) and `write_slice` (host values, one host-to-device copy). Optimisers, gradient sums
//! and the inputs of recorded CUDA graphs use them.

use crate::autograd;
use crate::backend::BackendStorage;
use crate::tensor::cpu_storage_from_vec;
use crate::{Error, Layout, Result, Storage, Tensor, WithDType};

/// Errors unless `src` has `dst`'s shape and dtype.
fn same_shape_and_dtype(op: &'static str, dst: &Tensor, src: &Tensor) -> Result<()> {
    if dst.shape() != src.shape() {
        return Err(Error::ShapeMismatch {
            op,
            lhs: dst.shape().clone(),
            rhs: src.shape().clone(),
        });
    }
    super::same_dtype(op, dst, src)
}

impl Tensor {
    /// Overwrites this tensor's elements with `src`'s (same shape and dtype), in place: every view
    /// of the buffer sees the new values. Used by optimisers; records nothing.
    pub fn assign(&self, src: &Tensor) -> Result<()> {
        same_shape_and_dtype("assign", self, src)?;
        self.write_from("assign", src, |s, sl, d, dl| s.copy_to_view(sl, d, dl))
    }

    /// Runs `write(src's storage, its layout, this buffer, this layout)` with this tensor's buffer
    /// locked for writing; a `src` of the same buffer is copied first (one lock at a time).
    fn write_from(
        &self,
        op: &'static str,
        src: &Tensor,
        write: impl Fn(&Storage, &Layout, &mut Storage, &Layout) -> Result<()>,
    ) -> Result<()> {
        if self.same_storage(src) {
            let tmp = autograd::no_grad(|| src.copy())?;
            return self.write_from(op, &tmp, write);
        }
        let s = src.try_storage(op)?;
        let mut d = self
            .try_data(op)?
            .write()
            .unwrap_or_else(|e| e.into_inner());
        write(&s, src.layout(), &mut d, self.layout())
    }

    /// Overwrites this tensor's elements with the host values `data` (in row-major order; the
    /// tensor's dtype, contiguous), in place: one host-to-device copy on a GPU, no kernel and no
    /// new buffer. Every view of the buffer sees the new values. Records nothing.
    pub fn write_slice<T: WithDType>(&self, data: &[T]) -> Result<()> {
        if data.len() != self.elem_count() {
            return Err(Error::ElementCountMismatch {
                op: "write_slice",
                numel: data.len(),
                shape: self.shape().clone(),
            });
        }
        if T::DTYPE != self.dtype() {
            return Err(Error::DTypeMismatch {
                op: "write_slice",
                lhs: self.dtype(),
                rhs: T::DTYPE,
            });
        }
        let Some((start, _)) = self.layout().contiguous_range() else {
            return Err(Error::invalid(
                "write_slice",
                "the tensor is not contiguous (write into a contiguous one and assign it)",
            ));
        };
        let src = cpu_storage_from_vec(data.to_vec());
        let mut d = self
            .try_data("write_slice")?
            .write()
            .unwrap_or_else(|e| e.into_inner());
        d.write_host(start, &src)
    }

    /// Adds `src`'s elements into this tensor's, in place (same shape and float dtype; bf16 in
    /// f32, rounded once): `t.add_assign(&g)` leaves exactly what `t.assign(&t.add(&g)?)` would,
    /// in one pass and without a temporary. Every view of the buffer sees the new values. Used to
    /// sum gradients into a fixed buffer; records nothing.
    pub fn add_assign(&self, src: &Tensor) -> Result<()> {
        same_shape_and_dtype("add_assign", self, src)?;
        let l = self.layout();
        if l.dims()
            .iter()
            .zip(l.strides())
            .any(|(&d, &s)| d > 1 && s == 0)
        {
            return Err(Error::invalid(
                "add_assign",
                "the destination is a broadcast view (one element stands for several)",
            ));
        }
        self.write_from("add_assign", src, |s, sl, d, dl| s.add_to_view(sl, d, dl))
    }
}
