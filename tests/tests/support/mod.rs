//! Shared by the loader tests and the header fuzz tests: a GGUF writer for small synthetic files,
//! temporary folders, and where the real SmolLM2 file and the reference fixtures live.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// GGUF metadata value type ids.
pub mod vt {
    pub const U8: u32 = 0;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const F64: u32 = 12;
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// Builds GGUF v3 files in memory.
#[derive(Clone, Default)]
pub struct GgufBuilder {
    kvs: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl GgufBuilder {
    pub fn kv_raw(mut self, key: &str, ty: u32, payload: Vec<u8>) -> Self {
        self.kvs.push((key.to_string(), ty, payload));
        self
    }
    pub fn u32(self, key: &str, v: u32) -> Self {
        self.kv_raw(key, vt::U32, v.to_le_bytes().to_vec())
    }
    pub fn f32(self, key: &str, v: f32) -> Self {
        self.kv_raw(key, vt::F32, v.to_le_bytes().to_vec())
    }
    pub fn f64(self, key: &str, v: f64) -> Self {
        self.kv_raw(key, vt::F64, v.to_le_bytes().to_vec())
    }
    pub fn bool(self, key: &str, v: bool) -> Self {
        self.kv_raw(key, vt::BOOL, vec![v as u8])
    }
    pub fn str(self, key: &str, v: &str) -> Self {
        let mut p = Vec::new();
        put_str(&mut p, v);
        self.kv_raw(key, vt::STRING, p)
    }
    pub fn str_array(self, key: &str, v: &[&str]) -> Self {
        let mut p = vt::STRING.to_le_bytes().to_vec();
        p.extend((v.len() as u64).to_le_bytes());
        for s in v {
            put_str(&mut p, s);
        }
        self.kv_raw(key, vt::ARRAY, p)
    }
    pub fn i32_array(self, key: &str, v: &[i32]) -> Self {
        let mut p = vt::I32.to_le_bytes().to_vec();
        p.extend((v.len() as u64).to_le_bytes());
        for x in v {
            p.extend(x.to_le_bytes());
        }
        self.kv_raw(key, vt::ARRAY, p)
    }
    /// A tensor with GGUF `dims` (innermost first), GGML type id `ty` and raw `data`.
    pub fn tensor(mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> Self {
        self.tensors
            .push((name.to_string(), dims.to_vec(), ty, data));
        self
    }
    /// An f32 tensor from row-major `shape` and values.
    pub fn tensor_f32(self, name: &str, shape: &[usize], v: &[f32]) -> Self {
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensor(name, &dims, 0, data)
    }

    pub fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kvs.len() as u64).to_le_bytes());
        for (k, ty, p) in &self.kvs {
            put_str(&mut out, k);
            out.extend(ty.to_le_bytes());
            out.extend(p);
        }
        let mut offset = 0u64;
        for (name, dims, ty, data) in &self.tensors {
            put_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset = (offset + data.len() as u64).next_multiple_of(32);
        }
        // The data section and every tensor in it start at multiples of 32 (the default alignment),
        // so aligning the absolute position lands each tensor at its recorded offset.
        for (_, _, _, data) in &self.tensors {
            out.resize(out.len().next_multiple_of(32), 0);
            out.extend(data);
        }
        out
    }
}

/// A tiny LLaMA (hidden 8, 2 heads of 4, 1 kv head, ffn 12, 1 layer, vocab 6) with a byte-level BPE
/// tokenizer, all f32; weight values are `i * 0.01` per tensor.
pub fn tiny_llama() -> GgufBuilder {
    let (h, heads, kv, hd, ff, v) = (8usize, 2usize, 1usize, 4usize, 12usize, 6usize);
    let mut b = GgufBuilder::default()
        .str("general.architecture", "llama")
        .u32("llama.block_count", 1)
        .u32("llama.context_length", 128)
        .u32("llama.embedding_length", h as u32)
        .u32("llama.feed_forward_length", ff as u32)
        .u32("llama.attention.head_count", heads as u32)
        .u32("llama.attention.head_count_kv", kv as u32)
        .f32("llama.rope.freq_base", 10000.0)
        .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .str("tokenizer.ggml.model", "gpt2")
        .str("tokenizer.ggml.pre", "smollm")
        .str_array(
            "tokenizer.ggml.tokens",
            &["<|endoftext|>", "a", "b", "ab", "Ġ", "Ġab"],
        )
        .str_array("tokenizer.ggml.merges", &["a b", "Ġ ab"])
        .i32_array("tokenizer.ggml.token_type", &[3, 1, 1, 1, 1, 1])
        .u32("tokenizer.ggml.bos_token_id", 0)
        .u32("tokenizer.ggml.eos_token_id", 0);
    let seq = |n: usize| (0..n).map(|i| i as f32 * 0.01).collect::<Vec<f32>>();
    let mats: [(&str, [usize; 2]); 7] = [
        ("blk.0.attn_q.weight", [heads * hd, h]),
        ("blk.0.attn_k.weight", [kv * hd, h]),
        ("blk.0.attn_v.weight", [kv * hd, h]),
        ("blk.0.attn_output.weight", [h, heads * hd]),
        ("blk.0.ffn_gate.weight", [ff, h]),
        ("blk.0.ffn_up.weight", [ff, h]),
        ("blk.0.ffn_down.weight", [h, ff]),
    ];
    b = b.tensor_f32("token_embd.weight", &[v, h], &seq(v * h));
    for (name, s) in mats {
        b = b.tensor_f32(name, &s, &seq(s[0] * s[1]));
    }
    for name in [
        "blk.0.attn_norm.weight",
        "blk.0.ffn_norm.weight",
        "output_norm.weight",
    ] {
        b = b.tensor_f32(name, &[h], &seq(h));
    }
    b
}

/// A fresh empty temporary folder for one test.
pub fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mixlora-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

pub fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("write test file");
}

/// The real SmolLM2-135M-Instruct GGUF: `$MIXLORA_SMOLLM2_GGUF`, else
/// `${MIXLORA_CACHE:-~/.cache/mixlora}/SmolLM2-135M-Instruct.Q4_1.gguf` (what
/// `scripts/fetch-smollm2.sh` writes). None, with the reason printed, when it is absent.
pub fn smollm2_gguf() -> Option<PathBuf> {
    let path = match std::env::var_os("MIXLORA_SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("MIXLORA_CACHE")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/mixlora"))
                })?;
            cache.join("SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    if path.is_file() {
        Some(path)
    } else {
        testutil::skip(format_args!(
            "{} not found (run scripts/fetch-smollm2.sh or set MIXLORA_SMOLLM2_GGUF)",
            path.display()
        ));
        None
    }
}

/// The reference fixture `smollm2_reference.json`: `$MIXLORA_FIXTURES/`, else `shared/fixtures/` in
/// or beside the repository. None, with the reason printed, when it is absent.
pub fn smollm2_fixture() -> Option<serde_json::Value> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut dirs: Vec<PathBuf> = std::env::var_os("MIXLORA_FIXTURES")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    dirs.push(repo.join("shared/fixtures"));
    dirs.push(repo.join("../shared/fixtures"));
    let Some(path) = dirs
        .iter()
        .map(|d| d.join("smollm2_reference.json"))
        .find(|p| p.is_file())
    else {
        testutil::skip("smollm2_reference.json not found (set MIXLORA_FIXTURES)");
        return None;
    };
    let text = std::fs::read_to_string(&path).expect("read fixture");
    Some(serde_json::from_str(&text).expect("parse fixture"))
}

/// A tiny deterministic generator (xorshift64*), for the mutation fuzzing.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}
