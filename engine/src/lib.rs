//! A small tensor engine for fine-tuning: f32/bf16 tensors with views, a tape autograd, a CPU
//! backend (rayon + gemm) that is the reference for every op, and a backend interface that the
//! CUDA backend implements.

pub mod autograd;
pub mod backend;
mod device;
pub mod dist;
mod dtype;
mod error;
pub mod fused;
mod ops;
pub mod profile;
pub mod rng;
mod shape;
mod storage;
mod tensor;

pub use autograd::{backward_many, checkpoint, grad_enabled, no_grad, CheckpointFn, NoGradGuard};
pub use device::{
    configure_cuda, memory_stats, reset_peak_memory, CudaOptions, Device, ParseDeviceError,
    DEFAULT_CUDA_INCLUDE,
};
pub use dtype::{DType, WithDType};
pub use error::{Error, Result};
pub use fused::adamw::{
    adamw_step, adamw_step_scaled, add_many_into, clip_norm_factor, sum_of_squares,
    AdamWCoefficients, AdamWHyper,
};
pub use fused::flash_attention::flash_attention;
pub use fused::fp8::{Fp8Format, Fp8Weight, FrozenWeight};
pub use fused::moe_ffn::{
    default_chunk_tokens, moe_ffn, moe_fused_runs_tiles, MoeDropout, MoeFfnOptions,
    MoeFusedWeights, MoeKernels, MoeRouting,
};
pub use ops::*;
pub use shape::{Layout, Shape, StridedIndex};
pub use storage::Storage;
pub use tensor::{Tensor, TensorId};
