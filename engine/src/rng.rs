//! Counter-based random numbers: value `i` of stream `seed` is a pure function of `(seed, i)`, so
//! every backend (and every thread) produces the same numbers without sharing state.
//!
//! Dropout masks are drawn from their op's seed XOR the device's dropout key
//! ([`crate::set_dropout_key`], 0 unless set): the stream of a mask is `seed ^ key`, on the CPU
//! (the calling thread's key, applied once where the op enters the backend) and on the GPU (the
//! kernels read the key from device memory when they run, so a replayed CUDA graph draws the
//! masks of the key set before the replay). The functions here take that stream as their `seed`;
//! random fills (`randn`, uniform) are never keyed.

/// SplitMix64 finaliser: a strong 64-bit mixing function.
#[inline]
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// 64 random bits for element `i` of stream `seed`.
#[inline]
pub fn hash(seed: u64, i: u64) -> u64 {
    splitmix64(splitmix64(seed) ^ i.wrapping_mul(0xD6E8_FEB8_6659_FD93))
}

/// Uniform in `[0, 1)` with 53 random bits.
#[inline]
pub fn uniform(seed: u64, i: u64) -> f64 {
    (hash(seed, i) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Dropout draws 16 random bits per element, four consecutive elements from one [`hash`]: element
/// `i` takes bits `16·(i mod 4) .. 16·(i mod 4) + 16` of `hash(seed, i / 4)`. It is dropped when
/// those bits are below [`dropout_threshold`]`(p)`, so the drop probability is `p` rounded to a
/// multiple of 2⁻¹⁶ (0.05 becomes 0.0500031). One hash per four elements keeps the GPU's mask
/// kernels memory-bound; the kept elements are scaled by `1 / (1 − p)`.
#[inline]
pub fn dropout_bits(seed: u64, i: u64) -> u32 {
    ((hash(seed, i >> 2) >> ((i & 3) * 16)) & 0xFFFF) as u32
}

/// The 16-bit threshold of drop probability `p` in `[0, 1)` (see [`dropout_bits`]).
pub fn dropout_threshold(p: f64) -> u32 {
    ((p * 65536.0).round() as u32).min(0xFFFF)
}

/// Whether element `i` of stream `seed` is dropped under `threshold` ([`dropout_threshold`]).
#[inline]
pub fn dropped(seed: u64, i: u64, threshold: u32) -> bool {
    dropout_bits(seed, i) < threshold
}

/// Standard normal by Box-Muller over the uniforms `2i` and `2i + 1`.
#[inline]
pub fn normal(seed: u64, i: u64) -> f64 {
    let u1 = 1.0 - uniform(seed, 2 * i); // (0, 1]
    let u2 = uniform(seed, 2 * i + 1);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A small sequential generator for host-side choices (shuffles, seeds of sub-streams).
#[derive(Clone, Debug)]
pub struct Rng {
    seed: u64,
    counter: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng { seed, counter: 0 }
    }
    /// The state, for checkpoints: `Rng::from_state(r.state())` continues the same sequence.
    pub fn state(&self) -> (u64, u64) {
        (self.seed, self.counter)
    }
    pub fn from_state((seed, counter): (u64, u64)) -> Self {
        Rng { seed, counter }
    }
    pub fn next_u64(&mut self) -> u64 {
        let v = hash(self.seed, self.counter);
        self.counter += 1;
        v
    }
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Uniform in `0..n` (n > 0), without modulo bias worth speaking of for n ≪ 2^64.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_moments() {
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|i| normal(7, i)).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
    }

    #[test]
    fn uniform_range_and_streams_differ() {
        let a: Vec<f64> = (0..1000).map(|i| uniform(1, i)).collect();
        let b: Vec<f64> = (0..1000).map(|i| uniform(2, i)).collect();
        assert!(a.iter().all(|&x| (0.0..1.0).contains(&x)));
        assert_ne!(a, b);
        let mean = a.iter().sum::<f64>() / 1000.0;
        assert!((mean - 0.5).abs() < 0.05);
    }

    #[test]
    fn dropout_bits_take_four_elements_from_one_hash() {
        for g in [0u64, 1, 7, 1 << 40] {
            let h = hash(11, g);
            for q in 0..4 {
                let want = ((h >> (16 * q)) & 0xFFFF) as u32;
                assert_eq!(dropout_bits(11, 4 * g + q), want, "group {g} lane {q}");
            }
        }
    }

    #[test]
    fn dropout_threshold_rounds_to_sixteen_bits() {
        assert_eq!(dropout_threshold(0.0), 0);
        assert_eq!(dropout_threshold(0.05), 3277); // 0.05 · 65536 = 3276.8
        assert_eq!(dropout_threshold(0.5), 32768);
        assert_eq!(dropout_threshold(0.999_999), 0xFFFF); // never every element
        assert!(
            (0..10_000).all(|i| !dropped(3, i, 0)),
            "p = 0 drops nothing"
        );
    }

    #[test]
    fn dropout_rate_matches_p_and_streams_differ() {
        let n = 400_000u64;
        for p in [0.05, 0.1, 0.5] {
            let thr = dropout_threshold(p);
            let dropped_count = (0..n).filter(|&i| dropped(9, i, thr)).count() as f64;
            let rate = dropped_count / n as f64;
            // Five standard deviations of a binomial rate.
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            assert!((rate - p).abs() < 5.0 * sd, "p {p}: rate {rate}");
        }
        // Lanes of one hash are not correlated: the rate among lane-0 drops' neighbours is p.
        let thr = dropout_threshold(0.1);
        let (mut both, mut first) = (0u64, 0u64);
        for g in 0..n / 4 {
            if dropped(9, 4 * g, thr) {
                first += 1;
                both += u64::from(dropped(9, 4 * g + 1, thr));
            }
        }
        let cond = both as f64 / first as f64;
        assert!(
            (cond - 0.1).abs() < 0.02,
            "P(drop lane 1 | drop lane 0) = {cond}"
        );
        let a: Vec<bool> = (0..4096).map(|i| dropped(1, i, thr)).collect();
        let b: Vec<bool> = (0..4096).map(|i| dropped(2, i, thr)).collect();
        assert_ne!(a, b);
    }
}
