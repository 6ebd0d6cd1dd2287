//! Helpers shared by the CPU↔CUDA parity tests (the `gpu` modules of tests/tests/ops/ and
//! tests/tests/fused/, tests/tests/cuda_*.rs): the GPU or a printed reason to skip, the CUDA
//! options of the environment, the tolerances of docs/DESIGN.md, relative errors, a lock that
//! serialises the tests of one binary, and the parity harness of the core ops ([`Checker`]: one
//! case written as a function of the device, run on the CPU (the reference) and the GPU, compared
//! with [`compare`]) with its inputs ([`vals`], [`input`], [`read`], ..).

use std::path::PathBuf;

use engine::backend::BackendStorage;
use engine::{CudaOptions, DType, Device, Layout, Shape, Storage};

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
            crate::skip(format_args!("no usable GPU: {e}"));
            None
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        crate::skip("built without the `cuda` feature");
        None
    }
}

/// The parity tolerance on relative error for results of dtype `d` (docs/DESIGN.md): f32 1e-5, bf16
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

/// The float dtypes of the parity cases.
pub const FLOATS: [DType; 3] = [DType::F32, DType::BF16, DType::F64];
/// Every dtype.
pub const ALL: [DType; 4] = [DType::F32, DType::BF16, DType::F64, DType::U32];

/// Deterministic values in ±[0.1, 2.1) (never zero), from `seed`.
pub fn vals(n: usize, seed: u64) -> Vec<f64> {
    (0..n as u64)
        .map(|i| {
            let u = engine::rng::uniform(seed, i);
            let mag = 0.1 + 2.0 * u;
            if engine::rng::uniform(seed ^ 0x5555, i) < 0.5 {
                -mag
            } else {
                mag
            }
        })
        .collect()
}

/// Deterministic values in ±[0.1, 2.1) (never zero), times `mag`, from `seed` (with `mag` 1,
/// the values of [`vals`]).
pub fn scaled_vals(n: usize, seed: u64, mag: f64) -> Vec<f64> {
    (0..n as u64)
        .map(|i| {
            let u = engine::rng::uniform(seed, i);
            let m = (0.1 + 2.0 * u) * mag;
            if engine::rng::uniform(seed ^ 0x5555, i) < 0.5 {
                -m
            } else {
                m
            }
        })
        .collect()
}

/// Positive values in [0.1, 2.1).
pub fn pos(n: usize, seed: u64) -> Vec<f64> {
    vals(n, seed).into_iter().map(f64::abs).collect()
}

/// `y = x.dropout(0.2, 33)` and `dx` (the gradient of `Σ y`) on `dev`, for a variable x
/// `[63, 65]` of `dt` (`vals(63·65, 40)`) or, `transposed`, its transposed view: what the dropout
/// parity tests compare between devices.
pub fn dropout_output_and_grad(dev: Device, dt: DType, transposed: bool) -> (Vec<f64>, Vec<f64>) {
    let x = engine::Tensor::from_f64(&vals(63 * 65, 40), [63, 65], dt, dev)
        .expect("upload")
        .to_var()
        .expect("variable");
    let v = if transposed {
        x.t().expect("transpose")
    } else {
        x.clone()
    };
    let y = v.dropout(0.2, 33, true).expect("dropout");
    y.backward_with_grad(&y.ones_like().expect("ones"))
        .expect("backward");
    let dx = x.grad().expect("a gradient");
    (y.to_vec_f64().expect("y"), dx.to_vec_f64().expect("dx"))
}

/// Integers in 1..=m as f64 (for u32 tensors and for ties).
pub fn ints(n: usize, m: u32, seed: u64) -> Vec<f64> {
    (0..n as u64)
        .map(|i| 1.0 + (engine::rng::uniform(seed, i) * m as f64).floor())
        .collect()
}

/// Values for `dt`: integers for u32, else [`vals`].
pub fn data(n: usize, dt: DType, seed: u64) -> Vec<f64> {
    if dt == DType::U32 {
        ints(n, 1000, seed)
    } else {
        vals(n, seed)
    }
}

/// `data` uploaded to `dev` as `dtype`.
pub fn up(dev: Device, data: &[f64], dtype: DType) -> Storage {
    Storage::upload_f64(dev, data, dtype).expect("upload")
}

/// The inputs a case builds for a device, from the values and dtype.
pub fn input(dev: Device, data: &[f64], dtype: DType) -> Storage {
    // Round through the dtype on the host so that both devices see identical inputs.
    up(dev, data, dtype)
}

/// The contiguous storage `s` of `shape`, read back as f64.
pub fn read(s: &Storage, shape: impl Into<Shape>) -> Vec<f64> {
    s.to_f64_vec(&Layout::contiguous(shape.into()))
        .expect("read back")
}

/// A [a, b] buffer viewed transposed as [b, a].
pub fn transposed(a: usize, b: usize) -> Layout {
    Layout::contiguous([a, b]).transpose(0, 1)
}

/// A [b, t, h, d] buffer viewed as [b, h, t, d] (the attention head transpose).
pub fn heads(b: usize, t: usize, h: usize, d: usize) -> Layout {
    Layout::contiguous([b, t, h, d]).transpose(1, 2)
}

/// Runs `case` on the CPU and the GPU and compares; returns a failure line, if any. The relative
/// error (positions where both are NaN or the same infinity left out) must stay within
/// [`tol`]`(dtype)`; u32 results must be equal; a reference of all zeros is a useless case
/// (unless the name says `zeros` or `dropout`).
pub fn compare(
    name: &str,
    dtype: DType,
    case: &dyn Fn(Device) -> engine::Result<Vec<f64>>,
    gpu: Device,
) -> Option<String> {
    let want = match case(Device::Cpu) {
        Ok(v) => v,
        Err(e) => return Some(format!("{name} [{dtype}]: CPU failed: {e}")),
    };
    let got = match case(gpu) {
        Ok(v) => v,
        Err(e) => return Some(format!("{name} [{dtype}]: CUDA failed: {e}")),
    };
    if want.iter().all(|&x| x == 0.0)
        && !want.is_empty()
        && !name.contains("zeros")
        && !name.contains("dropout")
    {
        return Some(format!(
            "{name} [{dtype}]: reference is all zeros, a useless case"
        ));
    }
    let err = rel_err_matching_nonfinite(&want, &got);
    let ok = if dtype == DType::U32 {
        want == got
    } else {
        err <= tol(dtype)
    };
    if ok {
        None
    } else {
        let first = want
            .iter()
            .zip(&got)
            .position(|(a, b)| a != b && !(a.is_nan() && b.is_nan()))
            .unwrap_or(0);
        Some(format!(
            "{name} [{dtype}]: rel err {err:e} > {:e} (len {} vs {}; first diff at {first}: cpu {:?} gpu {:?})",
            tol(dtype),
            want.len(),
            got.len(),
            want.get(first),
            got.get(first)
        ))
    }
}

/// Collects failures over many cases and reports them all at once; holds [`serial`]'s lock.
pub struct Checker {
    _serial: std::sync::MutexGuard<'static, ()>,
    pub gpu: Device,
    pub failures: Vec<String>,
    pub count: usize,
}

impl Checker {
    /// The checker, or `None` (having printed why the test skips) without a usable GPU.
    pub fn new() -> Option<Self> {
        let lock = serial();
        device().map(|gpu| Checker {
            _serial: lock,
            gpu,
            failures: Vec::new(),
            count: 0,
        })
    }
    /// One case: `f` on the CPU and on the GPU, compared with [`compare`].
    pub fn case(
        &mut self,
        name: &str,
        dtype: DType,
        f: impl Fn(Device) -> engine::Result<Vec<f64>>,
    ) {
        self.count += 1;
        if let Some(msg) = compare(name, dtype, &f, self.gpu) {
            self.failures.push(msg);
        }
    }
    /// As [`Checker::case`] for exact ops (copies, fills): the GPU must give the CPU's values
    /// exactly.
    pub fn exact(
        &mut self,
        name: &str,
        dtype: DType,
        f: impl Fn(Device) -> engine::Result<Vec<f64>>,
    ) {
        self.count += 1;
        let failure = match (f(Device::Cpu), f(self.gpu)) {
            (Err(e), _) => Some(format!("{name} [{dtype}]: CPU failed: {e}")),
            (_, Err(e)) => Some(format!("{name} [{dtype}]: CUDA failed: {e}")),
            (Ok(want), Ok(got)) => (want != got).then(|| {
                let first = want.iter().zip(&got).position(|(a, b)| a != b);
                format!(
                    "{name} [{dtype}]: not exact (len {} vs {}; first diff at {first:?})",
                    want.len(),
                    got.len()
                )
            }),
        };
        self.failures.extend(failure);
    }
    /// Prints the count and fails with every failure line, if any.
    pub fn finish(self) {
        eprintln!("{} cases, {} failures", self.count, self.failures.len());
        assert!(self.failures.is_empty(), "\n{}", self.failures.join("\n"));
    }
}

/// Token targets below `v` for `n` rows, every fifth one `IGNORE_INDEX`.
pub fn targets_with_ignored(n: usize, v: usize, seed: u64) -> Vec<u32> {
    (0..n as u64)
        .map(|i| {
            if i % 5 == 2 {
                engine::IGNORE_INDEX
            } else {
                (engine::rng::hash(seed, i) % v as u64) as u32
            }
        })
        .collect()
}

/// A strict parity checker: every case's CPU result must not be all zeros, and its GPU result
/// must be within the dtype's tolerance by [`rel_err`] (any non-finite value fails); failures are
/// collected over all cases and reported at once by [`StrictChecker::finish`].
pub struct StrictChecker {
    gpu: Device,
    failures: Vec<String>,
    count: usize,
}

impl StrictChecker {
    pub fn new(gpu: Device) -> Self {
        StrictChecker {
            gpu,
            failures: Vec::new(),
            count: 0,
        }
    }
    pub fn case(
        &mut self,
        name: &str,
        dtype: DType,
        f: impl Fn(Device) -> engine::Result<Vec<f64>>,
    ) {
        self.count += 1;
        let (want, got) = match (f(Device::Cpu), f(self.gpu)) {
            (Ok(w), Ok(g)) => (w, g),
            (Err(e), _) => return self.failures.push(format!("{name} [{dtype}]: CPU: {e}")),
            (_, Err(e)) => return self.failures.push(format!("{name} [{dtype}]: CUDA: {e}")),
        };
        if want.iter().all(|&x| x == 0.0) {
            return self
                .failures
                .push(format!("{name} [{dtype}]: the reference is all zeros"));
        }
        let e = rel_err(&want, &got);
        if e.is_nan() || e > tol(dtype) {
            self.failures.push(format!(
                "{name} [{dtype}]: rel err {e:e} > {:e}",
                tol(dtype)
            ));
        }
    }
    pub fn finish(self) {
        eprintln!("{} cases, {} failures", self.count, self.failures.len());
        assert!(self.failures.is_empty(), "\n{}", self.failures.join("\n"));
    }
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
