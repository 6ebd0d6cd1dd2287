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
    pub(crate) fn mask_tensor(&self) -> Option<Tensor> {
        self.mask.as_ref().map(|m| ids(m, &[self.b, self.s]))
    }
    pub(crate) fn visible(&self, bi: usize, i: usize, j: usize) -> bool {
        j <= self.q_offset + i && self.mask.as_ref().is_none_or(|m| m[bi * self.s + j] != 0)
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

pub(crate) fn cases() -> Vec<Case> {
    vec![
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
        }
    }
}
