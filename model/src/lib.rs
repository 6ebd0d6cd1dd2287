//! LLaMA, loaders, tokenizer and adapters (built on `engine`).
pub use engine;

pub mod error;
pub mod gguf;
mod mmap;

pub use error::{Error, Result};
