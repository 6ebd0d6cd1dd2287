//! The micro-batches of one optimizer step: each one through the base for every adapter that
//! has it (kernel by kernel, or as a fixed-shape step that CUDA graphs record), the losses read
//! back once the step's last backward is queued, and with several ranks each rank's share
//! exchanged so that every rank holds what one process running them all would.

use model::Llama;

use super::adapter::{AdapterRun, StepWork};
use super::fixed::FixedSteps;
use super::micro::{micro_step, read_all, Segment};
use super::parallel::{Captured, Ranks};
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
    /// Runs the micro-batches of `work` (one entry per adapter of `active`, indices into `runs`)
    /// and adds what they gave into `work` (loss sums in micro-batch order, aux and z-losses, the
    /// last expert load) and into the parameters' gradients. Returns `false`, leaving the step
    /// half done, when an interrupt came in between (one process only: ranks stop together at a
    /// step boundary).
    pub fn run(
        &self,
        fixed: &mut Option<FixedSteps>,
        runs: &mut [AdapterRun],
        active: &[usize],
        work: &mut [StepWork],
    ) -> Result<bool> {
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
        if let Some(f) = fixed.as_ref() {
            f.begin_step()?;
        }
        for m in 0..n_micro {
            if ranks.is_none() && (self.interrupted)() {
                return Ok(false);
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
            let results = match fixed.as_mut() {
                Some(f) => vec![f.micro_step(self.model, &segs[0])?],
                None => micro_step(self.model, self.grouped, &segs)?,
            };
            if let Some(r) = ranks {
                let results = read_all(results)?;
                for (&j, (lm, aux, z, load)) in with_m.iter().zip(results) {
                    let run = &runs[active[j]];
                    mine[j][m / r.world()] = Some(Captured::take(run, lm, aux, z, load));
                }
                continue;
            }
            pending.extend(with_m.into_iter().zip(results));
        }
        if let Some(f) = fixed.as_ref() {
            f.end_step()?;
        }
        // The micro-batches' losses, read back once the step's last backward is queued (one wait
        // for the device a step, not one a micro-batch), and added up in micro-batch order.
        let (slots, outs): (Vec<usize>, Vec<_>) = pending.into_iter().unzip();
        for (j, (lm, aux, z, load)) in slots.into_iter().zip(read_all(outs)?) {
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
        if let Some(r) = ranks {
            for (j, &i) in active.iter().enumerate() {
                r.sync_adapter(&runs[i], &mut work[j], &mine[j], self.model.device())?;
            }
        }
        Ok(true)
    }
}
