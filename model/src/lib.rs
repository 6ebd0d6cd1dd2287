//! LLaMA, loaders, tokenizer and adapters (built on `engine`).
pub use engine;
