//! Softmax (`engine/src/ops/softmax.rs`, `backend/{cpu,cuda}/softmax.rs`,
//! `kernels/src/softmax.cu`): `softmax_last_dim`, `log_softmax_last_dim`, the fused causal,
//! key-masked attention softmax (`Tensor::causal_masked_softmax`, the backend's `causal_softmax`)
//! and the backend's `softmax_backward`.
//!
//! Gradients by central finite differences in f64 (relative error 1e-6), plain, masked and on
//! transposed scores; values against the definition (softmax within 1e-14, log-softmax 1e-12,
//! large logits finite); the masked softmax against the composite it replaces (scaled scores +
//! an additive −1e9 mask bias + softmax) in f64 (1e-13) and f32 (1e-6), for t < s with a query
//! offset, t == s, key masks with right and left padding, packed rows (segment ids 1, 2, ..:
//! block-diagonal), grouped-query heads, strided inputs and rows large enough for the parallel
//! path, exactly zero at masked keys and on rows with no
//! visible key, bf16 against f32 within 1e-2, NaN at unused scores changing nothing;
//! `softmax_backward` against `scale · y ⊙ (g − Σ g ⊙ y)` (f64 1e-13, f32 1e-5); shape and dtype
//! errors.
//!
//! Parity (module `gpu`): softmax and log-softmax (transposed) rows of 7 to 4099; `causal_softmax`
//! and `softmax_backward` over row lengths that cover both kernel forms. One warp per row, held
//! as 16-byte chunks of V = 8 bf16, 4 f32 or 2 f64, 32·C per row (C = 1, 2, 4, 8), when V divides
//! s and s ≤ 256·V: s = 64, 256, 512 for every dtype, 1000 for bf16 and f32, 2048 for bf16; the
//! causal limits of the square cases end inside chunks, square cases also run on packed rows
//! (random segments of 1 to 97 keys, so segment edges fall inside chunks), and rows are not a multiple of the 8
//! warps of a block. One block per row otherwise: s = 1, 7, 255, 257 (no V divides them), 1000
//! for f64, 2048 for f32 and f64, 2056 for every dtype (past the warp's registers); these cover
//! rows narrower than a block, exactly one 256-thread block, one more, and rows that loop over
//! the block. Views that start 1 element into their buffer (not 16-byte aligned: one block per
//! row) or 8 (aligned: one warp per row) check the alignment test; transposed inputs are copied
//! first (aligned). The CPU is the reference: relative error within f32 1e-5, bf16 1e-2, f64
//! 1e-10; NaN never passes.

use crate::causal::{cases, packed_cases, visible_rows, Case};
use crate::util::vals;
use engine::backend::cpu::CpuStorage;
use engine::backend::BackendStorage;
use engine::{DType, Device, Error, Layout, Tensor};
use testutil::{check_gradients, ids, randn, rel_err};

const CPU: Device = Device::Cpu;

// ----- gradient checks ----------------------------------------------------------------------

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
fn grad_masked_softmax() {
    // The first 8 cases, and packed rows (segment ids in the key mask: block-diagonal).
    let packed = packed_cases().into_iter().take(2);
    for (n, c) in cases().into_iter().take(8).chain(packed).enumerate() {
        let (b, h, t, s) = (c.b, c.h, c.t, c.s);
        let mask = c.mask_tensor();
        let x = randn(&[b, h, t, s], 400 + n as u64);
        check_gradients(&format!("causal_masked_softmax {c:?}"), &[x], |x| {
            x[0].causal_masked_softmax(c.scale(), c.q_offset, mask.as_ref())
        });
    }
    // Transposed scores.
    let mask = ids(&[0, 1, 1, 1, 1, 1, 0, 0], &[2, 4]);
    check_gradients(
        "causal_masked_softmax transposed",
        &[randn(&[2, 2, 4, 3], 420)],
        |x| {
            x[0].transpose(2, 3)?
                .causal_masked_softmax(0.7, 0, Some(&mask))
        },
    );
    // The plain softmax's fused backward, on a transposed input.
    check_gradients("softmax_last_dim transposed", &[randn(&[5, 4], 421)], |x| {
        x[0].t()?.softmax_last_dim()
    });
}

// ----- values -------------------------------------------------------------------------------

#[test]
fn softmax_values() {
    let x = randn(&[3, 4, 5], 7);
    let v = x.to_vec_f64().unwrap();
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

/// The fused softmax equals `softmax(scale·x + bias)` on rows with a visible key, is exactly zero
/// at masked keys and on rows with none, for contiguous and transposed scores.
#[test]
fn masked_softmax_matches_composite() {
    for (n, c) in cases().into_iter().enumerate() {
        let (b, h, t, s) = (c.b, c.h, c.t, c.s);
        let mask = c.mask_tensor();
        for (dtype, tol) in [(DType::F64, 1e-13), (DType::F32, 1e-6)] {
            let x = randn(&[b, h, t, s], 200 + n as u64)
                .mul_scalar(3.0)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            // The same scores through a transposed view: [b, h, s, t] seen as [b, h, t, s].
            let xt = x
                .transpose(2, 3)
                .unwrap()
                .contiguous()
                .unwrap()
                .transpose(2, 3)
                .unwrap();
            assert!(!xt.is_contiguous() || t == 1 || s == 1);
            let want = x
                .mul_scalar(c.scale())
                .unwrap()
                .add(&c.bias(dtype))
                .unwrap()
                .softmax_last_dim()
                .unwrap();
            for (name, input) in [("contiguous", &x), ("transposed", &xt)] {
                let got = input
                    .causal_masked_softmax(c.scale(), c.q_offset, mask.as_ref())
                    .unwrap();
                assert_eq!(got.dims(), &[b, h, t, s]);
                assert_eq!(got.dtype(), dtype);
                let gv = vals(&got);
                // Exactly zero at every masked key.
                for (p, &v) in gv.iter().enumerate() {
                    let (bi, i, j) = (p / (h * t * s), (p / s) % t, p % s);
                    if !c.visible(bi, i, j) {
                        assert_eq!(v, 0.0, "{c:?} {dtype} {name}: masked key at {p} is {v}");
                    }
                }
                let (g, w) = visible_rows(&c, h, s, &gv, &vals(&want));
                let err = rel_err(&g, &w);
                assert!(err < tol, "{c:?} {dtype} {name}: rel err {err:e}");
                // Visible rows sum to one.
                for (row, r) in gv.chunks(s).enumerate() {
                    let sum: f64 = r.iter().sum();
                    let sees = c.row_sees(row / (h * t), row % t);
                    if sees {
                        assert!(
                            (sum - 1.0).abs() < 1e-5,
                            "{c:?} {dtype}: row {row} sums {sum}"
                        );
                    }
                }
            }
        }
    }
}

/// bf16 scores give the f32 result within bf16 rounding.
#[test]
fn masked_softmax_bf16_against_f32() {
    let c = Case::new(2, 3, 33, 40, 7).left_pad(|bi| 9 * bi);
    let x = randn(&[2, 3, 33, 40], 230).mul_scalar(2.0).unwrap();
    let xb = x.to_dtype(DType::BF16).unwrap();
    let mask = c.mask_tensor();
    let want = xb
        .to_dtype(DType::F32)
        .unwrap()
        .causal_masked_softmax(0.25, 7, mask.as_ref())
        .unwrap();
    let got = xb.causal_masked_softmax(0.25, 7, mask.as_ref()).unwrap();
    assert_eq!(got.dtype(), DType::BF16);
    let err = rel_err(&vals(&got), &vals(&want));
    assert!(err < 1e-2, "bf16 rel err {err:e}");
}

/// Scores at masked keys and past the causal limit are never used: NaN there changes nothing.
#[test]
fn masked_scores_are_never_used() {
    let c = Case::new(2, 2, 4, 6, 1).left_pad(|bi| bi * 2);
    let (b, h, t, s) = (c.b, c.h, c.t, c.s);
    let x = randn(&[b, h, t, s], 800);
    let mut v = vals(&x);
    for (p, x) in v.iter_mut().enumerate() {
        if !c.visible(p / (h * t * s), (p / s) % t, p % s) {
            *x = f64::NAN;
        }
    }
    let xn = Tensor::from_f64(&v, [b, h, t, s], DType::F64, CPU).unwrap();
    let mask = c.mask_tensor();
    for dtype in [DType::F64, DType::F32, DType::BF16] {
        let f = |x: &Tensor| {
            vals(
                &x.to_dtype(dtype)
                    .unwrap()
                    .causal_masked_softmax(0.5, c.q_offset, mask.as_ref())
                    .unwrap(),
            )
        };
        assert_eq!(f(&xn), f(&x), "{dtype}");
    }
}

/// The backend's `softmax_backward` against `scale · y ⊙ (g − Σ g ⊙ y)` by hand, with a
/// transposed `g`, in f64 and f32.
#[test]
fn softmax_backward_matches_formula() {
    let (rows, n, scale) = (37, 45, 0.3);
    let y = randn(&[rows, n], 600).softmax_last_dim().unwrap();
    let g = randn(&[n, rows], 601); // seen transposed
    let (yv, gt) = (vals(&y), vals(&g.t().unwrap()));
    let want: Vec<f64> = yv
        .chunks(n)
        .zip(gt.chunks(n))
        .flat_map(|(yr, gr)| {
            let dot: f64 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
            yr.iter()
                .zip(gr)
                .map(move |(a, b)| scale * a * (b - dot))
                .collect::<Vec<_>>()
        })
        .collect();
    for (dtype, tol) in [(DType::F64, 1e-13), (DType::F32, 1e-5)] {
        let ys = CpuStorage::F64(yv.clone()).to_dtype(&Layout::contiguous([rows, n]), dtype);
        let gs = CpuStorage::F64(vals(&g)).to_dtype(&Layout::contiguous([n, rows]), dtype);
        let (ys, gs) = (ys.unwrap(), gs.unwrap());
        let gl = Layout::contiguous([n, rows]).transpose(0, 1);
        let dx = ys
            .softmax_backward(&Layout::contiguous([rows, n]), &gs, &gl, scale)
            .unwrap();
        let got = dx.to_f64_vec(&Layout::contiguous([rows, n])).unwrap();
        let err = rel_err(&got, &want);
        assert!(err < tol, "{dtype}: rel err {err:e}");
    }
}

// ----- errors -------------------------------------------------------------------------------

#[test]
fn masked_softmax_errors() {
    let x = randn(&[2, 2, 3, 4], 700);
    // Not rank 4.
    assert!(matches!(
        randn(&[6, 4], 701).causal_masked_softmax(1.0, 0, None),
        Err(Error::RankMismatch { .. })
    ));
    // A mask of the wrong shape.
    let bad = ids(&[1; 6], &[2, 3]);
    assert!(matches!(
        x.causal_masked_softmax(1.0, 0, Some(&bad)),
        Err(Error::ShapeMismatch { .. })
    ));
    // A float mask; u32 scores.
    let fmask = Tensor::ones([2, 4], DType::F64, CPU).unwrap();
    assert!(matches!(
        x.causal_masked_softmax(1.0, 0, Some(&fmask)),
        Err(Error::UnsupportedDType { .. })
    ));
    let u = ids(&[1; 48], &[2, 2, 3, 4]);
    assert!(matches!(
        u.causal_masked_softmax(1.0, 0, None),
        Err(Error::UnsupportedDType { .. })
    ));
    // Backward operands of different shapes or dtypes.
    let y = CpuStorage::F64(vec![0.5; 12]);
    let g32 = CpuStorage::F32(vec![0.5; 12]);
    let l = Layout::contiguous([3, 4]);
    assert!(matches!(
        y.softmax_backward(&l, &y, &Layout::contiguous([4, 3]), 1.0),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        y.softmax_backward(&l, &g32, &l, 1.0),
        Err(Error::DTypeMismatch { .. })
    ));
}

#[cfg(feature = "cuda")]
mod gpu {
    //! CPU ↔ CUDA parity (skipped, saying why, without a GPU).
    use crate::causal::Mask;
    use engine::backend::BackendStorage;
    use engine::{Device, Layout, Storage};
    use testutil::gpu::{input, read, scaled_vals, transposed, vals, Checker, FLOATS};

    #[test]
    fn softmax_and_log_softmax() {
        let Some(mut c) = Checker::new() else { return };
        for dt in FLOATS {
            for &(rows, len) in &[(3usize, 7usize), (64, 256), (5, 1000), (2, 4099)] {
                let data: Vec<f64> = vals(rows * len, 22).into_iter().map(|x| 3.0 * x).collect();
                c.case(&format!("softmax [{rows},{len}]"), dt, |dev| {
                    let s = input(dev, &data, dt);
                    Ok(read(
                        &s.softmax_last_dim(&Layout::contiguous([rows, len]))?,
                        [rows, len],
                    ))
                });
                c.case(&format!("log_softmax [{rows},{len}]^T"), dt, |dev| {
                    let s = input(dev, &data, dt);
                    Ok(read(
                        &s.log_softmax_last_dim(&transposed(len, rows))?,
                        [rows, len],
                    ))
                });
            }
        }
        c.finish();
    }

    /// Row lengths of the softmax cases (see the header).
    const ROW_LENGTHS: [usize; 10] = [1, 7, 64, 255, 256, 257, 512, 1000, 2048, 2056];

    fn mask_storage(dev: Device, m: &Option<Vec<u32>>) -> engine::Result<Option<Storage>> {
        m.as_ref()
            .map(|m| Storage::from_cpu(dev, engine::backend::cpu::CpuStorage::U32(m.clone())))
            .transpose()
    }

    /// `(b, h, t, s, q_offset, mask)` of the softmax cases: for each row length, a decoding-like
    /// case (few queries at the end of the keys), square ones where it stays small, and queries
    /// from a third of the keys on, under left padding (so also with rows that see no key).
    fn softmax_cases() -> Vec<(usize, usize, usize, usize, usize, Mask)> {
        let mut v = Vec::new();
        for s in ROW_LENGTHS {
            let t = s.min(3);
            v.push((2, 3, t, s, s - t, Mask::Random));
            let (b, h) = if s >= 1000 { (1, 2) } else { (2, 3) };
            v.push((b, h, s, s, 0, Mask::None));
            v.push((b + 1, h, s, s, 0, Mask::Left));
            v.push((b + 1, h, s.div_ceil(2), s, s / 3, Mask::Left));
            if s > 3 {
                // Packed rows end in 3 padding keys: shorter ones would be padding only.
                v.push((b, h, s, s, 0, Mask::Packed));
            }
        }
        v
    }

    /// `layout` moved `skip` elements into a buffer that has `skip` more elements in front.
    fn skipped(layout: Layout, skip: usize) -> Layout {
        Layout::new(
            layout.shape().clone(),
            layout.strides().to_vec(),
            layout.offset() + skip,
        )
    }

    #[test]
    fn causal_softmax_matches_cpu() {
        let Some(mut c) = Checker::new() else { return };
        for dt in FLOATS {
            for (b, h, t, s, off, mk) in softmax_cases() {
                let m = mk.values(b, s);
                let n = b * h * t * s;
                let scale = 0.125;
                c.case(
                    &format!("causal_softmax [{b},{h},{t},{s}] off {off} {mk:?}"),
                    dt,
                    |dev| {
                        let x = Storage::upload_f64(dev, &scaled_vals(n, 1, 4.0), dt)?;
                        let ms = mask_storage(dev, &m)?;
                        let ml = Layout::contiguous([b, s]);
                        let y = x.causal_softmax(
                            &Layout::contiguous([b, h, t, s]),
                            scale,
                            off,
                            ms.as_ref().map(|m| (m, &ml)),
                        )?;
                        Ok(read(&y, [b, h, t, s]))
                    },
                );
            }
            // Transposed scores ([b, h, s, t] seen as [b, h, t, s]), NaN at every key that is
            // masked or past the causal limit (never used, so it cannot spread), offset beyond
            // s; s = 320 runs one warp per row for every dtype, 300 for f32 and f64.
            for (s, off) in [(300, 260), (300, 400), (320, 270)] {
                let (b, h, t) = (2, 3, 40);
                let m = Mask::Left.values(b, s);
                c.case(
                    &format!("causal_softmax transposed, NaN at masked keys, s {s} off {off}"),
                    dt,
                    |dev| {
                        let mut v = scaled_vals(b * h * s * t, 2, 3.0); // [b, h, s, t]
                        let mv = m.as_ref().expect("a mask");
                        for (p, x) in v.iter_mut().enumerate() {
                            let (bi, j, i) = (p / (h * s * t), (p / t) % s, p % t);
                            if j > off + i || mv[bi * s + j] == 0 {
                                *x = f64::NAN;
                            }
                        }
                        let x = Storage::upload_f64(dev, &v, dt)?;
                        let xl = Layout::contiguous([b, h, s, t]).transpose(2, 3);
                        let ms = mask_storage(dev, &m)?;
                        let ml = Layout::contiguous([b, s]);
                        let y = x.causal_softmax(&xl, 0.3, off, ms.as_ref().map(|m| (m, &ml)))?;
                        Ok(read(&y, [b, h, t, s]))
                    },
                );
            }
            // Scores or mask 1 element into their buffer (not 16-byte aligned: one block per
            // row), or 8 and 4 (aligned: one warp per row).
            for (x_skip, m_skip) in [(1, 0), (0, 1), (8, 4)] {
                let (b, h, t, s, off) = (2, 3, 37, 512, 100);
                let m = Mask::Random
                    .values(b, s)
                    .map(|m| [vec![1; m_skip], m].concat());
                c.case(
                    &format!("causal_softmax, x {x_skip} and mask {m_skip} elements in"),
                    dt,
                    |dev| {
                        let x = Storage::upload_f64(
                            dev,
                            &scaled_vals(x_skip + b * h * t * s, 9, 4.0),
                            dt,
                        )?;
                        let xl = skipped(Layout::contiguous([b, h, t, s]), x_skip);
                        let ms = mask_storage(dev, &m)?;
                        let ml = skipped(Layout::contiguous([b, s]), m_skip);
                        let y = x.causal_softmax(&xl, 0.125, off, ms.as_ref().map(|m| (m, &ml)))?;
                        Ok(read(&y, [b, h, t, s]))
                    },
                );
            }
        }
        c.finish();
    }

    #[test]
    fn softmax_backward_matches_cpu() {
        let Some(mut c) = Checker::new() else { return };
        for dt in FLOATS {
            for s in ROW_LENGTHS {
                let rows = if s >= 1000 { 300 } else { 1001 };
                for scale in [1.0, 0.125] {
                    c.case(
                        &format!("softmax_backward [{rows},{s}] scale {scale}"),
                        dt,
                        |dev| {
                            let l = Layout::contiguous([rows, s]);
                            // y: positive, like probabilities; g: any sign.
                            let yv: Vec<f64> = scaled_vals(rows * s, 3, 1.0 / s as f64)
                                .into_iter()
                                .map(f64::abs)
                                .collect();
                            let y = Storage::upload_f64(dev, &yv, dt)?;
                            let g = Storage::upload_f64(dev, &scaled_vals(rows * s, 4, 1.0), dt)?;
                            let dx = y.softmax_backward(&l, &g, &l, scale)?;
                            Ok(read(&dx, [rows, s]))
                        },
                    );
                }
            }
            // A transposed output gradient (copied first, so s = 256 runs one warp per row).
            for s in [257, 256] {
                let rows = 300;
                c.case(
                    &format!("softmax_backward, g transposed, s {s}"),
                    dt,
                    |dev| {
                        let l = Layout::contiguous([rows, s]);
                        let y = Storage::upload_f64(dev, &scaled_vals(rows * s, 5, 0.01), dt)?;
                        let g = Storage::upload_f64(dev, &scaled_vals(rows * s, 6, 1.0), dt)?;
                        let gl = Layout::contiguous([s, rows]).transpose(0, 1);
                        let dx = y.softmax_backward(&l, &g, &gl, 0.5)?;
                        Ok(read(&dx, [rows, s]))
                    },
                );
            }
            // Views 1 element into their buffer (not 16-byte aligned: one block per row) and 8
            // (aligned: one warp per row).
            for (y_skip, g_skip) in [(1, 0), (0, 1), (8, 8)] {
                let (rows, s) = (99, 512);
                c.case(
                    &format!("softmax_backward, y {y_skip} and g {g_skip} elements in"),
                    dt,
                    |dev| {
                        let l = Layout::contiguous([rows, s]);
                        let y =
                            Storage::upload_f64(dev, &scaled_vals(y_skip + rows * s, 7, 0.01), dt)?;
                        let g =
                            Storage::upload_f64(dev, &scaled_vals(g_skip + rows * s, 8, 1.0), dt)?;
                        let (yl, gl) = (skipped(l.clone(), y_skip), skipped(l, g_skip));
                        let dx = y.softmax_backward(&yl, &g, &gl, 0.5)?;
                        Ok(read(&dx, [rows, s]))
                    },
                );
            }
        }
        c.finish();
    }
}
