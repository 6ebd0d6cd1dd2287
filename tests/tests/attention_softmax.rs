//! The fused attention softmax (`Tensor::causal_masked_softmax`, the backend's `causal_softmax`
//! and `softmax_backward`) and `causal_attention` built on it: values against the composite they
//! replace (scaled scores + an additive −1e9 mask bias + softmax), in f32 and f64, for t < s with
//! a query offset, t == s, key masks with right and left padding, grouped-query heads, strided
//! inputs and rows large enough for the parallel path; rows with no visible key (all zero) are
//! checked on their own; gradient checks in f64; shape and dtype errors.

use engine::backend::cpu::CpuStorage;
use engine::backend::BackendStorage;
use engine::{causal_attention, DType, Device, Error, Layout, Tensor};
use testutil::{check_gradients, ids, randn, rel_err};

const CPU: Device = Device::Cpu;

fn vals(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
}

/// One case: `b` sequences, `h` query heads over `hkv` kv heads, `t` queries at `q_offset`, `s`
/// keys, head dim `d`, an optional key mask `[b, s]`.
#[derive(Clone, Debug)]
struct Case {
    b: usize,
    h: usize,
    hkv: usize,
    t: usize,
    s: usize,
    d: usize,
    q_offset: usize,
    mask: Option<Vec<u32>>,
}

impl Case {
    fn new(b: usize, h: usize, t: usize, s: usize, q_offset: usize) -> Self {
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
    fn gqa(mut self, hkv: usize) -> Self {
        self.hkv = hkv;
        self
    }
    fn head_dim(mut self, d: usize) -> Self {
        self.d = d;
        self
    }
    /// Sequence `bi` has `pad(bi)` padding keys at the start (left padding).
    fn left_pad(mut self, pad: impl Fn(usize) -> usize) -> Self {
        let s = self.s;
        self.mask = Some(
            (0..self.b * s)
                .map(|p| u32::from(p % s >= pad(p / s)))
                .collect(),
        );
        self
    }
    /// Sequence `bi` has `len(bi)` real keys, then padding (right padding).
    fn right_pad(mut self, len: impl Fn(usize) -> usize) -> Self {
        let s = self.s;
        self.mask = Some(
            (0..self.b * s)
                .map(|p| u32::from(p % s < len(p / s)))
                .collect(),
        );
        self
    }
    fn mask_tensor(&self) -> Option<Tensor> {
        self.mask.as_ref().map(|m| ids(m, &[self.b, self.s]))
    }
    fn visible(&self, bi: usize, i: usize, j: usize) -> bool {
        j <= self.q_offset + i && self.mask.as_ref().is_none_or(|m| m[bi * self.s + j] != 0)
    }
    /// Whether row `(bi, i)` has at least one visible key.
    fn row_sees(&self, bi: usize, i: usize) -> bool {
        (0..self.s).any(|j| self.visible(bi, i, j))
    }
    /// The old mask bias `[b, 1, t, s]`: 0 where visible, −1e9 elsewhere.
    fn bias(&self, dtype: DType) -> Tensor {
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
    fn scale(&self) -> f64 {
        1.0 / (self.d as f64).sqrt()
    }
}

fn cases() -> Vec<Case> {
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
fn visible_rows(c: &Case, h: usize, w: usize, got: &[f64], want: &[f64]) -> (Vec<f64>, Vec<f64>) {
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

/// The fused softmax equals `softmax(scale·x + bias)` on rows with a visible key, is exactly zero
/// at masked keys and on rows with none, for contiguous and transposed scores.
#[test]
fn masked_softmax_matches_composite() {
    for (n, c) in cases().into_iter().enumerate() {
        let (b, h, t, s) = (c.b, c.h, c.t, c.s);
        let mask = c.mask_tensor();
        for (dtype, tol) in [(DType::F64, 1e-13), (DType::F32, 1e-6)] {
            let x = randn(&[b, h, t, s], 200 + n as u64)
                .mul_scalar(3.0)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            // The same scores through a transposed view: [b, h, s, t] seen as [b, h, t, s].
            let xt = x
                .transpose(2, 3)
                .unwrap()
                .contiguous()
                .unwrap()
                .transpose(2, 3)
                .unwrap();
            assert!(!xt.is_contiguous() || t == 1 || s == 1);
            let want = x
                .mul_scalar(c.scale())
                .unwrap()
                .add(&c.bias(dtype))
                .unwrap()
                .softmax_last_dim()
                .unwrap();
            for (name, input) in [("contiguous", &x), ("transposed", &xt)] {
                let got = input
                    .causal_masked_softmax(c.scale(), c.q_offset, mask.as_ref())
                    .unwrap();
                assert_eq!(got.dims(), &[b, h, t, s]);
                assert_eq!(got.dtype(), dtype);
                let gv = vals(&got);
                // Exactly zero at every masked key.
                for (p, &v) in gv.iter().enumerate() {
                    let (bi, i, j) = (p / (h * t * s), (p / s) % t, p % s);
                    if !c.visible(bi, i, j) {
                        assert_eq!(v, 0.0, "{c:?} {dtype} {name}: masked key at {p} is {v}");
                    }
                }
                let (g, w) = visible_rows(&c, h, s, &gv, &vals(&want));
                let err = rel_err(&g, &w);
                assert!(err < tol, "{c:?} {dtype} {name}: rel err {err:e}");
                // Visible rows sum to one.
                for (row, r) in gv.chunks(s).enumerate() {
                    let sum: f64 = r.iter().sum();
                    let sees = c.row_sees(row / (h * t), row % t);
                    if sees {
                        assert!(
                            (sum - 1.0).abs() < 1e-5,
                            "{c:?} {dtype}: row {row} sums {sum}"
                        );
                    }
                }
            }
        }
    }
}

/// bf16 scores give the f32 result within bf16 rounding.
#[test]
fn masked_softmax_bf16_against_f32() {
    let c = Case::new(2, 3, 33, 40, 7).left_pad(|bi| 9 * bi);
    let x = randn(&[2, 3, 33, 40], 230).mul_scalar(2.0).unwrap();
    let xb = x.to_dtype(DType::BF16).unwrap();
    let mask = c.mask_tensor();
    let want = xb
        .to_dtype(DType::F32)
        .unwrap()
        .causal_masked_softmax(0.25, 7, mask.as_ref())
        .unwrap();
    let got = xb.causal_masked_softmax(0.25, 7, mask.as_ref()).unwrap();
    assert_eq!(got.dtype(), DType::BF16);
    let err = rel_err(&vals(&got), &vals(&want));
    assert!(err < 1e-2, "bf16 rel err {err:e}");
}

/// The old `causal_attention`: scaled q, one product per kv head, the −1e9 bias, softmax.
fn composite_attention(c: &Case, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    let (b, hq, hkv, t, s, d) = (c.b, c.h, c.hkv, c.t, c.s, c.d);
    let g = hq / hkv;
    let qs = q
        .mul_scalar(c.scale())
        .unwrap()
        .reshape([b, hkv, g * t, d])
        .unwrap();
    let scores = qs
        .matmul(&k.t().unwrap())
        .unwrap()
        .reshape([b, hq, t, s])
        .unwrap();
    let probs = scores
        .add(&c.bias(q.dtype()))
        .unwrap()
        .softmax_last_dim()
        .unwrap();
    probs
        .reshape([b, hkv, g * t, s])
        .unwrap()
        .matmul(v)
        .unwrap()
        .reshape([b, hq, t, d])
        .unwrap()
}

/// `causal_attention` equals the composite it replaced on rows with a visible key, forward and
/// backward (the gradients of q, k and v under a random output gradient that is zero on the
/// padding queries, which must stay out of the loss), and is zero on padding queries.
#[test]
fn causal_attention_matches_composite() {
    for (n, c) in cases().into_iter().enumerate() {
        let (b, hq, hkv, t, s, d) = (c.b, c.h, c.hkv, c.t, c.s, c.d);
        let seed = 300 + 4 * n as u64;
        let mask = c.mask_tensor();
        // Output gradient, zero on padding queries.
        let keep: Vec<f64> = (0..b * hq * t * d)
            .map(|p| {
                let (bi, i) = (p / (hq * t * d), (p / d) % t);
                f64::from(u8::from(c.row_sees(bi, i)))
            })
            .collect();
        let keep = Tensor::from_f64(&keep, [b, hq, t, d], DType::F64, CPU).unwrap();
        let gout = randn(&[b, hq, t, d], seed + 3).mul(&keep).unwrap();
        for (dtype, tol, gtol) in [(DType::F64, 1e-12, 1e-11), (DType::F32, 1e-5, 1e-4)] {
            let mk = |shape: &[usize], sd| randn(shape, sd).to_dtype(dtype).unwrap();
            let (q, k, v) = (
                mk(&[b, hq, t, d], seed),
                mk(&[b, hkv, s, d], seed + 1),
                mk(&[b, hkv, s, d], seed + 2),
            );
            let gout = gout.to_dtype(dtype).unwrap();
            let run = |fused: bool| {
                let (qv, kv, vv) = (
                    q.to_var().unwrap(),
                    k.to_var().unwrap(),
                    v.to_var().unwrap(),
                );
                let out = if fused {
                    causal_attention(&qv, &kv, &vv, mask.as_ref(), c.q_offset).unwrap()
                } else {
                    composite_attention(&c, &qv, &kv, &vv)
                };
                out.backward_with_grad(&gout).unwrap();
                let grads: Vec<Vec<f64>> = [&qv, &kv, &vv]
                    .iter()
                    .map(|x| vals(&x.grad().expect("a gradient")))
                    .collect();
                (vals(&out), grads)
            };
            let (got, got_g) = run(true);
            let (want, want_g) = run(false);
            let (g, w) = visible_rows(&c, hq, d, &got, &want);
            let err = rel_err(&g, &w);
            assert!(err < tol, "{c:?} {dtype}: output rel err {err:e}");
            for (name, (a, r)) in ["dq", "dk", "dv"].iter().zip(got_g.iter().zip(&want_g)) {
                assert!(
                    a.iter().all(|x| x.is_finite()),
                    "{c:?} {dtype}: {name} not finite"
                );
                let err = rel_err(a, r);
                assert!(err < gtol, "{c:?} {dtype}: {name} rel err {err:e}");
            }
        }
    }
}

#[test]
fn grad_masked_softmax() {
    for (n, c) in cases().into_iter().take(8).enumerate() {
        let (b, h, t, s) = (c.b, c.h, c.t, c.s);
        let mask = c.mask_tensor();
        let x = randn(&[b, h, t, s], 400 + n as u64);
        check_gradients(&format!("causal_masked_softmax {c:?}"), &[x], |x| {
            x[0].causal_masked_softmax(c.scale(), c.q_offset, mask.as_ref())
        });
    }
    // Transposed scores.
    let mask = ids(&[0, 1, 1, 1, 1, 1, 0, 0], &[2, 4]);
    check_gradients(
        "causal_masked_softmax transposed",
        &[randn(&[2, 2, 4, 3], 420)],
        |x| {
            x[0].transpose(2, 3)?
                .causal_masked_softmax(0.7, 0, Some(&mask))
        },
    );
    // The plain softmax's fused backward, on a transposed input.
    check_gradients("softmax_last_dim transposed", &[randn(&[5, 4], 421)], |x| {
        x[0].t()?.softmax_last_dim()
    });
}

#[test]
fn grad_causal_attention_fused() {
    for (n, c) in cases().into_iter().take(8).enumerate() {
        let (b, hq, hkv, t, s, d) = (c.b, c.h, c.hkv, c.t, c.s, c.d.min(4));
        let seed = 500 + 3 * n as u64;
        let mask = c.mask_tensor();
        check_gradients(
            &format!("causal_attention {c:?}"),
            &[
                randn(&[b, hq, t, d], seed),
                randn(&[b, hkv, s, d], seed + 1),
                randn(&[b, hkv, s, d], seed + 2),
            ],
            |x| causal_attention(&x[0], &x[1], &x[2], mask.as_ref(), c.q_offset),
        );
    }
}

/// The backend's `softmax_backward` against `scale · y ⊙ (g − Σ g ⊙ y)` by hand, with a
/// transposed `g`, in f64 and f32.
#[test]
fn softmax_backward_matches_formula() {
    let (rows, n, scale) = (37, 45, 0.3);
    let y = randn(&[rows, n], 600).softmax_last_dim().unwrap();
    let g = randn(&[n, rows], 601); // seen transposed
    let (yv, gt) = (vals(&y), vals(&g.t().unwrap()));
    let want: Vec<f64> = yv
        .chunks(n)
        .zip(gt.chunks(n))
        .flat_map(|(yr, gr)| {
            let dot: f64 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
            yr.iter()
                .zip(gr)
                .map(move |(a, b)| scale * a * (b - dot))
                .collect::<Vec<_>>()
        })
        .collect();
    for (dtype, tol) in [(DType::F64, 1e-13), (DType::F32, 1e-5)] {
        let ys = CpuStorage::F64(yv.clone()).to_dtype(&Layout::contiguous([rows, n]), dtype);
        let gs = CpuStorage::F64(vals(&g)).to_dtype(&Layout::contiguous([n, rows]), dtype);
        let (ys, gs) = (ys.unwrap(), gs.unwrap());
        let gl = Layout::contiguous([n, rows]).transpose(0, 1);
        let dx = ys
            .softmax_backward(&Layout::contiguous([rows, n]), &gs, &gl, scale)
            .unwrap();
        let got = dx.to_f64_vec(&Layout::contiguous([rows, n])).unwrap();
        let err = rel_err(&got, &want);
        assert!(err < tol, "{dtype}: rel err {err:e}");
    }
}

#[test]
fn masked_softmax_errors() {
    let x = randn(&[2, 2, 3, 4], 700);
    // Not rank 4.
    assert!(matches!(
        randn(&[6, 4], 701).causal_masked_softmax(1.0, 0, None),
        Err(Error::RankMismatch { .. })
    ));
    // A mask of the wrong shape.
    let bad = ids(&[1; 6], &[2, 3]);
    assert!(matches!(
        x.causal_masked_softmax(1.0, 0, Some(&bad)),
        Err(Error::ShapeMismatch { .. })
    ));
    // A float mask; u32 scores.
    let fmask = Tensor::ones([2, 4], DType::F64, CPU).unwrap();
    assert!(matches!(
        x.causal_masked_softmax(1.0, 0, Some(&fmask)),
        Err(Error::UnsupportedDType { .. })
    ));
    let u = ids(&[1; 48], &[2, 2, 3, 4]);
    assert!(matches!(
        u.causal_masked_softmax(1.0, 0, None),
        Err(Error::UnsupportedDType { .. })
    ));
    // Backward operands of different shapes or dtypes.
    let y = CpuStorage::F64(vec![0.5; 12]);
    let g32 = CpuStorage::F32(vec![0.5; 12]);
    let l = Layout::contiguous([3, 4]);
    assert!(matches!(
        y.softmax_backward(&l, &y, &Layout::contiguous([4, 3]), 1.0),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        y.softmax_backward(&l, &g32, &l, 1.0),
        Err(Error::DTypeMismatch { .. })
    ));
    // causal_attention keeps its checks.
    let q = randn(&[1, 2, 3, 4], 702);
    let k = randn(&[1, 2, 2, 4], 703);
    assert!(
        causal_attention(&q, &k, &k, None, 0).is_err(),
        "3 queries, 2 keys"
    );
}

/// Scores at masked keys and past the causal limit are never used: NaN there changes nothing.
#[test]
fn masked_scores_are_never_used() {
    let c = Case::new(2, 2, 4, 6, 1).left_pad(|bi| bi * 2);
    let (b, h, t, s) = (c.b, c.h, c.t, c.s);
    let x = randn(&[b, h, t, s], 800);
    let mut v = vals(&x);
    for (p, x) in v.iter_mut().enumerate() {
        if !c.visible(p / (h * t * s), (p / s) % t, p % s) {
            *x = f64::NAN;
        }
    }
    let xn = Tensor::from_f64(&v, [b, h, t, s], DType::F64, CPU).unwrap();
    let mask = c.mask_tensor();
    for dtype in [DType::F64, DType::F32, DType::BF16] {
        let f = |x: &Tensor| {
            vals(
                &x.to_dtype(dtype)
                    .unwrap()
                    .causal_masked_softmax(0.5, c.q_offset, mask.as_ref())
                    .unwrap(),
            )
        };
        assert_eq!(f(&xn), f(&x), "{dtype}");
    }
}
