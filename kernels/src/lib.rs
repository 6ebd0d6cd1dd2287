//! CUDA C sources of the engine's GPU kernels, as strings, one module per op family, with the
//! names of the kernels each defines. There is no build script and no nvcc: the engine's CUDA
//! backend compiles these with NVRTC at run time for the GPU it finds, once per process.
//!
//! The CUDA backend (and with it the first sources) arrives after the CPU engine; until then the
//! list is empty and the CPU backend is the only one.

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

/// Every kernel module of the engine.
pub const SOURCES: &[KernelSource] = &[];
