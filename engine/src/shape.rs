//! Shapes, strides and layouts. A `Layout` is a view into a flat buffer: a shape, a stride per dim
//! (in elements; 0 for a broadcast dim) and a start offset.

use crate::{Error, Result};

#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(Vec<usize>);

impl Shape {
    pub fn new(dims: Vec<usize>) -> Self {
        Shape(dims)
    }
    pub fn dims(&self) -> &[usize] {
        &self.0
    }
    pub fn rank(&self) -> usize {
        self.0.len()
    }
    pub fn elem_count(&self) -> usize {
        self.0.iter().product()
    }
    /// Row-major strides of a contiguous tensor of this shape.
    pub fn contiguous_strides(&self) -> Vec<usize> {
        let mut strides = vec![0; self.0.len()];
        let mut acc = 1;
        for (s, d) in strides.iter_mut().zip(self.0.iter()).rev() {
            *s = acc;
            acc *= *d;
        }
        strides
    }
    /// Resolves a possibly negative dim (`-1` is the last) against this shape.
    pub fn dim(&self, op: &'static str, dim: isize) -> Result<usize> {
        let rank = self.rank() as isize;
        let d = if dim < 0 { rank + dim } else { dim };
        if d < 0 || d >= rank {
            return Err(Error::DimOutOfRange {
                op,
                dim,
                shape: self.clone(),
            });
        }
        Ok(d as usize)
    }
    /// The shape both operands broadcast to (numpy rules: align on the right, 1 stretches).
    pub fn broadcast_with(&self, op: &'static str, rhs: &Shape) -> Result<Shape> {
        let (l, r) = (self.dims(), rhs.dims());
        let rank = l.len().max(r.len());
        let mut out = vec![0; rank];
        for i in 0..rank {
            let a = if i + l.len() >= rank {
                l[i + l.len() - rank]
            } else {
                1
            };
            let b = if i + r.len() >= rank {
                r[i + r.len() - rank]
            } else {
                1
            };
            out[i] = match (a, b) {
                (a, b) if a == b => a,
                (1, b) => b,
                (a, 1) => a,
                _ => {
                    return Err(Error::BroadcastIncompatible {
                        op,
                        lhs: self.clone(),
                        rhs: rhs.clone(),
                    })
                }
            };
        }
        Ok(Shape(out))
    }
}

impl std::fmt::Debug for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl From<Vec<usize>> for Shape {
    fn from(v: Vec<usize>) -> Self {
        Shape(v)
    }
}
impl From<&[usize]> for Shape {
    fn from(v: &[usize]) -> Self {
        Shape(v.to_vec())
    }
}
impl<const N: usize> From<[usize; N]> for Shape {
    fn from(v: [usize; N]) -> Self {
        Shape(v.to_vec())
    }
}
impl From<()> for Shape {
    fn from(_: ()) -> Self {
        Shape(vec![])
    }
}
impl From<usize> for Shape {
    fn from(v: usize) -> Self {
        Shape(vec![v])
    }
}
impl From<&Shape> for Shape {
    fn from(v: &Shape) -> Self {
        v.clone()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    shape: Shape,
    strides: Vec<usize>,
    offset: usize,
}

impl Layout {
    pub fn contiguous(shape: impl Into<Shape>) -> Self {
        let shape = shape.into();
        let strides = shape.contiguous_strides();
        Layout {
            shape,
            strides,
            offset: 0,
        }
    }
    pub fn new(shape: Shape, strides: Vec<usize>, offset: usize) -> Self {
        debug_assert_eq!(shape.rank(), strides.len());
        Layout {
            shape,
            strides,
            offset,
        }
    }
    pub fn shape(&self) -> &Shape {
        &self.shape
    }
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    pub fn offset(&self) -> usize {
        self.offset
    }
    pub fn elem_count(&self) -> usize {
        self.shape.elem_count()
    }
    /// True when the elements are stored row-major without gaps (the offset may be non-zero).
    pub fn is_contiguous(&self) -> bool {
        let mut acc = 1;
        for (&d, &s) in self.shape.dims().iter().zip(self.strides.iter()).rev() {
            if d != 1 && s != acc {
                return false;
            }
            acc *= d;
        }
        true
    }
    /// `Some((start, end))` of the flat range when contiguous.
    pub fn contiguous_range(&self) -> Option<(usize, usize)> {
        self.is_contiguous()
            .then(|| (self.offset, self.offset + self.elem_count()))
    }
    /// One past the largest flat index this layout touches (0 for an empty view).
    pub fn max_extent(&self) -> usize {
        if self.elem_count() == 0 {
            return self.offset;
        }
        self.offset
            + self
                .shape
                .dims()
                .iter()
                .zip(&self.strides)
                .map(|(d, s)| (d - 1) * s)
                .sum::<usize>()
            + 1
    }

    pub fn transpose(&self, d0: usize, d1: usize) -> Layout {
        let mut dims = self.shape.dims().to_vec();
        let mut strides = self.strides.clone();
        dims.swap(d0, d1);
        strides.swap(d0, d1);
        Layout {
            shape: Shape(dims),
            strides,
            offset: self.offset,
        }
    }
    pub fn permute(&self, perm: &[usize]) -> Layout {
        let dims = perm.iter().map(|&p| self.shape.dims()[p]).collect();
        let strides = perm.iter().map(|&p| self.strides[p]).collect();
        Layout {
            shape: Shape(dims),
            strides,
            offset: self.offset,
        }
    }
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Layout {
        let mut dims = self.shape.dims().to_vec();
        dims[dim] = len;
        Layout {
            shape: Shape(dims),
            strides: self.strides.clone(),
            offset: self.offset + start * self.strides[dim],
        }
    }
    /// A view with `shape`, reading this layout's elements with stride 0 along broadcast dims.
    pub fn broadcast_as(&self, op: &'static str, shape: &Shape) -> Result<Layout> {
        let (src, dst) = (self.shape.dims(), shape.dims());
        if dst.len() < src.len() {
            return Err(Error::BroadcastIncompatible {
                op,
                lhs: self.shape.clone(),
                rhs: shape.clone(),
            });
        }
        let lead = dst.len() - src.len();
        let mut strides = vec![0; dst.len()];
        for i in 0..src.len() {
            if src[i] == dst[lead + i] {
                strides[lead + i] = if src[i] == 1 { 0 } else { self.strides[i] };
            } else if src[i] == 1 {
                strides[lead + i] = 0;
            } else {
                return Err(Error::BroadcastIncompatible {
                    op,
                    lhs: self.shape.clone(),
                    rhs: shape.clone(),
                });
            }
        }
        Ok(Layout {
            shape: shape.clone(),
            strides,
            offset: self.offset,
        })
    }
    /// Reshape as a view when the strides allow it (numpy's no-copy reshape rule), else `None`.
    /// The caller guarantees equal element counts.
    pub fn reshape_view(&self, shape: &Shape) -> Option<Layout> {
        if self.is_contiguous() {
            return Some(Layout {
                shape: shape.clone(),
                strides: shape.contiguous_strides(),
                offset: self.offset,
            });
        }
        if self.elem_count() == 0 {
            return None;
        }
        // Old dims without size-1 entries.
        let (od, os): (Vec<usize>, Vec<usize>) = self
            .dims()
            .iter()
            .zip(&self.strides)
            .filter(|(&d, _)| d != 1)
            .map(|(&d, &s)| (d, s))
            .unzip();
        let nd = shape.dims();
        let mut ns = vec![0usize; nd.len()];
        let (mut oi, mut oj, mut ni, mut nj) = (0, 1, 0, 1);
        while ni < nd.len() && oi < od.len() {
            let (mut np, mut op) = (nd[ni], od[oi]);
            while np != op {
                if np < op {
                    np *= *nd.get(nj)?;
                    nj += 1;
                } else {
                    op *= *od.get(oj)?;
                    oj += 1;
                }
            }
            for ok in oi..oj - 1 {
                if os[ok] != od[ok + 1] * os[ok + 1] {
                    return None;
                }
            }
            ns[nj - 1] = os[oj - 1];
            for nk in (ni + 1..nj).rev() {
                ns[nk - 1] = ns[nk] * nd[nk];
            }
            ni = nj;
            nj += 1;
            oi = oj;
            oj += 1;
        }
        // Trailing new dims must be 1 (any stride will do).
        for k in ni..nd.len() {
            if nd[k] != 1 {
                return None;
            }
            ns[k] = 1;
        }
        Some(Layout {
            shape: shape.clone(),
            strides: ns,
            offset: self.offset,
        })
    }

    /// Iterates over the flat storage index of every element in row-major order of the view.
    pub fn strided_indices(&self) -> StridedIndex<'_> {
        StridedIndex::new(self)
    }

    /// Splits the view into `(outer, inner)` blocks: returns `Some((block_starts, block_len))` where
    /// each block is a run of `block_len` consecutive storage elements. Fast path for mostly
    /// contiguous views (e.g. a narrow along a leading dim, or a contiguous inner dim).
    pub fn contiguous_blocks(&self) -> (Vec<usize>, usize) {
        // Find the longest contiguous suffix of dims.
        let dims = self.shape.dims();
        let mut block = 1;
        let mut split = dims.len();
        for i in (0..dims.len()).rev() {
            if dims[i] == 1 {
                split = i;
                continue;
            }
            if self.strides[i] == block {
                block *= dims[i];
                split = i;
            } else {
                break;
            }
        }
        let outer = Layout {
            shape: Shape(dims[..split].to_vec()),
            strides: self.strides[..split].to_vec(),
            offset: self.offset,
        };
        (outer.strided_indices().collect(), block)
    }
}

/// Row-major iterator over the storage offsets of a strided view.
pub struct StridedIndex<'a> {
    next: Option<usize>,
    multi: Vec<usize>,
    dims: &'a [usize],
    strides: &'a [usize],
}

impl<'a> StridedIndex<'a> {
    fn new(l: &'a Layout) -> Self {
        let next = if l.elem_count() == 0 {
            None
        } else {
            Some(l.offset)
        };
        StridedIndex {
            next,
            multi: vec![0; l.dims().len()],
            dims: l.shape.dims(),
            strides: &l.strides,
        }
    }
}

impl Iterator for StridedIndex<'_> {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        let cur = self.next?;
        let mut idx = cur;
        let mut d = self.dims.len();
        loop {
            if d == 0 {
                self.next = None;
                break;
            }
            d -= 1;
            if self.multi[d] + 1 < self.dims[d] {
                self.multi[d] += 1;
                idx += self.strides[d];
                self.next = Some(idx);
                break;
            }
            idx -= self.multi[d] * self.strides[d];
            self.multi[d] = 0;
        }
        Some(cur)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_index_transpose() {
        let l = Layout::contiguous([2, 3]).transpose(0, 1);
        let v: Vec<usize> = l.strided_indices().collect();
        assert_eq!(v, vec![0, 3, 1, 4, 2, 5]);
        assert!(!l.is_contiguous());
    }

    #[test]
    fn broadcast_shapes() {
        let a = Shape::from([3, 1, 4]);
        let b = Shape::from([5, 4]);
        assert_eq!(a.broadcast_with("t", &b).unwrap(), Shape::from([3, 5, 4]));
        assert!(Shape::from([3])
            .broadcast_with("t", &Shape::from([4]))
            .is_err());
        let l = Layout::contiguous([5, 1])
            .broadcast_as("t", &Shape::from([2, 5, 3]))
            .unwrap();
        let v: Vec<usize> = l.strided_indices().take(7).collect();
        assert_eq!(v, vec![0, 0, 0, 1, 1, 1, 2]);
    }

    #[test]
    fn reshape_views_without_copy() {
        // A transposed [2,3] cannot be flattened without a copy...
        let t = Layout::contiguous([2, 3]).transpose(0, 1);
        assert!(t.reshape_view(&Shape::from([6])).is_none());
        // ...but splitting a dim of it can.
        let v = t.reshape_view(&Shape::from([3, 2, 1])).unwrap();
        assert_eq!(v.strides()[..2], [1, 3]);
        // Merging the leading dims of a [2,3,4] narrowed on the last dim keeps a view.
        let n = Layout::contiguous([2, 3, 4]).narrow(2, 1, 2);
        let m = n.reshape_view(&Shape::from([6, 2])).unwrap();
        assert_eq!(m.strides(), &[4, 1]);
        assert_eq!(m.offset(), 1);
        // A broadcast leading dim cannot merge.
        let b = Layout::contiguous([3, 4])
            .broadcast_as("t", &Shape::from([2, 3, 4]))
            .unwrap();
        assert!(b.reshape_view(&Shape::from([6, 4])).is_none());
    }

    #[test]
    fn blocks_of_narrowed_view() {
        let l = Layout::contiguous([4, 6]).narrow(1, 2, 3);
        let (starts, len) = l.contiguous_blocks();
        assert_eq!(len, 3);
        assert_eq!(starts, vec![2, 8, 14, 20]);
    }
}
