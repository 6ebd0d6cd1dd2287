//! Vectorisation helpers for the CPU kernels: a run-time switch to AVX2 + FMA code (the crate is
//! built for baseline x86-64, so loops would otherwise be SSE2), an `exp` for f32 that
//! vectorises, and lane-parallel sums and maxima.

/// Runs `f` in a function compiled with AVX2 and FMA when the CPU has them. `f` is inlined into
/// it, so the loops inside `f` are vectorised for those features; results are bit-identical to
/// the baseline build (Rust never fuses a multiply and an add on its own).
#[inline(always)]
pub(crate) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::atomic::{AtomicU8, Ordering};
        static HAS: AtomicU8 = AtomicU8::new(0);
        let has = match HAS.load(Ordering::Relaxed) {
            0 => {
                let yes = std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma");
                HAS.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
                yes
            }
            v => v == 2,
        };
        if has {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// `eˣ` for f32 without a call, so that loops over it vectorise: Cephes' `expf` (a degree-7
/// polynomial on `[−ln2/2, ln2/2]` after removing `n·ln 2`), within 2 ulp of the exact value.
/// Overflows to `+∞` above ~88.72, underflows through the subnormals to 0 below ~−103.9,
/// and propagates NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2²³: adding it rounds to an integer
                                     // Clamp (NaN stays NaN) so that n stays in [-150, 129].
    let x = x.clamp(-104.0, 89.0);
    let t = x * LOG2E + ROUND;
    let n = t.to_bits() as i32 - ROUND.to_bits() as i32; // round(x·log2 e)
    let nf = t - ROUND;
    let r = x - nf * LN2_HI - nf * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let p = p * r * r + r + 1.0;
    // 2ⁿ in two normal factors, so that subnormal and overflowing results round correctly.
    let n1 = n >> 1;
    let n2 = n - n1;
    let s1 = f32::from_bits(((n1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((n2 + 127) as u32) << 23);
    p * s1 * s2
}

/// Sum of a slice in 16 interleaved lanes (vectorises; a different order than a serial sum).
#[inline(always)]
pub(crate) fn lane_sum<T: num_traits::Float + std::iter::Sum>(x: &[T]) -> T {
    let mut acc = [T::zero(); 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = *a + v;
        }
    }
    let tail: T = chunks.remainder().iter().copied().sum();
    acc.iter().copied().sum::<T>() + tail
}

/// Maximum of a slice in 16 lanes (NaN-ignoring like `f32::max`); `−∞` when empty.
#[inline(always)]
pub(crate) fn lane_max<T: num_traits::Float>(x: &[T]) -> T {
    let mut acc = [T::neg_infinity(); 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let m = chunks
        .remainder()
        .iter()
        .fold(T::neg_infinity(), |a, &b| a.max(b));
    acc.iter().fold(m, |a, &b| a.max(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_within_2_ulp() {
        let mut worst = 0.0f64;
        let mut x = -103.0f32;
        while x < 88.7 {
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            if want > f32::MIN_POSITIVE as f64 {
                worst = worst.max(((got - want) / want).abs());
            } else {
                assert!((got - want).abs() <= 2.0 * 1.4e-45, "{x}: {got} vs {want}");
            }
            x += 0.000_37;
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(exp_f32(-200.0), 0.0);
        assert_eq!(exp_f32(-1e9), 0.0);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
    }

    #[test]
    fn lane_sum_and_max() {
        let x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let s: f32 = x.iter().sum();
        assert!((lane_sum(&x) - s).abs() < 1e-5);
        assert_eq!(
            lane_max(&x),
            x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
        );
        assert_eq!(lane_max::<f32>(&[]), f32::NEG_INFINITY);
    }
}
