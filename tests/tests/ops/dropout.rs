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
//!
//! The dropout key ([`engine::set_dropout_key`]): under key K seed S draws seed S ^ K's mask, bit
//! for bit (op forward and backward, mask tensor; below and past the parallel threshold), not
//! seed S's; the CPU's key is per thread. Its GPU parity runs in tests/tests/cuda_dropout_key.rs
//! (a GPU's key is device-wide, and the tests here run on parallel threads).

use crate::util::vals;
use engine::{no_grad, DType, Device, Storage, Tensor};
use testutil::{bits, check_gradients, ids, randn, DropoutKey};

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

/// A dropout key ([`engine::set_dropout_key`]) for the tests: many bits set, low and high.
const KEY: u64 = 0x9E37_79B9_7F4A_7C15;

/// Under key K a dropout of seed S draws the mask of seed S ^ K: `Tensor::dropout` forward and
/// backward, bit for bit, in every float dtype, contiguous and transposed, below and past the
/// CPU's parallel threshold (2^14 elements: the rayon chunks must get the keyed seed), and the
/// `dropout_mask` tensor; it is not the mask of S under key 0; and with the key back at 0 seed S
/// draws its own mask again.
#[test]
fn the_dropout_key_is_xored_into_the_seed() {
    let (p, seed) = (0.3, 41);
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        for dims in [[37, 29], [300, 200]] {
            let x = randn(&dims, 5).to_dtype(dtype).unwrap();
            for transposed in [false, true] {
                // (y, dx) bits of the dropout of seed `s` under the thread's current key.
                let run = |s: u64| {
                    let x = x.to_var().unwrap();
                    let v = if transposed {
                        x.t().unwrap()
                    } else {
                        x.clone()
                    };
                    let y = v.dropout(p, s, true).unwrap();
                    let g = randn(y.dims(), 6).to_dtype(dtype).unwrap();
                    y.backward_with_grad(&g).unwrap();
                    (bits(&y), bits(&x.grad().unwrap()))
                };
                let what = format!("{dtype} {dims:?} transposed {transposed}");
                let plain = run(seed);
                let keyed = {
                    let _key = DropoutKey::set(CPU, KEY);
                    run(seed)
                };
                assert_eq!(keyed, run(seed ^ KEY), "{what}: key K, seed S = seed S ^ K");
                assert_ne!(keyed.0, plain.0, "{what}: the key changes the output");
                assert_ne!(keyed.1, plain.1, "{what}: the key changes the gradient");
                assert_eq!(run(seed), plain, "{what}: the key is back at 0");
            }
        }
    }
    let shape = engine::Shape::from(40_000);
    let mask = |s: u64| {
        let m = Storage::dropout_mask(CPU, &shape, DType::F32, p, s).unwrap();
        let l = engine::Layout::contiguous(shape.clone());
        engine::backend::BackendStorage::to_f64_vec(&m, &l).unwrap()
    };
    let keyed = {
        let _key = DropoutKey::set(CPU, KEY);
        mask(seed)
    };
    assert_eq!(keyed, mask(seed ^ KEY), "dropout_mask under the key");
    assert_ne!(keyed, mask(seed));
}

/// The CPU's dropout key is the calling thread's: while this thread's is set, another thread
/// draws seed S's own mask (key 0), past the parallel threshold too.
#[test]
fn the_cpu_dropout_key_is_per_thread() {
    let draw = || bits(&randn(&[300, 200], 7).dropout(0.3, 9, true).unwrap());
    let plain = draw();
    let _key = DropoutKey::set(CPU, KEY);
    let keyed = draw();
    assert_ne!(keyed, plain, "this thread's key applies");
    let other = std::thread::scope(|s| s.spawn(draw).join().unwrap());
    assert_eq!(other, plain, "another thread's key is still 0");
    assert_eq!(draw(), keyed, "and this thread's is unchanged");
}

/// Each lane has its own dropout key ([`engine::set_lane`]): a key set in lane 1 keys the draws
/// made in lane 1 only, lane 0's stays 0, switching back to lane 1 finds its key again; a lane
/// past [`engine::LANES`] is refused with a one-line error.
#[test]
fn each_lane_has_its_own_dropout_key() {
    let draw = |seed: u64| bits(&randn(&[300, 200], 7).dropout(0.3, seed, true).unwrap());
    let (plain, keyed) = (draw(9), draw(9 ^ KEY));
    engine::set_lane(CPU, 1).unwrap();
    engine::set_dropout_key(CPU, KEY).unwrap();
    assert_eq!(draw(9), keyed, "lane 1 draws under its key");
    engine::set_lane(CPU, 0).unwrap();
    assert_eq!(draw(9), plain, "lane 0's key is still 0");
    engine::set_lane(CPU, engine::LANES - 1).unwrap();
    assert_eq!(draw(9), plain, "so is the last lane's");
    engine::set_lane(CPU, 1).unwrap();
    assert_eq!(draw(9), keyed, "lane 1 kept its key");
    engine::set_dropout_key(CPU, 0).unwrap();
    engine::set_lane(CPU, 0).unwrap();
    let e = engine::set_lane(CPU, engine::LANES)
        .unwrap_err()
        .to_string();
    assert!(e.contains("out of range") && !e.contains('\n'), "{e}");
    assert_eq!(draw(9), plain, "a refused lane changes nothing");
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
    use engine::{DType, Device, Shape, Storage};
    use testutil::gpu::{dropout_output_and_grad, read, Checker, FLOATS};

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
            for transposed in [false, true] {
                let run = |d| dropout_output_and_grad(d, dt, transposed);
                assert_eq!(
                    run(Device::Cpu),
                    run(gpu),
                    "dropout {dt} transposed {transposed}"
                );
            }
        }
    }
}
