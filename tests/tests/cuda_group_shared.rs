//! The shared grouped forward on CUDA in bf16 (`GroupMode::Shared`) against
//! each adapter alone (`Llama::forward_train_hidden` with the adapter attached, on its own
//! micro-batch): hidden states, losses and every parameter's gradient (a layer's experts of one
//! projection together) within bf16 tolerances on relative error, with LoRA and MixLoRA (fused) mixed, different lengths, dropout, gradient
//! checkpointing on and off; MixLoRA adapters of one setting (their FFNs one fused MoE call over
//! all segments' experts) without dropout; and a negative control (two adapters swapped). Skips,
//! saying why, without a GPU.

use engine::{DType, Device, Tensor};
use model::adapters::Adapters;
use model::{AdapterConfig, GroupMode, GroupSegment, Llama, MoeImpl, PeftType, RandomInit};
use testutil::gpu::{device as gpu, rel_err, serial, tol};
use testutil::{gpu_llama_config, lm_loss_plus_aux, next_token_targets, rand_ids};

/// Adapters of `kinds`: LoRA r=8 and MixLoRA r=8 (4 experts, top-2, the fused op), alpha 16,
/// dropout 0.05, random `B`s.
fn adapter_sets(m: &Llama, d: Device, kinds: &[PeftType]) -> Vec<Adapters> {
    kinds
        .iter()
        .copied()
        .enumerate()
        .map(|(s, peft)| {
            let cfg = AdapterConfig {
                r: 8,
                lora_alpha: 16.0,
                lora_dropout: 0.05,
                num_experts: 4,
                router_init_range: 1.0,
                ..AdapterConfig::default_for(peft)
            };
            let mut a = Adapters::init(&cfg, &m.config, 50 + s as u64, DType::BF16, d).unwrap();
            a.moe_impl = MoeImpl::for_device(d);
            for (k, (name, t)) in a.named_params().into_iter().enumerate() {
                if name.contains("lora_B") {
                    let seed = 100 * s as u64 + k as u64;
                    let v = Tensor::randn(t.dims().to_vec(), 0.0, 0.1, seed, t.dtype(), d).unwrap();
                    a.assign_param(&m.config, &name, &v).unwrap();
                }
            }
            a
        })
        .collect()
}

/// The tolerances on relative error beyond the loss's (the bf16 one, 1e-2): bf16 hidden states
/// rounded along other paths differ by an ulp or two in many elements, and gradients sum more
/// such steps (the router's most). Measured with this test's model in bf16 on the CPU: hidden
/// states 1.3e-2, loss 3.6e-4, gradients 5.8e-2 (a router's; expert LoRA 4.1e-2); with three
/// MixLoRA adapters (the grouped MoE call) hidden states 1.6e-2, router gradients 1.7e-1, the
/// experts of one (layer, projection, A|B) together 7.5e-2, one expert alone up to 1.25e-1 (a
/// top-k choice that rounding flips moves a token's share between experts, and a router's small
/// gradient a lot). On an H100 one expert alone reached 1.50e-1 (2026-12-07), hence the
/// comparison of the experts together.
const HIDDEN_TOL: f64 = 3e-2;
const GRAD_TOL: f64 = 1.5e-1;
const ROUTER_GRAD_TOL: f64 = 3.5e-1;

/// Hidden states, loss and gradients (name, values) of one adapter.
type Run = (Vec<f64>, f64, Vec<(String, Vec<f64>)>);

/// `grads` with the experts of one (layer, projection, A|B) merged into one entry named
/// `...experts.*...`: their values concatenated in the order of `grads` (the adapter's
/// `named_params`, the same on both sides). Other entries pass through, in order.
fn by_expert_union(grads: &[(String, Vec<f64>)]) -> Vec<(String, Vec<f64>)> {
    let mut out: Vec<(String, Vec<f64>)> = Vec::new();
    for (n, v) in grads {
        let key = match n.split_once(".experts.") {
            Some((head, tail)) => {
                let rest = tail.split_once('.').map_or("", |(_, r)| r);
                format!("{head}.experts.*.{rest}")
            }
            None => n.clone(),
        };
        match out.iter_mut().find(|(k, _)| *k == key) {
            Some((_, acc)) => acc.extend_from_slice(v),
            None => out.push((key, v.clone())),
        }
    }
    out
}

fn grads(a: &Adapters) -> Vec<(String, Vec<f64>)> {
    a.named_params()
        .into_iter()
        .map(|(n, t)| {
            let g = t
                .grad()
                .map(|g| g.to_vec_f64().unwrap())
                .unwrap_or_default();
            t.zero_grad();
            (n, g)
        })
        .collect()
}

#[test]
fn shared_group_on_cuda_matches_each_adapter_alone_in_bf16() {
    let kinds = [PeftType::Lora, PeftType::MixLora, PeftType::Lora];
    check_against_alone(&kinds, true);
}

/// Three MixLoRA adapters of one setting: one fused MoE call per layer over their 12 experts.
/// Without dropout (with it, the group's one call draws masks of its own).
#[test]
fn shared_fused_mixlora_group_on_cuda_matches_each_adapter_alone_in_bf16() {
    check_against_alone(&[PeftType::MixLora; 3], false);
}

/// The group of `kinds` in shared mode against each adapter alone, with or without dropout.
fn check_against_alone(kinds: &[PeftType; 3], dropout: bool) {
    let _lock = serial();
    let Some(d) = gpu() else { return };
    let mut m = Llama::random_with(
        gpu_llama_config(),
        3,
        DType::BF16,
        d,
        RandomInit::frozen_base(),
    )
    .unwrap();
    let sets = adapter_sets(&m, d, kinds);
    m.set_group_mode(GroupMode::Shared);
    // Batch size 4, lengths 24, 17, 31; right padding in the last row of each.
    let (b, lens) = (4, [24usize, 17, 31]);
    let micro = |s: usize| {
        let t = lens[s];
        let v = rand_ids(b * t, 64, s as u64);
        let mask: Vec<u32> = (0..b * t).map(|j| u32::from(j < b * t - 3)).collect();
        let targets = next_token_targets(&v, &mask, t);
        let u = |x: Vec<u32>| Tensor::from_vec(x, [b, t], d).unwrap();
        (
            u(v),
            u(mask),
            u(targets),
            dropout.then_some(11 * s as u64 + 5),
        )
    };
    let micros: Vec<_> = (0..3).map(micro).collect();
    let mut alone: Vec<Run> = Vec::new();
    for (a, (ids, mask, targets, seed)) in sets.iter().zip(&micros) {
        m.set_adapters(a.clone()).unwrap();
        let out = m.forward_train_hidden(ids, Some(mask), *seed).unwrap();
        let l = lm_loss_plus_aux(&m, &out.hidden, out.aux_loss.as_ref(), targets);
        l.backward().unwrap();
        let h = out.hidden.to_vec_f64().unwrap();
        alone.push((h, l.to_vec_f64().unwrap()[0], grads(a)));
    }
    m.remove_adapters();
    m.set_adapter_group(sets.clone()).unwrap();
    for ckpt in [false, true] {
        m.set_gradient_checkpointing(ckpt);
        let order = [1, 2, 0];
        let segments: Vec<GroupSegment> = order
            .iter()
            .map(|&s| GroupSegment {
                adapter: s,
                ids: micros[s].0.clone(),
                key_mask: Some(micros[s].1.clone()),
                dropout_seed: micros[s].3,
                host: None,
            })
            .collect();
        let outs = m.forward_train_group_hidden(&segments).unwrap();
        let losses: Vec<Tensor> = (outs.iter().zip(order))
            .map(|(o, s)| lm_loss_plus_aux(&m, &o.hidden, o.aux_loss.as_ref(), &micros[s].2))
            .collect();
        let mut total = losses[0].clone();
        for l in &losses[1..] {
            total = total.add(l).unwrap();
        }
        total.backward().unwrap();
        for ((o, l), s) in outs.iter().zip(&losses).zip(order) {
            let (h, want_loss, want_grads) = &alone[s];
            let what = format!("adapter {s}, checkpointing {ckpt}");
            let e = rel_err(h, &o.hidden.to_vec_f64().unwrap());
            assert!(e <= HIDDEN_TOL, "{what}: hidden states off by {e:.2e}");
            let e = rel_err(&[*want_loss], &l.to_vec_f64().unwrap());
            assert!(e <= tol(DType::BF16), "{what}: loss off by {e:.2e}");
            // Every gradient's error, the largest first, printed before the check. An expert's
            // LoRA gradient sums over the tokens routed to it, and rounding along the two paths
            // flips the top-k choice of the odd token near a tie: that moves a token's share
            // from one expert to another, a large change for an expert with few tokens but not
            // for the layer's experts together. So the experts of one (layer, projection, A|B)
            // are compared as one tensor, their gradients concatenated; every
            // other parameter on its own.
            let got = grads(&sets[s]);
            let mut errs: Vec<(f64, f64, String)> = by_expert_union(want_grads)
                .into_iter()
                .zip(by_expert_union(&got))
                .map(|((n, w), (_, g))| {
                    let tol = match n.contains("moe_gate") {
                        true => ROUTER_GRAD_TOL,
                        false => GRAD_TOL,
                    };
                    (rel_err(&w, &g), tol, n)
                })
                .collect();
            errs.sort_by(|a, b| b.0.total_cmp(&a.0));
            let median = errs[errs.len() / 2].0;
            eprintln!(
                "{what}: {} gradients, median error {median:.2e}; largest:",
                errs.len()
            );
            for (e, tol, n) in errs.iter().take(4) {
                eprintln!("  {e:.3e} (tolerance {tol:.1e}) {n}");
            }
            let mut single: Vec<(f64, &str)> = want_grads
                .iter()
                .zip(&got)
                .filter(|((n, _), _)| n.contains(".experts."))
                .map(|((n, w), (_, g))| (rel_err(w, g), n.as_str()))
                .collect();
            single.sort_by(|a, b| b.0.total_cmp(&a.0));
            if let Some((e, n)) = single.first() {
                eprintln!("  (one expert alone at most {e:.3e}: {n})");
            }
            for (e, tol, n) in &errs {
                assert!(e <= tol, "{what}: gradient of {n} off by {e:.2e}");
            }
        }
    }
    // The negative control: with adapters 0 and 2 swapped, the hidden states of their segments
    // are far off.
    let mut swapped = m.take_adapter_group();
    swapped.swap(0, 2);
    m.set_adapter_group(swapped).unwrap();
    let seg = |s: usize| GroupSegment {
        adapter: s,
        ids: micros[s].0.clone(),
        key_mask: Some(micros[s].1.clone()),
        dropout_seed: micros[s].3,
        host: None,
    };
    let outs = engine::no_grad(|| m.forward_train_group_hidden(&[seg(0), seg(2)])).unwrap();
    let e = rel_err(&alone[0].0, &outs[0].hidden.to_vec_f64().unwrap());
    assert!(
        e > 3.0 * HIDDEN_TOL,
        "swapped adapters went unnoticed ({e:.2e})"
    );
}
