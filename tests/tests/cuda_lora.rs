//! CPU ↔ CUDA parity of the fused LoRA primitives (`lora_codes`, `lora_expand_add`,
//! `lora_grad_codes`, `lora_grad_a`, `lora_grad_x`), of `dropout_matmul` and `matmul_dropout`
//! (against an f64 reference), and of `Tensor::lora_add` and `Tensor::linear_lora` forward and
//! backward, on f32, bf16 (f32 adapter) and f64, r = 8, 16 and 64, with and without dropout (the
//! mask must be the same bits), x contiguous and transposed, sizes that are and are not multiples
//! of the kernels' tiles (16/32 rows, 128/256 columns). The CPU is the reference; relative error
//! ‖gpu − cpu‖ / ‖cpu‖ within f32 1e-5, bf16 1e-2, f64 1e-10; NaN never passes.
//!
//! Without a GPU (or without the `cuda` feature) the tests print why they skip and pass.

#[cfg(feature = "cuda")]
mod gpu {
    use engine::backend::BackendStorage;
    use engine::{DType, Device, Layout, Storage, Tensor};
    use testutil::gpu::{device as gpu, rel_err, tol};

    fn adapter(d: DType) -> DType {
        if d == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    }

    /// Deterministic values in ±[0.1, 2.1) × `s` (never zero).
    fn vals(n: usize, seed: u64, s: f64) -> Vec<f64> {
        (0..n as u64)
            .map(|i| {
                let mag = 0.1 + 2.0 * engine::rng::uniform(seed, i);
                let sign = if engine::rng::uniform(seed ^ 0x5555, i) < 0.5 {
                    -1.0
                } else {
                    1.0
                };
                sign * mag * s
            })
            .collect()
    }

    /// Compares `case(cpu)` with `case(gpu)` output by output; returns the failures.
    fn compare(
        name: &str,
        tol: f64,
        case: &dyn Fn(Device) -> engine::Result<Vec<Vec<f64>>>,
        gpu: Device,
    ) -> Vec<String> {
        let want = match case(Device::Cpu) {
            Ok(v) => v,
            Err(e) => return vec![format!("{name}: CPU failed: {e}")],
        };
        let got = match case(gpu) {
            Ok(v) => v,
            Err(e) => return vec![format!("{name}: CUDA failed: {e}")],
        };
        let mut bad = Vec::new();
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            if w.iter().all(|&v| v == 0.0) && !w.is_empty() {
                bad.push(format!("{name} output {i}: reference is all zeros"));
            }
            let e = rel_err(w, g);
            if e.is_nan() || e > tol {
                bad.push(format!("{name} output {i}: rel err {e:e} > {tol:e}"));
            } else {
                eprintln!("{name} output {i}: rel err {e:.2e}");
            }
        }
        bad
    }

    const SIZES: [(usize, usize, usize); 5] = [
        (1, 7, 5),
        (33, 129, 65),
        (300, 576, 1536),
        (257, 4096, 4113),
        (512, 256, 4096),
    ];

    fn read(s: &Storage, shape: &[usize]) -> engine::Result<Vec<f64>> {
        s.to_f64_vec(&Layout::contiguous(shape.to_vec()))
    }

    /// Every primitive on one device: x `[m, in]` (contiguous or a transposed view), y, g
    /// `[m, out]`, a `[r, in]`, b `[out, r]`, z, dz `[m, r]`.
    #[allow(clippy::type_complexity)]
    fn primitives(
        dev: Device,
        base: DType,
        (m, n_in, n_out, r): (usize, usize, usize, usize),
        p: f64,
        transposed: bool,
    ) -> engine::Result<Vec<Vec<f64>>> {
        let ad = adapter(base);
        let up = |v: &[f64], d: DType| Storage::upload_f64(dev, v, d);
        let x = up(&vals(m * n_in, 1, 1.0), base)?;
        let xl = if transposed {
            Layout::contiguous([n_in, m]).transpose(0, 1)
        } else {
            Layout::contiguous([m, n_in])
        };
        let y = up(&vals(m * n_out, 2, 1.0), base)?;
        let g = up(&vals(m * n_out, 3, 1.0), base)?;
        let a = up(&vals(r * n_in, 4, 0.3), ad)?;
        let b = up(&vals(n_out * r, 5, 0.3), ad)?;
        let zin = up(&vals(m * r, 6, 1.0), ad)?;
        let (yl, al, bl, zl) = (
            Layout::contiguous([m, n_out]),
            Layout::contiguous([r, n_in]),
            Layout::contiguous([n_out, r]),
            Layout::contiguous([m, r]),
        );
        let seed = 1234;
        let z = x.lora_codes(&xl, &a, &al, p, seed)?;
        let out = y.lora_expand_add(&yl, &zin, &zl, &b, &bl, 1.7)?;
        let (dz, db) = g.lora_grad_codes(&yl, &zin, &zl, &b, &bl, 1.7)?;
        let da = x.lora_grad_a(&xl, &zin, &zl, p, seed)?;
        let dx = zin.lora_grad_x(&zl, &a, &al, p, seed, base)?;
        Ok(vec![
            read(&z, &[m, r])?,
            read(&out, &[m, n_out])?,
            read(&dz, &[m, r])?,
            read(&db, &[n_out, r])?,
            read(&da, &[r, n_in])?,
            read(&dx, &[m, n_in])?,
        ])
    }

    #[test]
    fn primitives_match_the_cpu() {
        let Some(dev) = gpu() else { return };
        let mut bad = Vec::new();
        for base in [DType::F32, DType::BF16, DType::F64] {
            for (m, n_in, n_out) in SIZES {
                for r in [8, 16, 64] {
                    if r == 64 && n_in * m > 1 << 20 {
                        continue;
                    }
                    for p in [0.0, 0.25] {
                        for transposed in [false, true] {
                            let name = format!(
                                "primitives {base} m {m} in {n_in} out {n_out} r {r} p {p} \
                                 transposed {transposed}"
                            );
                            bad.extend(compare(
                                &name,
                                tol(base),
                                &|d| primitives(d, base, (m, n_in, n_out, r), p, transposed),
                                dev,
                            ));
                        }
                    }
                }
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    /// The custom kernels of a bf16 base at r = 8 and 16 (cuda/lora_rank.rs) compute in f32 like
    /// the CPU reference, so their codes, dz, dB and dA agree to f32 rounding, far inside the
    /// bf16 tolerance above; `y + s z Bᵀ` and dx are rounded once to bf16 on both sides (a
    /// rounding flip at most). Sizes with several row blocks, partial 128-column chunks and both
    /// dropout settings (4113 output columns take the general path on the output side). Widths
    /// that are multiples of 8 run the tensor-core kernels (cuda/lora_mma.rs; 200 and 72 end in
    /// a partial 32-column step), 196 and 12 the CUDA-core ones.
    #[test]
    fn custom_rank_kernels_match_the_cpu_to_f32_rounding() {
        let Some(dev) = gpu() else { return };
        let mut bad = Vec::new();
        for (m, n_in, n_out) in [
            (300, 576, 1536),
            (257, 4096, 4113),
            (37, 200, 72),
            (5, 196, 12),
        ] {
            for r in [8, 16] {
                for p in [0.0, 0.25] {
                    let name = format!("custom bf16 m {m} in {n_in} r {r} p {p}");
                    let case = |d| primitives(d, DType::BF16, (m, n_in, n_out, r), p, false);
                    let (want, got) = match (case(Device::Cpu), case(dev)) {
                        (Ok(w), Ok(g)) => (w, g),
                        (w, g) => {
                            bad.push(format!("{name}: {:?} / {:?}", w.err(), g.err()));
                            continue;
                        }
                    };
                    // Outputs: z, out, dz, dB, dA, dx.
                    let checks = [
                        (0, "z", 1e-5),
                        (1, "y + s z Bᵀ", 1e-3),
                        (2, "dz", 1e-5),
                        (3, "dB", 1e-5),
                        (4, "dA", 1e-5),
                        (5, "dx", 1e-3),
                    ];
                    for (i, what, tol) in checks {
                        let e = rel_err(&want[i], &got[i]);
                        if e.is_nan() || e > tol {
                            bad.push(format!("{name} {what}: rel err {e:e} > {tol:e}"));
                        }
                    }
                }
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    /// `drop(x) · Aᵀ` and `dzᵀ · drop(x)` (`dropout_matmul` and `matmul_dropout`: the MixLoRA
    /// fused FFN's stacked LoRA-A codes and their gradient) of bf16 operands against an f64
    /// reference of the same dropout (the same mask bits, kept values × 1/(1 − p)) on the exact
    /// bf16 values: the GPU kernels sum those in f32, so they agree to f32 rounding; the CPU
    /// takes the composition, whose product is rounded to bf16 (and agrees to that). 128 codes
    /// (the 7B case), 64 and 136 (partial 128-code blocks), row and column counts that are not
    /// multiples of the tiles (64 rows, 32 or 64 columns), both dropout settings.
    #[test]
    fn dropout_matmul_matches_an_f64_reference() {
        let Some(dev) = gpu() else { return };
        let mut bad = Vec::new();
        for (m, k, n) in [(300, 576, 128), (37, 200, 64), (129, 4096, 136)] {
            for p in [0.0, 0.25] {
                let name = format!("dropout_matmul m {m} k {k} n {n} p {p}");
                let bf16 = |v: Vec<f64>| -> engine::Result<Vec<f64>> {
                    let s = Storage::upload_f64(Device::Cpu, &v, DType::BF16)?;
                    read(&s, &[v.len()])
                };
                let run = |d: Device, dt: DType| -> engine::Result<Vec<Vec<f64>>> {
                    let x = Storage::upload_f64(d, &bf16(vals(m * k, 7, 1.0))?, dt)?;
                    let a = Storage::upload_f64(d, &bf16(vals(n * k, 8, 0.3))?, dt)?;
                    let dz = Storage::upload_f64(d, &bf16(vals(m * n, 9, 1.0))?, dt)?;
                    let xl = Layout::contiguous([1, m, k]);
                    let at = Layout::contiguous([1, n, k]).transpose(1, 2); // Aᵀ [1, k, n]
                    let dzt = Layout::contiguous([1, m, n]).transpose(1, 2); // dzᵀ [1, n, m]
                    let codes = x.dropout_matmul(&xl, &a, &at, p, 31)?;
                    let grad = dz.matmul_dropout(&dzt, &x, &xl, p, 31)?;
                    Ok(vec![read(&codes, &[m, n])?, read(&grad, &[n, k])?])
                };
                let outcome = (|| -> engine::Result<()> {
                    let want = run(Device::Cpu, DType::F64)?;
                    let cpu = run(Device::Cpu, DType::BF16)?;
                    let got = run(dev, DType::BF16)?;
                    for (i, what) in [(0, "drop(x)·Aᵀ"), (1, "dzᵀ·drop(x)")] {
                        for (side, v, bound) in [("gpu", &got[i], 1e-5), ("cpu", &cpu[i], 1e-2)] {
                            let e = rel_err(&want[i], v);
                            if e.is_nan() || e > bound {
                                bad.push(format!(
                                    "{name} {what} {side}: rel err {e:e} > {bound:e}"
                                ));
                            }
                        }
                    }
                    Ok(())
                })();
                if let Err(e) = outcome {
                    bad.push(format!("{name}: {e}"));
                }
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    /// `matmul_cast` of a bf16 `x` `[m, k]` with an f32 `w` `[k, n]` (the MixLoRA router) runs
    /// on the rank primitives: the logits and `dw` in f32 agree with the CPU to f32 rounding,
    /// `dx` (rounded once to bf16 on both sides) within a rounding flip; n = 8 and 16 take the
    /// custom kernels, n = 5 the general path.
    #[test]
    fn matmul_cast_matches_the_cpu() {
        let Some(dev) = gpu() else { return };
        let mut bad = Vec::new();
        for (m, k) in [(300, 576), (257, 4096), (5, 196)] {
            for n in [8, 16, 5] {
                let name = format!("matmul_cast bf16 [{m}, {k}] x f32 [{k}, {n}]");
                let case = |d: Device| -> engine::Result<Vec<Vec<f64>>> {
                    let t = |v: Vec<f64>, s: &[usize], dt: DType| {
                        Tensor::from_f64(&v, s.to_vec(), dt, d)
                    };
                    let x = t(vals(m * k, 21, 1.0), &[m, k], DType::BF16)?.to_var()?;
                    let w = t(vals(n * k, 22, 0.05), &[n, k], DType::F32)?.to_var()?;
                    let y = x.matmul_cast(&w.t()?)?; // [m, n] f32
                    y.backward_with_grad(&t(vals(m * n, 23, 1.0), &[m, n], DType::F32)?)?;
                    let grad = |v: &Tensor| -> engine::Result<Vec<f64>> {
                        v.grad()
                            .ok_or_else(|| engine::Error::invalid("test", "no gradient"))?
                            .to_vec_f64()
                    };
                    Ok(vec![y.to_vec_f64()?, grad(&x)?, grad(&w)?])
                };
                let (want, got) = match (case(Device::Cpu), case(dev)) {
                    (Ok(w), Ok(g)) => (w, g),
                    (w, g) => {
                        bad.push(format!("{name}: {:?} / {:?}", w.err(), g.err()));
                        continue;
                    }
                };
                for (i, what, tol) in [(0, "logits", 1e-5), (1, "dx", 1e-3), (2, "dw", 1e-5)] {
                    let e = rel_err(&want[i], &got[i]);
                    if e.is_nan() || e > tol {
                        bad.push(format!("{name} {what}: rel err {e:e} > {tol:e}"));
                    }
                }
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    /// The op forward and backward: `out = (x Wᵀ).lora_add(x, A, B)`, or (`linear`) `out =
    /// x.linear_lora(W, A, B)` (whose dx adds the LoRA term onto `g W` in one pass), seeded with
    /// `gout`; returns out, dx, dA, dB.
    fn op(
        dev: Device,
        base: DType,
        (m, n_in, n_out, r): (usize, usize, usize, usize),
        dropout: Option<(f64, u64)>,
        linear: bool,
    ) -> engine::Result<Vec<Vec<f64>>> {
        let ad = adapter(base);
        let t = |v: Vec<f64>, s: &[usize], d: DType| Tensor::from_f64(&v, s.to_vec(), d, dev);
        let x = t(vals(m * n_in, 11, 1.0), &[m, n_in], base)?.to_var()?;
        let w = t(vals(n_out * n_in, 12, 0.05), &[n_out, n_in], base)?;
        let a = t(vals(r * n_in, 13, 0.3), &[r, n_in], ad)?.to_var()?;
        let b = t(vals(n_out * r, 14, 0.3), &[n_out, r], ad)?.to_var()?;
        let gout = t(vals(m * n_out, 15, 1.0), &[m, n_out], base)?;
        let out = if linear {
            x.linear_lora(&w, &a, &b, 0.8, dropout)?
        } else {
            x.matmul(&w.t()?)?.lora_add(&x, &a, &b, 0.8, dropout)?
        };
        out.backward_with_grad(&gout)?;
        let grad = |v: &Tensor| -> engine::Result<Vec<f64>> {
            v.grad()
                .ok_or_else(|| engine::Error::invalid("test", "no gradient"))?
                .to_vec_f64()
        };
        Ok(vec![out.to_vec_f64()?, grad(&x)?, grad(&a)?, grad(&b)?])
    }

    #[test]
    fn op_forward_and_backward_match_the_cpu() {
        let Some(dev) = gpu() else { return };
        let mut bad = Vec::new();
        for base in [DType::F32, DType::BF16, DType::F64] {
            for (m, n_in, n_out) in SIZES {
                for r in [8, 16, 80] {
                    for dropout in [None, Some((0.1, 77))] {
                        for linear in [false, true] {
                            let what = if linear { "linear_lora" } else { "lora_add" };
                            let name = format!(
                                "{what} {base} m {m} in {n_in} out {n_out} r {r} dropout {dropout:?}"
                            );
                            bad.extend(compare(
                                &name,
                                tol(base),
                                &|d| op(d, base, (m, n_in, n_out, r), dropout, linear),
                                dev,
                            ));
                        }
                    }
                }
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_lora_skipped() {
    eprintln!("SKIP: built without the `cuda` feature");
}
