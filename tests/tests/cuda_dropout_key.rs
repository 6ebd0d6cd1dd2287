//! The dropout key on the GPU (`engine::set_dropout_key`): under a nonzero key the GPU draws the
//! masks the CPU draws under the same key (the CPU is the reference), and not its masks of key 0:
//! the `dropout_mask` tensor in every float dtype (f32 bit for bit, bf16 and f64 within their
//! parity tolerances, as tests/tests/ops/dropout.rs), `Tensor::dropout` forward and backward bit
//! for bit in every float dtype, contiguous and transposed; `base + drop(a) + drop(b)` (the
//! one-pass bf16 kernel and its fallback) bit for bit; the fused LoRA ops `lora_add` and
//! `linear_lora` forward and backward (f32, bf16 base: the rank-r, tensor-core and cuBLAS paths;
//! f64) and the fused MixLoRA FFN op forward and backward (f32, bf16 with the tile kernels and
//! with the block GEMMs, f64) within the parity tolerances of tests/tests/fused/ (relative error
//! f32 1e-5, bf16 1e-2, f64 1e-10).
//!
//! A binary of its own: a GPU's key is the device's, so a test setting it would change what any
//! GPU dropout of a test running beside it draws; every test here holds `serial()`. Skips,
//! saying why, without a GPU.

#[cfg(feature = "cuda")]
mod gpu {
    use engine::fused::lora::primitives as prim;
    use engine::fused::Operand;
    use engine::{
        moe_ffn, DType, Device, Layout, MoeDropout, MoeFfnOptions, MoeFusedWeights, MoeKernels,
        MoeRouting, Shape, Storage, Tensor,
    };
    use testutil::gpu::{device as gpu, dropout_output_and_grad, read, rel_err, serial, tol, vals};
    use testutil::DropoutKey;

    const KEY: u64 = 0xC2B2_AE3D_27D4_EB4F;

    /// `f` on the CPU and on `gpu`, each with its dropout key set to [`KEY`] (the CPU's: this
    /// thread's) and back to 0 after.
    fn keyed<T>(gpu: Device, f: impl Fn(Device) -> T) -> (T, T) {
        let cpu = {
            let _key = DropoutKey::set(Device::Cpu, KEY);
            f(Device::Cpu)
        };
        let _key = DropoutKey::set(gpu, KEY);
        (cpu, f(gpu))
    }

    /// Fails with every message of `bad`.
    fn check(bad: Vec<String>) {
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    /// `(name, rel err)` failures of `got` against `want`, output by output, within `tol`.
    fn within(name: &str, want: &[Vec<f64>], got: &[Vec<f64>], tol: f64) -> Vec<String> {
        let mut bad = Vec::new();
        for (i, (w, g)) in want.iter().zip(got).enumerate() {
            let e = rel_err(w, g);
            if e.is_nan() || e > tol {
                bad.push(format!("{name} output {i}: rel err {e:e} > {tol:e}"));
            }
        }
        bad
    }

    #[test]
    fn dropout_masks_and_products_under_a_key_match_the_cpu() {
        let _lock = serial();
        let Some(d) = gpu() else { return };
        for n in [4097usize, 1007, 1] {
            let shape = Shape::from(n);
            for dt in [DType::F32, DType::BF16, DType::F64] {
                let mask = |dev| read(&Storage::dropout_mask(dev, &shape, dt, 0.3, 79).unwrap(), n);
                let (cpu, got) = keyed(d, mask);
                let what = format!("dropout_mask {n} {dt}");
                if dt == DType::F32 {
                    assert_eq!(got, cpu, "{what}: bit for bit");
                } else {
                    let e = rel_err(&cpu, &got);
                    assert!(e <= tol(dt), "{what}: rel err {e:e}");
                }
                if n > 1 {
                    assert_ne!(got, mask(d), "{what}: the key changes the GPU's mask");
                }
            }
        }
        for dt in [DType::F32, DType::BF16, DType::F64] {
            for transposed in [false, true] {
                // (y, dx) of `x.dropout(p, 33)`, x [63, 65] or its transposed view.
                let run = |dev| dropout_output_and_grad(dev, dt, transposed);
                let (cpu, got) = keyed(d, run);
                let what = format!("dropout {dt} transposed {transposed}");
                assert_eq!(got, cpu, "{what}");
                assert_ne!(got, run(d), "{what}: the key changes the GPU's product");
            }
        }
    }

    /// `base + drop(a) + drop(b)` under the key: the GPU's one pass (bf16, a tail of 3) and its
    /// fallback (f32, a transposed bf16 view) give the CPU's separate ops' bits.
    #[test]
    fn add_dropped2_under_a_key_matches_the_cpu() {
        let _lock = serial();
        let Some(d) = gpu() else { return };
        for (dt, r, c, transposed) in [
            (DType::BF16, 61, 67, false),
            (DType::F32, 64, 64, false),
            (DType::BF16, 64, 64, true),
        ] {
            let layout = if transposed {
                Layout::contiguous([c, r]).transpose(0, 1)
            } else {
                Layout::contiguous([r, c])
            };
            let fused = |dev| {
                let s = |seed| Storage::upload_f64(dev, &vals(r * c, seed), dt).unwrap();
                let (base, a, b) = (s(41), s(42), s(43));
                let o = prim::AddDropped2 {
                    base: Operand::new(&base, &layout),
                    a: Operand::new(&a, &layout),
                    b: Operand::new(&b, &layout),
                };
                read(&prim::add_dropped2(o, 0.3, (7, 8)).unwrap(), r * c)
            };
            let separate = |dev| {
                let t = |seed| {
                    let v = Tensor::from_f64(&vals(r * c, seed), [r * c], dt, dev).unwrap();
                    if transposed {
                        v.reshape([c, r]).unwrap().t().unwrap()
                    } else {
                        v.reshape([r, c]).unwrap()
                    }
                };
                let (base, a, b) = (t(41), t(42), t(43));
                let y = base.add(&a.dropout(0.3, 7, true).unwrap()).unwrap();
                y.add(&b.dropout(0.3, 8, true).unwrap())
                    .unwrap()
                    .to_vec_f64()
                    .unwrap()
            };
            let what = format!("add_dropped2 {dt} {r}x{c} transposed {transposed}");
            let (want, got) = keyed(d, fused);
            let (separate_cpu, separate_gpu) = keyed(d, separate);
            assert_eq!(separate_cpu, want, "{what}: CPU, fused = separate ops");
            assert_eq!(got, want, "{what}: GPU, fused");
            assert_eq!(separate_gpu, want, "{what}: GPU, separate ops");
            assert_ne!(got, fused(d), "{what}: the key changes the GPU's result");
        }
    }

    fn adapter(base: DType) -> DType {
        if base == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    }

    /// out, dx, dA, dB of `(x Wᵀ).lora_add(x, A, B)` or (`linear`) `x.linear_lora(W, A, B)` with
    /// dropout (0.1, 77), on `dev`, under its current key.
    fn lora(
        dev: Device,
        base: DType,
        (m, n_in, n_out, r): (usize, usize, usize, usize),
        linear: bool,
    ) -> Vec<Vec<f64>> {
        let ad = adapter(base);
        let t = |n: usize, seed, s: f64, dims: [usize; 2], dt| {
            let v: Vec<f64> = vals(n, seed).iter().map(|v| v * s).collect();
            Tensor::from_f64(&v, dims, dt, dev).unwrap()
        };
        let x = t(m * n_in, 11, 1.0, [m, n_in], base).to_var().unwrap();
        let w = t(n_out * n_in, 12, 0.05, [n_out, n_in], base);
        let a = t(r * n_in, 13, 0.3, [r, n_in], ad).to_var().unwrap();
        let b = t(n_out * r, 14, 0.3, [n_out, r], ad).to_var().unwrap();
        let gout = t(m * n_out, 15, 1.0, [m, n_out], base);
        let drop = Some((0.1, 77));
        let out = if linear {
            x.linear_lora(&w, &a, &b, 0.8, drop).unwrap()
        } else {
            let y = x.matmul(&w.t().unwrap()).unwrap();
            y.lora_add(&x, &a, &b, 0.8, drop).unwrap()
        };
        out.backward_with_grad(&gout).unwrap();
        let g = |v: &Tensor| v.grad().unwrap().to_vec_f64().unwrap();
        vec![out.to_vec_f64().unwrap(), g(&x), g(&a), g(&b)]
    }

    #[test]
    fn fused_lora_under_a_key_matches_the_cpu() {
        let _lock = serial();
        let Some(d) = gpu() else { return };
        let mut bad = Vec::new();
        for base in [DType::F32, DType::BF16, DType::F64] {
            for dims in [(1, 7, 5), (33, 129, 65), (300, 576, 1536)] {
                for r in [8, 16, 80] {
                    for linear in [false, true] {
                        let (m, n_in, n_out) = dims;
                        let what = if linear { "linear_lora" } else { "lora_add" };
                        let name = format!("{what} {base} m {m} in {n_in} out {n_out} r {r}");
                        let case = |dev| lora(dev, base, (m, n_in, n_out, r), linear);
                        let (want, got) = keyed(d, case);
                        bad.extend(within(&name, &want, &got, tol(base)));
                        if m > 1 && got == case(d) {
                            bad.push(format!("{name}: the key changes nothing on the GPU"));
                        }
                    }
                }
            }
        }
        check(bad);
    }

    /// The fused MixLoRA FFN op's output and the gradients of x, the routing weights and the six
    /// adapter tensors (T = 70, H = 64, I = 96, E = 4, k = 2, r = 8; dropout 0.2), on `dev`
    /// under its current key.
    fn moe(dev: Device, base: DType, kernels: MoeKernels) -> Vec<Vec<f64>> {
        let (t, h, i, e, k, r) = (70, 64, 96, 4, 2, 8);
        let ad = adapter(base);
        let up = |dims: &[usize], seed, s: f64, dt| {
            let n = dims.iter().product();
            let v: Vec<f64> = vals(n, seed).iter().map(|v| v * s).collect();
            Tensor::from_f64(&v, dims.to_vec(), dt, dev).unwrap()
        };
        let x = up(&[t, h], 1, 1.0, base).to_var().unwrap();
        let w = up(&[t, k], 2, 0.5, ad).to_var().unwrap();
        let lora = [
            up(&[e, r, h], 3, 0.3, ad),
            up(&[e, i, r], 4, 0.3, ad),
            up(&[e, r, h], 5, 0.3, ad),
            up(&[e, i, r], 6, 0.3, ad),
            up(&[e, r, i], 7, 0.3, ad),
            up(&[e, h, r], 8, 0.3, ad),
        ]
        .map(|v| v.to_var().unwrap());
        let frozen = [
            up(&[i, h], 9, 0.1, base),
            up(&[i, h], 10, 0.1, base),
            up(&[h, i], 11, 0.1, base),
        ];
        let sel: Vec<u32> = (0..t * k).map(|p| ((p / k + p % k) % e) as u32).collect();
        let ids = Tensor::from_slice(&sel, [t, k], dev).unwrap();
        let weights = MoeFusedWeights {
            w_gate: &engine::FrozenWeight::from(frozen[0].clone()),
            w_up: &engine::FrozenWeight::from(frozen[1].clone()),
            w_down: &engine::FrozenWeight::from(frozen[2].clone()),
            a_gate: &lora[0],
            b_gate: &lora[1],
            a_up: &lora[2],
            b_up: &lora[3],
            a_down: &lora[4],
            b_down: &lora[5],
            scale: 1.5,
        };
        let route = MoeRouting {
            ids: &ids,
            weights: &w,
        };
        let opts = MoeFfnOptions {
            kernels,
            chunk_tokens: None,
        };
        let drop = Some(MoeDropout { p: 0.2, seed: 17 });
        let y = moe_ffn(&x, &weights, &route, drop, &opts).unwrap();
        y.backward_with_grad(&up(&[t, h], 12, 1.0, base)).unwrap();
        let g = |v: &Tensor| v.grad().unwrap().to_vec_f64().unwrap();
        let mut out = vec![y.to_vec_f64().unwrap(), g(&x), g(&w)];
        out.extend(lora.iter().map(g));
        out
    }

    #[test]
    fn fused_moe_ffn_under_a_key_matches_the_cpu() {
        let _lock = serial();
        let Some(d) = gpu() else { return };
        let mut bad = Vec::new();
        for (base, kernels) in [
            (DType::F32, MoeKernels::BlockGemms),
            (DType::BF16, MoeKernels::Tiles),
            (DType::BF16, MoeKernels::BlockGemms),
            (DType::F64, MoeKernels::BlockGemms),
        ] {
            let name = format!("moe_ffn {base} {kernels:?}");
            let (want, got) = keyed(d, |dev| moe(dev, base, kernels));
            bad.extend(within(&name, &want, &got, tol(base)));
            if got == moe(d, base, kernels) {
                bad.push(format!("{name}: the key changes nothing on the GPU"));
            }
        }
        check(bad);
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn the_gpu_dropout_key_tests_need_the_cuda_feature() {
    testutil::skip("built without the `cuda` feature: the GPU dropout key tests do not run");
}
