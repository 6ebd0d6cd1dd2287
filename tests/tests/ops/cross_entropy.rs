//! Cross-entropy (`Tensor::cross_entropy`, `cross_entropy_rows`; `engine/src/ops/cross_entropy.rs`,
//! `backend/{cpu,cuda}/cross_entropy.rs`, `kernels/src/cross_entropy.cu`).
//!
//! Gradients by central finite differences in f64 (relative error 1e-6), with ignored rows, per
//! row, on transposed and rank-3 logits, a custom ignore index, every row ignored; values
//! against the log-sum-exp definition (rows 1e-12, mean 1e-10; f32 within 1e-4; all rows
//! ignored exactly 0); the backward against (softmax − one-hot) / count (1e-12); bf16 against
//! f32 within 1e-2 (loss in f32, gradient in bf16); typed errors of out-of-range targets, target
//! dtypes and shapes.
//!
//! Parity (module `gpu`): forward and backward with ignored rows, logits as stored and
//! transposed, vocabularies of 33, 1000 and 4099; the row kernels on long rows (a vocabulary of
//! 49,152), strided and masked (`−∞`) logits (module `gpu::long_rows`). The CPU is the reference:
//! relative error within f32 1e-5, bf16 1e-2, f64 1e-10; NaN never passes. The chunked linear
//! cross-entropy's tests are in tests/tests/fused/linear_cross_entropy.rs.

use engine::{DType, Device, Error, Tensor, IGNORE_INDEX};
use testutil::{assert_close, bf16_matches, check_gradients, f32_and_bf16, ids, rand_ids, randn};

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
}

#[test]
fn grad_cross_entropy() {
    let t = ids(&[2, IGNORE_INDEX, 5, 0], &[4]);
    check_gradients(
        "cross_entropy_with_ignored",
        &[randn(&[4, 6], 80), t.clone()],
        |x| x[0].cross_entropy(&x[1], IGNORE_INDEX),
    );
    check_gradients(
        "cross_entropy_rows",
        &[randn(&[4, 6], 81), t.clone()],
        |x| x[0].cross_entropy_rows(&x[1], IGNORE_INDEX),
    );
    check_gradients(
        "cross_entropy_transposed",
        &[randn(&[6, 4], 82), t.clone()],
        |x| x[0].t()?.cross_entropy(&x[1], IGNORE_INDEX),
    );
    check_gradients(
        "cross_entropy_rank3_custom_ignore",
        &[randn(&[2, 3, 5], 83), ids(&[1, 4, 1, 0, 3, 2], &[2, 3])],
        |x| x[0].cross_entropy(&x[1], 1),
    );
    // Every row ignored: the loss is 0 and so is its gradient.
    check_gradients(
        "cross_entropy_all_ignored",
        &[randn(&[2, 3], 84), ids(&[IGNORE_INDEX, IGNORE_INDEX], &[2])],
        |x| x[0].cross_entropy(&x[1], IGNORE_INDEX),
    );
}

#[test]
fn cross_entropy_values() {
    let (n, v) = (64, 512);
    let logits = randn(&[n, v], 150).affine(3.0, 0.0).unwrap();
    let mut tv = rand_ids(n, v, 151);
    for r in (0..n).step_by(5) {
        tv[r] = IGNORE_INDEX;
    }
    let t = ids(&tv, &[n]);
    let lv = f64s(&logits);
    let mut rows = vec![0.0; n];
    for r in 0..n {
        if tv[r] == IGNORE_INDEX {
            continue;
        }
        let row = &lv[r * v..(r + 1) * v];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        rows[r] = lse - row[tv[r] as usize];
    }
    let count = tv.iter().filter(|&&t| t != IGNORE_INDEX).count() as f64;
    let mean = rows.iter().sum::<f64>() / count;

    let got_rows = logits.cross_entropy_rows(&t, IGNORE_INDEX).unwrap();
    assert_eq!(got_rows.dtype(), DType::F64);
    assert_close("cross_entropy_rows", &f64s(&got_rows), &rows, 1e-12);
    let loss = logits.cross_entropy(&t, IGNORE_INDEX).unwrap();
    assert_eq!(loss.rank(), 0);
    assert!((loss.to_scalar().unwrap() - mean).abs() < 1e-10);

    // f32 logits give an f32 loss close to the f64 reference.
    let l32 = logits.to_dtype(DType::F32).unwrap();
    let loss32 = l32.cross_entropy(&t, IGNORE_INDEX).unwrap();
    assert_eq!(loss32.dtype(), DType::F32);
    assert!((loss32.to_scalar().unwrap() - mean).abs() < 1e-4 * mean.abs());

    // All rows ignored: exactly 0, not NaN.
    let all = ids(&[IGNORE_INDEX; 3], &[3]);
    let z = randn(&[3, 4], 152)
        .cross_entropy(&all, IGNORE_INDEX)
        .unwrap();
    assert_eq!(z.to_scalar().unwrap(), 0.0);
}

#[test]
fn cross_entropy_backward_is_softmax_minus_onehot_over_count() {
    let (n, v) = (5, 7);
    let x = randn(&[n, v], 160).to_var().unwrap();
    let tv = [3, IGNORE_INDEX, 0, 6, 6];
    x.cross_entropy(&ids(&tv, &[n]), IGNORE_INDEX)
        .unwrap()
        .backward()
        .unwrap();
    let gx = f64s(&x.grad().unwrap());
    let xv = f64s(&x);
    let mut want = vec![0.0; n * v];
    for r in 0..n {
        if tv[r] == IGNORE_INDEX {
            continue;
        }
        let row = &xv[r * v..(r + 1) * v];
        let s: f64 = row.iter().map(|a| a.exp()).sum();
        for j in 0..v {
            let onehot = if j == tv[r] as usize { 1.0 } else { 0.0 };
            want[r * v + j] = (row[j].exp() / s - onehot) / 4.0;
        }
    }
    assert_close("cross_entropy_grad", &gx, &want, 1e-12);
}

#[test]
fn cross_entropy_bf16_matches_f32() {
    let (x, xb) = f32_and_bf16(&[40, 64], 170);
    let mut tv = rand_ids(40, 64, 176);
    tv[3] = IGNORE_INDEX;
    let t = ids(&tv, &[40]);
    let lb = xb.cross_entropy(&t, IGNORE_INDEX).unwrap();
    assert_eq!(lb.dtype(), DType::F32);
    bf16_matches(
        "cross_entropy",
        &lb,
        &x.cross_entropy(&t, IGNORE_INDEX).unwrap(),
    );

    // The logits gradient comes back in bf16.
    let (xv, xbv) = (x.to_var().unwrap(), xb.to_var().unwrap());
    xv.cross_entropy(&t, IGNORE_INDEX)
        .unwrap()
        .backward()
        .unwrap();
    xbv.cross_entropy(&t, IGNORE_INDEX)
        .unwrap()
        .backward()
        .unwrap();
    let (gf, gb) = (xv.grad().unwrap(), xbv.grad().unwrap());
    assert_eq!(gb.dtype(), DType::BF16);
    bf16_matches("cross_entropy_grad", &gb, &gf);
}

#[test]
fn cross_entropy_out_of_range_ids_are_errors() {
    let x = randn(&[5, 3], 180);
    let e = x
        .cross_entropy(&ids(&[0, 1, 2, 3, 4], &[5]), IGNORE_INDEX)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::IndexOutOfRange {
                index: 3,
                size: 3,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn cross_entropy_wrong_id_dtypes_are_errors() {
    let x = randn(&[5, 3], 190);
    let fids = Tensor::from_slice(&[0.0f32, 1.0], [2], Device::Cpu).unwrap();
    let e = x
        .narrow(0, 0, 2)
        .unwrap()
        .cross_entropy(&fids, IGNORE_INDEX)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::UnsupportedDType {
                dtype: DType::F32,
                ..
            }
        ),
        "{e}"
    );
    // Float-only ops reject u32 data.
    let u = ids(&[1, 2, 3, 4], &[2, 2]);
    let e = u
        .cross_entropy(&ids(&[0, 1], &[2]), IGNORE_INDEX)
        .unwrap_err();
    assert!(matches!(e, Error::UnsupportedDType { .. }), "{e}");
}

#[test]
fn cross_entropy_shape_mismatches_are_errors() {
    let x = randn(&[5, 3], 200);
    // cross_entropy targets must be the logits' shape without the last dim.
    let e = x
        .cross_entropy(&ids(&[0, 1], &[2]), IGNORE_INDEX)
        .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
}

#[cfg(feature = "cuda")]
mod gpu {
    //! CPU ↔ CUDA parity (skipped, saying why, without a GPU).
    use engine::backend::BackendStorage;
    use engine::{DType, Layout};
    use testutil::gpu::{input, read, transposed, vals, Checker, FLOATS};

    #[test]
    fn cross_entropy_matches_cpu() {
        let Some(mut c) = Checker::new() else { return };
        for dt in FLOATS {
            // cross-entropy with ignored rows, logits as stored and transposed.
            for &(n, v) in &[(6usize, 1000usize), (5, 33), (3, 4099)] {
                let x: Vec<f64> = vals(n * v, 46).into_iter().map(|a| 4.0 * a).collect();
                let tg: Vec<f64> = (0..n)
                    .map(|r| {
                        if r % 3 == 1 {
                            u32::MAX as f64
                        } else {
                            ((r * 7919) % v) as f64
                        }
                    })
                    .collect();
                let gr = vals(n, 47);
                let acc = if dt == DType::F64 {
                    DType::F64
                } else {
                    DType::F32
                };
                for tr in [false, true] {
                    let xl = if tr {
                        transposed(v, n)
                    } else {
                        Layout::contiguous([n, v])
                    };
                    c.case(
                        &format!("cross_entropy [{n},{v}] transposed {tr}"),
                        acc,
                        |dev| {
                            let (xs, ts) = (input(dev, &x, dt), input(dev, &tg, DType::U32));
                            Ok(read(
                                &xs.cross_entropy(&xl, &ts, &Layout::contiguous([n]), u32::MAX)?,
                                [n],
                            ))
                        },
                    );
                    c.case(
                        &format!("cross_entropy_backward [{n},{v}] transposed {tr}"),
                        dt,
                        |dev| {
                            let (xs, ts, gs) = (
                                input(dev, &x, dt),
                                input(dev, &tg, DType::U32),
                                input(dev, &gr, acc),
                            );
                            let one = Layout::contiguous([n]);
                            Ok(read(
                                &xs.cross_entropy_backward(&xl, &ts, &one, &gs, &one, u32::MAX)?,
                                [n, v],
                            ))
                        },
                    );
                }
            }
        }
        c.finish();
    }

    /// The full-row kernels on long rows (SmolLM2's vocabulary), strided logits, masked (`−∞`)
    /// logits and ignored targets.
    mod long_rows {
        use engine::backend::BackendStorage;
        use engine::{DType, Device, Layout, Storage, IGNORE_INDEX};
        use testutil::gpu::{device as gpu, scaled_vals, targets_with_ignored, StrictChecker};

        const FLOATS: [DType; 3] = [DType::F32, DType::BF16, DType::F64];
        /// The full-row kernels (`cross_entropy`, `cross_entropy_backward`, single-pass online
        /// statistics on the GPU) on rows of SmolLM2's vocabulary and on strided logits, some of
        /// them `−∞` (masked logits, never at the target).
        fn row_case(
            dev: Device,
            dt: DType,
            (n, v): (usize, usize),
            transposed: bool,
            backward: bool,
        ) -> engine::Result<Vec<f64>> {
            let t = targets_with_ignored(n, v, 12);
            let mut x = scaled_vals(n * v, 11, 4.0);
            for (i, xi) in x.iter_mut().enumerate() {
                let (r, j) = (i / v, i % v);
                if i % 7 == 3 && t[r] as usize != j {
                    *xi = f64::NEG_INFINITY;
                }
            }
            let l = if transposed {
                // The same logits stored column-major.
                let mut xt = vec![0.0; n * v];
                for r in 0..n {
                    for j in 0..v {
                        xt[j * n + r] = x[r * v + j];
                    }
                }
                x = xt;
                Layout::contiguous([v, n]).transpose(0, 1)
            } else {
                Layout::contiguous([n, v])
            };
            let xs = Storage::upload_f64(dev, &x, dt)?;
            let ts = Storage::from_cpu(dev, engine::backend::cpu::CpuStorage::U32(t))?;
            let tl = Layout::contiguous([n]);
            if !backward {
                return xs
                    .cross_entropy(&l, &ts, &tl, IGNORE_INDEX)?
                    .to_f64_vec(&tl);
            }
            let g = Storage::upload_f64(dev, &scaled_vals(n, 13, 1.0), dt.accumulation())?;
            xs.cross_entropy_backward(&l, &ts, &tl, &g, &tl, IGNORE_INDEX)?
                .to_f64_vec(&Layout::contiguous([n, v]))
        }

        #[test]
        fn row_kernels_match_the_cpu_on_long_rows_with_masked_logits() {
            let Some(gpu) = gpu() else { return };
            let mut ck = StrictChecker::new(gpu);
            for dt in FLOATS {
                for (n, v, tr) in [(37, 49152, false), (5, 257, true), (300, 1000, false)] {
                    for bw in [false, true] {
                        ck.case(
                            &format!("cross_entropy n={n} v={v} transposed={tr} backward={bw}"),
                            dt,
                            |d| row_case(d, dt, (n, v), tr, bw),
                        );
                    }
                }
            }
            ck.finish();
        }
    }
}
