//! Choosing the next token from a row of logits: greedy, or seeded temperature + top-p (nucleus)
//! sampling.

use engine::rng::Rng;

/// How the next token is picked.
#[derive(Clone, Debug)]
pub struct Sampler {
    temperature: f64,
    top_p: f64,
    rng: Rng,
}

impl Sampler {
    /// `temperature == 0` is greedy (argmax, lowest id on ties); otherwise softmax(logits / T)
    /// restricted to the smallest set of most likely tokens whose mass reaches `top_p`.
    pub fn new(temperature: f64, top_p: f64, seed: u64) -> Self {
        Sampler {
            temperature: temperature.max(0.0),
            top_p: top_p.clamp(0.0, 1.0),
            rng: Rng::new(seed),
        }
    }

    pub fn greedy() -> Self {
        Self::new(0.0, 1.0, 0)
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// The next token id for one row of logits (NaN logits are never picked unless all are NaN).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.is_greedy() {
            return argmax(logits);
        }
        let t = self.temperature as f32;
        let max = logits
            .iter()
            .cloned()
            .filter(|x| !x.is_nan())
            .fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(_, x)| !x.is_nan())
            .map(|(i, &x)| (i as u32, (((x - max) / t) as f64).exp()))
            .collect();
        if probs.is_empty() {
            return 0;
        }
        let total: f64 = probs.iter().map(|p| p.1).sum();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        // Keep the nucleus: the most likely tokens until their mass reaches top_p.
        let mut kept = 0;
        let mut mass = 0.0;
        for p in &probs {
            kept += 1;
            mass += p.1 / total;
            if mass >= self.top_p {
                break;
            }
        }
        probs.truncate(kept.max(1));
        let kept_total: f64 = probs.iter().map(|p| p.1).sum();
        let mut u = self.rng.next_f64() * kept_total;
        for &(id, p) in &probs {
            if u < p {
                return id;
            }
            u -= p;
        }
        probs[probs.len() - 1].0
    }
}

/// Index of the largest logit, lowest index on ties, NaN ignored.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_max() {
        assert_eq!(Sampler::greedy().sample(&[0.1, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 0.5]), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_follows_the_distribution() {
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        let draw = |seed| {
            let mut s = Sampler::new(1.0, 1.0, seed);
            (0..4000).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
        let counts = draw(5).iter().fold([0usize; 4], |mut c, &i| {
            c[i as usize] += 1;
            c
        });
        let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
        for (i, &c) in counts.iter().enumerate() {
            let p = (logits[i] as f64).exp() / z;
            assert!(
                (c as f64 / 4000.0 - p).abs() < 0.03,
                "token {i}: {c} vs p={p}"
            );
        }
    }

    #[test]
    fn top_p_cuts_the_tail() {
        // p ≈ [0.64, 0.24, 0.09, 0.03]: top_p 0.7 keeps the first two only.
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        let mut s = Sampler::new(1.0, 0.7, 9);
        for _ in 0..2000 {
            assert!(s.sample(&logits) < 2);
        }
        // A tiny top_p is greedy.
        let mut s = Sampler::new(1.0, 1e-9, 9);
        assert!((0..100).all(|_| s.sample(&logits) == 0));
    }
}
