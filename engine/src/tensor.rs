//! `Tensor`: a cheaply clonable handle to a view (layout) of a shared storage, plus the autograd
//! node that produced it when it was computed from tensors that need gradients.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use crate::autograd::{self, Input, Node, Output};
use crate::backend::cpu::memory::LiveBuffer;
use crate::backend::cpu::CpuStorage;
use crate::backend::BackendStorage;
use crate::{DType, Device, Error, Layout, Result, Shape, Storage, WithDType};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(usize);

impl TensorId {
    fn next() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(1);
        TensorId(COUNTER.fetch_add(1, Ordering::Relaxed))
    }
}

/// A buffer shared by the tensors that view it, with its entry in the CPU's count of live
/// buffer bytes (`backend::cpu::memory`; none for other devices, whose allocators count).
#[derive(Clone)]
pub(crate) struct Shared {
    storage: Arc<RwLock<Storage>>,
    _live: Option<Arc<LiveBuffer>>,
}

impl Shared {
    fn new(storage: Storage) -> Self {
        let live = matches!(storage, Storage::Cpu(_)).then(|| {
            Arc::new(LiveBuffer::new(
                storage.len() * storage.dtype().size_in_bytes(),
            ))
        });
        Shared {
            storage: Arc::new(RwLock::new(storage)),
            _live: live,
        }
    }
}

/// What a tensor handle holds of its data.
enum Buffer {
    Data(Shared),
    /// A graph-only reference held by the tape node of `consumer` (see
    /// [`autograd::Input::GraphOnly`]): the id, node, layout, dtype and device, no buffer.
    GraphOnly {
        consumer: &'static str,
    },
}

pub(crate) struct TensorImpl {
    id: TensorId,
    buffer: Buffer,
    layout: Layout,
    dtype: DType,
    device: Device,
    /// How this tensor was computed, when any input needed a gradient (shared by the graph-only
    /// references to this tensor).
    node: Option<Arc<Node>>,
    /// A trainable leaf: `backward` accumulates into `grad`.
    variable: bool,
    grad: Mutex<Option<Tensor>>,
}

#[derive(Clone)]
pub struct Tensor(Arc<TensorImpl>);

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor[{}; {}, {}",
            self.shape(),
            self.dtype(),
            self.device()
        )?;
        if self.is_variable() {
            write!(f, ", var")?;
        }
        write!(f, "]")
    }
}

impl Tensor {
    // ----- construction ---------------------------------------------------------------------

    pub(crate) fn from_parts(
        storage: Shared,
        layout: Layout,
        node: Option<Node>,
        variable: bool,
    ) -> Self {
        let (dtype, device) = {
            let s = storage.storage.read().unwrap_or_else(|e| e.into_inner());
            (s.dtype(), s.device())
        };
        Tensor(Arc::new(TensorImpl {
            id: TensorId::next(),
            buffer: Buffer::Data(storage),
            layout,
            dtype,
            device,
            node: node.map(Arc::new),
            variable,
            grad: Mutex::new(None),
        }))
    }

    /// A new contiguous tensor over `storage`, recording `node` when it is given.
    pub(crate) fn from_storage(
        storage: Storage,
        shape: impl Into<Shape>,
        node: Option<Node>,
    ) -> Self {
        Self::from_parts(Shared::new(storage), Layout::contiguous(shape), node, false)
    }

    /// A view sharing this tensor's storage.
    pub(crate) fn view(&self, layout: Layout, node: Option<Node>) -> Self {
        Self::from_parts(self.shared().clone(), layout, node, false)
    }

    /// How the node of `consumer` holds this tensor when its rule does not read the values: the
    /// same id, node, layout, dtype and device without the buffer. The buffer stays when this
    /// is a variable (a parameter) or when its own node reads its output (the backward walk
    /// hands it to that rule); a tensor with neither node nor gradient becomes a bare stub.
    pub(crate) fn graph_ref(&self, consumer: &'static str) -> Self {
        let reads_output = self.node().is_some_and(Node::reads_output);
        if self.0.variable || reads_output || !self.has_data() {
            return self.clone();
        }
        Tensor(Arc::new(TensorImpl {
            id: self.0.id,
            buffer: Buffer::GraphOnly { consumer },
            layout: self.0.layout.clone(),
            dtype: self.0.dtype,
            device: self.0.device,
            node: self.0.node.clone(),
            variable: false,
            grad: Mutex::new(None),
        }))
    }

    pub fn zeros(shape: impl Into<Shape>, dtype: DType, device: Device) -> Result<Self> {
        let shape = shape.into();
        Ok(Self::from_storage(
            Storage::zeros(device, &shape, dtype)?,
            shape,
            None,
        ))
    }
    pub fn ones(shape: impl Into<Shape>, dtype: DType, device: Device) -> Result<Self> {
        Self::full(shape, 1.0, dtype, device)
    }
    pub fn full(shape: impl Into<Shape>, value: f64, dtype: DType, device: Device) -> Result<Self> {
        let shape = shape.into();
        Ok(Self::from_storage(
            Storage::full(device, &shape, dtype, value)?,
            shape,
            None,
        ))
    }
    pub fn zeros_like(&self) -> Result<Self> {
        Self::zeros(self.shape().clone(), self.dtype(), self.device())
    }
    pub fn ones_like(&self) -> Result<Self> {
        Self::ones(self.shape().clone(), self.dtype(), self.device())
    }
    /// A scalar (rank 0) tensor.
    pub fn scalar(value: f64, dtype: DType, device: Device) -> Result<Self> {
        Self::full((), value, dtype, device)
    }

    /// A tensor holding `data` (row-major) with `shape`.
    pub fn from_vec<T: WithDType>(
        data: Vec<T>,
        shape: impl Into<Shape>,
        device: Device,
    ) -> Result<Self> {
        let shape = shape.into();
        if data.len() != shape.elem_count() {
            return Err(Error::ElementCountMismatch {
                op: "from_vec",
                numel: data.len(),
                shape,
            });
        }
        let cpu = cpu_storage_from_vec(data);
        Ok(Self::from_storage(
            Storage::from_cpu(device, cpu)?,
            shape,
            None,
        ))
    }
    pub fn from_slice<T: WithDType>(
        data: &[T],
        shape: impl Into<Shape>,
        device: Device,
    ) -> Result<Self> {
        Self::from_vec(data.to_vec(), shape, device)
    }
    /// `data` converted to `dtype`.
    pub fn from_f64(
        data: &[f64],
        shape: impl Into<Shape>,
        dtype: DType,
        device: Device,
    ) -> Result<Self> {
        let shape = shape.into();
        if data.len() != shape.elem_count() {
            return Err(Error::ElementCountMismatch {
                op: "from_f64",
                numel: data.len(),
                shape,
            });
        }
        Ok(Self::from_storage(
            Storage::upload_f64(device, data, dtype)?,
            shape,
            None,
        ))
    }
    /// `0, 1, .., n-1` as u32.
    pub fn arange(n: usize, device: Device) -> Result<Self> {
        Self::from_vec((0..n as u32).collect::<Vec<u32>>(), n, device)
    }
    /// Seeded normal samples (counter-based: the same on every backend).
    pub fn randn(
        shape: impl Into<Shape>,
        mean: f64,
        std: f64,
        seed: u64,
        dtype: DType,
        device: Device,
    ) -> Result<Self> {
        let shape = shape.into();
        Ok(Self::from_storage(
            Storage::randn(device, &shape, dtype, mean, std, seed)?,
            shape,
            None,
        ))
    }
    /// Seeded uniform samples in `[lo, hi)`.
    pub fn rand_uniform(
        shape: impl Into<Shape>,
        lo: f64,
        hi: f64,
        seed: u64,
        dtype: DType,
        device: Device,
    ) -> Result<Self> {
        let shape = shape.into();
        Ok(Self::from_storage(
            Storage::rand_uniform(device, &shape, dtype, lo, hi, seed)?,
            shape,
            None,
        ))
    }

    // ----- accessors ------------------------------------------------------------------------

    pub fn id(&self) -> TensorId {
        self.0.id
    }
    pub fn shape(&self) -> &Shape {
        self.0.layout.shape()
    }
    pub fn dims(&self) -> &[usize] {
        self.0.layout.dims()
    }
    pub fn rank(&self) -> usize {
        self.dims().len()
    }
    pub fn elem_count(&self) -> usize {
        self.0.layout.elem_count()
    }
    pub fn dtype(&self) -> DType {
        self.0.dtype
    }
    pub fn device(&self) -> Device {
        self.0.device
    }
    pub fn layout(&self) -> &Layout {
        &self.0.layout
    }
    pub fn is_contiguous(&self) -> bool {
        self.0.layout.is_contiguous()
    }
    /// The size of `dim` (negative counts from the end).
    pub fn dim(&self, dim: isize) -> Result<usize> {
        Ok(self.dims()[self.shape().dim("dim", dim)?])
    }
    /// The shared buffer. Panics on a graph-only reference: only a backward rule can see one,
    /// and reading it means the op declared an input graph-only that its rule reads.
    fn data(&self) -> &Arc<RwLock<Storage>> {
        &self.shared().storage
    }
    /// The shared buffer with its count (panics as [`Self::data`]).
    fn shared(&self) -> &Shared {
        match &self.0.buffer {
            Buffer::Data(s) => s,
            Buffer::GraphOnly { consumer } => panic!(
                "internal error: the backward rule of `{consumer}` read the values of an input it \
                 records as graph-only (a {} {} tensor computed by `{}`); record it with \
                 Input::Keep",
                self.shape(),
                self.dtype(),
                self.node().map_or("no op", Node::name),
            ),
        }
    }
    /// The shared buffer, or a typed error on a graph-only reference (`op` reads the values).
    pub(crate) fn try_data(&self, op: &'static str) -> Result<&Arc<RwLock<Storage>>> {
        match &self.0.buffer {
            Buffer::Data(s) => Ok(&s.storage),
            Buffer::GraphOnly { consumer } => Err(Error::GraphOnly {
                op,
                consumer,
                shape: self.shape().clone(),
            }),
        }
    }
    pub(crate) fn storage(&self) -> RwLockReadGuard<'_, Storage> {
        // A poisoned lock only means another thread panicked mid-op; the buffer itself is intact.
        self.data().read().unwrap_or_else(|e| e.into_inner())
    }
    pub(crate) fn try_storage(&self, op: &'static str) -> Result<RwLockReadGuard<'_, Storage>> {
        Ok(self.try_data(op)?.read().unwrap_or_else(|e| e.into_inner()))
    }
    /// False for a graph-only reference held by a tape node (see
    /// [`autograd::Input::GraphOnly`]): a handle without values.
    pub fn has_data(&self) -> bool {
        matches!(self.0.buffer, Buffer::Data(_))
    }
    /// True when both tensors view the same buffer (false when either has no data).
    pub fn same_storage(&self, other: &Tensor) -> bool {
        match (&self.0.buffer, &other.0.buffer) {
            (Buffer::Data(a), Buffer::Data(b)) => Arc::ptr_eq(&a.storage, &b.storage),
            _ => false,
        }
    }
    /// A weak handle on the buffer (`None` for a graph-only reference): it upgrades while some
    /// tensor or tape node still holds the buffer, so a test can watch a buffer being freed.
    pub fn weak_storage(&self) -> Option<Weak<RwLock<Storage>>> {
        match &self.0.buffer {
            Buffer::Data(s) => Some(Arc::downgrade(&s.storage)),
            Buffer::GraphOnly { .. } => None,
        }
    }
    /// Bytes of the whole buffer behind this tensor (a view counts its full buffer; 0 for a
    /// graph-only reference).
    pub fn storage_bytes(&self) -> usize {
        match &self.0.buffer {
            Buffer::Data(_) => self.storage().len() * self.dtype().size_in_bytes(),
            Buffer::GraphOnly { .. } => 0,
        }
    }
    pub(crate) fn node(&self) -> Option<&Node> {
        self.0.node.as_deref()
    }
    /// The recorded op that computed this tensor and the shapes and dtypes of the inputs whose
    /// buffers its tape node keeps alive (`None` without a node; graph-only inputs are left
    /// out): what a memory audit or a test of an op's saved tensors reads.
    pub fn recorded_op(&self) -> Option<(&'static str, Vec<(Shape, DType)>)> {
        self.node().map(|n| {
            let kept = n
                .inputs()
                .iter()
                .filter(|t| t.has_data())
                .map(|t| (t.shape().clone(), t.dtype()))
                .collect();
            (n.name(), kept)
        })
    }

    // ----- reading back ---------------------------------------------------------------------

    /// All elements, row-major, as f64.
    pub fn to_vec_f64(&self) -> Result<Vec<f64>> {
        self.try_storage("to_vec")?.to_f64_vec(self.layout())
    }
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        Ok(self.to_vec_f64()?.into_iter().map(|x| x as f32).collect())
    }
    pub fn to_vec_u32(&self) -> Result<Vec<u32>> {
        if self.dtype() != DType::U32 {
            return Err(Error::UnsupportedDType {
                op: "to_vec_u32",
                dtype: self.dtype(),
            });
        }
        Ok(self.to_vec_f64()?.into_iter().map(|x| x as u32).collect())
    }
    /// The single element of a tensor with one element.
    pub fn to_scalar(&self) -> Result<f64> {
        if self.elem_count() != 1 {
            return Err(Error::invalid(
                "to_scalar",
                format!("tensor of shape {} is not a scalar", self.shape()),
            ));
        }
        Ok(self.to_vec_f64()?[0])
    }

    // ----- autograd -------------------------------------------------------------------------

    /// A trainable leaf with the same values (copied into its own buffer).
    pub fn to_var(&self) -> Result<Self> {
        let c = autograd::no_grad(|| self.copy())?;
        Ok(Self::from_parts(
            c.shared().clone(),
            c.0.layout.clone(),
            None,
            true,
        ))
    }
    /// A trainable leaf over the same buffer and view (no copy), without this tensor's history.
    pub(crate) fn detach_as_leaf(&self) -> Self {
        Self::from_parts(self.shared().clone(), self.layout().clone(), None, true)
    }
    pub fn is_variable(&self) -> bool {
        self.0.variable
    }
    /// True when gradients flow through this tensor (a variable, or computed from one).
    pub fn tracks_grad(&self) -> bool {
        self.0.variable || self.0.node.is_some()
    }
    /// The same values without the autograd history (shares the buffer; a graph-only reference
    /// stays one, without its node).
    pub fn detach(&self) -> Self {
        if !self.tracks_grad() {
            return self.clone();
        }
        match &self.0.buffer {
            Buffer::Data(_) => self.view(self.layout().clone(), None),
            Buffer::GraphOnly { consumer } => Tensor(Arc::new(TensorImpl {
                id: TensorId::next(),
                buffer: Buffer::GraphOnly { consumer },
                layout: self.0.layout.clone(),
                dtype: self.0.dtype,
                device: self.0.device,
                node: None,
                variable: false,
                grad: Mutex::new(None),
            })),
        }
    }
    /// The accumulated gradient of a variable.
    pub fn grad(&self) -> Option<Tensor> {
        self.0
            .grad
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
    pub fn zero_grad(&self) {
        *self.0.grad.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
    /// Adds `g` into this variable's gradient exactly as a backward pass does: the slot takes `g`
    /// itself when empty, else `old + g`. A data-parallel step replays its micro-batches'
    /// gradients through this, in micro-batch order, to sum them as one process would.
    pub fn accumulate_grad(&self, g: &Tensor) -> Result<()> {
        let mut slot = self.0.grad.lock().unwrap_or_else(|e| e.into_inner());
        let new = match slot.take() {
            None => g.detach(),
            Some(old) => old.add(g)?,
        };
        *slot = Some(new);
        Ok(())
    }

    /// A contiguous copy of this tensor on `device` (the tensor itself when it is already there).
    /// Recorded on the tape: the gradient goes back to this tensor's device.
    pub fn to_device(&self, device: Device) -> Result<Self> {
        if device == self.device() {
            return Ok(self.clone());
        }
        let out = self
            .try_storage("to_device")?
            .to_device(self.layout(), device)?;
        let src = self.device();
        let node = Node::record_with(
            "to_device",
            &[Input::GraphOnly(self)],
            Output::Unread,
            move |_, _, g| Ok(vec![Some(g.to_device(src)?)]),
        );
        Ok(Self::from_storage(out, self.shape().clone(), node))
    }

    /// A contiguous copy in a new buffer (no autograd record of its own beyond `contiguous`).
    pub fn copy(&self) -> Result<Self> {
        // Every element is written by the copy below: no fill first.
        let mut out = Storage::for_overwrite(self.device(), self.shape(), self.dtype())?;
        self.try_storage("copy")?.copy_to_view(
            self.layout(),
            &mut out,
            &Layout::contiguous(self.shape().clone()),
        )?;
        let node = Node::record_with(
            "copy",
            &[Input::GraphOnly(self)],
            Output::Unread,
            |_, _, g| Ok(vec![Some(g.clone())]),
        );
        Ok(Self::from_storage(out, self.shape().clone(), node))
    }

    /// The buffer, locked for writing (in-place updates: optimisers, running statistics).
    pub(crate) fn storage_mut(&self) -> RwLockWriteGuard<'_, Storage> {
        self.data().write().unwrap_or_else(|e| e.into_inner())
    }
    /// An identity of the buffer behind this tensor (equal for tensors that share it).
    pub(crate) fn storage_key(&self) -> usize {
        Arc::as_ptr(self.data()) as usize
    }
}

pub(crate) fn cpu_storage_from_vec<T: WithDType>(data: Vec<T>) -> CpuStorage {
    // Move the Vec into the matching variant without copying.
    let any: Box<dyn std::any::Any> = Box::new(data);
    let any = match any.downcast::<Vec<f32>>() {
        Ok(v) => return CpuStorage::F32(*v),
        Err(a) => a,
    };
    let any = match any.downcast::<Vec<f64>>() {
        Ok(v) => return CpuStorage::F64(*v),
        Err(a) => a,
    };
    let any = match any.downcast::<Vec<half::bf16>>() {
        Ok(v) => return CpuStorage::BF16(*v),
        Err(a) => a,
    };
    match any.downcast::<Vec<u32>>() {
        Ok(v) => CpuStorage::U32(*v),
        Err(_) => unreachable!("WithDType is implemented only for f32, f64, bf16 and u32"),
    }
}
