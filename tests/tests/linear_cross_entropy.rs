//! `Tensor::linear_cross_entropy_rows` (cross-entropy of `h · Wᵀ` over vocabulary chunks) against
//! the unchunked `h.matmul(Wᵀ).cross_entropy_rows(..)`: values and gradients of the hidden states
//! and of the weight, for chunk sizes that divide the vocabulary and that do not, with ignored
//! targets; f64 finite differences; bf16; rank-3 inputs; errors.

use engine::{no_grad, DType, Device, Error, Tensor, IGNORE_INDEX};
use testutil::{check_gradients, ids, randn, rel_err};

const CPU: Device = Device::Cpu;

fn vals(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
}

/// `(rows, dhidden, dweight)` of the loss `Σ rows ⊙ r` through `f`, for variables `h`, `w`.
fn run(
    h: &Tensor,
    w: &Tensor,
    f: impl Fn(&Tensor, &Tensor) -> Tensor,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (hv, wv) = (h.to_var().unwrap(), w.to_var().unwrap());
    let rows = f(&hv, &wv);
    let r = Tensor::randn(rows.shape().clone(), 0.5, 1.0, 77, rows.dtype(), CPU).unwrap();
    rows.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    (
        vals(&rows),
        vals(&hv.grad().unwrap()),
        vals(&wv.grad().unwrap()),
    )
}

/// Targets `[n]` below `v`, every third one ignored.
fn targets(n: usize, v: usize, seed: u64) -> Tensor {
    let t: Vec<u32> = (0..n as u64)
        .map(|i| {
            if i % 3 == 1 {
                IGNORE_INDEX
            } else {
                (engine::rng::hash(seed, i) % v as u64) as u32
            }
        })
        .collect();
    ids(&t, &[n])
}

fn compare(dtype: DType, (n, hd, v): (usize, usize, usize), chunks: &[usize], tol: f64) {
    let h = randn(&[n, hd], 1).to_dtype(dtype).unwrap();
    let w = randn(&[v, hd], 2)
        .affine(0.5, 0.0)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let t = targets(n, v, 3);
    let want = run(&h, &w, |h, w| {
        h.matmul(&w.t().unwrap())
            .unwrap()
            .cross_entropy_rows(&t, IGNORE_INDEX)
            .unwrap()
    });
    for &c in chunks {
        let got = run(&h, &w, |h, w| {
            h.linear_cross_entropy_rows(w, &t, IGNORE_INDEX, c).unwrap()
        });
        let errs = [
            rel_err(&got.0, &want.0),
            rel_err(&got.1, &want.1),
            rel_err(&got.2, &want.2),
        ];
        for (what, e) in ["loss rows", "dhidden", "dweight"].iter().zip(errs) {
            assert!(
                e <= tol,
                "{dtype} chunk {c} of {v}: {what} relative error {e:e} > {tol:e}"
            );
        }
        // Ignored rows are exactly zero.
        for (i, &l) in got.0.iter().enumerate() {
            if i % 3 == 1 {
                assert_eq!(l, 0.0, "ignored row {i} has loss {l}");
            }
        }
    }
}

#[test]
fn matches_the_unchunked_loss_f64() {
    // 48 = 3·16 = 6·8: chunks that divide V, that do not (5, 7, 20), and one larger than V.
    compare(
        DType::F64,
        (13, 10, 48),
        &[1, 5, 7, 8, 16, 20, 48, 100],
        1e-12,
    );
}

#[test]
fn matches_the_unchunked_loss_f32() {
    compare(DType::F32, (37, 24, 300), &[64, 100, 128, 300, 1000], 1e-5);
    // Rows above the parallel threshold of the CPU kernels.
    compare(DType::F32, (130, 16, 1000), &[256, 333], 1e-5);
}

#[test]
fn matches_the_unchunked_loss_bf16() {
    compare(DType::BF16, (21, 32, 200), &[64, 77], 1e-2);
}

#[test]
fn finite_differences_f64() {
    let t = ids(&[3, IGNORE_INDEX, 0, 10, 7], &[5]);
    for chunk in [4, 11] {
        check_gradients(
            "linear_cross_entropy_rows",
            &[randn(&[5, 4], 11), randn(&[11, 4], 12)],
            |x| x[0].linear_cross_entropy_rows(&x[1], &t, IGNORE_INDEX, chunk),
        );
    }
}

#[test]
fn frozen_weight_gets_no_gradient_and_rank3_folds() {
    let h = randn(&[2, 3, 6], 21).to_var().unwrap();
    let w = randn(&[9, 6], 22); // frozen: not a variable
    let t = ids(&[1, 8, IGNORE_INDEX, 0, 4, 4], &[2, 3]);
    let rows = h
        .linear_cross_entropy_rows(&w, &t, IGNORE_INDEX, 4)
        .unwrap();
    assert_eq!(rows.dims(), &[2, 3]);
    let want = no_grad(|| {
        h.matmul(&w.t().unwrap())
            .unwrap()
            .cross_entropy_rows(&t, IGNORE_INDEX)
            .unwrap()
    });
    assert!(rel_err(&vals(&rows), &vals(&want)) < 1e-12);
    rows.sum_all().unwrap().backward().unwrap();
    assert!(h.grad().is_some());
    assert!(w.grad().is_none());
}

#[test]
fn bad_arguments_are_typed_errors() {
    let h = randn(&[4, 6], 31);
    let w = randn(&[9, 6], 32);
    let t = ids(&[1, 2, 3, 4], &[4]);
    assert!(matches!(
        h.linear_cross_entropy_rows(&w, &t, IGNORE_INDEX, 0),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        h.linear_cross_entropy_rows(&randn(&[9, 5], 33), &t, IGNORE_INDEX, 4),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        h.linear_cross_entropy_rows(&w, &ids(&[1, 2, 3], &[3]), IGNORE_INDEX, 4),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        h.linear_cross_entropy_rows(&w.to_dtype(DType::F32).unwrap(), &t, IGNORE_INDEX, 4),
        Err(Error::DTypeMismatch { .. })
    ));
    assert!(matches!(
        h.linear_cross_entropy_rows(&w, &ids(&[1, 2, 9, 4], &[4]), IGNORE_INDEX, 4),
        Err(Error::IndexOutOfRange {
            index: 9,
            size: 9,
            ..
        })
    ));
}
