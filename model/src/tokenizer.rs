//! Tokenizers through the Hugging Face `tokenizers` crate: from a `tokenizer.json`, or rebuilt from
//! GGUF metadata (GPT-2 style byte-level BPE, as llama.cpp and transformers do for SmolLM2).

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::AddedToken;

use crate::config::LlamaConfig;
use crate::error::{file_name, Error, Result};
use crate::gguf::{Array, GgufFile, Header, Value};

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    file: String,
    bos: Option<u32>,
    eos: Option<u32>,
    /// Whether the model expects its BOS id before a prompt (GGUF `tokenizer.ggml.add_bos_token`;
    /// for `tokenizer.json`, whether its post-processor inserts the BOS token).
    adds_bos: bool,
}

impl Tokenizer {
    /// Loads a `tokenizer.json`; `bos` / `eos` usually come from the model's config.
    pub fn from_file(path: &Path, bos: Option<u32>, eos: Option<u32>) -> Result<Tokenizer> {
        let file = file_name(path);
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            file: file.clone(),
            msg: e.to_string(),
        })?;
        let adds_bos = match (bos, inner.get_post_processor()) {
            (Some(b), Some(_)) => inner
                .encode("", true)
                .map(|e| e.get_ids().first() == Some(&b))
                .unwrap_or(false),
            _ => false,
        };
        Ok(Tokenizer {
            inner,
            file,
            bos,
            eos,
            adds_bos,
        })
    }

    /// The tokenizer of a model: `path/tokenizer.json` for a Hugging Face folder (special ids from
    /// `config`), else the metadata of the GGUF file at `path`.
    pub fn load(path: &Path, config: &LlamaConfig) -> Result<Tokenizer> {
        if path.is_dir() {
            let bos = config.bos_token_id;
            Self::from_file(&path.join("tokenizer.json"), bos, config.eos_token_id())
        } else {
            Self::from_gguf_file(path)
        }
    }

    /// Builds the tokenizer stored in a GGUF file's metadata.
    pub fn from_gguf_file(path: &Path) -> Result<Tokenizer> {
        let g = GgufFile::open(path)?;
        Self::from_gguf(g.file(), g.header())
    }

    /// Builds a byte-level BPE tokenizer from `tokenizer.ggml.*` metadata (`model == "gpt2"`).
    pub fn from_gguf(file: &str, h: &Header) -> Result<Tokenizer> {
        let key_err = |key: &str, msg: String| Error::key(file, key, msg);
        let model = h
            .get("tokenizer.ggml.model")
            .and_then(Value::as_str)
            .ok_or_else(|| key_err("tokenizer.ggml.model", "missing".into()))?;
        if model != "gpt2" {
            return Err(key_err(
                "tokenizer.ggml.model",
                format!("unsupported tokenizer model `{model}` (gpt2 is read)"),
            ));
        }
        let tokens = match h.get("tokenizer.ggml.tokens").and_then(Value::as_array) {
            Some(Array::String(t)) => t,
            _ => {
                return Err(key_err(
                    "tokenizer.ggml.tokens",
                    "missing or not strings".into(),
                ))
            }
        };
        let merges = match h.get("tokenizer.ggml.merges").and_then(Value::as_array) {
            Some(Array::String(m)) => m,
            _ => {
                return Err(key_err(
                    "tokenizer.ggml.merges",
                    "missing or not strings".into(),
                ))
            }
        };
        let types = match h.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            None => vec![1; tokens.len()],
            Some(a) => a
                .to_i64_vec()
                .filter(|t| t.len() == tokens.len())
                .ok_or_else(|| {
                    key_err(
                        "tokenizer.ggml.token_type",
                        format!("expected {} integers", tokens.len()),
                    )
                })?,
        };
        let n = u32::try_from(tokens.len())
            .map_err(|_| key_err("tokenizer.ggml.tokens", "too many tokens".into()))?;

        let mut vocab = tokenizers::models::bpe::Vocab::default();
        for (id, tok) in (0..n).zip(tokens) {
            vocab.insert(tok.clone(), id);
        }
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| key_err("tokenizer.ggml.merges", format!("bad merge `{m}`")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| Error::Tokenizer {
                file: file.to_string(),
                msg: e.to_string(),
            })?;

        let mut inner = tokenizers::Tokenizer::new(bpe);
        // GPT-2 byte-level BPE with its pre-tokenizer regex; SmolLM2 (`pre == "smollm"`) also splits
        // every digit apart first, as its tokenizer.json and llama.cpp do.
        let pre = h.get("tokenizer.ggml.pre").and_then(Value::as_str);
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tok: PreTokenizerWrapper = match pre {
            Some("smollm") => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
            }
            _ => byte_level.into(),
        };
        inner.with_pre_tokenizer(Some(pre_tok));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|&(_, &t)| t == TOKEN_CONTROL || t == TOKEN_USER_DEFINED)
            .map(|(tok, &t)| AddedToken::from(tok.clone(), t == TOKEN_CONTROL))
            .collect();
        inner.add_special_tokens(&added);

        let id = |key: &str| -> Result<Option<u32>> {
            match h.get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .filter(|&x| x < n)
                    .map(Some)
                    .ok_or_else(|| key_err(key, format!("invalid token id {v:?}"))),
            }
        };
        let adds_bos = matches!(
            h.get("tokenizer.ggml.add_bos_token"),
            Some(Value::Bool(true))
        );
        Ok(Tokenizer {
            inner,
            file: file.to_string(),
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            adds_bos,
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::Tokenizer {
            file: self.file.clone(),
            msg: e.to_string(),
        }
    }

    /// Token ids of `text`, with the beginning-of-sequence id first when `add_bos` (and the tokenizer
    /// has one). Special tokens written in `text` (`<|im_start|>`) are recognised.
    /// Whether prompts for this model start with the BOS id (the model files' own convention).
    pub fn adds_bos(&self) -> bool {
        self.adds_bos && self.bos.is_some()
    }

    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| self.err(e))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// The text of `ids`; special tokens are written out unless `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| self.err(e))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The tokenizer as `tokenizer.json` text.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(|e| self.err(e))
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
