//! CPU ↔ CUDA parity of the fused multi-tensor AdamW step (`engine::adamw_step`, one kernel launch
//! for all tensors on the GPU): 60 parameters of assorted sizes (1, around the 256-thread block,
//! around the 4096-element chunk, 100003) in f32, bf16 and f64 together in one call, plus one
//! parameter without a gradient and four that are views of one buffer (one of them without a
//! gradient), after 3 steps with weight decay and a clipping scale. Parameters
//! and both moments are compared by relative error: f32 1e-5, bf16 1e-2, f64 1e-12 (the kernel
//! uses the CPU's operations in the same order without contraction, so it is expected to be
//! exact). Also the multi-tensor sum of squares (`engine::sum_of_squares`, the gradient norm: one
//! launch for all tensors) against the CPU (1e-12: both accumulate in f64, in different orders
//! within a chunk) and, on the CPU, against a plain f64 sum. Without a GPU (or the `cuda`
//! feature) the GPU tests print why they skip and pass.

#[cfg(feature = "cuda")]
mod gpu {
    use engine::{adamw_step, AdamWHyper, DType, Device, Tensor};
    use testutil::gpu::{device as gpu, rel_err};

    const SIZES: [usize; 20] = [
        1, 2, 31, 32, 33, 255, 256, 257, 511, 513, 1000, 4095, 4096, 4097, 8191, 8193, 12345,
        65536, 70001, 100003,
    ];

    /// Values in ±[lo, lo + 2) (never zero), from `seed`.
    fn vals(n: usize, seed: u64, lo: f64) -> Vec<f64> {
        (0..n as u64)
            .map(|i| {
                let mag = lo + 2.0 * engine::rng::uniform(seed, i);
                if engine::rng::uniform(seed ^ 0x5555, i) < 0.5 {
                    -mag
                } else {
                    mag
                }
            })
            .collect()
    }

    fn tol(d: DType) -> f64 {
        match d {
            DType::F32 => 1e-5,
            DType::BF16 => 1e-2,
            _ => 1e-12,
        }
    }

    /// (dtype, parameter, m, v) of one tensor.
    type State = (DType, Vec<f64>, Vec<f64>, Vec<f64>);

    /// The state of every tensor after 3 steps on `dev`.
    fn run(dev: Device) -> Vec<State> {
        let mut ps = Vec::new();
        let mut dts = Vec::new();
        for (di, dt) in [DType::F32, DType::BF16, DType::F64]
            .into_iter()
            .enumerate()
        {
            for (i, &n) in SIZES.iter().enumerate() {
                let seed = (di * 100 + i) as u64;
                let p = Tensor::from_f64(&vals(n, seed, 0.1), n, dt, dev)
                    .unwrap()
                    .to_var()
                    .unwrap();
                ps.push(p);
                dts.push(dt);
            }
        }
        // One parameter that never gets a gradient.
        let frozen = Tensor::from_f64(&vals(300, 999, 0.1), 300, DType::F32, dev)
            .unwrap()
            .to_var()
            .unwrap();
        ps.insert(7, frozen);
        dts.insert(7, DType::F32);
        // Four parameters that are the slices of one buffer (a MixLoRA layer's stacked expert
        // LoRAs, updated in place in it); the third never gets a gradient either.
        let stacked = Tensor::from_f64(&vals(4 * 4097, 777, 0.1), [4, 4097], DType::F32, dev)
            .unwrap()
            .unstack_leaves()
            .unwrap();
        let no_grad_view = ps.len() + 2;
        dts.extend([DType::F32; 4]);
        ps.extend(stacked);
        let zeros =
            |p: &Tensor| Tensor::zeros(p.shape().clone(), p.dtype().accumulation(), dev).unwrap();
        let ms: Vec<Tensor> = ps.iter().map(zeros).collect();
        let vs: Vec<Tensor> = ps.iter().map(zeros).collect();
        for step in 1..=3u64 {
            for (i, p) in ps.iter().enumerate() {
                p.zero_grad();
                if i == 7 || i == no_grad_view {
                    continue;
                }
                let g = vals(p.elem_count(), 10_000 * step + i as u64, 0.01);
                let g = Tensor::from_f64(&g, p.shape().clone(), p.dtype(), dev).unwrap();
                // backward of Σ p ⊙ g sets the gradient to g.
                p.mul(&g).unwrap().sum_all().unwrap().backward().unwrap();
            }
            let h = AdamWHyper {
                lr: 3e-3 * step as f64,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                grad_scale: [1.0, 0.42, 1.7][step as usize - 1],
                step,
            };
            adamw_step(&ps, &ms, &vs, &h).unwrap();
        }
        ps.iter()
            .zip(&ms)
            .zip(&vs)
            .zip(dts)
            .map(|(((p, m), v), d)| {
                (
                    d,
                    p.to_vec_f64().unwrap(),
                    m.to_vec_f64().unwrap(),
                    v.to_vec_f64().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn adamw_step_matches_the_cpu() {
        let Some(dev) = gpu() else { return };
        let (want, got) = (run(Device::Cpu), run(dev));
        let mut failures = Vec::new();
        let mut exact = 0;
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            let dt = w.0;
            for (what, a, b) in [
                ("param", &w.1, &g.1),
                ("exp_avg", &w.2, &g.2),
                ("exp_avg_sq", &w.3, &g.3),
            ] {
                let e = rel_err(a, b);
                if e.is_nan() || e > tol(dt) {
                    failures.push(format!(
                        "tensor {i} ({dt}, {} elements) {what}: rel err {e:e} > {:e}",
                        a.len(),
                        tol(dt)
                    ));
                }
                exact += (a == b) as usize;
            }
        }
        // The parameter without gradient is untouched on both.
        assert_eq!(
            got[7].1,
            vals(300, 999, 0.1)
                .iter()
                .map(|&x| x as f32 as f64)
                .collect::<Vec<_>>()
        );
        assert!(got[7].2.iter().all(|&x| x == 0.0));
        // So is the view without a gradient (the third of the last four).
        let view = &got[got.len() - 2];
        assert_eq!(view.1, want[want.len() - 2].1);
        assert!(view.2.iter().all(|&x| x == 0.0));
        eprintln!("{} tensors × 3 buffers, {exact} bit-identical", want.len());
        assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    }

    #[test]
    fn sum_of_squares_matches_the_cpu() {
        let Some(dev) = gpu() else { return };
        let run = |dev: Device| {
            let mut ts = Vec::new();
            for (di, dt) in [DType::F32, DType::BF16, DType::F64]
                .into_iter()
                .enumerate()
            {
                for (i, &n) in SIZES.iter().enumerate() {
                    let v = vals(n, (di * 100 + i) as u64, 0.1);
                    ts.push(Tensor::from_f64(&v, n, dt, dev).unwrap());
                }
            }
            // A transposed (non-contiguous) view.
            let m = Tensor::from_f64(&vals(77 * 130, 5, 0.1), [77, 130], DType::F32, dev).unwrap();
            ts.push(m.t().unwrap());
            let refs: Vec<&Tensor> = ts.iter().collect();
            engine::sum_of_squares(&refs).unwrap()
        };
        let (want, got) = (run(Device::Cpu), run(dev));
        let err = (got - want).abs() / want;
        eprintln!("sum of squares: cpu {want}, gpu {got}, rel err {err:e}");
        assert!(err <= 1e-12, "rel err {err:e}");
    }
}

/// `engine::sum_of_squares` on the CPU against a plain f64 sum: f32, bf16 and f64 tensors, sizes
/// across the 4096-element chunk, a strided view; nothing gives 0; u32 is refused.
#[test]
fn sum_of_squares_on_the_cpu() {
    use engine::{DType, Device, Tensor};
    let mut ts = Vec::new();
    let mut want = 0.0f64;
    for (k, dt) in [DType::F32, DType::BF16, DType::F64]
        .into_iter()
        .enumerate()
    {
        for (i, n) in [1usize, 4095, 4096, 4097, 20000].into_iter().enumerate() {
            let v: Vec<f64> = (0..n)
                .map(|j| engine::rng::uniform((k * 10 + i) as u64, j as u64) * 2.0 - 1.0)
                .collect();
            let t = Tensor::from_f64(&v, n, dt, Device::Cpu).unwrap();
            want += t.to_vec_f64().unwrap().iter().map(|x| x * x).sum::<f64>();
            ts.push(t);
        }
    }
    let m = Tensor::from_f64(
        &[1.0, -2.0, 3.0, 4.0, 5.0, -6.0],
        [2, 3],
        DType::F32,
        Device::Cpu,
    )
    .unwrap();
    ts.push(m.t().unwrap().narrow(0, 1, 2).unwrap()); // [-2, 5, 3, -6]
    want += 4.0 + 25.0 + 9.0 + 36.0;
    let refs: Vec<&Tensor> = ts.iter().collect();
    let got = engine::sum_of_squares(&refs).unwrap();
    assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
    assert_eq!(engine::sum_of_squares(&[]).unwrap(), 0.0);
    let u = Tensor::from_vec(vec![1u32, 2], 2, Device::Cpu).unwrap();
    assert!(engine::sum_of_squares(&[&u]).is_err());
}

/// Without the `cuda` feature there is nothing to compare.
#[cfg(not(feature = "cuda"))]
#[test]
fn adamw_step_matches_the_cpu() {
    eprintln!("SKIP: built without the `cuda` feature");
}
