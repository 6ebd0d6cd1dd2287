//! Elementwise ops (`engine/src/ops/elementwise.rs`, `backend/{cpu,cuda}/elementwise.rs`,
//! `kernels/src/elementwise.cu`): unary and binary arithmetic with broadcasting, comparisons,
//! `where_cond` / `masked_fill`, casts (`to_dtype`), strided copies and fills.
//!
//! Gradients by central finite differences in f64 (relative error 1e-6; the f32 round trip with
//! a step of 1e-2 and 1e-5), on broadcast and non-contiguous operands; values against the
//! definition (broadcast add and div exactly or within 1e-15, fused `silu_mul` against silu then
//! mul within 1e-6, 1e-2 in bf16), bf16 against f32 within 1e-2, bf16 casts within one part in
//! 128; typed errors of bad operands.
//!
//! Parity (module `gpu`): casts between every pair of dtypes, every unary and binary op, every
//! comparison, `where_cond` over every pair of condition and value dtypes, strided copies (by
//! 16-byte, 8-byte and single-element units) and fills, on transposed, broadcast and offset
//! views, sizes that are and are not multiples of the 256-thread block. The CPU is the
//! reference: relative error within f32 1e-5, bf16 1e-2, f64 1e-10, u32 equal; copies and fills
//! exact; NaN never passes.

use engine::{DType, Device, Error, Tensor};
use testutil::{check_gradients, check_gradients_with, ids, randn, rel_err, uniform, GradCheck};

// ----- gradient checks ----------------------------------------------------------------------

#[test]
fn grad_unary() {
    let x = randn(&[3, 4], 10);
    let pos = uniform(&[3, 4], 0.5, 2.0, 11);
    check_gradients("neg", &[x.clone()], |x| x[0].neg());
    check_gradients("exp", &[x.clone()], |x| x[0].exp());
    check_gradients("log", &[pos.clone()], |x| x[0].log());
    check_gradients("silu", &[x.clone()], |x| x[0].silu());
    check_gradients("sigmoid", &[x.clone()], |x| x[0].sigmoid());
    check_gradients("sqrt", &[pos.clone()], |x| x[0].sqrt());
    check_gradients("recip", &[pos.clone()], |x| x[0].recip());
    check_gradients("sqr", &[x.clone()], |x| x[0].sqr());
    check_gradients("abs", &[x.clone()], |x| x[0].abs());
    check_gradients("tanh", &[x.clone()], |x| x[0].tanh());
    check_gradients("cos", &[x.clone()], |x| x[0].cos());
    check_gradients("sin", &[x.clone()], |x| x[0].sin());
    check_gradients("affine", &[x.clone()], |x| x[0].affine(-1.5, 0.25));
    check_gradients("powf", &[pos.clone()], |x| x[0].powf(1.7));
    check_gradients("clamp_min", &[x.clone()], |x| x[0].clamp_min(0.1));
    check_gradients("clamp_max", &[x.clone()], |x| x[0].clamp_max(-0.1));
    // Non-contiguous input.
    check_gradients("silu_transposed", &[randn(&[4, 3], 12)], |x| {
        x[0].t()?.silu()
    });
}

#[test]
fn grad_binary_broadcast() {
    let a = randn(&[2, 3, 4], 20);
    let b = randn(&[3, 1], 21);
    let pos = uniform(&[4], 0.5, 2.0, 22);
    check_gradients("add", &[a.clone(), b.clone()], |x| x[0].add(&x[1]));
    check_gradients("sub", &[b.clone(), a.clone()], |x| x[0].sub(&x[1]));
    check_gradients("mul", &[a.clone(), b.clone()], |x| x[0].mul(&x[1]));
    check_gradients("div", &[a.clone(), pos.clone()], |x| x[0].div(&x[1]));
    check_gradients("maximum", &[a.clone(), b.clone()], |x| x[0].maximum(&x[1]));
    check_gradients("minimum", &[a.clone(), b.clone()], |x| x[0].minimum(&x[1]));
    check_gradients("silu_mul", &[a.clone(), b.clone()], |x| {
        x[0].silu_mul(&x[1])
    });
    check_gradients("silu_mul_rev", &[b.clone(), a.clone()], |x| {
        x[0].silu_mul(&x[1])
    });
    // Non-contiguous operands: a transposed view times a broadcast row.
    check_gradients(
        "mul_transposed",
        &[randn(&[4, 3], 23), randn(&[4], 24)],
        |x| x[0].t()?.mul(&x[1]),
    );
    // The same tensor on both sides.
    check_gradients("mul_self", &[randn(&[5], 25)], |x| x[0].mul(&x[0]));
}

#[test]
fn grad_where_and_masked_fill() {
    let cond = ids(&[1, 0, 1, 1, 0, 0, 1, 0, 0, 1, 1, 0], &[3, 4]);
    check_gradients(
        "where_cond",
        &[cond.clone(), randn(&[3, 4], 30), randn(&[4], 31)],
        |x| x[0].where_cond(&x[1], &x[2]),
    );
    check_gradients("masked_fill", &[cond, randn(&[3, 4], 32)], |x| {
        x[1].masked_fill(&x[0], -3.0)
    });
}

#[test]
fn casts_round_trip_and_backprop() {
    let x = randn(&[2, 3], 70);
    // The f32 round trip rounds every probe to 24 bits: a larger step keeps the difference
    // quotient above that rounding (the function is linear, so the step adds no error).
    let opts = GradCheck {
        step: 1e-2,
        tol: 1e-5,
        ..GradCheck::default()
    };
    check_gradients_with(opts, "to_dtype_f32_and_back", &[x.clone()], |x| {
        x[0].to_dtype(DType::F32)?.to_dtype(DType::F64)
    });
    let b = x.to_dtype(DType::BF16).unwrap();
    assert_eq!(b.dtype(), DType::BF16);
    let back = b.to_dtype(DType::F64).unwrap().to_vec_f64().unwrap();
    for (a, r) in back.iter().zip(x.to_vec_f64().unwrap()) {
        assert!((a - r).abs() <= r.abs() / 128.0 + 1e-30, "{a} vs {r}");
    }
    let _ = Tensor::zeros([2], DType::F32, Device::Cpu).unwrap();
}

// ----- values -------------------------------------------------------------------------------

#[test]
fn broadcasting_binary_ops() {
    let a = randn(&[2, 3, 4], 5);
    let b = randn(&[3, 1], 6);
    let out = a.add(&b).unwrap();
    assert_eq!(out.dims(), &[2, 3, 4]);
    let (av, bv, ov) = (
        a.to_vec_f64().unwrap(),
        b.to_vec_f64().unwrap(),
        out.to_vec_f64().unwrap(),
    );
    for i in 0..2 {
        for (j, bj) in bv.iter().enumerate() {
            for k in 0..4 {
                let idx = (i * 3 + j) * 4 + k;
                assert_eq!(ov[idx], av[idx] + bj);
            }
        }
    }
    let d = a.div(&b).unwrap().to_vec_f64().unwrap();
    assert!((d[5] - av[5] / bv[1]).abs() < 1e-15);
}

#[test]
fn fused_silu_mul_equals_silu_then_mul() {
    let (g, u) = (randn(&[7, 33], 15), randn(&[7, 33], 16));
    for dt in [DType::F64, DType::F32, DType::BF16] {
        let (g, u) = (g.to_dtype(dt).unwrap(), u.to_dtype(dt).unwrap());
        let fused = g.silu_mul(&u).unwrap().to_vec_f64().unwrap();
        let composite = g.silu().unwrap().mul(&u).unwrap().to_vec_f64().unwrap();
        let tol = if dt == DType::BF16 { 1e-2 } else { 1e-6 };
        assert!(rel_err(&fused, &composite) < tol, "{dt}");
    }
}

#[test]
fn bf16_elementwise_close_to_f32() {
    let x = randn(&[64, 33], 8);
    let (x32, xb) = (
        x.to_dtype(DType::F32).unwrap(),
        x.to_dtype(DType::BF16).unwrap(),
    );
    let a = x32
        .silu()
        .unwrap()
        .mul(&x32.exp().unwrap())
        .unwrap()
        .softmax_last_dim()
        .unwrap();
    let b = xb
        .silu()
        .unwrap()
        .mul(&xb.exp().unwrap())
        .unwrap()
        .softmax_last_dim()
        .unwrap();
    assert!(rel_err(&b.to_vec_f64().unwrap(), &a.to_vec_f64().unwrap()) < 1e-2);
}

// ----- errors -------------------------------------------------------------------------------

#[test]
fn elementwise_typed_errors() {
    let a = randn(&[2, 3], 13);
    let b = randn(&[4, 5], 14);
    assert!(matches!(
        a.add(&b),
        Err(Error::BroadcastIncompatible { op: "add", .. })
    ));
    let a32 = a.to_dtype(DType::F32).unwrap();
    assert!(matches!(
        a32.add(&a),
        Err(Error::DTypeMismatch { op: "add", .. })
    ));
    let ids = Tensor::arange(3, Device::Cpu).unwrap();
    assert!(matches!(ids.exp(), Err(Error::UnsupportedDType { .. })));
}

#[cfg(feature = "cuda")]
mod gpu {
    //! CPU ↔ CUDA parity (skipped, saying why, without a GPU).
    use engine::backend::{BackendStorage, BinaryOp, CmpOp, UnaryOp};
    use engine::{DType, Layout, Shape, Storage};
    use testutil::gpu::{
        data, heads, input, ints, pos, read, transposed, vals, Checker, ALL, FLOATS,
    };

    const SIZES: [(usize, usize); 3] = [(32, 32), (19, 53), (3, 11)];

    #[test]
    fn casts_unary_binary_cmp_where_copy() {
        let Some(mut c) = Checker::new() else { return };
        for &(r, k) in &SIZES {
            let n = r * k;
            // Casts between every pair of dtypes, read through a transposed view.
            for src in ALL {
                for dst in ALL {
                    let data = if src == DType::U32 || dst == DType::U32 {
                        ints(n, 300, 1)
                    } else {
                        vals(n, 1)
                    };
                    c.case(&format!("cast {src}->{dst} {r}x{k}"), dst, |dev| {
                        let s = input(dev, &data, src);
                        let o = s.to_dtype(&transposed(r, k), dst)?;
                        Ok(read(&o, [k, r]))
                    });
                }
            }
            for dt in FLOATS {
                let ops = [
                    UnaryOp::Neg,
                    UnaryOp::Exp,
                    UnaryOp::Log,
                    UnaryOp::Silu,
                    UnaryOp::Sigmoid,
                    UnaryOp::Sqrt,
                    UnaryOp::Recip,
                    UnaryOp::Sqr,
                    UnaryOp::Abs,
                    UnaryOp::Tanh,
                    UnaryOp::Cos,
                    UnaryOp::Sin,
                    UnaryOp::Affine {
                        mul: 1.5,
                        add: -0.25,
                    },
                    UnaryOp::Powf(1.7),
                    UnaryOp::MaxScalar(0.3),
                    UnaryOp::MinScalar(-0.3),
                ];
                for op in ops {
                    let positive = matches!(op, UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Powf(_));
                    let data = if positive { pos(n, 2) } else { vals(n, 2) };
                    c.case(&format!("unary {op:?} {r}x{k} transposed"), dt, |dev| {
                        let s = input(dev, &data, dt);
                        Ok(read(&s.unary(&transposed(r, k), op)?, [k, r]))
                    });
                }
                let (a, b) = (vals(4 * n, 3), pos(k, 4));
                for op in [
                    BinaryOp::Add,
                    BinaryOp::Sub,
                    BinaryOp::Mul,
                    BinaryOp::Div,
                    BinaryOp::Maximum,
                    BinaryOp::Minimum,
                    BinaryOp::SiluMul,
                ] {
                    // [4, r, k] op [k] broadcast.
                    c.case(&format!("binary {op:?} [4,{r},{k}] by [{k}]"), dt, |dev| {
                        let (x, y) = (input(dev, &a, dt), input(dev, &b, dt));
                        let shape = Shape::from([4, r, k]);
                        let yl = Layout::contiguous([k]).broadcast_as("t", &shape)?;
                        Ok(read(
                            &x.binary(&Layout::contiguous(shape.clone()), &y, &yl, op)?,
                            shape,
                        ))
                    });
                    // Transposed lhs op a [r, 1] column broadcast.
                    let col = pos(r, 5);
                    c.case(&format!("binary {op:?} [{r},{k}]^T by column"), dt, |dev| {
                        let (x, y) = (input(dev, &a[..n], dt), input(dev, &col, dt));
                        let shape = Shape::from([k, r]);
                        let yl = Layout::contiguous([1, r]).broadcast_as("t", &shape)?;
                        Ok(read(&x.binary(&transposed(r, k), &y, &yl, op)?, shape))
                    });
                }
            }
            for dt in ALL {
                // Small integers make equal pairs common.
                let (a, b) = (ints(n, 4, 6), ints(n, 4, 7));
                for op in [
                    CmpOp::Eq,
                    CmpOp::Ne,
                    CmpOp::Lt,
                    CmpOp::Le,
                    CmpOp::Gt,
                    CmpOp::Ge,
                ] {
                    c.case(&format!("cmp {op:?} {dt} {r}x{k}"), DType::U32, |dev| {
                        let (x, y) = (input(dev, &a, dt), input(dev, &b, dt));
                        Ok(read(
                            &x.cmp(&transposed(r, k), &y, &Layout::contiguous([k, r]), op)?,
                            [k, r],
                        ))
                    });
                }
                for cd in ALL {
                    let cond: Vec<f64> = ints(n, 2, 8).into_iter().map(|x| x - 1.0).collect();
                    let (t, f) = if dt == DType::U32 {
                        (ints(n, 9, 9), ints(k, 9, 10))
                    } else {
                        (vals(n, 9), vals(k, 10))
                    };
                    c.case(&format!("where cond {cd} values {dt} {r}x{k}"), dt, |dev| {
                        let (cs, ts, fs) = (
                            input(dev, &cond, cd),
                            input(dev, &t, dt),
                            input(dev, &f, dt),
                        );
                        let shape = Shape::from([r, k]);
                        let fl = Layout::contiguous([k]).broadcast_as("t", &shape)?;
                        let o = cs.where_cond(
                            &Layout::contiguous(shape.clone()),
                            &ts,
                            &transposed(k, r),
                            &fs,
                            &fl,
                        )?;
                        Ok(read(&o, shape))
                    });
                }
                // Strided copy: a transposed source into a narrowed view of a larger buffer.
                let (src, dst) = if dt == DType::U32 {
                    (ints(n, 50, 11), ints(k * (r + 3), 50, 12))
                } else {
                    (vals(n, 11), vals(k * (r + 3), 12))
                };
                c.case(&format!("copy_to_view {dt} {r}x{k}"), dt, |dev| {
                    let s = input(dev, &src, dt);
                    let mut d = input(dev, &dst, dt);
                    let dl = Layout::contiguous([k, r + 3]).narrow(1, 2, r);
                    s.copy_to_view(&transposed(r, k), &mut d, &dl)?;
                    Ok(read(&d, [k, r + 3]))
                });
            }
        }
        c.finish();
    }

    /// `add_to_view` (`Tensor::add_assign`): a transposed source added into a narrowed view of a
    /// larger buffer (the element-at-a-time path; the buffer's other elements stay), and one run
    /// into one run at lengths around the 8-element vector step (the vector path and its tail).
    /// One rounding on both sides (bf16 in f32): the GPU must give the CPU's values exactly.
    #[test]
    fn add_to_view_in_place() {
        let Some(mut c) = Checker::new() else { return };
        for dt in FLOATS {
            for &(r, k) in &SIZES {
                let (src, dst) = (vals(r * k, 13), vals(k * (r + 3), 14));
                c.exact(&format!("add_to_view {r}x{k} transposed"), dt, |dev| {
                    let s = input(dev, &src, dt);
                    let mut d = input(dev, &dst, dt);
                    let dl = Layout::contiguous([k, r + 3]).narrow(1, 2, r);
                    s.add_to_view(&transposed(r, k), &mut d, &dl)?;
                    Ok(read(&d, [k, r + 3]))
                });
            }
            for n in [1usize, 7, 8, 9, 4096 + 5] {
                let (src, dst) = (vals(n, 15), vals(n + 16, 16));
                // Offset 8 keeps the destination 16-byte aligned in every dtype; 3 does not.
                for off in [8usize, 3] {
                    c.exact(&format!("add_to_view run n={n} at {off}"), dt, |dev| {
                        let s = input(dev, &src, dt);
                        let mut d = input(dev, &dst, dt);
                        let dl = Layout::contiguous([n + 16]).narrow(0, off, n);
                        s.add_to_view(&Layout::contiguous([n]), &mut d, &dl)?;
                        Ok(read(&d, n + 16))
                    });
                }
            }
        }
        c.finish();
    }

    /// Strided copies through 16-byte units (copy_u128), 8-byte units (copy_u64) and one element
    /// at a time, fills through 16-byte stores with a scalar tail: each next to views that must
    /// take the other paths. Copies and fills are exact.
    #[test]
    fn copies_and_fills_by_unit() {
        let Some(mut c) = Checker::new() else { return };
        for dt in ALL {
            // Head transposes both ways. d = 128, 64: 16-byte units in every dtype; d = 12: 8-byte
            // units in bf16, 16-byte ones otherwise; d = 6: one element at a time in bf16, 8-byte
            // units in f32 and u32, 16-byte ones in f64; d = 3: one element at a time.
            let (b, t, h) = (2usize, 33usize, 3usize);
            for d in [128usize, 64, 12, 6, 3] {
                let n = b * t * h * d;
                let (src, dst) = (data(n, dt, 70), data(n, dt, 71));
                let contiguous = Layout::contiguous([b, h, t, d]);
                c.exact(&format!("copy [b,t,h,d] as [b,h,t,d] d={d}"), dt, |dev| {
                    let s = input(dev, &src, dt);
                    let mut o = input(dev, &dst, dt);
                    s.copy_to_view(&heads(b, t, h, d), &mut o, &contiguous)?;
                    Ok(read(&o, n))
                });
                c.exact(&format!("copy [b,h,t,d] into [b,t,h,d] d={d}"), dt, |dev| {
                    let s = input(dev, &src, dt);
                    let mut o = input(dev, &dst, dt);
                    s.copy_to_view(&contiguous, &mut o, &heads(b, t, h, d))?;
                    Ok(read(&o, n))
                });
                c.exact(&format!("gather [b,t,h,d] as [b,h,t,d] d={d}"), dt, |dev| {
                    let s = input(dev, &src, dt);
                    Ok(read(&s.to_dtype(&heads(b, t, h, d), dt)?, n))
                });
            }
            // Rows of 64 at offset `so` of [r, 80] into rows at offset `dof` of [r, 96] (the
            // destination's other elements must stay). Offsets 8 and 16 are whole 16-byte units in
            // every dtype; 4: 8-byte units in bf16; 2, 6: 8-byte units in f32 and u32, none in bf16;
            // 1 and 3 none.
            let r = 37usize;
            let (src, dst) = (data(r * 80, dt, 72), data(r * 96, dt, 73));
            for (so, dof) in [
                (0usize, 32usize),
                (8, 16),
                (16, 8),
                (4, 4),
                (2, 6),
                (1, 8),
                (8, 3),
            ] {
                c.exact(
                    &format!("copy_to_view [{r},64] at {so} of [{r},80] into {dof} of [{r},96]"),
                    dt,
                    |dev| {
                        let s = input(dev, &src, dt);
                        let mut o = input(dev, &dst, dt);
                        let sl = Layout::contiguous([r, 80]).narrow(1, so, 64);
                        let dl = Layout::contiguous([r, 96]).narrow(1, dof, 64);
                        s.copy_to_view(&sl, &mut o, &dl)?;
                        Ok(read(&o, [r, 96]))
                    },
                );
            }
            // Contiguous runs: whole units (n = 1024) or not (1000003), at aligned offsets or not.
            for n in [1024usize, 1000003] {
                let (src, dst) = (data(n + 8, dt, 74), data(n + 8, dt, 75));
                for (so, dof) in [(0usize, 0usize), (8, 8), (3, 3), (0, 5)] {
                    c.exact(&format!("copy run of {n} at {so} into {dof}"), dt, |dev| {
                        let s = input(dev, &src, dt);
                        let mut o = input(dev, &dst, dt);
                        let sl = Layout::contiguous([n + 8]).narrow(0, so, n);
                        let dl = Layout::contiguous([n + 8]).narrow(0, dof, n);
                        s.copy_to_view(&sl, &mut o, &dl)?;
                        Ok(read(&o, n + 8))
                    });
                }
            }
            // A row broadcast over 19 rows (stride 0) is whole units too.
            let row = data(64, dt, 76);
            c.exact("copy [64] broadcast to [19, 64]", dt, |dev| {
                let s = input(dev, &row, dt);
                let shape = Shape::from([19, 64]);
                let mut o = Storage::zeros(dev, &shape, dt)?;
                let sl = Layout::contiguous([64]).broadcast_as("copy", &shape)?;
                s.copy_to_view(&sl, &mut o, &Layout::contiguous(shape.clone()))?;
                Ok(read(&o, shape))
            });
            // Fills: the tail alone (1, 7), whole 16-byte stores (8, or 16 for f64), both.
            for n in [0usize, 1, 7, 8, 9, 16, 1000003] {
                c.exact(&format!("full {n}"), dt, |dev| {
                    Ok(read(&Storage::full(dev, &Shape::from(n), dt, 3.7)?, n))
                });
            }
        }
        c.finish();
    }
}
