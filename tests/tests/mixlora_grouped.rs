//! The `grouped` MixLoRA FFN (`MoeImpl::Grouped`, built on the units `engine::fused::moe_route`
//! and `engine::fused::moe_grouped`) against `MoeImpl::Naive` on the CPU: output and every
//! gradient in f64 and f32 at several sizes; its fallback to `naive` for top-p routing; the
//! names of the implementations. Its CPU ↔ CUDA parity is in tests/tests/fused/moe_grouped.rs.

use engine::{DType, Device, Tensor};
use model::adapters::{ExpertLora, LoraLinear, MixLoraFfn, MoeImpl, Router, Routing, SharedFfn};
use testutil::{randn, rel_err};

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
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
        gate: &engine::FrozenWeight::from(b.w[0].clone()),
        up: &engine::FrozenWeight::from(b.w[1].clone()),
        down: &engine::FrozenWeight::from(b.w[2].clone()),
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
