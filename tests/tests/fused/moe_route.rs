//! The router unit (`engine::fused::moe_route`): `Tensor::moe_route_topk` on the CPU against the
//! composite it replaces (softmax, top-k on the probabilities, renormalise), its ties and typed
//! errors, and the f64 finite-difference gradients of both outputs; then (module `gpu`) the
//! CPU ↔ CUDA parity of its values, ids and logits gradient.
//!
//! Parity: the same random inputs (never zeros) on both devices, compared by relative error
//! ‖gpu − cpu‖ / ‖cpu‖: f32 ≤ 1e-5, bf16 ≤ 1e-2, f64 ≤ 1e-10; the ids must be equal; NaN never
//! passes. Row counts are and are not multiples of the kernels' 256-thread blocks. Without a GPU
//! (or without the `cuda` feature) the tests print why they skip and pass.

use engine::{DType, Device, Error, Tensor};
use testutil::{check_gradients, randn, rel_err};

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
}

/// The router of before the fused kernel: softmax, top-k on the probabilities, renormalise.
fn route_reference(logits: &Tensor, k: usize) -> (Vec<f64>, Vec<u32>, Vec<f64>) {
    let p = logits.softmax_last_dim().unwrap();
    let (vals, idx) = p.topk(k).unwrap();
    let w = vals.div(&vals.sum_keepdim(1).unwrap()).unwrap();
    (f64s(&p), idx.to_vec_u32().unwrap(), f64s(&w))
}

#[test]
fn route_topk_matches_softmax_topk_renormalise() {
    for dtype in [DType::F64, DType::F32] {
        for (n, k) in [(13, 1), (13, 2), (37, 2), (5, 8)] {
            let logits = randn(&[n, 8], 7 + n as u64).to_dtype(dtype).unwrap();
            let (p, i, w) = logits.moe_route_topk(k).unwrap();
            assert_eq!(p.dtype(), dtype);
            assert_eq!(w.dtype(), dtype);
            assert_eq!(
                (p.dims(), i.dims(), w.dims()),
                (&[n, 8][..], &[n, k][..], &[n, k][..])
            );
            let (rp, ri, rw) = route_reference(&logits, k);
            let tol = if dtype == DType::F64 { 1e-14 } else { 1e-6 };
            assert!(rel_err(&f64s(&p), &rp) < tol, "{dtype} n={n} k={k} probs");
            assert_eq!(i.to_vec_u32().unwrap(), ri, "{dtype} n={n} k={k} ids");
            assert!(rel_err(&f64s(&w), &rw) < tol, "{dtype} n={n} k={k} weights");
        }
    }
}

#[test]
fn route_topk_ties_keep_the_lower_index_first() {
    // Row 0: all equal; row 1: a tie for second place; row 2: a tie for first place.
    let l = [
        0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, //
        1.0, 2.0, 0.0, 2.0, -1.0, 3.0, 0.0, 2.0, //
        4.0, 0.0, 4.0, 1.0, 1.0, 0.0, 0.0, 0.0,
    ];
    let logits = Tensor::from_f64(&l, [3, 8], DType::F64, Device::Cpu).unwrap();
    for k in [1, 2, 3] {
        let (_, i, w) = logits.moe_route_topk(k).unwrap();
        let (_, ri, rw) = route_reference(&logits, k);
        assert_eq!(i.to_vec_u32().unwrap(), ri, "k={k}");
        assert!(rel_err(&f64s(&w), &rw) < 1e-15);
    }
    let (_, i, _) = logits.moe_route_topk(3).unwrap();
    assert_eq!(i.to_vec_u32().unwrap(), vec![0, 1, 2, 5, 1, 3, 0, 2, 3]);
}

#[test]
fn route_topk_errors() {
    let logits = randn(&[4, 8], 1);
    assert!(matches!(
        logits.moe_route_topk(0),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        logits.moe_route_topk(9),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        randn(&[8], 1).moe_route_topk(1),
        Err(Error::RankMismatch { .. })
    ));
}

#[test]
fn grad_route_topk_probs_and_weights() {
    for k in [1, 2, 3] {
        let logits = randn(&[9, 8], 20 + k as u64);
        check_gradients("moe_route_topk probs", &[logits.clone()], |v| {
            Ok(v[0].moe_route_topk(k)?.0)
        });
        check_gradients("moe_route_topk weights", &[logits.clone()], |v| {
            Ok(v[0].moe_route_topk(k)?.2)
        });
        // Both outputs in one loss: the tape sums the two logits gradients.
        check_gradients("moe_route_topk both", &[logits.clone()], |v| {
            let (p, _, w) = v[0].moe_route_topk(k)?;
            engine::cat(&[&p.flatten_all()?, &w.flatten_all()?], 0)
        });
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    //! CPU ↔ CUDA parity (skipped, saying why, without a GPU).
    use engine::{DType, Device, Tensor};
    use testutil::gpu::{device as gpu, rel_err, serial, tol};

    const FLOATS: [DType; 3] = [DType::F32, DType::BF16, DType::F64];

    /// Deterministic values in ±[0.1, 2.1) (never zero).
    fn vals(n: usize, seed: u64) -> Vec<f64> {
        (0..n as u64)
            .map(|i| {
                let mag = 0.1 + 2.0 * engine::rng::uniform(seed, i);
                if engine::rng::uniform(seed ^ 0x5555, i) < 0.5 {
                    -mag
                } else {
                    mag
                }
            })
            .collect()
    }

    fn t(v: &[f64], shape: &[usize], dtype: DType, dev: Device) -> Tensor {
        Tensor::from_f64(v, shape.to_vec(), dtype, dev).unwrap()
    }

    fn f64s(t: &Tensor) -> Vec<f64> {
        t.to_vec_f64().unwrap()
    }

    /// Compares named float outputs (CPU first) within `tol`; collects failures.
    fn check(fails: &mut Vec<String>, what: &str, want: &[f64], got: &[f64], tol: f64) {
        assert!(
            want.iter().any(|&x| x != 0.0) || want.is_empty(),
            "{what}: the reference is all zeros (a useless check)"
        );
        let e = rel_err(want, got);
        if e.is_nan() || e > tol {
            fails.push(format!("{what}: relative error {e:.3e} > {tol:.0e}"));
        }
    }

    fn done(fails: Vec<String>) {
        assert!(fails.is_empty(), "{}", fails.join("\n"));
    }

    #[test]
    fn route_topk_values_ids_and_gradient() {
        let _s = serial();
        let Some(g) = gpu() else { return };
        let mut fails = Vec::new();
        for dtype in FLOATS {
            for (n, e, k) in [
                (1, 8, 2),
                (255, 8, 2),
                (256, 8, 1),
                (257, 8, 2),
                (3001, 8, 2),
                (700, 64, 4),
            ] {
                let lv = vals(n * e, 1 + n as u64);
                let r1 = vals(n * e, 2);
                let r2 = vals(n * k, 3);
                let run = |dev: Device| {
                    let logits = t(&lv, &[n, e], dtype, dev).to_var().unwrap();
                    let (p, ids, w) = logits.moe_route_topk(k).unwrap();
                    let loss = p
                        .mul(&t(&r1, &[n, e], dtype, dev))
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .add(
                            &w.mul(&t(&r2, &[n, k], dtype, dev))
                                .unwrap()
                                .sum_all()
                                .unwrap(),
                        )
                        .unwrap();
                    loss.backward().unwrap();
                    (
                        f64s(&p),
                        ids.to_vec_u32().unwrap(),
                        f64s(&w),
                        f64s(&logits.grad().unwrap()),
                    )
                };
                let (cpu, gpu_) = (run(Device::Cpu), run(g));
                let what = format!("route_topk [{dtype}] n={n} e={e} k={k}");
                check(
                    &mut fails,
                    &format!("{what} probs"),
                    &cpu.0,
                    &gpu_.0,
                    tol(dtype),
                );
                if cpu.1 != gpu_.1 {
                    fails.push(format!("{what}: ids differ"));
                }
                check(
                    &mut fails,
                    &format!("{what} weights"),
                    &cpu.2,
                    &gpu_.2,
                    tol(dtype),
                );
                check(
                    &mut fails,
                    &format!("{what} dlogits"),
                    &cpu.3,
                    &gpu_.3,
                    tol(dtype),
                );
            }
        }
        done(fails);
    }
}
