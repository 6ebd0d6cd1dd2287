//! Views (reshape, transpose, permute, narrow, broadcast), copies and casts. None of their
//! backward rules reads values: their nodes hold graph-only references to their inputs.

use crate::autograd::{Input, Node, Output};
use crate::backend::BackendStorage;
use crate::{DType, Error, Layout, Result, Shape, Storage, Tensor};

impl Tensor {
    /// Same elements, new shape. A view when the strides allow it, else a contiguous copy.
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.elem_count() != self.elem_count() {
            return Err(Error::ShapeMismatch {
                op: "reshape",
                lhs: self.shape().clone(),
                rhs: shape,
            });
        }
        if &shape == self.shape() {
            return Ok(self.clone());
        }
        let src_shape = self.shape().clone();
        let node = Node::record_with(
            "reshape",
            &[Input::GraphOnly(self)],
            Output::Unread,
            move |_, _, g| Ok(vec![Some(g.reshape(src_shape.clone())?)]),
        );
        match self.layout().reshape_view(&shape) {
            Some(l) => Ok(self.view(l, node)),
            None => {
                let c = crate::autograd::no_grad(|| self.copy())?;
                Ok(c.view(Layout::contiguous(shape), node))
            }
        }
    }

    /// Swaps two dims (negative dims count from the end). Always a view.
    pub fn transpose(&self, d0: isize, d1: isize) -> Result<Tensor> {
        let (a, b) = (
            self.shape().dim("transpose", d0)?,
            self.shape().dim("transpose", d1)?,
        );
        if a == b {
            return Ok(self.clone());
        }
        let node = Node::record_with(
            "transpose",
            &[Input::GraphOnly(self)],
            Output::Unread,
            move |_, _, g| Ok(vec![Some(g.transpose(a as isize, b as isize)?)]),
        );
        Ok(self.view(self.layout().transpose(a, b), node))
    }

    /// Transpose of the last two dims.
    pub fn t(&self) -> Result<Tensor> {
        if self.rank() < 2 {
            return Err(Error::RankMismatch {
                op: "t",
                expected: 2,
                shape: self.shape().clone(),
            });
        }
        self.transpose(-2, -1)
    }

    /// Reorders dims: output dim `i` is input dim `perm[i]`. Always a view.
    pub fn permute(&self, perm: &[usize]) -> Result<Tensor> {
        let r = self.rank();
        let mut seen = vec![false; r];
        if perm.len() != r
            || perm
                .iter()
                .any(|&p| p >= r || std::mem::replace(&mut seen[p], true))
        {
            return Err(Error::invalid(
                "permute",
                format!(
                    "{perm:?} is not a permutation of the dims of {}",
                    self.shape()
                ),
            ));
        }
        let mut inv = vec![0; r];
        for (i, &p) in perm.iter().enumerate() {
            inv[p] = i;
        }
        let node = Node::record_with(
            "permute",
            &[Input::GraphOnly(self)],
            Output::Unread,
            move |_, _, g| Ok(vec![Some(g.permute(&inv)?)]),
        );
        Ok(self.view(self.layout().permute(perm), node))
    }

    /// `len` entries of `dim` from `start`. Always a view.
    pub fn narrow(&self, dim: isize, start: usize, len: usize) -> Result<Tensor> {
        let d = self.shape().dim("narrow", dim)?;
        let size = self.dims()[d];
        if start + len > size {
            return Err(Error::invalid(
                "narrow",
                format!(
                    "range {start}..{} out of bounds for dim {d} of shape {}",
                    start + len,
                    self.shape()
                ),
            ));
        }
        if start == 0 && len == size {
            return Ok(self.clone());
        }
        let src_shape = self.shape().clone();
        let node = Node::record_with(
            "narrow",
            &[Input::GraphOnly(self)],
            Output::Unread,
            move |_, _, g| Ok(vec![Some(g.pad_into(&src_shape, d, start)?)]),
        );
        Ok(self.view(self.layout().narrow(d, start, len), node))
    }

    /// A zero tensor of `shape` with `self` written at `start` along `dim` (the adjoint of
    /// `narrow`).
    pub fn pad_into(&self, shape: &Shape, dim: usize, start: usize) -> Result<Tensor> {
        if shape.rank() != self.rank()
            || dim >= self.rank()
            || start + self.dims()[dim] > shape.dims()[dim]
        {
            return Err(Error::ShapeMismatch {
                op: "pad_into",
                lhs: self.shape().clone(),
                rhs: shape.clone(),
            });
        }
        for (i, (&a, &b)) in self.dims().iter().zip(shape.dims()).enumerate() {
            if i != dim && a != b {
                return Err(Error::ShapeMismatch {
                    op: "pad_into",
                    lhs: self.shape().clone(),
                    rhs: shape.clone(),
                });
            }
        }
        let mut out = Storage::zeros(self.device(), shape, self.dtype())?;
        let dst = Layout::contiguous(shape.clone()).narrow(dim, start, self.dims()[dim]);
        self.storage().copy_to_view(self.layout(), &mut out, &dst)?;
        let len = self.dims()[dim];
        let node = Node::record_with(
            "pad_into",
            &[Input::GraphOnly(self)],
            Output::Unread,
            move |_, _, g| Ok(vec![Some(g.narrow(dim as isize, start, len)?)]),
        );
        Ok(Tensor::from_storage(out, shape.clone(), node))
    }

    /// A view with `shape`, repeating size-1 (or missing leading) dims with stride 0.
    pub fn broadcast_as(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if &shape == self.shape() {
            return Ok(self.clone());
        }
        let layout = self.layout().broadcast_as("broadcast_as", &shape)?;
        let src_shape = self.shape().clone();
        let node = Node::record_with(
            "broadcast_as",
            &[Input::GraphOnly(self)],
            Output::Unread,
            move |_, _, g| Ok(vec![Some(g.sum_to_shape(&src_shape)?)]),
        );
        Ok(self.view(layout, node))
    }

    /// Sums a broadcast gradient back to `shape` (the adjoint of `broadcast_as`).
    pub fn sum_to_shape(&self, shape: &Shape) -> Result<Tensor> {
        if self.shape() == shape {
            return Ok(self.clone());
        }
        let (r, sr) = (self.rank(), shape.rank());
        if sr > r {
            return Err(Error::ShapeMismatch {
                op: "sum_to_shape",
                lhs: self.shape().clone(),
                rhs: shape.clone(),
            });
        }
        let lead = r - sr;
        let mut t = self.clone();
        for d in 0..r {
            let target = if d < lead { 1 } else { shape.dims()[d - lead] };
            if t.dims()[d] != target {
                if target != 1 {
                    return Err(Error::ShapeMismatch {
                        op: "sum_to_shape",
                        lhs: self.shape().clone(),
                        rhs: shape.clone(),
                    });
                }
                t = t.sum_keepdim(d as isize)?;
            }
        }
        t.reshape(shape.clone())
    }

    /// Inserts a size-1 dim at `dim` (`0..=rank`).
    pub fn unsqueeze(&self, dim: usize) -> Result<Tensor> {
        if dim > self.rank() {
            return Err(Error::DimOutOfRange {
                op: "unsqueeze",
                dim: dim as isize,
                shape: self.shape().clone(),
            });
        }
        let mut dims = self.dims().to_vec();
        dims.insert(dim, 1);
        self.reshape(dims)
    }

    /// Removes a size-1 dim.
    pub fn squeeze(&self, dim: isize) -> Result<Tensor> {
        let d = self.shape().dim("squeeze", dim)?;
        if self.dims()[d] != 1 {
            return Err(Error::invalid(
                "squeeze",
                format!("dim {d} of shape {} is not 1", self.shape()),
            ));
        }
        let mut dims = self.dims().to_vec();
        dims.remove(d);
        self.reshape(dims)
    }

    /// Merges all dims into one.
    pub fn flatten_all(&self) -> Result<Tensor> {
        self.reshape(self.elem_count())
    }

    /// Self when already contiguous, else a contiguous copy.
    pub fn contiguous(&self) -> Result<Tensor> {
        if self.is_contiguous() {
            Ok(self.clone())
        } else {
            self.copy()
        }
    }

    /// Converts the elements to `dtype` (gradients convert back).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let storage = self.storage().to_dtype(self.layout(), dtype)?;
        let src = self.dtype();
        let node = if src.is_float() && dtype.is_float() {
            Node::record_with(
                "to_dtype",
                &[Input::GraphOnly(self)],
                Output::Unread,
                move |_, _, g| Ok(vec![Some(g.to_dtype(src)?)]),
            )
        } else {
            None
        };
        Ok(Tensor::from_storage(storage, self.shape().clone(), node))
    }
}
