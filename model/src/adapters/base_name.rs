//! The `base_model_name_or_path` of an adapter file: a name that Hugging Face's
//! `from_pretrained` (and so MoE-PEFT and the `mixlora` package) can take, for a base model that
//! was given as a GGUF file or a folder. The exact path goes to `mixlora_base_model_path`.

use std::path::Path;

use crate::gguf::GgufFile;

/// The name a Hugging Face user would recognise for the base model at `path`:
/// - a folder: the folder as given (`from_pretrained` reads a local folder);
/// - a GGUF file: the Hugging Face repository its metadata names
///   (`general.source.huggingface.repository`, or `general.source.repo_url` on
///   `huggingface.co`); else the file's stem without its quantisation suffix (`.Q4_1`,
///   `-Q4_K_M`, `.f16`, ...), prefixed with `general.organization` and a slash when that is a
///   plain hub name: `SmolLM2-135M-Instruct.Q4_1.gguf` by `HuggingFaceTB` gives
///   `HuggingFaceTB/SmolLM2-135M-Instruct`;
/// - anything else: the path as given.
pub fn base_model_name(path: &Path) -> String {
    let is_gguf = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if path.is_dir() || !is_gguf {
        return path.display().to_string();
    }
    let stem = path
        .file_stem()
        .map(|s| strip_quant_suffix(&s.to_string_lossy()).to_string())
        .unwrap_or_default();
    let Ok(gguf) = GgufFile::open(path) else {
        return stem;
    };
    let meta = |k: &str| gguf.header().get(k).and_then(|v| v.as_str()).map(str::trim);
    if let Some(repo) = meta("general.source.huggingface.repository").filter(|r| is_hub_id(r)) {
        return repo.to_string();
    }
    if let Some(repo) = meta("general.source.repo_url")
        .and_then(|u| u.strip_prefix("https://huggingface.co/"))
        .map(|r| r.trim_end_matches('/'))
        .filter(|r| is_hub_id(r))
    {
        return repo.to_string();
    }
    match meta("general.organization").filter(|o| is_hub_part(o)) {
        Some(org) if is_hub_part(&stem) => format!("{org}/{stem}"),
        _ => stem,
    }
}

/// `owner/name` with hub characters only.
fn is_hub_id(s: &str) -> bool {
    matches!(s.split('/').collect::<Vec<_>>()[..], [o, n] if is_hub_part(o) && is_hub_part(n))
}

fn is_hub_part(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// `stem` without a trailing `.TYPE` or `-TYPE` naming a GGUF tensor type (`Q4_1`, `Q4_K_M`,
/// `IQ3_XS`, `F16`, `bf16`, ...).
fn strip_quant_suffix(stem: &str) -> &str {
    let Some(cut) = stem.rfind(['.', '-']) else {
        return stem;
    };
    let suffix = stem[cut + 1..].to_ascii_lowercase();
    let float = matches!(suffix.as_str(), "f32" | "f16" | "bf16" | "fp16" | "fp32");
    let quant = ["q", "iq", "tq"].iter().any(|p| {
        suffix.strip_prefix(p).is_some_and(|r| {
            r.starts_with(|c: char| c.is_ascii_digit())
                && r.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
    });
    if (float || quant) && cut > 0 {
        &stem[..cut]
    } else {
        stem
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantisation_suffixes_are_dropped() {
        for (stem, want) in [
            ("SmolLM2-135M-Instruct.Q4_1", "SmolLM2-135M-Instruct"),
            ("Llama-3.2-1B-Instruct-Q4_K_M", "Llama-3.2-1B-Instruct"),
            ("tinyllama.f16", "tinyllama"),
            ("model-IQ3_XS", "model"),
            ("Llama-3.2-1B", "Llama-3.2-1B"),
            ("qwen2-7b", "qwen2-7b"),
            ("plain", "plain"),
        ] {
            assert_eq!(strip_quant_suffix(stem), want, "{stem}");
        }
    }

    #[test]
    fn folders_and_unreadable_files_keep_a_usable_name() {
        let dir = std::env::temp_dir().join(format!("mixlora-basename-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(base_model_name(&dir), dir.display().to_string());
        let bad = dir.join("Foo-7B.Q8_0.gguf");
        std::fs::write(&bad, b"not a gguf").unwrap();
        assert_eq!(base_model_name(&bad), "Foo-7B");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
