//! Stacking equally-shaped tensors along a new leading dim. When they already lie back to back
//! in one buffer (the experts' LoRA matrices of a MixLoRA layer, laid out by
//! [`Tensor::unstack_leaves`]) the stack is a view of that buffer and costs no backend call;
//! otherwise [`stack`] copies them ([`cat`](super::cat)).

use crate::autograd::{Input, Node, Output};
use crate::{Error, Layout, Result, Shape, Tensor};

impl Tensor {
    /// `[E, ..]`: the `E` tensors of `tensors` stacked along a new leading dim, as a view of their
    /// buffer, when they are equally-shaped contiguous views lying back to back in one buffer
    /// (input `i` starts `i · numel` elements after input 0); `None` otherwise (other buffers,
    /// another order, gaps, other shapes, a non-contiguous input), and the caller copies instead
    /// ([`stack`]). An error only for an empty list.
    ///
    /// Backward: input `i` gets `g[i]`, a view of the stacked gradient `g` (no copy; the node
    /// holds graph-only references to the inputs).
    pub fn stack_views(tensors: &[&Tensor]) -> Result<Option<Tensor>> {
        let Some(&first) = tensors.first() else {
            return Err(Error::invalid("stack_views", "no tensors to stack"));
        };
        let n = first.elem_count();
        let off = first.layout().offset();
        let adjacent = first.has_data()
            && tensors.iter().enumerate().all(|(i, t)| {
                t.same_storage(first)
                    && t.shape() == first.shape()
                    && t.is_contiguous()
                    && t.layout().offset() == off + i * n
            });
        if !adjacent {
            return Ok(None);
        }
        let mut dims = vec![tensors.len()];
        dims.extend_from_slice(first.dims());
        let mut strides = vec![n];
        strides.extend(first.shape().contiguous_strides());
        let layout = Layout::new(Shape::from(dims), strides, off); // [E, ..], contiguous
        let inputs: Vec<Input<'_>> = tensors.iter().map(|&t| Input::GraphOnly(t)).collect();
        let node = Node::record_with("stack_views", &inputs, Output::Unread, |x, _, g| {
            Ok(x.iter()
                .enumerate()
                .map(|(i, xi)| xi.tracks_grad().then(|| select0(g, i)))
                .collect())
        });
        Ok(Some(first.view(layout, node)))
    }

    /// The `E` slices `self[e]` of a tensor `[E, ..]`, each a trainable leaf (a variable without
    /// this tensor's history) viewing its slice of this buffer: no copy. Updating one in place
    /// (an optimiser step, [`Tensor::assign`]) writes this buffer. When `self` is contiguous,
    /// [`Tensor::stack_views`] of the leaves, in order, is again a view of it.
    pub fn unstack_leaves(&self) -> Result<Vec<Tensor>> {
        if self.rank() == 0 {
            return Err(Error::RankMismatch {
                op: "unstack_leaves",
                expected: 1,
                shape: self.shape().clone(),
            });
        }
        Ok((0..self.dims()[0])
            .map(|e| select0(self, e).detach_as_leaf())
            .collect())
    }
}

/// `t[i]` for `t` `[E, ..]`: a view without the leading dim (records nothing).
fn select0(t: &Tensor, i: usize) -> Tensor {
    let l = t.layout();
    let layout = Layout::new(
        Shape::from(&l.dims()[1..]),
        l.strides()[1..].to_vec(),
        l.offset() + i * l.strides()[0],
    );
    t.view(layout, None)
}

/// `tensors` (equally shaped, one dtype and device) stacked along a new leading dim `[E, ..]`: a
/// view when [`Tensor::stack_views`] applies, else a contiguous copy (`cat` of the inputs with a
/// leading dim of 1). Gradients reach every input either way.
pub fn stack(tensors: &[&Tensor]) -> Result<Tensor> {
    if let Some(s) = Tensor::stack_views(tensors)? {
        return Ok(s);
    }
    let parts = tensors
        .iter()
        .map(|t| t.unsqueeze(0))
        .collect::<Result<Vec<_>>>()?; // [1, ..] each
    super::cat(&parts.iter().collect::<Vec<_>>(), 0)
}
