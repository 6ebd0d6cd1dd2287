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

/// `[b, h, t, s]` of a causal softmax over scores `l`, checked: rank 4, and a key mask, when
/// given, u32 `[b, s]`.
pub(crate) fn causal_softmax_dims(
    op: &'static str,
    l: &Layout,
    mask: Option<(crate::DType, &Layout)>,
) -> Result<[usize; 4]> {
    let &[b, h, t, s] = l.dims() else {
        return Err(Error::RankMismatch {
            op,
            expected: 4,
            shape: l.shape().clone(),
        });
    };
    if let Some((dtype, ml)) = mask {
        if dtype != crate::DType::U32 {
            return Err(Error::UnsupportedDType { op, dtype });
        }
        if ml.dims() != [b, s] {
            return Err(Error::ShapeMismatch {
                op,
                lhs: l.shape().clone(),
                rhs: ml.shape().clone(),
            });
        }
    }
    Ok([b, h, t, s])
}

/// Checks the operands of a softmax backward: `y` and `g` of one shape. Returns the row length
/// (the last dim; 1 for a scalar, like the forward).
pub(crate) fn softmax_backward_dims(op: &'static str, l: &Layout, gl: &Layout) -> Result<usize> {
    if gl.shape() != l.shape() {
        return Err(Error::ShapeMismatch {
            op,
            lhs: l.shape().clone(),
            rhs: gl.shape().clone(),
        });
    }
    Ok(l.dims().last().copied().unwrap_or(1))
}

/// `(b, n1, n2, d, bc, seq_dim)` of a rope call, checked: `x: [b, n1, n2, d]` with even `d` and
/// positions along dim `seq_dim` (1 or 2) of length `t`, `cos`/`sin`: `[bc, t, d/2]` with `bc` 1
/// or `b`.
pub(crate) fn rope_dims(
    l: &Layout,
    cl: &Layout,
    sl: &Layout,
    seq_dim: usize,
) -> Result<[usize; 6]> {
    let xd = l.dims();
    if xd.len() != 4 {
        return Err(Error::RankMismatch {
            op: "rope",
            expected: 4,
            shape: l.shape().clone(),
        });
    }
    if !(seq_dim == 1 || seq_dim == 2) {
        return Err(Error::invalid(
            "rope",
            format!("positions along dim {seq_dim}: neither 1 nor 2"),
        ));
    }
    let (b, n1, n2, d) = (xd[0], xd[1], xd[2], xd[3]);
    if d % 2 != 0 {
        return Err(Error::invalid(
            "rope",
            format!("head dim {d} of {} is odd", l.shape()),
        ));
    }
    let t = xd[seq_dim];
    let cd = cl.dims();
    let ok = cd.len() == 3 && (cd[0] == 1 || cd[0] == b) && cd[1] == t && cd[2] == d / 2;
    if !ok || sl.shape() != cl.shape() {
        let bad = if ok { sl } else { cl };
        return Err(Error::ShapeMismatch {
            op: "rope",
            lhs: l.shape().clone(),
            rhs: bad.shape().clone(),
        });
    }
    Ok([b, n1, n2, d, cd[0], seq_dim])
}

/// The dims of a rank-2 view.
pub(crate) fn dims2(op: &'static str, l: &Layout) -> Result<(usize, usize)> {
    match l.dims() {
        &[a, b] => Ok((a, b)),
        _ => Err(Error::RankMismatch {
            op,
            expected: 2,
            shape: l.shape().clone(),
        }),
    }
}

/// The error of two views whose shapes do not fit together.
pub(crate) fn shape_mismatch(op: &'static str, a: &Layout, b: &Layout) -> Error {
    Error::ShapeMismatch {
        op,
        lhs: a.shape().clone(),
        rhs: b.shape().clone(),
    }
}
