//! Network ops: RMSNorm, RoPE, causal attention, dropout, concatenation. Gradient checks in f64,
//! values against naive loops, bf16 against f32, and shape errors.

use engine::backend::cpu::CpuStorage;
use engine::backend::BackendStorage;
use engine::{
    cat, causal_attention, no_grad, rope_inv_freq, rope_tables, DType, Device, Error, Layout,
    Tensor,
};
use testutil::{check_gradients, ids, randn, rel_err};

const CPU: Device = Device::Cpu;

fn vals(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
}

/// cos / sin tables for `positions` (u32 of `pshape`) and head dim `d`, in f64.
fn tables(positions: &[u32], pshape: &[usize], d: usize, theta: f64) -> (Tensor, Tensor) {
    let inv = rope_inv_freq(d, theta, DType::F64, CPU).unwrap();
    rope_tables(&ids(positions, pshape), &inv).unwrap()
}

// ----- naive references ---------------------------------------------------------------------

/// `x: [rows, n]` row-major, `w: [n]`.
fn naive_rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let n = w.len();
    x.chunks(n)
        .flat_map(|r| {
            let ms = r.iter().map(|v| v * v).sum::<f64>() / n as f64;
            let s = 1.0 / (ms + eps).sqrt();
            r.iter().zip(w).map(move |(v, wi)| v * s * wi)
        })
        .collect()
}

/// `x: [b, h, t, d]` row-major, `pos[bi][ti]` (one row shared when `pos.len() == 1`).
fn naive_rope(x: &[f64], dims: [usize; 4], pos: &[Vec<u32>], theta: f64) -> Vec<f64> {
    let [b, h, t, d] = dims;
    let half = d / 2;
    let mut out = vec![0.0; x.len()];
    for bi in 0..b {
        for hi in 0..h {
            let prow = &pos[if pos.len() == 1 { 0 } else { bi }];
            for (ti, &p) in prow[..t].iter().enumerate() {
                let p = p as f64;
                let base = ((bi * h + hi) * t + ti) * d;
                for i in 0..half {
                    let ang = p * theta.powf(-2.0 * i as f64 / d as f64);
                    let (x1, x2) = (x[base + i], x[base + i + half]);
                    out[base + i] = x1 * ang.cos() - x2 * ang.sin();
                    out[base + i + half] = x2 * ang.cos() + x1 * ang.sin();
                }
            }
        }
    }
    out
}

/// Per-(b, h, i) attention over the visible keys only; rows with no visible key are NaN.
#[allow(clippy::too_many_arguments)]
fn naive_attention(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    (b, hq, hkv, t, s, d): (usize, usize, usize, usize, usize, usize),
    mask: Option<&[u32]>,
    q_offset: usize,
) -> Vec<f64> {
    let group = hq / hkv;
    let mut out = vec![0.0; b * hq * t * d];
    for bi in 0..b {
        for h in 0..hq {
            let kh = h / group;
            for i in 0..t {
                let qi = &q[((bi * hq + h) * t + i) * d..][..d];
                let visible: Vec<usize> = (0..s)
                    .filter(|&j| j <= q_offset + i && mask.is_none_or(|m| m[bi * s + j] != 0))
                    .collect();
                let o = &mut out[((bi * hq + h) * t + i) * d..][..d];
                if visible.is_empty() {
                    o.iter_mut().for_each(|x| *x = f64::NAN);
                    continue;
                }
                let scores: Vec<f64> = visible
                    .iter()
                    .map(|&j| {
                        let kj = &k[((bi * hkv + kh) * s + j) * d..][..d];
                        qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (&j, w) in visible.iter().zip(&e) {
                    let vj = &v[((bi * hkv + kh) * s + j) * d..][..d];
                    for (o, x) in o.iter_mut().zip(vj) {
                        *o += w / z * x;
                    }
                }
            }
        }
    }
    out
}

// ----- gradient checks ----------------------------------------------------------------------

#[test]
fn grad_rms_norm() {
    for (shape, seed) in [(vec![3, 5], 1u64), (vec![2, 3, 4], 2), (vec![1, 7], 3)] {
        let n = *shape.last().unwrap();
        check_gradients(
            "rms_norm",
            &[randn(&shape, seed), randn(&[n], seed + 100)],
            |x| x[0].rms_norm(&x[1], 1e-5),
        );
    }
    check_gradients(
        "rms_norm_transposed",
        &[randn(&[4, 3], 4), randn(&[4], 5)],
        |x| x[0].t()?.rms_norm(&x[1], 1e-6),
    );
    check_gradients(
        "rms_norm_large_eps",
        &[randn(&[2, 6], 6), randn(&[6], 7)],
        |x| x[0].rms_norm(&x[1], 0.5),
    );
}

/// The gradient of rope over `x` `[b, t, h, d]` viewed as `[b, h, t, d]` (the heads of a
/// projection) reaches `x` row-major, as `x` is laid out: written in that order, not transposed
/// (which would cost the projection's backward a copy), with the values of the plain backward.
#[test]
fn rope_gradient_keeps_the_input_layout() {
    let (c, s) = tables(&[0, 3, 7, 12], &[4], 6, 100.0);
    let x = randn(&[2, 4, 3, 6], 15).to_var().unwrap(); // [b, t, h, d]
    let g = randn(&[2, 3, 4, 6], 16); // [b, h, t, d]
    x.transpose(1, 2)
        .unwrap()
        .rope(&c, &s)
        .unwrap()
        .backward_with_grad(&g)
        .unwrap();
    let dx = x.grad().unwrap();
    assert!(dx.is_contiguous(), "dx strides {:?}", dx.layout().strides());
    // dx = rope(g, cos, −sin), transposed back to x's dims.
    let want = g
        .rope(&c, &s.neg().unwrap())
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    assert_eq!(vals(&dx), vals(&want));
}

#[test]
fn grad_rope() {
    let (c, s) = tables(&[0, 3, 7, 12], &[4], 6, 100.0);
    check_gradients("rope", &[randn(&[2, 3, 4, 6], 10)], |x| x[0].rope(&c, &s));
    // [b, t, h, d] transposed to [b, h, t, d], as after the q/k projections.
    check_gradients("rope_transposed", &[randn(&[2, 4, 3, 6], 11)], |x| {
        x[0].transpose(1, 2)?.rope(&c, &s)
    });
    // A stride on the head dim too.
    check_gradients("rope_strided_d", &[randn(&[2, 6, 4, 3], 12)], |x| {
        x[0].permute(&[0, 3, 2, 1])?.rope(&c, &s)
    });
    // Per-sequence positions (left-padded batches).
    let (cb, sb) = tables(&[0, 1, 2, 3, 5, 9, 2, 40], &[2, 4], 8, 10000.0);
    check_gradients("rope_per_batch", &[randn(&[2, 2, 4, 8], 13)], |x| {
        x[0].rope(&cb, &sb)
    });
    check_gradients(
        "rope_per_batch_transposed",
        &[randn(&[2, 4, 3, 8], 14)],
        |x| {
            x[0].transpose(1, 2)?
                .rope(&cb, &sb)?
                .mul(&x[0].transpose(1, 2)?)
        },
    );
}

#[test]
fn grad_attention_gqa() {
    // hq = 4 query heads over hkv = 2 kv heads, t = s.
    check_gradients(
        "attention_gqa",
        &[
            randn(&[2, 4, 3, 4], 20),
            randn(&[2, 2, 3, 4], 21),
            randn(&[2, 2, 3, 4], 22),
        ],
        |x| causal_attention(&x[0], &x[1], &x[2], None, 0),
    );
    // Plain multi-head, one sequence, longer.
    check_gradients(
        "attention_mha",
        &[
            randn(&[1, 2, 5, 3], 23),
            randn(&[1, 2, 5, 3], 24),
            randn(&[1, 2, 5, 3], 25),
        ],
        |x| causal_attention(&x[0], &x[1], &x[2], None, 0),
    );
    // Non-contiguous q, k, v: [b, t, h, d] transposed to [b, h, t, d].
    check_gradients(
        "attention_transposed",
        &[
            randn(&[2, 3, 4, 4], 26),
            randn(&[2, 3, 2, 4], 27),
            randn(&[2, 3, 2, 4], 28),
        ],
        |x| {
            causal_attention(
                &x[0].transpose(1, 2)?,
                &x[1].transpose(1, 2)?,
                &x[2].transpose(1, 2)?,
                None,
                0,
            )
        },
    );
}

#[test]
fn grad_attention_padding_and_offset() {
    // Right padding: the second sequence has 2 real tokens out of 4 (every query sees a key).
    let mask = ids(&[1, 1, 1, 1, 1, 1, 0, 0], &[2, 4]);
    check_gradients(
        "attention_padding",
        &[
            randn(&[2, 4, 4, 4], 30),
            randn(&[2, 2, 4, 4], 31),
            randn(&[2, 2, 4, 4], 32),
        ],
        |x| causal_attention(&x[0], &x[1], &x[2], Some(&mask), 0),
    );
    // KV-cache decoding: 2 new queries after 3 cached keys.
    check_gradients(
        "attention_offset",
        &[
            randn(&[2, 4, 2, 4], 33),
            randn(&[2, 2, 5, 4], 34),
            randn(&[2, 2, 5, 4], 35),
        ],
        |x| causal_attention(&x[0], &x[1], &x[2], None, 3),
    );
    // Offset and padding together (a padded cache slot in the middle of the second sequence).
    let mask = ids(&[1, 1, 1, 1, 1, 1, 0, 1, 1, 1], &[2, 5]);
    check_gradients(
        "attention_offset_padding",
        &[
            randn(&[2, 4, 2, 4], 36),
            randn(&[2, 2, 5, 4], 37),
            randn(&[2, 2, 5, 4], 38),
        ],
        |x| causal_attention(&x[0], &x[1], &x[2], Some(&mask), 3),
    );
    // Fewer queries than the cache allows: keys past the last query are masked.
    check_gradients(
        "attention_offset_short",
        &[
            randn(&[1, 2, 2, 4], 39),
            randn(&[1, 2, 6, 4], 40),
            randn(&[1, 2, 6, 4], 41),
        ],
        |x| causal_attention(&x[0], &x[1], &x[2], None, 1),
    );
}

#[test]
fn grad_dropout() {
    check_gradients("dropout", &[randn(&[4, 6], 50)], |x| {
        x[0].dropout(0.3, 99, true)
    });
    check_gradients("dropout_transposed", &[randn(&[6, 4], 51)], |x| {
        x[0].t()?.dropout(0.5, 7, true)
    });
    check_gradients("dropout_eval", &[randn(&[3, 3], 52)], |x| {
        x[0].dropout(0.3, 99, false)?.mul_scalar(2.0)
    });
}

#[test]
fn grad_cat_split_chunk() {
    check_gradients(
        "cat_dim1",
        &[randn(&[2, 3], 60), randn(&[2, 2], 61), randn(&[3, 2], 62)],
        |x| cat(&[&x[0], &x[1], &x[2].t()?], 1),
    );
    check_gradients("cat_dim0", &[randn(&[1, 4], 63), randn(&[3, 4], 64)], |x| {
        cat(&[&x[1], &x[0]], 0)
    });
    check_gradients(
        "cat_neg_dim",
        &[randn(&[2, 3, 2], 65), randn(&[2, 2, 1], 66)],
        |x| cat(&[&x[0], &x[1].transpose(1, 2)?], -2),
    );
    check_gradients("cat_self", &[randn(&[2, 2], 67)], |x| {
        cat(&[&x[0], &x[0].mul_scalar(3.0)?, &x[0]], 0)
    });
    check_gradients("split", &[randn(&[3, 6], 68)], |x| {
        let p = x[0].split(&[1, 2, 3], 1)?;
        cat(&[&p[2], &p[0].mul_scalar(2.0)?, &p[1].sqr()?], 1)
    });
    check_gradients("split_partly_used", &[randn(&[5, 2], 69)], |x| {
        let p = x[0].split(&[2, 3], 0)?;
        p[1].exp()
    });
    check_gradients("chunk", &[randn(&[5, 4], 70)], |x| {
        let c = x[0].chunk(3, 0)?; // 2, 2, 1 rows
        assert_eq!(c.len(), 3);
        cat(&[&c[0].mul(&c[1])?, &c[2]], 0)
    });
    check_gradients("chunk_transposed", &[randn(&[4, 6], 71)], |x| {
        let c = x[0].t()?.chunk(2, -1)?; // [6, 2] each
        c[0].sub(&c[1].sqr()?)
    });
}

// ----- values against naive loops ----------------------------------------------------------

#[test]
fn rms_norm_matches_reference() {
    for (shape, tol) in [(vec![5, 7], 1e-12), (vec![64, 512], 1e-12)] {
        let n = *shape.last().unwrap();
        let (x, w) = (randn(&shape, 80), randn(&[n], 81));
        let want = naive_rms_norm(&vals(&x), &vals(&w), 1e-5);
        let got = vals(&x.rms_norm(&w, 1e-5).unwrap());
        assert!(rel_err(&got, &want) < tol, "f64 {shape:?}");
        let got32 = x
            .to_dtype(DType::F32)
            .unwrap()
            .rms_norm(&w.to_dtype(DType::F32).unwrap(), 1e-5)
            .unwrap();
        assert_eq!(got32.dtype(), DType::F32);
        assert!(rel_err(&vals(&got32), &want) < 1e-6, "f32 {shape:?}");
    }
    // A transposed input.
    let (x, w) = (randn(&[7, 3], 82), randn(&[7], 83));
    let xt = x.t().unwrap();
    let want = naive_rms_norm(&vals(&xt), &vals(&w), 1e-6);
    assert!(rel_err(&vals(&xt.rms_norm(&w, 1e-6).unwrap()), &want) < 1e-12);
}

/// The fused backward against the same function built from primitive ops, on an input large
/// enough to run the parallel path.
#[test]
fn rms_norm_backward_matches_composite() {
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-4)] {
        let (rows, n, eps) = (64, 300, 1e-5);
        let x = randn(&[rows, n], 84).to_dtype(dtype).unwrap();
        let w = randn(&[n], 85).to_dtype(dtype).unwrap();
        let g = randn(&[rows, n], 86).to_dtype(dtype).unwrap();
        let grads = |fused: bool| {
            let (xv, wv) = (x.to_var().unwrap(), w.to_var().unwrap());
            let y = if fused {
                xv.rms_norm(&wv, eps).unwrap()
            } else {
                let r = xv
                    .sqr()
                    .and_then(|s| s.mean(-1, true))
                    .and_then(|m| m.add_scalar(eps))
                    .and_then(|m| m.powf(-0.5))
                    .unwrap();
                xv.mul(&r).and_then(|y| y.mul(&wv)).unwrap()
            };
            y.backward_with_grad(&g).unwrap();
            (
                vals(&y),
                vals(&xv.grad().unwrap()),
                vals(&wv.grad().unwrap()),
            )
        };
        let (y1, dx1, dw1) = grads(true);
        let (y0, dx0, dw0) = grads(false);
        assert!(rel_err(&y1, &y0) < tol, "{dtype} y");
        assert!(rel_err(&dx1, &dx0) < tol, "{dtype} dx");
        assert!(rel_err(&dw1, &dw0) < tol, "{dtype} dw");
    }
}

#[test]
fn rope_matches_rotation_formula() {
    let theta = 500.0;
    let pos = vec![vec![0u32, 1, 2, 3, 4], vec![7, 8, 9, 10, 30]];
    let flat: Vec<u32> = pos.concat();
    let (c, s) = tables(&flat, &[2, 5], 8, theta);
    assert_eq!(c.dims(), &[2, 5, 4]);
    let x = randn(&[2, 3, 5, 8], 90);
    let want = naive_rope(&vals(&x), [2, 3, 5, 8], &pos, theta);
    assert!(rel_err(&vals(&x.rope(&c, &s).unwrap()), &want) < 1e-12);
    // f32.
    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let got = f(&x).rope(&f(&c), &f(&s)).unwrap();
    assert!(rel_err(&vals(&got), &want) < 1e-6);
    // Shared positions, a large transposed input (parallel path).
    let pos1 = vec![(0..64u32).map(|p| p * 3).collect::<Vec<_>>()];
    let (c1, s1) = tables(&pos1[0], &[64], 32, 10000.0);
    assert_eq!(c1.dims(), &[1, 64, 16]);
    let xb = randn(&[2, 64, 8, 32], 91).transpose(1, 2).unwrap(); // [2, 8, 64, 32]
    let want = naive_rope(&vals(&xb), [2, 8, 64, 32], &pos1, 10000.0);
    assert!(rel_err(&vals(&xb.rope(&c1, &s1).unwrap()), &want) < 1e-12);
}

#[test]
fn rope_tables_values() {
    let inv = rope_inv_freq(8, 10000.0, DType::F64, CPU).unwrap();
    assert_eq!(inv.dims(), &[4]);
    for (i, v) in vals(&inv).into_iter().enumerate() {
        assert!((v - 10000f64.powf(-((2 * i) as f64) / 8.0)).abs() < 1e-15);
    }
    let (c, s) = rope_tables(&ids(&[0, 5, 100], &[3]), &inv).unwrap();
    assert_eq!(c.dims(), &[1, 3, 4]);
    let (cv, sv) = (vals(&c), vals(&s));
    for (ti, p) in [0.0, 5.0, 100.0].into_iter().enumerate() {
        for i in 0..4 {
            let ang = p * 10000f64.powf(-((2 * i) as f64) / 8.0);
            assert!((cv[ti * 4 + i] - ang.cos()).abs() < 1e-12);
            assert!((sv[ti * 4 + i] - ang.sin()).abs() < 1e-12);
        }
    }
    // bf16 frequencies give bf16 tables from f32 angles.
    let inv16 = rope_inv_freq(8, 10000.0, DType::BF16, CPU).unwrap();
    let (c16, _) = rope_tables(&ids(&[0, 1, 2, 3], &[2, 2]), &inv16).unwrap();
    assert_eq!((c16.dtype(), c16.dims()), (DType::BF16, &[2, 2, 4][..]));
}

/// `(b, hq, hkv, t, s, d, q_offset, key_mask)`.
type AttnCase = (
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    Option<Vec<u32>>,
);

#[test]
fn attention_matches_naive_loop() {
    let cases: Vec<AttnCase> = vec![
        (2, 4, 2, 5, 5, 8, 0, None),
        (1, 6, 2, 3, 7, 4, 4, None),
        (2, 2, 2, 4, 4, 4, 0, Some(vec![1, 1, 1, 1, 1, 1, 1, 0])),
        (
            2,
            4,
            1,
            2,
            6,
            4,
            4,
            Some(vec![1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0]),
        ),
        (1, 2, 1, 1, 9, 4, 8, None),
    ];
    for (seed, (b, hq, hkv, t, s, d, off, mask)) in cases.into_iter().enumerate() {
        let seed = 100 + 3 * seed as u64;
        let (q, k, v) = (
            randn(&[b, hq, t, d], seed),
            randn(&[b, hkv, s, d], seed + 1),
            randn(&[b, hkv, s, d], seed + 2),
        );
        let m = mask.as_ref().map(|m| ids(m, &[b, s]));
        let want = naive_attention(
            &vals(&q),
            &vals(&k),
            &vals(&v),
            (b, hq, hkv, t, s, d),
            mask.as_deref(),
            off,
        );
        let got = causal_attention(&q, &k, &v, m.as_ref(), off).unwrap();
        assert_eq!(got.dims(), &[b, hq, t, d]);
        let case = format!("b{b} hq{hq} hkv{hkv} t{t} s{s} d{d} off{off}");
        assert!(rel_err(&vals(&got), &want) < 1e-12, "f64 {case}");
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let got32 = causal_attention(&f(&q), &f(&k), &f(&v), m.as_ref(), off).unwrap();
        assert!(rel_err(&vals(&got32), &want) < 1e-5, "f32 {case}");
    }
}

#[test]
fn attention_fully_masked_rows_are_finite() {
    // Left padding: the first two queries of sequence 1 see no real key.
    let (b, h, t, d) = (2, 2, 4, 4);
    let mask_v = [1, 1, 1, 1, 0, 0, 1, 1];
    let mask = ids(&mask_v, &[b, t]);
    for dtype in [DType::F64, DType::F32, DType::BF16] {
        let q = randn(&[b, h, t, d], 120);
        let k = randn(&[b, h, t, d], 121);
        let v = randn(&[b, h, t, d], 122);
        let want = naive_attention(
            &vals(&q),
            &vals(&k),
            &vals(&v),
            (b, h, h, t, t, d),
            Some(&mask_v),
            0,
        );
        let c = |x: &Tensor| x.to_dtype(dtype).unwrap().to_var().unwrap();
        let (qv, kv, vv) = (c(&q), c(&k), c(&v));
        let out = causal_attention(&qv, &kv, &vv, Some(&mask), 0).unwrap();
        let got = vals(&out);
        assert!(
            got.iter().all(|x| x.is_finite()),
            "{dtype}: non-finite output"
        );
        // Rows with a visible key match the reference.
        let (g, w): (Vec<f64>, Vec<f64>) = got
            .iter()
            .zip(&want)
            .filter(|(_, w)| !w.is_nan())
            .map(|(a, b)| (*a, *b))
            .unzip();
        let tol = if dtype == DType::BF16 { 2e-2 } else { 1e-5 };
        assert!(rel_err(&g, &w) < tol, "{dtype}");
        // Gradients are finite too.
        out.sum_all().unwrap().backward().unwrap();
        for x in [&qv, &kv, &vv] {
            assert!(vals(&x.grad().unwrap()).iter().all(|g| g.is_finite()));
        }
    }
}

#[test]
fn dropout_statistics_and_determinism() {
    let n = 200_000;
    let p = 0.25;
    let ones = Tensor::ones(n, DType::F32, CPU).unwrap();
    let a = vals(&no_grad(|| ones.dropout(p, 7, true)).unwrap());
    let zeros = a.iter().filter(|&&x| x == 0.0).count() as f64 / n as f64;
    assert!((zeros - p).abs() < 0.005, "dropped fraction {zeros}");
    let keep = (1.0 / (1.0 - p)) as f32 as f64;
    assert!(a.iter().all(|&x| x == 0.0 || x == keep));
    let mean = a.iter().sum::<f64>() / n as f64;
    assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
    // Same seed, same mask; another seed, another mask.
    assert_eq!(a, vals(&ones.dropout(p, 7, true).unwrap()));
    let other = vals(&ones.dropout(p, 8, true).unwrap());
    let differ = a.iter().zip(&other).filter(|(x, y)| x != y).count();
    assert!(differ > n / 10, "only {differ} elements differ");
    // Kept values are scaled copies of the input.
    let x = randn(&[50, 40], 130);
    let y = vals(&x.dropout(0.4, 3, true).unwrap());
    for (yi, xi) in y.iter().zip(vals(&x)) {
        assert!(*yi == 0.0 || (yi - xi / 0.6).abs() < 1e-12);
    }
    assert!(y.contains(&0.0) && y.iter().any(|&v| v != 0.0));
    // Identity in eval mode and at p = 0.
    assert_eq!(vals(&x.dropout(0.4, 3, false).unwrap()), vals(&x));
    assert_eq!(vals(&x.dropout(0.0, 3, true).unwrap()), vals(&x));
}

#[test]
fn cat_split_chunk_values() {
    let a = Tensor::from_vec((0..6).map(f64::from).collect::<Vec<_>>(), [2, 3], CPU).unwrap();
    let b = Tensor::from_vec(vec![10.0, 11.0], [2, 1], CPU).unwrap();
    let c = cat(&[&a, &b, &a.narrow(1, 1, 2).unwrap()], 1).unwrap();
    assert_eq!(c.dims(), &[2, 6]);
    assert_eq!(
        vals(&c),
        vec![0., 1., 2., 10., 1., 2., 3., 4., 5., 11., 4., 5.]
    );
    let r = cat(&[&a.t().unwrap(), &a.t().unwrap()], 0).unwrap();
    assert_eq!(
        vals(&r),
        vec![0., 3., 1., 4., 2., 5., 0., 3., 1., 4., 2., 5.]
    );
    let parts = c.split(&[3, 1, 2], -1).unwrap();
    assert_eq!(vals(&parts[0]), vals(&a));
    assert_eq!(vals(&parts[1]), vals(&b));
    assert!(parts[2].same_storage(&c));
    let ch = Tensor::arange(7, CPU).unwrap().chunk(3, 0).unwrap();
    let sizes: Vec<usize> = ch.iter().map(|t| t.dims()[0]).collect();
    assert_eq!(sizes, vec![3, 3, 1]);
    assert_eq!(ch[2].to_vec_u32().unwrap(), vec![6]);
    // Fewer chunks when n does not fit: 6 into 4 gives 3 chunks of 2.
    assert_eq!(
        Tensor::arange(6, CPU).unwrap().chunk(4, 0).unwrap().len(),
        3
    );
    // cat of u32 tensors works too (no gradient).
    let u = cat(&[&ch[2], &ch[0]], 0).unwrap();
    assert_eq!(u.to_vec_u32().unwrap(), vec![6, 0, 1, 2]);
}

// ----- bf16 against f32 ---------------------------------------------------------------------

#[test]
fn bf16_forward_close_to_f32() {
    let f32_ = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
    // RMSNorm, the large shape included (parallel path).
    for shape in [[4usize, 64], [40, 512]] {
        let x = randn(&shape, 140);
        let w = randn(&[shape[1]], 141);
        let want = vals(&f32_(&x).rms_norm(&f32_(&w), 1e-6).unwrap());
        let got = bf(&x).rms_norm(&bf(&w), 1e-6).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let e = rel_err(&vals(&got), &want);
        assert!(e <= 1e-2, "rms_norm bf16 {shape:?}: {e}");
    }
    // RoPE: transposed input, per-batch positions.
    let inv = rope_inv_freq(16, 10000.0, DType::F32, CPU).unwrap();
    let pos = ids(&(0..24u32).map(|i| i * 5).collect::<Vec<_>>(), &[2, 12]);
    let (c, s) = rope_tables(&pos, &inv).unwrap();
    let x = randn(&[2, 12, 3, 16], 142).transpose(1, 2).unwrap();
    let want = vals(&f32_(&x).rope(&c, &s).unwrap());
    let got = bf(&x).rope(&bf(&c), &bf(&s)).unwrap();
    assert_eq!(got.dtype(), DType::BF16);
    let e = rel_err(&vals(&got), &want);
    assert!(e <= 1e-2, "rope bf16: {e}");
    // The bf16 RMSNorm backward runs and stays close to f32.
    let x = randn(&[8, 32], 143);
    let w = randn(&[32], 144);
    let grads = |dt: DType| {
        let (xv, wv) = (
            x.to_dtype(dt).unwrap().to_var().unwrap(),
            w.to_dtype(dt).unwrap().to_var().unwrap(),
        );
        let y = xv.rms_norm(&wv, 1e-6).unwrap();
        y.mul(&y).unwrap().sum_all().unwrap().backward().unwrap();
        (vals(&xv.grad().unwrap()), vals(&wv.grad().unwrap()))
    };
    let ((dx16, dw16), (dx32, dw32)) = (grads(DType::BF16), grads(DType::F32));
    assert!(rel_err(&dx16, &dx32) <= 3e-2, "dx");
    assert!(rel_err(&dw16, &dw32) <= 3e-2, "dw");
}

// ----- errors -------------------------------------------------------------------------------

fn is_shape_err<T: std::fmt::Debug>(r: engine::Result<T>) -> bool {
    matches!(
        r,
        Err(Error::ShapeMismatch { .. }) | Err(Error::RankMismatch { .. })
    )
}

#[test]
fn rms_norm_and_rope_errors() {
    let x = randn(&[3, 4], 150);
    assert!(is_shape_err(x.rms_norm(&randn(&[3], 151), 1e-5)));
    assert!(is_shape_err(x.rms_norm(&randn(&[1, 4], 152), 1e-5)));
    assert!(is_shape_err(
        Tensor::scalar(1.0, DType::F64, CPU)
            .unwrap()
            .rms_norm(&randn(&[1], 153), 1e-5)
    ));
    let w32 = randn(&[4], 154).to_dtype(DType::F32).unwrap();
    assert!(matches!(
        x.rms_norm(&w32, 1e-5),
        Err(Error::DTypeMismatch { .. })
    ));
    let u = ids(&[1, 2, 3, 4], &[1, 4]);
    assert!(matches!(
        u.rms_norm(&ids(&[1, 1, 1, 1], &[4]), 1e-5),
        Err(Error::UnsupportedDType { .. })
    ));

    let (c, s) = tables(&[0, 1, 2], &[3], 4, 10000.0); // [1, 3, 2]
    let x = randn(&[2, 2, 3, 4], 155);
    assert!(x.rope(&c, &s).is_ok());
    assert!(is_shape_err(randn(&[2, 3, 4], 156).rope(&c, &s)));
    assert!(is_shape_err(randn(&[2, 2, 4, 4], 157).rope(&c, &s))); // t mismatch
    assert!(is_shape_err(randn(&[2, 2, 3, 6], 158).rope(&c, &s))); // d mismatch
    assert!(matches!(
        randn(&[2, 2, 3, 5], 159).rope(&c, &s),
        Err(Error::InvalidArgument { .. })
    ));
    let (c3, s3) = tables(&[0, 1, 2, 0, 1, 2, 0, 1, 2], &[3, 3], 4, 10000.0); // batch 3
    assert!(is_shape_err(x.rope(&c3, &s3)));
    assert!(is_shape_err(x.rope(&c, &s3)));
    assert!(matches!(
        x.rope(&c.to_dtype(DType::F32).unwrap(), &s),
        Err(Error::DTypeMismatch { .. })
    ));

    assert!(rope_inv_freq(7, 10000.0, DType::F32, CPU).is_err());
    assert!(rope_inv_freq(0, 10000.0, DType::F32, CPU).is_err());
    assert!(rope_inv_freq(8, -1.0, DType::F32, CPU).is_err());
    assert!(rope_inv_freq(8, 10000.0, DType::U32, CPU).is_err());
    let inv = rope_inv_freq(8, 10000.0, DType::F32, CPU).unwrap();
    assert!(matches!(
        rope_tables(&randn(&[3], 160), &inv),
        Err(Error::UnsupportedDType { .. })
    ));
    assert!(is_shape_err(rope_tables(&ids(&[0; 8], &[2, 2, 2]), &inv)));
    assert!(is_shape_err(rope_tables(
        &ids(&[0, 1], &[2]),
        &inv.reshape([2, 2]).unwrap()
    )));
}

/// The CPU kernels check their operands themselves (a backend may be called directly).
#[test]
fn kernel_errors() {
    let x = CpuStorage::F32(vec![1.0; 12]);
    let l = Layout::contiguous([3, 4]);
    let w = CpuStorage::F32(vec![1.0; 3]);
    let wl = Layout::contiguous([3]);
    assert!(x.rms_norm(&l, &w, &wl, 1e-5).is_err());
    let w64 = CpuStorage::F64(vec![1.0; 4]);
    let w4 = Layout::contiguous([4]);
    assert!(matches!(
        x.rms_norm(&l, &w64, &w4, 1e-5),
        Err(Error::DTypeMismatch { .. })
    ));
    let g = CpuStorage::F32(vec![1.0; 8]);
    assert!(x
        .rms_norm_backward(&l, &w64, &w4, &g, &Layout::contiguous([2, 4]), 1e-5, true)
        .is_err());
    let xl = Layout::contiguous([1, 1, 3, 4]);
    let tab = CpuStorage::F32(vec![0.5; 6]);
    let tl = Layout::contiguous([1, 3, 2]);
    assert!(x.rope(&xl, &tab, &tl, &tab, &tl, 2).is_ok());
    // Positions along dim 1 or 2 only; along dim 1 the tables must match that dim.
    assert!(x.rope(&xl, &tab, &tl, &tab, &tl, 3).is_err());
    assert!(x.rope(&xl, &tab, &tl, &tab, &tl, 1).is_err());
    let xl1 = Layout::contiguous([1, 3, 1, 4]);
    assert!(x.rope(&xl1, &tab, &tl, &tab, &tl, 1).is_ok());
    assert!(x.rope(&l, &tab, &tl, &tab, &tl, 2).is_err());
    assert!(x
        .rope(&xl, &tab, &Layout::contiguous([1, 2, 3]), &tab, &tl, 2)
        .is_err());
    let tab64 = CpuStorage::F64(vec![0.5; 6]);
    assert!(matches!(
        x.rope(&xl, &tab, &tl, &tab64, &tl, 2),
        Err(Error::DTypeMismatch { .. })
    ));
}

#[test]
fn attention_errors() {
    let q = randn(&[2, 4, 3, 4], 170);
    let k = randn(&[2, 2, 3, 4], 171);
    let v = randn(&[2, 2, 3, 4], 172);
    assert!(causal_attention(&q, &k, &v, None, 0).is_ok());
    // hq not a multiple of hkv.
    let k3 = randn(&[2, 3, 3, 4], 173);
    assert!(is_shape_err(causal_attention(&q, &k3, &k3, None, 0)));
    // Head dim, batch, k/v mismatches, ranks.
    let kd = randn(&[2, 2, 3, 5], 174);
    assert!(is_shape_err(causal_attention(&q, &kd, &kd, None, 0)));
    let kb = randn(&[1, 2, 3, 4], 175);
    assert!(is_shape_err(causal_attention(&q, &kb, &kb, None, 0)));
    assert!(is_shape_err(causal_attention(
        &q,
        &k,
        &randn(&[2, 2, 4, 4], 176),
        None,
        0
    )));
    assert!(is_shape_err(causal_attention(
        &randn(&[4, 3, 4], 177),
        &k,
        &v,
        None,
        0
    )));
    // Mask shape and dtype.
    let bad = ids(&[1; 4], &[2, 2]);
    assert!(is_shape_err(causal_attention(&q, &k, &v, Some(&bad), 0)));
    let fm = randn(&[2, 3], 178);
    assert!(matches!(
        causal_attention(&q, &k, &v, Some(&fm), 0),
        Err(Error::UnsupportedDType { .. })
    ));
    // Queries past the last key.
    assert!(matches!(
        causal_attention(&q, &k, &v, None, 1),
        Err(Error::InvalidArgument { .. })
    ));
    // Dtype mismatch.
    assert!(matches!(
        causal_attention(&q, &k.to_dtype(DType::F32).unwrap(), &v, None, 0),
        Err(Error::DTypeMismatch { .. })
    ));
}

#[test]
fn dropout_cat_split_chunk_errors() {
    let x = randn(&[3, 4], 180);
    assert!(x.dropout(1.0, 0, true).is_err());
    assert!(x.dropout(-0.1, 0, true).is_err());
    assert!(x.dropout(1.5, 0, false).is_err());
    assert!(ids(&[1, 2], &[2]).dropout(0.5, 0, true).is_err());

    assert!(cat(&[], 0).is_err());
    let y = randn(&[3, 5], 181);
    assert!(is_shape_err(cat(&[&x, &y], 0)));
    assert!(cat(&[&x, &y], 1).is_ok());
    assert!(matches!(
        cat(&[&x, &y], 2),
        Err(Error::DimOutOfRange { .. })
    ));
    assert!(is_shape_err(cat(&[&x, &randn(&[3, 4, 1], 182)], 0)));
    assert!(matches!(
        cat(&[&x, &x.to_dtype(DType::F32).unwrap()], 0),
        Err(Error::DTypeMismatch { .. })
    ));

    assert!(x.split(&[1, 1], 0).is_err());
    assert!(x.split(&[2, 3], 1).is_err());
    assert!(x.split(&[3], 2).is_err());
    assert!(x.chunk(0, 0).is_err());
    assert!(x.chunk(2, -3).is_err());
}
