//! Data parallelism inside the training loop: which micro-batches of a step this rank runs, what
//! it keeps of each, and the step's synchronisation that gives every rank the sums one process
//! would have computed, bit for bit.
//!
//! **Sharding.** Every rank builds every step exactly as one process does (the same loader,
//! cursor and RNG: the data order and the dropout seeds do not depend on the number of ranks)
//! and runs the micro-batches `m` with `m % world == rank`. A step has as many micro-batches as
//! one process would run (`batch / micro_batch`), so the global batch is the same for any world.
//!
//! **Summation order.** One process sums a step's gradients in micro-batch order: the first
//! micro-batch's backward leaves `g₀` in a parameter's gradient slot, each next one adds into it,
//! `((g₀ + g₁) + g₂) + …` in the parameter's dtype (`Tensor::accumulate_grad`). An all-reduce sums
//! in an order of its own that depends on the world size, so here each rank keeps the gradient of
//! each micro-batch it ran apart (taken from the slot after its backward, the slot emptied), the
//! ranks all-gather them bucket by bucket (bits, exactly), and every rank replays them through
//! `accumulate_grad` in micro-batch order: the same additions on the same operands as one
//! process, so the same bits for any world size. The per-micro-batch LM loss sums, aux losses
//! and expert loads go the same way (gathered as f64, folded in order). The cost against an
//! all-reduce: a rank holds one gradient per micro-batch it runs (not one in all), and receives
//! `(world − 1) · slots` bucket copies instead of `2 (world − 1) / world`: the same traffic at
//! two ranks with one micro-batch each, twice at four. Adapter gradients are small against the
//! forward and backward of the base model.
//!
//! **No overlap yet.** The tape has no hook that fires when a variable's gradient is final, so
//! the buckets are gathered after the rank's last micro-batch of the step, not during its
//! backward.

use engine::dist::Communicator;
use engine::{DType, Device, Tensor};
use model::adapters::MlpAdapters;

use super::adapter::{AdapterRun, StepWork};
use crate::error::{Error, Result};

/// Elements of one gradient bucket (before the per-rank slots): a few buckets for a 7B MixLoRA.
pub const BUCKET_ELEMS: usize = 1 << 25;

/// What one micro-batch this rank ran gave one adapter.
pub(super) struct Captured {
    /// Summed LM loss over its targets, its aux loss, its router z-loss, its expert load per
    /// MoE layer.
    pub lm: f64,
    pub aux: Option<f64>,
    pub z: Option<f64>,
    pub load: Vec<Tensor>,
    /// Each parameter's gradient of this micro-batch alone (`None`: not reached).
    pub grads: Vec<Option<Tensor>>,
}

impl Captured {
    /// Takes the gradients the micro-batch's backward left in `run`'s parameters (the slots are
    /// emptied for the next micro-batch).
    pub fn take(
        run: &AdapterRun,
        lm: f64,
        aux: Option<f64>,
        z: Option<f64>,
        load: Vec<Tensor>,
    ) -> Captured {
        let grads = run.params().iter().map(Tensor::grad).collect();
        run.zero_grad();
        Captured {
            lm,
            aux,
            z,
            load,
            grads,
        }
    }
}

/// The ranks of a run as the training loop sees them.
#[derive(Clone, Copy)]
pub(super) struct Ranks<'a> {
    pub comm: &'a dyn Communicator,
}

impl Ranks<'_> {
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }
    pub fn world(&self) -> usize {
        self.comm.world_size()
    }
    /// Whether this rank runs micro-batch `m` of a step.
    pub fn owns(&self, m: usize) -> bool {
        m % self.world() == self.rank()
    }
    /// Micro-batches of a step of `n_micro` that one rank runs at most.
    fn slots(&self, n_micro: usize) -> usize {
        n_micro.div_ceil(self.world()).max(1)
    }
    /// Where micro-batch `m` sits among the gathered slots: `(rank, slot)` in row-major order.
    fn gathered_index(&self, m: usize, slots: usize) -> usize {
        (m % self.world()) * slots + m / self.world()
    }

    /// Whether any rank asks to stop (an interrupt): every rank gets the same answer.
    pub fn any(&self, flag: bool, device: Device) -> Result<bool> {
        let x = Tensor::from_f64(&[flag as u8 as f64], [1], DType::F32, device)?;
        Ok(self.comm.all_reduce_sum(&x)?.to_scalar()? > 0.0)
    }

    /// The end of a step's micro-batches for one adapter: fills `w` (loss sums, aux loss, the
    /// last micro-batch's expert load) and the parameters' gradient slots with what one process
    /// running every micro-batch would hold. `mine[s]` is what this rank's `s`-th micro-batch of
    /// the step gave the adapter (`None` where the adapter had none).
    pub fn sync_adapter(
        &self,
        run: &AdapterRun,
        w: &mut StepWork,
        mine: &[Option<Captured>],
        device: Device,
    ) -> Result<()> {
        let n_micro = w.micro.len();
        let slots = self.slots(n_micro);
        let params = run.params();
        let load_dims = load_dims(run);
        let gathered = self.gather_meta(mine, slots, params.len(), &load_dims, device)?;
        let rec_len = meta_len(params.len(), &load_dims);
        let n = n_micro as f64;
        let mut present = vec![vec![false; params.len()]; n_micro];
        for (m, pres) in present.iter_mut().enumerate() {
            let rec = &gathered[self.gathered_index(m, slots) * rec_len..][..rec_len];
            if rec[0] != 1.0 {
                return Err(Error::Config(format!(
                    "data parallel: rank {} did not run micro-batch {m} of the step (the ranks \
                     diverged)",
                    m % self.world()
                )));
            }
            // As one process adds them: in micro-batch order, from 0.
            w.lm += rec[1];
            if rec[2] == 1.0 {
                *w.aux.get_or_insert(0.0) += rec[3] / n;
            }
            if rec[4] == 1.0 {
                *w.z.get_or_insert(0.0) += rec[5] / n;
            }
            let mut at = HEADER;
            if m + 1 == n_micro {
                w.load = load_dims
                    .iter()
                    .map(|&e| {
                        let t = Tensor::from_f64(&rec[at..at + e], [e], DType::F32, device);
                        at += e;
                        t
                    })
                    .collect::<engine::Result<_>>()?;
            } else {
                at += load_dims.iter().sum::<usize>();
            }
            for (p, flag) in pres.iter_mut().zip(&rec[at..]) {
                *p = *flag == 1.0;
            }
        }
        for range in buckets(params) {
            self.sync_bucket(&params[range.clone()], range.start, mine, &present, slots)?;
        }
        Ok(())
    }

    /// All ranks' per-slot records (see [`meta_len`]), gathered, on the host.
    fn gather_meta(
        &self,
        mine: &[Option<Captured>],
        slots: usize,
        n_params: usize,
        load_dims: &[usize],
        device: Device,
    ) -> Result<Vec<f64>> {
        let rec_len = meta_len(n_params, load_dims);
        let mut local = vec![0.0; slots * rec_len];
        for (s, c) in mine.iter().enumerate() {
            let Some(c) = c else { continue };
            let rec = &mut local[s * rec_len..][..rec_len];
            rec[0] = 1.0;
            rec[1] = c.lm;
            if let Some(a) = c.aux {
                rec[2] = 1.0;
                rec[3] = a;
            }
            if let Some(z) = c.z {
                rec[4] = 1.0;
                rec[5] = z;
            }
            let mut at = HEADER;
            for (t, &e) in c.load.iter().zip(load_dims) {
                let v = t.to_vec_f64()?;
                if v.len() != e {
                    return Err(Error::Config(format!(
                        "data parallel: an expert load of {} values, expected {e}",
                        v.len()
                    )));
                }
                rec[at..at + e].copy_from_slice(&v);
                at += e;
            }
            at = HEADER + load_dims.iter().sum::<usize>();
            for (flag, g) in rec[at..].iter_mut().zip(&c.grads) {
                *flag = if g.is_some() { 1.0 } else { 0.0 };
            }
        }
        let x = Tensor::from_f64(&local, [local.len()], DType::F64, device)?;
        Ok(self.comm.all_gather(&x)?.to_vec_f64()?)
    }

    /// One bucket of parameters (`params`, the first at index `first` of the run's list): each
    /// rank's per-slot gradients flattened and gathered, then replayed into the gradient slots
    /// in micro-batch order.
    fn sync_bucket(
        &self,
        params: &[Tensor],
        first: usize,
        mine: &[Option<Captured>],
        present: &[Vec<bool>],
        slots: usize,
    ) -> Result<()> {
        let sizes: Vec<usize> = params.iter().map(Tensor::elem_count).collect();
        let n_b: usize = sizes.iter().sum();
        let (dtype, device) = (params[0].dtype(), params[0].device());
        // local: [slots · n_b], this rank's micro-batches' gradients (zeros where absent).
        let mut parts = Vec::with_capacity(slots * params.len());
        for s in 0..slots {
            for (i, p) in params.iter().enumerate() {
                let g = mine
                    .get(s)
                    .and_then(Option::as_ref)
                    .and_then(|c| c.grads[first + i].as_ref());
                parts.push(match g {
                    Some(g) if g.dtype() != dtype => {
                        return Err(Error::Config(format!(
                            "data parallel: a gradient in {} for a parameter in {dtype}",
                            g.dtype()
                        )))
                    }
                    Some(g) => g.flatten_all()?,
                    None => Tensor::zeros([p.elem_count()], dtype, device)?,
                });
            }
        }
        let refs: Vec<&Tensor> = parts.iter().collect();
        let local = engine::cat(&refs, 0)?;
        drop(parts);
        // all: [world · slots · n_b]
        let all = self.comm.all_gather(&local)?;
        for (m, pres) in present.iter().enumerate() {
            let mut at = self.gathered_index(m, slots) * n_b;
            for (i, p) in params.iter().enumerate() {
                if pres[first + i] {
                    let g = all.narrow(0, at, sizes[i])?.reshape(p.shape().clone())?;
                    p.accumulate_grad(&g)?;
                }
                at += sizes[i];
            }
        }
        Ok(())
    }
}

/// Experts per MoE layer of the run's adapter (the lengths of its expert loads).
fn load_dims(run: &AdapterRun) -> Vec<usize> {
    run.adapters
        .layers
        .iter()
        .filter_map(|l| match &l.mlp {
            MlpAdapters::MixLora(moe) => Some(moe.router.weight.dims()[0]),
            MlpAdapters::Lora(_) => None,
        })
        .collect()
}

/// Values at the head of one slot's record: present, LM loss sum, aux present, aux loss, z-loss
/// present, z-loss.
const HEADER: usize = 6;

/// Values of one slot's record: the [`HEADER`], the expert loads, one gradient-present flag per
/// parameter.
fn meta_len(n_params: usize, load_dims: &[usize]) -> usize {
    HEADER + load_dims.iter().sum::<usize>() + n_params
}

/// Consecutive ranges of `params` of one dtype and about [`BUCKET_ELEMS`] elements each.
fn buckets(params: &[Tensor]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut elems) = (0, 0);
    for (i, p) in params.iter().enumerate() {
        if i > start && (elems >= BUCKET_ELEMS || p.dtype() != params[start].dtype()) {
            out.push(start..i);
            (start, elems) = (i, 0);
        }
        elems += p.elem_count();
    }
    if start < params.len() {
        out.push(start..params.len());
    }
    out
}
