//! The CPU's count of live tensor buffers (`engine::memory_stats(Device::Cpu)`): allocation and
//! free move the current bytes, the peak holds until a reset, a view shares its buffer's count;
//! and what the count shows of the fused MixLoRA FFN on the CPU (no `[T·k, I]` slot tensor) and
//! of flash attention (no `[b, hq, t, s]` probabilities), and of several adapters trained one
//! after another (`GroupMode::Sequential`: one adapter's activations at a time).
//!
//! The count is one per process, so this binary holds a single test that runs its checks in
//! order (other tests allocating at the same time would move the figures).

use engine::{DType, Device, MoeFfnOptions, Tensor};
use model::adapters::{ExpertLora, LoraLinear, MixLoraFfn, MoeImpl, Router, Routing, SharedFfn};

const CPU: Device = Device::Cpu;

fn current() -> usize {
    engine::memory_stats(CPU).0
}

fn peak() -> usize {
    engine::memory_stats(CPU).1
}

fn zeros_f32(n: usize) -> Tensor {
    Tensor::zeros([n], DType::F32, CPU).unwrap()
}

/// A tensor's buffer counts its bytes from creation to the drop of its last handle.
fn allocation_and_free_move_current() {
    let before = current();
    let a = zeros_f32(1000);
    assert_eq!(current(), before + 4000, "a 1000-element f32 buffer");
    let b = Tensor::zeros([10, 10], DType::F64, CPU).unwrap();
    assert_eq!(current(), before + 4000 + 800, "and a 100-element f64 one");
    drop(a);
    assert_eq!(current(), before + 800, "the f32 buffer freed");
    drop(b);
    assert_eq!(current(), before, "both freed");
}

/// The peak holds the highest current since the last reset; a reset brings it to the current.
fn peak_and_reset() {
    let base = current();
    engine::reset_peak_memory(CPU);
    assert_eq!(peak(), base, "a reset starts the peak at the current use");
    let big = zeros_f32(1 << 16);
    drop(big);
    let small = zeros_f32(1 << 10);
    assert_eq!(current(), base + (4 << 10));
    assert_eq!(
        peak(),
        base + (4 << 16),
        "the freed big buffer is still the peak"
    );
    engine::reset_peak_memory(CPU);
    assert_eq!(peak(), base + (4 << 10), "after a reset, the current use");
    drop(small);
    assert_eq!(peak(), base + (4 << 10), "a free does not lower the peak");
}

/// Views, clones and variables over a buffer add nothing; the buffer is freed with the last one.
fn views_do_not_count_twice() {
    let before = current();
    let a = Tensor::zeros([64, 32], DType::F32, CPU).unwrap();
    let bytes = 64 * 32 * 4;
    assert_eq!(current(), before + bytes);
    let views = [
        a.clone(),
        a.narrow(0, 8, 16).unwrap(),
        a.t().unwrap(),
        a.reshape([32, 64]).unwrap(),
        a.detach(),
    ];
    assert_eq!(current(), before + bytes, "views share the buffer's count");
    drop(a);
    assert_eq!(current(), before + bytes, "the views keep the buffer alive");
    drop(views);
    assert_eq!(current(), before, "freed with the last view");
    // A computed tensor owns a new buffer; a copy of a view counts the view's elements only.
    let a = Tensor::zeros([64, 32], DType::F32, CPU).unwrap();
    let c = a.narrow(1, 0, 8).unwrap().contiguous().unwrap(); // [64, 8]: a copy
    assert_eq!(current(), before + bytes + 64 * 8 * 4);
    drop((a, c));
    assert_eq!(current(), before);
}

/// A MixLoRA FFN at small sizes: T tokens, H, I, E experts, top-k, rank r, f32.
struct Ffn {
    block: MixLoraFfn,
    w: [Tensor; 3],
    x: Tensor,
    c: Tensor,
}

const T: usize = 1024;
const H: usize = 32;
const I: usize = 96;
const E: usize = 4;
const K: usize = 2;
const R: usize = 4;

fn ffn() -> Ffn {
    let rand = |shape: &[usize], seed: u64| {
        Tensor::randn(shape.to_vec(), 0.0, 0.2, seed, DType::F32, CPU).unwrap()
    };
    let lora = |a: &[usize], b: &[usize], seed: u64| {
        Some(LoraLinear::new(
            rand(a, seed).to_var().unwrap(),
            rand(b, seed + 1).to_var().unwrap(),
            2.0,
            0.0,
        ))
    };
    let experts = (0..E as u64)
        .map(|e| ExpertLora {
            gate: lora(&[R, H], &[I, R], 10 * e + 100),
            up: lora(&[R, H], &[I, R], 10 * e + 102),
            down: lora(&[R, I], &[H, R], 10 * e + 104),
        })
        .collect();
    Ffn {
        block: MixLoraFfn {
            router: Router {
                weight: rand(&[E, H], 1).to_var().unwrap(),
                routing: Routing::TopK(K),
            },
            experts,
        },
        w: [rand(&[I, H], 2), rand(&[I, H], 3), rand(&[H, I], 4)],
        x: rand(&[T, H], 5).to_var().unwrap(),
        c: rand(&[T, H], 6),
    }
}

/// The peak bytes of one forward + backward above what was live before it.
fn activation_peak(f: &Ffn, imp: MoeImpl) -> usize {
    let before = current();
    engine::reset_peak_memory(CPU);
    {
        let shared = SharedFfn {
            gate: &engine::FrozenWeight::from(f.w[0].clone()),
            up: &engine::FrozenWeight::from(f.w[1].clone()),
            down: &engine::FrozenWeight::from(f.w[2].clone()),
        };
        let (y, _) = f.block.forward(&f.x, shared, imp, None).unwrap();
        y.backward_with_grad(&f.c).unwrap();
    }
    let p = peak() - before;
    // The gradients stay until the next step; clear them for the next measurement.
    f.x.zero_grad();
    f.block.router.weight.zero_grad();
    for e in &f.block.experts {
        for l in [&e.gate, &e.up, &e.down].into_iter().flatten() {
            l.a.zero_grad();
            l.b.zero_grad();
        }
    }
    p
}

/// The fused path on the CPU writes no `[T·k, I]` slot tensor and runs its backward in chunks
/// of tokens: its activation peak stays 40% below the naive loop's (which keeps several
/// per-expert `[n_e, I]` tensors of every slot for its backward) and below three `[T·k, I]`
/// f32 tensors.
fn fused_ffn_peak_is_below_naive() {
    let f = ffn();
    let naive = activation_peak(&f, MoeImpl::Naive);
    let fused = activation_peak(&f, MoeImpl::Fused(MoeFfnOptions::default()));
    let slot_tensor = T * K * I * 4;
    println!("activation peaks: naive {naive} B, fused {fused} B, [T·k, I] f32 {slot_tensor} B");
    assert!(fused > 0, "the fused path allocates its activations");
    assert!(
        10 * fused < 6 * naive,
        "fused {fused} B against naive {naive} B"
    );
    assert!(fused < 3 * slot_tensor, "fused {fused} B");
}

/// What attention holds between its forward and its backward, and its peak over both: flash
/// attention keeps q, k, v, its output and the log-sum-exp, `causal_attention` also the
/// probabilities `[b, hq, t, s]`; flash's peak stays below one `[b, hq, t, s]` f32 tensor.
fn flash_attention_holds_no_probabilities() {
    let (b, hq, hkv, t, d) = (2, 4, 2, 256, 16);
    let probs = b * hq * t * t * 4; // [b, hq, t, s] f32
    let mk = |shape: &[usize], seed| {
        testutil::randn(shape, seed)
            .to_dtype(DType::F32)
            .unwrap()
            .to_var()
            .unwrap()
    };
    let (q, k, v) = (
        mk(&[b, hq, t, d], 1),
        mk(&[b, hkv, t, d], 2),
        mk(&[b, hkv, t, d], 3),
    );
    let g = mk(&[b, hq, t, d], 4);
    let run = |flash: bool| {
        let before = current();
        engine::reset_peak_memory(CPU);
        let out = if flash {
            engine::flash_attention(&q, &k, &v, None, 0)
        } else {
            engine::causal_attention(&q, &k, &v, None, 0)
        }
        .unwrap();
        let held = current() - before;
        out.backward_with_grad(&g).unwrap();
        drop(out);
        for x in [&q, &k, &v] {
            x.zero_grad();
        }
        (held, peak() - before)
    };
    let (flash_held, flash_peak) = run(true);
    let (comp_held, comp_peak) = run(false);
    println!(
        "attention held after forward: flash {flash_held} B, composite {comp_held} B; \
         peak: flash {flash_peak} B, composite {comp_peak} B; [b, hq, t, s] f32 {probs} B"
    );
    let lse = b * hq * t * 4;
    let out = b * hq * t * d * 4;
    assert_eq!(
        flash_held,
        out + lse,
        "flash holds its output and the log-sum-exp"
    );
    assert!(comp_held >= probs, "the composite holds its probabilities");
    assert!(flash_peak < probs, "flash's peak {flash_peak} B");
}

/// Two adapters on one base, each on its own batch: in `GroupMode::Sequential` (each adapter's
/// forward and backward before the next adapter's) the step's peak above what is held before is
/// about one adapter's activations, in `Exact` (one backward of both losses) both adapters'.
fn adapters_one_after_another_hold_one_adapters_activations() {
    let mut m = model::Llama::random_with(
        testutil::tiny_llama_config(),
        7,
        DType::F32,
        CPU,
        model::RandomInit::frozen_base(),
    )
    .unwrap();
    let cfg = model::AdapterConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.1,
        ..model::AdapterConfig::default_for(model::PeftType::Lora)
    };
    let sets: Vec<model::adapters::Adapters> = (0..2)
        .map(|k| model::adapters::Adapters::init(&cfg, &m.config, 10 + k, DType::F32, CPU).unwrap())
        .collect();
    m.set_adapter_group(sets.clone()).unwrap();
    let (b, t) = (4, 96);
    let batches: Vec<(Tensor, Tensor)> = (0..2)
        .map(|k| {
            let ids = Tensor::from_vec(testutil::rand_ids(b * t, 11, k), [b, t], CPU).unwrap();
            (ids, Tensor::ones([b, t], DType::U32, CPU).unwrap())
        })
        .collect();
    let positions =
        Tensor::from_vec(model::mask_positions(&vec![1; b * t], t), [b, t], CPU).unwrap();
    let mut step_peak = |mode: model::GroupMode| {
        m.set_group_mode(mode);
        let before = current();
        engine::reset_peak_memory(CPU);
        let loss = |h: &Tensor| m.logits(h).unwrap().sqr().unwrap().sum_all().unwrap();
        match mode {
            model::GroupMode::Sequential => {
                for (k, (ids, mask)) in batches.iter().enumerate() {
                    let out = m
                        .forward_train_member_hidden_at(k, ids, Some(mask), &positions, Some(3))
                        .unwrap();
                    loss(&out.hidden).backward().unwrap();
                }
            }
            _ => {
                let segs: Vec<model::GroupSegment> = (batches.iter().enumerate())
                    .map(|(k, (ids, mask))| model::GroupSegment {
                        adapter: k,
                        ids: ids.clone(),
                        key_mask: Some(mask.clone()),
                        dropout_seed: Some(3),
                        host: None,
                    })
                    .collect();
                let outs = m.forward_train_group_hidden(&segs).unwrap();
                let total = loss(&outs[0].hidden).add(&loss(&outs[1].hidden)).unwrap();
                drop(outs);
                total.backward().unwrap();
            }
        }
        for s in &sets {
            s.named_params().iter().for_each(|(_, p)| p.zero_grad());
        }
        peak() - before
    };
    let exact = step_peak(model::GroupMode::Exact);
    let sequential = step_peak(model::GroupMode::Sequential);
    println!("two adapters' step peak: exact {exact} B, sequential {sequential} B");
    assert!(
        (sequential as f64) < 0.65 * exact as f64,
        "sequential {sequential} B against exact {exact} B"
    );
}

#[test]
fn cpu_memory_counts_live_buffers() {
    allocation_and_free_move_current();
    peak_and_reset();
    views_do_not_count_twice();
    fused_ffn_peak_is_below_naive();
    flash_attention_holds_no_probabilities();
    adapters_one_after_another_hold_one_adapters_activations();
}
