//! The MoE primitives on the CPU (the reference of the CUDA kernels): each against a
//! straightforward reference built from plain ops or loops, on random inputs (experts with no
//! token, N not a multiple of anything, k = 1 and 2, E = 8, ties); their gradients by f64 finite
//! differences; and `MoeImpl::Grouped` against `MoeImpl::Naive` (output and every gradient) in
//! f64 and f32 at several sizes.

use engine::{DType, Device, Error, Tensor};
use model::adapters::{ExpertLora, LoraLinear, MixLoraFfn, MoeImpl, Router, Routing, SharedFfn};
use testutil::{check_gradients, ids, randn, rel_err};

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
}

/// Pseudo-random ids in `0..size`, seeded.
fn rand_ids(n: usize, size: u32, seed: u64) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((engine::rng::uniform(seed, i) * size as f64) as u32).min(size - 1))
        .collect()
}

/// `k` distinct experts per token drawn from `pool` (so experts outside it get no token).
fn rand_choices(n: usize, k: usize, pool: &[u32], seed: u64) -> Vec<u32> {
    let mut out = Vec::with_capacity(n * k);
    for t in 0..n {
        let mut row: Vec<u32> = Vec::new();
        let mut i = 0u64;
        while row.len() < k {
            let c = pool[rand_ids(1, pool.len() as u32, seed ^ ((t as u64) << 16) ^ i)[0] as usize];
            if !row.contains(&c) {
                row.push(c);
            }
            i += 1;
        }
        out.extend(row);
    }
    out
}

/// The router of before the fused kernel: softmax, top-k on the probabilities, renormalise.
fn route_reference(logits: &Tensor, k: usize) -> (Vec<f64>, Vec<u32>, Vec<f64>) {
    let p = logits.softmax_last_dim().unwrap();
    let (vals, idx) = p.topk(k).unwrap();
    let w = vals.div(&vals.sum_keepdim(1).unwrap()).unwrap();
    (f64s(&p), idx.to_vec_u32().unwrap(), f64s(&w))
}

#[test]
fn route_topk_matches_softmax_topk_renormalise() {
    for dtype in [DType::F64, DType::F32] {
        for (n, k) in [(13, 1), (13, 2), (37, 2), (5, 8)] {
            let logits = randn(&[n, 8], 7 + n as u64).to_dtype(dtype).unwrap();
            let (p, i, w) = logits.moe_route_topk(k).unwrap();
            assert_eq!(p.dtype(), dtype);
            assert_eq!(w.dtype(), dtype);
            assert_eq!(
                (p.dims(), i.dims(), w.dims()),
                (&[n, 8][..], &[n, k][..], &[n, k][..])
            );
            let (rp, ri, rw) = route_reference(&logits, k);
            let tol = if dtype == DType::F64 { 1e-14 } else { 1e-6 };
            assert!(rel_err(&f64s(&p), &rp) < tol, "{dtype} n={n} k={k} probs");
            assert_eq!(i.to_vec_u32().unwrap(), ri, "{dtype} n={n} k={k} ids");
            assert!(rel_err(&f64s(&w), &rw) < tol, "{dtype} n={n} k={k} weights");
        }
    }
}

#[test]
fn route_topk_ties_keep_the_lower_index_first() {
    // Row 0: all equal; row 1: a tie for second place; row 2: a tie for first place.
    let l = [
        0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, //
        1.0, 2.0, 0.0, 2.0, -1.0, 3.0, 0.0, 2.0, //
        4.0, 0.0, 4.0, 1.0, 1.0, 0.0, 0.0, 0.0,
    ];
    let logits = Tensor::from_f64(&l, [3, 8], DType::F64, Device::Cpu).unwrap();
    for k in [1, 2, 3] {
        let (_, i, w) = logits.moe_route_topk(k).unwrap();
        let (_, ri, rw) = route_reference(&logits, k);
        assert_eq!(i.to_vec_u32().unwrap(), ri, "k={k}");
        assert!(rel_err(&f64s(&w), &rw) < 1e-15);
    }
    let (_, i, _) = logits.moe_route_topk(3).unwrap();
    assert_eq!(i.to_vec_u32().unwrap(), vec![0, 1, 2, 5, 1, 3, 0, 2, 3]);
}

#[test]
fn route_topk_errors() {
    let logits = randn(&[4, 8], 1);
    assert!(matches!(
        logits.moe_route_topk(0),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        logits.moe_route_topk(9),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        randn(&[8], 1).moe_route_topk(1),
        Err(Error::RankMismatch { .. })
    ));
}

#[test]
fn grad_route_topk_probs_and_weights() {
    for k in [1, 2, 3] {
        let logits = randn(&[9, 8], 20 + k as u64);
        check_gradients("moe_route_topk probs", &[logits.clone()], |v| {
            Ok(v[0].moe_route_topk(k)?.0)
        });
        check_gradients("moe_route_topk weights", &[logits.clone()], |v| {
            Ok(v[0].moe_route_topk(k)?.2)
        });
        // Both outputs in one loss: the tape sums the two logits gradients.
        check_gradients("moe_route_topk both", &[logits.clone()], |v| {
            let (p, _, w) = v[0].moe_route_topk(k)?;
            engine::cat(&[&p.flatten_all()?, &w.flatten_all()?], 0)
        });
    }
}

/// Stable sort of the slots by expert, and the offsets, by hand.
fn group_reference(ids: &[u32], e: usize) -> (Vec<u32>, Vec<u32>) {
    let mut perm: Vec<u32> = (0..ids.len() as u32).collect();
    perm.sort_by_key(|&p| (ids[p as usize].min(e as u32), p));
    let offsets = (0..=e)
        .map(|x| ids.iter().filter(|&&i| (i as usize) < x).count() as u32)
        .collect();
    (perm, offsets)
}

#[test]
fn group_is_a_stable_sort_by_expert() {
    for (n, k, pool) in [
        (13, 1, vec![0, 1, 2, 3, 4, 5, 6, 7]),
        (13, 2, vec![1, 3, 4, 6]), // experts 0, 2, 5, 7 get no token
        (300, 2, vec![0, 1, 2, 3, 4, 5, 6, 7]),
        (1, 2, vec![7, 2]),
        (257, 1, vec![5]),
    ] {
        let v = rand_choices(n, k, &pool, 3 + n as u64);
        let (perm, off) = ids(&v, &[n, k]).moe_group(8).unwrap();
        let (rp, ro) = group_reference(&v, 8);
        assert_eq!(perm.to_vec_u32().unwrap(), rp, "n={n} k={k}");
        assert_eq!(off.to_vec_u32().unwrap(), ro, "n={n} k={k}");
        assert_eq!(off.dims(), [9]);
        let inv = perm.moe_invert_perm().unwrap().to_vec_u32().unwrap();
        for (q, &p) in rp.iter().enumerate() {
            assert_eq!(inv[p as usize], q as u32);
        }
    }
}

#[test]
fn group_puts_out_of_range_ids_last() {
    let v = [3, 9, 0, 8, 3, 1];
    let (perm, off) = ids(&v, &[3, 2]).moe_group(4).unwrap();
    assert_eq!(perm.to_vec_u32().unwrap(), vec![2, 5, 0, 4, 1, 3]);
    assert_eq!(off.to_vec_u32().unwrap(), vec![0, 1, 2, 2, 4]);
    let (perm, off) = ids(&[], &[0, 2]).moe_group(4).unwrap();
    assert_eq!(perm.dims(), [0]);
    assert_eq!(off.to_vec_u32().unwrap(), vec![0; 5]);
}

#[test]
fn permute_and_combine_match_index_ops() {
    for dtype in [DType::F64, DType::F32, DType::BF16] {
        for (n, k, h) in [(13, 2, 5), (7, 1, 3), (40, 2, 33)] {
            let v = rand_choices(n, k, &[0, 2, 3, 6, 7], 9 + n as u64);
            let (perm, _) = ids(&v, &[n, k]).moe_group(8).unwrap();
            let pv = perm.to_vec_u32().unwrap();
            let x = randn(&[n, h], 4).to_dtype(dtype).unwrap();
            let xs = x.moe_permute(&perm, k).unwrap();
            let tok: Vec<u32> = pv.iter().map(|&p| p / k as u32).collect();
            let want = x.index_select(&ids(&tok, &[n * k]), 0).unwrap();
            assert_eq!(f64s(&xs), f64s(&want), "{dtype} permute");
            // combine: out[t] = Σ_j w[t, j] y[pos(t·k + j)].
            let y = randn(&[n * k, h], 5).to_dtype(dtype).unwrap();
            let w = randn(&[n, k], 6);
            let out = y.moe_combine(&perm, &w).unwrap();
            assert_eq!(out.dtype(), dtype);
            let (yv, wv) = (f64s(&y), f64s(&w));
            let mut want = vec![0.0; n * h];
            for (q, &p) in pv.iter().enumerate() {
                let t = p as usize / k;
                for c in 0..h {
                    want[t * h + c] += wv[p as usize] * yv[q * h + c];
                }
            }
            let tol = match dtype {
                DType::F64 => 1e-14,
                DType::F32 => 1e-6,
                _ => 1e-2,
            };
            assert!(rel_err(&f64s(&out), &want) < tol, "{dtype} combine");
        }
    }
}

#[test]
fn grad_permute_and_combine() {
    for (n, k, h) in [(7, 2, 3), (5, 1, 4)] {
        let v = rand_choices(n, k, &[1, 4, 5], 31 + n as u64);
        let (perm, _) = ids(&v, &[n, k]).moe_group(8).unwrap();
        check_gradients("moe_permute", &[randn(&[n, h], 1)], |x| {
            x[0].moe_permute(&perm, k)
        });
        check_gradients(
            "moe_combine",
            &[randn(&[n * k, h], 2), randn(&[n, k], 3)],
            |x| x[0].moe_combine(&perm, &x[1]),
        );
    }
}

/// `y[seg e] = x[seg e] · w[e]ᵀ`, by hand.
fn gmm_reference(x: &[f64], w: &[f64], off: &[u32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0.0; m * n];
    for e in 0..off.len() - 1 {
        for r in off[e] as usize..off[e + 1] as usize {
            for c in 0..n {
                y[r * n + c] = (0..k).map(|i| x[r * k + i] * w[(e * n + c) * k + i]).sum();
            }
        }
    }
    y
}

#[test]
fn grouped_matmul_matches_per_segment_matmuls() {
    // Segments with empty experts (first, middle, last) and rows outside every segment.
    for (m, k, n, off) in [
        (13, 5, 3, vec![0, 0, 4, 4, 9, 9, 10, 13, 13]),
        (37, 16, 40, vec![0, 5, 6, 6, 20, 30, 31, 37, 37]),
        (20, 33, 16, vec![2, 2, 2, 2, 2, 2, 2, 2, 17]),
    ] {
        for dtype in [DType::F64, DType::F32, DType::BF16] {
            let x = randn(&[m, k], 1).to_dtype(dtype).unwrap();
            let w = randn(&[8, n, k], 2).to_dtype(dtype).unwrap();
            let o = ids(&off, &[9]);
            let y = x.grouped_matmul(&w, &o).unwrap();
            assert_eq!((y.dims(), y.dtype()), (&[m, n][..], dtype));
            let want = gmm_reference(&f64s(&x), &f64s(&w), &off, m, k, n);
            let tol = match dtype {
                DType::F64 => 1e-14,
                DType::F32 => 1e-6,
                _ => 1e-2,
            };
            assert!(rel_err(&f64s(&y), &want) < tol, "{dtype} m={m}");
        }
    }
}

#[test]
fn grouped_matmul_errors() {
    let x = randn(&[6, 4], 1);
    let w = randn(&[3, 2, 4], 2);
    let bad_k = randn(&[3, 2, 5], 2);
    let off = ids(&[0, 2, 4, 6], &[4]);
    assert!(x.grouped_matmul(&w, &off).is_ok());
    assert!(matches!(
        x.grouped_matmul(&bad_k, &off),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        x.grouped_matmul(&w, &ids(&[0, 2, 6], &[3])),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        x.grouped_matmul(&w.to_dtype(DType::F32).unwrap(), &off),
        Err(Error::DTypeMismatch { .. })
    ));
    assert!(x.grouped_matmul(&w, &ids(&[0, 4, 2, 6], &[4])).is_err());
}

#[test]
fn grad_grouped_matmul() {
    for (m, k, n, off) in [
        (9, 4, 3, vec![0, 0, 3, 3, 7, 9]),
        (6, 2, 5, vec![0, 1, 1, 6, 6, 6]),
        (7, 3, 2, vec![1, 3, 3, 5, 5, 6]),
    ] {
        let o = ids(&off, &[6]);
        check_gradients(
            "grouped_matmul",
            &[randn(&[m, k], 1), randn(&[5, n, k], 2)],
            |v| v[0].grouped_matmul(&v[1], &o),
        );
    }
}

/// A MixLoRA block with random (non-zero) LoRAs on every projection, in `dtype` (base and
/// adapter), and its frozen weights.
struct Block {
    ffn: MixLoraFfn,
    w: [Tensor; 3],
}

fn block(h: usize, i: usize, e: usize, k: usize, r: usize, dtype: DType, seed: u64) -> Block {
    let rnd = |shape: &[usize], s: u64, scale: f64| {
        Tensor::randn(
            shape.to_vec(),
            0.0,
            scale,
            seed * 1000 + s,
            dtype,
            Device::Cpu,
        )
        .unwrap()
    };
    let var = |t: Tensor| t.to_var().unwrap();
    let mut s = 10;
    let mut lora = |n_in: usize, n_out: usize| {
        s += 2;
        Some(LoraLinear::new(
            var(rnd(&[r, n_in], s, 0.5)),
            var(rnd(&[n_out, r], s + 1, 0.5)),
            1.5,
            0.0,
        ))
    };
    let experts = (0..e)
        .map(|_| ExpertLora {
            gate: lora(h, i),
            up: lora(h, i),
            down: lora(i, h),
        })
        .collect();
    Block {
        ffn: MixLoraFfn {
            router: Router {
                weight: var(rnd(&[e, h], 1, 1.0)),
                routing: Routing::TopK(k),
            },
            experts,
        },
        w: [
            rnd(&[i, h], 2, 0.3),
            rnd(&[i, h], 3, 0.3),
            rnd(&[h, i], 4, 0.3),
        ],
    }
}

/// Every trainable tensor of the block: router, then each expert's gate/up/down A and B.
fn params(b: &Block) -> Vec<Tensor> {
    let mut v = vec![b.ffn.router.weight.clone()];
    for ex in &b.ffn.experts {
        for l in [&ex.gate, &ex.up, &ex.down].into_iter().flatten() {
            v.push(l.a.clone());
            v.push(l.b.clone());
        }
    }
    v
}

/// Output and gradients (x first, then every parameter) of `imp` on `x`.
fn run(b: &Block, x: &Tensor, imp: MoeImpl, seed: u64) -> (Vec<f64>, Vec<Vec<f64>>) {
    let ps = params(b);
    ps.iter().for_each(|p| p.zero_grad());
    let xv = x.to_var().unwrap();
    let shared = SharedFfn {
        gate: &b.w[0],
        up: &b.w[1],
        down: &b.w[2],
    };
    let (y, route) = b.ffn.forward(&xv, shared, imp, None).unwrap();
    // A loss that weighs every output element differently, plus the router probs (as the aux
    // loss does), so every gradient path is exercised.
    let r = Tensor::randn(y.shape().clone(), 0.0, 1.0, seed, y.dtype(), Device::Cpu).unwrap();
    let loss = y
        .mul(&r)
        .unwrap()
        .sum_all()
        .unwrap()
        .add(&route.probs.sqr().unwrap().sum_all().unwrap())
        .unwrap();
    loss.backward().unwrap();
    let mut grads = vec![f64s(&xv.grad().unwrap())];
    for p in &ps {
        grads.push(
            p.grad()
                .map(|g| f64s(&g))
                .unwrap_or(vec![0.0; p.elem_count()]),
        );
    }
    (f64s(&y), grads)
}

#[test]
fn grouped_equals_naive_output_and_every_gradient() {
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
        for (n, h, i, k, r) in [
            (13, 8, 12, 2, 4),
            (5, 6, 10, 1, 2),
            (40, 16, 24, 2, 16),
            (3, 4, 5, 2, 3), // fewer tokens than experts: some experts get no token
        ] {
            let b = block(h, i, 8, k, r, dtype, n as u64);
            let x = Tensor::randn([n, h], 0.0, 1.0, 99 + n as u64, dtype, Device::Cpu).unwrap();
            let (yn, gn) = run(&b, &x, MoeImpl::Naive, 5);
            let (yg, gg) = run(&b, &x, MoeImpl::Grouped, 5);
            let what = format!("{dtype} n={n} h={h} i={i} k={k} r={r}");
            let e = rel_err(&yg, &yn);
            assert!(e < tol, "{what}: output rel err {e:.2e}");
            for (j, (a, want)) in gg.iter().zip(&gn).enumerate() {
                let e = rel_err(a, want);
                assert!(e < tol, "{what}: gradient {j} rel err {e:.2e}");
            }
        }
    }
}

#[test]
fn grouped_falls_back_to_naive_for_top_p() {
    let mut b = block(6, 8, 8, 2, 2, DType::F64, 3);
    b.ffn.router.routing = Routing::TopP(0.7);
    let x = randn(&[9, 6], 4);
    let (yn, gn) = run(&b, &x, MoeImpl::Naive, 5);
    let (yg, gg) = run(&b, &x, MoeImpl::Grouped, 5);
    assert_eq!(yn, yg);
    assert_eq!(gn, gg);
}

#[test]
fn moe_impl_parses() {
    assert_eq!("grouped".parse::<MoeImpl>(), Ok(MoeImpl::Grouped));
    assert_eq!("naive".parse::<MoeImpl>(), Ok(MoeImpl::Naive));
    assert_eq!("paper".parse::<MoeImpl>(), Ok(MoeImpl::Paper));
    assert_eq!(
        "fused".parse::<MoeImpl>(),
        Ok(MoeImpl::Fused(Default::default()))
    );
    assert!("dense".parse::<MoeImpl>().is_err());
    for name in ["naive", "paper", "grouped", "fused"] {
        assert_eq!(name.parse::<MoeImpl>().unwrap().to_string(), name);
    }
    // `auto`'s choice, and the fused path's options.
    let opts = engine::MoeFfnOptions {
        kernels: engine::MoeKernels::Tiles,
        chunk_tokens: Some(7),
    };
    assert_eq!(MoeImpl::for_device(Device::Cpu), MoeImpl::Naive);
    assert_eq!(
        MoeImpl::for_device(Device::Cuda(1)),
        MoeImpl::Fused(Default::default())
    );
    assert_eq!(
        MoeImpl::Fused(Default::default()).with_fused_options(opts),
        MoeImpl::Fused(opts)
    );
    assert_eq!(MoeImpl::Paper.with_fused_options(opts), MoeImpl::Paper);
}

/// The command-line names of the routing strategies and adapter kinds, and the routing an
/// adapter file's strategy and parameters make.
#[test]
fn routing_and_adapter_names() {
    use model::adapters::{AdapterConfig, PeftType, RoutingStrategy};
    for (name, r) in [
        ("topk", RoutingStrategy::TopK),
        ("topp", RoutingStrategy::TopP),
    ] {
        assert_eq!(name.parse::<RoutingStrategy>(), Ok(r));
        assert_eq!(r.to_string(), name);
    }
    assert!(
        "mixlora".parse::<RoutingStrategy>().is_err(),
        "file names are not flags"
    );
    for (name, p) in [("lora", PeftType::Lora), ("mixlora", PeftType::MixLora)] {
        assert_eq!(name.parse::<PeftType>(), Ok(p));
        assert_eq!(p.to_string(), name);
    }
    let mut c = AdapterConfig::default_for(PeftType::MixLora);
    assert_eq!(c, AdapterConfig::mixlora_default());
    assert_eq!(c.routing(), Routing::TopK(2));
    c.routing_strategy = RoutingStrategy::TopP;
    assert_eq!(c.routing(), Routing::TopP(0.8));
    assert_eq!(
        AdapterConfig::default_for(PeftType::Lora),
        AdapterConfig::lora_default()
    );
}
