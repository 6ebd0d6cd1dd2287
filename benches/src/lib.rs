//! Shared set-up of the criterion benches and the examples in `benches/`: the environment
//! variables they read, mapped onto the engine's settings (the engine reads none).
//!
//! - `MIXLORA_PROFILE`: the op profile (`0` or unset: off, `gpu`: CUDA events without waits,
//!   anything else: wall time, each GPU launch between two synchronisations);
//!   `MIXLORA_PROFILE_ROWS`: the rows of a printed profile.
//! - `MIXLORA_CUDA_INCLUDE`: the folder with `cuda_bf16.h` for NVRTC (else
//!   `/usr/local/cuda/include`); `MIXLORA_NVRTC_OPTIONS`: options added to every NVRTC
//!   compilation, whitespace-separated (e.g. `-DLM_CODES_UNROLL=2`).

use std::path::PathBuf;

use engine::profile::ProfileMode;

/// A variable of the environment, `None` when unset or empty.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Sets the engine's profile from `MIXLORA_PROFILE`; returns the rows to print that
/// `MIXLORA_PROFILE_ROWS` asks for, if any.
pub fn profile_from_env() -> Option<usize> {
    let mode = match env("MIXLORA_PROFILE").as_deref() {
        None | Some("0" | "off") => ProfileMode::Off,
        Some("gpu") => ProfileMode::GpuEvents,
        Some(_) => ProfileMode::Wall,
    };
    engine::profile::set_mode(mode);
    env("MIXLORA_PROFILE_ROWS").and_then(|v| v.trim().parse().ok())
}

/// Sets the process's CUDA options from `MIXLORA_CUDA_INCLUDE` and `MIXLORA_NVRTC_OPTIONS`
/// (call it before the first GPU use).
pub fn cuda_from_env() -> engine::Result<()> {
    engine::configure_cuda(engine::CudaOptions {
        include_dir: env("MIXLORA_CUDA_INCLUDE").map(PathBuf::from),
        nvrtc_options: env("MIXLORA_NVRTC_OPTIONS")
            .map(|v| v.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default(),
        ..Default::default()
    })
}
