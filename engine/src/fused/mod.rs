//! Fused operations: each one a self-contained unit beside the core, in the spirit of candle's
//! `CustomOp`. A unit's folder holds its tensor-level op (the checks, the forward and the
//! hand-written backward rule, with its maths in the doc comment), its CPU reference (`cpu.rs`),
//! its CUDA launchers (`cuda.rs`, over the kernel source of the same stem in `kernels/src/`) and
//! one named operand struct per primitive. The core's [`BackendStorage`](crate::backend::BackendStorage)
//! trait and [`Storage`] know none of them: adding a fused op touches neither.
//!
//! A primitive's operands are declared with [`operands!`]: a struct whose fields name each
//! operand by its role (`x`, `a`, `codes`, ...) as an [`Operand`] (a storage and the view of it
//! the primitive reads), an optional one ([`OptOperand`]) or one written in place
//! ([`OperandMut`]). [`on_backend!`] then runs the unit's CPU or CUDA function on the operands of
//! one backend, after checking that every operand lives on one device, and wraps the result back
//! into [`Storage`]s.
//!
//! The units:
//! - [`lora`]: the LoRA projection `y + s · (drop(x) Aᵀ) Bᵀ` keeping only the rank-r codes;
//!   also the LoRA-A products of many adapters at once that the MixLoRA FFN runs on;
//! - [`moe_ffn`]: the fused MixLoRA FFN (the `fused` method of docs/DESIGN.md);
//! - [`moe_route`]: the router's top-k;
//! - [`moe_grouped`]: grouping (token, slot) pairs by expert and grouped matmuls;
//! - [`linear_cross_entropy`]: the chunked linear cross-entropy, never holding all the logits;
//! - [`flash_attention`]: causal attention without the `[b, hq, t, s]` probabilities;
//! - [`fp8`]: frozen weights in FP8 and their products through FP8 GEMMs;
//! - [`adamw`]: the multi-tensor AdamW step and the multi-tensor sum of squares (the gradient
//!   norm).

pub mod adamw;
pub mod flash_attention;
pub mod fp8;
pub mod linear_cross_entropy;
pub mod lora;
pub mod moe_ffn;
pub mod moe_grouped;
pub mod moe_route;

use crate::backend::cpu::CpuStorage;
#[cfg(feature = "cuda")]
use crate::backend::cuda::CudaStorage;
use crate::{Device, Error, Layout, Result, Storage, Tensor};

/// One operand of a fused primitive: a storage and the view of it that the primitive reads.
#[derive(Debug)]
pub struct Operand<'a, S> {
    pub s: &'a S,
    pub l: &'a Layout,
}

impl<S> Clone for Operand<'_, S> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<S> Copy for Operand<'_, S> {}

impl<'a> Operand<'a, Storage> {
    pub fn new(s: &'a Storage, l: &'a Layout) -> Self {
        Operand { s, l }
    }
}

/// An operand that a primitive may go without.
pub type OptOperand<'a, S> = Option<Operand<'a, S>>;

/// An operand that a primitive updates in place (the view `l` of `s`).
#[derive(Debug)]
pub struct OperandMut<'a, S> {
    pub s: &'a mut S,
    pub l: &'a Layout,
}

/// What each kind of operand field becomes on one backend ([`operands!`]' conversions).
pub trait OperandField<'a>: Sized {
    type Cpu;
    #[cfg(feature = "cuda")]
    type Cuda;
    /// The device of the operand (`None` for an absent optional one).
    fn device(&self) -> Option<Device>;
    fn cpu(self, op: &'static str) -> Result<Self::Cpu>;
    /// The operand as a CUDA storage of the GPU `want` (the others' device).
    #[cfg(feature = "cuda")]
    fn cuda(self, op: &'static str, want: Device) -> Result<Self::Cuda>;
}

/// The error of an operand that is not on the backend the others are on.
fn elsewhere(op: &'static str, on: Device, want: Device) -> Error {
    Error::DeviceMismatch {
        op,
        lhs: want,
        rhs: on,
    }
}

impl<'a> OperandField<'a> for Operand<'a, Storage> {
    type Cpu = Operand<'a, CpuStorage>;
    #[cfg(feature = "cuda")]
    type Cuda = Operand<'a, CudaStorage>;
    fn device(&self) -> Option<Device> {
        Some(crate::backend::BackendStorage::device(self.s))
    }
    fn cpu(self, op: &'static str) -> Result<Self::Cpu> {
        match self.s {
            Storage::Cpu(s) => Ok(Operand { s, l: self.l }),
            #[allow(unreachable_patterns)]
            other => Err(elsewhere(op, other_device(other), Device::Cpu)),
        }
    }
    #[cfg(feature = "cuda")]
    fn cuda(self, op: &'static str, want: Device) -> Result<Self::Cuda> {
        match self.s {
            Storage::Cuda(s) => Ok(Operand { s, l: self.l }),
            Storage::Cpu(_) => Err(elsewhere(op, Device::Cpu, want)),
        }
    }
}

impl<'a> OperandField<'a> for OptOperand<'a, Storage> {
    type Cpu = OptOperand<'a, CpuStorage>;
    #[cfg(feature = "cuda")]
    type Cuda = OptOperand<'a, CudaStorage>;
    fn device(&self) -> Option<Device> {
        self.as_ref().and_then(OperandField::device)
    }
    fn cpu(self, op: &'static str) -> Result<Self::Cpu> {
        self.map(|o| o.cpu(op)).transpose()
    }
    #[cfg(feature = "cuda")]
    fn cuda(self, op: &'static str, want: Device) -> Result<Self::Cuda> {
        self.map(|o| o.cuda(op, want)).transpose()
    }
}

impl<'a> OperandField<'a> for OperandMut<'a, Storage> {
    type Cpu = OperandMut<'a, CpuStorage>;
    #[cfg(feature = "cuda")]
    type Cuda = OperandMut<'a, CudaStorage>;
    fn device(&self) -> Option<Device> {
        Some(crate::backend::BackendStorage::device(&*self.s))
    }
    fn cpu(self, op: &'static str) -> Result<Self::Cpu> {
        let on = other_device(self.s);
        match self.s {
            Storage::Cpu(s) => Ok(OperandMut { s, l: self.l }),
            #[allow(unreachable_patterns)]
            _ => Err(elsewhere(op, on, Device::Cpu)),
        }
    }
    #[cfg(feature = "cuda")]
    fn cuda(self, op: &'static str, want: Device) -> Result<Self::Cuda> {
        match self.s {
            Storage::Cuda(s) => Ok(OperandMut { s, l: self.l }),
            Storage::Cpu(_) => Err(elsewhere(op, Device::Cpu, want)),
        }
    }
}

fn other_device(s: &Storage) -> Device {
    crate::backend::BackendStorage::device(s)
}

/// The one device of a primitive's operands (absent optional ones aside), or an error naming
/// `op` and two devices that differ.
pub fn one_device(op: &'static str, devices: &[Option<Device>]) -> Result<Device> {
    let mut present = devices.iter().flatten();
    let Some(&first) = present.next() else {
        return Err(Error::invalid(op, "no operands"));
    };
    match present.find(|&&d| d != first) {
        Some(&other) => Err(Error::DeviceMismatch {
            op,
            lhs: first,
            rhs: other,
        }),
        None => Ok(first),
    }
}

/// The error of a device whose backend this build lacks.
pub fn no_backend(op: &'static str, device: Device) -> Error {
    Error::DeviceUnavailable {
        op,
        device,
        msg: "this build has no CUDA backend; use --device cpu".into(),
    }
}

/// Declares a primitive's named operands: a struct generic over the storage type with one field
/// per operand, each an [`Operand`], an [`OptOperand`] or an [`OperandMut`]:
///
/// ```ignore
/// operands! {
///     /// `z = drop(x) Aᵀ`.
///     pub struct Codes {
///         x: Operand,     // [M, in]
///         a: Operand,     // [r, in]
///     }
/// }
/// ```
///
/// and, on `Struct<'_, Storage>`, `device(op)` (the operands' one device) and `cpu(op)` /
/// `cuda(op)` (the same operands as the backend's storages), which [`on_backend!`] uses.
macro_rules! operands {
    ($(#[$m:meta])* $vis:vis struct $name:ident {
        $($(#[$fm:meta])* $field:ident : $kind:ident),+ $(,)?
    }) => {
        $(#[$m])*
        $vis struct $name<'a, S> {
            $($(#[$fm])* pub $field: $crate::fused::$kind<'a, S>,)+
        }

        impl<'a> $name<'a, $crate::Storage> {
            /// The device every operand lives on.
            pub fn device(&self, op: &'static str) -> $crate::Result<$crate::Device> {
                use $crate::fused::OperandField;
                $crate::fused::one_device(op, &[$(self.$field.device()),+])
            }
            /// The operands as CPU storages.
            pub fn cpu(self, op: &'static str)
                -> $crate::Result<$name<'a, $crate::backend::cpu::CpuStorage>> {
                use $crate::fused::OperandField;
                Ok($name { $($field: self.$field.cpu(op)?,)+ })
            }
            /// The operands as CUDA storages.
            #[cfg(feature = "cuda")]
            pub fn cuda(self, op: &'static str)
                -> $crate::Result<$name<'a, $crate::backend::cuda::CudaStorage>> {
                use $crate::fused::OperandField;
                let want = self.device(op)?;
                Ok($name { $($field: self.$field.cuda(op, want)?,)+ })
            }
        }
    };
}

/// Runs a primitive on the backend of its operands: `on_backend!(OP, operands, o => cpu_expr,
/// cuda_expr)` binds `o` to the operands as CPU (or CUDA) storages and evaluates the matching
/// expression, a `Result` of backend storages (one, a tuple, a `Vec`, an `Option` or `()`),
/// wrapped back into [`Storage`]s by [`IntoStorage`]. The CUDA expression is compiled only with
/// the `cuda` feature. On the CPU the primitive's time goes into the op profile under `OP`
/// (`crate::profile`; the GPU's launches are profiled where they are made).
macro_rules! on_backend {
    ($op:expr, $args:expr, $o:ident => $cpu:expr, $cuda:expr $(,)?) => {{
        let args = $args;
        match args.device($op)? {
            $crate::Device::Cpu => {
                let $o = args.cpu($op)?;
                $crate::profile::timed(|| $op.into(), || $cpu)
                    .map($crate::fused::IntoStorage::into_storage)
            }
            #[cfg(feature = "cuda")]
            $crate::Device::Cuda(_) => {
                let $o = args.cuda($op)?;
                $cuda.map($crate::fused::IntoStorage::into_storage)
            }
            #[allow(unreachable_patterns)]
            d => Err($crate::fused::no_backend($op, d)),
        }
    }};
}

pub(crate) use {on_backend, operands};

/// Backend results wrapped back into [`Storage`]s.
pub trait IntoStorage {
    type Out;
    fn into_storage(self) -> Self::Out;
}

impl IntoStorage for CpuStorage {
    type Out = Storage;
    fn into_storage(self) -> Storage {
        Storage::Cpu(self)
    }
}

#[cfg(feature = "cuda")]
impl IntoStorage for CudaStorage {
    type Out = Storage;
    fn into_storage(self) -> Storage {
        Storage::Cuda(self)
    }
}

impl IntoStorage for () {
    type Out = ();
    fn into_storage(self) {}
}

impl<A: IntoStorage, B: IntoStorage> IntoStorage for (A, B) {
    type Out = (A::Out, B::Out);
    fn into_storage(self) -> Self::Out {
        (self.0.into_storage(), self.1.into_storage())
    }
}

impl<A: IntoStorage, B: IntoStorage, C: IntoStorage> IntoStorage for (A, B, C) {
    type Out = (A::Out, B::Out, C::Out);
    fn into_storage(self) -> Self::Out {
        (
            self.0.into_storage(),
            self.1.into_storage(),
            self.2.into_storage(),
        )
    }
}

impl<A: IntoStorage> IntoStorage for Option<A> {
    type Out = Option<A::Out>;
    fn into_storage(self) -> Self::Out {
        self.map(IntoStorage::into_storage)
    }
}

impl<A: IntoStorage> IntoStorage for Vec<A> {
    type Out = Vec<A::Out>;
    fn into_storage(self) -> Self::Out {
        self.into_iter().map(IntoStorage::into_storage).collect()
    }
}

/// Runs `f` on the tensors' storages and layouts as [`Operand`]s, the storages read-locked for
/// the call: `read([x, a], |[x, a]| primitive(Codes { x, a }, ..))`.
pub(crate) fn read<const N: usize, R>(
    ts: [&Tensor; N],
    f: impl FnOnce([Operand<'_, Storage>; N]) -> R,
) -> R {
    let guards = ts.map(|t| t.storage());
    let operands = std::array::from_fn(|i| Operand::new(&guards[i], ts[i].layout()));
    f(operands)
}
