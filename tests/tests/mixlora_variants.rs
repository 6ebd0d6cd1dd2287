//! The training variants beyond the paper (docs/DESIGN.md, "Variants"): the router z-loss's
//! value against a host reference, its gradient by finite differences in f64 (alone over two
//! layers with padding, and through a tiny LLaMA with every MoE implementation and with gradient
//! checkpointing), the router parameters told apart by name, and the experts' `B` drawn nonzero
//! at init: only they change, and the router then has an LM-loss gradient from the first step,
//! where the paper's init (every expert equal to the frozen FFN) gives it exactly none.

use std::cell::RefCell;

use engine::{DType, Device, Tensor, IGNORE_INDEX};
use model::adapters::{
    is_expert_param, is_router_param, z_loss, AdapterInit, Router, RouterOutput, Routing,
};
use model::{AdapterConfig, Llama, LlamaConfig, MoeImpl};
use testutil::{check_gradients, ids, randn};

const E: usize = 4;
const H: usize = 6;

fn scaled(shape: &[usize], seed: u64, s: f64) -> Tensor {
    randn(shape, seed).affine(s, 0.0).unwrap()
}

fn routes(ws: &[Tensor], xs: &[Tensor]) -> Vec<RouterOutput> {
    ws.iter()
        .zip(xs)
        .map(|(w, x)| {
            Router {
                weight: w.clone(),
                routing: Routing::TopK(2),
            }
            .route(x)
            .unwrap()
        })
        .collect()
}

#[test]
fn z_loss_is_the_mean_squared_logsumexp_over_layers_and_real_tokens() {
    // Two layers of 5 tokens, the last two padding; logits large enough that a naive
    // log-sum-exp would lose digits.
    let ws = [scaled(&[E, H], 40, 30.0), scaled(&[E, H], 41, 30.0)];
    let xs = [randn(&[5, H], 50), randn(&[5, H], 51)];
    let real = [1.0, 1.0, 1.0, 0.0, 0.0];
    let tw = Tensor::from_f64(&real, [5, 1], DType::F64, Device::Cpu).unwrap();
    let coef = 0.01;
    let r = routes(&ws, &xs);
    let got = z_loss(&r, Some(&tw), coef)
        .unwrap()
        .unwrap()
        .to_scalar()
        .unwrap();
    let mut want = 0.0;
    for o in &r {
        let l = o.logits.to_vec_f64().unwrap();
        for t in 0..3 {
            let row = &l[t * E..(t + 1) * E];
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            want += lse * lse / 6.0;
        }
    }
    want *= coef;
    assert!(want > 1.0, "the logits are large: {want}");
    assert!((got - want).abs() <= 1e-13 * want, "{got} vs {want}");
    // A zero coefficient computes nothing: the paper's loss.
    assert!(z_loss(&r, Some(&tw), 0.0).unwrap().is_none());
    assert!(z_loss(&[], Some(&tw), coef).unwrap().is_none());
    // Its gradient wrt the routers and the tokens, by finite differences.
    check_gradients(
        "z_loss",
        &[
            scaled(&[E, H], 40, 1.0),
            scaled(&[E, H], 41, 1.0),
            xs[0].clone(),
            xs[1].clone(),
        ],
        |v| {
            z_loss(&routes(&v[..2], &v[2..]), Some(&tw), coef)
                .unwrap()
                .unwrap()
                .reshape(1)
        },
    );
}

#[test]
fn router_parameters_are_told_apart_by_name() {
    assert!(is_router_param("mixlora.layers.0.mlp.moe_gate.weight"));
    assert!(is_router_param("mixlora.layers.31.mlp.moe_gate.weight"));
    for name in [
        "mixlora.layers.0.mlp.gate_proj.experts.0.lora_A.weight",
        "mixlora.layers.0.self_attn.q_proj.lora_A.weight",
        "mixlora.layers..mlp.moe_gate.weight",
        "mixlora.layers.x.mlp.moe_gate.weight",
        "mixlora.layers.0.mlp.moe_gate.weight.exp_avg",
        "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight",
    ] {
        assert!(!is_router_param(name), "{name}");
    }
    // Every router of a MixLoRA adapter, and nothing else.
    let mut m = Llama::random(tiny_config(), 3, DType::F32, Device::Cpu).unwrap();
    m.add_adapters(&AdapterConfig::mixlora_default(), 1)
        .unwrap();
    let params = m.trainable_params();
    let routers: Vec<&(String, Tensor)> =
        params.iter().filter(|(n, _)| is_router_param(n)).collect();
    assert_eq!(routers.len(), m.layers.len());
    assert!(routers.iter().all(|(_, t)| t.dims()[0] == 8));
}

pub fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        tie_word_embeddings: true,
        ..testutil::tiny_llama_config()
    }
}

/// A tiny f64 LLaMA with MixLoRA (E = 3, top-2, r = 2, no dropout) whose adapters all hold
/// random values, its routers large enough that the z-loss matters; `z` its z-loss
/// coefficient.
fn tiny_mixlora(cfg: AdapterConfig, z: f64) -> Llama {
    let mut m = Llama::random(tiny_config(), 3, DType::F64, Device::Cpu).unwrap();
    for l in &mut m.layers {
        for (k, w) in [&mut l.gate_proj, &mut l.up_proj, &mut l.down_proj]
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
        lora_dropout: 0.0,
        ..cfg
    };
    m.add_adapters(&cfg, 1).unwrap();
    for (k, (name, t)) in m.trainable_params().into_iter().enumerate() {
        m.set_trainable_param(
            &name,
            scaled(t.dims(), 2000 + k as u64, 0.4).to_var().unwrap(),
        )
        .unwrap();
    }
    let mut a = m.remove_adapters().unwrap();
    a.router_z_loss_coef = z;
    m.set_adapters(a).unwrap();
    m
}

struct Batch {
    tokens: Tensor,
    mask: Tensor,
    targets: Tensor,
}

fn batch() -> Batch {
    let im = IGNORE_INDEX;
    Batch {
        tokens: ids(&[3, 7, 1, 9, 4, 2, 8, 5, 0, 0], &[2, 5]),
        mask: ids(&[1, 1, 1, 1, 1, 1, 1, 1, 0, 0], &[2, 5]),
        targets: ids(&[7, 1, 9, 4, 10, 8, 5, im, im, im], &[10]),
    }
}

/// `CE + aux + z` of one training forward, and its z-loss alone.
fn loss(model: &Llama, b: &Batch) -> engine::Result<(Tensor, f64)> {
    let err = |e: model::Error| engine::Error::invalid("model", e.to_string());
    let out = model
        .forward_train(&b.tokens, Some(&b.mask), None)
        .map_err(err)?;
    let ce = out
        .logits
        .reshape([10, 11])?
        .cross_entropy(&b.targets, IGNORE_INDEX)?;
    let z = out.z_loss.expect("a z-loss when its coefficient is > 0");
    let zv = z.to_scalar()?;
    Ok((ce.add(&out.aux_loss.expect("aux"))?.add(&z)?, zv))
}

#[test]
fn z_loss_gradient_through_a_tiny_llama_in_every_moe_implementation() {
    let b = batch();
    let impls = [
        MoeImpl::Naive,
        MoeImpl::Paper,
        MoeImpl::Grouped,
        MoeImpl::Fused(Default::default()),
    ];
    let mut zs = Vec::new();
    for imp in impls {
        let model = RefCell::new(tiny_mixlora(AdapterConfig::mixlora_default(), 0.5));
        model.borrow_mut().set_moe_impl(imp);
        zs.push(loss(&model.borrow(), &b).unwrap().1);
        // Routers of both layers and one expert: the z-loss reaches the routers through the
        // logits, and the tokens of layer 1 through layer 0's experts.
        let picked: Vec<(String, Tensor)> = model
            .borrow()
            .trainable_params()
            .into_iter()
            .filter(|(n, _)| {
                is_router_param(n) || n.starts_with("mixlora.layers.0.mlp.up_proj.experts.1.")
            })
            .collect();
        assert_eq!(picked.len(), 4);
        let names: Vec<String> = picked.iter().map(|(n, _)| n.clone()).collect();
        let values: Vec<Tensor> = picked.iter().map(|(_, t)| t.detach()).collect();
        check_gradients(&format!("tiny_llama_z_loss_{imp}"), &values, |v| {
            let mut m = model.borrow_mut();
            for (n, t) in names.iter().zip(v) {
                m.set_trainable_param(n, t.clone())
                    .map_err(|e| engine::Error::invalid("model", e.to_string()))?;
            }
            loss(&m, &b)?.0.reshape(1)
        });
    }
    // The z-loss reads only the router logits: the same in every implementation.
    for z in &zs {
        assert!((z - zs[0]).abs() <= 1e-12 * zs[0], "{zs:?}");
    }
    assert!(zs[0] > 0.0);
}

#[test]
fn z_loss_under_gradient_checkpointing_keeps_loss_and_gradients() {
    let b = batch();
    let run = |ckpt: bool| -> (f64, Vec<Vec<f64>>) {
        let mut m = tiny_mixlora(AdapterConfig::mixlora_default(), 0.5);
        m.set_gradient_checkpointing(ckpt);
        let (l, _) = loss(&m, &b).unwrap();
        l.backward().unwrap();
        let grads = m
            .trainable_params()
            .iter()
            .filter(|(n, _)| is_router_param(n))
            .map(|(_, t)| t.grad().unwrap().to_vec_f64().unwrap())
            .collect();
        (l.to_scalar().unwrap(), grads)
    };
    let (l0, g0) = run(false);
    let (l1, g1) = run(true);
    assert!((l0 - l1).abs() <= 1e-12 * l0.abs(), "{l0} vs {l1}");
    for (a, b) in g0.iter().zip(&g1) {
        let e = testutil::rel_err(b, a);
        assert!(e <= 1e-12, "router gradient: rel err {e}");
    }
}

/// The LM loss's gradient of every router and the adapters of a fresh tiny f64 MixLoRA (no
/// dropout, no aux or z-loss) initialised with `init`.
fn fresh_router_grads(init: AdapterInit) -> (Vec<(String, Tensor)>, f64) {
    let mut m = Llama::random(tiny_config(), 3, DType::F64, Device::Cpu).unwrap();
    m.embed_tokens = m.embed_tokens.affine(50.0, 0.0).unwrap();
    let cfg = AdapterConfig {
        num_experts: 3,
        r: 2,
        lora_dropout: 0.0,
        router_aux_loss_coef: 0.0,
        router_init_range: 0.5,
        ..AdapterConfig::mixlora_default()
    };
    m.add_adapters_with(&cfg, 1, init).unwrap();
    let b = batch();
    let out = m.forward_train(&b.tokens, Some(&b.mask), None).unwrap();
    let ce = out
        .logits
        .reshape([10, 11])
        .unwrap()
        .cross_entropy(&b.targets, IGNORE_INDEX)
        .unwrap();
    ce.backward().unwrap();
    let routers: f64 = m
        .trainable_params()
        .iter()
        .filter(|(n, _)| is_router_param(n))
        .map(|(_, t)| {
            let g = t.grad().unwrap().to_vec_f64().unwrap();
            g.iter().map(|v| v * v).sum::<f64>()
        })
        .sum::<f64>()
        .sqrt();
    (m.trainable_params(), routers)
}

#[test]
fn nonzero_expert_b_init_breaks_the_experts_symmetry() {
    let (paper, g_paper) = fresh_router_grads(AdapterInit::default());
    let (broken, g_broken) = fresh_router_grads(AdapterInit { expert_b_std: 0.1 });
    // Paper init: every expert is the frozen FFN, the top-k weights sum to 1, so the LM loss
    // does not depend on the router at all (up to rounding).
    assert!(g_paper < 1e-13, "paper init: router gradient {g_paper}");
    assert!(
        g_broken > 1e-4,
        "broken symmetry: router gradient {g_broken}"
    );
    // Only the experts' B differ; every other tensor (A, routers, attention LoRAs) is drawn as
    // before, from the same seeds.
    assert_eq!(paper.len(), broken.len());
    let mut expert_bs = 0;
    for ((n, a), (_, b)) in paper.iter().zip(&broken) {
        let (a, b) = (a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
        if is_expert_param(n) && n.ends_with("lora_B.weight") {
            expert_bs += 1;
            assert!(a.iter().all(|v| *v == 0.0), "{n}");
            assert!(b.iter().all(|v| *v != 0.0 && v.abs() < 1.0), "{n}");
        } else {
            assert_eq!(a, b, "{n}");
        }
    }
    assert_eq!(expert_bs, 2 * 3 * 3); // layers × experts × gate/up/down
    assert!(is_expert_param(
        "mixlora.layers.1.mlp.down_proj.experts.2.lora_B.weight"
    ));
    assert!(!is_expert_param(
        "mixlora.layers.1.self_attn.q_proj.lora_B.weight"
    ));
    assert!(!is_expert_param("mixlora.layers.1.mlp.moe_gate.weight"));
}
