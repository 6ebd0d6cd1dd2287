//! Gradient checks: views, elementwise arithmetic, reductions, softmax, matmul.

use engine::{DType, Device, Tensor};
use testutil::{check_gradients, check_gradients_with, ids, randn, uniform, GradCheck};

#[test]
fn grad_reshape_transpose_permute_narrow() {
    check_gradients("reshape", &[randn(&[2, 3, 4], 1)], |x| x[0].reshape([6, 4]));
    check_gradients("transpose", &[randn(&[2, 3, 4], 2)], |x| {
        x[0].transpose(0, 2)?.contiguous()
    });
    check_gradients("permute", &[randn(&[2, 3, 4], 3)], |x| {
        x[0].permute(&[1, 2, 0])?.reshape([12, 2])
    });
    check_gradients("narrow", &[randn(&[4, 5], 4)], |x| {
        x[0].narrow(1, 1, 3)?.narrow(0, 2, 2)
    });
    check_gradients("broadcast_as", &[randn(&[3, 1], 5)], |x| {
        x[0].broadcast_as([2, 3, 4])
    });
    check_gradients("unsqueeze_squeeze", &[randn(&[3, 2], 6)], |x| {
        x[0].unsqueeze(1)?.t()?.squeeze(2)
    });
}

#[test]
fn grad_unary() {
    let x = randn(&[3, 4], 10);
    let pos = uniform(&[3, 4], 0.5, 2.0, 11);
    check_gradients("neg", &[x.clone()], |x| x[0].neg());
    check_gradients("exp", &[x.clone()], |x| x[0].exp());
    check_gradients("log", &[pos.clone()], |x| x[0].log());
    check_gradients("silu", &[x.clone()], |x| x[0].silu());
    check_gradients("sigmoid", &[x.clone()], |x| x[0].sigmoid());
    check_gradients("sqrt", &[pos.clone()], |x| x[0].sqrt());
    check_gradients("recip", &[pos.clone()], |x| x[0].recip());
    check_gradients("sqr", &[x.clone()], |x| x[0].sqr());
    check_gradients("abs", &[x.clone()], |x| x[0].abs());
    check_gradients("tanh", &[x.clone()], |x| x[0].tanh());
    check_gradients("cos", &[x.clone()], |x| x[0].cos());
    check_gradients("sin", &[x.clone()], |x| x[0].sin());
    check_gradients("affine", &[x.clone()], |x| x[0].affine(-1.5, 0.25));
    check_gradients("powf", &[pos.clone()], |x| x[0].powf(1.7));
    check_gradients("clamp_min", &[x.clone()], |x| x[0].clamp_min(0.1));
    check_gradients("clamp_max", &[x.clone()], |x| x[0].clamp_max(-0.1));
    // Non-contiguous input.
    check_gradients("silu_transposed", &[randn(&[4, 3], 12)], |x| {
        x[0].t()?.silu()
    });
}

#[test]
fn grad_binary_broadcast() {
    let a = randn(&[2, 3, 4], 20);
    let b = randn(&[3, 1], 21);
    let pos = uniform(&[4], 0.5, 2.0, 22);
    check_gradients("add", &[a.clone(), b.clone()], |x| x[0].add(&x[1]));
    check_gradients("sub", &[b.clone(), a.clone()], |x| x[0].sub(&x[1]));
    check_gradients("mul", &[a.clone(), b.clone()], |x| x[0].mul(&x[1]));
    check_gradients("div", &[a.clone(), pos.clone()], |x| x[0].div(&x[1]));
    check_gradients("maximum", &[a.clone(), b.clone()], |x| x[0].maximum(&x[1]));
    check_gradients("minimum", &[a.clone(), b.clone()], |x| x[0].minimum(&x[1]));
    check_gradients("silu_mul", &[a.clone(), b.clone()], |x| {
        x[0].silu_mul(&x[1])
    });
    check_gradients("silu_mul_rev", &[b.clone(), a.clone()], |x| {
        x[0].silu_mul(&x[1])
    });
    // Non-contiguous operands: a transposed view times a broadcast row.
    check_gradients(
        "mul_transposed",
        &[randn(&[4, 3], 23), randn(&[4], 24)],
        |x| x[0].t()?.mul(&x[1]),
    );
    // The same tensor on both sides.
    check_gradients("mul_self", &[randn(&[5], 25)], |x| x[0].mul(&x[0]));
}

#[test]
fn grad_where_and_masked_fill() {
    let cond = ids(&[1, 0, 1, 1, 0, 0, 1, 0, 0, 1, 1, 0], &[3, 4]);
    check_gradients(
        "where_cond",
        &[cond.clone(), randn(&[3, 4], 30), randn(&[4], 31)],
        |x| x[0].where_cond(&x[1], &x[2]),
    );
    check_gradients("masked_fill", &[cond, randn(&[3, 4], 32)], |x| {
        x[1].masked_fill(&x[0], -3.0)
    });
}

#[test]
fn grad_reductions() {
    let x = randn(&[3, 4, 5], 40);
    check_gradients("sum_dim", &[x.clone()], |x| x[0].sum(1, false));
    check_gradients("sum_keepdim", &[x.clone()], |x| x[0].sum(-1, true));
    check_gradients("sum_all", &[x.clone()], |x| x[0].sum_all());
    check_gradients("mean", &[x.clone()], |x| x[0].mean(0, false));
    check_gradients("mean_all", &[x.clone()], |x| x[0].mean_all());
    check_gradients("max", &[x.clone()], |x| x[0].max(2, false));
    check_gradients("min", &[x.clone()], |x| x[0].min(1, true));
    check_gradients("sum_transposed", &[x.clone()], |x| {
        x[0].transpose(0, 2)?.sum(1, false)
    });
}

#[test]
fn grad_softmax() {
    let x = randn(&[3, 7], 50);
    check_gradients("softmax", &[x.clone()], |x| x[0].softmax_last_dim());
    check_gradients("log_softmax", &[x.clone()], |x| x[0].log_softmax_last_dim());
    check_gradients("softmax_transposed", &[randn(&[7, 3], 51)], |x| {
        x[0].t()?.softmax_last_dim()
    });
}

#[test]
fn grad_matmul() {
    check_gradients(
        "matmul_2d",
        &[randn(&[3, 4], 60), randn(&[4, 5], 61)],
        |x| x[0].matmul(&x[1]),
    );
    check_gradients(
        "matmul_batched",
        &[randn(&[2, 3, 4], 62), randn(&[2, 4, 5], 63)],
        |x| x[0].matmul(&x[1]),
    );
    check_gradients(
        "matmul_weight_t",
        &[randn(&[2, 3, 4], 64), randn(&[5, 4], 65)],
        |x| x[0].matmul(&x[1].t()?),
    );
    check_gradients(
        "matmul_broadcast_batch",
        &[randn(&[2, 1, 3, 4], 66), randn(&[3, 4, 2], 67)],
        |x| x[0].matmul(&x[1]),
    );
    check_gradients(
        "matmul_both_t",
        &[randn(&[2, 4, 3], 68), randn(&[2, 5, 4], 69)],
        |x| x[0].transpose(1, 2)?.matmul(&x[1].transpose(1, 2)?),
    );
}

/// A product's gradient reaches an operand that is a transposed view (`k.t()` in `q kᵀ`) as a
/// row-major gradient of the tensor under the view, as that tensor is laid out (kernels reading
/// it, rope's for one, then take their contiguous paths), with the values of the plain products.
#[test]
fn matmul_gradients_keep_the_operands_orientation() {
    let close = |got: &Tensor, want: &Tensor| {
        let (g, w) = (got.to_vec_f64().unwrap(), want.to_vec_f64().unwrap());
        assert_eq!(g.len(), w.len());
        for (a, b) in g.iter().zip(&w) {
            assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "{a} vs {b}");
        }
    };
    // The right operand transposed, as in attention's scores: [b, h, t, d] x [b, h, d, s].
    let q = randn(&[2, 3, 5, 4], 80).to_var().unwrap();
    let k = randn(&[2, 3, 6, 4], 81).to_var().unwrap();
    let g = randn(&[2, 3, 5, 6], 82);
    let y = q.matmul(&k.transpose(2, 3).unwrap()).unwrap();
    y.backward_with_grad(&g).unwrap();
    let dk = k.grad().unwrap();
    assert!(dk.is_contiguous(), "dk strides {:?}", dk.layout().strides());
    close(&dk, &g.transpose(2, 3).unwrap().matmul(&q).unwrap()); // dk = gᵀ q
    close(&q.grad().unwrap(), &g.matmul(&k).unwrap()); // dq = g k

    // The left operand transposed: [b, m, k] from a [b, k, m] tensor.
    let a = randn(&[2, 4, 3], 83).to_var().unwrap();
    let b = randn(&[2, 4, 5], 84);
    let g = randn(&[2, 3, 5], 85);
    let y = a.transpose(1, 2).unwrap().matmul(&b).unwrap();
    y.backward_with_grad(&g).unwrap();
    let da = a.grad().unwrap();
    assert!(da.is_contiguous(), "da strides {:?}", da.layout().strides());
    close(&da, &b.matmul(&g.transpose(1, 2).unwrap()).unwrap()); // da = b gᵀ
}

#[test]
fn casts_round_trip_and_backprop() {
    let x = randn(&[2, 3], 70);
    // The f32 round trip rounds every probe to 24 bits: a larger step keeps the difference
    // quotient above that rounding (the function is linear, so the step adds no error).
    let opts = GradCheck {
        step: 1e-2,
        tol: 1e-5,
        ..GradCheck::default()
    };
    check_gradients_with(opts, "to_dtype_f32_and_back", &[x.clone()], |x| {
        x[0].to_dtype(DType::F32)?.to_dtype(DType::F64)
    });
    let b = x.to_dtype(DType::BF16).unwrap();
    assert_eq!(b.dtype(), DType::BF16);
    let back = b.to_dtype(DType::F64).unwrap().to_vec_f64().unwrap();
    for (a, r) in back.iter().zip(x.to_vec_f64().unwrap()) {
        assert!((a - r).abs() <= r.abs() / 128.0 + 1e-30, "{a} vs {r}");
    }
    let _ = Tensor::zeros([2], DType::F32, Device::Cpu).unwrap();
}

/// `matmul_cast` (x converted to w's dtype, times w) gives the values and gradients of the
/// composite `x.to_dtype(..).matmul(w)` bit for bit on the CPU, for a bf16 x and f32 w (the rank
/// primitives' path) and an f32 x and f64 w (the composite's own ops), keeps x itself on the tape
/// (no converted copy), and is plain `matmul` when the dtypes agree (then a finite-difference
/// check).
#[test]
fn matmul_cast_equals_the_composite() {
    for (xt, wt) in [(DType::BF16, DType::F32), (DType::F32, DType::F64)] {
        let run = |fused: bool| {
            let x = randn(&[5, 7], 80).to_dtype(xt).unwrap().to_var().unwrap();
            let w = randn(&[7, 3], 81).to_dtype(wt).unwrap().to_var().unwrap();
            let y = if fused {
                x.matmul_cast(&w).unwrap()
            } else {
                x.to_dtype(wt).unwrap().matmul(&w).unwrap()
            };
            if fused {
                let (name, kept) = y.recorded_op().unwrap();
                assert_eq!(name, "matmul_cast");
                let dtypes: Vec<DType> = kept.iter().map(|(_, d)| *d).collect();
                assert_eq!(dtypes, vec![xt, wt], "x itself, not a converted copy");
            }
            let g = randn(&[5, 3], 82).to_dtype(wt).unwrap();
            y.backward_with_grad(&g).unwrap();
            assert_eq!(x.grad().unwrap().dtype(), xt);
            [
                y.to_vec_f64().unwrap(),
                x.grad().unwrap().to_vec_f64().unwrap(),
                w.grad().unwrap().to_vec_f64().unwrap(),
            ]
        };
        assert_eq!(run(true), run(false), "{xt} x {wt}");
    }
    check_gradients(
        "matmul_cast (same dtype)",
        &[randn(&[4, 3], 83), randn(&[3, 2], 84)],
        |v| v[0].matmul_cast(&v[1]),
    );
    let x = randn(&[2, 4, 3], 85).to_dtype(DType::F32).unwrap();
    assert!(
        x.matmul_cast(&randn(&[3, 2], 86)).is_err(),
        "rank 3 is refused"
    );
}
