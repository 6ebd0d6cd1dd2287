//! Dropout (`Tensor::dropout`; `engine/src/ops/dropout.rs`, `backend/{cpu,cuda}/dropout.rs`,
//! `kernels/src/dropout.cu`): the mask (`dropout_mask`) and the one-pass op
//! (`BackendStorage::dropout_apply`).
//!
//! Gradients by central finite differences in f64 (relative error 1e-6), in training and
//! evaluation, on a transposed view; the dropped fraction (within 0.005 of p on 200 000
//! elements), kept values scaled by 1/(1 − p) (1e-12), same seed same mask, identity in
//! evaluation and at p = 0; the one-pass op equal bit for bit to the product with a mask tensor
//! of x's dtype, on contiguous and strided views, forward and backward, with a tape node that
//! keeps nothing; errors for p outside [0, 1) and u32 input.
//!
//! Parity (module `gpu`): masks of 1024, 1007 and 1 elements in every float dtype (relative
//! error within f32 1e-5, bf16 1e-2, f64 1e-10), masks bit-identical to the CPU's, and the
//! one-pass op forward and backward equal to the CPU's in every float dtype, contiguous and
//! transposed.

use crate::util::vals;
use engine::{no_grad, DType, Device, Storage, Tensor};
use testutil::{bits, check_gradients, ids, randn};

const CPU: Device = Device::Cpu;

/// `x ⊙ mask` the long way: the mask tensor of x's dtype and an elementwise product.
fn with_mask(x: &Tensor, p: f64, seed: u64) -> Tensor {
    let mask = Storage::dropout_mask(x.device(), x.shape(), x.dtype(), p, seed).unwrap();
    let mask = Tensor::from_f64(
        &engine::backend::BackendStorage::to_f64_vec(
            &mask,
            &engine::Layout::contiguous(x.shape().clone()),
        )
        .unwrap(),
        x.shape().clone(),
        x.dtype(),
        x.device(),
    )
    .unwrap();
    x.mul(&mask).unwrap()
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
fn dropout_equals_the_product_with_the_mask_bit_for_bit() {
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        for p in [0.05, 0.5] {
            let x = randn(&[37, 29], 5).to_dtype(dtype).unwrap();
            // Contiguous, and a transposed (strided) view: the mask follows the logical order.
            for v in [x.clone(), x.t().unwrap()] {
                let got = v.dropout(p, 91, true).unwrap();
                let want = with_mask(&v, p, 91);
                assert_eq!(bits(&got), bits(&want), "{dtype} p {p} {:?}", v.dims());
                let zeros = got
                    .to_vec_f64()
                    .unwrap()
                    .iter()
                    .filter(|&&e| e == 0.0)
                    .count();
                let rate = zeros as f64 / got.elem_count() as f64;
                assert!((rate - p).abs() < 0.1, "{dtype} p {p}: {rate} dropped");
            }
        }
    }
}

#[test]
fn dropout_backward_redraws_the_mask_and_keeps_nothing() {
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        let x = randn(&[16, 24], 6)
            .to_dtype(dtype)
            .unwrap()
            .to_var()
            .unwrap();
        // An activation (not a parameter, which any node keeps in full): nothing is kept.
        let h = x.neg().unwrap().dropout(0.3, 17, true).unwrap();
        let (name, kept) = h.recorded_op().unwrap();
        assert_eq!(
            (name, kept.len()),
            ("dropout", 0),
            "the node keeps no buffer"
        );
        let y = x.dropout(0.3, 17, true).unwrap();
        let g = randn(&[16, 24], 7).to_dtype(dtype).unwrap();
        y.backward_with_grad(&g).unwrap();
        let want = with_mask(&g, 0.3, 17);
        assert_eq!(bits(&x.grad().unwrap()), bits(&want), "{dtype}");
    }
    // Evaluation and p = 0 are the identity.
    let x = randn(&[3, 4], 8);
    assert!(x.dropout(0.3, 1, false).unwrap().same_storage(&x));
    assert!(x.dropout(0.0, 1, true).unwrap().same_storage(&x));
    assert!(x.dropout(1.0, 1, true).is_err());
    let _ = Device::Cpu;
}

#[test]
fn dropout_errors() {
    let x = randn(&[3, 4], 180);
    assert!(x.dropout(1.0, 0, true).is_err());
    assert!(x.dropout(-0.1, 0, true).is_err());
    assert!(x.dropout(1.5, 0, false).is_err());
    assert!(ids(&[1, 2], &[2]).dropout(0.5, 0, true).is_err());
}

#[cfg(feature = "cuda")]
mod gpu {
    //! CPU ↔ CUDA parity (skipped, saying why, without a GPU).
    use engine::{DType, Device, Shape, Storage, Tensor};
    use testutil::gpu::{read, vals, Checker, FLOATS};

    #[test]
    fn dropout_mask_and_one_pass_dropout() {
        let Some(mut c) = Checker::new() else { return };
        for &n in &[1024usize, 1007, 1] {
            for dt in FLOATS {
                c.case(&format!("dropout_mask {n} {dt}"), dt, |dev| {
                    Ok(read(
                        &Storage::dropout_mask(dev, &Shape::from(n), dt, 0.3, 79)?,
                        n,
                    ))
                });
            }
        }
        c.finish();
        // Dropout masks are bit-identical to the CPU's.
        let gpu = Device::Cuda(0);
        let shape = Shape::from(4097);
        let m = |d| Storage::dropout_mask(d, &shape, DType::F32, 0.25, 6).unwrap();
        assert_eq!(read(&m(Device::Cpu), 4097), read(&m(gpu), 4097));
        // One-pass dropout (dropout_apply) in every float dtype, contiguous and transposed.
        for dt in [DType::F32, DType::BF16, DType::F64] {
            let x = |d| {
                Tensor::from_f64(&vals(63 * 65, 40), [63, 65], dt, d)
                    .unwrap()
                    .to_var()
                    .unwrap()
            };
            for transposed in [false, true] {
                let run = |d| {
                    let x = x(d);
                    let v = if transposed {
                        x.t().unwrap()
                    } else {
                        x.clone()
                    };
                    let y = v.dropout(0.2, 33, true).unwrap();
                    y.backward_with_grad(&y.ones_like().unwrap()).unwrap();
                    let dx = x.grad().unwrap();
                    (y.to_vec_f64().unwrap(), dx.to_vec_f64().unwrap())
                };
                assert_eq!(
                    run(Device::Cpu),
                    run(gpu),
                    "dropout {dt} transposed {transposed}"
                );
            }
        }
    }
}
