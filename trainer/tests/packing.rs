//! Packing (`--packing`): examples packed into shared rows (`collate_packed`: segment ids in the
//! key mask, labels shifted within each example) give every example the loss and gradient it
//! gets unpacked, one example per row (`collate`), through the training forward
//! (`Llama::forward_train_hidden` and `lm_loss_rows`, as `micro_step` runs them), on the tiny
//! LLaMA in f64 with LoRA and MixLoRA (every MoE implementation): each example's summed LM loss
//! and the gradient of every adapter parameter of that loss alone, and the batch's load-balance
//! loss (the same real tokens) with the gradient of the whole batch's loss. Relative error at
//! most 1e-10 (measured: at most 2e-14). A negative control, the packed row with a plain 0/1 key
//! mask (the examples see each other, positions run on), must differ.

use engine::{DType, Device, MoeFfnOptions, Tensor};
use model::adapters::Adapters;
use model::{AdapterConfig, Llama, MoeImpl, PeftType, RandomInit};
use testutil::gpu::rel_err;
use testutil::{rand_ids, tiny_llama_config};
use trainer::data::{collate, collate_packed, Encoded, HostBatch};
use trainer::run::lm_loss_rows;

const TOL: f64 = 1e-10;

/// Examples of 5 to 8 tokens (prompt, then target), of random ids.
fn examples() -> Vec<Encoded> {
    let vocab = tiny_llama_config().vocab_size;
    [(3, 2), (1, 4), (5, 3), (2, 1), (4, 4)]
        .iter()
        .enumerate()
        .map(|(k, &(p, t))| {
            let k = k as u64;
            let prompt = rand_ids(p, vocab, 10 + k);
            let target = rand_ids(t, vocab, 20 + k);
            Encoded::from_pair(&prompt, &target, 64, 0)
        })
        .collect()
}

/// The tiny LLaMA in f64, frozen, with an adapter of `peft` whose `B` matrices are random (so
/// every parameter gets a gradient) computing its MoE FFNs with `imp`.
fn model_with(peft: PeftType, imp: MoeImpl) -> (Llama, Adapters) {
    let (d, dev) = (DType::F64, Device::Cpu);
    let mut m =
        Llama::random_with(tiny_llama_config(), 7, d, dev, RandomInit::frozen_base()).unwrap();
    let cfg = AdapterConfig {
        r: 2,
        lora_alpha: 5.0,
        lora_dropout: 0.0,
        num_experts: 3,
        router_init_range: 1.0,
        router_aux_loss_coef: 0.01,
        ..AdapterConfig::default_for(peft)
    };
    let mut a = Adapters::init(&cfg, &m.config, 100, d, dev).unwrap();
    a.moe_impl = imp;
    for (k, (name, t)) in a.named_params().into_iter().enumerate() {
        if name.contains("lora_B") {
            let v = Tensor::randn(t.dims().to_vec(), 0.0, 0.3, 1000 + k as u64, d, dev).unwrap();
            a.assign_param(&m.config, &name, &v).unwrap();
        }
    }
    m.set_adapters(a.clone()).unwrap();
    (m, a)
}

/// Where each example's positions are in a batch: `(first flat position, tokens)`.
fn spans(rows: &[Vec<usize>], items: &[Encoded], t: usize) -> Vec<(usize, usize)> {
    let mut at = vec![(0, 0); items.len()];
    for (r, row) in rows.iter().enumerate() {
        let mut p = r * t;
        for &k in row {
            at[k] = (p, items[k].ids.len());
            p += items[k].ids.len();
        }
    }
    at
}

/// One layout's results: each example's summed LM loss and gradients, the aux loss, and the
/// gradients of the whole batch's loss.
struct Outcome {
    losses: Vec<f64>,
    grads: Vec<Vec<Vec<f64>>>,
    aux: Option<f64>,
    batch_grads: Vec<Vec<f64>>,
}

/// `(per-position LM loss, aux loss)` of batch `hb` through the training forward.
fn forward(m: &Llama, hb: &HostBatch) -> (Tensor, Option<Tensor>) {
    let (ids, mask, labels) = hb.to_tensors(Device::Cpu).unwrap();
    let out = m.forward_train_hidden(&ids, Some(&mask), None).unwrap();
    (lm_loss_rows(m, &out.hidden, &labels).unwrap(), out.aux_loss)
}

fn grads_of(a: &Adapters, loss: &Tensor) -> Vec<Vec<f64>> {
    let params = a.named_params();
    params.iter().for_each(|(_, p)| p.zero_grad());
    loss.backward().unwrap();
    params
        .iter()
        .map(|(n, p)| {
            let g = p.grad().unwrap_or_else(|| panic!("{n}: no gradient"));
            g.to_vec_f64().unwrap()
        })
        .collect()
}

fn run(m: &Llama, a: &Adapters, hb: &HostBatch, at: &[(usize, usize)]) -> Outcome {
    let example_loss = |rows: &Tensor, k: usize| rows.narrow(0, at[k].0, at[k].1)?.sum_all();
    let mut losses = Vec::new();
    let mut grads = Vec::new();
    for k in 0..at.len() {
        let (rows, _) = forward(m, hb);
        assert_eq!(rows.dtype(), DType::F64);
        let loss = example_loss(&rows, k).unwrap();
        losses.push(loss.to_scalar().unwrap());
        grads.push(grads_of(a, &loss));
    }
    let (rows, aux) = forward(m, hb);
    let mut total = rows.sum_all().unwrap();
    if let Some(x) = &aux {
        total = total.add(x).unwrap();
    }
    Outcome {
        losses,
        grads,
        aux: aux.map(|x| x.to_scalar().unwrap()),
        batch_grads: grads_of(a, &total),
    }
}

fn assert_close(what: &str, got: &[f64], want: &[f64]) {
    let err = rel_err(want, got);
    assert!(err <= TOL, "{what}: relative error {err:e}");
}

#[test]
fn packed_and_unpacked_give_each_example_the_same_loss_and_gradients() {
    let items = examples();
    let fused = MoeImpl::Fused(MoeFfnOptions::default());
    let kinds = [
        (PeftType::Lora, MoeImpl::Naive),
        (PeftType::MixLora, MoeImpl::Naive),
        (PeftType::MixLora, MoeImpl::Paper),
        (PeftType::MixLora, MoeImpl::Grouped),
        (PeftType::MixLora, fused),
    ];
    // Two rows: examples 0, 1, 2 (18 tokens) and 3, 4 (11), in another order than unpacked.
    let packed_rows = vec![vec![2, 0, 1], vec![4, 3]];
    let single_rows: Vec<Vec<usize>> = (0..items.len()).map(|k| vec![k]).collect();
    let refs = |rows: &[Vec<usize>]| -> Vec<Vec<&Encoded>> {
        rows.iter()
            .map(|r| r.iter().map(|&k| &items[k]).collect())
            .collect()
    };
    let unpacked = collate(&items.iter().collect::<Vec<_>>(), 0);
    let packed = collate_packed(&refs(&packed_rows), 0);
    assert_eq!((packed.batch, packed.len), (2, 18));
    assert_eq!(packed.target_tokens, unpacked.target_tokens);
    let at_unpacked = spans(&single_rows, &items, unpacked.len);
    let at_packed = spans(&packed_rows, &items, packed.len);
    for (peft, imp) in kinds {
        let case = format!("{peft:?} {imp:?}");
        let (m, a) = model_with(peft, imp);
        let want = run(&m, &a, &unpacked, &at_unpacked);
        let got = run(&m, &a, &packed, &at_packed);
        assert!(
            want.losses.iter().all(|l| *l > 0.0),
            "{case}: {want:?}",
            want = want.losses
        );
        assert_close(
            &format!("{case}: example losses"),
            &got.losses,
            &want.losses,
        );
        for (k, (g, w)) in got.grads.iter().zip(&want.grads).enumerate() {
            for (p, (g, w)) in g.iter().zip(w).enumerate() {
                assert_close(&format!("{case}: example {k}, param {p}"), g, w);
            }
        }
        assert_eq!(got.aux.is_some(), peft == PeftType::MixLora, "{case}");
        if let (Some(g), Some(w)) = (got.aux, want.aux) {
            assert_close(&format!("{case}: aux loss"), &[g], &[w]);
        }
        for (p, (g, w)) in got.batch_grads.iter().zip(&want.batch_grads).enumerate() {
            assert!(
                w.iter().any(|x| *x != 0.0),
                "{case}: param {p} has no gradient"
            );
            assert_close(&format!("{case}: batch gradient of param {p}"), g, w);
        }
    }
}

/// The negative control: the same packed row with a plain 0/1 key mask lets the examples see
/// each other and runs their positions on: the losses differ far beyond the tolerance.
#[test]
fn a_packed_row_without_segments_changes_the_losses() {
    let items = examples();
    let (m, a) = model_with(PeftType::MixLora, MoeImpl::Naive);
    let rows = vec![vec![0, 1, 2, 3, 4]];
    let row: Vec<&Encoded> = items.iter().collect();
    let packed = collate_packed(&[row], 0);
    let plain = HostBatch {
        key_mask: packed.key_mask.iter().map(|&s| u32::from(s != 0)).collect(),
        ..packed.clone()
    };
    let at = spans(&rows, &items, packed.len);
    let (good, bad) = (run(&m, &a, &packed, &at), run(&m, &a, &plain, &at));
    // The first example sees nothing else either way.
    assert_close("first example", &bad.losses[..1], &good.losses[..1]);
    let err = rel_err(&good.losses[1..], &bad.losses[1..]);
    assert!(
        err > 1e-3,
        "a 0/1 mask should change the later examples: {err:e}"
    );
}
