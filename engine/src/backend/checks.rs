//! Shape checks and index arithmetic shared by the backends and the tensor-level ops.

use crate::{Error, Layout, Result, Shape};

/// `(outer, size, inner)` of `dims` around `dim`.
pub(crate) fn split(dims: &[usize], dim: usize) -> (usize, usize, usize) {
    let outer = dims[..dim].iter().product();
    let inner = dims[dim + 1..].iter().product();
    (outer, dims[dim], inner)
}

/// `dim` is a dim of the view `l`.
pub(crate) fn check_dim(op: &'static str, l: &Layout, dim: usize) -> Result<()> {
    if dim >= l.dims().len() {
        return Err(Error::DimOutOfRange {
            op,
            dim: dim as isize,
            shape: l.shape().clone(),
        });
    }
    Ok(())
}

/// `a` and `b` have the same rank and agree on every dim except `dim`.
pub(crate) fn check_same_but(op: &'static str, a: &Shape, b: &Shape, dim: usize) -> Result<()> {
    let ok = a.rank() == b.rank()
        && a.dims()
            .iter()
            .zip(b.dims())
            .enumerate()
            .all(|(d, (x, y))| d == dim || x == y);
    if !ok {
        return Err(Error::ShapeMismatch {
            op,
            lhs: a.clone(),
            rhs: b.clone(),
        });
    }
    Ok(())
}
