//! `--pack-micro-batches`: each micro-batch's own examples packed into rows (block-diagonal
//! attention, positions restarting in each example). The same examples make each step as
//! without it, so with dropout off the losses are the default path's up to rounding, kernel by
//! kernel (`--cuda-graphs off`) and in fixed shapes (`eager`, the path CUDA graphs record,
//! whose micro-batches then keep their own number of rows); the run says so in its log, and
//! `--packing` with it is refused.

mod common;

use std::path::Path;

use common::losses;
use model::adapters::PeftType;
use trainer::config::{CudaGraphs, TrainConfig};
use trainer::run::train;

/// Batch 4 in micro-batches of 2 with the synthetic tasks' ragged lengths: two examples fit in
/// one row of 1024 tokens, so each micro-batch packs into one row where it had two.
fn small(out: &Path, adapter: PeftType, pack: bool, graphs: CudaGraphs) -> TrainConfig {
    TrainConfig {
        out_dir: out.to_path_buf(),
        adapter,
        batch_size: 4,
        micro_batch_size: 2,
        cutoff_len: 1024,
        epochs: 1,
        max_steps: Some(6),
        save_every: 0,
        eval_every: 0,
        eval_limit: Some(2),
        log_every: 1,
        lr: 3e-3,
        dropout: 0.0,
        pack_micro_batches: pack,
        cuda_graphs: graphs,
        ..TrainConfig::default()
    }
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-30)
}

/// The losses of a run, and its log.
fn run(adapter: PeftType, pack: bool, graphs: CudaGraphs) -> (Vec<(u64, f64)>, Vec<String>) {
    let out = common::out_dir("packmicro", &format!("{adapter}-{pack}-{graphs:?}"));
    let mut lines = Vec::new();
    train(&small(&out, adapter, pack, graphs), |l| {
        lines.push(l.to_string())
    })
    .unwrap();
    let l = losses(&out);
    let _ = std::fs::remove_dir_all(&out);
    (l, lines)
}

#[test]
fn packed_micro_batches_train_as_the_padded_ones() {
    for adapter in [PeftType::MixLora, PeftType::Lora] {
        let (padded, _) = run(adapter, false, CudaGraphs::Off);
        let (packed, lines) = run(adapter, true, CudaGraphs::Off);
        let (fixed, fixed_lines) = run(adapter, true, CudaGraphs::Eager);
        assert_eq!(padded.len(), 6);
        // Not the very same computation: rows of two examples round otherwise than two rows.
        assert_ne!(padded, packed, "{adapter}: packing changed nothing");
        for (what, other) in [("packed", &packed), ("packed, fixed shapes", &fixed)] {
            assert_eq!(other.len(), 6, "{what}");
            // The same sums over other rows: attention and the per-token products round
            // differently, nothing more. A lost, repeated or cross-attending example would move
            // the losses by far more.
            for ((s, a), (_, b)) in padded.iter().zip(other.iter()) {
                assert!(
                    relative(*a, *b) < 1e-5,
                    "{adapter} step {s}: padded {a} vs {what} {b}"
                );
            }
        }
        assert!(
            lines
                .iter()
                .any(|l| l.contains("each micro-batch's packed into rows of up to 1024 tokens")),
            "the run says it packs: {lines:?}"
        );
        let summary = fixed_lines
            .iter()
            .find(|l| l.starts_with("fixed-shape micro-steps"))
            .expect("the run says how many shapes it used");
        assert!(summary.contains("of at most 2 rows"), "{summary}");
    }
}

#[test]
fn the_packing_of_micro_batches_is_deterministic_and_differs_from_padding_only_in_rounding() {
    // With dropout on, two runs agree exactly.
    let go = |name: &str| {
        let out = common::out_dir("packmicro", name);
        let cfg = TrainConfig {
            dropout: 0.05,
            ..small(&out, PeftType::MixLora, true, CudaGraphs::Off)
        };
        train(&cfg, |_| {}).unwrap();
        let l = losses(&out);
        let _ = std::fs::remove_dir_all(&out);
        l
    };
    let (a, b) = (go("drop-a"), go("drop-b"));
    assert_eq!(a.len(), 6);
    assert!(a.iter().all(|(_, l)| l.is_finite()));
    assert_eq!(a, b, "two runs with packed micro-batches differ");
}

#[test]
fn packing_and_packed_micro_batches_together_are_refused() {
    let out = common::out_dir("packmicro", "both");
    let cfg = TrainConfig {
        packing: true,
        ..small(&out, PeftType::Lora, true, CudaGraphs::Off)
    };
    let e = train(&cfg, |_| {}).unwrap_err().to_string();
    assert!(
        e.contains("packing") && e.contains("pack_micro_batches") && !e.contains('\n'),
        "{e}"
    );
    assert!(!out.exists(), "nothing is written for a refused run");
}
