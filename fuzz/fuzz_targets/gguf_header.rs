//! Any bytes into the GGUF header parser, then the config and tokenizer built from what it accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = model::gguf::Header::parse("fuzz.gguf", data) {
        let _ = model::LlamaConfig::from_gguf("fuzz.gguf", &h);
        let _ = model::Tokenizer::from_gguf("fuzz.gguf", &h);
    }
});
