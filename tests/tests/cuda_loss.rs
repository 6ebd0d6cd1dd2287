//! CPU ↔ CUDA parity of the chunked cross-entropy: the two primitives (the online log-sum-exp
//! update of one vocabulary chunk, the fused gradient of one chunk) on contiguous and strided
//! logits, and the whole `Tensor::linear_cross_entropy_rows` forward and backward (dhidden,
//! dweight). Row counts and chunk widths that are and are not multiples of the 256-thread block,
//! chunks that do and do not divide the vocabulary, ignored targets. Relative error
//! ‖gpu − cpu‖ / ‖cpu‖ within f32 1e-5, bf16 1e-2, f64 1e-10; NaN never passes. Without a GPU
//! (or the `cuda` feature) the tests print why they skip and pass.

#[cfg(feature = "cuda")]
mod gpu {
    use engine::backend::BackendStorage;
    use engine::{DType, Device, Layout, Storage, Tensor, IGNORE_INDEX};
    use testutil::gpu::{device as gpu, rel_err, tol};

    const FLOATS: [DType; 3] = [DType::F32, DType::BF16, DType::F64];

    fn acc(d: DType) -> DType {
        if d == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    }

    /// Values in ±[0.1, 2.1)·scale (never zero), from `seed`.
    fn vals(n: usize, seed: u64, scale: f64) -> Vec<f64> {
        (0..n as u64)
            .map(|i| {
                let mag = (0.1 + 2.0 * engine::rng::uniform(seed, i)) * scale;
                if engine::rng::uniform(seed ^ 0x5555, i) < 0.5 {
                    -mag
                } else {
                    mag
                }
            })
            .collect()
    }

    /// Targets below `v`, every fifth one ignored.
    fn targets(n: usize, v: usize, seed: u64) -> Vec<u32> {
        (0..n as u64)
            .map(|i| {
                if i % 5 == 2 {
                    IGNORE_INDEX
                } else {
                    (engine::rng::hash(seed, i) % v as u64) as u32
                }
            })
            .collect()
    }

    struct Checker {
        gpu: Device,
        failures: Vec<String>,
        count: usize,
    }

    impl Checker {
        fn case(
            &mut self,
            name: &str,
            dtype: DType,
            f: impl Fn(Device) -> engine::Result<Vec<f64>>,
        ) {
            self.count += 1;
            let (want, got) = match (f(Device::Cpu), f(self.gpu)) {
                (Ok(w), Ok(g)) => (w, g),
                (Err(e), _) => return self.failures.push(format!("{name} [{dtype}]: CPU: {e}")),
                (_, Err(e)) => return self.failures.push(format!("{name} [{dtype}]: CUDA: {e}")),
            };
            if want.iter().all(|&x| x == 0.0) {
                return self
                    .failures
                    .push(format!("{name} [{dtype}]: the reference is all zeros"));
            }
            let e = rel_err(&want, &got);
            if e.is_nan() || e > tol(dtype) {
                self.failures.push(format!(
                    "{name} [{dtype}]: rel err {e:e} > {:e}",
                    tol(dtype)
                ));
            }
        }
        fn finish(self) {
            eprintln!("{} cases, {} failures", self.count, self.failures.len());
            assert!(self.failures.is_empty(), "\n{}", self.failures.join("\n"));
        }
    }

    /// The state `[n, 3]` after folding in every chunk of the logits `[n, v]`, read either
    /// row-major or through a transposed buffer `[v, n]`.
    fn chunk_update_case(
        dev: Device,
        dt: DType,
        (n, v, c): (usize, usize, usize),
        transposed: bool,
    ) -> engine::Result<Vec<f64>> {
        let x = Storage::upload_f64(dev, &vals(n * v, 1, 3.0), dt)?;
        let full = if transposed {
            Layout::contiguous([v, n]).transpose(0, 1)
        } else {
            Layout::contiguous([n, v])
        };
        let init: Vec<f64> = (0..n).flat_map(|_| [f64::NEG_INFINITY, 0.0, 0.0]).collect();
        let mut st = Storage::upload_f64(dev, &init, acc(dt))?;
        let tl = Layout::contiguous([n]);
        let ts = Storage::from_cpu(dev, engine::backend::cpu::CpuStorage::U32(targets(n, v, 2)))?;
        for v0 in (0..v).step_by(c) {
            let l = full.narrow(1, v0, c.min(v - v0));
            x.cross_entropy_chunk_update(&l, &ts, &tl, &mut st, v0, v, IGNORE_INDEX)?;
        }
        st.to_f64_vec(&Layout::contiguous([n, 3]))
    }

    /// The gradient of one chunk `[n, c]` at columns `v0..`.
    fn chunk_backward_case(
        dev: Device,
        dt: DType,
        (n, v, v0, c): (usize, usize, usize, usize),
    ) -> engine::Result<Vec<f64>> {
        let x = Storage::upload_f64(dev, &vals(n * v, 3, 3.0), dt)?;
        let l = Layout::contiguous([n, v]).narrow(1, v0, c);
        let ts = Storage::from_cpu(dev, engine::backend::cpu::CpuStorage::U32(targets(n, v, 4)))?;
        let tl = Layout::contiguous([n]);
        // A log-sum-exp-like shift per row (anything finite works) and random row gradients.
        let lse: Vec<f64> = vals(n, 5, 1.0).iter().map(|x| x + 6.0).collect();
        let lse = Storage::upload_f64(dev, &lse, acc(dt))?;
        let g = Storage::upload_f64(dev, &vals(n, 6, 1.0), acc(dt))?;
        let dx =
            x.cross_entropy_chunk_backward(&l, &ts, &tl, &lse, &tl, &g, &tl, v0, IGNORE_INDEX)?;
        dx.to_f64_vec(&Layout::contiguous([n, c]))
    }

    #[test]
    fn chunk_primitives_match_the_cpu() {
        let Some(gpu) = gpu() else { return };
        let mut ck = Checker {
            gpu,
            failures: Vec::new(),
            count: 0,
        };
        for dt in FLOATS {
            for (n, v, c) in [
                (5, 1000, 256),
                (257, 1000, 300),
                (64, 4097, 4097),
                (3, 70, 1),
            ] {
                for tr in [false, true] {
                    ck.case(
                        &format!("chunk_update n={n} v={v} c={c} transposed={tr}"),
                        dt,
                        |d| chunk_update_case(d, dt, (n, v, c), tr),
                    );
                }
            }
            for (n, v, v0, c) in [
                (7, 1000, 0, 256),
                (129, 1000, 700, 300),
                (33, 513, 256, 257),
            ] {
                ck.case(
                    &format!("chunk_backward n={n} v={v} v0={v0} c={c}"),
                    dt,
                    |d| chunk_backward_case(d, dt, (n, v, v0, c)),
                );
            }
        }
        ck.finish();
    }

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
        let t = targets(n, v, 12);
        let mut x = vals(n * v, 11, 4.0);
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
        let g = Storage::upload_f64(dev, &vals(n, 13, 1.0), acc(dt))?;
        xs.cross_entropy_backward(&l, &ts, &tl, &g, &tl, IGNORE_INDEX)?
            .to_f64_vec(&Layout::contiguous([n, v]))
    }

    #[test]
    fn row_kernels_match_the_cpu_on_long_rows_with_masked_logits() {
        let Some(gpu) = gpu() else { return };
        let mut ck = Checker {
            gpu,
            failures: Vec::new(),
            count: 0,
        };
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

    /// Loss rows, dhidden and dweight of `linear_cross_entropy_rows` on `dev`.
    fn linear_case(
        dev: Device,
        dt: DType,
        (n, h, v, chunk): (usize, usize, usize, usize),
    ) -> engine::Result<Vec<f64>> {
        let hid = Tensor::from_f64(&vals(n * h, 7, 1.0), [n, h], dt, dev)?.to_var()?;
        let w = Tensor::from_f64(&vals(v * h, 8, 0.3), [v, h], dt, dev)?.to_var()?;
        let t = Tensor::from_vec(targets(n, v, 9), n, dev)?;
        let rows = hid.linear_cross_entropy_rows(&w, &t, IGNORE_INDEX, chunk)?;
        let r = Tensor::from_f64(&vals(n, 10, 1.0), n, rows.dtype(), dev)?;
        rows.mul(&r)?.sum_all()?.backward()?;
        let mut out = rows.to_vec_f64()?;
        for g in [hid.grad(), w.grad()].into_iter().flatten() {
            out.extend(g.to_vec_f64()?);
        }
        Ok(out)
    }

    #[test]
    fn linear_cross_entropy_matches_the_cpu() {
        let Some(gpu) = gpu() else { return };
        let mut ck = Checker {
            gpu,
            failures: Vec::new(),
            count: 0,
        };
        for dt in FLOATS {
            for shape in [(9, 16, 100, 32), (256, 64, 1000, 256), (257, 48, 1031, 300)] {
                ck.case(&format!("linear_cross_entropy {shape:?}"), dt, |d| {
                    linear_case(d, dt, shape)
                });
            }
        }
        ck.finish();
    }
}

/// Without the `cuda` feature there is nothing to compare.
#[cfg(not(feature = "cuda"))]
#[test]
fn chunked_cross_entropy_matches_the_cpu() {
    eprintln!("SKIP: built without the `cuda` feature");
}
