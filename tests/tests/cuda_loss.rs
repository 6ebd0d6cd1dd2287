//! CPU ↔ CUDA parity of the full-row cross-entropy primitives (`cross_entropy`,
//! `cross_entropy_backward`): long rows (SmolLM2's vocabulary), strided logits, masked (`−∞`)
//! logits and ignored targets. Relative error ‖gpu − cpu‖ / ‖cpu‖ within f32 1e-5, bf16 1e-2,
//! f64 1e-10; NaN never passes. The chunked linear cross-entropy's parity tests are in
//! tests/tests/fused/linear_cross_entropy.rs. Without a GPU (or the `cuda` feature) the tests
//! print why they skip and pass.

#[cfg(feature = "cuda")]
mod gpu {
    use engine::backend::BackendStorage;
    use engine::{DType, Device, Layout, Storage, IGNORE_INDEX};
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
}

/// Without the `cuda` feature there is nothing to compare.
#[cfg(not(feature = "cuda"))]
#[test]
fn cross_entropy_matches_the_cpu() {
    eprintln!("SKIP: built without the `cuda` feature");
}
