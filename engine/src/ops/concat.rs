//! Concatenation along a dim, and its inverses as views: split and chunk.

use crate::autograd::{Input, Node, Output};
use crate::backend::BackendStorage;
use crate::{Error, Layout, Result, Shape, Storage, Tensor};

/// Joins `tensors` along `dim` (negative counts from the end) into a new contiguous tensor. All
/// inputs share rank, dtype, device and every other dim. Each input is copied into its slice of
/// the output buffer.
///
/// Backward: input `i` gets `g.narrow(dim, offset_i, len_i)`, its slice of the output gradient
/// (no input values are read: the node holds graph-only references).
pub fn cat(tensors: &[&Tensor], dim: isize) -> Result<Tensor> {
    let Some(&first) = tensors.first() else {
        return Err(Error::invalid("cat", "no tensors to concatenate"));
    };
    let d = first.shape().dim("cat", dim)?;
    let mut offsets = Vec::with_capacity(tensors.len()); // start of each input along `d`
    let mut total = 0;
    for &t in tensors {
        super::same_dtype("cat", first, t)?;
        super::same_device("cat", first, t)?;
        let compatible = t.rank() == first.rank()
            && t.dims()
                .iter()
                .zip(first.dims())
                .enumerate()
                .all(|(i, (a, b))| i == d || a == b);
        if !compatible {
            return Err(Error::ShapeMismatch {
                op: "cat",
                lhs: first.shape().clone(),
                rhs: t.shape().clone(),
            });
        }
        offsets.push(total);
        total += t.dims()[d];
    }
    let mut dims = first.dims().to_vec();
    dims[d] = total;
    let shape = Shape::from(dims);
    let out_l = Layout::contiguous(shape.clone());
    // The output, contiguous; the parts cover every element of it.
    let mut out = Storage::for_overwrite(first.device(), &shape, first.dtype())?;
    for (&t, &off) in tensors.iter().zip(&offsets) {
        let dst = out_l.narrow(d, off, t.dims()[d]);
        t.storage().copy_to_view(t.layout(), &mut out, &dst)?;
    }
    // The rule reads only the inputs' shapes.
    let inputs: Vec<Input<'_>> = tensors.iter().map(|&t| Input::GraphOnly(t)).collect();
    let node = Node::record_with("cat", &inputs, Output::Unread, move |x, _, g| {
        x.iter()
            .zip(&offsets)
            .map(|(xi, &off)| {
                xi.tracks_grad()
                    .then(|| g.narrow(d as isize, off, xi.dims()[d]))
                    .transpose()
            })
            .collect()
    });
    Ok(Tensor::from_storage(out, shape, node))
}

impl Tensor {
    /// Views of consecutive slices of `dim` with the given `sizes` (which must add up to the size
    /// of `dim`). Gradients flow back through `narrow`.
    pub fn split(&self, sizes: &[usize], dim: isize) -> Result<Vec<Tensor>> {
        let d = self.shape().dim("split", dim)?;
        let n = self.dims()[d];
        if sizes.iter().sum::<usize>() != n {
            return Err(Error::invalid(
                "split",
                format!(
                    "sizes {sizes:?} do not add up to dim {d} of shape {}",
                    self.shape()
                ),
            ));
        }
        let mut start = 0;
        sizes
            .iter()
            .map(|&len| {
                let part = self.narrow(d as isize, start, len);
                start += len;
                part
            })
            .collect()
    }

    /// Splits `dim` into at most `n` views of `ceil(size / n)` entries each, the last one shorter
    /// when `n` does not divide the size (PyTorch's `chunk`; fewer than `n` views can come back).
    pub fn chunk(&self, n: usize, dim: isize) -> Result<Vec<Tensor>> {
        let d = self.shape().dim("chunk", dim)?;
        if n == 0 {
            return Err(Error::invalid("chunk", "cannot split into 0 chunks"));
        }
        let size = self.dims()[d];
        if size == 0 {
            return Ok(vec![self.clone()]);
        }
        let step = size.div_ceil(n);
        let sizes: Vec<usize> = (0..size)
            .step_by(step)
            .map(|s| step.min(size - s))
            .collect();
        self.split(&sizes, d as isize)
    }
}
