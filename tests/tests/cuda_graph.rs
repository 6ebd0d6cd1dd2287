//! CUDA graphs (`engine::backend::cuda::capture`): a training micro-step of a tiny LLaMA with
//! LoRA attention and a fused MixLoRA FFN (bf16 base, dropout), forward and backward, recorded
//! once and replayed on new token ids, gives bit for bit what running it eagerly on those ids
//! gives (loss, hidden states, every adapter gradient), replay after replay; a host read-back
//! inside a capture fails it and leaves the device usable; uploads inside a capture are replayed
//! with their bytes; a graph's memory goes back to the allocator when the graph and its outputs
//! go; a recorded dropout replayed under a dropout key (`engine::set_dropout_key`) set before
//! the replay draws that key's masks, bit for bit as eagerly, and the key cannot be set inside a
//! capture; graphs recorded in two lanes replay together, each as it runs alone under its lane's
//! key. Skips, saying why, without a GPU.

#[cfg(feature = "cuda")]
mod gpu {
    use engine::backend::cuda::{
        capture, capture_in, replay_together, CudaDevice, CudaGraphExec, GraphMemory,
    };
    use engine::{DType, Device, Tensor};
    use model::adapters::Adapters;
    use model::{AdapterConfig, Llama, MoeImpl, PeftType, RandomInit};
    use testutil::gpu::{device as gpu, serial};
    use testutil::{
        bits, gpu_llama_config, lm_loss_plus_aux, next_token_targets, rand_ids, DropoutKey,
    };

    fn cuda(d: Device) -> CudaDevice {
        match d {
            Device::Cuda(n) => CudaDevice::get(n).unwrap(),
            Device::Cpu => unreachable!("a GPU test"),
        }
    }

    /// `[b, t]` ids, key mask (last 3 positions padding) and next-token targets of `seed`.
    fn batch(b: usize, t: usize, seed: u64) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
        let ids = rand_ids(b * t, 64, seed);
        let mask: Vec<u32> = (0..b * t).map(|j| u32::from(j < b * t - 3)).collect();
        let targets = next_token_targets(&ids, &mask, t);
        (ids, mask, targets)
    }

    /// One micro-step: forward, LM loss plus aux loss, backward. Returns the loss and the
    /// hidden states. The RoPE positions `pos` come from the host (`model::mask_positions`):
    /// the model's own, from the mask on the device, would need a read-back.
    fn micro_step(
        m: &Llama,
        (ids, mask, pos): (&Tensor, &Tensor, &Tensor),
        targets: &Tensor,
    ) -> (Tensor, Tensor) {
        let out = m
            .forward_train_hidden_at(ids, Some(mask), pos, Some(7))
            .unwrap();
        let h = out.hidden.dim(-1).unwrap();
        let rows = out.hidden.reshape([targets.elem_count(), h]).unwrap();
        let loss = lm_loss_plus_aux(m, &rows, out.aux_loss.as_ref(), targets);
        loss.backward().unwrap();
        (loss, out.hidden.detach())
    }

    /// Every parameter's gradient (taken out of its slot), by name.
    fn take_grads(a: &Adapters) -> Vec<(String, Tensor)> {
        a.named_params()
            .into_iter()
            .filter_map(|(n, t)| {
                let g = t.grad();
                t.zero_grad();
                g.map(|g| (n, g))
            })
            .collect()
    }

    #[test]
    fn a_replayed_micro_step_equals_the_eager_one_bit_for_bit() {
        let _lock = serial();
        let Some(d) = gpu() else { return };
        let dev = cuda(d);
        let mut m = Llama::random_with(
            gpu_llama_config(),
            3,
            DType::BF16,
            d,
            RandomInit::frozen_base(),
        )
        .unwrap();
        let cfg = AdapterConfig {
            r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            num_experts: 4,
            router_init_range: 1.0,
            ..AdapterConfig::default_for(PeftType::MixLora)
        };
        let mut a = Adapters::init(&cfg, &m.config, 50, DType::BF16, d).unwrap();
        a.moe_impl = MoeImpl::for_device(d);
        for (k, (name, t)) in a.named_params().into_iter().enumerate() {
            if name.contains("lora_B") {
                let v = Tensor::randn(t.dims().to_vec(), 0.0, 0.1, k as u64, t.dtype(), d).unwrap();
                a.assign_param(&m.config, &name, &v).unwrap();
            }
        }
        m.set_adapters(a.clone()).unwrap();
        let (b, t) = (4, 24);
        let up = |v: Vec<u32>, dims: Vec<usize>| Tensor::from_vec(v, dims, d).unwrap();
        // The graph's inputs: buffers that live as long as the graph and get new data.
        let (i0, k0, t0) = batch(b, t, 1);
        let ids = up(i0, vec![b, t]);
        let mask = up(k0.clone(), vec![b, t]);
        let targets = up(t0, vec![b * t]);
        // Every batch has the same mask (`batch`), so one positions tensor serves them all.
        let pos = up(model::mask_positions(&k0, t), vec![b, t]);
        // Once eagerly first: kernels compiled and loaded, lazy caches made.
        micro_step(&m, (&ids, &mask, &pos), &targets);
        take_grads(&a);
        let (graph, (loss, hidden)) = capture(&dev, || {
            let (loss, hidden) = micro_step(&m, (&ids, &mask, &pos), &targets);
            Ok((loss, hidden))
        })
        .unwrap();
        let grads = take_grads(&a);
        assert!(
            grads.len() > 10,
            "the captured backward reached {} parameters",
            grads.len()
        );
        for seed in [2, 3, 4] {
            let (iv, kv, tv) = batch(b, t, seed);
            let (new_ids, new_mask, new_targets) =
                (up(iv, vec![b, t]), up(kv, vec![b, t]), up(tv, vec![b * t]));
            // Eagerly, on the new batch, twice: the eager step itself gives the same bits (else
            // the comparison below could not be bit for bit).
            let (want_loss, want_hidden) =
                micro_step(&m, (&new_ids, &new_mask, &pos), &new_targets);
            let want_grads = take_grads(&a);
            let (again_loss, _) = micro_step(&m, (&new_ids, &new_mask, &pos), &new_targets);
            let again_grads = take_grads(&a);
            assert_eq!(
                bits(&again_loss),
                bits(&want_loss),
                "eager steps differ: loss"
            );
            for ((n, g), (_, w)) in again_grads.iter().zip(&want_grads) {
                assert_eq!(bits(g), bits(w), "eager steps differ: gradient of {n}");
            }
            // The graph, on the same batch written into its inputs.
            ids.assign(&new_ids).unwrap();
            mask.assign(&new_mask).unwrap();
            targets.assign(&new_targets).unwrap();
            graph.replay().unwrap();
            assert_eq!(bits(&loss), bits(&want_loss), "batch {seed}: loss");
            assert_eq!(
                bits(&hidden),
                bits(&want_hidden),
                "batch {seed}: hidden states"
            );
            assert_eq!(grads.len(), want_grads.len());
            for ((n, g), (wn, w)) in grads.iter().zip(&want_grads) {
                assert_eq!(n, wn);
                assert_eq!(bits(g), bits(w), "batch {seed}: gradient of {n}");
            }
        }
        // The replays did follow the inputs: two batches gave two losses.
        let first = loss.to_vec_f64().unwrap();
        let (iv, kv, tv) = batch(b, t, 9);
        ids.assign(&up(iv, vec![b, t])).unwrap();
        mask.assign(&up(kv, vec![b, t])).unwrap();
        targets.assign(&up(tv, vec![b * t])).unwrap();
        graph.replay().unwrap();
        assert_ne!(first, loss.to_vec_f64().unwrap());
    }

    /// A recorded dropout (`Tensor::dropout` of a bf16 x, then the fused LoRA op with its own
    /// dropout, backward to A and B) replayed under a dropout key set before the replay gives bit
    /// for bit what running it eagerly under that key gives, for two keys, which give two
    /// results; setting the key inside the capture is refused.
    #[test]
    fn a_replay_draws_the_masks_of_the_key_set_before_it() {
        let _lock = serial();
        let Some(d) = gpu() else { return };
        let dev = cuda(d);
        let x = Tensor::randn(vec![64, 128], 0.0, 1.0, 1, DType::BF16, d).unwrap();
        let w = Tensor::randn(vec![96, 128], 0.0, 0.1, 2, DType::BF16, d).unwrap();
        let var = |dims: Vec<usize>, seed| {
            let t = Tensor::randn(dims, 0.0, 0.3, seed, DType::F32, d).unwrap();
            t.to_var().unwrap()
        };
        let (a, b) = (var(vec![8, 128], 3), var(vec![96, 8], 4));
        // h = drop(x) [64, 128]; out = h Wᵀ + 0.8 · drop(h) Aᵀ Bᵀ [64, 96]; backward of Σ out.
        let step = || -> engine::Result<(Tensor, Tensor)> {
            let h = x.dropout(0.2, 11, true)?;
            let out = h
                .matmul(&w.t()?)?
                .lora_add(&h, &a, &b, 0.8, Some((0.1, 13)))?;
            out.sum_all()?.to_dtype(DType::F32)?.backward()?;
            Ok((out, h))
        };
        let take = |t: &Tensor| {
            let g = t.grad().unwrap();
            t.zero_grad();
            g
        };
        // Once eagerly first: kernels compiled and loaded.
        step().unwrap();
        take(&a);
        take(&b);
        let (graph, (refused, (out, h))) = capture(&dev, || {
            let refused = engine::set_dropout_key(d, 1).is_err();
            Ok((refused, step()?))
        })
        .unwrap();
        assert!(refused, "set_dropout_key inside a capture must be refused");
        let (ga, gb) = (take(&a), take(&b));
        let mut replays = Vec::new();
        for key in [0x51_7CC1_B727_220A, 0x94D0_49BB_1331_11EB] {
            let want = {
                let _key = DropoutKey::set(d, key);
                let (out, h) = step().unwrap();
                [bits(&out), bits(&h), bits(&take(&a)), bits(&take(&b))]
            };
            let _key = DropoutKey::set(d, key);
            graph.replay().unwrap();
            let got = [bits(&out), bits(&h), bits(&ga), bits(&gb)];
            for (n, name) in ["out", "h", "dA", "dB"].iter().enumerate() {
                assert_eq!(got[n], want[n], "key {key:#x}: {name}");
            }
            replays.push(got);
        }
        for (n, name) in ["out", "h", "dA", "dB"].iter().enumerate() {
            assert_ne!(replays[0][n], replays[1][n], "two keys, one {name}");
        }
    }

    /// Graphs recorded in two lanes (`engine::set_lane`), each with its own graph memory, on
    /// equal inputs and parameters, replayed together (`replay_together`: two streams at once)
    /// under their lanes' own dropout keys, give bit for bit what each gives run eagerly in its
    /// lane under its key, round after round with new keys, and the two lanes' results differ
    /// (their keys are their own); choosing a lane inside a capture is refused.
    #[test]
    fn graphs_of_two_lanes_replay_together_as_each_runs_alone() {
        let _lock = serial();
        let Some(d) = gpu() else { return };
        let dev = cuda(d);
        let x = Tensor::randn(vec![512, 1024], 0.0, 1.0, 1, DType::BF16, d).unwrap();
        let w = Tensor::randn(vec![1024, 1024], 0.0, 0.05, 2, DType::BF16, d).unwrap();
        let a0 = Tensor::randn(vec![16, 1024], 0.0, 0.1, 3, DType::F32, d).unwrap();
        let b0 = Tensor::randn(vec![1024, 16], 0.0, 0.1, 4, DType::F32, d).unwrap();
        // Each lane trains its own copy of A and B (its gradients are its own buffers).
        let lanes: Vec<(usize, Tensor, Tensor)> = [1, 2]
            .into_iter()
            .map(|l| {
                (
                    l,
                    a0.copy().unwrap().to_var().unwrap(),
                    b0.copy().unwrap().to_var().unwrap(),
                )
            })
            .collect();
        // h = drop(x); out = h Wᵀ + 0.8 · drop(h) Aᵀ Bᵀ; backward of Σ out.
        let step = |a: &Tensor, b: &Tensor| -> engine::Result<(Tensor, Tensor)> {
            let h = x.dropout(0.2, 11, true)?;
            let out = h
                .matmul(&w.t()?)?
                .lora_add(&h, a, b, 0.8, Some((0.1, 13)))?;
            out.sum_all()?.to_dtype(DType::F32)?.backward()?;
            Ok((out, h))
        };
        let take = |t: &Tensor| {
            let g = t.grad().unwrap();
            t.zero_grad();
            g
        };
        // Once eagerly in each lane first: kernels loaded, the lanes' workspaces made.
        for (l, a, b) in &lanes {
            engine::set_lane(d, *l).unwrap();
            step(a, b).unwrap();
            take(a);
            take(b);
        }
        let mut graphs = Vec::new();
        for (l, a, b) in &lanes {
            engine::set_lane(d, *l).unwrap();
            let memory = GraphMemory::new(&dev);
            let (graph, (refused, (out, h))) = capture_in(&dev, &memory, || {
                let refused = engine::set_lane(d, 0).is_err();
                Ok((refused, step(a, b)?))
            })
            .unwrap();
            assert!(refused, "set_lane inside a capture must be refused");
            graphs.push((graph, [out, h, take(a), take(b)]));
        }
        let set_key = |l: usize, key: u64| {
            engine::set_lane(d, l).unwrap();
            engine::set_dropout_key(d, key).unwrap();
        };
        let names = ["out", "h", "dA", "dB"];
        for keys in [
            [0x51_7CC1_B727_220A, 0x94D0_49BB_1331_11EB],
            [7, 0xFFFF_0000_1234],
        ] {
            // Each lane eagerly, under its key.
            let want: Vec<Vec<Vec<u64>>> = (lanes.iter().zip(keys))
                .map(|((l, a, b), key)| {
                    set_key(*l, key);
                    let (out, h) = step(a, b).unwrap();
                    vec![bits(&out), bits(&h), bits(&take(a)), bits(&take(b))]
                })
                .collect();
            for (n, name) in names.iter().enumerate() {
                assert_ne!(want[0][n], want[1][n], "two keys, one {name}");
            }
            for ((l, _, _), key) in lanes.iter().zip(keys) {
                set_key(*l, key);
            }
            engine::set_lane(d, 0).unwrap();
            let together: Vec<&CudaGraphExec> = graphs.iter().map(|(g, _)| g).collect();
            replay_together(&together).unwrap();
            for (k, (_, outs)) in graphs.iter().enumerate() {
                for (n, name) in names.iter().enumerate() {
                    assert_eq!(
                        bits(&outs[n]),
                        want[k][n],
                        "keys {keys:x?}, lane {}: {name}",
                        k + 1
                    );
                }
            }
        }
        for (l, _, _) in &lanes {
            set_key(*l, 0);
        }
        engine::set_lane(d, 0).unwrap();
    }

    #[test]
    fn a_read_back_fails_the_capture_and_the_device_stays_usable() {
        let _lock = serial();
        let Some(d) = gpu() else { return };
        let dev = cuda(d);
        let x = Tensor::randn(vec![8, 8], 0.0, 1.0, 1, DType::F32, d).unwrap();
        x.exp().unwrap();
        let err = capture(&dev, || {
            let y = x.exp()?;
            y.to_vec_f32()?;
            Ok(y)
        })
        .unwrap_err();
        assert!(err.to_string().contains("graph"), "{err}");
        let y = x.exp().unwrap().to_vec_f64().unwrap();
        let want: Vec<f64> = x
            .to_vec_f64()
            .unwrap()
            .iter()
            .map(|v| (*v as f32).exp() as f64)
            .collect();
        assert_eq!(y.len(), want.len());
        for (g, w) in y.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * w.abs(), "{g} vs {w}");
        }
    }

    #[test]
    fn uploads_inside_a_capture_are_replayed_and_memory_goes_back() {
        let _lock = serial();
        let Some(d) = gpu() else { return };
        let dev = cuda(d);
        let x = Tensor::from_vec(vec![10f32, 20.0, 30.0], [3], d).unwrap();
        // The cuBLAS handle and its workspace (made on first use, kept for the process) exist,
        // and the kernels are loaded.
        let w = Tensor::randn(vec![4, 4], 0.0, 1.0, 1, DType::F32, d).unwrap();
        w.matmul(&w).unwrap();
        x.add(&x).unwrap().mul_scalar(2.0).unwrap();
        let (before, _) = engine::memory_stats(d);
        let (graph, y) = capture(&dev, || {
            let c = Tensor::from_vec(vec![1f32, 2.0, 3.0], [3], d)?;
            x.add(&c)?.mul_scalar(2.0)
        })
        .unwrap();
        assert!(graph.pool_bytes() > 0);
        for (k, v) in [[0f32, 0.0, 0.0], [5.0, 6.0, 7.0]].iter().enumerate() {
            x.assign(&Tensor::from_vec(v.to_vec(), [3], d).unwrap())
                .unwrap();
            graph.replay().unwrap();
            let want: Vec<f32> = v
                .iter()
                .zip([1f32, 2.0, 3.0])
                .map(|(a, c)| (a + c) * 2.0)
                .collect();
            assert_eq!(y.to_vec_f32().unwrap(), want, "replay {k}");
        }
        drop(y);
        drop(graph);
        let (after, _) = engine::memory_stats(d);
        assert_eq!(after, before, "the graph's pool went back to the allocator");
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_graphs_need_the_cuda_feature() {
    testutil::skip("built without the `cuda` feature: the CUDA graph tests do not run");
}
