//! The fused LoRA ops `Tensor::lora_add` and `Tensor::linear_lora` (the base matmul inside the op)
//! against the composite they replace (`x Wᵀ + LoraLinear::delta`: cast, dropout, two matmuls,
//! scale, cast back, add): values and every gradient (x, A, B, and W when it is trainable) in f64
//! (1e-12), f32 (1e-5) and on a bf16 base (1e-2), with and without dropout (the mask must be the
//! same one), x contiguous and a non-contiguous view, row counts that are not multiples of the
//! CUDA tiles; finite differences of both ops in f64; that `linear_lora` keeps no `[M, out]`
//! tensor on the tape; typed errors for bad shapes and dtypes.

use engine::{DType, Device, Tensor};
use model::adapters::lora::linear;
use model::adapters::{lora_linear, LoraLinear};
use testutil::{check_gradients, randn, rel_err};

/// Random values (standard normal × `s`) of `shape` in `dtype`.
fn rnd(shape: &[usize], s: f64, seed: u64, dtype: DType) -> Tensor {
    Tensor::randn(shape.to_vec(), 0.0, s, seed, dtype, Device::Cpu).unwrap()
}

fn adapter(base: DType) -> DType {
    if base == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// One case: `lead` leading dims, `(n_in, n_out, r)`, dropout, and whether x is a transposed
/// (non-contiguous) view. Returns the relative errors of (out, dx, dA, dB, dW) of the fused ops
/// (the worse of the two) against the composite.
fn compare(
    base: DType,
    lead: &[usize],
    (n_in, n_out, r): (usize, usize, usize),
    dropout: Option<(f64, u64)>,
    transposed: bool,
) -> [f64; 5] {
    let ad = adapter(base);
    let m: usize = lead.iter().product();
    // x: a leaf of [m, in] or of [in, m] (then viewed transposed), in the base dtype.
    let x_leaf = if transposed {
        rnd(&[n_in, m], 1.0, 1, base)
    } else {
        rnd(&[m, n_in], 1.0, 1, base)
    };
    let w = rnd(&[n_out, n_in], 0.3, 2, base);
    let a0 = rnd(&[r, n_in], 0.4, 3, ad);
    let b0 = rnd(&[n_out, r], 0.4, 4, ad);
    let gout = {
        let mut d = lead.to_vec();
        d.push(n_out);
        rnd(&d, 1.0, 5, base)
    };
    let scale = 1.75;
    // mode 0: the composite, 1: `lora_add` on the base output, 2: `linear_lora`.
    let run = |mode: u8| -> Vec<Vec<f64>> {
        let xl = x_leaf.to_var().unwrap();
        let (a, b) = (a0.to_var().unwrap(), b0.to_var().unwrap());
        let wv = w.to_var().unwrap(); // trainable here, so that dW is compared too
        let x = if transposed {
            xl.t().unwrap()
        } else {
            xl.clone()
        };
        let mut d = lead.to_vec();
        d.push(n_in);
        let x = x.reshape(d).unwrap();
        let l = LoraLinear::new(a.clone(), b.clone(), scale, dropout.map_or(0.0, |d| d.0));
        let seed = dropout.map(|d| d.1);
        let out = match mode {
            0 => linear(&x, &wv)
                .unwrap()
                .add(&l.delta(&x, seed).unwrap())
                .unwrap(),
            1 => linear(&x, &wv)
                .unwrap()
                .lora_add(&x, &a, &b, scale, dropout)
                .unwrap(),
            _ => x.linear_lora(&wv, &a, &b, scale, dropout).unwrap(),
        };
        assert_eq!(out.dtype(), base);
        out.backward_with_grad(&gout).unwrap();
        vec![
            out.to_vec_f64().unwrap(),
            xl.grad().unwrap().to_vec_f64().unwrap(),
            a.grad().unwrap().to_vec_f64().unwrap(),
            b.grad().unwrap().to_vec_f64().unwrap(),
            wv.grad().unwrap().to_vec_f64().unwrap(),
        ]
    };
    let c = run(0);
    let (f1, f2) = (run(1), run(2));
    [0, 1, 2, 3, 4].map(|i| rel_err(&f1[i], &c[i]).max(rel_err(&f2[i], &c[i])))
}

/// Leading dims and `(in, out, r)`.
type Case = (&'static [usize], (usize, usize, usize));

fn check(base: DType, tol: f64) {
    let shapes: &[Case] = &[
        (&[1], (7, 5, 3)),
        (&[37], (20, 12, 4)),
        (&[2, 19], (33, 17, 8)),
        (&[300], (576, 96, 16)),
    ];
    for &(lead, dims) in shapes {
        for dropout in [None, Some((0.3, 99)), Some((0.05, 7))] {
            for transposed in [false, true] {
                let e = compare(base, lead, dims, dropout, transposed);
                let ok = e.iter().all(|&v| v <= tol);
                assert!(
                    ok,
                    "{base} lead {lead:?} dims {dims:?} dropout {dropout:?} transposed \
                     {transposed}: rel err (out, dx, dA, dB, dW) = {e:?} > {tol}"
                );
            }
        }
    }
}

#[test]
fn fused_equals_composite_f64() {
    check(DType::F64, 1e-12);
}

#[test]
fn fused_equals_composite_f32() {
    check(DType::F32, 1e-5);
}

#[test]
fn fused_equals_composite_bf16_base() {
    check(DType::BF16, 1e-2);
}

/// The mask is exactly `x.to_dtype(adapter).dropout(p, seed, true)`'s: with `A` = identity rows
/// the codes are the dropped inputs themselves.
#[test]
fn dropout_mask_is_the_dropout_ops() {
    let (m, n) = (23, 6);
    let x = rnd(&[m, n], 1.0, 11, DType::F32);
    let eye = Tensor::from_vec(
        (0..n * n)
            .map(|i| if i / n == i % n { 1.0f32 } else { 0.0 })
            .collect(),
        [n, n],
        Device::Cpu,
    )
    .unwrap();
    let y = Tensor::zeros([m, n], DType::F32, Device::Cpu).unwrap();
    let out = y.lora_add(&x, &eye, &eye, 1.0, Some((0.4, 5))).unwrap();
    let want = x.dropout(0.4, 5, true).unwrap();
    assert_eq!(out.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
    assert!(out.to_vec_f32().unwrap().contains(&0.0));
}

#[test]
fn finite_differences_f64() {
    let (m, n_in, n_out, r) = (9, 7, 5, 3);
    let y = randn(&[m, n_out], 1);
    let a = randn(&[r, n_in], 3);
    let b = randn(&[n_out, r], 4);
    for dropout in [None, Some((0.3, 21))] {
        let x = randn(&[m, n_in], 2);
        check_gradients("lora_add", &[y.clone(), x, a.clone(), b.clone()], |v| {
            v[0].lora_add(&v[1], &v[2], &v[3], 1.5, dropout)
        });
        // x as a non-contiguous view, with leading dims.
        let xt = randn(&[n_in, m], 6);
        check_gradients(
            "lora_add (x view)",
            &[y.clone(), xt, a.clone(), b.clone()],
            |v| {
                let x = v[1].t()?.reshape([3, 3, n_in])?;
                let y = v[0].reshape([3, 3, n_out])?;
                y.lora_add(&x, &v[2], &v[3], -0.7, dropout)
            },
        );
    }
}

#[test]
fn linear_lora_finite_differences_f64() {
    let (m, n_in, n_out, r) = (9, 7, 5, 3);
    let w = randn(&[n_out, n_in], 1);
    let a = randn(&[r, n_in], 3);
    let b = randn(&[n_out, r], 4);
    for dropout in [None, Some((0.3, 21))] {
        let x = randn(&[m, n_in], 2);
        check_gradients("linear_lora", &[x, w.clone(), a.clone(), b.clone()], |v| {
            v[0].linear_lora(&v[1], &v[2], &v[3], 1.5, dropout)
        });
        // x as a non-contiguous view with leading dims.
        let xt = randn(&[n_in, m], 6);
        check_gradients(
            "linear_lora (x view)",
            &[xt, w.clone(), a.clone(), b.clone()],
            |v| {
                let x = v[0].t()?.reshape([3, 3, n_in])?;
                x.linear_lora(&v[1], &v[2], &v[3], -0.7, dropout)
            },
        );
    }
}

/// The point of `linear_lora`: its tape node keeps x, W, A, B (and, inside the rule, the rank-r
/// codes), never the `[M, out]` base output. `lora_add` on `x Wᵀ` holds that output only as a
/// graph-only reference (its rule never reads it), so the buffer is freed with the last handle.
#[test]
fn linear_lora_keeps_no_base_output() {
    let (m, n_in, n_out) = (6, 4, 9);
    let x = randn(&[m, n_in], 1).to_var().unwrap();
    let w = randn(&[n_out, n_in], 2);
    let (a, b) = (
        randn(&[2, n_in], 3).to_var().unwrap(),
        randn(&[n_out, 2], 4).to_var().unwrap(),
    );
    let out = x.linear_lora(&w, &a, &b, 1.0, None).unwrap();
    let (name, shapes) = out.recorded_op().unwrap();
    assert_eq!(name, "linear_lora");
    let dims: Vec<Vec<usize>> = shapes.iter().map(|(s, _)| s.dims().to_vec()).collect();
    assert_eq!(
        dims,
        vec![
            vec![m, n_in],
            vec![n_out, n_in],
            vec![2, n_in],
            vec![n_out, 2]
        ]
    );
    let base = linear(&x, &w).unwrap(); // [m, n_out]
    let y = base.lora_add(&x, &a, &b, 1.0, None).unwrap();
    let (_, kept) = y.recorded_op().unwrap();
    let dims: Vec<Vec<usize>> = kept.iter().map(|(s, _)| s.dims().to_vec()).collect();
    assert_eq!(
        dims,
        vec![vec![m, n_in], vec![2, n_in], vec![n_out, 2]],
        "lora_add keeps x, A, B, not y"
    );
    let buffer = base.weak_storage().unwrap();
    drop(base);
    assert!(buffer.upgrade().is_none(), "the base output is freed");
    y.sum_all().unwrap().backward().unwrap();
    assert!(x.grad().is_some() && a.grad().is_some() && b.grad().is_some());
    // Without a trainable input there is no node at all.
    let frozen = randn(&[m, n_in], 5);
    let (a0, b0) = (randn(&[2, n_in], 3), randn(&[n_out, 2], 4));
    assert!(frozen
        .linear_lora(&w, &a0, &b0, 1.0, None)
        .unwrap()
        .recorded_op()
        .is_none());
}

#[test]
fn lora_linear_uses_the_fused_op_and_keeps_the_delta() {
    let x = randn(&[4, 6], 1);
    let w = randn(&[5, 6], 2);
    let l = LoraLinear::new(randn(&[2, 6], 3), randn(&[5, 2], 4), 0.5, 0.2);
    let fused = lora_linear(&x, &w, Some(&l), Some(3)).unwrap();
    let comp = linear(&x, &w)
        .unwrap()
        .add(&l.delta(&x, Some(3)).unwrap())
        .unwrap();
    let e = rel_err(&fused.to_vec_f64().unwrap(), &comp.to_vec_f64().unwrap());
    assert!(e <= 1e-12, "{e}");
}

#[test]
fn bad_shapes_and_dtypes_are_typed_errors() {
    let y = rnd(&[4, 5], 1.0, 1, DType::F32);
    let x = rnd(&[4, 6], 1.0, 2, DType::F32);
    let a = rnd(&[2, 6], 1.0, 3, DType::F32);
    let b = rnd(&[5, 2], 1.0, 4, DType::F32);
    assert!(y.lora_add(&x, &a, &b, 1.0, None).is_ok());
    let bad_x = rnd(&[3, 6], 1.0, 2, DType::F32);
    assert!(matches!(
        y.lora_add(&bad_x, &a, &b, 1.0, None),
        Err(engine::Error::ShapeMismatch { .. })
    ));
    // linear_lora: W [out, in] of x's dtype.
    let w = rnd(&[5, 6], 1.0, 5, DType::F32);
    assert!(x.linear_lora(&w, &a, &b, 1.0, None).is_ok());
    assert!(matches!(
        x.linear_lora(&rnd(&[5, 7], 1.0, 5, DType::F32), &a, &b, 1.0, None),
        Err(engine::Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        x.linear_lora(&w.to_dtype(DType::BF16).unwrap(), &a, &b, 1.0, None),
        Err(engine::Error::DTypeMismatch { .. })
    ));
    assert!(matches!(
        x.linear_lora(&w, &a, &rnd(&[4, 2], 1.0, 4, DType::F32), 1.0, None),
        Err(engine::Error::ShapeMismatch { .. })
    ));
    let bad_a = rnd(&[2, 7], 1.0, 3, DType::F32);
    assert!(matches!(
        y.lora_add(&x, &bad_a, &b, 1.0, None),
        Err(engine::Error::ShapeMismatch { .. })
    ));
    let bad_b = rnd(&[5, 3], 1.0, 4, DType::F32);
    assert!(matches!(
        y.lora_add(&x, &a, &bad_b, 1.0, None),
        Err(engine::Error::ShapeMismatch { .. })
    ));
    let x16 = x.to_dtype(DType::BF16).unwrap();
    assert!(matches!(
        y.lora_add(&x16, &a, &b, 1.0, None),
        Err(engine::Error::DTypeMismatch { .. })
    ));
    let (a16, b16) = (
        a.to_dtype(DType::BF16).unwrap(),
        b.to_dtype(DType::BF16).unwrap(),
    );
    assert!(matches!(
        y.lora_add(&x, &a16, &b16, 1.0, None),
        Err(engine::Error::UnsupportedDType { .. })
    ));
    assert!(matches!(
        y.lora_add(&x, &a, &b, 1.0, Some((1.0, 3))),
        Err(engine::Error::InvalidArgument { .. })
    ));
}
