//! Helpers shared by the CPU↔CUDA parity tests (tests/tests/cuda_*.rs): the GPU or a printed
//! reason to skip, the CUDA options of the environment, the tolerances of GPU.md, relative
//! errors, and a lock that serialises the tests of one binary.

use std::path::PathBuf;

use engine::{CudaOptions, DType, Device};

/// The CUDA options the GPU tests run with, from the environment (the engine reads none):
/// `MIXLORA_CUDA_INCLUDE`, the folder with `cuda_bf16.h` (scripts/ci-nvrtc.sh sets it);
/// `MIXLORA_NVRTC_OPTIONS`, extra NVRTC options, whitespace-separated;
/// `MIXLORA_CUDA_NO_CACHE=1`, no caching allocator (scripts/memcheck-gpu.sh sets it).
pub fn cuda_options() -> CudaOptions {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    CudaOptions {
        include_dir: env("MIXLORA_CUDA_INCLUDE").map(PathBuf::from),
        nvrtc_options: env("MIXLORA_NVRTC_OPTIONS")
            .map(|v| v.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default(),
        caching_allocator: env("MIXLORA_CUDA_NO_CACHE").as_deref() != Some("1"),
    }
}

/// Sets the process's CUDA options to [`cuda_options`]: every test calls it (directly or through
/// [`device`]) before its first GPU use, whichever test of the binary runs first.
pub fn configure() {
    engine::configure_cuda(cuda_options()).expect("the CUDA options of the environment");
}

/// The first GPU when one is usable (built with the `cuda` feature, a driver and a device);
/// otherwise prints why the calling test skips and returns `None`.
pub fn device() -> Option<Device> {
    configure();
    #[cfg(feature = "cuda")]
    match engine::backend::cuda::CudaDevice::get(0) {
        Ok(_) => Some(Device::Cuda(0)),
        Err(e) => {
            eprintln!("SKIP: no usable GPU: {e}");
            None
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        eprintln!("SKIP: built without the `cuda` feature");
        None
    }
}

/// The parity tolerance on relative error for results of dtype `d` (GPU.md): f32 1e-5, bf16
/// 1e-2, f64 1e-10; u32 results must be equal.
pub fn tol(d: DType) -> f64 {
    match d {
        DType::F32 => 1e-5,
        DType::BF16 => 1e-2,
        DType::F64 => 1e-10,
        DType::U32 => 0.0,
    }
}

/// ‖got − want‖ / ‖want‖ (‖got − want‖ when `want` is zero). NaN when the lengths differ or
/// any value is not finite: NaN never passes a `<=` check.
pub fn rel_err(want: &[f64], got: &[f64]) -> f64 {
    if want.len() != got.len() || want.iter().chain(got).any(|v| !v.is_finite()) {
        return f64::NAN;
    }
    norm_ratio(want.iter().copied().zip(got.iter().copied()))
}

/// As [`rel_err`], but a position where both are NaN, or both the same infinity, agrees and is
/// left out (ops whose reference result is not finite there: masked logits, out-of-range ids);
/// any other non-finite value gives NaN.
pub fn rel_err_matching_nonfinite(want: &[f64], got: &[f64]) -> f64 {
    if want.len() != got.len() {
        return f64::NAN;
    }
    let mut finite = Vec::with_capacity(want.len());
    for (&w, &g) in want.iter().zip(got) {
        if w.is_finite() && g.is_finite() {
            finite.push((w, g));
        } else if !((w.is_nan() && g.is_nan()) || w == g) {
            return f64::NAN;
        }
    }
    norm_ratio(finite.into_iter())
}

fn norm_ratio(pairs: impl Iterator<Item = (f64, f64)>) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (w, g) in pairs {
        num += (w - g) * (w - g);
        den += w * w;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Serialises the GPU tests of one binary (some read device-wide allocator counters), even when
/// the harness runs tests on several threads.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_errors_and_non_finite_values() {
        assert_eq!(rel_err(&[3.0, 4.0], &[3.0, 4.0]), 0.0);
        assert!((rel_err(&[3.0, 4.0], &[3.0, 4.5]) - 0.1).abs() < 1e-15);
        assert_eq!(rel_err(&[0.0], &[0.25]), 0.25);
        assert!(rel_err(&[1.0], &[1.0, 2.0]).is_nan());
        assert!(rel_err(&[f64::NAN], &[f64::NAN]).is_nan());
        assert!(rel_err(&[f64::INFINITY], &[f64::INFINITY]).is_nan());
        let (inf, nan) = (f64::INFINITY, f64::NAN);
        assert_eq!(
            rel_err_matching_nonfinite(&[1.0, nan, -inf], &[1.0, nan, -inf]),
            0.0
        );
        assert!(rel_err_matching_nonfinite(&[1.0, nan], &[1.0, 2.0]).is_nan());
        assert!(rel_err_matching_nonfinite(&[inf], &[-inf]).is_nan());
        assert!(rel_err_matching_nonfinite(&[1.0], &[nan]).is_nan());
        assert_eq!(tol(DType::U32), 0.0);
    }
}
