//! One micro-batch of a training step: the segments (one per adapter with a micro-batch in the
//! step) through the base model, forward and backward.

use engine::{DType, Tensor};
use model::{GroupSegment, Llama};

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
/// z-loss, expert load.
pub(super) type MicroResult = (f64, Option<f64>, Option<f64>, Vec<Tensor>);

/// One micro-batch of each segment's adapter through the model, forward and backward: with one
/// adapter the model's own forward, with several the grouped forward of its adapter group (each
/// adapter on its own rows). The backward runs once, from the sum of the adapters' losses: each
/// adapter's parameters get the gradient of its own loss only.
pub(super) fn micro_step(
    model: &Llama,
    grouped: bool,
    segs: &[Segment],
) -> Result<Vec<MicroResult>> {
    let device = model.device();
    let tensors = segs
        .iter()
        .map(|s| s.batch.to_tensors(device))
        .collect::<Result<Vec<_>>>()?;
    let outs = if grouped {
        let group: Vec<GroupSegment> = segs
            .iter()
            .zip(&tensors)
            .map(|(s, (ids, mask, _))| GroupSegment {
                adapter: s.adapter,
                ids: ids.clone(),
                key_mask: Some(mask.clone()),
                dropout_seed: Some(s.seed),
            })
            .collect();
        model.forward_train_group_hidden(&group)?
    } else {
        let (ids, mask, _) = &tensors[0];
        vec![model.forward_train_hidden(ids, Some(mask), Some(segs[0].seed))?]
    };
    let mut total: Option<Tensor> = None;
    let mut results = Vec::with_capacity(segs.len());
    for ((s, out), (_, _, labels)) in segs.iter().zip(outs).zip(&tensors) {
        let lm_sum = lm_loss_rows(model, &out.hidden, labels)?.sum_all()?;
        // The step's loss is the mean over all its target tokens, so accumulated micro-batches
        // add up to one large batch; the aux loss (already times its coefficient) is averaged.
        let mut loss = lm_sum.to_dtype(DType::F32)?.mul_scalar(1.0 / s.n_targets)?;
        let mut aux = None;
        if let Some(a) = &out.aux_loss {
            aux = Some(a.to_scalar()?);
            loss = loss.add(&a.to_dtype(DType::F32)?.mul_scalar(1.0 / s.n_micro)?)?;
        }
        // The router z-loss (already times its coefficient; none at 0) is averaged the same way.
        let mut z = None;
        if let Some(zl) = &out.z_loss {
            z = Some(zl.to_scalar()?);
            loss = loss.add(&zl.to_dtype(DType::F32)?.mul_scalar(1.0 / s.n_micro)?)?;
        }
        results.push((lm_sum.to_scalar()?, aux, z, out.expert_load));
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
