//! `mixlora bench table6 --adapters N,...`: N adapter sets of one variant trained together on the
//! one frozen base ([`Llama::forward_train_group_hidden`]), against a single run of the variant.
//!
//! Per variant, first the single run: one adapter set attached as `mixlora train` attaches it,
//! the ordinary training forward ([`Llama::forward_train_hidden`]); then, for each N of the list,
//! N sets of the variant as one adapter group. Set `k` has its own initialisation seed (its LoRA
//! `B` matrices random, not zero, so that each set changes its outputs), its own random batch of
//! `B × T` tokens and its own dropout seeds; set 0 with batch 0 is the single run's adapter on the
//! single run's batch, so on the CPU its loss in every group equals the single run's loss bit for
//! bit. A step: the grouped forward, per adapter the Table 6 loss (mean cross-entropy over its
//! targets plus the aux loss), the N losses summed, one backward; with `--group-mode
//! sequential`, each adapter's forward, loss and backward before the next adapter's (as `mixlora
//! train` runs them in that mode: one adapter's activations at a time). Timed as Table 6 times a
//! step (median forward plus median backward, each between synchronisations, summed over the
//! adapters when they run one after another).
//! Tokens/s counts the tokens of all N adapters.
//!
//! Memory: the allocator's peak over the timed steps counts the base weights, the adapters, their
//! AdamW moments (two f32 tensors per adapter parameter, created as a training run creates them:
//! a run holds them; the bench takes no optimizer step), the batches, the activations and the
//! gradients, the same things for the single run and for each group. The per-adapter figure is
//! the peak over N: the base weights are held once for all adapters.

use std::time::Instant;

use engine::{DType, Tensor};
use model::adapters::{Adapters, MoeImpl};
use model::{AdapterConfig, GroupMode, GroupSegment, Llama};

use super::{
    build_model, check_args, device_name, hidden_loss, is_out_of_memory, median, memory_text,
    peak_bytes, random_batch, reset_peak, shape_config, synchronize, training_loss, variants,
    BenchVariant, Table6Args,
};
use crate::config::FusedMoeArgs;
use crate::error::{Error, Result};
use crate::optim::{AdamW, AdamWConfig};

/// The initialisation seed of adapter set 0 (Table 6's adapter); set `k` has `ADAPTER_SEED + k`.
const ADAPTER_SEED: u64 = 2;

const GIB: f64 = (1u64 << 30) as f64;

/// What the timed steps of one measurement give.
#[derive(Clone, Debug)]
pub struct StepFigures {
    /// Median forward plus median backward, seconds.
    pub step_s: f64,
    /// Tokens of all the step's adapters per second.
    pub tokens_per_s: f64,
    /// The peak of the tensor memory over the timed steps (`engine::memory_stats`), GiB.
    pub peak_gib: Option<f64>,
    /// Each adapter's loss at the last step, in adapter order.
    pub losses: Vec<f64>,
}

/// One variant with N adapters, and the variant's single run.
#[derive(Clone, Debug)]
pub struct MultiRow {
    pub variant: BenchVariant,
    pub n_adapters: usize,
    pub gradient_checkpointing: bool,
    /// The grouped step of N adapter sets, or why it did not run (it does not fit).
    pub grouped: std::result::Result<StepFigures, String>,
    /// The variant's single run (the reference), or why it did not run.
    pub single: std::result::Result<StepFigures, String>,
}

impl MultiRow {
    /// The grouped step's peak over N.
    pub fn peak_gib_per_adapter(&self) -> Option<f64> {
        let g = self.grouped.as_ref().ok()?;
        g.peak_gib.map(|p| p / self.n_adapters as f64)
    }

    /// Tokens/s of the grouped step (all adapters) over the single run's.
    pub fn tokens_per_s_ratio(&self) -> Option<f64> {
        let (g, s) = (self.grouped.as_ref().ok()?, self.single.as_ref().ok()?);
        Some(g.tokens_per_s / s.tokens_per_s)
    }

    /// The grouped step's peak per adapter over the single run's peak.
    pub fn memory_per_adapter_ratio(&self) -> Option<f64> {
        let s = self.single.as_ref().ok()?.peak_gib?;
        Some(self.peak_gib_per_adapter()? / s)
    }
}

/// Refuses an `--adapters` list that is empty, holds 0 or names a number twice.
fn check_counts(counts: &[usize]) -> Result<()> {
    let bad = |what: String| Err(Error::Config(format!("bench table6: --adapters {what}")));
    if counts.is_empty() {
        return bad("needs at least one number of adapter sets".into());
    }
    for (i, &n) in counts.iter().enumerate() {
        if n == 0 {
            return bad("lists 0: each number of adapter sets must be at least 1".into());
        }
        if counts[..i].contains(&n) {
            return bad(format!("lists {n} twice"));
        }
    }
    Ok(())
}

/// One adapter's random batch: ids `[B, T]`, key mask (all ones), targets `[B·T]`.
struct Batch {
    ids: Tensor,
    mask: Tensor,
    targets: Tensor,
}

impl Batch {
    /// Adapter `k`'s batch (batch 0 is Table 6's).
    fn new(a: &Table6Args, vocab: usize, k: usize) -> Result<Batch> {
        let (ids, targets) = random_batch(a.batch, a.seq, vocab, a.device, k as u64)?;
        let mask = Tensor::ones([a.batch, a.seq], DType::U32, a.device)?;
        Ok(Batch { ids, mask, targets })
    }
}

/// The dropout seed of adapter `k` at `step` (adapter 0's are Table 6's: the step).
fn dropout_seed(k: usize, step: u64) -> u64 {
    step + ((k as u64) << 32)
}

/// Runs the multi-adapter benchmark (`a.adapters` lists the numbers of adapter sets); `log`
/// receives progress lines. Rows come per variant, in the list's order. A measurement that runs
/// out of device memory is reported in its row and the others still run.
pub fn table6_multi(a: &Table6Args, mut log: impl FnMut(&str)) -> Result<Vec<MultiRow>> {
    check_args(a)?;
    check_counts(&a.adapters)?;
    let mut model = build_model(a, &mut log)?;
    let mut rows = Vec::new();
    for v in variants(a) {
        let (acfg, imp) = v.adapter(a.fused.options());
        let single = single_run(&mut model, a, &acfg, imp);
        let single = not_fitting_as_row(single, &format!("{} single run", v.key()), &mut log)?;
        if let Ok(s) = &single {
            log(&format!(
                "{:<14} single run  {:>9.0} tokens/s{}  loss {:.3}",
                v.key(),
                s.tokens_per_s,
                s.peak_gib
                    .map_or(String::new(), |p| format!("  peak {}", memory_text(p))),
                s.losses[0]
            ));
        }
        for &n in &a.adapters {
            let grouped = group_run(&mut model, a, &acfg, imp, n);
            let what = format!("{} with {n} adapters", v.key());
            let grouped = not_fitting_as_row(grouped, &what, &mut log)?;
            let row = MultiRow {
                variant: v,
                n_adapters: n,
                gradient_checkpointing: a.gradient_checkpointing,
                grouped,
                single: single.clone(),
            };
            if let Ok(g) = &row.grouped {
                let memory = match (g.peak_gib, row.peak_gib_per_adapter()) {
                    (Some(p), Some(per)) => format!(
                        "  peak {} ({} per adapter, {} of single)",
                        memory_text(p),
                        memory_text(per),
                        ratio_text(row.memory_per_adapter_ratio())
                    ),
                    _ => String::new(),
                };
                let losses: Vec<String> = g.losses.iter().map(|l| format!("{l:.3}")).collect();
                log(&format!(
                    "{:<14} {n:>2} adapter{} {:>9.0} tokens/s ({} of single){memory}  losses {}",
                    v.key(),
                    if n == 1 { " " } else { "s" },
                    g.tokens_per_s,
                    ratio_text(row.tokens_per_s_ratio()),
                    losses.join(" ")
                ));
            }
            rows.push(row);
        }
    }
    Ok(rows)
}

/// An out-of-memory error as the row's outcome (logged); other errors stop the bench.
fn not_fitting_as_row(
    r: Result<StepFigures>,
    what: &str,
    log: &mut impl FnMut(&str),
) -> Result<std::result::Result<StepFigures, String>> {
    match r {
        Ok(f) => Ok(Ok(f)),
        Err(e) if is_out_of_memory(&e) => {
            log(&format!("{what} does not fit: {e}"));
            Ok(Err(e.to_string()))
        }
        Err(e) => Err(e),
    }
}

/// Adapter set `k` of the variant: initialised with its own seed, then every LoRA `B` drawn at
/// random (`B` starts at zero, which would leave the outputs, and so the losses, independent of
/// the adapter and its dropout: random `B`s make each set change its outputs).
fn adapter_set(
    model: &mut Llama,
    acfg: &AdapterConfig,
    imp: Option<MoeImpl>,
    k: usize,
) -> Result<Adapters> {
    model.add_adapters(acfg, ADAPTER_SEED + k as u64)?;
    let mut set = model.remove_adapters().expect("the adapters just added");
    if let Some(imp) = imp {
        set.moe_impl = imp;
    }
    for (i, (name, t)) in set.named_params().into_iter().enumerate() {
        if name.contains("lora_B") {
            let seed = ((k as u64) << 32) | i as u64;
            let b = Tensor::randn(t.dims().to_vec(), 0.0, B_STD, seed, t.dtype(), t.device())?;
            set.assign_param(&model.config, &name, &b)?;
        }
    }
    Ok(set)
}

/// The standard deviation of the random LoRA `B` matrices.
const B_STD: f64 = 0.02;

/// The variant's single run: its adapter set 0 attached to the model as `mixlora train` attaches
/// it, the ordinary training forward.
fn single_run(
    model: &mut Llama,
    a: &Table6Args,
    acfg: &AdapterConfig,
    imp: Option<MoeImpl>,
) -> Result<StepFigures> {
    let set = adapter_set(model, acfg, imp, 0)?;
    model.set_adapters(set)?;
    let model_ref = &*model;
    let r = (|| {
        let opt = AdamW::new(model_ref.trainable_params(), AdamWConfig::default())?;
        let batch = Batch::new(a, model_ref.config.vocab_size, 0)?;
        let what = format!("{} single run", variant_label(acfg, imp));
        time_steps(a, &what, opt.params(), a.batch * a.seq, 1, |step, _| {
            let (ids, mask, targets) = (&batch.ids, &batch.mask, &batch.targets);
            let seed = dropout_seed(0, step);
            Ok(vec![training_loss(model_ref, ids, mask, targets, seed)?])
        })
    })();
    model.remove_adapters();
    r
}

/// `n` adapter sets of the variant trained together as one adapter group.
fn group_run(
    model: &mut Llama,
    a: &Table6Args,
    acfg: &AdapterConfig,
    imp: Option<MoeImpl>,
    n: usize,
) -> Result<StepFigures> {
    let sets = (0..n)
        .map(|k| adapter_set(model, acfg, imp, k))
        .collect::<Result<Vec<_>>>()?;
    let opts = sets
        .iter()
        .map(|s| AdamW::new(s.named_params(), AdamWConfig::default()))
        .collect::<Result<Vec<_>>>()?;
    let params: Vec<Tensor> = opts.iter().flat_map(|o| o.params().to_vec()).collect();
    model.set_adapter_group(sets)?;
    let model_ref = &*model;
    let r = (|| {
        let vocab = model_ref.config.vocab_size;
        let batches = (0..n)
            .map(|k| Batch::new(a, vocab, k))
            .collect::<Result<Vec<_>>>()?;
        let what = format!("{} with {n} adapters", variant_label(acfg, imp));
        let segment = |k: usize, b: &Batch, step: u64| GroupSegment {
            adapter: k,
            ids: b.ids.clone(),
            key_mask: Some(b.mask.clone()),
            dropout_seed: Some(dropout_seed(k, step)),
            // As the single run it is compared with: the mask read from the device.
            host: None,
        };
        if model_ref.group_mode() == GroupMode::Sequential {
            // Each adapter's forward and backward before the next adapter's.
            return time_steps(a, &what, &params, n * a.batch * a.seq, n, |step, k| {
                let out = model_ref.forward_train_group_hidden(&[segment(k, &batches[k], step)])?;
                Ok(vec![hidden_loss(model_ref, &out[0], &batches[k].targets)?])
            });
        }
        time_steps(a, &what, &params, n * a.batch * a.seq, 1, |step, _| {
            let segments: Vec<GroupSegment> = (batches.iter().enumerate())
                .map(|(k, b)| segment(k, b, step))
                .collect();
            let outs = model_ref.forward_train_group_hidden(&segments)?;
            outs.iter()
                .zip(&batches)
                .map(|(o, b)| hidden_loss(model_ref, o, &b.targets))
                .collect()
        })
    })();
    model.take_adapter_group();
    drop(opts);
    r
}

/// A name of the variant for the profile's heading.
fn variant_label(acfg: &AdapterConfig, imp: Option<MoeImpl>) -> String {
    match imp {
        None => format!("{:?}", acfg.peft_type),
        Some(i) => format!("{:?} {i:?}", acfg.peft_type),
    }
}

/// `warmup` then `steps` training steps, each of `parts` parts one after another, each part:
/// `losses(step, part)` (one loss per adapter of the part), their sum, its backward; the timed
/// steps' median forward and backward (each summed over the parts), the peak, the last losses
/// (in part order).
fn time_steps(
    a: &Table6Args,
    what: &str,
    params: &[Tensor],
    tokens: usize,
    parts: usize,
    mut losses: impl FnMut(u64, usize) -> Result<Vec<Tensor>>,
) -> Result<StepFigures> {
    let device = a.device;
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    let mut last = Vec::new();
    let sum = |ls: &[Tensor]| -> Result<Tensor> {
        let mut total = ls[0].clone();
        for l in &ls[1..] {
            total = total.add(l)?;
        }
        Ok(total)
    };
    for step in 0..a.warmup + a.steps {
        if step == a.warmup {
            synchronize(device)?;
            reset_peak(device);
        }
        params.iter().for_each(Tensor::zero_grad);
        synchronize(device)?;
        let (mut f, mut b) = (0.0, 0.0);
        last.clear();
        for part in 0..parts {
            let t0 = Instant::now();
            let ls = losses(step as u64, part)?;
            let total = sum(&ls)?;
            synchronize(device)?;
            let t1 = Instant::now();
            total.backward()?;
            synchronize(device)?;
            let t2 = Instant::now();
            f += (t1 - t0).as_secs_f64();
            b += (t2 - t1).as_secs_f64();
            for l in &ls {
                last.push(l.to_scalar()?);
            }
        }
        if step >= a.warmup {
            fwd.push(f);
            bwd.push(b);
        }
    }
    let peak_gib = peak_bytes(device).map(|p| p as f64 / GIB);
    if let Some(l) = last.iter().find(|l| !l.is_finite()) {
        return Err(Error::Config(format!(
            "bench table6: {what} gave a non-finite loss {l}"
        )));
    }
    if engine::profile::enabled() {
        // One more step with every kernel timed: where the time goes.
        engine::profile::take();
        params.iter().for_each(Tensor::zero_grad);
        for part in 0..parts {
            sum(&losses(0, part)?)?.backward()?;
        }
        synchronize(device)?;
        println!("profile of one step, {what}:");
        print!("{}", engine::profile::report(a.profile.rows()));
    }
    params.iter().for_each(Tensor::zero_grad);
    let step_s = median(fwd) + median(bwd);
    Ok(StepFigures {
        step_s,
        tokens_per_s: tokens as f64 / step_s,
        peak_gib,
        losses: last,
    })
}

fn gib_text(g: Option<f64>) -> String {
    g.map_or("-".into(), |g| format!("{g:.2}"))
}

fn ratio_text(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.2}×"))
}

/// The report as JSON: a list with one object per row, `{"shape", "variant", "n_adapters",
/// "gradient_checkpointing", "tokens_per_s_total", "peak_gib", "peak_gib_per_adapter",
/// "single_tokens_per_s", "single_peak_gib", "losses", "device", "batch", "seq", "layers",
/// "group_mode"}`
/// (`null` figures where nothing was measured, with `"error"` or `"single_error"` saying why).
pub fn table6_multi_json(a: &Table6Args, rows: &[MultiRow]) -> Result<String> {
    let cfg = shape_config(a.shape, a.layers);
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    let device = device_name(a.device);
    let list: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let (g, s) = (r.grouped.as_ref().ok(), r.single.as_ref().ok());
            let mut o = serde_json::json!({
                "shape": a.shape.key(),
                "variant": r.variant.key(),
                "n_adapters": r.n_adapters,
                "gradient_checkpointing": r.gradient_checkpointing,
                "tokens_per_s_total": g.map(|g| g.tokens_per_s.round()),
                "peak_gib": g.and_then(|g| g.peak_gib).map(round),
                "peak_gib_per_adapter": r.peak_gib_per_adapter().map(round),
                "single_tokens_per_s": s.map(|s| s.tokens_per_s.round()),
                "single_peak_gib": s.and_then(|s| s.peak_gib).map(round),
                "losses": g.map(|g| g.losses.clone()),
                "device": device,
                "batch": a.batch,
                "seq": a.seq,
                "layers": cfg.num_hidden_layers,
                "group_mode": crate::config::words::Word::spell(&a.group_mode.flatten()),
            });
            if let Err(e) = &r.grouped {
                o["error"] = format!("does not fit: {e}").into();
            }
            if let Err(e) = &r.single {
                o["single_error"] = format!("does not fit: {e}").into();
            }
            if a.fused != FusedMoeArgs::default() {
                let f = &a.fused;
                let kernels = crate::config::words::Word::spell(&f.moe_kernels);
                o["moe_kernels"] = kernels.into();
                o["moe_chunk_tokens"] = f.moe_chunk_tokens.map(|n| n.get()).into();
            }
            o
        })
        .collect();
    serde_json::to_string_pretty(&list).map_err(|e| Error::Config(format!("bench table6: {e}")))
}

/// A markdown table of the rows: tokens/s of all adapters and peak per adapter, each with its
/// ratio to the single run.
pub fn table6_multi_markdown(a: &Table6Args, rows: &[MultiRow]) -> String {
    let mut s = format!(
        "{}, {}×{} tokens per adapter, gradient checkpointing {}\n\n",
        a.shape.key(),
        a.batch,
        a.seq,
        if a.gradient_checkpointing {
            "on"
        } else {
            "off"
        }
    );
    s.push_str(
        "| | adapters | tokens/s (all) | single run tokens/s | ratio | peak GiB | GiB per adapter \
         | single run GiB | ratio |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let single = r.single.as_ref().ok();
        let single_tps = single.map_or("does not fit".into(), |s| format!("{:.0}", s.tokens_per_s));
        let single_gib = gib_text(single.and_then(|s| s.peak_gib));
        match &r.grouped {
            Ok(g) => s.push_str(&format!(
                "| {} | {} | {:.0} | {single_tps} | {} | {} | {} | {single_gib} | {} |\n",
                r.variant.key(),
                r.n_adapters,
                g.tokens_per_s,
                ratio_text(r.tokens_per_s_ratio()),
                gib_text(g.peak_gib),
                gib_text(r.peak_gib_per_adapter()),
                ratio_text(r.memory_per_adapter_ratio()),
            )),
            Err(_) => s.push_str(&format!(
                "| {} | {} | does not fit | {single_tps} | | | | {single_gib} | |\n",
                r.variant.key(),
                r.n_adapters,
            )),
        }
    }
    s
}
