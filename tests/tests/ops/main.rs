//! The core ops' tests, one module per op, named by its stem: the op's files are
//! `engine/src/ops/<stem>.rs`, `engine/src/backend/cpu/<stem>.rs`,
//! `engine/src/backend/cuda/<stem>.rs` and `kernels/src/<stem>.cu`, its tests `<stem>.rs` here.
//! Each module holds the op's f64 finite-difference gradient checks, its values against naive
//! references (and bf16 against f32) and its typed errors, then, in module `gpu` (built with the
//! `cuda` feature), its CPU ↔ CUDA parity tests (the CPU is the reference; relative error within
//! f32 1e-5, bf16 1e-2, f64 1e-10, u32 equal; they skip, saying why, without a GPU).
//!
//! `device` holds what belongs to no single op: tensors moving between devices, the GPU
//! allocator, a clear error without a GPU, and a training step over many ops. The CPU helpers
//! shared by the modules are in `util` (and the masked attention cases of `softmax` and
//! `attention` in `causal`); the GPU parity harness (`Checker`, `compare`, `vals`, `input`,
//! `read`, ..) is `testutil::gpu`. The fused units' tests are in tests/tests/fused/.

mod attention;
mod causal;
mod cross_entropy;
mod device;
mod dropout;
mod elementwise;
mod index;
mod matmul;
mod random;
mod reduce;
mod rms_norm;
mod rope;
mod softmax;
mod util;
mod view;

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_parity_of_the_core_ops() {
    testutil::skip("the CPU ↔ CUDA parity tests: built without the `cuda` feature");
}
