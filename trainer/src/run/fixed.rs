//! Fixed-shape micro-steps (`--cuda-graphs eager|on`): the shape of every micro-batch comes from
//! a small set, so that a training micro-step of each shape can be recorded once as a CUDA graph
//! and replayed, one launch in place of thousands.
//!
//! A graph replays its kernels with the arguments and addresses they were recorded with. So
//! everything that changes from one micro-batch to the next reaches the kernels through device
//! memory that the graph reads:
//! - the token ids, key mask, RoPE positions (from the mask, on the host) and labels: each
//!   shape's own input buffers, written before a run;
//! - the shape: the micro-batch is padded to `micro_batch_size` rows (a packed micro-batch,
//!   `--pack-micro-batches`, keeps its own number of rows) and its length rounded up to a
//!   multiple of [`BUCKET`] (at most `cutoff_len`), so a recipe of ragged examples needs a few
//!   graphs, not one per length. Padding adds no key, no target and no loss;
//! - the loss normalisation (`1 / target tokens of the step`, `1 / micro-batches`): device
//!   scalars of the shape, not launch arguments;
//! - the dropout: the model sees one constant seed and each micro-batch sets the device's
//!   dropout key ([`engine::set_dropout_key`]) to its own draw of the run's RNG, so the masks are
//!   new on every micro-batch and a replay draws exactly what the eager run draws;
//! - the gradients: added into buffers that live across the run (one flat buffer per dtype, a
//!   view per parameter), zeroed once at the start of a step and handed to the optimizer at its
//!   end. The optimizer step stays outside the graphs (a few fused launches).
//!
//! `eager` runs the same micro-steps without recording them: on any device, the reference that
//! `on` must equal bit for bit. `on` runs each shape eagerly the first time (kernels load, lazy
//! caches fill outside the graph), records it the second time and replays it from then on. All
//! shapes' graphs of an adapter share one [`GraphMemory`](engine::backend::cuda::GraphMemory):
//! their replays never overlap, and each run's outputs are copied out before the next.
//!
//! Several adapters (a run of an adapter group): each has its own fixed-shape micro-steps through
//! the frozen base ([`Llama::forward_train_member_hidden_at`]: what it computes alone), its own
//! graphs, graph memory and lane ([`engine::set_lane`]: its own dropout key and cuBLAS
//! workspace), so that a micro-batch's replays of all adapters run at the same time on the GPU
//! ([`round`]: `replay_together`), where kernel by kernel one adapter's small kernels would follow
//! another's. In [`GroupMode::Sequential`] they run one after another instead, replay included,
//! and all adapters' graphs share one memory ([`share_memory`]): one adapter's activations at a
//! time.

use std::collections::BTreeMap;

use engine::{DType, Device, Tensor};
use model::{GroupMode, Llama};

use super::lm_loss_rows;
use super::micro::{MicroOut, Segment};
use crate::data::HostBatch;
use crate::error::Result;

/// Micro-batch lengths are rounded up to a multiple of this (at most `cutoff_len`).
pub const BUCKET: usize = 64;

/// The length a micro-batch of `len` positions is padded to: the next multiple of [`BUCKET`],
/// at most `cutoff` (never below `len`).
pub fn bucket_len(len: usize, cutoff: usize) -> usize {
    (len.div_ceil(BUCKET) * BUCKET).min(cutoff).max(len)
}

/// One micro-batch of each segment's adapter (`segs[k].adapter` indexes `fixed`), each as its
/// adapter's fixed-shape micro-step: the eager ones (and the first recording of a shape) one
/// after another, then every replay at once, each in its adapter's lane; in
/// [`GroupMode::Sequential`] each adapter's micro-step, replay included, before the next one's
/// (their graphs share one memory: [`share_memory`]). Returns what each left on the device, in
/// the order of `segs`.
pub(super) fn round(
    fixed: &mut [FixedSteps],
    model: &Llama,
    segs: &[Segment],
) -> Result<Vec<MicroOut>> {
    let Some(device) = fixed.first().map(|f| f.device) else {
        return Ok(Vec::new());
    };
    if model.group_mode() == GroupMode::Sequential {
        let mut outs = Vec::with_capacity(segs.len());
        for s in segs {
            let q = fixed[s.adapter].queue(model, s)?;
            if let Some(_key) = q.replay {
                #[cfg(feature = "cuda")]
                fixed[s.adapter].graph(_key).replay()?;
                #[cfg(not(feature = "cuda"))]
                unreachable!("the run refuses --cuda-graphs on without the CUDA backend");
            }
            // Copied out before another graph of the shared memory runs.
            outs.push(q.outputs.copied()?);
        }
        engine::set_lane(device, 0)?;
        return Ok(outs);
    }
    let mut queued = Vec::with_capacity(segs.len());
    for s in segs {
        queued.push(fixed[s.adapter].queue(model, s)?);
    }
    #[cfg(feature = "cuda")]
    {
        let graphs: Vec<&engine::backend::cuda::CudaGraphExec> = (segs.iter().zip(&queued))
            .filter_map(|(s, q)| Some(fixed[s.adapter].graph(q.replay?)))
            .collect();
        engine::backend::cuda::replay_together(&graphs)?;
    }
    #[cfg(not(feature = "cuda"))]
    if queued.iter().any(|q| q.replay.is_some()) {
        unreachable!("the run refuses --cuda-graphs on without the CUDA backend")
    }
    engine::set_lane(device, 0)?;
    // The outputs are the graphs' (or, eager, fresh): copied out before their next run.
    queued.into_iter().map(|q| q.outputs.copied()).collect()
}

/// Gives every adapter's graphs one memory, for [`GroupMode::Sequential`], whose replays never
/// overlap: the memory of the largest micro-step, not of one per adapter. (Without the CUDA
/// backend there are no graphs: nothing to do.)
pub(super) fn share_memory(fixed: &mut [FixedSteps]) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(Device::Cuda(n)) = fixed.first().map(|f| f.device) {
        let dev = engine::backend::cuda::CudaDevice::get(n)?;
        let memory = engine::backend::cuda::GraphMemory::new(&dev);
        for f in fixed.iter_mut() {
            f.memory = Some(memory.clone());
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = fixed;
    Ok(())
}

/// A micro-step queued by [`FixedSteps::queue`]: its outputs, and the shape whose graph must be
/// replayed to compute them (`None`: computed eagerly already).
struct Queued {
    outputs: Outputs,
    replay: Option<(usize, usize)>,
}

/// The micro-steps of one adapter, by shape.
pub(super) struct FixedSteps {
    capture: bool,
    device: Device,
    /// The adapter's index in the model's adapter group (`None`: the model's attached adapter);
    /// also its lane (0 for an attached adapter).
    member: Option<usize>,
    rows: usize,
    cutoff: usize,
    pad: u32,
    /// The dropout seed the model sees on every micro-batch (the key varies).
    seed: u64,
    params: Vec<Tensor>,
    /// The step's gradients: one zero-initialised flat buffer per dtype, and a view of it per
    /// parameter (the parameters' order).
    sums: GradientSums,
    /// Keep each micro-batch's own number of rows (packed micro-batches) instead of padding
    /// every one to `rows`.
    exact_rows: bool,
    /// By `(rows, len)`.
    shapes: BTreeMap<(usize, usize), Shape>,
    /// Shapes, and graphs, given back by [`FixedSteps::release`].
    released: (usize, usize),
    #[cfg(feature = "cuda")]
    memory: Option<engine::backend::cuda::GraphMemory>,
}

/// One micro-batch shape `[rows, len]`: its inputs, and its graph once recorded.
struct Shape {
    ids: Tensor,
    mask: Tensor,
    /// RoPE positions, computed on the host from the mask (the device's would need a read-back).
    positions: Tensor,
    labels: Tensor,
    /// f32 scalars: `1 / target tokens of the step`, `1 / micro-batches of the step`.
    inv_targets: Tensor,
    inv_micro: Tensor,
    runs: usize,
    #[cfg(feature = "cuda")]
    graph: Option<(engine::backend::cuda::CudaGraphExec, Outputs)>,
}

/// What a micro-step leaves on the device: its scalars as f64 `[1 + aux + z]` (summed LM loss,
/// then the aux loss and z-loss when the model has them) and its expert loads, concatenated.
#[derive(Clone)]
struct Outputs {
    scalars: Tensor,
    has_aux: bool,
    has_z: bool,
    loads: Option<Tensor>,
    n_loads: usize,
}

impl FixedSteps {
    /// For `params` (the adapter's trainable tensors, in the optimizer's order) on `device`:
    /// micro-batches of `rows` rows (`exact_rows`: of their own number of rows, at most `rows`:
    /// packed micro-batches) of at most `cutoff` positions, padded with `pad`, dropout drawn
    /// from `seed` under each micro-batch's key; `capture`: record them as CUDA graphs
    /// (`--cuda-graphs on`: the run checked that the device is a GPU of a CUDA build);
    /// `member`: the adapter's index in the model's adapter group (`None`: the model's attached
    /// adapter), below [`engine::LANES`] (its lane).
    pub fn new(
        capture: bool,
        device: Device,
        params: &[Tensor],
        (rows, exact_rows, cutoff, pad): (usize, bool, usize, u32),
        seed: u64,
        member: Option<usize>,
    ) -> Result<FixedSteps> {
        let sums = GradientSums::new(params, device)?;
        Ok(FixedSteps {
            capture,
            device,
            member,
            rows,
            cutoff,
            pad,
            seed,
            params: params.to_vec(),
            sums,
            exact_rows,
            shapes: BTreeMap::new(),
            released: (0, 0),
            #[cfg(feature = "cuda")]
            memory: None,
        })
    }

    /// Zeroes the step's gradient buffers: call before a step's first micro-batch.
    pub fn begin_step(&self) -> Result<()> {
        for f in &self.sums.flats {
            f.assign(&Tensor::zeros(f.dims().to_vec(), f.dtype(), self.device)?)?;
        }
        Ok(())
    }

    /// Hands the step's summed gradients to the parameters (their `grad`), for the optimizer.
    /// The parameters' own gradients were empty (each micro-step takes them).
    pub fn end_step(&self) -> Result<()> {
        for (p, g) in self.params.iter().zip(&self.sums.views) {
            p.zero_grad();
            p.accumulate_grad(g)?;
        }
        Ok(())
    }

    /// Drops every shape's inputs and graph, and the graph memory (the adapter trains no more);
    /// [`FixedSteps::shapes`] still counts them.
    pub fn release(&mut self) {
        self.released = self.shapes();
        self.shapes.clear();
        #[cfg(feature = "cuda")]
        {
            self.memory = None;
        }
    }

    /// The adapter's lane ([`engine::set_lane`]).
    fn lane(&self) -> usize {
        self.member.unwrap_or(0)
    }

    /// Queues one micro-batch `seg` of the step: forward, loss and backward at its padded shape,
    /// its gradients added into the step's buffers, its dropout key `seg.seed`, in the adapter's
    /// lane (left current). Eager (the shape's first run, or `eager` mode) it runs now; else its
    /// graph (recorded now if need be) is left to [`round`] to replay.
    fn queue(&mut self, model: &Llama, seg: &Segment) -> Result<Queued> {
        let len = bucket_len(seg.batch.len, self.cutoff);
        let rows = match self.exact_rows {
            true => seg.batch.batch,
            false => self.rows.max(seg.batch.batch),
        };
        let batch = seg.batch.padded_to(rows, len, self.pad);
        let (key, device) = ((rows, len), self.device);
        if let std::collections::btree_map::Entry::Vacant(e) = self.shapes.entry(key) {
            e.insert(Shape::new(rows, len, device)?);
        }
        let shape = &self.shapes[&key];
        shape.write(&batch, seg)?;
        engine::set_lane(device, self.lane())?;
        engine::set_dropout_key(device, seg.seed)?;
        let queued = if !self.capture || shape.runs == 0 {
            let (params, sums, seed) = (&self.params, &self.sums, self.seed);
            Queued {
                outputs: micro_body(model, self.member, shape, params, sums, seed)?,
                replay: None,
            }
        } else {
            Queued {
                outputs: self.record(key, model)?,
                replay: Some(key),
            }
        };
        self.shapes.get_mut(&key).expect("made above").runs += 1;
        Ok(queued)
    }

    /// Records the graph of shape `key` (rows, len) unless it has one; returns its outputs (the
    /// same tensors on every replay).
    #[cfg(feature = "cuda")]
    fn record(&mut self, key: (usize, usize), model: &Llama) -> Result<Outputs> {
        use crate::error::Error;
        use engine::backend::cuda::{capture_in, CudaDevice, GraphMemory};
        let Device::Cuda(n) = self.device else {
            unreachable!("checked in new")
        };
        let dev = CudaDevice::get(n)?;
        let memory = self
            .memory
            .get_or_insert_with(|| GraphMemory::new(&dev))
            .clone();
        if self.shapes[&key].graph.is_none() {
            let shape = &self.shapes[&key];
            let (member, params, sums, seed) = (self.member, &self.params, &self.sums, self.seed);
            let (graph, out) = capture_in(&dev, &memory, || {
                micro_body(model, member, shape, params, sums, seed).map_err(|e| match e {
                    Error::Engine(e) => e,
                    other => engine::Error::invalid("graph capture", other.to_string()),
                })
            })
            .map_err(|e| {
                Error::Config(format!(
                    "recording the training step as a CUDA graph failed ({e}); train with \
                     --cuda-graphs off"
                ))
            })?;
            self.shapes.get_mut(&key).expect("exists").graph = Some((graph, out));
        }
        let (_, out) = self.shapes[&key].graph.as_ref().expect("recorded");
        Ok(out.clone()) // the same tensors, which the next replay overwrites
    }

    #[cfg(not(feature = "cuda"))]
    fn record(&mut self, _key: (usize, usize), _model: &Llama) -> Result<Outputs> {
        unreachable!("the run refuses --cuda-graphs on without the CUDA backend")
    }

    /// The recorded graph of shape `key`.
    #[cfg(feature = "cuda")]
    fn graph(&self, key: (usize, usize)) -> &engine::backend::cuda::CudaGraphExec {
        &self.shapes[&key]
            .graph
            .as_ref()
            .expect("recorded by queue")
            .0
    }

    /// The run's line on its fixed shapes: how many, of how many rows, how many recorded.
    pub fn summary(&self) -> String {
        let (shapes, recorded) = self.shapes();
        let rows = match self.exact_rows {
            true => format!("at most {}", self.rows),
            false => self.rows.to_string(),
        };
        format!(
            "fixed-shape micro-steps: {shapes} shape(s) of {rows} rows, {recorded} recorded as CUDA \
             graphs"
        )
    }

    /// Shapes seen so far, and how many of them have a graph (those released included).
    pub fn shapes(&self) -> (usize, usize) {
        #[cfg(feature = "cuda")]
        let recorded = self.shapes.values().filter(|s| s.graph.is_some()).count();
        #[cfg(not(feature = "cuda"))]
        let recorded = 0;
        (
            self.released.0 + self.shapes.len(),
            self.released.1 + recorded,
        )
    }
}

impl Drop for FixedSteps {
    /// Sets the adapter's dropout key back to 0, where a device starts, and the lane to 0, however
    /// the run ends (an error or an interrupt too): a later run on the device (on the CPU: on
    /// this thread) draws every seed as given. Refused only while a graph is being captured,
    /// which an unwinding capture has ended already.
    fn drop(&mut self) {
        let _ = engine::set_lane(self.device, self.lane());
        let _ = engine::set_dropout_key(self.device, 0);
        let _ = engine::set_lane(self.device, 0);
    }
}

impl Shape {
    fn new(rows: usize, len: usize, device: Device) -> Result<Shape> {
        let u32s = |n: usize| Tensor::zeros(n, DType::U32, device);
        Ok(Shape {
            ids: u32s(rows * len)?.reshape([rows, len])?,
            mask: u32s(rows * len)?.reshape([rows, len])?,
            positions: u32s(rows * len)?.reshape([rows, len])?,
            labels: u32s(rows * len)?,
            inv_targets: Tensor::scalar(1.0, DType::F32, device)?,
            inv_micro: Tensor::scalar(1.0, DType::F32, device)?,
            runs: 0,
            #[cfg(feature = "cuda")]
            graph: None,
        })
    }

    /// Writes the padded micro-batch `b` and the step's normalisation into the inputs: one
    /// host-to-device copy each, straight into the buffers (no kernel, no new buffer).
    fn write(&self, b: &HostBatch, seg: &Segment) -> Result<()> {
        self.ids.write_slice(&b.ids)?;
        self.mask.write_slice(&b.key_mask)?;
        self.positions
            .write_slice(&model::mask_positions(&b.key_mask, b.len))?;
        self.labels.write_slice(&b.labels)?;
        self.inv_targets
            .write_slice(&[(1.0 / seg.n_targets) as f32])?;
        self.inv_micro.write_slice(&[(1.0 / seg.n_micro) as f32])?;
        Ok(())
    }
}

/// The micro-step itself, on `shape`'s inputs: what [`super::micro::micro_step`] computes for
/// one adapter (`member`: of the model's adapter group, else the attached one), with the normalisation read from device scalars, the gradients added into
/// `sums` (the parameters' own gradients taken and cleared; one kernel per dtype) and the
/// outputs packed.
fn micro_body(
    model: &Llama,
    member: Option<usize>,
    shape: &Shape,
    params: &[Tensor],
    sums: &GradientSums,
    seed: u64,
) -> Result<Outputs> {
    let (ids, mask, positions) = (&shape.ids, Some(&shape.mask), &shape.positions);
    let out = match member {
        None => model.forward_train_hidden_at(ids, mask, positions, Some(seed))?,
        Some(i) => model.forward_train_member_hidden_at(i, ids, mask, positions, Some(seed))?,
    };
    let lm_sum = lm_loss_rows(model, &out.hidden, &shape.labels)?.sum_all()?;
    let mut loss = lm_sum.to_dtype(DType::F32)?.mul(&shape.inv_targets)?;
    for extra in out.aux_loss.iter().chain(&out.z_loss) {
        loss = loss.add(&extra.to_dtype(DType::F32)?.mul(&shape.inv_micro)?)?;
    }
    loss.backward()?;
    let taken: Vec<Option<Tensor>> = params
        .iter()
        .map(|p| {
            let g = p.grad();
            p.zero_grad();
            g
        })
        .collect();
    sums.add(&taken)?;
    let scalars: Vec<Tensor> = std::iter::once(&lm_sum)
        .chain(&out.aux_loss)
        .chain(&out.z_loss)
        .map(|t| t.detach().to_dtype(DType::F64)?.reshape([1]))
        .collect::<engine::Result<_>>()?;
    let loads: Vec<Tensor> = out
        .expert_load
        .iter()
        .map(|l| l.to_dtype(DType::F64)?.reshape([l.elem_count()]))
        .collect::<engine::Result<_>>()?;
    Ok(Outputs {
        scalars: engine::cat(&scalars.iter().collect::<Vec<_>>(), 0)?,
        has_aux: out.aux_loss.is_some(),
        has_z: out.z_loss.is_some(),
        loads: if loads.is_empty() {
            None
        } else {
            Some(engine::cat(&loads.iter().collect::<Vec<_>>(), 0)?)
        },
        n_loads: loads.len(),
    })
}

impl Outputs {
    /// Copies of the outputs (one copy kernel each), split into a [`MicroOut`] of views.
    fn copied(self) -> Result<MicroOut> {
        let scalars = engine::no_grad(|| self.scalars.copy())?;
        let mut at = 0;
        let mut next = || -> Result<Tensor> {
            let t = scalars.narrow(0, at, 1)?.reshape(())?;
            at += 1;
            Ok(t)
        };
        let lm = next()?;
        let aux = self.has_aux.then(&mut next).transpose()?;
        let z = self.has_z.then(&mut next).transpose()?;
        let load = match &self.loads {
            None => Vec::new(),
            Some(l) => {
                let l = engine::no_grad(|| l.copy())?;
                let e = l.elem_count() / self.n_loads.max(1);
                (0..self.n_loads)
                    .map(|i| Ok(l.narrow(0, i * e, e)?))
                    .collect::<Result<_>>()?
            }
        };
        Ok(MicroOut::new(lm, aux, z, load))
    }
}

/// The step's gradient sums: a flat buffer per dtype of the parameters (in order of first
/// appearance) and, per parameter, a view of it with the parameter's shape, at `slots[i]`
/// `(buffer, element offset)`.
struct GradientSums {
    flats: Vec<Tensor>,
    views: Vec<Tensor>,
    slots: Vec<(usize, usize)>,
}

impl GradientSums {
    fn new(params: &[Tensor], device: Device) -> Result<GradientSums> {
        let mut dtypes: Vec<DType> = Vec::new();
        for p in params {
            if !dtypes.contains(&p.dtype()) {
                dtypes.push(p.dtype());
            }
        }
        let flats = dtypes
            .iter()
            .map(|&d| {
                let n: usize = params
                    .iter()
                    .filter(|p| p.dtype() == d)
                    .map(|p| p.elem_count())
                    .sum();
                Tensor::zeros(n.max(1), d, device)
            })
            .collect::<engine::Result<Vec<_>>>()?;
        let mut next = vec![0usize; dtypes.len()];
        let mut slots = Vec::with_capacity(params.len());
        let mut views = Vec::with_capacity(params.len());
        for p in params {
            let k = dtypes.iter().position(|&d| d == p.dtype()).expect("listed");
            let n = p.elem_count();
            views.push(flats[k].narrow(0, next[k], n)?.reshape(p.dims().to_vec())?);
            slots.push((k, next[k]));
            next[k] += n;
        }
        Ok(GradientSums {
            flats,
            views,
            slots,
        })
    }

    /// Adds `grads[i]` (parameter i's gradient, when it has one) into its view: one
    /// [`engine::add_many_into`] per buffer (one kernel, one graph node, for every parameter).
    fn add(&self, grads: &[Option<Tensor>]) -> Result<()> {
        for (k, flat) in self.flats.iter().enumerate() {
            let parts: Vec<(usize, &Tensor)> = grads
                .iter()
                .zip(&self.slots)
                .filter(|(_, &(f, _))| f == k)
                .filter_map(|(g, &(_, off))| g.as_ref().map(|g| (off, g)))
                .collect();
            engine::add_many_into(flat, &parts)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_round_up_to_a_bucket_within_the_cutoff() {
        assert_eq!(bucket_len(1, 512), 64);
        assert_eq!(bucket_len(64, 512), 64);
        assert_eq!(bucket_len(65, 512), 128);
        assert_eq!(bucket_len(500, 512), 512);
        assert_eq!(bucket_len(100, 100), 100); // the cutoff caps it
        assert_eq!(bucket_len(120, 100), 120); // never below the batch's own length
    }
}
