//! Learning-rate schedules with linear warmup, as Hugging Face `transformers` defines them
//! (`get_{constant,linear,cosine}_schedule_with_warmup`): the rate for optimizer step `s`
//! (0-based, the step about to be taken) is `base_lr · factor(s)` with
//!
//! - warmup, `s < w`: `factor = s / max(1, w)` (so step 0 of a warmup runs at rate 0);
//! - constant: `1`;
//! - linear: `max(0, (N − s) / max(1, N − w))`, reaching 0 at `s = N`;
//! - cosine: `max(0, ½ (1 + cos(π · (s − w) / max(1, N − w))))`.
//!
//! `N` is the total number of optimizer steps.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The shape of the decay after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    #[default]
    Linear,
    Cosine,
}

/// How long the warmup lasts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Warmup {
    Steps(usize),
    /// A fraction of the total steps in `[0, 1]`, rounded up (as `transformers` does).
    Ratio(f64),
}

impl Warmup {
    /// The warmup length in steps for a run of `total_steps`.
    pub fn steps(self, total_steps: usize) -> Result<usize> {
        match self {
            Warmup::Steps(n) => Ok(n),
            Warmup::Ratio(r) if (0.0..=1.0).contains(&r) => {
                Ok((r * total_steps as f64).ceil() as usize)
            }
            Warmup::Ratio(r) => Err(Error::Config(format!("warmup_ratio {r} is not in [0, 1]"))),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    pub fn new(
        kind: ScheduleKind,
        base_lr: f64,
        warmup: Warmup,
        total_steps: usize,
    ) -> Result<Self> {
        Ok(Schedule {
            kind,
            base_lr,
            warmup_steps: warmup.steps(total_steps)?,
            total_steps,
        })
    }

    /// The multiplier of `base_lr` at optimizer step `step` (0-based).
    pub fn factor(&self, step: usize) -> f64 {
        let (s, w, n) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < self.warmup_steps {
            return s / w.max(1.0);
        }
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((n - s) / (n - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                let progress = (s - w) / (n - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate at optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        self.base_lr * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn warmup_then_constant() {
        let s = Schedule::new(ScheduleKind::Constant, 1e-3, Warmup::Steps(4), 100).unwrap();
        assert_eq!(s.lr(0), 0.0);
        assert!(close(s.lr(1), 0.25e-3));
        assert!(close(s.lr(3), 0.75e-3));
        assert!(close(s.lr(4), 1e-3));
        assert!(close(s.lr(99), 1e-3));
    }

    #[test]
    fn constant_without_warmup_starts_at_base() {
        let s = Schedule::new(ScheduleKind::Constant, 2e-4, Warmup::Steps(0), 10).unwrap();
        assert_eq!(s.lr(0), 2e-4);
    }

    #[test]
    fn linear_decays_to_zero() {
        let s = Schedule::new(ScheduleKind::Linear, 1.0, Warmup::Steps(10), 110).unwrap();
        assert!(close(s.lr(5), 0.5));
        assert!(close(s.lr(10), 1.0));
        assert!(close(s.lr(60), 0.5));
        assert!(close(s.lr(109), 0.01));
        assert_eq!(s.lr(110), 0.0);
        assert_eq!(s.lr(500), 0.0);
    }

    #[test]
    fn cosine_key_points() {
        let s = Schedule::new(ScheduleKind::Cosine, 2.0, Warmup::Steps(0), 100).unwrap();
        assert!(close(s.lr(0), 2.0));
        assert!(close(s.lr(50), 1.0));
        assert!(close(s.lr(25), 1.0 + std::f64::consts::FRAC_1_SQRT_2));
        assert!(close(s.lr(100), 0.0));
        // Past the end the cosine would rise again: it stays clamped at or above 0 and is not
        // used by a run that stops at N, but must not exceed the base either.
        assert!(s.lr(150) <= 2.0);
    }

    #[test]
    fn warmup_ratio_rounds_up() {
        let s = Schedule::new(ScheduleKind::Linear, 1.0, Warmup::Ratio(0.03), 250).unwrap();
        assert_eq!(s.warmup_steps, 8);
        assert!(Warmup::Ratio(1.5).steps(10).is_err());
    }
}
