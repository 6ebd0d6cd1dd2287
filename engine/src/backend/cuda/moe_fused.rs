//! The fused MixLoRA FFN kernels on CUDA (module `MOE_FUSED` of `mixlora-kernels`).

use super::{not_implemented, CudaStorage};
use crate::backend::MoeDims;
use crate::{Error, Layout, Result};

type Args<'a> = [(&'a CudaStorage, &'a Layout)];

fn todo(op: &'static str, args: &Args<'_>) -> Result<Vec<CudaStorage>> {
    match args.first() {
        Some((s, _)) => Err(not_implemented(op, s.cuda_device())),
        None => Err(Error::invalid(op, "no operands")),
    }
}

pub(crate) fn act_forward(args: &Args<'_>, _d: &MoeDims) -> Result<Vec<CudaStorage>> {
    todo("moe_act_forward", args)
}
pub(crate) fn down_forward(args: &Args<'_>, _d: &MoeDims) -> Result<Vec<CudaStorage>> {
    todo("moe_down_forward", args)
}
pub(crate) fn down_backward(args: &Args<'_>, _d: &MoeDims) -> Result<Vec<CudaStorage>> {
    todo("moe_down_backward", args)
}
pub(crate) fn act_backward(args: &Args<'_>, _d: &MoeDims) -> Result<Vec<CudaStorage>> {
    todo("moe_act_backward", args)
}
pub(crate) fn act_weight_grads(args: &Args<'_>, _d: &MoeDims) -> Result<Vec<CudaStorage>> {
    todo("moe_act_weight_grads", args)
}
pub(crate) fn down_weight_grad(args: &Args<'_>, _d: &MoeDims) -> Result<Vec<CudaStorage>> {
    todo("moe_down_weight_grad", args)
}
