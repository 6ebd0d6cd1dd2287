//! Typed loader errors. Every message is one line that starts with the file it concerns and, where
//! there is one, names the tensor or metadata key: `model.gguf: tensor blk.3.attn_q.weight: unsupported
//! GGUF type Q5_K`.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {}", ol(.file), ol(&.source.to_string()))]
    Io {
        file: String,
        source: std::io::Error,
    },

    /// A malformed file header (GGUF or safetensors) or metadata section.
    #[error("{}: {}", ol(.file), ol(.msg))]
    Format { file: String, msg: String },

    /// A problem with one metadata key (GGUF metadata, config.json field).
    #[error("{}: key {}: {}", ol(.file), ol(.key), ol(.msg))]
    Key {
        file: String,
        key: String,
        msg: String,
    },

    /// A problem with one tensor's record or data.
    #[error("{}: tensor {}: {}", ol(.file), ol(.tensor), ol(.msg))]
    Tensor {
        file: String,
        tensor: String,
        msg: String,
    },

    #[error("{}: tensor {}: unsupported GGUF type {ty}", ol(.file), ol(.tensor))]
    UnsupportedGgufType {
        file: String,
        tensor: String,
        ty: String,
    },

    #[error("{}: tensor {}: not found", ol(.file), ol(.tensor))]
    MissingTensor { file: String, tensor: String },

    #[error("{}: tensor {}: expected shape {expected:?}, found {found:?}", ol(.file), ol(.tensor))]
    ShapeMismatch {
        file: String,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("{}: tokenizer: {}", ol(.file), ol(.msg))]
    Tokenizer { file: String, msg: String },

    /// A request that cannot be served (an empty prompt, say).
    #[error("{}", ol(.0))]
    Invalid(String),

    /// A prompt that, with the tokens to generate, does not fit the model's context.
    #[error(
        "the prompt has {prompt} tokens and {max_new_tokens} new tokens are asked for, {} positions \
         in all, but the model's context (max_position_embeddings) is {context}",
        .prompt + .max_new_tokens
    )]
    ContextOverflow {
        prompt: usize,
        max_new_tokens: usize,
        context: usize,
    },

    /// A training call on a model prepared for inference (its adapters merged into the base).
    #[error("{}: the adapters were merged into the base weights for inference; this model cannot train or take new adapters", ol(.0))]
    InferenceOnly(String),

    #[error(transparent)]
    Engine(#[from] engine::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Displays text from a file (tensor names, keys, messages quoting them) on one line: control
/// characters are escaped, so a hostile name cannot break the message.
struct OneLine<'a>(&'a str);

fn ol(s: &str) -> OneLine<'_> {
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

/// How a path appears in messages.
pub(crate) fn file_name(path: &Path) -> String {
    path.display().to_string()
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            file: file_name(path),
            source,
        }
    }
    pub(crate) fn format(file: &str, msg: impl Into<String>) -> Self {
        Error::Format {
            file: file.to_string(),
            msg: msg.into(),
        }
    }
    pub(crate) fn key(file: &str, key: &str, msg: impl Into<String>) -> Self {
        Error::Key {
            file: file.to_string(),
            key: key.to_string(),
            msg: msg.into(),
        }
    }
    pub(crate) fn tensor(file: &str, tensor: &str, msg: impl Into<String>) -> Self {
        Error::Tensor {
            file: file.to_string(),
            tensor: tensor.to_string(),
            msg: msg.into(),
        }
    }
}
