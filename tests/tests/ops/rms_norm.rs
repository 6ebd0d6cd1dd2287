//! RMSNorm (`Tensor::rms_norm`; `engine/src/ops/rms_norm.rs`, `backend/{cpu,cuda}/rms_norm.rs`,
//! `kernels/src/rms_norm.cu`): forward and the fused backward (dx, and dw when asked).
//!
//! Gradients of x and w by central finite differences in f64 (relative error 1e-6), on rank 2
//! and 3, a transposed input, a large eps; values against a naive loop (f64 1e-12, f32 1e-6),
//! on shapes large enough for the parallel path; the fused backward against the composite of
//! primitive ops (f64 1e-10, f32 1e-4); bf16 against f32 (forward 1e-2, backward 3e-2); typed
//! errors of shapes and dtypes, from the op and from the CPU kernel called directly.
//!
//! Parity (module `gpu`): forward, dx and dw on widths of vector loads (256, 1000, 4096), rows
//! longer than a thread's registers (8200), scalar loads (33), and x one element into its buffer
//! (not 16-byte aligned). The CPU is the reference: relative error within f32 1e-5, bf16 1e-2,
//! f64 1e-10; NaN never passes.

use crate::util::{is_shape_err, vals};
use engine::backend::cpu::CpuStorage;
use engine::backend::BackendStorage;
use engine::{DType, Device, Error, Layout, Tensor};
use testutil::{check_gradients, ids, randn, rel_err};

const CPU: Device = Device::Cpu;

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
fn rms_norm_bf16_close_to_f32() {
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

#[test]
fn rms_norm_errors() {
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
}

/// The CPU kernels check their operands themselves (a backend may be called directly).
#[test]
fn rms_norm_kernel_errors() {
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
}

#[cfg(feature = "cuda")]
mod gpu {
    //! CPU ↔ CUDA parity (skipped, saying why, without a GPU).
    use engine::backend::BackendStorage;
    use engine::{Layout, Shape};
    use testutil::gpu::{input, read, vals, Checker, FLOATS};

    #[test]
    fn rms_norm_forward_and_backward() {
        let Some(mut c) = Checker::new() else { return };
        for dt in FLOATS {
            // Widths: vector loads (256, 1000, 4096: the model's, whose rows a thread's registers
            // hold between the passes), rows longer than those registers (8200), scalar loads (33),
            // and x starting one element into its buffer (offset 1: not 16-byte aligned).
            for &(rows, n, off) in &[
                (4usize, 256usize, 0usize),
                (7, 1000, 0),
                (3, 33, 0),
                (5, 4096, 0),
                (2, 8200, 0),
                (3, 256, 1),
            ] {
                let (x, w, g) = (
                    vals(off + rows * n, 40),
                    vals(n, 41),
                    vals(off + rows * n, 42),
                );
                let l = Layout::new(Shape::from([rows, n]), vec![n, 1], off);
                c.case(&format!("rms_norm [{rows},{n}] offset {off}"), dt, |dev| {
                    let (xs, ws) = (input(dev, &x, dt), input(dev, &w, dt));
                    Ok(read(
                        &xs.rms_norm(&l, &ws, &Layout::contiguous([n]), 1e-5)?,
                        [rows, n],
                    ))
                });
                for part in 0..2 {
                    c.case(
                        &format!(
                            "rms_norm_backward [{rows},{n}] offset {off} {}",
                            ["dx", "dw"][part]
                        ),
                        dt,
                        |dev| {
                            let (xs, ws, gs) =
                                (input(dev, &x, dt), input(dev, &w, dt), input(dev, &g, dt));
                            let (dx, dw) = xs.rms_norm_backward(
                                &l,
                                &ws,
                                &Layout::contiguous([n]),
                                &gs,
                                &l,
                                1e-5,
                                part == 1,
                            )?;
                            Ok(match dw {
                                None => read(&dx, [rows, n]),
                                Some(dw) => read(&dw, [n]),
                            })
                        },
                    );
                }
            }
        }
        c.finish();
    }
}
