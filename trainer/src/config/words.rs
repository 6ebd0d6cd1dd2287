//! Settings spelled as a word, the same on the command line and in TOML: one parser and one
//! spelling per type ([`Word`]), which clap uses as the value parser ([`parse`]) and serde as the
//! (de)serializer (`#[serde(with = "words")]`, and [`option`] for a setting that may be absent).
//!
//! The model's and the engine's types keep their own spellings where they have them (`FromStr`
//! and `Display`); this module only joins them to clap and serde, which those crates do not
//! depend on.

use std::num::NonZeroUsize;

use engine::{Device, MoeKernels};
use model::{AttentionImpl, GroupMode, MoeImpl, PeftType, RoutingStrategy};
use serde::{de, Deserialize, Deserializer, Serializer};

use super::CudaGraphs;

/// A setting's parser and spelling (`parse(spell(v)) == v`).
pub trait Word: Sized {
    fn parse_word(s: &str) -> Result<Self, String>;
    fn spell(&self) -> String;
}

/// The types that spell themselves with `FromStr` and `Display`.
macro_rules! word_by_from_str {
    ($($t:ty),*) => {$(
        impl Word for $t {
            fn parse_word(s: &str) -> Result<Self, String> {
                s.parse::<$t>().map_err(|e| e.to_string())
            }
            fn spell(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
word_by_from_str!(Device, RoutingStrategy, PeftType);

/// The MoE implementation of a run, `None` for `auto`: the device decides
/// ([`MoeImpl::for_device`]). An alias, so that clap reads `auto` as a value of the flag (not as
/// an optional value, which it makes of an `Option<Option<_>>` field).
pub type MoeImplChoice = Option<MoeImpl>;

impl Word for MoeImplChoice {
    /// `auto`, or a [`MoeImpl`] by name.
    fn parse_word(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(None),
            _ => s.parse().map(Some).map_err(|_| {
                format!(
                    "unknown MoE implementation `{s}` (expected auto, naive, paper, grouped or \
                     fused)"
                )
            }),
        }
    }
    fn spell(&self) -> String {
        self.map_or("auto".to_string(), |m| m.to_string())
    }
}

/// How a run of several adapters computes their group, `None` for `auto`: `Exact` (see
/// [`crate::config::TrainConfig::group_mode`]).
pub type GroupModeChoice = Option<GroupMode>;

impl Word for GroupModeChoice {
    /// `auto`, `exact`, `sequential` or `shared`.
    fn parse_word(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(None),
            "exact" => Ok(Some(GroupMode::Exact)),
            "sequential" => Ok(Some(GroupMode::Sequential)),
            "shared" => Ok(Some(GroupMode::Shared)),
            _ => Err(format!(
                "unknown group mode `{s}` (expected auto, exact, sequential or shared)"
            )),
        }
    }
    fn spell(&self) -> String {
        match self {
            None => "auto",
            Some(GroupMode::Exact) => "exact",
            Some(GroupMode::Sequential) => "sequential",
            Some(GroupMode::Shared) => "shared",
        }
        .to_string()
    }
}

/// How attention is computed: `composite` or `flash` ([`AttentionImpl`]).
impl Word for AttentionImpl {
    fn parse_word(s: &str) -> Result<Self, String> {
        match s {
            "composite" => Ok(AttentionImpl::Composite),
            "flash" => Ok(AttentionImpl::Flash),
            _ => Err(format!(
                "unknown attention `{s}` (expected composite or flash)"
            )),
        }
    }
    fn spell(&self) -> String {
        match self {
            AttentionImpl::Composite => "composite",
            AttentionImpl::Flash => "flash",
        }
        .to_string()
    }
}

/// Whether micro-steps are recorded as CUDA graphs: `auto`, `off`, `eager` or `on`
/// ([`CudaGraphs`]).
impl Word for CudaGraphs {
    fn parse_word(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(CudaGraphs::Auto),
            "off" => Ok(CudaGraphs::Off),
            "eager" => Ok(CudaGraphs::Eager),
            "on" => Ok(CudaGraphs::On),
            _ => Err(format!(
                "unknown CUDA graphs setting `{s}` (expected auto, off, eager or on)"
            )),
        }
    }
    fn spell(&self) -> String {
        match self {
            CudaGraphs::Auto => "auto",
            CudaGraphs::Off => "off",
            CudaGraphs::Eager => "eager",
            CudaGraphs::On => "on",
        }
        .to_string()
    }
}

/// The fused MoE FFN's kernels: `gemms` ([`MoeKernels::BlockGemms`]) or `tiles`.
impl Word for MoeKernels {
    fn parse_word(s: &str) -> Result<Self, String> {
        match s {
            "gemms" => Ok(MoeKernels::BlockGemms),
            "tiles" => Ok(MoeKernels::Tiles),
            _ => Err(format!(
                "unknown MoE kernels `{s}` (expected gemms or tiles)"
            )),
        }
    }
    fn spell(&self) -> String {
        match self {
            MoeKernels::BlockGemms => "gemms",
            MoeKernels::Tiles => "tiles",
        }
        .to_string()
    }
}

/// A count of at least 1 (e.g. tokens per chunk). In TOML it is an integer (serde's own
/// `NonZeroUsize`, which refuses 0 too); this spelling is the command line's.
impl Word for NonZeroUsize {
    fn parse_word(s: &str) -> Result<Self, String> {
        match s.parse::<usize>() {
            Ok(n) => NonZeroUsize::new(n).ok_or_else(|| "must be at least 1".to_string()),
            Err(_) => Err(format!("`{s}` is not a whole number")),
        }
    }
    fn spell(&self) -> String {
        self.to_string()
    }
}

/// The value parser of a [`Word`] setting for clap (`#[arg(value_parser = words::parse::<T>)]`).
pub fn parse<T: Word>(s: &str) -> Result<T, String> {
    T::parse_word(s)
}

/// `#[serde(with = "words")]`: a [`Word`] setting as its spelling.
pub fn serialize<T: Word, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&v.spell())
}

/// `#[serde(with = "words")]`: a [`Word`] setting from its spelling.
pub fn deserialize<'de, T: Word, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
    T::parse_word(&String::deserialize(d)?).map_err(de::Error::custom)
}

/// `#[serde(with = "words::option")]`: a [`Word`] setting that may be absent (serialize it with
/// `skip_serializing_if = "Option::is_none"`).
pub mod option {
    use super::*;

    pub fn serialize<T: Word, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_str(&v.spell()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, T: Word, D: Deserializer<'de>>(d: D) -> Result<Option<T>, D::Error> {
        super::deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Word + PartialEq + std::fmt::Debug>(words: &[&str]) {
        for w in words {
            let v = T::parse_word(w).unwrap();
            assert_eq!(&v.spell(), w);
            assert_eq!(T::parse_word(&v.spell()).unwrap(), v);
        }
    }

    #[test]
    fn every_spelling_parses_back() {
        round_trip::<Device>(&["cpu", "cuda:0", "cuda:3"]);
        round_trip::<RoutingStrategy>(&["topk", "topp"]);
        round_trip::<PeftType>(&["lora", "mixlora"]);
        round_trip::<MoeImplChoice>(&["auto", "naive", "paper", "grouped", "fused"]);
        round_trip::<MoeKernels>(&["gemms", "tiles"]);
        round_trip::<GroupModeChoice>(&["auto", "exact", "sequential", "shared"]);
        round_trip::<NonZeroUsize>(&["1", "4096"]);
    }

    #[test]
    fn bad_words_say_what_is_expected() {
        let e = parse::<MoeImplChoice>("dense").unwrap_err();
        assert_eq!(
            e,
            "unknown MoE implementation `dense` (expected auto, naive, paper, grouped or fused)"
        );
        assert!(parse::<MoeKernels>("tile")
            .unwrap_err()
            .contains("gemms or tiles"));
        assert_eq!(
            parse::<NonZeroUsize>("0").unwrap_err(),
            "must be at least 1"
        );
        assert!(parse::<NonZeroUsize>("-3")
            .unwrap_err()
            .contains("whole number"));
        assert!(parse::<Device>("cuda:x")
            .unwrap_err()
            .contains("cpu, cuda or cuda:N"));
    }
}
