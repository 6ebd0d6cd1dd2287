//! Collectives for data-parallel training: a [`Communicator`] joins the ranks of one run (one
//! process or thread per device) and moves flat tensors between them. Two implementations:
//! [`FakeComm`], ranks as threads of one process exchanging host copies over channels (the
//! tests' communicator, and the reference for the semantics), and, with the `cuda` feature,
//! [`NcclComm`] over NCCL (cudarc's bindings, libnccl loaded at run time).
//!
//! Every collective is called by every rank in the same order with tensors of the same shape and
//! dtype. None waits forever: a rank that died (its communicator dropped, its process gone) or
//! hangs makes the others' collective fail with [`crate::Error::Collective`] within the
//! communicator's timeout, naming the collective and the ranks that did not answer.

mod fake;
#[cfg(feature = "cuda")]
mod nccl;

use std::time::Duration;

pub use fake::FakeComm;
#[cfg(feature = "cuda")]
pub use nccl::{nccl_unique_id, NcclComm, NCCL_UNIQUE_ID_BYTES};

use crate::{Result, Tensor};

/// The ranks of one data-parallel run, as seen from one of them.
///
/// Inputs may have any shape; they are read as flat `[n]` tensors (row-major). Results live on
/// the input's device, in its dtype.
pub trait Communicator {
    /// This rank, in `0..world_size()`.
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// How long a collective waits for the other ranks before it fails.
    fn timeout(&self) -> Duration;
    /// Every rank's `x` (`[n]`, the same `n` on every rank), concatenated in rank order:
    /// `[world_size · n]`. Moves bits: the result holds each rank's values exactly.
    fn all_gather(&self, x: &Tensor) -> Result<Tensor>;
    /// The elementwise sum over ranks of `x` (`[n]`), on every rank. The order of the additions
    /// is the transport's (NCCL's depends on its algorithm and the world size): use it where
    /// the result does not depend on the order (counts, flags), [`Communicator::all_gather`]
    /// where bits must not depend on the number of ranks.
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor>;
    /// Rank `root`'s `x` (`[n]`), on every rank (the others' `x` gives only the shape).
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
}
