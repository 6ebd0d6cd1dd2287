//! NVRTC compilation of the kernel modules of `mixlora-kernels`, once per process and GPU
//! architecture. NVRTC needs no GPU, so CI runs [`compile_module`] for sm_90 on machines without
//! one (tests/tests/cuda_nvrtc.rs).
//!
//! The include path (for `cuda_bf16.h`) is `$MIXLORA_CUDA_INCLUDE`, else `$CUDA_HOME/include`,
//! `$CUDA_PATH/include`, then `/usr/local/cuda/include`: the first that exists.
//!
//! `$MIXLORA_NVRTC_OPTIONS` (whitespace-separated) adds options to every compilation: for
//! tuning, `-D` values of the kernels' `#ifndef` parameters (e.g. `-DLM_CODES_UNROLL=2`)
//! without a rebuild.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};
use kernels::KernelSource;

use crate::{Error, Result};

/// True when the NVRTC library can be loaded (it is found through `LD_LIBRARY_PATH`).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the candidate library names; nothing is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The folder with the CUDA headers NVRTC should search, when one is found.
pub fn include_dir() -> Option<String> {
    let from_env = |var: &str, suffix: &str| {
        std::env::var(var)
            .ok()
            .filter(|v| !v.is_empty())
            .map(|v| format!("{v}{suffix}"))
    };
    let candidates = [
        from_env("MIXLORA_CUDA_INCLUDE", ""),
        from_env("CUDA_HOME", "/include"),
        from_env("CUDA_PATH", "/include"),
        Some("/usr/local/cuda/include".to_string()),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|d| Path::new(d).join("cuda_bf16.h").is_file())
}

/// The options of `$MIXLORA_NVRTC_OPTIONS`, whitespace-separated (none when unset).
fn extra_options() -> Vec<String> {
    std::env::var("MIXLORA_NVRTC_OPTIONS")
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Compiles one kernel module to PTX for `arch` (e.g. `sm_90`). Errors carry the NVRTC log.
pub fn compile_module(src: &KernelSource, arch: &str) -> Result<String> {
    if !nvrtc_available() {
        return Err(Error::KernelCompile {
            module: src.name,
            arch: arch.to_string(),
            log:
                "the NVRTC library (libnvrtc.so) was not found; add its folder to LD_LIBRARY_PATH \
                  (e.g. /usr/local/cuda/lib64)"
                    .into(),
        });
    }
    let include = include_dir();
    let opts = CompileOptions {
        include_paths: include.iter().cloned().collect(),
        options: [format!("--gpu-architecture={arch}"), "--std=c++17".into()]
            .into_iter()
            .chain(extra_options())
            .collect(),
        name: Some(format!("{}.cu", src.name)),
        ..Default::default()
    };
    match compile_ptx_with_opts(src.source, opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(e) => {
            let mut log = match e {
                CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
                other => format!("{other:?}"),
            };
            if include.is_none() {
                log.push_str(
                    "\n(no folder with cuda_bf16.h was found: set MIXLORA_CUDA_INCLUDE or CUDA_HOME)",
                );
            }
            Err(Error::KernelCompile {
                module: src.name,
                arch: arch.to_string(),
                log,
            })
        }
    }
}

type PtxCache = Mutex<HashMap<(&'static str, String), Arc<String>>>;

/// The PTX of `src` for `arch`, compiled on first use and cached for the process.
pub(crate) fn cached_ptx(src: &'static KernelSource, arch: &str) -> Result<Arc<String>> {
    static CACHE: OnceLock<PtxCache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    // Holding the lock while compiling makes concurrent first uses compile once.
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    let key = (src.name, arch.to_string());
    if let Some(p) = map.get(&key) {
        return Ok(p.clone());
    }
    let ptx = Arc::new(compile_module(src, arch)?);
    map.insert(key, ptx.clone());
    Ok(ptx)
}
