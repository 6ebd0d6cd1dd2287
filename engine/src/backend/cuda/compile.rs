//! NVRTC compilation of the kernel modules of `mixlora-kernels`, once per process and GPU
//! architecture. NVRTC needs no GPU, so CI runs [`compile_module`] for sm_90 on machines without
//! one (tests/tests/cuda_nvrtc.rs).
//!
//! The include folder (for `cuda_bf16.h`) and any extra NVRTC options (e.g. `-D` values of the
//! kernels' `#ifndef` tuning parameters, to time variants without a rebuild) come from the
//! process's [`CudaOptions`] ([`crate::configure_cuda`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};
use kernels::KernelSource;

use crate::device::fixed_cuda_options;
use crate::{CudaOptions, Error, Result};

/// True when the NVRTC library can be loaded (it is found through `LD_LIBRARY_PATH`).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the candidate library names; nothing is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles one kernel module to PTX for `arch` (e.g. `sm_90`) with the include folder and extra
/// options of `opts`. Errors carry the NVRTC log.
pub fn compile_module(src: &KernelSource, arch: &str, opts: &CudaOptions) -> Result<String> {
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
    let include = opts.nvrtc_include_dir();
    let nvrtc = CompileOptions {
        include_paths: include.iter().map(|d| d.display().to_string()).collect(),
        options: [format!("--gpu-architecture={arch}"), "--std=c++17".into()]
            .into_iter()
            .chain(opts.nvrtc_options.iter().cloned())
            .collect(),
        name: Some(format!("{}.cu", src.name)),
        ..Default::default()
    };
    match compile_ptx_with_opts(src.source, nvrtc) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(e) => {
            let mut log = match e {
                CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
                other => format!("{other:?}"),
            };
            match &include {
                None => log.push_str(&format!(
                    "\n(no cuda_bf16.h in {}: set the CUDA include folder, for the mixlora \
                     binary MIXLORA_CUDA_INCLUDE or CUDA_HOME)",
                    crate::DEFAULT_CUDA_INCLUDE
                )),
                Some(d) if !d.join("cuda_bf16.h").is_file() => log.push_str(&format!(
                    "\n(the CUDA include folder {} has no cuda_bf16.h)",
                    d.display()
                )),
                Some(_) => {}
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

/// The PTX of `src` for `arch`, compiled on first use with the process's CUDA options (which
/// that fixes) and cached for the process.
pub(crate) fn cached_ptx(src: &'static KernelSource, arch: &str) -> Result<Arc<String>> {
    static CACHE: OnceLock<PtxCache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    // Holding the lock while compiling makes concurrent first uses compile once.
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    let key = (src.name, arch.to_string());
    if let Some(p) = map.get(&key) {
        return Ok(p.clone());
    }
    let ptx = Arc::new(compile_module(src, arch, &fixed_cuda_options())?);
    map.insert(key, ptx.clone());
    Ok(ptx)
}
