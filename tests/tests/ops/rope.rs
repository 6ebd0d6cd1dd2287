//! Rotary position embeddings (`Tensor::rope`, `rope_inv_freq`, `rope_tables`;
//! `engine/src/ops/rope.rs`, `backend/{cpu,cuda}/rope.rs`, `kernels/src/rope.cu`).
//!
//! Gradients by central finite differences in f64 (relative error 1e-6), on contiguous,
//! transposed (the heads of a projection) and head-dim-strided inputs, shared and per-sequence
//! positions; the gradient of a transposed input laid out as the input, equal to the plain
//! backward; values against the rotation formula (f64 1e-12, f32 1e-6) on an input large enough
//! for the parallel path; the tables against their definition (1e-15, 1e-12); bf16 against f32
//! within 1e-2; typed errors of shapes and dtypes, from the op, the table builders and the CPU
//! kernel called directly.
//!
//! Parity (module `gpu`): x viewed as the head transpose of its projection, tables shared or per
//! sequence, positions along dim 2 or dim 1; the vector paths (8, 4 or 2 pairs a thread) and the
//! one-pair path, also bit for bit against each other on the GPU (inputs or tables one element
//! into their buffers). The CPU is the reference: relative error within f32 1e-5, bf16 1e-2, f64
//! 1e-10; NaN never passes.

use crate::util::{is_shape_err, vals};
use engine::backend::cpu::CpuStorage;
use engine::backend::BackendStorage;
use engine::{rope_inv_freq, rope_tables, DType, Device, Error, Layout, Tensor};
use testutil::{check_gradients, ids, randn, rel_err};

const CPU: Device = Device::Cpu;

/// cos / sin tables for `positions` (u32 of `pshape`) and head dim `d`, in f64.
fn tables(positions: &[u32], pshape: &[usize], d: usize, theta: f64) -> (Tensor, Tensor) {
    let inv = rope_inv_freq(d, theta, DType::F64, CPU).unwrap();
    rope_tables(&ids(positions, pshape), &inv).unwrap()
}

/// `x: [b, h, t, d]` row-major, `pos[bi][ti]` (one row shared when `pos.len() == 1`).
fn naive_rope(x: &[f64], dims: [usize; 4], pos: &[Vec<u32>], theta: f64) -> Vec<f64> {
    let [b, h, t, d] = dims;
    let half = d / 2;
    let mut out = vec![0.0; x.len()];
    for bi in 0..b {
        for hi in 0..h {
            let prow = &pos[if pos.len() == 1 { 0 } else { bi }];
            for (ti, &p) in prow[..t].iter().enumerate() {
                let p = p as f64;
                let base = ((bi * h + hi) * t + ti) * d;
                for i in 0..half {
                    let ang = p * theta.powf(-2.0 * i as f64 / d as f64);
                    let (x1, x2) = (x[base + i], x[base + i + half]);
                    out[base + i] = x1 * ang.cos() - x2 * ang.sin();
                    out[base + i + half] = x2 * ang.cos() + x1 * ang.sin();
                }
            }
        }
    }
    out
}

#[test]
fn grad_rope() {
    let (c, s) = tables(&[0, 3, 7, 12], &[4], 6, 100.0);
    check_gradients("rope", &[randn(&[2, 3, 4, 6], 10)], |x| x[0].rope(&c, &s));
    // [b, t, h, d] transposed to [b, h, t, d], as after the q/k projections.
    check_gradients("rope_transposed", &[randn(&[2, 4, 3, 6], 11)], |x| {
        x[0].transpose(1, 2)?.rope(&c, &s)
    });
    // A stride on the head dim too.
    check_gradients("rope_strided_d", &[randn(&[2, 6, 4, 3], 12)], |x| {
        x[0].permute(&[0, 3, 2, 1])?.rope(&c, &s)
    });
    // Per-sequence positions (left-padded batches).
    let (cb, sb) = tables(&[0, 1, 2, 3, 5, 9, 2, 40], &[2, 4], 8, 10000.0);
    check_gradients("rope_per_batch", &[randn(&[2, 2, 4, 8], 13)], |x| {
        x[0].rope(&cb, &sb)
    });
    check_gradients(
        "rope_per_batch_transposed",
        &[randn(&[2, 4, 3, 8], 14)],
        |x| {
            x[0].transpose(1, 2)?
                .rope(&cb, &sb)?
                .mul(&x[0].transpose(1, 2)?)
        },
    );
}

/// The gradient of rope over `x` `[b, t, h, d]` viewed as `[b, h, t, d]` (the heads of a
/// projection) reaches `x` row-major, as `x` is laid out: written in that order, not transposed
/// (which would cost the projection's backward a copy), with the values of the plain backward.
#[test]
fn rope_gradient_keeps_the_input_layout() {
    let (c, s) = tables(&[0, 3, 7, 12], &[4], 6, 100.0);
    let x = randn(&[2, 4, 3, 6], 15).to_var().unwrap(); // [b, t, h, d]
    let g = randn(&[2, 3, 4, 6], 16); // [b, h, t, d]
    x.transpose(1, 2)
        .unwrap()
        .rope(&c, &s)
        .unwrap()
        .backward_with_grad(&g)
        .unwrap();
    let dx = x.grad().unwrap();
    assert!(dx.is_contiguous(), "dx strides {:?}", dx.layout().strides());
    // dx = rope(g, cos, −sin), transposed back to x's dims.
    let want = g
        .rope(&c, &s.neg().unwrap())
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    assert_eq!(vals(&dx), vals(&want));
}

#[test]
fn rope_matches_rotation_formula() {
    let theta = 500.0;
    let pos = vec![vec![0u32, 1, 2, 3, 4], vec![7, 8, 9, 10, 30]];
    let flat: Vec<u32> = pos.concat();
    let (c, s) = tables(&flat, &[2, 5], 8, theta);
    assert_eq!(c.dims(), &[2, 5, 4]);
    let x = randn(&[2, 3, 5, 8], 90);
    let want = naive_rope(&vals(&x), [2, 3, 5, 8], &pos, theta);
    assert!(rel_err(&vals(&x.rope(&c, &s).unwrap()), &want) < 1e-12);
    // f32.
    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let got = f(&x).rope(&f(&c), &f(&s)).unwrap();
    assert!(rel_err(&vals(&got), &want) < 1e-6);
    // Shared positions, a large transposed input (parallel path).
    let pos1 = vec![(0..64u32).map(|p| p * 3).collect::<Vec<_>>()];
    let (c1, s1) = tables(&pos1[0], &[64], 32, 10000.0);
    assert_eq!(c1.dims(), &[1, 64, 16]);
    let xb = randn(&[2, 64, 8, 32], 91).transpose(1, 2).unwrap(); // [2, 8, 64, 32]
    let want = naive_rope(&vals(&xb), [2, 8, 64, 32], &pos1, 10000.0);
    assert!(rel_err(&vals(&xb.rope(&c1, &s1).unwrap()), &want) < 1e-12);
}

#[test]
fn rope_tables_values() {
    let inv = rope_inv_freq(8, 10000.0, DType::F64, CPU).unwrap();
    assert_eq!(inv.dims(), &[4]);
    for (i, v) in vals(&inv).into_iter().enumerate() {
        assert!((v - 10000f64.powf(-((2 * i) as f64) / 8.0)).abs() < 1e-15);
    }
    let (c, s) = rope_tables(&ids(&[0, 5, 100], &[3]), &inv).unwrap();
    assert_eq!(c.dims(), &[1, 3, 4]);
    let (cv, sv) = (vals(&c), vals(&s));
    for (ti, p) in [0.0, 5.0, 100.0].into_iter().enumerate() {
        for i in 0..4 {
            let ang = p * 10000f64.powf(-((2 * i) as f64) / 8.0);
            assert!((cv[ti * 4 + i] - ang.cos()).abs() < 1e-12);
            assert!((sv[ti * 4 + i] - ang.sin()).abs() < 1e-12);
        }
    }
    // bf16 frequencies give bf16 tables from f32 angles.
    let inv16 = rope_inv_freq(8, 10000.0, DType::BF16, CPU).unwrap();
    let (c16, _) = rope_tables(&ids(&[0, 1, 2, 3], &[2, 2]), &inv16).unwrap();
    assert_eq!((c16.dtype(), c16.dims()), (DType::BF16, &[2, 2, 4][..]));
}

#[test]
fn rope_bf16_close_to_f32() {
    let f32_ = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
    // RoPE: transposed input, per-batch positions.
    let inv = rope_inv_freq(16, 10000.0, DType::F32, CPU).unwrap();
    let pos = ids(&(0..24u32).map(|i| i * 5).collect::<Vec<_>>(), &[2, 12]);
    let (c, s) = rope_tables(&pos, &inv).unwrap();
    let x = randn(&[2, 12, 3, 16], 142).transpose(1, 2).unwrap();
    let want = vals(&f32_(&x).rope(&c, &s).unwrap());
    let got = bf(&x).rope(&bf(&c), &bf(&s)).unwrap();
    assert_eq!(got.dtype(), DType::BF16);
    let e = rel_err(&vals(&got), &want);
    assert!(e <= 1e-2, "rope bf16: {e}");
}

#[test]
fn rope_errors() {
    let (c, s) = tables(&[0, 1, 2], &[3], 4, 10000.0); // [1, 3, 2]
    let x = randn(&[2, 2, 3, 4], 155);
    assert!(x.rope(&c, &s).is_ok());
    assert!(is_shape_err(randn(&[2, 3, 4], 156).rope(&c, &s)));
    assert!(is_shape_err(randn(&[2, 2, 4, 4], 157).rope(&c, &s))); // t mismatch
    assert!(is_shape_err(randn(&[2, 2, 3, 6], 158).rope(&c, &s))); // d mismatch
    assert!(matches!(
        randn(&[2, 2, 3, 5], 159).rope(&c, &s),
        Err(Error::InvalidArgument { .. })
    ));
    let (c3, s3) = tables(&[0, 1, 2, 0, 1, 2, 0, 1, 2], &[3, 3], 4, 10000.0); // batch 3
    assert!(is_shape_err(x.rope(&c3, &s3)));
    assert!(is_shape_err(x.rope(&c, &s3)));
    assert!(matches!(
        x.rope(&c.to_dtype(DType::F32).unwrap(), &s),
        Err(Error::DTypeMismatch { .. })
    ));

    assert!(rope_inv_freq(7, 10000.0, DType::F32, CPU).is_err());
    assert!(rope_inv_freq(0, 10000.0, DType::F32, CPU).is_err());
    assert!(rope_inv_freq(8, -1.0, DType::F32, CPU).is_err());
    assert!(rope_inv_freq(8, 10000.0, DType::U32, CPU).is_err());
    let inv = rope_inv_freq(8, 10000.0, DType::F32, CPU).unwrap();
    assert!(matches!(
        rope_tables(&randn(&[3], 160), &inv),
        Err(Error::UnsupportedDType { .. })
    ));
    assert!(is_shape_err(rope_tables(&ids(&[0; 8], &[2, 2, 2]), &inv)));
    assert!(is_shape_err(rope_tables(
        &ids(&[0, 1], &[2]),
        &inv.reshape([2, 2]).unwrap()
    )));
}

/// The CPU kernels check their operands themselves (a backend may be called directly).
#[test]
fn rope_kernel_errors() {
    let x = CpuStorage::F32(vec![1.0; 12]);
    let l = Layout::contiguous([3, 4]);
    let xl = Layout::contiguous([1, 1, 3, 4]);
    let tab = CpuStorage::F32(vec![0.5; 6]);
    let tl = Layout::contiguous([1, 3, 2]);
    assert!(x.rope(&xl, &tab, &tl, &tab, &tl, 2).is_ok());
    // Positions along dim 1 or 2 only; along dim 1 the tables must match that dim.
    assert!(x.rope(&xl, &tab, &tl, &tab, &tl, 3).is_err());
    assert!(x.rope(&xl, &tab, &tl, &tab, &tl, 1).is_err());
    let xl1 = Layout::contiguous([1, 3, 1, 4]);
    assert!(x.rope(&xl1, &tab, &tl, &tab, &tl, 1).is_ok());
    assert!(x.rope(&l, &tab, &tl, &tab, &tl, 2).is_err());
    assert!(x
        .rope(&xl, &tab, &Layout::contiguous([1, 2, 3]), &tab, &tl, 2)
        .is_err());
    let tab64 = CpuStorage::F64(vec![0.5; 6]);
    assert!(matches!(
        x.rope(&xl, &tab, &tl, &tab64, &tl, 2),
        Err(Error::DTypeMismatch { .. })
    ));
}

#[cfg(feature = "cuda")]
mod gpu {
    //! CPU ↔ CUDA parity (skipped, saying why, without a GPU).
    use engine::backend::BackendStorage;
    use engine::{Device, Layout, Shape};
    use testutil::gpu::{heads, input, read, vals, Checker, FLOATS};

    #[test]
    fn rope_tables_and_positions() {
        let Some(mut c) = Checker::new() else { return };
        for dt in FLOATS {
            // rope: x stored [b, t, h, d] and viewed as [b, h, t, d]; tables per batch or shared.
            let (b, h, t, d) = (2usize, 3usize, 37usize, 64usize);
            let x = vals(b * h * t * d, 43);
            // Positions along dim 2 (x viewed [b, h, t, d]) and along dim 1 (x stored [b, h, t, d]
            // and viewed [b, t, h, d], as the backward reads its gradient).
            for (bc, seq_dim) in [(1, 2), (b, 2), (1, 1), (b, 1)] {
                let (cs, sn) = (vals(bc * t * d / 2, 44), vals(bc * t * d / 2, 45));
                c.case(
                    &format!("rope [{b},{h},{t},{d}] tables [{bc},..] positions on dim {seq_dim}"),
                    dt,
                    |dev| {
                        let xs = input(dev, &x, dt);
                        let (cst, snt) = (input(dev, &cs, dt), input(dev, &sn, dt));
                        let (xl, dims) = match seq_dim {
                            2 => (
                                Layout::contiguous([b, t, h, d]).transpose(1, 2),
                                [b, h, t, d],
                            ),
                            _ => (
                                Layout::contiguous([b, h, t, d]).transpose(1, 2),
                                [b, t, h, d],
                            ),
                        };
                        let tl = Layout::contiguous([bc, t, d / 2]);
                        Ok(read(&xs.rope(&xl, &cst, &tl, &snt, &tl, seq_dim)?, dims))
                    },
                );
            }
        }
        c.finish();
    }

    /// RoPE's vector paths (8, 4 or 2 pairs a thread) and its one-pair path: against the CPU, and
    /// bit for bit against each other on the GPU (the same input read at offset 1 of a buffer one
    /// longer, or tables at offset 1, which only the one-pair path takes).
    #[test]
    fn rope_vector_paths() {
        let Some(mut c) = Checker::new() else { return };
        let gpu = c.gpu;
        let (b, h, t) = (2usize, 3usize, 19usize);
        for dt in FLOATS {
            // d = 128, 64: 8 pairs a thread in bf16, 4 in f32, 2 in f64; d = 8: 4, 4, 2;
            // d = 12: 2 in every dtype; d = 6: one.
            for d in [128usize, 64, 8, 12, 6] {
                let (n, half) = (b * h * t * d, d / 2);
                let x = vals(n + 1, 80);
                let (cs, sn) = (vals(b * t * half + 1, 81), vals(b * t * half + 1, 82));
                let dims = Shape::from([b, h, t, d]);
                let tdims = Shape::from([b, t, half]);
                // x as [b, h, t, d], as the head transpose of [b, t, h, d], and as [b, h, d, t]
                // transposed (last stride t: the one-pair path).
                let views = [
                    ("contiguous", Layout::contiguous(dims.clone())),
                    ("heads", heads(b, t, h, d)),
                    (
                        "last stride t",
                        Layout::contiguous([b, h, d, t]).transpose(2, 3),
                    ),
                ];
                for (view, xl) in &views {
                    // The view at offset `xo` of the data from `xo` on, tables likewise: every
                    // offset reads the same values.
                    let run = |dev: Device, xo: usize, to: usize| {
                        let shifted = Layout::new(dims.clone(), xl.strides().to_vec(), xo);
                        let xs = input(dev, &x[1 - xo..], dt);
                        let (cst, snt) =
                            (input(dev, &cs[1 - to..], dt), input(dev, &sn[1 - to..], dt));
                        let tl = Layout::new(tdims.clone(), tdims.contiguous_strides(), to);
                        Ok(read(
                            &xs.rope(&shifted, &cst, &tl, &snt, &tl, 2)?,
                            dims.clone(),
                        ))
                    };
                    c.case(&format!("rope {view} [{b},{h},{t},{d}]"), dt, |dev| {
                        run(dev, 0, 0)
                    });
                    c.case(
                        &format!("rope {view} at offset 1 [{b},{h},{t},{d}]"),
                        dt,
                        |dev| run(dev, 1, 0),
                    );
                    // Bit for bit across the paths on the GPU.
                    c.count += 1;
                    let want = run(gpu, 0, 0);
                    let same = |got: engine::Result<Vec<f64>>| match (&want, got) {
                        (Ok(w), Ok(g)) => *w == g,
                        _ => false,
                    };
                    let (xo, to) = (same(run(gpu, 1, 0)), same(run(gpu, 0, 1)));
                    if !(xo && to) {
                        c.failures.push(format!(
                            "rope {view} [{b},{h},{t},{d}] [{dt}]: GPU paths differ \
                             (same with x at offset 1: {xo}, with tables at offset 1: {to})"
                        ));
                    }
                }
            }
        }
        c.finish();
    }
}
