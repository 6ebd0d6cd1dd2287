//! The strided-view argument that elementwise kernels take by value (`Strided` in
//! kernels/src/common.cuh), and the checks that keep every index inside 32 bits.

use cudarc::driver::DeviceRepr;

use crate::{Error, Layout, Result};

/// Most dims a view may have after merging (`MAX_DIMS` in common.cuh).
pub(crate) const MAX_DIMS: usize = 8;

/// `struct Strided` of common.cuh: element `i` (row-major over `dims`) lives at
/// `offset + Σ idx[d] * strides[d]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct StridedArg {
    pub rank: u32,
    pub offset: u32,
    pub dims: [u32; MAX_DIMS],
    pub strides: [u32; MAX_DIMS],
}

// SAFETY: a plain `#[repr(C)]` struct of u32s with the exact layout of `struct Strided` in
// common.cuh (2 + 2 * MAX_DIMS u32s, no padding); it is passed by value as a kernel parameter.
unsafe impl DeviceRepr for StridedArg {}

pub(crate) fn to_u32(op: &'static str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| {
        Error::invalid(
            op,
            format!("size {v} exceeds the 32-bit indexing of the CUDA kernels"),
        )
    })
}

/// [`to_u32`] of each size in turn (the first that does not fit is the error).
pub(crate) fn to_u32s<const N: usize>(op: &'static str, v: [usize; N]) -> Result<[u32; N]> {
    let mut out = [0u32; N];
    for (o, v) in out.iter_mut().zip(v) {
        *o = to_u32(op, v)?;
    }
    Ok(out)
}

impl StridedArg {
    /// The view `l`, with size-1 dims dropped and dims that are contiguous with each other merged,
    /// so most views become rank 1 or 2. Errors when it needs more than `MAX_DIMS` dims or an index
    /// beyond 32 bits.
    pub(crate) fn new(op: &'static str, l: &Layout) -> Result<Self> {
        to_u32(op, l.max_extent())?;
        to_u32(op, l.elem_count())?;
        let mut dims: Vec<usize> = Vec::with_capacity(l.dims().len());
        let mut strides: Vec<usize> = Vec::with_capacity(l.dims().len());
        for (&d, &s) in l.dims().iter().zip(l.strides()) {
            if d == 1 {
                continue;
            }
            match (dims.last_mut(), strides.last_mut()) {
                // The previous dim steps exactly over this one: merge them.
                (Some(pd), Some(ps)) if *ps == s * d => {
                    *pd *= d;
                    *ps = s;
                }
                _ => {
                    dims.push(d);
                    strides.push(s);
                }
            }
        }
        if dims.len() > MAX_DIMS {
            return Err(Error::invalid(
                op,
                format!(
                    "view {:?} with strides {:?} has more than {MAX_DIMS} non-mergeable dims",
                    l.dims(),
                    l.strides()
                ),
            ));
        }
        let mut arg = StridedArg {
            rank: dims.len() as u32,
            offset: to_u32(op, l.offset())?,
            ..Default::default()
        };
        for (i, (&d, &s)) in dims.iter().zip(&strides).enumerate() {
            arg.dims[i] = d as u32;
            arg.strides[i] = s as u32;
        }
        Ok(arg)
    }

    /// A rank-4 view kept as it is (no merging), for kernels that index dims by position (rope).
    pub(crate) fn rank4(op: &'static str, l: &Layout) -> Result<Self> {
        to_u32(op, l.max_extent())?;
        let mut arg = StridedArg {
            rank: 4,
            offset: to_u32(op, l.offset())?,
            ..Default::default()
        };
        for i in 0..4 {
            arg.dims[i] = to_u32(op, l.dims()[i])?;
            arg.strides[i] = to_u32(op, l.strides()[i])?;
        }
        Ok(arg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_contiguous_and_drops_unit_dims() {
        let a = StridedArg::new("t", &Layout::contiguous([2, 3, 4])).unwrap();
        assert_eq!((a.rank, a.dims[0], a.strides[0]), (1, 24, 1));
        let t = Layout::contiguous([2, 3, 1]).transpose(0, 1);
        let a = StridedArg::new("t", &t).unwrap();
        assert_eq!(a.rank, 2);
        assert_eq!((a.dims[0], a.dims[1]), (3, 2));
        assert_eq!((a.strides[0], a.strides[1]), (1, 3));
        let n = Layout::contiguous([4, 6]).narrow(1, 2, 3);
        let a = StridedArg::new("t", &n).unwrap();
        assert_eq!((a.rank, a.offset, a.strides[0], a.strides[1]), (2, 2, 6, 1));
        let s = StridedArg::new("t", &Layout::contiguous(())).unwrap();
        assert_eq!(s.rank, 0);
    }
}
