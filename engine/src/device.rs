//! Where a tensor lives, and the settings of the CUDA devices.

use std::path::PathBuf;
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// The n-th CUDA device. Tensors can only be created there once the CUDA backend is built in.
    Cuda(usize),
}

/// A device name that is not `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseDeviceError(String);

impl std::fmt::Display for ParseDeviceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "unknown device `{}` (expected cpu, cuda or cuda:N)",
            self.0
        )
    }
}

impl std::error::Error for ParseDeviceError {}

impl std::str::FromStr for Device {
    type Err = ParseDeviceError;
    /// Parses `cpu`, `cuda` (the first GPU) or `cuda:N`.
    fn from_str(s: &str) -> Result<Device, ParseDeviceError> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(ParseDeviceError(s.to_string())),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Where NVRTC looks for `cuda_bf16.h` when [`CudaOptions::include_dir`] is not set.
pub const DEFAULT_CUDA_INCLUDE: &str = "/usr/local/cuda/include";

/// Settings of the CUDA backend: values that a binary fills (from its flags, or from the
/// environment variables it documents; the engine reads none) and fixes for the process with
/// [`configure_cuda`] before its first GPU use. They exist without the `cuda` feature too, so
/// that a binary sets them the same way in every build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaOptions {
    /// The folder with the CUDA headers (`cuda_bf16.h`) for NVRTC; `None`:
    /// [`DEFAULT_CUDA_INCLUDE`] when it holds the header.
    pub include_dir: Option<PathBuf>,
    /// Options added to every NVRTC compilation, e.g. `-DLM_CODES_UNROLL=2` (a kernel's
    /// `#ifndef` tuning parameter), to time variants without a rebuild.
    pub nvrtc_options: Vec<String>,
    /// Freed buffers go back to the engine's cache (the default). Off, every buffer is its own
    /// driver allocation of the exact size, freed when dropped (after the stream drains), so that
    /// compute-sanitizer sees each buffer's bounds and lifetime and reports only real leaks.
    /// Slow; for memcheck runs.
    pub caching_allocator: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            include_dir: None,
            nvrtc_options: Vec::new(),
            caching_allocator: true,
        }
    }
}

impl CudaOptions {
    /// The folder NVRTC searches for includes: [`Self::include_dir`] as given, else
    /// [`DEFAULT_CUDA_INCLUDE`] when it holds `cuda_bf16.h`, else none.
    pub fn nvrtc_include_dir(&self) -> Option<PathBuf> {
        match &self.include_dir {
            Some(d) => Some(d.clone()),
            None => {
                let d = PathBuf::from(DEFAULT_CUDA_INCLUDE);
                d.join("cuda_bf16.h").is_file().then_some(d)
            }
        }
    }
}

/// The options of the process, and whether they are fixed (a GPU started or a kernel module was
/// compiled with them).
static CUDA_OPTIONS: Mutex<Option<(CudaOptions, bool)>> = Mutex::new(None);

/// Sets the CUDA options of the process. Call it before the first GPU use: the first device to
/// start (or the first kernel compilation) fixes them. Calling it again with the same options is
/// fine; with other ones once they are fixed, it is an error.
pub fn configure_cuda(opts: CudaOptions) -> crate::Result<()> {
    let mut cur = CUDA_OPTIONS.lock().unwrap_or_else(|e| e.into_inner());
    match &*cur {
        Some((fixed, true)) if *fixed != opts => Err(crate::Error::invalid(
            "configure_cuda",
            format!(
                "a GPU already started with other CUDA options ({fixed:?}); set them once, \
                 before the first GPU use"
            ),
        )),
        Some((_, true)) => Ok(()),
        _ => {
            *cur = Some((opts, false));
            Ok(())
        }
    }
}

/// The options of the process ([`CudaOptions::default`] when none were set), fixed from now on:
/// the CUDA backend calls this when a device starts and when it compiles a kernel module.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn fixed_cuda_options() -> CudaOptions {
    let mut cur = CUDA_OPTIONS.lock().unwrap_or_else(|e| e.into_inner());
    let (opts, fixed) = cur.get_or_insert_with(|| (CudaOptions::default(), false));
    *fixed = true;
    opts.clone()
}

/// `(current, peak)` bytes of tensor memory on `device`: on the CPU the live tensor buffers
/// ([`crate::backend::cpu::memory`]), on a GPU its caching allocator's statistics. The peak runs
/// from the last [`reset_peak_memory`] of that device.
pub fn memory_stats(device: Device) -> (usize, usize) {
    match device {
        Device::Cpu => crate::backend::cpu::memory::memory_stats(),
        #[cfg(feature = "cuda")]
        d => crate::backend::cuda::memory_stats(d),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => (0, 0),
    }
}

/// Restarts the peak of [`memory_stats`] on `device` from its current use.
pub fn reset_peak_memory(device: Device) {
    match device {
        Device::Cpu => crate::backend::cpu::memory::reset_peak_memory(),
        #[cfg(feature = "cuda")]
        d => crate::backend::cuda::reset_peak_memory(d),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print() {
        assert_eq!("cpu".parse(), Ok(Device::Cpu));
        assert_eq!("cuda".parse(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(Device::Cuda(3)));
        assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", ""] {
            let e = bad.parse::<Device>().unwrap_err().to_string();
            assert_eq!(
                e,
                format!("unknown device `{bad}` (expected cpu, cuda or cuda:N)")
            );
        }
    }

    #[test]
    fn cuda_options_are_fixed_by_their_first_use() {
        let direct = CudaOptions {
            caching_allocator: false,
            ..Default::default()
        };
        configure_cuda(CudaOptions::default()).unwrap();
        configure_cuda(direct.clone()).unwrap(); // not used yet: may change
        assert_eq!(fixed_cuda_options(), direct);
        configure_cuda(direct.clone()).unwrap(); // the same again
        let e = configure_cuda(CudaOptions::default()).unwrap_err();
        assert!(e.to_string().contains("already started"), "{e}");
        assert_eq!(fixed_cuda_options(), direct);
    }
}
