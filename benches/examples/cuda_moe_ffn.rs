//! The fused MixLoRA FFN (the `fused` method of docs/DESIGN.md, unit `engine::fused::moe_ffn`) on
//! `cuda:0` at LLaMA-2-7B sizes (H = 4096, I = 11008, E = 8, k = 2, r = 16, bf16 base, f32
//! adapters; T = 16384 tokens unless `--tokens N`): each of the unit's primitives alone (median
//! GPU time by CUDA events, its minimal bytes, the rate), then the whole MixLoRA block forward and
//! forward + backward with `MoeImpl::Fused` and `MoeImpl::Naive` (router, top-k and the autograd
//! included), and the allocator peak.
//!
//! Build: `cargo build --release -p mixlora-benches --features mixlora-engine/cuda --example
//! cuda_moe_ffn`. Run on the GPU machine: `LD_LIBRARY_PATH=/usr/local/cuda/lib64
//! MIXLORA_CUDA_INCLUDE=/usr/local/cuda/include example-cuda_moe_ffn [--tokens N] [--no-naive]`.
//!
//! Minimal bytes per kernel (b = 2 bytes of the bf16 base; K = k slots per token): swiglu_forward
//! reads G, U and the slots' ΔG, ΔU, writes Ā and the slots' m⊙a: `(3 + 3K)·T·I·b`;
//! swiglu_backward reads G, U, dĀ and the slots' ΔG, ΔU, ΔD, writes dG|dU and the slots' dg, du,
//! m⊙a: `(5 + 6K)·T·I·b`; the code layouts move `T·k·r` codes and write `T·k·E·r` block codes.
//! Ceiling: 4.3 TB/s device copy (the rank-r products are cuBLAS GEMMs, timed in the block).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use engine::backend::cpu::CpuStorage;
use engine::backend::cuda::{memory_stats, reset_peak_memory, CudaDevice};
use engine::fused::moe_ffn::primitives::{self as prim, MoeDims};
use engine::fused::Operand;
use engine::{DType, Device, Layout, Result, Shape, Storage, Tensor};
use model::adapters::{ExpertLora, LoraLinear, MixLoraFfn, MoeImpl, Router, Routing, SharedFfn};

const GPU: Device = Device::Cuda(0);
const COPY: f64 = 4.3e12;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Median GPU milliseconds of `f` (2 warm-ups, then `n` calls between CUDA events).
fn time(dev: &CudaDevice, n: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    f()?;
    dev.synchronize()?;
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        let a = dev.record_event()?;
        f()?;
        let b = dev.record_event()?;
        ms.push(a.elapsed_ms(&b)? as f64);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    Ok(ms[n / 2])
}

fn randn(dims: &[usize], std: f64, seed: u64, dtype: DType) -> Result<(Storage, Layout)> {
    let shape = Shape::from(dims.to_vec());
    Ok((
        Storage::randn(GPU, &shape, dtype, 0.0, std, seed)?,
        Layout::contiguous(shape),
    ))
}

fn u32s(v: Vec<u32>) -> Result<(Storage, Layout)> {
    let n = v.len();
    Ok((
        Storage::from_cpu(GPU, CpuStorage::U32(v))?,
        Layout::contiguous([n]),
    ))
}

/// An operand of a fused primitive.
fn op(x: &(Storage, Layout)) -> Operand<'_, Storage> {
    Operand::new(&x.0, &x.1)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let t = args
        .iter()
        .position(|a| a == "--tokens")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(16384usize);
    let naive = !args.iter().any(|a| a == "--no-naive");
    let (h, i, e, k, r) = (4096usize, 11008usize, 8usize, 2usize, 16usize);
    mixlora_benches::cuda_from_env()?;
    let dev = CudaDevice::get(0)?;
    println!("fused MixLoRA FFN, T={t} H={h} I={i} E={e} k={k} r={r}, bf16 base, f32 adapters");

    // ----- the kernels alone ------------------------------------------------------------
    let (bt, at) = (DType::BF16, DType::F32);
    let g = randn(&[t, i], 1.0, 1, bt)?;
    let u = randn(&[t, i], 1.0, 2, bt)?;
    let lg = randn(&[t * k, i], 0.1, 3, bt)?;
    let lu = randn(&[t * k, i], 0.1, 4, bt)?;
    let ld = randn(&[t * k, i], 0.1, 5, bt)?;
    let dabar = randn(&[t, i], 1.0, 6, bt)?;
    let w = randn(&[t, k], 0.3, 7, at)?;
    let block = randn(&[t * k, e * r], 1.0, 8, bt)?;
    let codes = randn(&[t, k, r], 1.0, 9, at)?;
    // Token t goes to experts (t mod E) and ((t + 1 + t / E) mod E): distinct, balanced.
    let mut ids = Vec::with_capacity(t * k);
    for tt in 0..t {
        let a = tt % e;
        let b = (a + 1 + (tt / e) % (e - 1)) % e;
        ids.extend_from_slice(&[a as u32, b as u32][..k]);
    }
    let ids = u32s(ids)?;
    let d = MoeDims {
        t,
        k,
        e,
        r,
        i,
        dropout: 0.05,
        seed: 3,
        t0: 0,
    };
    let (ti, kf) = ((t * i) as f64 * 2.0, k as f64);
    let slots = (t * k * e * r) as f64;
    /// Name, a run of the primitive on its operands, minimal bytes.
    type Case<'a> = (&'a str, Box<dyn Fn() -> Result<()> + 'a>, f64);
    let cases: Vec<Case> = vec![
        (
            "swiglu_forward",
            Box::new(|| {
                let o = prim::SwigluForward {
                    g: op(&g),
                    u: op(&u),
                    dg: op(&lg),
                    du: op(&lu),
                    w: op(&w),
                };
                prim::swiglu_forward(o, &d).map(drop)
            }),
            (3.0 + 3.0 * kf) * ti,
        ),
        (
            "swiglu_backward",
            Box::new(|| {
                let o = prim::SwigluBackward {
                    g: op(&g),
                    u: op(&u),
                    dg: op(&lg),
                    du: op(&lu),
                    dd: op(&ld),
                    dabar: op(&dabar),
                    w: op(&w),
                };
                prim::swiglu_backward(o, &d).map(drop)
            }),
            (5.0 + 6.0 * kf) * ti,
        ),
        (
            "gather_codes",
            Box::new(|| {
                let o = prim::GatherCodes {
                    src: op(&block),
                    ids: op(&ids),
                };
                prim::gather_codes(o, &d).map(drop)
            }),
            (t * k * r) as f64 * 6.0,
        ),
        (
            "expand_codes",
            Box::new(|| {
                let o = prim::ExpandCodes {
                    codes: op(&codes),
                    ids: op(&ids),
                };
                prim::expand_codes(o, &d, false).map(drop)
            }),
            slots * 4.0,
        ),
    ];
    println!(
        "{:<18} {:>9} {:>9} {:>9} {:>7}",
        "kernel", "ms", "MB", "GB/s", "%copy"
    );
    for (name, f, bytes) in &cases {
        let ms = time(&dev, 10, f)?;
        let sec = ms / 1e3;
        println!(
            "{name:<18} {ms:>9.3} {:>9.1} {:>9.0} {:>6.1}%",
            bytes / 1e6,
            bytes / sec / 1e9,
            100.0 * bytes / sec / COPY,
        );
    }
    drop(cases);

    // ----- the whole block ---------------------------------------------------------------
    let x = Tensor::randn([t, h], 0.0, 1.0, 20, bt, GPU)?.to_var()?;
    let shared = [
        Tensor::randn([i, h], 0.0, 0.015, 21, bt, GPU)?,
        Tensor::randn([i, h], 0.0, 0.015, 22, bt, GPU)?,
        Tensor::randn([h, i], 0.0, 0.0095, 23, bt, GPU)?,
    ];
    // Each kind's expert matrices in one [E, ..] buffer, as the trainer lays them out (the fused
    // path then stacks them as views, without copies).
    let stacked = |shape: [usize; 3], seed: u64| -> Result<Vec<Tensor>> {
        Tensor::randn(shape, 0.0, 0.01, seed, at, GPU).and_then(|t| t.unstack_leaves())
    };
    let (a_gate, b_gate) = (stacked([e, r, h], 32)?, stacked([e, i, r], 33)?);
    let (a_up, b_up) = (stacked([e, r, h], 34)?, stacked([e, i, r], 35)?);
    let (a_down, b_down) = (stacked([e, r, i], 36)?, stacked([e, h, r], 37)?);
    let lora = |a: &[Tensor], b: &[Tensor], k: usize| {
        Some(LoraLinear::new(a[k].clone(), b[k].clone(), 2.0, 0.05))
    };
    let experts: Vec<ExpertLora> = (0..e)
        .map(|k| ExpertLora {
            gate: lora(&a_gate, &b_gate, k),
            up: lora(&a_up, &b_up, k),
            down: lora(&a_down, &b_down, k),
        })
        .collect();
    let ffn = MixLoraFfn {
        router: Router {
            weight: Tensor::randn([e, h], 0.0, 0.02, 40, at, GPU)?.to_var()?,
            routing: Routing::TopK(k),
        },
        experts,
    };
    let sh = SharedFfn {
        gate: &engine::FrozenWeight::from(shared[0].clone()),
        up: &engine::FrozenWeight::from(shared[1].clone()),
        down: &engine::FrozenWeight::from(shared[2].clone()),
    };
    let dyt = Tensor::randn([t, h], 0.0, 1.0, 50, bt, GPU)?;
    let impls: &[MoeImpl] = if naive {
        &[MoeImpl::Fused(Default::default()), MoeImpl::Naive]
    } else {
        &[MoeImpl::Fused(Default::default())]
    };
    let err = |e: model::Error| engine::Error::invalid("moe block", e.to_string());
    for &imp in impls {
        let fwd = time(&dev, 5, || {
            engine::no_grad(|| ffn.forward(&x, sh, imp, Some(1)).map(|_| ()).map_err(err))
        })?;
        reset_peak_memory(GPU);
        let (base_mem, _) = memory_stats(GPU);
        let both = time(&dev, 5, || {
            let (y, _) = ffn.forward(&x, sh, imp, Some(1)).map_err(err)?;
            y.backward_with_grad(&dyt)
        })?;
        let (_, peak) = memory_stats(GPU);
        println!(
            "block {imp:?}: forward {fwd:.2} ms, forward+backward {both:.2} ms, peak +{:.2} GiB",
            (peak.saturating_sub(base_mem)) as f64 / GIB
        );
    }
    Ok(())
}
