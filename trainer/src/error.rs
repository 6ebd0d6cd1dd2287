//! Typed trainer errors. Every message is one line that names the file (and item, field or key)
//! it concerns: `train.json: item 12: field output: expected a string, found a number`.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder that cannot be read, written, created or renamed.
    #[error("{}: {}", ol(.path), ol(&.source.to_string()))]
    Io {
        path: String,
        source: std::io::Error,
    },

    /// A setting that is invalid, alone or together with others.
    #[error("config: {}", ol(.0))]
    Config(String),

    /// A malformed configuration file (TOML syntax, unknown key, wrong type).
    #[error("{}: {}", ol(.file), ol(.msg))]
    ConfigFile { file: String, msg: String },

    /// A data file that is not a JSON list of examples, or has a malformed item.
    #[error("{}: {}", ol(.file), ol(.msg))]
    Data { file: String, msg: String },

    /// A checkpoint that cannot be written or read back.
    #[error("checkpoint {}: {}", ol(.path), ol(.msg))]
    Checkpoint { path: String, msg: String },

    /// Optimizer state that does not match the parameters.
    #[error("optimizer: {}", ol(.0))]
    Optimizer(String),

    /// Evaluation that cannot be run (a model output of the wrong shape, ...).
    #[error("eval: {}", ol(.0))]
    Eval(String),

    /// An item of an evaluation file that cannot be scored: no candidate answers (free-form),
    /// an answer that is not a candidate, an output without its answer. `item` is 0-based.
    #[error("eval: {}: item {item}: {}", ol(.file), ol(.reason))]
    Unscorable {
        file: String,
        item: usize,
        reason: String,
    },

    /// An output folder that cannot take the run: it holds another run, or it cannot be written.
    #[error("{}: {}", ol(.dir), ol(.msg))]
    OutDir { dir: String, msg: String },

    /// Starting a data-parallel run: the launch settings, the rendezvous of the ranks.
    #[error("data parallel: {}", ol(.0))]
    Parallel(String),

    /// `--resume` that cannot continue the run in the output folder: no checkpoint, a finished
    /// run, or settings that differ from the ones the run was started with.
    #[error("--resume: {}", ol(.0))]
    Resume(String),

    /// An adapter whose `adapter_config.json` differs from the settings of the run that wrote it.
    #[error("{}: {}", ol(.file), ol(.msg))]
    AdapterMismatch { file: String, msg: String },

    /// Training stopped by an interrupt (Ctrl-C) between two micro-batches; `checkpoints` hold
    /// the last step done of each adapter, if any was (`step` and `total` count the steps of
    /// the run: of its adapter, or of its longest adapter in a run of several).
    #[error(
        "interrupted after step {step} of {total}; {}",
        match .checkpoints.as_slice() {
            [] => "no step was saved: run the same command with --overwrite to start again"
                .to_string(),
            [c] => format!("{} holds it: {RESUME_HINT}", ol(c)),
            cs => format!("{} hold them: {RESUME_HINT}", ol(&cs.join(", "))),
        }
    )]
    Interrupted {
        step: usize,
        total: usize,
        checkpoints: Vec<String>,
    },

    /// What stopped one adapter of a run of several (its name first).
    #[error("adapter `{name}`: {source}")]
    Adapter { name: String, source: Box<Error> },

    #[error(transparent)]
    Engine(#[from] engine::Error),

    #[error(transparent)]
    Model(#[from] model::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Text shown on one line: control characters (newlines in a quoted value) are escaped.
pub(crate) struct OneLine<'a>(&'a str);

/// How an interrupted run goes on.
const RESUME_HINT: &str = "run the same command with --resume (the same --out) to continue";

pub(crate) fn ol(s: &str) -> OneLine<'_> {
    OneLine(s)
}

impl std::fmt::Display for OneLine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    }
    pub(crate) fn data(file: &Path, msg: impl Into<String>) -> Self {
        Error::Data {
            file: file.display().to_string(),
            msg: msg.into(),
        }
    }
    pub(crate) fn out_dir(dir: &Path, msg: impl Into<String>) -> Self {
        Error::OutDir {
            dir: dir.display().to_string(),
            msg: msg.into(),
        }
    }
    pub(crate) fn checkpoint(path: &Path, msg: impl std::fmt::Display) -> Self {
        Error::Checkpoint {
            path: path.display().to_string(),
            msg: msg.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_line() {
        let e = Error::data(Path::new("a.json"), "item 3: field `x`\nsecond line");
        let s = e.to_string();
        assert!(!s.contains('\n'), "{s}");
        assert!(s.starts_with("a.json: item 3"), "{s}");
    }
}
