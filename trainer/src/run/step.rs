//! The micro-batches of one optimizer step: each one through the base for every adapter that
//! has it (kernel by kernel, or as a fixed-shape step that CUDA graphs record), with several
//! ranks each rank's share exchanged so that every rank holds what one process running them all
//! would; then the queued step ([`QueuedStep`]), read back in one download while the next step
//! runs, and its end for each adapter ([`StepEnd::end`]).

use engine::Tensor;
use model::Llama;

use super::adapter::{AdapterRun, StepEnd, StepWork};
use super::fixed::{self, FixedSteps};
use super::micro::{micro_step, read_all, MicroOut, Segment};
use super::parallel::{Captured, Ranks};
use super::setup::announce_end;
use crate::error::Result;

/// What stays the same over a run's steps.
pub(super) struct Steps<'a> {
    pub model: &'a Llama,
    /// A run of several adapters (the model's adapter group), even once only one is left.
    pub grouped: bool,
    pub ranks: Option<Ranks<'a>>,
    /// Whether an interrupt asks the run to stop (checked before each micro-batch).
    pub interrupted: &'a dyn Fn() -> bool,
}

impl Steps<'_> {
    /// Queues the micro-batches of `work` (one entry per adapter of `active`, indices into
    /// `runs`), their gradients added into the parameters'; with fixed-shape micro-steps
    /// (`fixed`, one per run, else empty) as those. Returns what each micro-batch left
    /// on the device, by position in `work`, unread ([`QueuedStep::read`] reads it); with ranks,
    /// what they gave is read and exchanged here and added into `work` (the list is then empty).
    /// Returns `None`, leaving the step half done, when an interrupt came in between (one
    /// process only: ranks stop together at a step boundary).
    pub fn run(
        &self,
        fixed: &mut [FixedSteps],
        runs: &mut [AdapterRun],
        active: &[usize],
        work: &mut [StepWork],
    ) -> Result<Option<Vec<(usize, MicroOut)>>> {
        let ranks = self.ranks;
        let n_micro = work.iter().map(|w| w.micro.len()).max().unwrap_or(0);
        // Data parallel: what this rank's micro-batches gave each adapter, by slot (`m / world`).
        let mut mine: Vec<Vec<Option<Captured>>> = match ranks {
            Some(r) => work
                .iter()
                .map(|w| {
                    (0..w.micro.len().div_ceil(r.world()))
                        .map(|_| None)
                        .collect()
                })
                .collect(),
            None => Vec::new(),
        };
        // Each micro-batch's outputs (by position in `work`), still on the device.
        let mut pending = Vec::new();
        for &i in active.iter().filter(|_| !fixed.is_empty()) {
            fixed[i].begin_step()?;
        }
        for m in 0..n_micro {
            if ranks.is_none() && (self.interrupted)() {
                return Ok(None);
            }
            // The adapters with an m-th micro-batch in this step (positions in `active`).
            let with_m: Vec<usize> = (0..work.len())
                .filter(|&j| work[j].micro.len() > m)
                .collect();
            let segs: Vec<Segment> = with_m
                .iter()
                .map(|&j| Segment {
                    adapter: active[j],
                    batch: &work[j].micro[m],
                    n_targets: work[j].n_targets,
                    n_micro: work[j].micro.len() as f64,
                    seed: runs[active[j]].next_seed(),
                })
                .collect();
            // Every rank draws every seed above: the RNG moves as in one process.
            if ranks.is_some_and(|r| !r.owns(m)) {
                continue;
            }
            let results = match fixed.is_empty() {
                false => fixed::round(fixed, self.model, &segs)?,
                true => micro_step(self.model, self.grouped, &segs)?,
            };
            if let Some(r) = ranks {
                let (results, _) = read_all(results, &[])?;
                for (&j, (lm, aux, z, load)) in with_m.iter().zip(results) {
                    let run = &runs[active[j]];
                    mine[j][m / r.world()] = Some(Captured::take(run, lm, aux, z, load));
                }
                continue;
            }
            pending.extend(with_m.into_iter().zip(results));
        }
        for &i in active.iter().filter(|_| !fixed.is_empty()) {
            fixed[i].end_step()?;
        }
        if let Some(r) = ranks {
            for (j, &i) in active.iter().enumerate() {
                r.sync_adapter(&runs[i], &mut work[j], &mine[j], self.model.device())?;
            }
        }
        Ok(Some(pending))
    }
}

/// A step whose micro-batches and optimizer updates are queued on the device, with what they
/// left there (losses, expert loads, each adapter's gradient norm) not yet read back: the
/// training loop queues the next step before it reads this one, so that the host does not wait
/// for the device in between.
pub(super) struct QueuedStep {
    /// The adapters of the step (indices into the runs) and their work, in that order.
    pub active: Vec<usize>,
    pub work: Vec<StepWork>,
    /// Each micro-batch's outputs, by position in `work` (empty when the ranks read them).
    pub outs: Vec<(usize, MicroOut)>,
    /// Per adapter (position in `work`), `[norm, factor]` of its clipping, on the device.
    pub clips: Vec<Tensor>,
}

impl QueuedStep {
    /// Reads back what the step left on the device in one download (one wait, once the device
    /// has done it), adds the micro-batches' losses into the work in micro-batch order, and
    /// returns the adapters, their work and their gradient norms.
    pub fn read(self) -> Result<(Vec<usize>, Vec<StepWork>, Vec<f64>)> {
        let QueuedStep {
            active,
            mut work,
            outs,
            clips,
        } = self;
        let (slots, outs): (Vec<usize>, Vec<_>) = outs.into_iter().unzip();
        let norms = (clips.iter())
            .map(|c| c.narrow(0, 0, 1))
            .collect::<engine::Result<Vec<_>>>()?;
        let (results, norms) = read_all(outs, &norms)?;
        for (j, (lm, aux, z, load)) in slots.into_iter().zip(results) {
            let w = &mut work[j];
            let n = w.micro.len() as f64;
            w.lm += lm;
            if let Some(a) = aux {
                *w.aux.get_or_insert(0.0) += a / n;
            }
            if let Some(z) = z {
                *w.z.get_or_insert(0.0) += z / n;
            }
            w.load = load;
        }
        Ok((active, work, norms))
    }
}

impl StepEnd<'_> {
    /// Reads back the queued step `q` and ends each of its adapters' steps; in a run of several
    /// adapters (not attached to the model), says which of them stopped or finished with it.
    pub fn end(
        &mut self,
        q: QueuedStep,
        runs: &mut [AdapterRun],
        log: &mut dyn FnMut(&str),
    ) -> Result<()> {
        let (active, work, norms) = q.read()?;
        for ((&i, w), norm) in active.iter().zip(work).zip(norms) {
            let r = &mut runs[i];
            let was_training = r.is_training();
            r.end_step(w, norm, self, log)?;
            if !self.attached && was_training {
                announce_end(r, self.progress);
            }
        }
        Ok(())
    }
}
