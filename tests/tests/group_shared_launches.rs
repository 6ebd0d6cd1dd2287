//! How many backend ops (on a GPU, kernel launches) one training step of an adapter group
//! issues, `GroupMode::Exact` against `GroupMode::Shared`, counted by the engine's op profile on
//! the CPU (one test in its own binary: the profile is process-wide). On a GPU a small model is
//! bound by issuing kernels, so this count is what the shared mode exists to cut. Measured on the
//! tiny model (2 layers, segments `[2, 4..6]`), N = 1 → 4: plain LoRA without dropout, exact
//! 181 → 755, shared 265 → 476; with dropout, exact 181 → 755, shared 223 → 699; MixLoRA (fused)
//! with dropout, exact 287 → 1217, shared 361 → 1333 (its per-segment FFN and dropout LoRA pay
//! the backward of per-segment row slices: one full-size padded gradient each).

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

/// The backend ops of one forward and backward of `n` segments of `[2, t_s]` tokens (lengths
/// 6, 5, 6, 4, ..: padding in the shared batch).
fn ops_per_step(m: &Llama, n: usize, dropout: bool) -> u64 {
    let segments: Vec<GroupSegment> = (0..n)
        .map(|s| {
            let t = [6, 5, 6, 4][s % 4];
            GroupSegment {
                adapter: s,
                ids: ids(&rand_ids(2 * t, 11, s as u64), &[2, t]),
                key_mask: None,
                dropout_seed: dropout.then_some(s as u64 + 1),
            }
        })
        .collect();
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
    let ops = profile::take().iter().map(|r| r.1).sum();
    profile::set_mode(ProfileMode::Off);
    ops
}

#[test]
fn shared_mode_adds_few_ops_per_lora_adapter() {
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
    let mut table = Vec::new();
    let mut lora_plain = [[0u64; 2]; 2]; // [mode][n = 1, 4]
    for (name, cfg, imp, dropout) in [
        ("LoRA, no dropout", &lora, MoeImpl::Naive, false),
        ("LoRA, dropout", &lora, MoeImpl::Naive, true),
        ("MixLoRA fused, dropout", &mix, fused, true),
    ] {
        m.set_adapter_group(sets(&m, cfg, 4, imp)).expect("group");
        for (mi, mode) in [GroupMode::Exact, GroupMode::Shared]
            .into_iter()
            .enumerate()
        {
            m.set_group_mode(mode);
            let (one, four) = (ops_per_step(&m, 1, dropout), ops_per_step(&m, 4, dropout));
            table.push(format!("{name:<24} {mode:?}: N=1 {one:>5}, N=4 {four:>5}"));
            if name == "LoRA, no dropout" {
                lora_plain[mi] = [one, four];
            }
        }
    }
    println!(
        "backend ops per step (forward + backward):\n{}",
        table.join("\n")
    );
    // Each adapter added to a shared step costs its LoRA matrices' copies into the stacked ones
    // (and their gradients'), not a run of the whole model.
    let [[exact1, exact4], [shared1, shared4]] = lora_plain;
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
}
