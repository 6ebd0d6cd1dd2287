//! The causal, key-masked attention cases shared by the `softmax` tests (the fused attention
//! softmax) and the `attention` tests (`causal_attention` built on it): `Case` and its table
//! `cases()` for the CPU tests, `Mask` for the GPU parity tests.

use engine::{DType, Device, Tensor};
use testutil::ids;

const CPU: Device = Device::Cpu;

/// One case: `b` sequences, `h` query heads over `hkv` kv heads, `t` queries at `q_offset`, `s`
/// keys, head dim `d`, an optional key mask `[b, s]`.
#[derive(Clone, Debug)]
pub(crate) struct Case {
    pub(crate) b: usize,
    pub(crate) h: usize,
    pub(crate) hkv: usize,
    pub(crate) t: usize,
    pub(crate) s: usize,
    pub(crate) d: usize,
    pub(crate) q_offset: usize,
    pub(crate) mask: Option<Vec<u32>>,
}

impl Case {
    pub(crate) fn new(b: usize, h: usize, t: usize, s: usize, q_offset: usize) -> Self {
        Case {
            b,
            h,
            hkv: h,
            t,
            s,
            d: 8,
            q_offset,
            mask: None,
        }
    }
    pub(crate) fn gqa(mut self, hkv: usize) -> Self {
        self.hkv = hkv;
        self
    }
    pub(crate) fn head_dim(mut self, d: usize) -> Self {
        self.d = d;
        self
    }
    /// Sequence `bi` has `pad(bi)` padding keys at the start (left padding).
    pub(crate) fn left_pad(mut self, pad: impl Fn(usize) -> usize) -> Self {
        let s = self.s;
        self.mask = Some(
            (0..self.b * s)
                .map(|p| u32::from(p % s >= pad(p / s)))
                .collect(),
        );
        self
    }
    /// Sequence `bi` has `len(bi)` real keys, then padding (right padding).
    pub(crate) fn right_pad(mut self, len: impl Fn(usize) -> usize) -> Self {
        let s = self.s;
        self.mask = Some(
            (0..self.b * s)
                .map(|p| u32::from(p % s < len(p / s)))
                .collect(),
        );
        self
    }
    /// Sequence `bi` packs segments of the lengths `lens(bi)` (ids 1, 2, ..), then padding.
    pub(crate) fn packed(mut self, lens: impl Fn(usize) -> Vec<usize>) -> Self {
        let s = self.s;
        let mut mask = vec![0u32; self.b * s];
        for bi in 0..self.b {
            let mut at = bi * s;
            for (id, len) in lens(bi).into_iter().enumerate() {
                mask[at..at + len].fill(id as u32 + 1);
                at += len;
            }
            assert!(at <= (bi + 1) * s, "segments longer than the row");
        }
        self.mask = Some(mask);
        self
    }
    pub(crate) fn mask_tensor(&self) -> Option<Tensor> {
        self.mask.as_ref().map(|m| ids(m, &[self.b, self.s]))
    }
    /// Key `j` is visible to query `i` of sequence `bi`: causal, not padding and, for a query
    /// of a segment (mask value not 0), of the same segment.
    pub(crate) fn visible(&self, bi: usize, i: usize, j: usize) -> bool {
        j <= self.q_offset + i
            && self
                .mask
                .as_ref()
                .is_none_or(|m| segment_sees(&m[bi * self.s..][..self.s], self.q_offset + i, j))
    }
    /// Whether row `(bi, i)` has at least one visible key.
    pub(crate) fn row_sees(&self, bi: usize, i: usize) -> bool {
        (0..self.s).any(|j| self.visible(bi, i, j))
    }
    /// The old mask bias `[b, 1, t, s]`: 0 where visible, −1e9 elsewhere.
    pub(crate) fn bias(&self, dtype: DType) -> Tensor {
        let (b, t, s) = (self.b, self.t, self.s);
        let v: Vec<f64> = (0..b * t * s)
            .map(|p| {
                let (bi, i, j) = (p / (t * s), (p / s) % t, p % s);
                if self.visible(bi, i, j) {
                    0.0
                } else {
                    -1e9
                }
            })
            .collect();
        Tensor::from_f64(&v, [b, 1, t, s], dtype, CPU).unwrap()
    }
    pub(crate) fn scale(&self) -> f64 {
        1.0 / (self.d as f64).sqrt()
    }
}

/// Whether the query at position `p` of a row with key mask `row` (0 padding, else a segment)
/// sees key `j`, causality aside: `j` is not padding, and of the query's segment unless the query
/// is padding (or past the row).
pub(crate) fn segment_sees(row: &[u32], p: usize, j: usize) -> bool {
    let sq = row.get(p).copied().unwrap_or(0);
    row[j] != 0 && (sq == 0 || row[j] == sq)
}

pub(crate) fn cases() -> Vec<Case> {
    let mut v = vec![
        // t == s, no mask.
        Case::new(2, 3, 7, 7, 0),
        // t < s with a query offset (KV-cache decoding), and fewer queries than the cache allows.
        Case::new(2, 2, 3, 9, 6),
        Case::new(1, 2, 2, 9, 2),
        // One query per row, s = 1.
        Case::new(3, 2, 1, 1, 0),
        // Right padding: every query sees a key.
        Case::new(2, 2, 6, 6, 0).right_pad(|bi| 6 - 2 * bi),
        // Left padding: the first queries of sequence 1 and 2 see no key.
        Case::new(3, 2, 5, 5, 0).left_pad(|bi| bi * 2),
        // Offset and a padded slot in the middle.
        Case::new(2, 2, 2, 5, 3).right_pad(|_| 5).left_pad(|bi| bi),
        // Grouped-query heads (group 3), left padding.
        Case::new(2, 6, 4, 4, 0).gqa(2).left_pad(|bi| 3 * bi),
        // Large enough for the parallel path (b·h·t·s > 16384), GQA and left padding.
        Case::new(2, 9, 40, 64, 24)
            .gqa(3)
            .head_dim(16)
            .left_pad(|bi| 20 * bi),
    ];
    // Packed sequences (segments 1, 2, ..): block-diagonal, then padding.
    v.extend(packed_cases());
    v
}

/// Rows that pack several sequences (key mask values 1, 2, .. per segment, 0 padding).
pub(crate) fn packed_cases() -> Vec<Case> {
    vec![
        // Three and two segments, padding after the second row's.
        Case::new(2, 2, 9, 9, 0).packed(|bi| if bi == 0 { vec![3, 4, 2] } else { vec![5, 2] }),
        // Grouped-query heads, a one-token segment, a query offset.
        Case::new(2, 4, 5, 8, 3)
            .gqa(2)
            .packed(|bi| if bi == 0 { vec![2, 1, 5] } else { vec![4, 3] }),
        // Large enough for the parallel path (b·h·t·s > 16384).
        Case::new(2, 6, 48, 64, 16)
            .gqa(3)
            .head_dim(16)
            .packed(|bi| vec![17, 9, 30 - 4 * bi]),
    ]
}

/// Splits `got` and `want` (`[b, h, t, w]` row-major) into the rows with a visible key (kept for
/// comparison) and checks the others are exactly zero in `got`.
pub(crate) fn visible_rows(
    c: &Case,
    h: usize,
    w: usize,
    got: &[f64],
    want: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let (mut g, mut r) = (Vec::new(), Vec::new());
    for (row, (gr, wr)) in got.chunks(w).zip(want.chunks(w)).enumerate() {
        let (bi, i) = (row / (h * c.t), row % c.t);
        if c.row_sees(bi, i) {
            g.extend_from_slice(gr);
            r.extend_from_slice(wr);
        } else {
            assert!(
                gr.iter().all(|&v| v == 0.0),
                "{c:?}: row {row} has no visible key but is not all zero: {gr:?}"
            );
        }
    }
    (g, r)
}

#[cfg(feature = "cuda")]
/// Key masks `[b, s]` as u32 values.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Mask {
    None,
    /// Sequence `bi` starts with `bi · s / (b + 1)` padding keys: its first queries see none.
    Left,
    /// About one key in four is padding, at random.
    Random,
    /// Packed segments of 1 to 97 tokens (ids 1, 2, ..), each row ending in padding.
    Packed,
}

#[cfg(feature = "cuda")]
impl Mask {
    pub(crate) fn values(self, b: usize, s: usize) -> Option<Vec<u32>> {
        match self {
            Mask::None => None,
            Mask::Left => Some(
                (0..b * s)
                    .map(|p| u32::from(p % s >= (p / s) * s / (b + 1)))
                    .collect(),
            ),
            Mask::Random => Some(
                (0..(b * s) as u64)
                    .map(|i| u32::from(engine::rng::uniform(91, i) >= 0.25))
                    .collect(),
            ),
            Mask::Packed => {
                let mut m = vec![0u32; b * s];
                for (bi, row) in m.chunks_mut(s).enumerate() {
                    let (mut at, mut id, mut k) = (0, 1u32, 0u64);
                    // Stop a few keys short of the row's end: the last keys are padding.
                    while at + 3 < s {
                        let u = engine::rng::uniform(92 + bi as u64, k);
                        let len = (1 + (u * 97.0) as usize).min(s - 3 - at);
                        row[at..at + len].fill(id);
                        (at, id, k) = (at + len, id + 1, k + 1);
                    }
                }
                Some(m)
            }
        }
    }
}
