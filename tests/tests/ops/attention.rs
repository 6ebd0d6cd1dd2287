//! Causal attention (`engine::causal_attention`, `engine/src/ops/attention.rs`): the composite
//! op over the fused attention softmax (see `softmax`), with grouped-query heads, key masks
//! (right and left padding) and a query offset (KV-cache decoding).
//!
//! Gradients of q, k and v by central finite differences in f64 (relative error 1e-6), on
//! grouped-query, multi-head, transposed, padded and offset inputs; values against a naive loop
//! over the visible keys (f64 1e-12, f32 1e-5), packed rows (segments 1, 2, .. in the key mask)
//! included; packed rows against each sequence alone (f64 1e-13, forward and backward); against the composite it replaced (scaled q, one
//! product per kv head, a −1e9 bias, softmax), forward and backward (f64 1e-12 and 1e-11, f32
//! 1e-5 and 1e-4) and zero on padding queries; rows with no visible key finite (bf16 2e-2 on the
//! others) with finite gradients; shape, dtype and offset errors.
//!
//! Parity (module `gpu`): forward and backward (output, dq, dk, dv) on SmolLM2-135M's shapes with
//! left padding, odd and block-sized sequence lengths, decoding after a long cache, packed rows of
//! random segments, q as the transpose of its projection. The CPU is the reference: relative error within f32 1e-5, bf16
//! 1e-2, f64 1e-10; NaN never passes.

use crate::causal::{cases, packed_cases, segment_sees, visible_rows, Case};
use crate::util::{is_shape_err, vals};
use engine::{cat, causal_attention, DType, Device, Error, Tensor};
use testutil::{check_gradients, ids, randn, rel_err};

const CPU: Device = Device::Cpu;

/// Per-(b, h, i) attention over the visible keys only (causal, not padding, of the query's
/// segment); rows with no visible key are NaN.
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
                    .filter(|&j| {
                        j <= q_offset + i
                            && mask.is_none_or(|m| segment_sees(&m[bi * s..][..s], q_offset + i, j))
                    })
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
fn grad_causal_attention_fused() {
    let packed = packed_cases().into_iter().take(2);
    for (n, c) in cases().into_iter().take(8).chain(packed).enumerate() {
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

// ----- values -------------------------------------------------------------------------------

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
        // Packed segments (1, 2, 3), padding after; with a query offset.
        (
            2,
            4,
            2,
            6,
            6,
            4,
            0,
            Some(vec![1, 1, 2, 2, 2, 3, 1, 2, 2, 2, 0, 0]),
        ),
        (1, 2, 2, 3, 7, 4, 4, Some(vec![1, 1, 1, 2, 2, 3, 3])),
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

/// Sequences packed into one row (key mask 1, 2, .. per segment) give each sequence exactly the
/// attention it gets alone, forward and backward: the block-diagonal causal mask lets no segment
/// see another.
#[test]
fn packed_attention_equals_separate_sequences() {
    let (hq, hkv, d) = (4, 2, 4);
    let lens = [3usize, 5, 1, 4];
    let s = lens.iter().sum::<usize>() + 2; // two padding keys at the end
    let mut mask = vec![0u32; s];
    let mut at = 0;
    for (id, &len) in lens.iter().enumerate() {
        mask[at..at + len].fill(id as u32 + 1);
        at += len;
    }
    let m = ids(&mask, &[1, s]);
    let (q, k, v) = (
        randn(&[1, hq, s, d], 720),
        randn(&[1, hkv, s, d], 721),
        randn(&[1, hkv, s, d], 722),
    );
    // The output gradient, zero on the padding queries (which stay out of any loss).
    let gout = cat(
        &[
            &randn(&[1, hq, s - 2, d], 723),
            &Tensor::zeros([1, hq, 2, d], DType::F64, CPU).unwrap(),
        ],
        2,
    )
    .unwrap();
    let grads = |out: &Tensor, g: &Tensor, x: [&Tensor; 3]| {
        out.backward_with_grad(g).unwrap();
        x.map(|x| x.grad().expect("a gradient"))
    };
    let (qv, kv, vv) = (
        q.to_var().unwrap(),
        k.to_var().unwrap(),
        v.to_var().unwrap(),
    );
    let packed = causal_attention(&qv, &kv, &vv, Some(&m), 0).unwrap();
    let packed_g = grads(&packed, &gout, [&qv, &kv, &vv]);
    let mut at = 0;
    for &len in &lens {
        let part = |x: &Tensor| x.narrow(2, at, len).unwrap().contiguous().unwrap();
        let (qs, ks, vs) = (
            part(&q).to_var().unwrap(),
            part(&k).to_var().unwrap(),
            part(&v).to_var().unwrap(),
        );
        let alone = causal_attention(&qs, &ks, &vs, None, 0).unwrap();
        let err = rel_err(&vals(&part(&packed)), &vals(&alone));
        assert!(err < 1e-13, "segment at {at}: output rel err {err:e}");
        let alone_g = grads(&alone, &part(&gout), [&qs, &ks, &vs]);
        for (name, (p, a)) in ["dq", "dk", "dv"].iter().zip(packed_g.iter().zip(&alone_g)) {
            let err = rel_err(&vals(&part(p)), &vals(a));
            assert!(err < 1e-13, "segment at {at}: {name} rel err {err:e}");
        }
        at += len;
    }
}

// ----- errors -------------------------------------------------------------------------------

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

/// `causal_attention` keeps its checks with the fused softmax: more queries than keys.
#[test]
fn attention_refuses_more_queries_than_keys() {
    let q = randn(&[1, 2, 3, 4], 702);
    let k = randn(&[1, 2, 2, 4], 703);
    assert!(
        causal_attention(&q, &k, &k, None, 0).is_err(),
        "3 queries, 2 keys"
    );
}

#[cfg(feature = "cuda")]
mod gpu {
    //! CPU ↔ CUDA parity (skipped, saying why, without a GPU).
    use crate::causal::Mask;
    use engine::{causal_attention, DType, Device, Tensor};
    use testutil::gpu::{scaled_vals, Checker, FLOATS};

    /// `causal_attention` forward and backward: the output, then dq, dk, dv under a random output
    /// gradient.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        dev: Device,
        dt: DType,
        (b, hq, hkv, t, s, d): (usize, usize, usize, usize, usize, usize),
        off: usize,
        mask: &Option<Vec<u32>>,
        transposed_q: bool,
    ) -> engine::Result<Vec<f64>> {
        let qv = scaled_vals(b * hq * t * d, 10, 1.0);
        // The variable, and q as attention sees it: with `transposed_q`, [b, t, hq, d]
        // projections seen as [b, hq, t, d], as the model makes them.
        let (qvar, q) = if transposed_q {
            let var = Tensor::from_f64(&qv, [b, t, hq, d], dt, dev)?.to_var()?;
            let q = var.transpose(1, 2)?;
            (var, q)
        } else {
            let var = Tensor::from_f64(&qv, [b, hq, t, d], dt, dev)?.to_var()?;
            (var.clone(), var)
        };
        let k = Tensor::from_f64(
            &scaled_vals(b * hkv * s * d, 11, 1.0),
            [b, hkv, s, d],
            dt,
            dev,
        )?
        .to_var()?;
        let v = Tensor::from_f64(
            &scaled_vals(b * hkv * s * d, 12, 1.0),
            [b, hkv, s, d],
            dt,
            dev,
        )?
        .to_var()?;
        let m = mask
            .as_ref()
            .map(|m| Tensor::from_vec(m.clone(), [b, s], dev))
            .transpose()?;
        let out = causal_attention(&q, &k, &v, m.as_ref(), off)?;
        let g = Tensor::from_f64(
            &scaled_vals(b * hq * t * d, 13, 1.0),
            [b, hq, t, d],
            dt,
            dev,
        )?;
        out.backward_with_grad(&g)?;
        let mut r = out.to_vec_f64()?;
        for x in [&qvar, &k, &v] {
            r.extend(x.grad().expect("a gradient").to_vec_f64()?);
        }
        Ok(r)
    }

    #[test]
    fn causal_attention_forward_backward_matches_cpu() {
        let Some(mut c) = Checker::new() else { return };
        // ((b, hq, hkv, t, s, d), q_offset, mask, q transposed)
        let cases = [
            ((4, 9, 3, 128, 128, 64), 0, Mask::Left, true), // SmolLM2-135M, left padding
            ((2, 4, 4, 7, 7, 16), 0, Mask::None, false),
            ((1, 4, 2, 255, 255, 32), 0, Mask::Random, false),
            ((1, 4, 2, 257, 257, 32), 0, Mask::None, true),
            ((2, 6, 2, 5, 1000, 16), 995, Mask::Random, false), // decoding after a long cache
            ((2, 2, 1, 64, 2048, 64), 1984, Mask::Left, false),
            ((2, 2, 1, 1, 1, 8), 0, Mask::None, false),
            // Packed sequences (block-diagonal): SmolLM2-135M's heads, a row of 512.
            ((2, 9, 3, 512, 512, 64), 0, Mask::Packed, true),
            ((1, 4, 2, 257, 257, 32), 0, Mask::Packed, false),
        ];
        for dt in FLOATS {
            for (dims, off, mk, tq) in cases {
                let m = mk.values(dims.0, dims.4);
                c.case(
                    &format!("causal_attention fwd+bwd {dims:?} off {off} {mk:?} q^T {tq}"),
                    dt,
                    |dev| attention(dev, dt, dims, off, &m, tq),
                );
            }
        }
        c.finish();
    }
}
