//! Any bytes into the safetensors header parser.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = model::safetensors::parse_header("fuzz.safetensors", data);
});
