//! Property tests of the two header parsers: random bytes and seeded mutations of valid files must
//! give Ok or a one-line error, never a panic, a hang or a huge allocation. (The cargo-fuzz targets in
//! `fuzz/` run the same entry points without a time bound.)

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use engine::{DType, Device};
use model::gguf::{GgufFile, Header};
use model::{LlamaConfig, Tokenizer, Weights};
use safetensors::tensor::{Dtype, TensorView};
use support::{tiny_llama, tmp_dir, write, Rng};

/// Records the largest single allocation of this test binary, so that a header claiming a huge count
/// that slipped past the bounds checks shows up as a failure rather than passing on a big machine.
struct Tracking;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

/// Inputs here are a few KiB; nothing they make the parsers allocate should come near this.
const ALLOC_LIMIT: usize = 16 << 20;

// SAFETY: forwards to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

/// Values worth writing over a length, count or offset field.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    31,
    32,
    255,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    1 << 62,
    i64::MAX as u64,
    u64::MAX - 1,
    u64::MAX,
];

/// Applies 1..=4 random mutations: byte flips, interesting u32/u64 overwrites, truncation,
/// insertion, deletion and duplication of a slice.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        if b.is_empty() {
            b.push(rng.next() as u8);
            continue;
        }
        let at = rng.below(b.len());
        match rng.below(7) {
            0 => b[at] ^= 1 << rng.below(8),
            1 => b[at] = rng.next() as u8,
            2 => {
                let v = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                let n = if rng.below(2) == 0 { 4 } else { 8 };
                for (k, &x) in v[..n].iter().enumerate() {
                    if let Some(slot) = b.get_mut(at + k) {
                        *slot = x;
                    }
                }
            }
            3 => b.truncate(at),
            4 => {
                let extra: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
                b.splice(at..at, extra);
            }
            5 => {
                let end = (at + 1 + rng.below(16)).min(b.len());
                b.drain(at..end);
            }
            _ => {
                let end = (at + 1 + rng.below(64)).min(b.len());
                let dup = b[at..end].to_vec();
                let to = rng.below(b.len());
                b.splice(to..to, dup);
            }
        }
    }
    b
}

fn check_one_line<T>(r: model::Result<T>) {
    if let Err(e) = r {
        let msg = e.to_string();
        assert!(
            !msg.contains('\n') && !msg.is_empty(),
            "bad message: {msg:?}"
        );
    }
}

/// Runs `f` on `iters` inputs (stopping early past `budget`, so the suite stays fast on a slow
/// machine); reports the seed of an input that panics.
fn fuzz(
    name: &str,
    iters: usize,
    budget: Duration,
    mut make: impl FnMut(&mut Rng) -> Vec<u8>,
    f: impl Fn(&[u8]),
) {
    let start = Instant::now();
    let mut done = 0;
    for i in 0..iters {
        let seed = 0x9e37_79b9_7f4a_7c15 ^ (i as u64).wrapping_mul(0x1000_0000_01b3);
        let input = make(&mut Rng(seed | 1));
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&input))).is_err() {
            panic!(
                "{name}: input #{i} ({} bytes) panicked: {input:02x?}",
                input.len()
            );
        }
        let largest = LARGEST.load(Ordering::Relaxed);
        assert!(
            largest < ALLOC_LIMIT,
            "{name}: input #{i} led to a {largest}-byte allocation: {input:02x?}"
        );
        done += 1;
        if start.elapsed() > budget {
            break;
        }
    }
    eprintln!("{name}: {done} inputs in {:.2?}", start.elapsed());
}

fn parse_gguf(bytes: &[u8]) {
    match Header::parse("fuzz.gguf", bytes) {
        Ok(h) => {
            check_one_line(LlamaConfig::from_gguf("fuzz.gguf", &h));
            check_one_line(Tokenizer::from_gguf("fuzz.gguf", &h));
        }
        Err(e) => check_one_line::<()>(Err(e)),
    }
}

#[test]
fn fuzz_gguf_header_mutations() {
    let seed = tiny_llama().build();
    parse_gguf(&seed);
    fuzz(
        "gguf mutations",
        50_000,
        Duration::from_secs(10),
        |r| mutate(r, &seed),
        parse_gguf,
    );
}

#[test]
fn fuzz_gguf_header_random() {
    fuzz(
        "gguf random",
        200_000,
        Duration::from_secs(10),
        |r| {
            // Mostly a valid magic and version so that the parser gets past them.
            let mut b = b"GGUF".to_vec();
            b.extend(if r.below(4) == 0 { 2u32 } else { 3 }.to_le_bytes());
            b.extend((0..r.below(256)).map(|_| r.next() as u8));
            if r.below(8) == 0 {
                b.drain(..r.below(8));
            }
            b
        },
        parse_gguf,
    );
}

/// Whole-file path on mutated files: open, config, tokenizer, every tensor.
#[test]
fn fuzz_gguf_files_end_to_end() {
    let seed = tiny_llama().build();
    let dir = tmp_dir("fuzz-gguf-files");
    let path = dir.join("fuzz.gguf");
    fuzz(
        "gguf files",
        1_000,
        Duration::from_secs(10),
        |r| mutate(r, &seed),
        |b| {
            write(&path, b);
            if let Ok(g) = GgufFile::open(&path) {
                check_one_line(Tokenizer::from_gguf(g.file(), g.header()));
            }
            match Weights::load(&path, DType::F32, Device::Cpu) {
                Ok((cfg, w)) => {
                    for name in w.names() {
                        match cfg.weight_shape(&name) {
                            Some(s) => check_one_line(w.get(&name, &s)),
                            None => check_one_line(w.get_unchecked(&name)),
                        }
                    }
                }
                Err(e) => check_one_line::<()>(Err(e)),
            }
        },
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn safetensors_seed() -> Vec<u8> {
    let a: Vec<u8> = (0..24).map(|i| i as u8).collect();
    let b: Vec<u8> = (0..8).collect();
    let views = vec![
        (
            "a.weight",
            TensorView::new(Dtype::F32, vec![2, 3], &a).unwrap(),
        ),
        (
            "b.weight",
            TensorView::new(Dtype::BF16, vec![4], &b).unwrap(),
        ),
    ];
    safetensors::tensor::serialize(views, None).unwrap()
}

fn parse_safetensors(bytes: &[u8]) {
    check_one_line(model::safetensors::parse_header("fuzz.safetensors", bytes));
}

#[test]
fn fuzz_safetensors_header_mutations() {
    let seed = safetensors_seed();
    assert!(model::safetensors::parse_header("seed", &seed).is_ok());
    fuzz(
        "safetensors mutations",
        200_000,
        Duration::from_secs(20),
        |r| mutate(r, &seed),
        parse_safetensors,
    );
}

#[test]
fn fuzz_safetensors_header_random() {
    fuzz(
        "safetensors random",
        200_000,
        Duration::from_secs(10),
        |r| {
            let n = r.below(128);
            let mut b = (n as u64).to_le_bytes().to_vec();
            let alphabet = br#"{}[]":,0123456789 abdefFIBU_ltyphsoan"#;
            b.extend((0..n + r.below(8)).map(|_| alphabet[r.below(alphabet.len())]));
            b
        },
        parse_safetensors,
    );
}
