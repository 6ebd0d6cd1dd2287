//! What belongs to no single op: tensors moving between devices (a transposed view travels as a
//! contiguous copy; the gradient of a loss computed on the GPU reaches a CPU variable, within
//! 1e-6), the GPU allocator's statistics, cache reuse and typed out-of-memory error, mixing
//! devices as an error, the clear error without a GPU (which suggests `--device cpu`), and a
//! small training step over many ops (embedding, RMSNorm, matmuls, SiLU, softmax,
//! cross-entropy): its loss and every gradient on the GPU against the CPU (relative error within
//! f32 1e-5, bf16 1e-2, f64 1e-10; NaN never passes).

/// Without a usable GPU, asking for one is a clear error that suggests the CPU.
#[test]
fn missing_gpu_is_a_clear_error() {
    use engine::{DType, Device, Tensor};
    testutil::gpu::configure();
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

#[cfg(feature = "cuda")]
mod gpu {
    //! On the GPU (skipped, saying why, without one).
    use engine::backend::cuda::{memory_stats, reset_peak_memory};
    use engine::{DType, Device, Error, Tensor};
    use testutil::gpu::{
        device as gpu, pos, rel_err_matching_nonfinite as rel_err, serial, vals, Checker, FLOATS,
    };

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

    /// `Tensor::write_slice` on the GPU: into a view inside a larger buffer (the elements
    /// around it stay), small (through the staging ring) and large (a direct copy), in every
    /// dtype; stream-ordered, so a kernel queued before the write reads the old values.
    #[test]
    fn write_slice_in_place_and_in_stream_order() {
        let _serial = serial();
        let Some(gpu) = gpu() else { return };
        for n in [5usize, 3 << 20] {
            let (old, new) = (vals(n + 8, 81), vals(n, 82));
            for dt in [DType::F32, DType::BF16, DType::F64] {
                let buf = Tensor::from_f64(&old, n + 8, dt, gpu).unwrap();
                let view = buf.narrow(0, 3, n).unwrap();
                let twice_before = view.add(&view).unwrap(); // queued before the write
                let want: Vec<f64> = match dt {
                    DType::F32 => {
                        let w: Vec<f32> = new.iter().map(|&v| v as f32).collect();
                        view.write_slice(&w).unwrap();
                        w.iter().map(|&v| v as f64).collect()
                    }
                    DType::F64 => {
                        view.write_slice(&new).unwrap();
                        new.clone()
                    }
                    _ => {
                        let w: Vec<half::bf16> =
                            new.iter().map(|&v| half::bf16::from_f64(v)).collect();
                        view.write_slice(&w).unwrap();
                        w.iter().map(|v| v.to_f64()).collect()
                    }
                };
                let got = buf.to_vec_f64().unwrap();
                assert_eq!(&got[3..3 + n], &want[..], "{dt} n={n}");
                let old_dt = Tensor::from_f64(&old, n + 8, dt, Device::Cpu)
                    .unwrap()
                    .to_vec_f64()
                    .unwrap();
                assert_eq!(&got[..3], &old_dt[..3], "{dt} n={n}: before the view");
                assert_eq!(
                    &got[3 + n..],
                    &old_dt[3 + n..],
                    "{dt} n={n}: after the view"
                );
                let twice: Vec<f64> = old_dt[3..3 + n].iter().map(|v| v + v).collect();
                let tb = twice_before
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec_f64()
                    .unwrap();
                assert_eq!(
                    tb, twice,
                    "{dt} n={n}: the earlier kernel saw the new values"
                );
            }
            let ids: Vec<u32> = (0..n as u32).map(|i| i.wrapping_mul(2654435761)).collect();
            let t = Tensor::zeros(n, DType::U32, gpu).unwrap();
            t.write_slice(&ids).unwrap();
            assert_eq!(t.to_vec_u32().unwrap(), ids, "u32 n={n}");
        }
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
