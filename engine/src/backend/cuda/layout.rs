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

    /// This view counted in units of `u` consecutive elements, for kernels that move whole units
    /// (copy_u128, copy_u64): the last dim's length, the other strides and the offset divided by
    /// `u`. `None` unless the view has a last dim of stride 1 whose length is a multiple of `u`
    /// and every other stride and the offset are multiples of `u`. Unit `i` of the result is then
    /// elements `i·u .. i·u + u` of the view (row-major), contiguous in memory and starting at
    /// `u` times the result's index, whichever dims were merged.
    pub(crate) fn in_units(&self, u: u32) -> Option<Self> {
        let r = self.rank as usize;
        if u == 0 || r == 0 || self.strides[r - 1] != 1 || self.dims[r - 1] % u != 0 {
            return None;
        }
        if self.offset % u != 0 || self.strides[..r - 1].iter().any(|s| s % u != 0) {
            return None;
        }
        let mut out = *self;
        out.offset /= u;
        out.dims[r - 1] /= u;
        for s in &mut out.strides[..r - 1] {
            *s /= u;
        }
        Some(out)
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

    #[test]
    fn unit_views() {
        // [b, t, h, d] viewed as [b, h, t, d]: rank 4, in units of 8 the last dim is d / 8.
        let l = Layout::contiguous([2, 5, 3, 64]).transpose(1, 2);
        let a = StridedArg::new("t", &l).unwrap().in_units(8).unwrap();
        assert_eq!((a.rank, a.offset), (4, 0));
        assert_eq!(a.dims[..4], [2, 3, 5, 8]);
        assert_eq!(a.strides[..4], [120, 8, 24, 1]);
        // A contiguous run stays one run.
        let c = StridedArg::new("t", &Layout::contiguous([4, 16])).unwrap();
        let u = c.in_units(4).unwrap();
        assert_eq!((u.rank, u.offset, u.dims[0], u.strides[0]), (1, 0, 16, 1));
        // Offsets and strides in whole units only; a last dim of stride 1 and whole units.
        let n = StridedArg::new("t", &Layout::contiguous([4, 80]).narrow(1, 8, 64)).unwrap();
        let u = n.in_units(8).unwrap();
        assert_eq!((u.rank, u.offset), (2, 1));
        assert_eq!(
            (u.dims[0], u.dims[1], u.strides[0], u.strides[1]),
            (4, 8, 10, 1)
        );
        assert_eq!(n.in_units(16), None);
        let odd = StridedArg::new("t", &Layout::contiguous([4, 80]).narrow(1, 1, 64)).unwrap();
        assert_eq!(odd.in_units(8), None);
        assert_eq!(odd.in_units(1), Some(odd));
        let short = StridedArg::new("t", &Layout::contiguous([3, 5, 6]).transpose(0, 1)).unwrap();
        assert_eq!(short.in_units(4), None);
        assert!(short.in_units(2).is_some());
        let t = StridedArg::new("t", &Layout::contiguous([8, 8]).transpose(0, 1)).unwrap();
        assert_eq!(t.in_units(2), None);
        // A broadcast (stride 0) dim is a whole number of units.
        let b = Layout::contiguous([16])
            .broadcast_as("t", &crate::Shape::from([3, 16]))
            .unwrap();
        let u = StridedArg::new("t", &b).unwrap().in_units(8).unwrap();
        assert_eq!((u.rank, u.dims[0], u.dims[1], u.strides[0]), (2, 3, 2, 0));
        assert_eq!(
            StridedArg::new("t", &Layout::contiguous(()))
                .unwrap()
                .in_units(1),
            None
        );
    }

    /// `strided_at` of common.cuh.
    fn at(l: &StridedArg, mut i: u32) -> u32 {
        let mut off = l.offset;
        for d in (0..l.rank as usize).rev() {
            off += (i % l.dims[d]) * l.strides[d];
            i /= l.dims[d];
        }
        off
    }

    #[test]
    fn units_cover_the_elements_in_order() {
        let shape = crate::Shape::from([3, 16]);
        let views = [
            Layout::contiguous([2, 5, 3, 24]).transpose(1, 2),
            Layout::contiguous([2, 5, 3, 12]).permute(&[2, 0, 1, 3]),
            Layout::contiguous([4, 1, 80]).narrow(2, 8, 64),
            Layout::contiguous([4, 80]).narrow(1, 4, 40).narrow(0, 1, 3),
            Layout::contiguous([6, 2, 8]).narrow(0, 2, 3),
            Layout::contiguous([16]).broadcast_as("t", &shape).unwrap(),
            Layout::contiguous([7, 8]).transpose(0, 1),
            Layout::contiguous([1000]).narrow(0, 8, 992),
        ];
        let mut checked = 0;
        for l in &views {
            let e = StridedArg::new("t", l).unwrap();
            // The kernels' indexing walks the view as the layout's own iterator does.
            let want: Vec<u32> = l.strided_indices().map(|i| i as u32).collect();
            let got: Vec<u32> = (0..l.elem_count() as u32).map(|i| at(&e, i)).collect();
            assert_eq!(got, want, "{l:?}");
            for u in [2u32, 4, 8, 16] {
                let Some(w) = e.in_units(u) else { continue };
                checked += 1;
                for (i, &addr) in want.iter().enumerate() {
                    let i = i as u32;
                    assert_eq!(at(&w, i / u) * u + i % u, addr, "{l:?} in units of {u}");
                }
            }
        }
        assert!(checked >= 10, "only {checked} unit views");
    }
}
