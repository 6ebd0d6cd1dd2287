//! LLaMA, loaders, tokenizer and adapters (built on `engine`).
pub use engine;

pub mod adapters;
pub mod atomic_dir;
pub mod config;
mod convert;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod llama;
mod mmap;
pub mod safetensors;
pub mod sampling;
pub mod tokenizer;
pub mod torch_bin;
pub mod weights;

pub use adapters::{AdapterConfig, MoeImpl, PeftType, RoutingStrategy};
pub use config::{Llama3RopeScaling, LlamaConfig, RopeScaling};
pub use error::{Error, Result};
pub use llama::{
    mask_positions, AttentionImpl, ForwardOutput, GroupMode, GroupSegment, HiddenOutput,
    HostTokens, KvCache, Llama, RandomInit,
};
pub use tokenizer::Tokenizer;
pub use weights::{load, Weights};
