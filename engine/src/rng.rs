//! Counter-based random numbers: value `i` of stream `seed` is a pure function of `(seed, i)`, so
//! every backend (and every thread) produces the same numbers without sharing state.

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
}
