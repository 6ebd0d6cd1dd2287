//! The trainer's building blocks, behind the `mixlora` binary: configuration, data and prompts,
//! AdamW and learning-rate schedules, checkpoints with resume, metrics and progress, multiple-choice
//! evaluation, and the synthetic tasks of the embedded default job.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod run;
pub mod schedule;
pub mod synthetic;

pub use error::{Error, Result};

/// Where the shared data lives: `$MIXLORA_DATA`, else `<workspace>/../shared/data` (for tests and
/// the examples). `None` when neither exists.
pub fn shared_data_dir() -> Option<std::path::PathBuf> {
    if let Some(d) = std::env::var_os("MIXLORA_DATA") {
        let d = std::path::PathBuf::from(d);
        return d.is_dir().then_some(d);
    }
    let d = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
    d.is_dir().then_some(d)
}
