//! Forward values of the core ops against naive reference loops, on random inputs; bf16 against
//! f32; errors on bad input.

use engine::{no_grad, DType, Device, Error, Tensor};
use testutil::{randn, rel_err};

fn naive_matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
        }
    }
    out
}

#[test]
fn matmul_matches_naive_f32_f64_and_transposed() {
    for &(m, k, n) in &[
        (1, 1, 1),
        (3, 5, 7),
        (17, 33, 9),
        (64, 96, 80),
        (130, 70, 129),
    ] {
        let a = randn(&[m, k], 1);
        let b = randn(&[k, n], 2);
        let want = naive_matmul(&a.to_vec_f64().unwrap(), &b.to_vec_f64().unwrap(), m, k, n);
        let got = a.matmul(&b).unwrap().to_vec_f64().unwrap();
        assert!(rel_err(&got, &want) < 1e-12, "f64 {m}x{k}x{n}");
        let (a32, b32) = (
            a.to_dtype(DType::F32).unwrap(),
            b.to_dtype(DType::F32).unwrap(),
        );
        let got = a32.matmul(&b32).unwrap().to_vec_f64().unwrap();
        assert!(rel_err(&got, &want) < 1e-5, "f32 {m}x{k}x{n}");
        // Same product from a transposed stored operand.
        let bt = b.t().unwrap().contiguous().unwrap();
        let got = a.matmul(&bt.t().unwrap()).unwrap().to_vec_f64().unwrap();
        assert!(rel_err(&got, &want) < 1e-12, "transposed rhs {m}x{k}x{n}");
        let bf = a
            .to_dtype(DType::BF16)
            .unwrap()
            .matmul(&b.to_dtype(DType::BF16).unwrap())
            .unwrap();
        assert_eq!(bf.dtype(), DType::BF16);
        assert!(
            rel_err(&bf.to_vec_f64().unwrap(), &want) < 1e-2,
            "bf16 {m}x{k}x{n}"
        );
    }
}

#[test]
fn batched_matmul_matches_per_batch() {
    let (b, m, k, n) = (5, 7, 6, 4);
    let a = randn(&[b, m, k], 3);
    let w = randn(&[b, k, n], 4);
    let out = a.matmul(&w).unwrap().to_vec_f64().unwrap();
    let (av, wv) = (a.to_vec_f64().unwrap(), w.to_vec_f64().unwrap());
    for i in 0..b {
        let want = naive_matmul(
            &av[i * m * k..(i + 1) * m * k],
            &wv[i * k * n..(i + 1) * k * n],
            m,
            k,
            n,
        );
        assert!(rel_err(&out[i * m * n..(i + 1) * m * n], &want) < 1e-12);
    }
}

#[test]
fn broadcasting_binary_ops() {
    let a = randn(&[2, 3, 4], 5);
    let b = randn(&[3, 1], 6);
    let out = a.add(&b).unwrap();
    assert_eq!(out.dims(), &[2, 3, 4]);
    let (av, bv, ov) = (
        a.to_vec_f64().unwrap(),
        b.to_vec_f64().unwrap(),
        out.to_vec_f64().unwrap(),
    );
    for i in 0..2 {
        for (j, bj) in bv.iter().enumerate() {
            for k in 0..4 {
                let idx = (i * 3 + j) * 4 + k;
                assert_eq!(ov[idx], av[idx] + bj);
            }
        }
    }
    let d = a.div(&b).unwrap().to_vec_f64().unwrap();
    assert!((d[5] - av[5] / bv[1]).abs() < 1e-15);
}

#[test]
fn reductions_and_softmax_values() {
    let x = randn(&[3, 4, 5], 7);
    let v = x.to_vec_f64().unwrap();
    let s = x.sum(1, false).unwrap();
    assert_eq!(s.dims(), &[3, 5]);
    let sv = s.to_vec_f64().unwrap();
    for i in 0..3 {
        for k in 0..5 {
            let want: f64 = (0..4).map(|j| v[(i * 4 + j) * 5 + k]).sum();
            assert!((sv[i * 5 + k] - want).abs() < 1e-12);
        }
    }
    let m = x.max(2, false).unwrap().to_vec_f64().unwrap();
    let am = x.argmax(2, false).unwrap().to_vec_u32().unwrap();
    for r in 0..12 {
        let row = &v[r * 5..(r + 1) * 5];
        let want = row.iter().cloned().fold(f64::MIN, f64::max);
        assert_eq!(m[r], want);
        assert_eq!(row[am[r] as usize], want);
    }
    let p = x.softmax_last_dim().unwrap().to_vec_f64().unwrap();
    let lp = x.log_softmax_last_dim().unwrap().to_vec_f64().unwrap();
    for r in 0..12 {
        let row = &v[r * 5..(r + 1) * 5];
        let z: f64 = row.iter().map(|x| x.exp()).sum();
        for j in 0..5 {
            assert!((p[r * 5 + j] - row[j].exp() / z).abs() < 1e-14);
            assert!((lp[r * 5 + j] - (row[j] - z.ln())).abs() < 1e-12);
        }
    }
    // Large logits stay finite.
    let big = Tensor::from_vec(vec![1000.0f32, 0.0, -1000.0], [1, 3], Device::Cpu).unwrap();
    let p = big.softmax_last_dim().unwrap().to_vec_f64().unwrap();
    assert_eq!(p, vec![1.0, 0.0, 0.0]);
}

#[test]
fn bf16_elementwise_close_to_f32() {
    let x = randn(&[64, 33], 8);
    let (x32, xb) = (
        x.to_dtype(DType::F32).unwrap(),
        x.to_dtype(DType::BF16).unwrap(),
    );
    let a = x32
        .silu()
        .unwrap()
        .mul(&x32.exp().unwrap())
        .unwrap()
        .softmax_last_dim()
        .unwrap();
    let b = xb
        .silu()
        .unwrap()
        .mul(&xb.exp().unwrap())
        .unwrap()
        .softmax_last_dim()
        .unwrap();
    assert!(rel_err(&b.to_vec_f64().unwrap(), &a.to_vec_f64().unwrap()) < 1e-2);
}

#[test]
fn autograd_accumulates_and_respects_frozen_and_no_grad() {
    let w = randn(&[3, 2], 9).to_var().unwrap();
    let frozen = randn(&[2, 3], 10);
    let loss = frozen.matmul(&w).unwrap().sum_all().unwrap();
    loss.backward().unwrap();
    let g1 = w.grad().unwrap().to_vec_f64().unwrap();
    loss.backward().unwrap();
    let g2 = w.grad().unwrap().to_vec_f64().unwrap();
    for (a, b) in g1.iter().zip(&g2) {
        assert!((2.0 * a - b).abs() < 1e-12, "second backward must add up");
    }
    assert!(
        frozen.grad().is_none(),
        "frozen tensors get no gradient buffer"
    );
    w.zero_grad();
    assert!(w.grad().is_none());
    let out = no_grad(|| frozen.matmul(&w).unwrap());
    assert!(!out.tracks_grad(), "no_grad records nothing");
    assert!(matches!(
        out.sum_all().unwrap().backward(),
        Err(Error::Backward { .. })
    ));
    // A frozen-only computation records nothing either.
    assert!(!frozen.exp().unwrap().tracks_grad());
}

#[test]
fn assign_updates_all_views_in_place() {
    let p = randn(&[2, 3], 11).to_var().unwrap();
    let view = p.narrow(1, 1, 2).unwrap();
    let new = randn(&[2, 3], 12);
    p.assign(&new).unwrap();
    assert_eq!(p.to_vec_f64().unwrap(), new.to_vec_f64().unwrap());
    assert_eq!(
        view.to_vec_f64().unwrap(),
        new.narrow(1, 1, 2).unwrap().to_vec_f64().unwrap()
    );
}

#[test]
fn typed_errors_on_bad_input() {
    let a = randn(&[2, 3], 13);
    let b = randn(&[4, 5], 14);
    assert!(matches!(
        a.matmul(&b),
        Err(Error::ShapeMismatch { op: "matmul", .. })
    ));
    assert!(matches!(
        a.add(&b),
        Err(Error::BroadcastIncompatible { op: "add", .. })
    ));
    let a32 = a.to_dtype(DType::F32).unwrap();
    assert!(matches!(
        a32.add(&a),
        Err(Error::DTypeMismatch { op: "add", .. })
    ));
    assert!(matches!(
        a.sum(2, false),
        Err(Error::DimOutOfRange { op: "sum", .. })
    ));
    assert!(matches!(
        a.reshape([7]),
        Err(Error::ShapeMismatch { op: "reshape", .. })
    ));
    assert!(matches!(
        a.narrow(1, 2, 2),
        Err(Error::InvalidArgument { op: "narrow", .. })
    ));
    assert!(matches!(
        Tensor::from_vec(vec![1.0f32; 5], [2, 3], Device::Cpu),
        Err(Error::ElementCountMismatch { .. })
    ));
    let ids = Tensor::arange(3, Device::Cpu).unwrap();
    assert!(matches!(ids.exp(), Err(Error::UnsupportedDType { .. })));
    assert!(matches!(
        Tensor::zeros([2], DType::F32, Device::Cuda(0)),
        Err(Error::DeviceUnavailable { .. })
    ));
    let msg = a.matmul(&b).unwrap_err().to_string();
    assert!(msg.contains("[2, 3]") && msg.contains("[4, 5]"), "{msg}");
}

#[test]
fn fused_silu_mul_equals_silu_then_mul() {
    let (g, u) = (randn(&[7, 33], 15), randn(&[7, 33], 16));
    for dt in [DType::F64, DType::F32, DType::BF16] {
        let (g, u) = (g.to_dtype(dt).unwrap(), u.to_dtype(dt).unwrap());
        let fused = g.silu_mul(&u).unwrap().to_vec_f64().unwrap();
        let composite = g.silu().unwrap().mul(&u).unwrap().to_vec_f64().unwrap();
        let tol = if dt == DType::BF16 { 1e-2 } else { 1e-6 };
        assert!(rel_err(&fused, &composite) < tol, "{dt}");
    }
}

/// `sum_all` over more elements than one reduction row (the two-stage path, with a tail):
/// the value matches an f64 sum, bf16 sums in f32, and the gradient is all ones.
#[test]
fn sum_all_of_a_large_tensor() {
    for n in [(1 << 16) + 4097, 3 << 17] {
        let x = testutil::randn(&[n], 5); // f64
        let want: f64 = x.to_vec_f64().unwrap().iter().sum();
        for (dt, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-4), (DType::BF16, 2e-2)] {
            let xd = x.to_dtype(dt).unwrap();
            let exact: f64 = xd.to_vec_f64().unwrap().iter().sum();
            let got = xd.sum_all().unwrap();
            assert_eq!(got.dtype(), dt);
            let got = got.to_scalar().unwrap();
            // Relative to the sum of magnitudes (the sum itself is near zero).
            let mag: f64 = xd.to_vec_f64().unwrap().iter().map(|v| v.abs()).sum();
            assert!(
                (got - exact).abs() <= tol * mag / (n as f64).sqrt(),
                "{dt} n {n}: {got} vs {exact} (f64 {want})"
            );
        }
        let v = x.to_var().unwrap();
        v.sum_all().unwrap().backward().unwrap();
        assert!(v
            .grad()
            .unwrap()
            .to_vec_f64()
            .unwrap()
            .iter()
            .all(|&g| g == 1.0));
    }
}
