//! Dropout: `x ⊙ mask` with a seeded, counter-based mask of `0` and `1/(1-p)`.

use super::float_only;
use crate::autograd::{Input, Node, Output};
use crate::backend::BackendStorage;
use crate::{Device, Error, Result, Tensor};

/// Sets the dropout key of `device`'s current lane ([`set_lane`]): every dropout mask drawn in
/// that lane afterwards (in the GPU's stream order; on the CPU, by the calling thread) comes
/// from the seed `seed ^ key` in place of the op's own `seed`. At 0, where every lane starts,
/// nothing changes.
///
/// What it is for: a CUDA graph replays its kernels with the arguments they were recorded with,
/// seeds included, so a recorded training step would draw the same masks on every replay. The
/// kernels read the key from device memory when they run instead: set a new key before each
/// replay and each replay draws new masks, exactly those an eager step under the same key draws.
/// A backward redraws its forward's masks, so both must run under one key. Refused while a graph
/// is being captured on `device`.
pub fn set_dropout_key(device: Device, key: u64) -> Result<()> {
    match device {
        Device::Cpu => {
            crate::backend::cpu::dropout::set_dropout_key(key);
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => crate::backend::cuda::CudaDevice::get(n)?.set_dropout_key(key),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(Error::invalid(
            "set_dropout_key",
            "this build has no CUDA backend; use --device cpu",
        )),
    }
}

/// Lanes of one device: `0..LANES`.
pub const LANES: usize = 64;

/// Makes `lane` (below [`LANES`]; 0 until then) the lane of the work queued on `device` from now
/// on (on the CPU, by the calling thread). A lane has its own dropout key ([`set_dropout_key`]
/// sets the current lane's; a dropout reads the key of the lane it was queued, or recorded into
/// a CUDA graph, in) and on a GPU its own cuBLAS workspace.
///
/// What it is for: CUDA graphs recorded in different lanes (and with their own graph memory)
/// write no scratch memory in common, so they can replay at the same time
/// (`backend::cuda::replay_together`), each drawing its dropout under its own key: several
/// adapters' training steps side by side on one GPU. Refused while a graph is being captured on
/// `device`.
pub fn set_lane(device: Device, lane: usize) -> Result<()> {
    if lane >= LANES {
        return Err(Error::invalid(
            "set_lane",
            format!("lane {lane} is out of range (a device has {LANES})"),
        ));
    }
    match device {
        Device::Cpu => {
            crate::backend::cpu::dropout::set_lane(lane);
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => crate::backend::cuda::CudaDevice::get(n)?.set_lane(lane),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(Error::invalid(
            "set_lane",
            "this build has no CUDA backend; use --device cpu",
        )),
    }
}

impl Tensor {
    /// Zeroes each element with probability `p` and scales the rest by `1/(1-p)`, so the
    /// expectation is unchanged. The mask is a pure function of `(seed, element index)`: the same
    /// seed gives the same mask on every backend. The identity when `!train` or `p == 0`
    /// (`p` must be in `[0, 1)` either way).
    ///
    /// One pass (`BackendStorage::dropout_apply`), with the same values as the product with a
    /// `dropout_mask` tensor of x's dtype. Backward: `dx = g ⊙ mask`, the mask drawn again from
    /// the seed, so the tape keeps nothing.
    pub fn dropout(&self, p: f64, seed: u64, train: bool) -> Result<Tensor> {
        float_only("dropout", self)?;
        if !(0.0..1.0).contains(&p) {
            return Err(Error::invalid(
                "dropout",
                format!("probability {p} is not in [0, 1)"),
            ));
        }
        if !train || p == 0.0 {
            return Ok(self.clone());
        }
        let y = self.storage().dropout_apply(self.layout(), p, seed)?; // contiguous, x's shape
        let node = Node::record_with(
            "dropout",
            &[Input::GraphOnly(self)],
            Output::Unread,
            move |_, _, g| Ok(vec![Some(g.dropout(p, seed, true)?)]),
        );
        Ok(Tensor::from_storage(y, self.shape().clone(), node))
    }
}
