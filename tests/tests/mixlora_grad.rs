//! Finite-difference gradient checks (f64) of the adapters: LoRA linear (with and without
//! dropout), the MixLoRA FFN with the top-k and the top-p router wrt x, router and every LoRA
//! matrix (including a routing where an expert receives no token), the aux loss over several
//! layers with padding, and a whole tiny LLaMA with MixLoRA (CE + aux wrt a subset of adapters).

use std::cell::RefCell;

use engine::{cat, DType, Device, Tensor, IGNORE_INDEX};
use model::adapters::{
    aux_loss, expert_load, lora_linear, ExpertLora, LoraLinear, MixLoraFfn, MoeImpl, Router,
    RouterOutput, Routing, SharedFfn,
};
use model::{AdapterConfig, Llama, LlamaConfig, RoutingStrategy};
use testutil::{check_gradients, ids, randn};

fn scaled(shape: &[usize], seed: u64, s: f64) -> Tensor {
    randn(shape, seed).affine(s, 0.0).unwrap()
}

#[test]
fn grad_lora_linear_with_and_without_dropout() {
    let x = randn(&[2, 3, 5], 1);
    let w = scaled(&[4, 5], 2, 0.5);
    let a = scaled(&[2, 5], 3, 0.5);
    let b = scaled(&[4, 2], 4, 0.5);
    for seed in [None, Some(77)] {
        check_gradients("lora_linear", &[x.clone(), a.clone(), b.clone()], |v| {
            let l = LoraLinear::new(v[1].clone(), v[2].clone(), 1.5, 0.3);
            lora_linear(&v[0], &w.clone().into(), Some(&l), seed)
                .map_err(|e| engine::Error::invalid("test", e.to_string()))
        });
    }
    // Dropout is on A's input only and is a fixed mask for a fixed seed: the frozen path is intact.
    let l = LoraLinear::new(
        a.clone(),
        Tensor::zeros([4, 2], DType::F64, Device::Cpu).unwrap(),
        1.5,
        0.3,
    );
    let base = x.matmul(&w.t().unwrap()).unwrap().to_vec_f64().unwrap();
    let with = lora_linear(&x, &w.clone().into(), Some(&l), Some(5))
        .unwrap()
        .to_vec_f64()
        .unwrap();
    assert_eq!(base, with);
}

#[test]
fn lora_linear_on_bf16_base_keeps_f32_adapter_maths() {
    let x = Tensor::randn([3, 8], 0.0, 1.0, 1, DType::F32, Device::Cpu).unwrap();
    let w = Tensor::randn([6, 8], 0.0, 0.3, 2, DType::F32, Device::Cpu).unwrap();
    let a = Tensor::randn([2, 8], 0.0, 0.3, 3, DType::F32, Device::Cpu)
        .unwrap()
        .to_var()
        .unwrap();
    let b = Tensor::randn([6, 2], 0.0, 0.3, 4, DType::F32, Device::Cpu)
        .unwrap()
        .to_var()
        .unwrap();
    let l = LoraLinear::new(a.clone(), b.clone(), 2.0, 0.0);
    let (xb, wb) = (
        x.to_dtype(DType::BF16).unwrap(),
        w.to_dtype(DType::BF16).unwrap(),
    );
    let y = lora_linear(&xb, &wb.clone().into(), Some(&l), None).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let want = lora_linear(
        &xb.to_dtype(DType::F32).unwrap(),
        &wb.to_dtype(DType::F32).unwrap().into(),
        Some(&l),
        None,
    )
    .unwrap();
    let err = testutil::rel_err(&y.to_vec_f64().unwrap(), &want.to_vec_f64().unwrap());
    assert!(err < 1e-2, "bf16 vs f32: {err}");
    y.sum_all().unwrap().backward().unwrap();
    assert_eq!(a.grad().unwrap().dtype(), DType::F32);
    assert_eq!(b.grad().unwrap().dtype(), DType::F32);
}

const T: usize = 7;
const H: usize = 4;
const I: usize = 6;
const E: usize = 4;
const R: usize = 2;

/// Inputs of the MoE gradient checks: x [T, H], router [E, H], then per expert gate A, B, up A,
/// B, down A, B. Feature 0 of x is large and positive, router row 3 strongly negative on it and
/// the other rows zero there, so expert 3 never receives a token under top-2.
fn moe_inputs() -> Vec<Tensor> {
    let mut x = randn(&[T, H], 10).to_vec_f64().unwrap();
    for t in 0..T {
        x[t * H] = 3.0 + 0.2 * x[t * H];
    }
    let x = Tensor::from_f64(&x, [T, H], DType::F64, Device::Cpu).unwrap();
    let mut router = randn(&[E, H], 11)
        .affine(0.5, 0.0)
        .unwrap()
        .to_vec_f64()
        .unwrap();
    for e in 0..E - 1 {
        router[e * H] = 0.0; // experts 0..3 compete on the other features
    }
    router[3 * H] = -4.0;
    let router = Tensor::from_f64(&router, [E, H], DType::F64, Device::Cpu).unwrap();
    let mut v = vec![x, router];
    let mut seed = 100;
    for _ in 0..E {
        for (n_in, n_out) in [(H, I), (H, I), (I, H)] {
            seed += 2;
            v.push(scaled(&[R, n_in], seed, 0.5));
            v.push(scaled(&[n_out, R], seed + 1, 0.5));
        }
    }
    v
}

fn moe_block(v: &[Tensor], routing: Routing) -> MixLoraFfn {
    let lora = |j: usize| Some(LoraLinear::new(v[j].clone(), v[j + 1].clone(), 2.0, 0.1));
    MixLoraFfn {
        router: Router {
            weight: v[1].clone(),
            routing,
        },
        experts: (0..E)
            .map(|e| 2 + 6 * e)
            .map(|j| ExpertLora {
                gate: lora(j),
                up: lora(j + 2),
                down: lora(j + 4),
            })
            .collect(),
    }
}

/// `[y.flatten(), aux]` of the block at `v`.
fn moe_out(
    v: &[Tensor],
    routing: Routing,
    w: &[Tensor; 3],
    seed: Option<u64>,
) -> engine::Result<Tensor> {
    let shared = SharedFfn {
        gate: &engine::FrozenWeight::from(w[0].clone()),
        up: &engine::FrozenWeight::from(w[1].clone()),
        down: &engine::FrozenWeight::from(w[2].clone()),
    };
    let (y, route) = moe_block(v, routing)
        .forward(&v[0], shared, MoeImpl::Naive, seed)
        .map_err(|e| engine::Error::invalid("moe", e.to_string()))?;
    let aux = aux_loss(&[route], None, 0.5)
        .map_err(|e| engine::Error::invalid("aux", e.to_string()))?
        .unwrap();
    cat(&[&y.flatten_all()?, &aux.reshape(1)?], 0)
}

fn frozen_ffn() -> [Tensor; 3] {
    [
        scaled(&[I, H], 1, 0.5),
        scaled(&[I, H], 2, 0.5),
        scaled(&[H, I], 3, 0.5),
    ]
}

fn loads(route: &RouterOutput) -> Vec<f64> {
    expert_load(route, None).unwrap().to_vec_f64().unwrap()
}

#[test]
fn grad_mixlora_ffn_top_k_with_an_idle_expert() {
    let (v, w) = (moe_inputs(), frozen_ffn());
    let shared = SharedFfn {
        gate: &engine::FrozenWeight::from(w[0].clone()),
        up: &engine::FrozenWeight::from(w[1].clone()),
        down: &engine::FrozenWeight::from(w[2].clone()),
    };
    let (_, route) = moe_block(&v, Routing::TopK(2))
        .forward(&v[0], shared, MoeImpl::Naive, None)
        .unwrap();
    let load = loads(&route);
    println!("top-2 expert load {load:?}");
    assert_eq!(load[3], 0.0, "expert 3 must be idle for this test");
    assert!((load.iter().sum::<f64>() - 1.0).abs() < 1e-6); // f32
    assert!(route
        .mask
        .to_vec_f64()
        .unwrap()
        .chunks(E)
        .all(|row| row.iter().sum::<f64>() == 2.0));
    check_gradients("mixlora_ffn_top2", &v, |v| {
        moe_out(v, Routing::TopK(2), &w, None)
    });
    // With dropout (a fixed mask per seed) the gradients are still exact.
    check_gradients("mixlora_ffn_top2_dropout", &v, |v| {
        moe_out(v, Routing::TopK(2), &w, Some(9))
    });
    check_gradients("mixlora_ffn_top1", &v, |v| {
        moe_out(v, Routing::TopK(1), &w, None)
    });
}

#[test]
fn grad_mixlora_ffn_top_p() {
    let (v, w) = (moe_inputs(), frozen_ffn());
    let shared = SharedFfn {
        gate: &engine::FrozenWeight::from(w[0].clone()),
        up: &engine::FrozenWeight::from(w[1].clone()),
        down: &engine::FrozenWeight::from(w[2].clone()),
    };
    let (_, route) = moe_block(&v, Routing::TopP(0.8))
        .forward(&v[0], shared, MoeImpl::Naive, None)
        .unwrap();
    let picks: Vec<f64> = route
        .mask
        .to_vec_f64()
        .unwrap()
        .chunks(E)
        .map(|r| r.iter().sum())
        .collect();
    println!("top-p experts per token {picks:?}");
    assert!(
        picks.iter().any(|&p| p != picks[0]),
        "the test wants a varying number of experts per token"
    );
    check_gradients("mixlora_ffn_top_p", &v, |v| {
        moe_out(v, Routing::TopP(0.8), &w, None)
    });
}

#[test]
fn top_p_router_keeps_the_crossing_expert_without_renormalising() {
    // H = 1, x = 1: the router logits are its weights, so p = softmax(ln q) = q.
    let q = [0.15, 0.5, 0.1, 0.25];
    let w: Vec<f64> = q.iter().map(|p: &f64| p.ln()).collect();
    let router = Router {
        weight: Tensor::from_f64(&w, [4, 1], DType::F64, Device::Cpu).unwrap(),
        routing: Routing::TopP(0.8),
    };
    let x = Tensor::ones([1, 1], DType::F64, Device::Cpu).unwrap();
    let out = router.route(&x).unwrap();
    // Sorted: 0.5, 0.25 (sum 0.75 <= 0.8), 0.15 (0.9 > 0.8: the crossing one, kept), 0.1 dropped.
    assert_eq!(out.mask.to_vec_f64().unwrap(), vec![1.0, 1.0, 0.0, 1.0]);
    let got = out.weights.to_vec_f64().unwrap();
    let want = [0.15, 0.5, 0.0, 0.25];
    assert!(
        got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12),
        "{got:?}"
    );
    // top_p = 1 keeps everything.
    let all = Router {
        routing: Routing::TopP(1.0),
        ..router.clone()
    }
    .route(&x)
    .unwrap();
    assert_eq!(all.mask.to_vec_f64().unwrap(), vec![1.0; 4]);
    // Top-2 renormalises.
    let top2 = Router {
        routing: Routing::TopK(2),
        ..router
    }
    .route(&x)
    .unwrap();
    let got = top2.weights.to_vec_f64().unwrap();
    assert!(
        (got[1] - 0.5 / 0.75).abs() < 1e-12
            && (got[3] - 0.25 / 0.75).abs() < 1e-12
            && got[0] == 0.0,
        "{got:?}"
    );
}

#[test]
fn aux_loss_concatenates_layers_and_skips_padding() {
    // Two layers of 5 tokens, the last two are padding.
    let routes: Vec<RouterOutput> = (0..2)
        .map(|l| {
            Router {
                weight: scaled(&[E, H], 40 + l, 1.0),
                routing: Routing::TopK(2),
            }
            .route(&randn(&[5, H], 50 + l))
            .unwrap()
        })
        .collect();
    let real = [1.0, 1.0, 1.0, 0.0, 0.0];
    let tw = Tensor::from_f64(&real, [5, 1], DType::F64, Device::Cpu).unwrap();
    let coef = 0.01;
    let got = aux_loss(&routes, Some(&tw), coef)
        .unwrap()
        .unwrap()
        .to_scalar()
        .unwrap();
    // Host reference (MoE-PEFT): means over the concatenated real rows of all layers.
    let (mut f, mut p) = (vec![0.0; E], vec![0.0; E]);
    for r in &routes {
        let (m, pr) = (r.mask.to_vec_f64().unwrap(), r.probs.to_vec_f64().unwrap());
        for t in 0..3 {
            for e in 0..E {
                f[e] += m[t * E + e] / 6.0;
                p[e] += pr[t * E + e] / 6.0;
            }
        }
    }
    let want = coef * E as f64 * f.iter().zip(&p).map(|(a, b)| a * b).sum::<f64>();
    assert!((got - want).abs() < 1e-14, "{got} vs {want}");
    // The gradient of the aux loss wrt the routers, by finite differences.
    let xs = [randn(&[5, H], 50), randn(&[5, H], 51)];
    check_gradients(
        "aux_loss",
        &[scaled(&[E, H], 40, 1.0), scaled(&[E, H], 41, 1.0)],
        |w| {
            let routes: Vec<RouterOutput> = w
                .iter()
                .zip(&xs)
                .map(|(w, x)| {
                    Router {
                        weight: w.clone(),
                        routing: Routing::TopK(2),
                    }
                    .route(x)
                    .unwrap()
                })
                .collect();
            aux_loss(&routes, Some(&tw), coef)
                .unwrap()
                .unwrap()
                .reshape(1)
        },
    );
}

pub fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        tie_word_embeddings: true,
        ..testutil::tiny_llama_config()
    }
}

/// A tiny f64 LLaMA with MixLoRA (E = 3, top-2, r = 2) whose adapters all hold random values.
fn tiny_mixlora(strategy: RoutingStrategy) -> Llama {
    let mut m = Llama::random(tiny_config(), 3, DType::F64, Device::Cpu).unwrap();
    // Larger base weights than N(0, 0.02), so that every path carries signal.
    for l in &mut m.layers {
        for (k, w) in [
            &mut l.q_proj,
            &mut l.k_proj,
            &mut l.v_proj,
            &mut l.o_proj,
            &mut l.gate_proj,
            &mut l.up_proj,
            &mut l.down_proj,
        ]
        .into_iter()
        .enumerate()
        {
            let d = testutil::dense(w);
            *w = d
                .affine(15.0, 0.0)
                .unwrap()
                .add(&scaled(d.dims(), 900 + k as u64, 0.01))
                .unwrap()
                .into();
        }
    }
    m.embed_tokens = m.embed_tokens.affine(50.0, 0.0).unwrap();
    let cfg = AdapterConfig {
        num_experts: 3,
        r: 2,
        lora_alpha: 4.0,
        routing_strategy: strategy,
        ..AdapterConfig::mixlora_default()
    };
    m.add_adapters(&cfg, 1).unwrap();
    for (k, (name, t)) in m.trainable_params().into_iter().enumerate() {
        m.set_trainable_param(
            &name,
            scaled(t.dims(), 2000 + k as u64, 0.4).to_var().unwrap(),
        )
        .unwrap();
    }
    m
}

#[test]
fn grad_tiny_llama_with_mixlora() {
    for strategy in [RoutingStrategy::TopK, RoutingStrategy::TopP] {
        let model = RefCell::new(tiny_mixlora(strategy));
        let (b, t) = (2, 5);
        let tokens = ids(&[3, 7, 1, 9, 4, 2, 8, 5, 0, 0], &[b, t]);
        let mask = ids(&[1, 1, 1, 1, 1, 1, 1, 1, 0, 0], &[b, t]);
        let m = IGNORE_INDEX;
        let targets = ids(&[7, 1, 9, 4, 10, 8, 5, m, m, m], &[b * t]);
        let all = model.borrow().trainable_params();
        // A subset: attention LoRA of layer 0, router of layer 1, two experts' LoRAs of layer 1.
        let picked: Vec<(String, Tensor)> = all
            .iter()
            .filter(|(n, _)| {
                n.starts_with("mixlora.layers.0.self_attn.q_proj.")
                    || n.starts_with("mixlora.layers.0.self_attn.v_proj.")
                    || n == "mixlora.layers.1.mlp.moe_gate.weight"
                    || n.starts_with("mixlora.layers.1.mlp.gate_proj.experts.0.")
                    || n.starts_with("mixlora.layers.1.mlp.down_proj.experts.2.")
            })
            .cloned()
            .collect();
        assert_eq!(picked.len(), 9);
        let names: Vec<String> = picked.iter().map(|(n, _)| n.clone()).collect();
        let values: Vec<Tensor> = picked.iter().map(|(_, t)| t.detach()).collect();
        let loss = |v: &[Tensor]| -> engine::Result<Tensor> {
            let err = |e: model::Error| engine::Error::invalid("model", e.to_string());
            let mut model = model.borrow_mut();
            for (n, t) in names.iter().zip(v) {
                model.set_trainable_param(n, t.clone()).map_err(err)?;
            }
            let out = model
                .forward_train(&tokens, Some(&mask), None)
                .map_err(err)?;
            let ce = out
                .logits
                .reshape([b * t, 11])?
                .cross_entropy(&targets, IGNORE_INDEX)?;
            let aux = out.aux_loss.expect("MixLoRA has an aux loss");
            assert_eq!(out.expert_load.len(), 2);
            ce.add(&aux.affine(100.0, 0.0)?)?.reshape(1)
        };
        check_gradients(&format!("tiny_llama_mixlora_{strategy:?}"), &values, loss);
    }
}

#[test]
fn frozen_base_gets_no_gradient_and_every_adapter_does() {
    let model = tiny_mixlora(RoutingStrategy::TopK);
    let tokens = ids(&[3, 7, 1, 9, 4, 2, 8, 5, 6, 1], &[2, 5]);
    let out = model.forward_train(&tokens, None, Some(3)).unwrap();
    let ce = out
        .logits
        .reshape([10, 11])
        .unwrap()
        .cross_entropy(&ids(&[1; 10], &[10]), IGNORE_INDEX)
        .unwrap();
    ce.add(&out.aux_loss.unwrap()).unwrap().backward().unwrap();
    let base = [&model.embed_tokens, &model.norm]
        .into_iter()
        .chain(model.layers.iter().flat_map(|l| {
            [
                &l.input_layernorm,
                testutil::dense(&l.q_proj),
                testutil::dense(&l.k_proj),
                testutil::dense(&l.v_proj),
                testutil::dense(&l.o_proj),
                &l.post_attention_layernorm,
                testutil::dense(&l.gate_proj),
                testutil::dense(&l.up_proj),
                testutil::dense(&l.down_proj),
            ]
        }));
    for w in base {
        assert!(!w.is_variable() && w.grad().is_none());
    }
    let load: Vec<Vec<f64>> = out
        .expert_load
        .iter()
        .map(|t| t.to_vec_f64().unwrap())
        .collect();
    for (name, t) in model.trainable_params() {
        // Experts that received no token have no gradient; the rest must.
        let idle = name.contains(".experts.") && {
            let l: usize = name["mixlora.layers.".len()..]
                .split('.')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            let e: usize = name
                .split(".experts.")
                .nth(1)
                .unwrap()
                .split('.')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            load[l][e] == 0.0
        };
        assert!(
            t.is_variable() && (idle || t.grad().is_some()),
            "{name} has no gradient"
        );
        assert_eq!(t.dtype(), DType::F64);
    }
}

/// Loss (CE + aux) and every adapter gradient of one training forward/backward of `model`.
fn loss_and_grads(model: &Llama, dropout_seed: Option<u64>) -> (f64, Vec<(String, Vec<f64>)>) {
    let params = model.trainable_params();
    params.iter().for_each(|(_, p)| p.zero_grad());
    let tokens = ids(&[3, 7, 1, 9, 4, 2, 8, 5, 0, 0], &[2, 5]);
    let mask = ids(&[1, 1, 1, 1, 1, 1, 1, 1, 0, 0], &[2, 5]);
    let m = IGNORE_INDEX;
    let targets = ids(&[7, 1, 9, 4, 10, 8, 5, m, m, m], &[10]);
    let out = model
        .forward_train(&tokens, Some(&mask), dropout_seed)
        .unwrap();
    let ce = out
        .logits
        .reshape([10, 11])
        .unwrap()
        .cross_entropy(&targets, IGNORE_INDEX)
        .unwrap();
    let loss = ce
        .add(&out.aux_loss.unwrap().affine(100.0, 0.0).unwrap())
        .unwrap();
    loss.backward().unwrap();
    let grads = params
        .iter()
        .map(|(n, p)| {
            let g = p.grad().unwrap_or_else(|| panic!("{n} has no gradient"));
            (n.clone(), g.to_vec_f64().unwrap())
        })
        .collect();
    (loss.to_scalar().unwrap(), grads)
}

#[test]
fn gradient_checkpointing_keeps_loss_and_every_gradient() {
    for strategy in [RoutingStrategy::TopK, RoutingStrategy::TopP] {
        for seed in [None, Some(17)] {
            let mut model = tiny_mixlora(strategy);
            let (l_ref, g_ref) = loss_and_grads(&model, seed);
            model.set_gradient_checkpointing(true);
            assert!(model.gradient_checkpointing());
            let (l_ck, g_ck) = loss_and_grads(&model, seed);
            assert!(
                (l_ref - l_ck).abs() <= 1e-12 * l_ref.abs(),
                "{l_ref} vs {l_ck}"
            );
            assert_eq!(g_ref.len(), g_ck.len());
            for ((n, a), (_, b)) in g_ref.iter().zip(&g_ck) {
                let e = testutil::rel_err(b, a);
                assert!(e <= 1e-12, "{strategy:?} seed {seed:?}: {n}: rel err {e}");
            }
        }
    }
}

/// Output, aux loss and the gradient of every input (x, router, each expert's A and B) of the
/// MoE block computed with `imp`, on fresh variables made from `v`.
fn moe_values_and_grads(
    v: &[Tensor],
    imp: MoeImpl,
    routing: Routing,
    seed: Option<u64>,
) -> Vec<Vec<f64>> {
    let vars: Vec<Tensor> = v.iter().map(|t| t.to_var().unwrap()).collect();
    let w = frozen_ffn();
    let shared = SharedFfn {
        gate: &engine::FrozenWeight::from(w[0].clone()),
        up: &engine::FrozenWeight::from(w[1].clone()),
        down: &engine::FrozenWeight::from(w[2].clone()),
    };
    let (y, route) = moe_block(&vars, routing)
        .forward(&vars[0], shared, imp, seed)
        .unwrap();
    let aux = aux_loss(&[route], None, 0.5).unwrap().unwrap();
    // A loss that weighs every output element differently.
    let c = randn(y.dims(), 77);
    let loss = y.mul(&c).unwrap().sum_all().unwrap().add(&aux).unwrap();
    loss.backward().unwrap();
    let mut out = vec![y.to_vec_f64().unwrap(), vec![aux.to_scalar().unwrap()]];
    out.extend(
        vars.iter()
            .map(|t| t.grad().map_or_else(Vec::new, |g| g.to_vec_f64().unwrap())),
    );
    out
}

#[test]
fn paper_path_matches_naive_values_and_gradients() {
    let v = moe_inputs();
    for routing in [Routing::TopK(2), Routing::TopK(1), Routing::TopP(0.6)] {
        for seed in [None, Some(5)] {
            let naive = moe_values_and_grads(&v, MoeImpl::Naive, routing, seed);
            let paper = moe_values_and_grads(&v, MoeImpl::Paper, routing, seed);
            for (i, (a, b)) in naive.iter().zip(&paper).enumerate() {
                assert_eq!(a.len(), b.len(), "{routing:?}: output {i} presence differs");
                if a.iter().any(|x| *x != 0.0) {
                    let e = testutil::rel_err(b, a);
                    assert!(
                        e <= 1e-12,
                        "{routing:?} seed {seed:?}: output {i}: rel err {e}"
                    );
                }
            }
        }
    }
}
