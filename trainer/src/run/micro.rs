//! One micro-batch of a training step: the segments (one per adapter with a micro-batch in the
//! step) through the base model, forward and backward.

use engine::{DType, Device, Tensor};
use model::{GroupMode, GroupSegment, HiddenOutput, HostTokens, Llama};

use super::lm_loss_rows;
use crate::data::HostBatch;
use crate::error::Result;

/// One micro-batch of an adapter in a step.
pub(super) struct Segment<'a> {
    /// The adapter's index in the model's adapter group (unused for a run of one adapter).
    pub adapter: usize,
    pub batch: &'a HostBatch,
    /// Target tokens of the adapter's whole step, and its number of micro-batches.
    pub n_targets: f64,
    pub n_micro: f64,
    /// Seeds its dropout.
    pub seed: u64,
}

/// What one micro-batch gave an adapter: summed LM loss over its targets, aux loss, router
/// z-loss, expert load (per MoE layer, on the host).
pub(super) type MicroResult = (f64, Option<f64>, Option<f64>, Vec<Tensor>);

/// What one micro-batch gave an adapter, still on the device: its summed LM loss over its
/// targets, aux loss and router z-loss (scalars, detached from the tape), its expert load.
/// Reading them back waits for the device, so a step's are read all at once, with its gradient
/// norms, once the next step is queued behind it ([`read_all`], `QueuedStep::read`).
pub(super) struct MicroOut {
    lm: Tensor,
    aux: Option<Tensor>,
    z: Option<Tensor>,
    load: Vec<Tensor>,
}

impl MicroOut {
    pub fn new(lm: Tensor, aux: Option<Tensor>, z: Option<Tensor>, load: Vec<Tensor>) -> Self {
        MicroOut { lm, aux, z, load }
    }
}

/// The scalars and expert loads of `outs`, and the scalars `extra`, read back in one download
/// (one wait for the device): the values that reading each with `to_scalar` gives, in the same
/// order; the loads as tensors on the host (f32, as on the device), so that the metrics read
/// them without another wait.
pub(super) fn read_all(
    outs: Vec<MicroOut>,
    extra: &[Tensor],
) -> Result<(Vec<MicroResult>, Vec<f64>)> {
    let mut parts: Vec<&Tensor> = Vec::new();
    for o in &outs {
        parts.push(&o.lm);
        parts.extend(o.aux.iter().chain(&o.z));
        parts.extend(&o.load);
    }
    parts.extend(extra);
    if parts.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    // Each value as f64 (exact from f32 and bf16), one after another in one buffer.
    let flat = parts
        .iter()
        .map(|t| t.to_dtype(DType::F64)?.reshape([t.elem_count()]))
        .collect::<engine::Result<Vec<_>>>()?;
    let values = engine::cat(&flat.iter().collect::<Vec<_>>(), 0)?.to_vec_f64()?;
    let mut at = values.into_iter();
    let mut next = || at.next().expect("one value per scalar");
    let results = outs
        .into_iter()
        .map(|o| {
            let lm = next();
            let aux = o.aux.as_ref().map(|_| next());
            let z = o.z.as_ref().map(|_| next());
            let load = o
                .load
                .iter()
                .map(|l| {
                    let v: Vec<f64> = (0..l.elem_count()).map(|_| next()).collect();
                    let host = Tensor::from_f64(&v, l.dims(), DType::F64, Device::Cpu)?;
                    Ok(host.to_dtype(l.dtype())?)
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((lm, aux, z, load))
        })
        .collect::<Result<Vec<_>>>()?;
    let extra = extra.iter().map(|_| next()).collect();
    Ok((results, extra))
}

/// One micro-batch of each segment's adapter through the model, forward and backward: with one
/// adapter the model's own forward, with several the grouped forward of its adapter group (each
/// adapter on its own rows). The backward runs once, from the sum of the adapters' losses: each
/// adapter's parameters get the gradient of its own loss only. In
/// [`GroupMode::Sequential`] each adapter's forward and backward run before the next adapter's
/// (one adapter's activations at a time).
pub(super) fn micro_step(model: &Llama, grouped: bool, segs: &[Segment]) -> Result<Vec<MicroOut>> {
    let device = model.device();
    let tensors = segs
        .iter()
        .map(|s| s.batch.to_tensors(device))
        .collect::<Result<Vec<_>>>()?;
    if grouped && model.group_mode() == GroupMode::Sequential {
        return (segs.iter().zip(&tensors))
            .map(|(s, (ids, mask, labels))| {
                let positions = host_positions(s.batch, device)?;
                let out = model.forward_train_member_hidden_at(
                    s.adapter,
                    ids,
                    Some(mask),
                    &positions,
                    Some(s.seed),
                )?;
                let (result, loss) = segment_loss(model, s, out, labels)?;
                loss.backward()?;
                Ok(result)
            })
            .collect();
    }
    let outs = if grouped {
        let group: Vec<GroupSegment> = segs
            .iter()
            .zip(&tensors)
            .map(|(s, (ids, mask, _))| GroupSegment {
                adapter: s.adapter,
                ids: ids.clone(),
                key_mask: Some(mask.clone()),
                dropout_seed: Some(s.seed),
                // The host's copies: the forward reads no mask or ids back from the device.
                host: Some(HostTokens {
                    ids: s.batch.ids.clone(),
                    key_mask: s.batch.key_mask.clone(),
                }),
            })
            .collect();
        model.forward_train_group_hidden(&group)?
    } else {
        let (ids, mask, _) = &tensors[0];
        let positions = host_positions(segs[0].batch, device)?;
        vec![model.forward_train_hidden_at(ids, Some(mask), &positions, Some(segs[0].seed))?]
    };
    let mut total: Option<Tensor> = None;
    let mut results = Vec::with_capacity(segs.len());
    for ((s, out), (_, _, labels)) in segs.iter().zip(outs).zip(&tensors) {
        let (result, loss) = segment_loss(model, s, out, labels)?;
        results.push(result);
        total = Some(match total {
            None => loss,
            Some(t) => t.add(&loss)?,
        });
    }
    if let Some(t) = total {
        t.backward()?;
    }
    Ok(results)
}

/// The RoPE positions of a micro-batch from the host's copy of its mask: the model's own would
/// read the mask back from the device, a wait for the GPU on every micro-batch.
fn host_positions(b: &HostBatch, device: Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(
        &model::mask_positions(&b.key_mask, b.len),
        [b.batch, b.len],
        device,
    )?)
}

/// A segment's step loss from its forward `out` and labels, and what the micro-batch gave it.
fn segment_loss(
    model: &Llama,
    s: &Segment,
    out: HiddenOutput,
    labels: &Tensor,
) -> Result<(MicroOut, Tensor)> {
    let lm_sum = lm_loss_rows(model, &out.hidden, labels)?.sum_all()?;
    // The step's loss is the mean over all its target tokens, so accumulated micro-batches add
    // up to one large batch; the aux loss (already times its coefficient) is averaged.
    let mut loss = lm_sum.to_dtype(DType::F32)?.mul_scalar(1.0 / s.n_targets)?;
    if let Some(a) = &out.aux_loss {
        loss = loss.add(&a.to_dtype(DType::F32)?.mul_scalar(1.0 / s.n_micro)?)?;
    }
    // The router z-loss (already times its coefficient; none at 0) is averaged the same way.
    if let Some(zl) = &out.z_loss {
        loss = loss.add(&zl.to_dtype(DType::F32)?.mul_scalar(1.0 / s.n_micro)?)?;
    }
    let result = MicroOut {
        lm: lm_sum.detach(),
        aux: out.aux_loss.as_ref().map(Tensor::detach),
        z: out.z_loss.as_ref().map(Tensor::detach),
        load: out.expert_load,
    };
    Ok((result, loss))
}
