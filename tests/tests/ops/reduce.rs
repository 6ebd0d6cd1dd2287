//! Reductions (`engine/src/ops/reduce.rs`, `backend/{cpu,cuda}/reduce.rs`,
//! `kernels/src/reduce.cu`): sum, max, min, argmax, argmin along a dim, mean, and `sum_all`.
//!
//! Gradients by central finite differences in f64 (relative error 1e-6), keepdim or not and on a
//! transposed view; values against naive loops (sums within 1e-12, max and argmax exact);
//! `sum_all` over more elements than one reduction row within 1e-12 (f64), 1e-4 (f32), 2e-2
//! (bf16) of the sum of magnitudes over √n, with an all-ones gradient; typed errors.
//!
//! Parity (module `gpu`): every reduction along every dim of a `[5, 37, 260]` tensor and of a
//! permuted view, in every dtype, and NaN propagation (max, min, and the first-NaN rule of
//! argmax and argmin). The CPU is the reference: relative error within f32 1e-5, bf16 1e-2, f64
//! 1e-10, u32 (and arg-reductions) equal; NaN never passes unless both give it.

use engine::{DType, Error};
use testutil::{check_gradients, randn};

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
fn reductions_values() {
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

#[test]
fn reduce_typed_errors() {
    let a = randn(&[2, 3], 13);
    assert!(matches!(
        a.sum(2, false),
        Err(Error::DimOutOfRange { op: "sum", .. })
    ));
}

#[cfg(feature = "cuda")]
mod gpu {
    //! CPU ↔ CUDA parity (skipped, saying why, without a GPU).
    use engine::backend::{BackendStorage, ReduceOp};
    use engine::{DType, Layout};
    use testutil::gpu::{input, ints, read, vals, Checker, ALL};

    #[test]
    fn reductions() {
        let Some(mut c) = Checker::new() else { return };
        let shape = [5usize, 37, 260];
        let n: usize = shape.iter().product();
        for dt in ALL {
            let data = if dt == DType::U32 {
                ints(n, 1000, 20)
            } else {
                vals(n, 20)
            };
            for op in [
                ReduceOp::Sum,
                ReduceOp::Max,
                ReduceOp::Min,
                ReduceOp::ArgMax,
                ReduceOp::ArgMin,
            ] {
                let out_dt = if matches!(op, ReduceOp::ArgMax | ReduceOp::ArgMin) {
                    DType::U32
                } else {
                    dt
                };
                for dim in 0..3 {
                    c.case(
                        &format!("reduce {op:?} dim {dim} of {shape:?} {dt}"),
                        out_dt,
                        |dev| {
                            let s = input(dev, &data, dt);
                            let l = Layout::contiguous(shape);
                            let mut out = shape;
                            out[dim] = 1;
                            Ok(read(&s.reduce(&l, dim, op)?, out))
                        },
                    );
                    // The same over a permuted view.
                    c.case(
                        &format!("reduce {op:?} dim {dim} of permuted {dt}"),
                        out_dt,
                        |dev| {
                            let s = input(dev, &data, dt);
                            let l = Layout::contiguous(shape).permute(&[2, 0, 1]);
                            let mut out = [shape[2], shape[0], shape[1]];
                            out[dim] = 1;
                            Ok(read(&s.reduce(&l, dim, op)?, out))
                        },
                    );
                }
            }
        }
        // NaN propagation of max and argmax's first-NaN rule.
        let mut nan_data = vals(64, 21);
        nan_data[5] = f64::NAN;
        nan_data[32] = f64::NAN;
        for op in [
            ReduceOp::Max,
            ReduceOp::Min,
            ReduceOp::ArgMax,
            ReduceOp::ArgMin,
            ReduceOp::Sum,
        ] {
            let out_dt = if matches!(op, ReduceOp::ArgMax | ReduceOp::ArgMin) {
                DType::U32
            } else {
                DType::F32
            };
            c.case(&format!("reduce {op:?} with NaN"), out_dt, |dev| {
                let s = input(dev, &nan_data, DType::F32);
                Ok(read(
                    &s.reduce(&Layout::contiguous([2, 32]), 1, op)?,
                    [2, 1],
                ))
            });
        }
        c.finish();
    }
}
