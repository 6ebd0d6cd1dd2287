//! CPU ↔ CUDA parity of every primitive op of the CUDA backend, and of a small training step.
//!
//! Each case is written once as a function of the device: it builds its inputs there (the same
//! values on both: random, never zeros), runs the op, and reads the result back; the CPU result
//! is the reference. Relative error ‖gpu − cpu‖ / ‖cpu‖ must stay within f32 1e-5, bf16 1e-2,
//! f64 1e-10; u32 results must be equal; NaN never passes. Sizes include multiples of the
//! 256-thread block and sizes that are not.
//!
//! Without a GPU (or without the `cuda` feature) the tests print why they skip and pass; the
//! one check that still runs is that asking for a GPU gives an error that says so.

#[cfg(feature = "cuda")]
mod gpu {
    use engine::backend::cuda::{memory_stats, reset_peak_memory};
    use engine::backend::{BackendStorage, BinaryOp, CmpOp, ReduceOp, UnaryOp};
    use engine::{DType, Device, Error, Layout, Shape, Storage, Tensor};
    use testutil::gpu::{device as gpu, rel_err_matching_nonfinite as rel_err, serial, tol};

    const FLOATS: [DType; 3] = [DType::F32, DType::BF16, DType::F64];
    const ALL: [DType; 4] = [DType::F32, DType::BF16, DType::F64, DType::U32];

    /// Deterministic values in ±[0.1, 2.1) (never zero), from `seed`.
    fn vals(n: usize, seed: u64) -> Vec<f64> {
        (0..n as u64)
            .map(|i| {
                let u = engine::rng::uniform(seed, i);
                let mag = 0.1 + 2.0 * u;
                if engine::rng::uniform(seed ^ 0x5555, i) < 0.5 {
                    -mag
                } else {
                    mag
                }
            })
            .collect()
    }

    /// Positive values in [0.1, 2.1).
    fn pos(n: usize, seed: u64) -> Vec<f64> {
        vals(n, seed).into_iter().map(f64::abs).collect()
    }

    /// Integers in 1..=m as f64 (for u32 tensors and for ties).
    fn ints(n: usize, m: u32, seed: u64) -> Vec<f64> {
        (0..n as u64)
            .map(|i| 1.0 + (engine::rng::uniform(seed, i) * m as f64).floor())
            .collect()
    }

    fn up(dev: Device, data: &[f64], dtype: DType) -> Storage {
        Storage::upload_f64(dev, data, dtype).expect("upload")
    }

    /// The inputs a case builds for a device, from the values and dtype.
    fn input(dev: Device, data: &[f64], dtype: DType) -> Storage {
        // Round through the dtype on the host so that both devices see identical inputs.
        up(dev, data, dtype)
    }

    fn read(s: &Storage, shape: impl Into<Shape>) -> Vec<f64> {
        s.to_f64_vec(&Layout::contiguous(shape.into()))
            .expect("read back")
    }

    /// Runs `case` on the CPU and the GPU and compares; returns a failure line, if any.
    fn compare(
        name: &str,
        dtype: DType,
        case: &dyn Fn(Device) -> engine::Result<Vec<f64>>,
        gpu: Device,
    ) -> Option<String> {
        let want = match case(Device::Cpu) {
            Ok(v) => v,
            Err(e) => return Some(format!("{name} [{dtype}]: CPU failed: {e}")),
        };
        let got = match case(gpu) {
            Ok(v) => v,
            Err(e) => return Some(format!("{name} [{dtype}]: CUDA failed: {e}")),
        };
        if want.iter().all(|&x| x == 0.0)
            && !want.is_empty()
            && !name.contains("zeros")
            && !name.contains("dropout")
        {
            return Some(format!(
                "{name} [{dtype}]: reference is all zeros, a useless case"
            ));
        }
        let err = rel_err(&want, &got);
        let ok = if dtype == DType::U32 {
            want == got
        } else {
            err <= tol(dtype)
        };
        if ok {
            None
        } else {
            let first = want
                .iter()
                .zip(&got)
                .position(|(a, b)| a != b && !(a.is_nan() && b.is_nan()))
                .unwrap_or(0);
            Some(format!(
                "{name} [{dtype}]: rel err {err:e} > {:e} (len {} vs {}; first diff at {first}: cpu {:?} gpu {:?})",
                tol(dtype),
                want.len(),
                got.len(),
                want.get(first),
                got.get(first)
            ))
        }
    }

    /// Collects failures over many cases and reports them all at once.
    struct Checker {
        _serial: std::sync::MutexGuard<'static, ()>,
        gpu: Device,
        failures: Vec<String>,
        count: usize,
    }

    impl Checker {
        fn new() -> Option<Self> {
            let lock = serial();
            gpu().map(|gpu| Checker {
                _serial: lock,
                gpu,
                failures: Vec::new(),
                count: 0,
            })
        }
        fn case(
            &mut self,
            name: &str,
            dtype: DType,
            f: impl Fn(Device) -> engine::Result<Vec<f64>>,
        ) {
            self.count += 1;
            if let Some(msg) = compare(name, dtype, &f, self.gpu) {
                self.failures.push(msg);
            }
        }
        /// As [`Checker::case`] for exact ops (copies, fills): the GPU must give the CPU's values
        /// exactly.
        fn exact(
            &mut self,
            name: &str,
            dtype: DType,
            f: impl Fn(Device) -> engine::Result<Vec<f64>>,
        ) {
            self.count += 1;
            let failure = match (f(Device::Cpu), f(self.gpu)) {
                (Err(e), _) => Some(format!("{name} [{dtype}]: CPU failed: {e}")),
                (_, Err(e)) => Some(format!("{name} [{dtype}]: CUDA failed: {e}")),
                (Ok(want), Ok(got)) => (want != got).then(|| {
                    let first = want.iter().zip(&got).position(|(a, b)| a != b);
                    format!(
                        "{name} [{dtype}]: not exact (len {} vs {}; first diff at {first:?})",
                        want.len(),
                        got.len()
                    )
                }),
            };
            self.failures.extend(failure);
        }
        fn finish(self) {
            eprintln!("{} cases, {} failures", self.count, self.failures.len());
            assert!(self.failures.is_empty(), "\n{}", self.failures.join("\n"));
        }
    }

    /// A [a, b] buffer viewed transposed as [b, a].
    fn transposed(a: usize, b: usize) -> Layout {
        Layout::contiguous([a, b]).transpose(0, 1)
    }

    // Sizes: 1024 = 4 blocks of 256; 1007 and 33 are not multiples of anything useful.
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

    #[test]
    fn reductions_and_softmax() {
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

    #[test]
    fn matmul_layouts() {
        let Some(mut c) = Checker::new() else { return };
        for dt in FLOATS {
            for &(b, m, k, n) in &[
                (1usize, 64usize, 64usize, 64usize),
                (3, 17, 33, 9),
                (2, 1, 40, 7),
                (4, 8, 1, 5),
            ] {
                let (x, y) = (vals(b * m * k, 30), vals(b * k * n, 31));
                // lhs as stored, or as the transpose of a [b, k, m] buffer; rhs likewise.
                for (lt, rt) in [(false, false), (true, false), (false, true), (true, true)] {
                    c.case(
                        &format!("matmul [{b},{m},{k}]x[{k},{n}] lhs^T {lt} rhs^T {rt}"),
                        dt,
                        |dev| {
                            let (xs, ys) = (input(dev, &x, dt), input(dev, &y, dt));
                            let xl = if lt {
                                Layout::contiguous([b, k, m]).transpose(1, 2)
                            } else {
                                Layout::contiguous([b, m, k])
                            };
                            let yl = if rt {
                                Layout::contiguous([b, n, k]).transpose(1, 2)
                            } else {
                                Layout::contiguous([b, k, n])
                            };
                            Ok(read(&xs.matmul(&xl, &ys, &yl)?, [b, m, n]))
                        },
                    );
                }
                // rhs broadcast over the batch (stride 0).
                let y1 = vals(k * n, 32);
                c.case(
                    &format!("matmul [{b},{m},{k}]x[{k},{n}] rhs broadcast"),
                    dt,
                    |dev| {
                        let (xs, ys) = (input(dev, &x, dt), input(dev, &y1, dt));
                        let yl = Layout::contiguous([1, k, n])
                            .broadcast_as("t", &Shape::from([b, k, n]))?;
                        Ok(read(
                            &xs.matmul(&Layout::contiguous([b, m, k]), &ys, &yl)?,
                            [b, m, n],
                        ))
                    },
                );
                // rhs with no unit stride (every other element): copied before cuBLAS.
                let y2 = vals(b * k * n * 2, 33);
                c.case(
                    &format!("matmul [{b},{m},{k}]x[{k},{n}] rhs strided"),
                    dt,
                    |dev| {
                        let (xs, ys) = (input(dev, &x, dt), input(dev, &y2, dt));
                        let yl = Layout::new(Shape::from([b, k, n]), vec![2 * k * n, 2 * n, 2], 1);
                        Ok(read(
                            &xs.matmul(&Layout::contiguous([b, m, k]), &ys, &yl)?,
                            [b, m, n],
                        ))
                    },
                );
            }
        }
        c.finish();
    }

    #[test]
    fn norms_rope_and_losses() {
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

    #[test]
    fn index_ops_and_topk() {
        let Some(mut c) = Checker::new() else { return };
        let (a, b, e) = (6usize, 50usize, 260usize);
        let base_shape = [a, b, e];
        let nb = a * b * e;
        for dt in ALL {
            let data = if dt == DType::U32 {
                ints(nb, 100, 50)
            } else {
                vals(nb, 50)
            };
            for dim in 0..3 {
                let size = base_shape[dim];
                let ids: Vec<f64> = (0..13).map(|j| ((j * 7 + 3) % size) as f64).collect();
                let mut out_shape = base_shape;
                out_shape[dim] = ids.len();
                c.case(&format!("index_select dim {dim} {dt}"), dt, |dev| {
                    let (s, i) = (input(dev, &data, dt), input(dev, &ids, DType::U32));
                    Ok(read(
                        &s.index_select(
                            &Layout::contiguous(base_shape),
                            &i,
                            &Layout::contiguous([ids.len()]),
                            dim,
                        )?,
                        out_shape,
                    ))
                });
                // gather along dim with ids of the output's shape (m = 5 along dim).
                let mut g_shape = base_shape;
                g_shape[dim] = 5;
                let gn: usize = g_shape.iter().product();
                let gids: Vec<f64> = (0..gn).map(|j| ((j * 31 + 1) % size) as f64).collect();
                c.case(&format!("gather dim {dim} {dt}"), dt, |dev| {
                    let (s, i) = (input(dev, &data, dt), input(dev, &gids, DType::U32));
                    Ok(read(
                        &s.gather(
                            &Layout::contiguous(base_shape),
                            &i,
                            &Layout::contiguous(g_shape),
                            dim,
                        )?,
                        g_shape,
                    ))
                });
                if dt == DType::U32 {
                    continue;
                }
                // index_add with repeated ids; src [.., 13, ..].
                let src = vals(out_shape.iter().product(), 51);
                c.case(&format!("index_add dim {dim} {dt}"), dt, |dev| {
                    let (s, i, sr) = (
                        input(dev, &data, dt),
                        input(dev, &ids_rep(size), DType::U32),
                        input(dev, &src, dt),
                    );
                    Ok(read(
                        &s.index_add(
                            &Layout::contiguous(base_shape),
                            &i,
                            &Layout::contiguous([13]),
                            &sr,
                            &Layout::contiguous(out_shape),
                            dim,
                        )?,
                        base_shape,
                    ))
                });
                let gsrc = vals(gn, 52);
                c.case(&format!("scatter_add dim {dim} {dt}"), dt, |dev| {
                    let (s, i, sr) = (
                        input(dev, &data, dt),
                        input(dev, &gids, DType::U32),
                        input(dev, &gsrc, dt),
                    );
                    let gl = Layout::contiguous(g_shape);
                    Ok(read(
                        &s.scatter_add(&Layout::contiguous(base_shape), &i, &gl, &sr, &gl, dim)?,
                        base_shape,
                    ))
                });
            }
            // top-k with ties (small integers) and, for floats, NaN.
            for &(rows, n, k) in &[(300usize, 8usize, 2usize), (7, 1000, 5), (33, 64, 64)] {
                let mut x = ints(rows * n, 20, 53);
                if dt != DType::U32 {
                    x[3] = f64::NAN;
                    x[n + 1] = f64::NAN;
                }
                c.case(
                    &format!("topk [{rows},{n}] k {k} {dt}"),
                    DType::U32,
                    |dev| {
                        let s = input(dev, &x, dt);
                        Ok(read(
                            &s.topk_indices(&Layout::contiguous([rows, n]), k)?,
                            [rows, k],
                        ))
                    },
                );
            }
        }
        c.finish();
    }

    /// 13 ids below `size`, with repeats.
    fn ids_rep(size: usize) -> Vec<f64> {
        (0..13).map(|j| ((j * 5) % size.min(4)) as f64).collect()
    }

    #[test]
    fn creation_and_random() {
        let Some(mut c) = Checker::new() else { return };
        for &n in &[1024usize, 1007, 1] {
            for dt in ALL {
                c.case(&format!("full {n} {dt}"), dt, |dev| {
                    Ok(read(&Storage::full(dev, &Shape::from(n), dt, 3.7)?, n))
                });
                c.case(&format!("zeros {n} {dt}"), dt, |dev| {
                    Ok(read(&Storage::zeros(dev, &Shape::from(n), dt)?, n))
                });
                let data = if dt == DType::U32 {
                    ints(n, 1000, 60)
                } else {
                    vals(n, 60)
                };
                c.case(&format!("upload {n} {dt}"), dt, |dev| {
                    Ok(read(&up(dev, &data, dt), n))
                });
            }
            for dt in FLOATS {
                c.case(&format!("randn {n} {dt}"), dt, |dev| {
                    Ok(read(
                        &Storage::randn(dev, &Shape::from(n), dt, 0.5, 2.0, 77)?,
                        n,
                    ))
                });
                c.case(&format!("rand_uniform {n} {dt}"), dt, |dev| {
                    Ok(read(
                        &Storage::rand_uniform(dev, &Shape::from(n), dt, -1.0, 3.0, 78)?,
                        n,
                    ))
                });
                c.case(&format!("dropout_mask {n} {dt}"), dt, |dev| {
                    Ok(read(
                        &Storage::dropout_mask(dev, &Shape::from(n), dt, 0.3, 79)?,
                        n,
                    ))
                });
            }
        }
        c.finish();
        // Uniform fills and dropout masks are bit-identical to the CPU's.
        let gpu = Device::Cuda(0);
        let shape = Shape::from(4097);
        let u = |d| Storage::rand_uniform(d, &shape, DType::F64, -1.0, 3.0, 5).unwrap();
        assert_eq!(read(&u(Device::Cpu), 4097), read(&u(gpu), 4097));
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

    /// A [b, t, h, d] buffer viewed as [b, h, t, d] (the attention head transpose).
    fn heads(b: usize, t: usize, h: usize, d: usize) -> Layout {
        Layout::contiguous([b, t, h, d]).transpose(1, 2)
    }

    /// Values for `dt`: integers for u32, else [`vals`].
    fn data(n: usize, dt: DType, seed: u64) -> Vec<f64> {
        if dt == DType::U32 {
            ints(n, 1000, seed)
        } else {
            vals(n, seed)
        }
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

    /// A small training step, written once over the device: embedding, RMSNorm, RoPE-free
    /// attention-like matmuls, SiLU, softmax, cross-entropy; loss and every gradient compared.
    fn step(dev: Device, dt: DType) -> engine::Result<Vec<f64>> {
        let (v, h, t) = (97usize, 64usize, 19usize);
        let emb = Tensor::from_f64(&vals(v * h, 70), [v, h], dt, dev)?.to_var()?;
        let w1 = Tensor::from_f64(&vals(h * 2 * h, 71), [h, 2 * h], dt, dev)?.to_var()?;
        let w2 = Tensor::from_f64(&vals(2 * h * v, 72), [2 * h, v], dt, dev)?.to_var()?;
        let g = Tensor::from_f64(&pos(h, 73), [h], dt, dev)?.to_var()?;
        let ids = Tensor::from_vec(
            (0..t as u32)
                .map(|i| (i * 13) % v as u32)
                .collect::<Vec<u32>>(),
            [t],
            dev,
        )?;
        let tg = Tensor::from_vec(
            (0..t as u32)
                .map(|i| {
                    if i % 5 == 4 {
                        u32::MAX
                    } else {
                        (i * 29 + 3) % v as u32
                    }
                })
                .collect::<Vec<u32>>(),
            [t],
            dev,
        )?;
        let x = emb.embedding(&ids)?; // [t, h]
        let x = x.rms_norm(&g, 1e-5)?;
        let hdn = x.matmul(&w1)?.mul_scalar(0.1)?.silu()?; // [t, 2h]
        let p = hdn.softmax_last_dim()?.mul(&hdn)?; // [t, 2h]
        let logits = p.matmul(&w2)?; // [t, v]
        let loss = logits.cross_entropy(&tg, u32::MAX)?;
        loss.backward()?;
        let mut out = loss.to_vec_f64()?;
        for w in [&emb, &w1, &w2, &g] {
            out.extend(w.grad().expect("a gradient").to_vec_f64()?);
        }
        Ok(out)
    }

    #[test]
    fn training_step_matches_cpu() {
        let Some(mut c) = Checker::new() else { return };
        for dt in FLOATS {
            // Gradients of bf16 parameters go through bf16 rounding at every op on both devices.
            c.case("training step (loss and gradients)", dt, |dev| {
                step(dev, dt)
            });
        }
        c.finish();
    }

    #[test]
    fn to_device_round_trip_and_gradient() {
        let _serial = serial();
        let Some(gpu) = gpu() else { return };
        let data = vals(300, 80);
        let x = Tensor::from_f64(&data, [3, 100], DType::F32, Device::Cpu)
            .unwrap()
            .to_var()
            .unwrap();
        // A transposed view travels as a contiguous copy.
        let xt = x.transpose(0, 1).unwrap();
        let on_gpu = xt.to_device(gpu).unwrap();
        assert_eq!(on_gpu.device(), gpu);
        assert_eq!(on_gpu.to_vec_f64().unwrap(), xt.to_vec_f64().unwrap());
        // loss = Σ (x²) computed on the GPU, brought back: dx = 2x on the CPU.
        let loss = on_gpu
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_device(Device::Cpu)
            .unwrap();
        loss.backward().unwrap();
        let grad = x.grad().expect("gradient reached the CPU variable");
        assert_eq!(grad.device(), Device::Cpu);
        let want: Vec<f64> = x.to_vec_f64().unwrap().iter().map(|v| 2.0 * v).collect();
        assert!(rel_err(&want, &grad.to_vec_f64().unwrap()) < 1e-6);
    }

    #[test]
    fn allocator_statistics_and_errors() {
        let _serial = serial();
        let Some(gpu) = gpu() else { return };
        let before = memory_stats(gpu).0;
        reset_peak_memory(gpu);
        {
            let t = Tensor::zeros([1 << 20], DType::F32, gpu).unwrap();
            let (cur, peak) = memory_stats(gpu);
            assert!(
                cur >= before + (4 << 20),
                "current {cur} after a 4 MiB tensor (before {before})"
            );
            assert!(peak >= cur);
            drop(t);
        }
        let (cur, peak) = memory_stats(gpu);
        assert_eq!(cur, before, "the buffer went back to the cache");
        assert!(peak >= before + (4 << 20));
        // Reuse: the same size again does not raise the peak.
        let _t = Tensor::zeros([1 << 20], DType::F32, gpu).unwrap();
        assert_eq!(memory_stats(gpu).1, peak);
        // Out of memory is a typed error with the bytes asked for.
        match Tensor::zeros([1usize << 40], DType::F32, gpu) {
            Err(Error::OutOfMemory {
                requested, free, ..
            }) => {
                assert_eq!(requested, 4 << 40);
                eprintln!("OOM error as expected: asked {requested}, free {free}");
            }
            other => panic!("expected OutOfMemory, got {other:?}"),
        }
        // Mixing devices is an error, not a panic.
        let a = Tensor::ones([4], DType::F32, gpu).unwrap();
        let b = Tensor::ones([4], DType::F32, Device::Cpu).unwrap();
        assert!(a.add(&b).is_err());
    }
}

/// Without a usable GPU, asking for one is a clear error that suggests the CPU.
#[test]
fn missing_gpu_is_a_clear_error() {
    use engine::{DType, Device, Tensor};
    let r = Tensor::zeros([4], DType::F32, Device::Cuda(0));
    match r {
        Ok(_) => eprintln!("a GPU is present: nothing to check here"),
        Err(e) => {
            let msg = e.to_string();
            eprintln!("error as expected: {msg}");
            assert!(msg.contains("--device cpu"), "{msg}");
        }
    }
}
