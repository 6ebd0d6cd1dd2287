//! The shared grouped forward (`GroupMode::Shared`: one padded batch through the frozen base,
//! the adapters' LoRA grouped) against the exact one (`GroupMode::Exact`: per segment, each
//! adapter bit for bit its single run on the CPU), on the tiny LLaMA in f32: per adapter the
//! same hidden states, losses, expert loads and gradients of every parameter up to rounding
//! (relative error ‖shared − exact‖ / ‖exact‖ per tensor at most [`tol`]: 2e-5 in f32, 1e-10 in
//! f64, where a mistake of logic cannot hide in rounding), with LoRA and MixLoRA mixed, different
//! lengths, dropout, gradient checkpointing on and off, fused MixLoRA adapters of one setting
//! (one MoE call over all their experts), packed rows (segment ids in the key masks) and the
//! fallbacks.
//! Each comparison also runs a negative control (a wrong dropout seed, or the adapters of two
//! segments swapped) that must exceed the tolerance.

use engine::{DType, Device, MoeFfnOptions, Tensor};
use model::adapters::Adapters;
use model::{AdapterConfig, GroupMode, GroupSegment, Llama, MoeImpl, PeftType, RandomInit};
use testutil::gpu::rel_err;
use testutil::{ids, next_token_targets, rand_ids, tiny_llama_config};

/// The tolerance on each tensor's relative error: rounding of a few hundred operations done in
/// other orders and over other row counts (measured in f32: at most 8e-6, on the small
/// gradients of the tiny model's 4-wide key projections; in f64: 2e-14).
fn tol(d: DType) -> f64 {
    match d {
        DType::F64 => 1e-10,
        _ => 2e-5,
    }
}

/// The tiny LLaMA, frozen, in `d`.
fn base(d: DType) -> Llama {
    let c = tiny_llama_config();
    Llama::random_with(c, 7, d, Device::Cpu, RandomInit::frozen_base()).unwrap()
}

/// One adapter set: kind, rank, experts, dropout, MoE implementation, target modules (`None`:
/// the kind's default), LoRA alpha (`None`: `2r + s` for adapter set `s`, a scale of its own).
struct Spec {
    peft: PeftType,
    r: usize,
    experts: usize,
    dropout: f64,
    imp: MoeImpl,
    targets: Option<&'static [&'static str]>,
    alpha: Option<f64>,
}

fn lora(r: usize, dropout: f64, targets: Option<&'static [&'static str]>) -> Spec {
    Spec {
        peft: PeftType::Lora,
        r,
        experts: 0,
        dropout,
        imp: MoeImpl::Naive,
        targets,
        alpha: None,
    }
}

fn mixlora(r: usize, experts: usize, dropout: f64, imp: MoeImpl) -> Spec {
    Spec {
        peft: PeftType::MixLora,
        r,
        experts,
        dropout,
        imp,
        targets: None,
        alpha: None,
    }
}

/// A MixLoRA adapter of the fused implementation with LoRA alpha `alpha`: adapters of one rank,
/// expert count and alpha run their FFNs as one fused call in shared mode.
fn fused_mixlora(r: usize, experts: usize, dropout: f64, alpha: f64) -> Spec {
    Spec {
        alpha: Some(alpha),
        ..mixlora(
            r,
            experts,
            dropout,
            MoeImpl::Fused(MoeFfnOptions::default()),
        )
    }
}

/// The adapter sets of `specs`, every `B` random so that each adapter changes the outputs.
fn adapter_sets(m: &Llama, specs: &[Spec]) -> Vec<Adapters> {
    let d = m.dtype();
    specs
        .iter()
        .enumerate()
        .map(|(s, spec)| {
            let mut cfg = AdapterConfig {
                r: spec.r,
                lora_alpha: spec.alpha.unwrap_or(2.0 * spec.r as f64 + s as f64),
                lora_dropout: spec.dropout,
                num_experts: spec.experts.max(1),
                router_init_range: 1.0,
                router_aux_loss_coef: 0.01,
                ..AdapterConfig::default_for(spec.peft)
            };
            if let Some(t) = spec.targets {
                cfg.target_modules = t.iter().map(|m| m.to_string()).collect();
            }
            let mut a = Adapters::init(&cfg, &m.config, 100 + s as u64, d, Device::Cpu).unwrap();
            a.moe_impl = spec.imp;
            for (k, (name, t)) in a.named_params().into_iter().enumerate() {
                if name.contains("lora_B") {
                    let seed = 1000 * s as u64 + k as u64;
                    let v =
                        Tensor::randn(t.dims().to_vec(), 0.0, 0.3, seed, d, Device::Cpu).unwrap();
                    a.assign_param(&m.config, &name, &v).unwrap();
                }
            }
            a
        })
        .collect()
}

/// One adapter's micro-batch: ids `[b, t]`, right padding of `pad` tokens in the last row,
/// targets (the next id, ignored on padding), dropout seed.
struct Micro {
    ids: Tensor,
    mask: Tensor,
    targets: Tensor,
    seed: u64,
}

fn micro(b: usize, t: usize, pad: usize, seed: u64) -> Micro {
    let v = rand_ids(b * t, 11, seed);
    let mask: Vec<u32> = (0..b * t).map(|j| u32::from(j < b * t - pad)).collect();
    let targets = next_token_targets(&v, &mask, t);
    Micro {
        ids: ids(&v, &[b, t]),
        mask: ids(&mask, &[b, t]),
        targets: ids(&targets, &[b, t]),
        seed: 7 * seed + 1,
    }
}

/// A micro-batch of packed rows: row `r` holds sequences of the lengths `lens[r]` (key mask
/// 1, 2, .. per sequence, then padding to `t`); a target is the next id of the same sequence.
fn packed_micro(t: usize, lens: &[&[usize]], seed: u64) -> Micro {
    let b = lens.len();
    let v = rand_ids(b * t, 11, seed);
    let mut mask = vec![0u32; b * t];
    for (r, row) in lens.iter().enumerate() {
        let mut at = r * t;
        for (id, &len) in (1u32..).zip(row.iter()) {
            mask[at..at + len].fill(id);
            at += len;
        }
    }
    let targets: Vec<u32> = (0..b * t)
        .map(|j| {
            let same = (j + 1) % t != 0 && mask[j] != 0 && mask[j + 1] == mask[j];
            if same {
                v[j + 1]
            } else {
                u32::MAX
            }
        })
        .collect();
    Micro {
        ids: ids(&v, &[b, t]),
        mask: ids(&mask, &[b, t]),
        targets: ids(&targets, &[b, t]),
        seed: 7 * seed + 1,
    }
}

/// What one adapter computed, as f64 values: hidden states, loss (CE + aux), expert loads, and
/// per parameter its name and gradient (empty: none).
struct Run {
    hidden: Vec<f64>,
    loss: Vec<f64>,
    loads: Vec<Vec<f64>>,
    grads: Vec<(String, Vec<f64>)>,
}

/// The grouped forward of `micros[s]` through adapter set `s` (segments in `order`; `seeds`
/// replaces the micro-batches' dropout seeds), the sum of the losses back-propagated; per
/// segment what its adapter computed.
fn run_group(
    m: &Llama,
    micros: &[Micro],
    order: &[usize],
    seeds: impl Fn(usize) -> Option<u64>,
) -> Vec<Run> {
    let segments: Vec<_> = order
        .iter()
        .map(|&s| GroupSegment {
            adapter: s,
            ids: micros[s].ids.clone(),
            key_mask: Some(micros[s].mask.clone()),
            dropout_seed: seeds(s),
            host: None,
        })
        .collect();
    let outs = m.forward_train_group_hidden(&segments).unwrap();
    let mut total: Option<Tensor> = None;
    let mut losses = Vec::new();
    for (o, &s) in outs.iter().zip(order) {
        let mb = &micros[s];
        let ce = o
            .hidden
            .linear_cross_entropy_rows(m.lm_head_weight(), &mb.targets, u32::MAX, 4)
            .unwrap()
            .sum_all()
            .unwrap();
        let loss = match &o.aux_loss {
            Some(a) => ce.add(a).unwrap(),
            None => ce,
        };
        total = Some(match total {
            Some(t) => t.add(&loss).unwrap(),
            None => loss.clone(),
        });
        losses.push(loss);
    }
    total.unwrap().backward().unwrap();
    outs.iter()
        .zip(&losses)
        .zip(order)
        .map(|((o, loss), &s)| Run {
            hidden: o.hidden.to_vec_f64().unwrap(),
            loss: loss.to_vec_f64().unwrap(),
            loads: o
                .expert_load
                .iter()
                .map(|l| l.to_vec_f64().unwrap())
                .collect(),
            grads: m.adapter_group()[s]
                .named_params()
                .into_iter()
                .map(|(n, t)| {
                    let g = t
                        .grad()
                        .map(|g| g.to_vec_f64().unwrap())
                        .unwrap_or_default();
                    t.zero_grad();
                    (n, g)
                })
                .collect(),
        })
        .collect()
}

/// The largest relative error between two runs' tensors (an adapter's hidden states, loss,
/// loads and gradients), with what it was; panics when one has a gradient the other lacks.
fn worst(want: &Run, got: &Run) -> (f64, String) {
    let mut pairs: Vec<(String, &[f64], &[f64])> = vec![
        ("hidden".into(), &want.hidden, &got.hidden),
        ("loss".into(), &want.loss, &got.loss),
    ];
    for (i, (w, g)) in want.loads.iter().zip(&got.loads).enumerate() {
        pairs.push((format!("load {i}"), w, g));
    }
    assert_eq!(want.loads.len(), got.loads.len());
    for ((n, w), (_, g)) in want.grads.iter().zip(&got.grads) {
        assert_eq!(
            w.is_empty(),
            g.is_empty(),
            "{n}: a gradient in one run only"
        );
        pairs.push((format!("d {n}"), w, g));
    }
    pairs
        .into_iter()
        .map(|(n, w, g)| (rel_err(w, g), n))
        .fold((0.0, String::new()), |a, b| {
            if b.0 > a.0 || b.0.is_nan() {
                b
            } else {
                a
            }
        })
}

/// Compares `Shared` with `Exact` on the group of `specs` and `micros` (segments in `order`),
/// with and without gradient checkpointing; then the negative control `bad` (a change of the
/// shared run that must be seen) must exceed the tolerance.
fn check(specs: &[Spec], micros: &[Micro], order: &[usize], dropout: bool, bad: Control) {
    for d in [DType::F32, DType::F64] {
        check_in(d, specs, micros, order, dropout, bad);
    }
}

fn check_in(
    d: DType,
    specs: &[Spec],
    micros: &[Micro],
    order: &[usize],
    dropout: bool,
    bad: Control,
) {
    let tol = tol(d);
    let mut m = base(d);
    let sets = adapter_sets(&m, specs);
    let with_grads = sets.iter().map(|a| a.named_params().len()).sum::<usize>();
    m.set_adapter_group(sets).unwrap();
    let seeds = |s: usize| dropout.then(|| micros[s].seed);
    for ckpt in [false, true] {
        m.set_gradient_checkpointing(ckpt);
        m.set_group_mode(GroupMode::Exact);
        let exact = run_group(&m, micros, order, seeds);
        m.set_group_mode(GroupMode::Shared);
        let shared = run_group(&m, micros, order, seeds);
        let graded: usize = exact
            .iter()
            .map(|r| r.grads.iter().filter(|g| !g.1.is_empty()).count())
            .sum();
        assert!(
            graded * 2 > with_grads,
            "{graded} of {with_grads} have a gradient"
        );
        for ((e, s), seg) in exact.iter().zip(&shared).zip(order) {
            let (err, what) = worst(e, s);
            println!(
                "{d}, adapter {seg}, checkpointing {ckpt}: worst relative error {err:.2e} ({what})"
            );
            assert!(
                err <= tol,
                "{d}, adapter {seg} (checkpointing {ckpt}): {what} off by {err:.2e}"
            );
        }
        // The negative control: the shared run with the change must differ beyond the tolerance.
        let changed = match bad {
            Control::WrongSeed => run_group(&m, micros, order, |s| seeds(s).map(|x| x + 1)),
            Control::Swapped => {
                let mut swapped = m.take_adapter_group();
                swapped.swap(order[0], order[1]);
                m.set_adapter_group(swapped).unwrap();
                let r = run_group(&m, micros, order, seeds);
                let mut back = m.take_adapter_group();
                back.swap(order[0], order[1]);
                m.set_adapter_group(back).unwrap();
                r
            }
        };
        let seen = (exact.iter().zip(&changed)).any(|(e, c)| rel_err(&e.hidden, &c.hidden) > 1e-3);
        assert!(seen, "the negative control {bad:?} went unnoticed");
    }
}

/// The change a negative control makes to a shared run.
#[derive(Clone, Copy, Debug)]
enum Control {
    /// Every segment's dropout seed plus one.
    WrongSeed,
    /// The adapter sets of the first two segments swapped (same shapes).
    Swapped,
}

#[test]
fn shared_equals_exact_with_lora_and_mixlora_mixed() {
    let fused = MoeImpl::Fused(MoeFfnOptions::default());
    let specs = [
        lora(4, 0.1, None),
        mixlora(2, 4, 0.05, MoeImpl::Naive),
        mixlora(3, 3, 0.1, fused),
    ];
    // Batch size 2, lengths 3, 5, 4; padding inside two of them and at the end of all but one.
    let micros = [micro(2, 3, 0, 1), micro(2, 5, 2, 2), micro(2, 4, 1, 3)];
    check(&specs, &micros, &[2, 0, 1], true, Control::WrongSeed);
}

/// Packed rows (`--packing`: several sequences per row, segment ids in the key mask): the
/// shared batch gives each sequence its own positions, restarting at 0, as the exact run does.
#[test]
fn shared_equals_exact_with_packed_rows() {
    let specs = [
        lora(4, 0.0, None),
        mixlora(2, 4, 0.0, MoeImpl::Naive),
        fused_mixlora(2, 4, 0.0, 6.0),
    ];
    let micros = [
        packed_micro(7, &[&[3, 4], &[2, 2, 1]], 1),
        packed_micro(5, &[&[1, 4], &[5]], 2),
        packed_micro(6, &[&[2, 2, 2], &[3]], 3),
    ];
    check(&specs, &micros, &[1, 2, 0], false, Control::Swapped);
}

#[test]
fn shared_equals_exact_with_lora_adapters_of_different_ranks_and_targets() {
    const ATTN_QO_FFN: &[&str] = &["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    const KV_DOWN: &[&str] = &["k_proj", "v_proj", "down_proj"];
    let specs = [
        lora(4, 0.1, None),
        lora(2, 0.1, Some(ATTN_QO_FFN)),
        lora(3, 0.0, Some(KV_DOWN)),
        lora(4, 0.1, None),
    ];
    let micros = [
        micro(3, 4, 0, 1),
        micro(3, 6, 2, 2),
        micro(3, 2, 0, 3),
        micro(3, 6, 0, 4),
    ];
    // Without dropout every projection's LoRA runs as one product over the segments; with it,
    // per segment on the shared base output.
    check(&specs, &micros, &[1, 3, 0, 2], false, Control::Swapped);
    check(&specs, &micros, &[1, 3, 0, 2], true, Control::WrongSeed);
}

#[test]
fn shared_with_one_segment_equals_exact() {
    let specs = [mixlora(2, 4, 0.05, MoeImpl::Naive)];
    check(&specs, &[micro(2, 5, 1, 9)], &[0], true, Control::WrongSeed);
}

/// Fused MixLoRA adapters of one rank, expert count, top-k and scale: their FFNs run as one
/// fused call over all segments' experts (`shared_moe.rs`; that it is one call is counted in
/// group_shared_launches.rs). Without dropout it equals `Exact`; the negative control swaps two
/// adapters (a gather of local instead of global expert ids fails it too).
#[test]
fn shared_runs_fused_mixlora_adapters_as_one_moe_call() {
    let specs = [
        fused_mixlora(2, 4, 0.05, 6.0),
        fused_mixlora(2, 4, 0.1, 6.0),
        fused_mixlora(2, 4, 0.05, 6.0),
    ];
    // Batch size 2, lengths 3, 6, 4; padding inside one of them.
    let micros = [micro(2, 3, 0, 1), micro(2, 6, 2, 2), micro(2, 4, 0, 3)];
    check(&specs, &micros, &[1, 2, 0], false, Control::Swapped);
    check(&specs[..2], &micros[..2], &[0, 1], false, Control::Swapped);
}

/// With dropout the group's one MoE call (whose masks are its own, not the single runs') drops
/// on every segment's rows, the same for the same seeds. MixLoRA on the FFN only, so that only
/// the MoE call drops.
#[test]
fn shared_fused_mixlora_group_drops_on_every_segment() {
    const FFN: &[&str] = &["gate_proj", "up_proj", "down_proj"];
    let spec = || Spec {
        targets: Some(FFN),
        ..fused_mixlora(2, 4, 0.3, 6.0)
    };
    let mut m = base(DType::F32);
    m.set_adapter_group(adapter_sets(&m, &[spec(), spec(), spec()]))
        .unwrap();
    m.set_group_mode(GroupMode::Shared);
    let micros = [micro(2, 3, 0, 1), micro(2, 6, 2, 2), micro(2, 4, 0, 3)];
    let order = [2, 0, 1];
    let plain = run_group(&m, &micros, &order, |_| None);
    let dropped = run_group(&m, &micros, &order, |s| Some(micros[s].seed));
    let again = run_group(&m, &micros, &order, |s| Some(micros[s].seed));
    for (i, s) in order.iter().enumerate() {
        let e = rel_err(&plain[i].hidden, &dropped[i].hidden);
        assert!(e > 1e-3, "segment of adapter {s}: dropout changed {e:.2e}");
        assert_eq!(dropped[i].hidden, again[i].hidden, "adapter {s}");
    }
}

/// With one segment the grouped MoE call draws the single run's dropout masks (its own seed).
#[test]
fn shared_with_one_fused_mixlora_segment_equals_exact_under_dropout() {
    let specs = [fused_mixlora(2, 4, 0.1, 6.0)];
    check(&specs, &[micro(2, 5, 1, 9)], &[0], true, Control::WrongSeed);
}

/// Fused MixLoRA adapters that differ in what the fused op takes as one value (the LoRA scale,
/// the expert count) or in their MoE implementation run their FFNs per segment: still `Exact`.
#[test]
fn shared_runs_mixlora_adapters_of_different_settings_per_segment() {
    let micros = [micro(2, 3, 0, 1), micro(2, 5, 1, 2)];
    let groups = [
        [fused_mixlora(2, 4, 0.0, 6.0), fused_mixlora(2, 4, 0.0, 4.0)],
        [fused_mixlora(2, 4, 0.0, 6.0), fused_mixlora(2, 3, 0.0, 6.0)],
        [
            fused_mixlora(2, 4, 0.0, 6.0),
            Spec {
                alpha: Some(6.0),
                ..mixlora(2, 4, 0.0, MoeImpl::Naive)
            },
        ],
    ];
    for specs in &groups {
        check(specs, &micros, &[1, 0], false, Control::Swapped);
    }
}

/// Segments of different batch sizes run the exact path: bit for bit its results.
#[test]
fn shared_falls_back_to_exact_for_different_batch_sizes() {
    let mut m = base(DType::F32);
    let specs = [lora(4, 0.1, None), mixlora(2, 4, 0.05, MoeImpl::Naive)];
    m.set_adapter_group(adapter_sets(&m, &specs)).unwrap();
    let micros = [micro(2, 3, 1, 1), micro(3, 4, 0, 2)];
    let seeds = |s: usize| Some(micros[s].seed);
    m.set_group_mode(GroupMode::Exact);
    let exact = run_group(&m, &micros, &[1, 0], seeds);
    m.set_group_mode(GroupMode::Shared);
    let shared = run_group(&m, &micros, &[1, 0], seeds);
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (e, s) in exact.iter().zip(&shared) {
        assert_eq!(bits(&e.hidden), bits(&s.hidden));
        assert_eq!(bits(&e.loss), bits(&s.loss));
        for ((n, w), (_, g)) in e.grads.iter().zip(&s.grads) {
            assert_eq!(bits(w), bits(g), "gradient of {n}");
        }
    }
}

#[test]
fn group_mode_defaults_to_exact_and_can_be_set() {
    let mut m = base(DType::F32);
    assert_eq!(m.group_mode(), GroupMode::Exact);
    m.set_group_mode(GroupMode::Shared);
    assert_eq!(m.group_mode(), GroupMode::Shared);
    m.set_group_mode(None);
    assert_eq!(m.group_mode(), GroupMode::Exact);
}
