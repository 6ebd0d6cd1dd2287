//! The fused units' tests, one module per unit, named by its stem (`engine/src/fused/<stem>/`):
//! each holds the unit's f64 finite-difference gradient checks and its CPU ↔ CUDA parity tests
//! (module `gpu`, built with the `cuda` feature; they skip, saying why, without a GPU).

mod adamw;
mod flash_attention;
mod fp8;
#[cfg(feature = "cuda")]
mod fp8_gpu;
mod linear_cross_entropy;
mod lora;
mod moe_ffn;
mod moe_grouped;
mod moe_route;

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_parity_of_the_fused_units() {
    testutil::skip("the CPU ↔ CUDA parity tests: built without the `cuda` feature");
}
