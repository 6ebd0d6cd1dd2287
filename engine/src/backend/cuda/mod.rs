//! The CUDA backend (work in progress).
pub mod compile;
mod layout;
