//! CPU ↔ CUDA parity of the fused attention softmax: the backend's `causal_softmax` and
//! `softmax_backward`, and `causal_attention` forward and backward built on them.
//!
//! Each case is written once as a function of the device: it builds its inputs there (the same
//! random values on both, never zeros), runs, and reads the result back; the CPU result is the
//! reference. Relative error ‖gpu − cpu‖ / ‖cpu‖ must stay within f32 1e-5, bf16 1e-2, f64
//! 1e-10; NaN never passes.
//!
//! Row lengths (`ROW_LENGTHS`) cover both kernel forms. One warp per row, held as 16-byte chunks
//! of V = 8 bf16, 4 f32 or 2 f64, 32·C per row (C = 1, 2, 4, 8), when V divides s and s ≤ 256·V:
//! s = 64, 256, 512 for every dtype, 1000 for bf16 and f32, 2048 for bf16; the causal limits of
//! the square cases end inside chunks, and rows are not a multiple of the 8 warps of a block.
//! One block per row otherwise: s = 1, 7, 255, 257 (no V divides them), 1000 for f64, 2048 for
//! f32 and f64, 2056 for every dtype (past the warp's registers); these cover rows narrower than a
//! block, exactly one 256-thread block, one more, and rows that loop over the block. Views that
//! start 1 element into their buffer (not 16-byte aligned: one block per row) or 8 (aligned: one
//! warp per row) check the alignment test; transposed inputs are copied first (aligned).
//!
//! Without a GPU (or without the `cuda` feature) the tests print why they skip and pass.

#[cfg(feature = "cuda")]
mod gpu {
    use engine::backend::BackendStorage;
    use engine::{causal_attention, DType, Device, Layout, Shape, Storage, Tensor};
    use testutil::gpu::{device as gpu, rel_err_matching_nonfinite as rel_err, serial, tol};

    const FLOATS: [DType; 3] = [DType::F32, DType::BF16, DType::F64];

    /// Row lengths of the softmax cases (see the header).
    const ROW_LENGTHS: [usize; 10] = [1, 7, 64, 255, 256, 257, 512, 1000, 2048, 2056];

    /// Deterministic values in ±[0.1, 2.1) (never zero), times `mag`, from `seed`.
    fn vals(n: usize, seed: u64, mag: f64) -> Vec<f64> {
        (0..n as u64)
            .map(|i| {
                let u = engine::rng::uniform(seed, i);
                let m = (0.1 + 2.0 * u) * mag;
                if engine::rng::uniform(seed ^ 0x5555, i) < 0.5 {
                    -m
                } else {
                    m
                }
            })
            .collect()
    }

    fn read(s: &Storage, shape: impl Into<Shape>) -> Vec<f64> {
        s.to_f64_vec(&Layout::contiguous(shape.into()))
            .expect("read back")
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
            let want = match f(Device::Cpu) {
                Ok(v) => v,
                Err(e) => return self.failures.push(format!("{name} [{dtype}]: CPU: {e}")),
            };
            let got = match f(self.gpu) {
                Ok(v) => v,
                Err(e) => return self.failures.push(format!("{name} [{dtype}]: CUDA: {e}")),
            };
            if want.iter().all(|&x| x == 0.0) {
                return self
                    .failures
                    .push(format!("{name} [{dtype}]: reference is all zeros"));
            }
            let err = rel_err(&want, &got);
            if err.is_nan() || err > tol(dtype) {
                let first = want.iter().zip(&got).position(|(a, b)| a != b).unwrap_or(0);
                self.failures.push(format!(
                    "{name} [{dtype}]: rel err {err:e} > {:e} (len {}; first diff at {first}: cpu {:?} gpu {:?})",
                    tol(dtype),
                    want.len(),
                    want.get(first),
                    got.get(first)
                ));
            }
        }

        fn finish(self) {
            eprintln!("{} cases, {} failures", self.count, self.failures.len());
            assert!(self.failures.is_empty(), "\n{}", self.failures.join("\n"));
        }
    }

    /// Key masks `[b, s]` as u32 values.
    #[derive(Clone, Copy, Debug)]
    enum Mask {
        None,
        /// Sequence `bi` starts with `bi · s / (b + 1)` padding keys: its first queries see none.
        Left,
        /// About one key in four is padding, at random.
        Random,
    }

    impl Mask {
        fn values(self, b: usize, s: usize) -> Option<Vec<u32>> {
            match self {
                Mask::None => None,
                Mask::Left => Some(
                    (0..b * s)
                        .map(|p| u32::from(p % s >= (p / s) * s / (b + 1)))
                        .collect(),
                ),
                Mask::Random => Some(
                    (0..(b * s) as u64)
                        .map(|i| u32::from(engine::rng::uniform(91, i) >= 0.25))
                        .collect(),
                ),
            }
        }
    }

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
                        let x = Storage::upload_f64(dev, &vals(n, 1, 4.0), dt)?;
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
                        let mut v = vals(b * h * s * t, 2, 3.0); // [b, h, s, t]
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
                        let x =
                            Storage::upload_f64(dev, &vals(x_skip + b * h * t * s, 9, 4.0), dt)?;
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
                            let yv: Vec<f64> = vals(rows * s, 3, 1.0 / s as f64)
                                .into_iter()
                                .map(f64::abs)
                                .collect();
                            let y = Storage::upload_f64(dev, &yv, dt)?;
                            let g = Storage::upload_f64(dev, &vals(rows * s, 4, 1.0), dt)?;
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
                        let y = Storage::upload_f64(dev, &vals(rows * s, 5, 0.01), dt)?;
                        let g = Storage::upload_f64(dev, &vals(rows * s, 6, 1.0), dt)?;
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
                        let y = Storage::upload_f64(dev, &vals(y_skip + rows * s, 7, 0.01), dt)?;
                        let g = Storage::upload_f64(dev, &vals(g_skip + rows * s, 8, 1.0), dt)?;
                        let (yl, gl) = (skipped(l.clone(), y_skip), skipped(l, g_skip));
                        let dx = y.softmax_backward(&yl, &g, &gl, 0.5)?;
                        Ok(read(&dx, [rows, s]))
                    },
                );
            }
        }
        c.finish();
    }

    /// `causal_attention` forward and backward: the output, then dq, dk, dv under a random output
    /// gradient.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        dev: Device,
        dt: DType,
        (b, hq, hkv, t, s, d): (usize, usize, usize, usize, usize, usize),
        off: usize,
        mask: &Option<Vec<u32>>,
        transposed_q: bool,
    ) -> engine::Result<Vec<f64>> {
        let qv = vals(b * hq * t * d, 10, 1.0);
        // The variable, and q as attention sees it: with `transposed_q`, [b, t, hq, d]
        // projections seen as [b, hq, t, d], as the model makes them.
        let (qvar, q) = if transposed_q {
            let var = Tensor::from_f64(&qv, [b, t, hq, d], dt, dev)?.to_var()?;
            let q = var.transpose(1, 2)?;
            (var, q)
        } else {
            let var = Tensor::from_f64(&qv, [b, hq, t, d], dt, dev)?.to_var()?;
            (var.clone(), var)
        };
        let k =
            Tensor::from_f64(&vals(b * hkv * s * d, 11, 1.0), [b, hkv, s, d], dt, dev)?.to_var()?;
        let v =
            Tensor::from_f64(&vals(b * hkv * s * d, 12, 1.0), [b, hkv, s, d], dt, dev)?.to_var()?;
        let m = mask
            .as_ref()
            .map(|m| Tensor::from_vec(m.clone(), [b, s], dev))
            .transpose()?;
        let out = causal_attention(&q, &k, &v, m.as_ref(), off)?;
        let g = Tensor::from_f64(&vals(b * hq * t * d, 13, 1.0), [b, hq, t, d], dt, dev)?;
        out.backward_with_grad(&g)?;
        let mut r = out.to_vec_f64()?;
        for x in [&qvar, &k, &v] {
            r.extend(x.grad().expect("a gradient").to_vec_f64()?);
        }
        Ok(r)
    }

    #[test]
    fn causal_attention_forward_backward_matches_cpu() {
        let Some(mut c) = Checker::new() else { return };
        // ((b, hq, hkv, t, s, d), q_offset, mask, q transposed)
        let cases = [
            ((4, 9, 3, 128, 128, 64), 0, Mask::Left, true), // SmolLM2-135M, left padding
            ((2, 4, 4, 7, 7, 16), 0, Mask::None, false),
            ((1, 4, 2, 255, 255, 32), 0, Mask::Random, false),
            ((1, 4, 2, 257, 257, 32), 0, Mask::None, true),
            ((2, 6, 2, 5, 1000, 16), 995, Mask::Random, false), // decoding after a long cache
            ((2, 2, 1, 64, 2048, 64), 1984, Mask::Left, false),
            ((2, 2, 1, 1, 1, 8), 0, Mask::None, false),
        ];
        for dt in FLOATS {
            for (dims, off, mk, tq) in cases {
                let m = mk.values(dims.0, dims.4);
                c.case(
                    &format!("causal_attention fwd+bwd {dims:?} off {off} {mk:?} q^T {tq}"),
                    dt,
                    |dev| attention(dev, dt, dims, off, &m, tq),
                );
            }
        }
        c.finish();
    }
}

/// Without the `cuda` feature there is nothing to run.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_attention_needs_the_cuda_feature() {
    eprintln!("SKIP: built without the `cuda` feature (run with --features cuda)");
}
