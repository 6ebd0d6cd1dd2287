//! How many backend ops (on a GPU, kernel launches) one training step of an adapter group
//! issues, `GroupMode::Exact` against `GroupMode::Shared`, counted by the engine's op profile on
//! the CPU (one test in its own binary: the profile is process-wide). On a GPU a small model is
//! bound by issuing kernels, so this count is what the shared mode exists to cut. Measured on the
//! tiny model (2 layers, segments `[2, 4..6]`, no gradient before the step), N = 1 → 4: plain
//! LoRA without dropout, exact 181 → 727, shared 237 → 364; with dropout, exact 181 → 727,
//! shared 195 → 587 (per-segment dropout LoRA); MixLoRA (fused, one setting) without dropout,
//! exact 275 → 1103, shared 307 → 618; with dropout, exact 287 → 1151, shared 295 → 743. In
//! shared mode the MixLoRA FFNs are one fused call per layer; what grows with N is each
//! adapter's router and aux loss, and the copies that stack its LoRA and expert matrices.

use engine::profile::{self, ProfileMode};
use engine::{DType, Device, MoeFfnOptions, Tensor};
use model::adapters::Adapters;
use model::{AdapterConfig, GroupMode, GroupSegment, Llama, MoeImpl, PeftType, RandomInit};
use testutil::{ids, rand_ids, tiny_llama_config};

/// `n` adapter sets of `cfg` (seeded apart), `moe_impl` for MixLoRA.
fn sets(m: &Llama, cfg: &AdapterConfig, n: usize, imp: MoeImpl) -> Vec<Adapters> {
    (0..n)
        .map(|s| {
            let mut a = Adapters::init(cfg, &m.config, 10 + s as u64, DType::F32, Device::Cpu)
                .expect("adapters");
            a.moe_impl = imp;
            a
        })
        .collect()
}

/// What one step issued: backend ops in all, and calls of the fused MoE op's forward pass (one
/// per `moe_ffn` call on the CPU with its default token chunk, whichever kernels it picks: the
/// tiles' forward, or the block path's forward SwiGLU).
#[derive(Clone, Copy, Debug, Default)]
struct Step {
    ops: u64,
    moe_calls: u64,
}

/// The backend ops of one forward and backward of `n` segments of `[2, t_s]` tokens (lengths
/// 6, 5, 6, 4, ..: padding in the shared batch).
fn ops_per_step(m: &Llama, n: usize, dropout: bool) -> Step {
    let segments: Vec<GroupSegment> = (0..n)
        .map(|s| {
            let t = [6, 5, 6, 4][s % 4];
            GroupSegment {
                adapter: s,
                ids: ids(&rand_ids(2 * t, 11, s as u64), &[2, t]),
                key_mask: None,
                dropout_seed: dropout.then_some(s as u64 + 1),
                host: None,
            }
        })
        .collect();
    // As a training step starts: no gradient yet (else each variable's is one add more).
    for a in m.adapter_group() {
        a.named_params().iter().for_each(|(_, t)| t.zero_grad());
    }
    profile::set_mode(ProfileMode::Wall);
    let _ = profile::take();
    let outs = m.forward_train_group_hidden(&segments).expect("forward");
    let mut loss: Option<Tensor> = None;
    for o in &outs {
        let mut l = o.hidden.sum_all().expect("sum");
        if let Some(a) = &o.aux_loss {
            l = l.add(a).expect("add");
        }
        loss = Some(match loss {
            Some(t) => t.add(&l).expect("add"),
            None => l,
        });
    }
    loss.expect("a loss").backward().expect("backward");
    let rows = profile::take();
    profile::set_mode(ProfileMode::Off);
    Step {
        ops: rows.iter().map(|r| r.1).sum(),
        moe_calls: (rows.iter())
            .filter(|r| r.0 == "moe_tiles_forward" || r.0 == "moe_swiglu_forward")
            .map(|r| r.1)
            .sum(),
    }
}

#[test]
fn shared_mode_adds_few_ops_per_adapter() {
    let mut m = Llama::random_with(
        tiny_llama_config(),
        3,
        DType::F32,
        Device::Cpu,
        RandomInit::frozen_base(),
    )
    .expect("model");
    let lora = AdapterConfig {
        r: 4,
        lora_dropout: 0.05,
        ..AdapterConfig::default_for(PeftType::Lora)
    };
    let mix = AdapterConfig {
        r: 4,
        num_experts: 4,
        lora_dropout: 0.05,
        ..AdapterConfig::default_for(PeftType::MixLora)
    };
    let fused = MoeImpl::Fused(MoeFfnOptions::default());
    let layers = m.config.num_hidden_layers as u64;
    let mut table = Vec::new();
    // [mode][n = 1, 4] of the plain LoRA and the MixLoRA rows.
    let (mut lora_plain, mut moe) = ([[Step::default(); 2]; 2], [[[Step::default(); 2]; 2]; 2]);
    for (name, cfg, imp, dropout) in [
        ("LoRA, no dropout", &lora, MoeImpl::Naive, false),
        ("LoRA, dropout", &lora, MoeImpl::Naive, true),
        ("MixLoRA fused, no dropout", &mix, fused, false),
        ("MixLoRA fused, dropout", &mix, fused, true),
    ] {
        m.set_adapter_group(sets(&m, cfg, 4, imp)).expect("group");
        for (mi, mode) in [GroupMode::Exact, GroupMode::Shared]
            .into_iter()
            .enumerate()
        {
            m.set_group_mode(mode);
            let (one, four) = (ops_per_step(&m, 1, dropout), ops_per_step(&m, 4, dropout));
            table.push(format!(
                "{name:<26} {mode:?}: N=1 {:>5}, N=4 {:>5} (moe_ffn calls {} -> {})",
                one.ops, four.ops, one.moe_calls, four.moe_calls
            ));
            match name {
                "LoRA, no dropout" => lora_plain[mi] = [one, four],
                "MixLoRA fused, no dropout" => moe[0][mi] = [one, four],
                "MixLoRA fused, dropout" => moe[1][mi] = [one, four],
                _ => {}
            }
        }
    }
    println!(
        "backend ops per step (forward + backward):\n{}",
        table.join("\n")
    );
    // Each adapter added to a shared step costs its LoRA matrices' copies into the stacked ones
    // (and their gradients'), not a run of the whole model.
    let [[exact1, exact4], [shared1, shared4]] = lora_plain.map(|r| r.map(|s| s.ops));
    assert!(
        (shared4 - shared1) * 2 <= exact4 - exact1,
        "LoRA, 3 adapters more: shared {} ops more, exact {}",
        shared4 - shared1,
        exact4 - exact1
    );
    assert!(
        shared4 * 3 <= exact4 * 2,
        "4 LoRA adapters: shared {shared4} ops, exact {exact4}"
    );
    // MixLoRA adapters of one setting: one fused MoE call per layer whatever N, so each adapter
    // added costs its router, its aux loss and the copies of its experts into the stacked ones
    // (and, with dropout, its attention LoRA per segment).
    for (i, [[exact1, exact4], [shared1, shared4]]) in moe.into_iter().enumerate() {
        let (what, at_most) = [("no dropout", 1.0 / 2.0), ("dropout", 2.0 / 3.0)][i];
        assert_eq!(
            (exact4.moe_calls, shared4.moe_calls),
            (4 * layers, layers),
            "MixLoRA ({what}), 4 adapters: moe_ffn calls exact, shared"
        );
        let (grow_exact, grow_shared) = (exact4.ops - exact1.ops, shared4.ops - shared1.ops);
        assert!(
            grow_shared as f64 <= at_most * grow_exact as f64,
            "MixLoRA ({what}), 3 adapters more: shared {grow_shared} ops more, exact {grow_exact}"
        );
    }
}
