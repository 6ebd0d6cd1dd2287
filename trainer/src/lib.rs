//! The trainer's building blocks, behind the `mixlora` binary: configuration, data and prompts,
//! AdamW and learning-rate schedules, checkpoints with resume and its checks, the output folder,
//! interrupts, metrics and progress, multiple-choice evaluation, and the synthetic tasks of the
//! embedded default job.
//!
//! The library reads no environment variable: every setting is a value its caller passes (the
//! binary fills them from its flags, its TOML file and the few variables it documents).

pub mod base_model;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dist;
pub mod error;
pub mod eval;
pub mod inference;
pub mod interrupt;
pub mod metrics;
pub mod optim;
pub mod out_dir;
pub mod plot;
pub mod plot_loss;
pub mod progress;
pub mod resume;
pub mod run;
pub mod schedule;
pub mod scoring;
pub mod synthetic;

pub use error::{Error, Result};
