//! CUDA C sources of the engine's GPU kernels, as strings, one module per op family, with the
//! names of the kernels each defines. There is no build script and no nvcc: the engine's CUDA
//! backend compiles these with NVRTC at run time for the GPU it finds, once per process.
//!
//! Every module is `common.cuh` (element types, conversions, the strided-view argument and
//! reductions) followed by its own `.cu` file. Kernels are named `{op}_{dtype}`; forward and
//! backward kernels of one family live in the same file.

/// One CUDA C translation unit and the `extern "C"` kernels it defines.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// Module name, e.g. `elementwise`.
    pub name: &'static str,
    /// The CUDA C source.
    pub source: &'static str,
    /// Kernel entry points, named `{op}_{dtype}`.
    pub kernels: &'static [&'static str],
}

/// Builds a list of kernel names: `f3 op` gives `op_f32, op_bf16, op_f64`; `f4 op` adds `op_u32`;
/// `f1 op` gives `op_f32, op_f64` (kernels built on float atomics); `one op` gives `op` alone
/// (a kernel that serves every dtype).
macro_rules! names {
    (@acc [$($out:expr,)*]) => { &[$($out,)*] };
    (@acc [$($out:expr,)*] one $op:ident $($rest:tt)*) => {
        names!(@acc [$($out,)* stringify!($op),] $($rest)*)
    };
    (@acc [$($out:expr,)*] f3 $op:ident $($rest:tt)*) => {
        names!(@acc [$($out,)*
            concat!(stringify!($op), "_f32"),
            concat!(stringify!($op), "_bf16"),
            concat!(stringify!($op), "_f64"),
        ] $($rest)*)
    };
    (@acc [$($out:expr,)*] f4 $op:ident $($rest:tt)*) => {
        names!(@acc [$($out,)*
            concat!(stringify!($op), "_f32"),
            concat!(stringify!($op), "_bf16"),
            concat!(stringify!($op), "_f64"),
            concat!(stringify!($op), "_u32"),
        ] $($rest)*)
    };
    (@acc [$($out:expr,)*] f1 $op:ident $($rest:tt)*) => {
        names!(@acc [$($out,)*
            concat!(stringify!($op), "_f32"),
            concat!(stringify!($op), "_f64"),
        ] $($rest)*)
    };
    ($($t:tt)*) => { names!(@acc [] $($t)*) };
}

macro_rules! module {
    ($name:literal, $($t:tt)*) => {
        KernelSource {
            name: $name,
            source: concat!(
                include_str!("common.cuh"),
                "\n",
                include_str!(concat!($name, ".cu"))
            ),
            kernels: names!($($t)*),
        }
    };
}

/// Elementwise kernels: unary, binary, in-place add, comparisons, where, casts, strided copies,
/// fills.
pub const ELEMENTWISE: KernelSource = module!("elementwise",
    f3 neg f3 exp f3 log f3 silu f3 sigmoid f3 sqrt f3 recip f3 sqr f3 abs f3 tanh f3 cos f3 sin
    f3 affine f3 powf f3 max_scalar f3 min_scalar
    f3 add f3 sub f3 mul f3 div f3 maximum f3 minimum f3 silu_mul f3 add_to
    f4 eq f4 ne f4 lt f4 le f4 gt f4 ge
    f4 where_f32 f4 where_bf16 f4 where_f64 f4 where_u32
    f4 cast_f32 f4 cast_bf16 f4 cast_f64 f4 cast_u32
    f4 copy one copy_u128 one copy_u64 f4 fill
);

/// Reductions over one dim.
pub const REDUCE: KernelSource = module!("reduce",
    f4 sum f4 max f4 min f4 argmax f4 argmin
);

/// RMSNorm forward and fused backward.
pub const RMS_NORM: KernelSource = module!("rms_norm",
    f3 rms_norm f3 rms_norm_backward f3 rms_norm_dw
);

/// Rotary position embedding.
pub const ROPE: KernelSource = module!("rope", f3 rope);

/// Fused cross-entropy forward and backward.
pub const CROSS_ENTROPY: KernelSource =
    module!("cross_entropy", f3 cross_entropy f3 cross_entropy_backward);

/// The chunked linear cross-entropy (`engine::fused::linear_cross_entropy`): the online
/// log-sum-exp update of one vocabulary chunk of logits and the fused gradient of one chunk.
pub const LINEAR_CROSS_ENTROPY: KernelSource = module!("linear_cross_entropy",
    f3 cross_entropy_chunk_update f3 cross_entropy_chunk_backward);

/// index_select, gather, index_add, scatter_add, top-k.
pub const INDEX: KernelSource = module!("index",
    f4 index_select f4 gather f1 index_add f1 scatter_add f4 topk
);

/// Counter-based random fills (the same numbers as the CPU's `engine::rng`).
pub const RANDOM: KernelSource = module!("random", f3 randn f3 rand_uniform);

/// Dropout masks and masked products (the same bits as the CPU's `engine::rng::dropped`).
pub const DROPOUT: KernelSource = KernelSource {
    name: "dropout",
    source: concat!(include_str!("common.cuh"), "\n", include_str!("dropout.cu")),
    kernels: &[
        "dropout_mask_f32",
        "dropout_mask_bf16",
        "dropout_mask_f64",
        "add_dropped2_bf16",
        "dropout_cast_bf16_f32",
        "dropout_cast_f32_f32",
        "dropout_cast_f32_bf16",
        "dropout_cast_bf16_bf16",
        "dropout_cast_f64_f64",
    ],
};

/// Softmax and log-softmax over the last dim; the attention softmax (causal, key-masked, scaled)
/// and the fused softmax backward, each in two forms: one block per row, and one warp per row
/// (rows of at most 32·C chunks of 16 bytes, C = 1, 2, 4, 8).
pub const SOFTMAX: KernelSource = module!("softmax", f3 softmax f3 log_softmax
    f3 causal_softmax f3 softmax_backward
    f3 causal_softmax_warp1 f3 causal_softmax_warp2 f3 causal_softmax_warp4 f3 causal_softmax_warp8
    f3 softmax_backward_warp1 f3 softmax_backward_warp2 f3 softmax_backward_warp4
    f3 softmax_backward_warp8
);

/// The router's fused top-k (`engine/src/fused/moe_route/`): softmax, the top-k experts and their
/// renormalised weights, and the weights' backward.
pub const MOE_ROUTE: KernelSource =
    module!("moe_route", f3 moe_route_topk f3 moe_route_topk_backward);

/// The grouped-expert primitives (`engine/src/fused/moe_grouped/`): grouping by expert on the
/// device, permute/combine, grouped matmuls over expert segments (forward and weight gradient).
pub const MOE_GROUPED: KernelSource = module!("moe_grouped",
    f3 moe_permute f3 moe_combine f3 moe_combine_dw
    f3 grouped_matmul_narrow f3 grouped_matmul_wide
    f3 grouped_matmul_dw_n16 f3 grouped_matmul_dw_k16 f3 grouped_matmul_dw
    one moe_group_count_u32 one moe_group_scan_u32 one moe_group_scatter_u32 one moe_invert_perm_u32
);

/// Flash attention (`engine::fused::flash_attention`): the forward (on the tensor cores for bf16)
/// and the two backward kernels (dq, then dk and dv), causal with a key mask and grouped-query
/// heads, at head dims 64 and 128.
pub const FLASH_ATTENTION: KernelSource = KernelSource {
    name: "flash_attention",
    source: concat!(
        include_str!("common.cuh"),
        "\n",
        include_str!("flash_attention.cu")
    ),
    kernels: &[
        "flash_attention_fwd_d64_f32",
        "flash_attention_fwd_d64_bf16",
        "flash_attention_fwd_d128_f32",
        "flash_attention_fwd_d128_bf16",
        "flash_attention_fwd_mma_d64_bf16",
        "flash_attention_fwd_mma_d128_bf16",
        "flash_attention_bwd_dq_d64_f32",
        "flash_attention_bwd_dq_d64_bf16",
        "flash_attention_bwd_dq_d128_f32",
        "flash_attention_bwd_dq_d128_bf16",
        "flash_attention_bwd_dkv_d64_f32",
        "flash_attention_bwd_dkv_d64_bf16",
        "flash_attention_bwd_dkv_d128_f32",
        "flash_attention_bwd_dkv_d128_bf16",
    ],
};

/// The fused multi-tensor AdamW step, the multi-tensor sum of squares (the gradient norm) and
/// the multi-tensor add (gradient accumulation) of `engine::fused::adamw`: one kernel for every
/// tensor, whatever its dtype (each tensor's dtype is in the table the kernel reads), hence names
/// without a dtype suffix.
pub const ADAMW: KernelSource = KernelSource {
    name: "adamw",
    source: concat!(include_str!("common.cuh"), "\n", include_str!("adamw.cu")),
    kernels: &[
        "adamw_step_multi",
        "sum_squares_multi",
        "clip_factor_f64",
        "add_into_multi",
    ],
};

/// The fused MixLoRA FFN (the `fused` method of docs/DESIGN.md, unit `engine::fused::moe_ffn`):
/// block-code layouts of the rank-r codes and the SwiGLU forward/backward over the slots (the
/// rank-r products run as GEMMs). Also the tensor-core kernels of moe_ffn_tiles.cu and
/// moe_ffn_tiles_backward.cu (bf16 only), which use moe_ffn.cu's helpers.
pub const MOE_FFN: KernelSource = KernelSource {
    name: "moe_ffn",
    source: concat!(
        include_str!("common.cuh"),
        "\n",
        include_str!("moe_ffn.cu"),
        "\n",
        include_str!("moe_ffn_tiles.cu"),
        "\n",
        include_str!("moe_ffn_tiles_backward.cu")
    ),
    kernels: &[
        "moe_gather_codes_f32",
        "moe_gather_codes_bf16",
        "moe_gather_codes_f64",
        "moe_expand_codes_f32",
        "moe_expand_codes_bf16",
        "moe_expand_codes_f64",
        "moe_block_codes_f32_f32",
        "moe_block_codes_f32_bf16",
        "moe_block_codes_bf16_bf16",
        "moe_block_codes_bf16_f32",
        "moe_block_codes_f64_f64",
        "moe_swiglu_forward_f32",
        "moe_swiglu_forward_bf16",
        "moe_swiglu_forward_f64",
        "moe_swiglu_backward_f32",
        "moe_swiglu_backward_bf16",
        "moe_swiglu_backward_f64",
        "moe_swiglu_forward_k2_f32",
        "moe_swiglu_forward_k2_bf16",
        "moe_swiglu_forward_k2_f64",
        "moe_swiglu_backward_k2_f32",
        "moe_swiglu_backward_k2_bf16",
        "moe_swiglu_backward_k2_f64",
        "moe_tiles_forward_bf16",
        "moe_tiles_rows_bf16",
        "moe_tiles_cols_bf16",
    ],
};

/// The LoRA primitives' rank-r products for a bf16 base and f32 adapters at r = 8 and 16 (on the
/// CUDA cores, lora.cu, and on the tensor cores, lora_mma.cu), and the products of a dropped bf16
/// operand with a wide one (lora_wide.cu: every MixLoRA expert's LoRA-A at once): the dropout
/// mask drawn on the fly, partial sums added in a fixed order.
pub const LORA: KernelSource = KernelSource {
    name: "lora",
    source: concat!(
        include_str!("common.cuh"),
        "\n",
        include_str!("lora.cu"),
        "\n",
        include_str!("lora_mma.cu"),
        "\n",
        include_str!("lora_wide.cu")
    ),
    kernels: &[
        "lora_codes_bf16_r8",
        "lora_codes_bf16_r16",
        "lora_grad_a_bf16_r8",
        "lora_grad_a_bf16_r16",
        "lora_grad_x_bf16_r8",
        "lora_grad_x_bf16_r16",
        "lora_expand_add_bf16_r8",
        "lora_expand_add_bf16_r16",
        "lora_sum_partials_f32",
        "lora_codes_mma_bf16_r8",
        "lora_codes_mma_bf16_r16",
        "lora_grad_a_mma_bf16_r8",
        "lora_grad_a_mma_bf16_r16",
        "lora_expand_mma_bf16_r8",
        "lora_expand_mma_bf16_r16",
        "lora_codes_wide_bf16",
        "lora_grad_a_wide_bf16",
    ],
};

/// The FP8 unit (`engine::fused::fp8`): quantisation to e4m3 / e5m2 codes with one scale a row,
/// the transpose of a code matrix, and the row and column scaling of an FP8 GEMM's f32 result (the
/// GEMM is cuBLASLt's).
pub const FP8: KernelSource = module!("fp8",
    f3 fp8_quantize_rows f3 fp8_scale_product one fp8_transpose_codes
);

/// Every kernel module of the engine.
pub const SOURCES: &[KernelSource] = &[
    ELEMENTWISE,
    REDUCE,
    RMS_NORM,
    ROPE,
    CROSS_ENTROPY,
    LINEAR_CROSS_ENTROPY,
    INDEX,
    RANDOM,
    DROPOUT,
    SOFTMAX,
    MOE_ROUTE,
    MOE_GROUPED,
    ADAMW,
    MOE_FFN,
    LORA,
    FLASH_ATTENTION,
    FP8,
];

/// The module that defines kernel `name`, if any.
pub fn module_of(name: &str) -> Option<&'static KernelSource> {
    SOURCES.iter().find(|s| s.kernels.contains(&name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_declared_in_their_source() {
        let mut seen = std::collections::HashSet::new();
        for s in SOURCES {
            for k in s.kernels {
                assert!(seen.insert(*k), "kernel {k} listed twice");
                // Names come from macros in the sources, so check the op part is there.
                let op = k.rsplit_once('_').map(|(op, _)| op).unwrap_or(k);
                let op = op.split('_').next().unwrap_or(op);
                assert!(s.source.contains(op), "{k} not found in {}.cu", s.name);
            }
        }
        assert_eq!(module_of("softmax_bf16").map(|s| s.name), Some("softmax"));
    }
}
