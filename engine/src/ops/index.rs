//! Index ops: index_select, embedding, index_add (plain and weighted), gather, scatter_add and
//! top-k. Ids are u32 tensors on the same device; they never get a gradient. Each op checks its
//! shapes here; ids out of range are reported by the backend as `Error::IndexOutOfRange`.

use super::{float_only, same_device, same_dtype, u32_only};
use crate::autograd::{Input, Node, Output};
use crate::backend::checks::check_same_but;
use crate::backend::BackendStorage;
use crate::{Error, Result, Tensor};

/// u32 ids of rank 1 on `t`'s device.
fn ids_rank1(op: &'static str, t: &Tensor, ids: &Tensor) -> Result<()> {
    u32_only(op, ids)?;
    same_device(op, t, ids)?;
    if ids.rank() != 1 {
        return Err(Error::RankMismatch {
            op,
            expected: 1,
            shape: ids.shape().clone(),
        });
    }
    Ok(())
}

impl Tensor {
    /// Slices of `self` along `dim` picked by u32 `ids` (rank 1, repeats allowed):
    /// `out[.., j, ..] = self[.., ids[j], ..]`.
    ///
    /// Backward: `dself = zeros.index_add(ids, g, dim)`, i.e. `dself[.., t, ..] = Σ_{j: ids[j]=t}
    /// g[.., j, ..]`.
    pub fn index_select(&self, ids: &Tensor, dim: isize) -> Result<Tensor> {
        const OP: &str = "index_select";
        let d = self.shape().dim(OP, dim)?;
        ids_rank1(OP, self, ids)?;
        let mut dims = self.dims().to_vec();
        dims[d] = ids.elem_count();
        let s = self
            .storage()
            .index_select(self.layout(), &ids.storage(), ids.layout(), d)?;
        // Only the ids are read (and the table's shape).
        let inputs = [Input::GraphOnly(self), Input::Keep(ids)];
        let node = Node::record_with(OP, &inputs, Output::Unread, move |x, _, g| {
            let dx = x[0].zeros_like()?.index_add(&x[1], g, d as isize)?;
            Ok(vec![Some(dx), None])
        });
        Ok(Tensor::from_storage(s, dims, node))
    }

    /// Embedding lookup: `self` is the table `[V, H]`, `ids` u32 of any shape; the result is
    /// `[..ids.shape, H]`. The gradient of the table is the index_add of the output gradient rows.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        const OP: &str = "embedding";
        if self.rank() != 2 {
            return Err(Error::RankMismatch {
                op: OP,
                expected: 2,
                shape: self.shape().clone(),
            });
        }
        u32_only(OP, ids)?;
        let flat = ids.flatten_all()?; // [n]
        let rows = self.index_select(&flat, 0)?; // [n, H]
        let mut dims = ids.dims().to_vec();
        dims.push(self.dims()[1]);
        rows.reshape(dims)
    }

    /// A copy of `self` with `src`'s slices added along `dim` at the positions `ids` (u32, rank
    /// 1): `out[.., ids[j], ..] += src[.., j, ..]`; repeated ids accumulate. `src` has `self`'s
    /// shape except `ids.len()` along `dim`.
    ///
    /// Backward: `dself = g`, `dsrc = g.index_select(ids, dim)`.
    pub fn index_add(&self, ids: &Tensor, src: &Tensor, dim: isize) -> Result<Tensor> {
        const OP: &str = "index_add";
        let d = self.shape().dim(OP, dim)?;
        ids_rank1(OP, self, ids)?;
        same_dtype(OP, self, src)?;
        same_device(OP, self, src)?;
        float_only(OP, self)?;
        check_same_but(OP, self.shape(), src.shape(), d)?;
        if src.dims()[d] != ids.elem_count() {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: ids.shape().clone(),
                rhs: src.shape().clone(),
            });
        }
        let s = self.storage().index_add(
            self.layout(),
            &ids.storage(),
            ids.layout(),
            &src.storage(),
            src.layout(),
            d,
        )?;
        // Only the ids are read.
        let inputs = [
            Input::GraphOnly(self),
            Input::Keep(ids),
            Input::GraphOnly(src),
        ];
        let node = Node::record_with(OP, &inputs, Output::Unread, move |x, _, g| {
            let dself = x[0].tracks_grad().then(|| g.clone());
            let dsrc = x[2]
                .tracks_grad()
                .then(|| g.index_select(&x[1], d as isize))
                .transpose()?;
            Ok(vec![dself, None, dsrc])
        });
        Ok(Tensor::from_storage(s, self.shape().clone(), node))
    }

    /// Weighted scatter-add of slices (the MoE combine): `out[.., ids[j], ..] += weights[j] ·
    /// src[.., j, ..]`, with `weights` of shape `[ids.len()]` and `src`'s dtype.
    ///
    /// Composite (`src ⊙ weights` broadcast along `dim`, then `index_add`), so gradients reach
    /// `self` (`g`), `src` (`weights[j] · g[.., ids[j], ..]`) and `weights`
    /// (`Σ g[.., ids[j], ..] ⊙ src[.., j, ..]`).
    pub fn index_add_weighted(
        &self,
        ids: &Tensor,
        src: &Tensor,
        weights: &Tensor,
        dim: isize,
    ) -> Result<Tensor> {
        const OP: &str = "index_add_weighted";
        let d = self.shape().dim(OP, dim)?;
        ids_rank1(OP, self, ids)?;
        same_dtype(OP, src, weights)?;
        same_device(OP, src, weights)?;
        check_same_but(OP, self.shape(), src.shape(), d)?;
        let n = ids.elem_count();
        if weights.dims() != [n] || src.dims()[d] != n {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: weights.shape().clone(),
                rhs: src.shape().clone(),
            });
        }
        let mut wd = vec![1; src.rank()];
        wd[d] = n;
        let scaled = src.mul(&weights.reshape(wd)?)?; // src's shape
        self.index_add(ids, &scaled, dim)
    }

    /// `out[.., i, ..] = self[.., ids[.., i, ..], ..]` along `dim`: `ids` (u32) has the output's
    /// shape, which is `self`'s except along `dim`.
    ///
    /// Backward: `dself = zeros.scatter_add(ids, g, dim)`.
    pub fn gather(&self, ids: &Tensor, dim: isize) -> Result<Tensor> {
        const OP: &str = "gather";
        let d = self.shape().dim(OP, dim)?;
        u32_only(OP, ids)?;
        same_device(OP, self, ids)?;
        check_same_but(OP, self.shape(), ids.shape(), d)?;
        let s = self
            .storage()
            .gather(self.layout(), &ids.storage(), ids.layout(), d)?;
        // Only the ids are read (and the source's shape).
        let inputs = [Input::GraphOnly(self), Input::Keep(ids)];
        let node = Node::record_with(OP, &inputs, Output::Unread, move |x, _, g| {
            let dx = x[0].zeros_like()?.scatter_add(&x[1], g, d as isize)?;
            Ok(vec![Some(dx), None])
        });
        Ok(Tensor::from_storage(s, ids.shape().clone(), node))
    }

    /// A copy of `self` with `out[.., ids[.., i, ..], ..] += src[.., i, ..]` along `dim`: `ids`
    /// (u32) has `src`'s shape, which is `self`'s except along `dim`. Repeated ids accumulate.
    ///
    /// Backward: `dself = g`, `dsrc = g.gather(ids, dim)`.
    pub fn scatter_add(&self, ids: &Tensor, src: &Tensor, dim: isize) -> Result<Tensor> {
        const OP: &str = "scatter_add";
        let d = self.shape().dim(OP, dim)?;
        u32_only(OP, ids)?;
        same_dtype(OP, self, src)?;
        same_device(OP, self, src)?;
        same_device(OP, self, ids)?;
        float_only(OP, self)?;
        check_same_but(OP, self.shape(), src.shape(), d)?;
        if ids.shape() != src.shape() {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: ids.shape().clone(),
                rhs: src.shape().clone(),
            });
        }
        let s = self.storage().scatter_add(
            self.layout(),
            &ids.storage(),
            ids.layout(),
            &src.storage(),
            src.layout(),
            d,
        )?;
        // Only the ids are read.
        let inputs = [
            Input::GraphOnly(self),
            Input::Keep(ids),
            Input::GraphOnly(src),
        ];
        let node = Node::record_with(OP, &inputs, Output::Unread, move |x, _, g| {
            let dself = x[0].tracks_grad().then(|| g.clone());
            let dsrc = x[2]
                .tracks_grad()
                .then(|| g.gather(&x[1], d as isize))
                .transpose()?;
            Ok(vec![dself, None, dsrc])
        });
        Ok(Tensor::from_storage(s, self.shape().clone(), node))
    }

    /// The `k` largest values along the last dim and their indices (u32), largest first; equal
    /// values keep the lower index first and NaN counts as the largest value. Both are
    /// `[.., k]`. The selection runs on the device; `values = self.gather(indices, -1)`, so the
    /// gradient flows to the selected elements.
    pub fn topk(&self, k: usize) -> Result<(Tensor, Tensor)> {
        const OP: &str = "topk";
        let Some(&n) = self.dims().last() else {
            return Err(Error::RankMismatch {
                op: OP,
                expected: 1,
                shape: self.shape().clone(),
            });
        };
        if k > n {
            return Err(Error::invalid(
                OP,
                format!("k = {k} exceeds the last dim of shape {}", self.shape()),
            ));
        }
        let s = self.storage().topk_indices(self.layout(), k)?;
        let mut dims = self.dims().to_vec();
        let last = dims.len() - 1;
        dims[last] = k;
        let indices = Tensor::from_storage(s, dims, None); // [.., k] u32
        let values = self.gather(&indices, -1)?; // [.., k]
        Ok((values, indices))
    }
}
