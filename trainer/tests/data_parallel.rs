//! Data-parallel training with the in-process communicator (ranks as threads): the same losses,
//! adapter and optimizer files, bit for bit, as one process running the same global batch, for
//! 2 and 3 ranks, with MixLoRA (fused and naive), LoRA, packed micro-batches, gradient
//! checkpointing and several adapters on one base; a run resumed on another number of ranks continues the same trajectory;
//! a rank that leaves or hangs stops the others with a clear error within the timeout.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::losses;
use engine::dist::FakeComm;
use model::adapters::PeftType;
use model::MoeImpl;
use trainer::config::{PlannedAdapter, RunPlan, SharedSettings, TrainConfig};
use trainer::run::{train_plan, AdapterOutcome, RunControl};

fn out_dir(name: &str) -> PathBuf {
    common::out_dir("dp", name)
}

const TIMEOUT: Duration = Duration::from_secs(120);

/// A short run: `batch` examples a step in micro-batches of one (so ranks split the step), a
/// checkpoint every 2 steps, a small evaluation at the end.
fn config(out: &Path, batch: usize, steps: usize) -> TrainConfig {
    TrainConfig {
        batch_size: batch,
        micro_batch_size: 1,
        cutoff_len: 160,
        max_steps: Some(steps),
        save_every: 2,
        eval_every: 0,
        eval_limit: Some(2),
        log_every: 1,
        lr: 2e-3,
        out_dir: out.to_path_buf(),
        ..TrainConfig::default()
    }
}

fn plan_of(configs: Vec<(&str, TrainConfig)>) -> RunPlan {
    let adapters: Vec<PlannedAdapter> = configs
        .into_iter()
        .map(|(name, config)| PlannedAdapter {
            name: name.into(),
            config,
        })
        .collect();
    RunPlan {
        shared: SharedSettings::of(&adapters[0].config),
        adapters,
    }
}

/// Runs `plan` on `world` ranks (threads), each with `ctl`'s other settings; returns rank 0's
/// outcomes and the other ranks' results.
fn run_ranks(
    plan: &RunPlan,
    world: usize,
    stop_after: Option<usize>,
) -> Vec<trainer::Result<Vec<AdapterOutcome>>> {
    let comms = FakeComm::world(world, TIMEOUT);
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                s.spawn(move || {
                    let ctl = RunControl {
                        comm: Some(&comm),
                        stop_after,
                        ..RunControl::default()
                    };
                    train_plan(plan, ctl, |_| {})
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn assert_all_ok(results: &[trainer::Result<Vec<AdapterOutcome>>]) {
    for (rank, r) in results.iter().enumerate() {
        match r {
            Ok(outcomes) => {
                for o in outcomes {
                    assert!(o.result.is_ok(), "rank {rank}: {}: {:?}", o.name, o.result);
                }
            }
            Err(e) => panic!("rank {rank}: {e}"),
        }
    }
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The runs in `a` and `b` are the same: losses (and every other metric but the clock), final
/// adapter, the last checkpoint's optimizer state and trainer state.
fn assert_same_run(name: &str, a: &Path, b: &Path, steps: usize) {
    let (la, lb) = (losses(a), losses(b));
    assert_eq!(la.len(), steps, "{name}");
    assert_eq!(la, lb, "{name}: the losses differ");
    let metrics = |d: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                let o = v.as_object_mut().unwrap();
                o.remove("tokens_per_s");
                o.remove("elapsed_s");
                v
            })
            .collect()
    };
    assert_eq!(metrics(a), metrics(b), "{name}: the metrics differ");
    for f in [
        "adapter/adapter_model.safetensors".to_string(),
        "adapter/adapter_config.json".to_string(),
        format!("checkpoint-{steps}/optimizer.safetensors"),
        format!("checkpoint-{steps}/adapter_model.safetensors"),
    ] {
        assert!(
            bytes(&a.join(&f)) == bytes(&b.join(&f)),
            "{name}: {f} differs"
        );
    }
}

/// One process, then 2 and 3 ranks, of the plan `make(out)` gives for each output folder: the
/// same run each time.
fn same_on_any_world(tag: &str, steps: usize, make: impl Fn(&Path) -> RunPlan) {
    let root = out_dir(tag);
    let one = make(&root.join("w1"));
    train_plan(&one, RunControl::default(), |_| {}).unwrap();
    // A world of one goes through the data-parallel path too (gather and replay).
    for world in [1, 2, 3] {
        let plan = make(&root.join(format!("dp{world}")));
        assert_all_ok(&run_ranks(&plan, world, None));
        for (a, b) in one.adapters.iter().zip(&plan.adapters) {
            assert_same_run(
                &format!("{tag} {} on {world} ranks", a.name),
                &a.config.out_dir,
                &b.config.out_dir,
                steps,
            );
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn mixlora_fused_on_2_and_3_ranks_equals_one_process() {
    // 6 micro-batches a step: 3 a rank on 2 ranks, 2 on 3.
    same_on_any_world("fused", 4, |out| {
        let c = TrainConfig {
            moe_impl: Some(MoeImpl::Fused(Default::default())),
            ..config(out, 6, 4)
        };
        plan_of(vec![("mix", c)])
    });
}

#[test]
fn the_variants_beyond_the_paper_on_2_and_3_ranks_equal_one_process() {
    // The router z-loss travels in each micro-batch's record beside the aux loss; the router's
    // own learning rate and the experts' B init act on every rank alike.
    same_on_any_world("variants", 3, |out| {
        let c = TrainConfig {
            moe_impl: Some(MoeImpl::Fused(Default::default())),
            router_z_loss: 1e-2,
            router_lr_scale: 10.0,
            expert_b_init_std: 1e-2,
            ..config(out, 6, 3)
        };
        plan_of(vec![("mix", c)])
    });
}

#[test]
fn lora_with_uneven_shards_equals_one_process() {
    // 4 micro-batches a step: on 3 ranks, rank 0 runs two and the others one.
    same_on_any_world("lora", 3, |out| {
        let c = TrainConfig {
            adapter: PeftType::Lora,
            rank: 4,
            alpha: 8.0,
            dropout: 0.1,
            ..config(out, 4, 3)
        };
        plan_of(vec![("lora", c)])
    });
}

#[test]
fn packed_micro_batches_on_2_and_3_ranks_equal_one_process() {
    // Micro-batches of 3 examples packed into rows (of up to 1024 tokens), 2 a step: each rank
    // packs the micro-batches it runs as one process does.
    same_on_any_world("packmicro", 3, |out| {
        let c = TrainConfig {
            micro_batch_size: 3,
            cutoff_len: 1024,
            pack_micro_batches: true,
            ..config(out, 6, 3)
        };
        plan_of(vec![("mix", c)])
    });
}

#[test]
fn gradient_checkpointing_and_several_adapters_equal_one_process() {
    // Two adapters on one base with different micro-batch counts (6 and 2 a step: on 3 ranks,
    // rank 2 runs no micro-batch of the second), gradient checkpointing on.
    same_on_any_world("group", 3, |out| {
        let mix = TrainConfig {
            gradient_checkpointing: true,
            moe_impl: Some(MoeImpl::Naive),
            ..config(&out.join("mix"), 6, 3)
        };
        let lora = TrainConfig {
            adapter: PeftType::Lora,
            rank: 4,
            alpha: 8.0,
            lr: 3e-3,
            ..mix.clone()
        };
        let lora = TrainConfig {
            batch_size: 4,
            micro_batch_size: 2,
            out_dir: out.join("lora"),
            ..lora
        };
        plan_of(vec![("mix", mix), ("lora", lora)])
    });
}

#[test]
fn a_run_of_2_ranks_resumes_on_3_ranks_and_on_1() {
    let root = out_dir("resume");
    let steps = 5;
    let make = |d: &str| {
        plan_of(vec![(
            "mix",
            TrainConfig {
                moe_impl: Some(MoeImpl::Fused(Default::default())),
                ..config(&root.join(d), 6, steps)
            },
        )])
    };
    let whole = make("whole");
    train_plan(&whole, RunControl::default(), |_| {}).unwrap();
    let mut outs = Vec::new();
    for (tag, world) in [("on3", 3), ("on1", 1)] {
        // Two ranks stop after step 2 (its checkpoint is due), as if killed there.
        let part = make(tag);
        assert_all_ok(&run_ranks(&part, 2, Some(2)));
        let ckpt = part.adapters[0].config.out_dir.join("checkpoint-2");
        assert!(ckpt.is_dir(), "{}", ckpt.display());
        let mut resumed = part.clone();
        resumed.adapters[0].config.resume = true;
        if world == 1 {
            train_plan(&resumed, RunControl::default(), |_| {}).unwrap();
        } else {
            assert_all_ok(&run_ranks(&resumed, world, None));
        }
        outs.push((tag, part));
    }
    for (tag, part) in outs {
        assert_same_run(
            &format!("resumed {tag}"),
            &whole.adapters[0].config.out_dir,
            &part.adapters[0].config.out_dir,
            steps,
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn only_rank_0_writes() {
    let root = out_dir("writer");
    // Each rank its own folder: rank 0's gets the run, the others' stay empty.
    let comms = FakeComm::world(2, TIMEOUT);
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(r, comm)| {
                let plan = plan_of(vec![("mix", config(&root.join(format!("r{r}")), 2, 2))]);
                s.spawn(move || {
                    let mut lines = Vec::new();
                    let ctl = RunControl {
                        comm: Some(&comm),
                        ..RunControl::default()
                    };
                    let r = train_plan(&plan, ctl, |l| lines.push(l.to_string()));
                    (r, lines)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(results.iter().all(|(r, _)| r.is_ok()));
    assert!(!results[0].1.is_empty());
    assert!(results[1].1.is_empty(), "rank 1 logged {:?}", results[1].1);
    assert!(root.join("r0/adapter/adapter_model.safetensors").is_file());
    assert!(root.join("r0/checkpoint-2").is_dir());
    let r1 = root.join("r1");
    assert!(
        !r1.exists() || std::fs::read_dir(&r1).unwrap().next().is_none(),
        "rank 1 wrote into {}",
        r1.display()
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// Rank 2 of 3 leaves (`leave`) or hangs: the others stop with an error naming it.
fn lost_rank(tag: &str, leave: bool) -> (Vec<String>, Duration) {
    let root = out_dir(tag);
    let plan = plan_of(vec![("mix", config(&root, 6, 3))]);
    let comms = FakeComm::world(3, Duration::from_secs(2));
    let t0 = Instant::now();
    let errs = std::thread::scope(|s| {
        let mut hs = Vec::new();
        for comm in comms {
            let plan = &plan;
            hs.push(s.spawn(move || {
                if engine::dist::Communicator::rank(&comm) == 2 {
                    if leave {
                        drop(comm); // the rank died before its first collective
                    } else {
                        std::thread::sleep(Duration::from_secs(6)); // it hangs
                    }
                    return None;
                }
                let ctl = RunControl {
                    comm: Some(&comm),
                    ..RunControl::default()
                };
                Some(train_plan(plan, ctl, |_| {}).unwrap_err().to_string())
            }));
        }
        hs.into_iter()
            .filter_map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    let _ = std::fs::remove_dir_all(&root);
    (errs, t0.elapsed())
}

#[test]
fn a_rank_that_dies_stops_the_others_with_a_clear_error() {
    let (errs, _) = lost_rank("dies", true);
    assert_eq!(errs.len(), 2);
    for e in &errs {
        assert!(e.contains("rank 2 left the run"), "{e}");
    }
}

#[test]
fn a_rank_that_hangs_stops_the_others_within_the_timeout() {
    let (errs, _) = lost_rank("hangs", false);
    assert_eq!(errs.len(), 2);
    for e in &errs {
        assert!(
            e.contains("no answer from rank [2] within 2.0 s") && e.contains("hangs"),
            "{e}"
        );
    }
}
