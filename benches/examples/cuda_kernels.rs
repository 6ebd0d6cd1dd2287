//! A kernel lab for the CUDA backend: every primitive op of the engine on `cuda:0`, at sizes well
//! above the H200's 50 MiB L2 (tens to hundreds of MB), in f32 and bf16 where both exist. For each
//! op: the median GPU time, the bytes it must move or the FLOPs it must do (counted by hand, below),
//! the rate, and its fraction of the ceiling, plus the allocator's peak.
//!
//! Build (on any machine): `cargo build --release -p mixlora-benches --features mixlora-engine/cuda
//! --example cuda_kernels` (scripts/dev/build-gpu.sh does it). Run on the GPU machine:
//! `LD_LIBRARY_PATH=/usr/local/cuda/lib64 MIXLORA_CUDA_INCLUDE=/usr/local/cuda/include
//! gpu-bin/example-cuda_kernels [--json PATH] [--filter SUBSTRING] [--quick]`.
//!
//! Method (docs/DESIGN.md, "GPU code"): random inputs (never zeros), two warm-up calls, then per call a CUDA event
//! before and after it on the device's stream; the median of the per-call GPU times (at least
//! 10 calls, up to ~0.3 s per op). Event times include the host's launch gaps when an op is too
//! short to keep the GPU busy, which is the cost the engine really pays. Ops are called through
//! the backend interface ([`BackendStorage`]) the tensor ops call, so no autograd work is timed;
//! attention and dropout, which are composites, go through their tensor functions.
//!
//! Ceilings: device copy 4.3 TB/s (memory-bound ops; the contiguous copy below measures it),
//! bf16 GEMM 800 TFLOP/s (bf16 matmuls, bf16 attention), and for f32 GEMMs cuBLAS sgemm itself at
//! 8192³ (the engine's f32 matmul is sgemm, so that is the f32 ceiling; measured first).
//!
//! Bytes are the op's minimal traffic: each input read once, each output written once (`s` is the
//! element size, 4 for f32 and 2 for bf16; u32 ids and targets are 4 bytes; N the element count):
//! - copy, unary, cast, softmax, log_softmax, randn-free maps: `N·(s_in + s_out)`;
//! - binary: `N·3s`, broadcast: `N·2s + (broadcast operand)·s`; cmp: `N·(2s + 4)`; where: `N·(4 + 3s)`;
//! - reduce sum: `N·s + (outputs)·s`; rms_norm: `2N·s + n·s`; rms_norm backward (x, g, w in;
//!   dx, dw out): `3N·s + 2n·s`; rope: `2N·s + 2·(b·t·d/2)·s` (cos and sin tables);
//! - cross_entropy forward `R·V·s + R·4 + R·4` (logits, targets, f32 loss), backward
//!   `2·R·V·s + R·4 + R·4` (logits, targets, f32 row grads in; dlogits out);
//! - index_select `2·(rows·H)·s + rows·4`; index_add (base + src, one row per id) `3N·s + ids·4`;
//!   gather `N·(2s + 4)`; scatter_add `N·(3s + 4)`; topk `R·E·s + R·k·4`;
//! - dropout mask and randn: `N·s` (write only); dropout (mask, then x·mask): `2N·s`;
//! - causal_softmax (scores `[b, h, t, S]`): `(V + N)·s + b·S·4` with `V` the visible scores (the
//!   kernel never reads the others: `V ≈ N/2` when causal with `t = S`, `V = N` when every key
//!   is visible) and the u32 key mask when there is one; softmax_backward (y, g in; dx out):
//!   `3N·s`.
//!
//! FLOPs: matmul `2·m·n·k` (per batch); causal attention `4·b·h·t²·d` (QKᵀ and PV on the full
//! square: the composite masks, it does not skip); the rows marked "causal FLOPs" count only the
//! visible half (forward `2·b·h·t²·d`, forward + backward 3.5 times that). Matmul and attention bytes are their operands and
//! output once each (shown, not rated, except for the skinny LoRA product, which is memory-bound).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::fmt::Write as _;

use engine::backend::cpu::CpuStorage;
use engine::backend::cuda::{memory_stats, reset_peak_memory, CudaDevice, GpuEvent};
use engine::backend::{BackendStorage, BinaryOp, CmpOp, ReduceOp, UnaryOp};
use engine::fused::lora::primitives as lora;
use engine::fused::moe_grouped::primitives as grouped;
use engine::fused::moe_route::primitives as route;
use engine::fused::Operand;
use engine::{
    causal_attention, flash_attention, DType, Device, Layout, Result, Shape, Storage, Tensor,
};

/// Device copy bandwidth of the H200 (bytes/s), the ceiling of memory-bound ops.
const COPY_CEILING: f64 = 4.3e12;
/// Dense bf16 GEMM rate of the H200 through cuBLAS (FLOP/s).
const BF16_GEMM_CEILING: f64 = 800e12;
/// GPU time spent per op (seconds), within the iteration bounds.
const TARGET_S: f64 = 0.3;

const GPU: Device = Device::Cuda(0);
const MIB: f64 = 1024.0 * 1024.0;

/// What limits an op, hence which ceiling its rate is compared to.
#[derive(Clone, Copy, PartialEq)]
enum Bound {
    Memory,
    Gemm(DType),
}

struct Case {
    op: String,
    dtype: DType,
    shape: String,
    bytes: f64,
    flops: f64,
    bound: Bound,
}

struct Row {
    case: Case,
    median_s: f64,
    min_s: f64,
    iters: usize,
    /// Allocator bytes the op held at its peak beyond what existed before it (output + scratch).
    op_alloc: usize,
    /// The allocator's peak during the timed calls, inputs included.
    peak: usize,
}

impl Row {
    fn gbps(&self) -> f64 {
        self.case.bytes / self.median_s / 1e9
    }
    fn tflops(&self) -> f64 {
        self.case.flops / self.median_s / 1e12
    }
}

struct Lab {
    dev: CudaDevice,
    filter: Option<String>,
    min_iters: usize,
    max_iters: usize,
    /// cuBLAS sgemm at 8192³ (FLOP/s), once measured.
    f32_ceiling: Option<f64>,
    rows: Vec<Row>,
}

impl Lab {
    /// The rate of `row` against its ceiling, as `(fraction, ceiling name)`.
    fn fraction(&self, row: &Row) -> (Option<f64>, String) {
        match row.case.bound {
            Bound::Memory => (
                Some(row.case.bytes / row.median_s / COPY_CEILING),
                "copy 4.3 TB/s".into(),
            ),
            Bound::Gemm(DType::BF16) => (
                Some(row.case.flops / row.median_s / BF16_GEMM_CEILING),
                "bf16 GEMM 800 TFLOP/s".into(),
            ),
            Bound::Gemm(_) => match self.f32_ceiling {
                Some(c) => (
                    Some(row.case.flops / row.median_s / c),
                    format!("sgemm 8192³ {:.1} TFLOP/s", c / 1e12),
                ),
                None => (None, "sgemm 8192³ (not run)".into()),
            },
        }
    }

    fn wanted(&self, case: &Case) -> bool {
        match &self.filter {
            None => true,
            Some(f) => {
                case.op.contains(f.as_str()) || format!("{} {}", case.op, case.dtype).contains(f)
            }
        }
    }

    /// Times `f` as the module doc says and records a row.
    fn run(&mut self, case: Case, mut f: impl FnMut() -> Result<()>) -> Result<()> {
        if !self.wanted(&case) {
            return Ok(());
        }
        for _ in 0..2 {
            f()?;
        }
        self.dev.synchronize()?;
        let e0 = self.dev.record_event()?;
        f()?;
        let e1 = self.dev.record_event()?;
        let est = (e0.elapsed_ms(&e1)? as f64 / 1e3).max(1e-6);
        let iters = ((TARGET_S / est).ceil() as usize).clamp(self.min_iters, self.max_iters);

        let before = memory_stats(GPU).0;
        reset_peak_memory(GPU);
        let mut events: Vec<(GpuEvent, GpuEvent)> = Vec::with_capacity(iters);
        for _ in 0..iters {
            let a = self.dev.record_event()?;
            f()?;
            events.push((a, self.dev.record_event()?));
        }
        self.dev.synchronize()?;
        let peak = memory_stats(GPU).1;
        let mut times = events
            .iter()
            .map(|(a, b)| a.elapsed_ms(b).map(|ms| ms as f64 / 1e3))
            .collect::<Result<Vec<f64>>>()?;
        times.sort_by(f64::total_cmp);
        let row = Row {
            median_s: times[times.len() / 2],
            min_s: times[0],
            iters,
            op_alloc: peak.saturating_sub(before),
            peak,
            case,
        };
        if row.case.bound == Bound::Gemm(DType::F32) && row.case.op.starts_with("ceiling") {
            self.f32_ceiling = Some(row.case.flops / row.median_s);
        }
        eprintln!(
            "{:<40} {:>5} {:>10.1} us  x{}",
            row.case.op,
            row.case.dtype.to_string(),
            row.median_s * 1e6,
            row.iters
        );
        self.rows.push(row);
        Ok(())
    }

    fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "| op | dtype | shape | median µs | MB moved | GB/s | TFLOP/s | % of ceiling | ceiling | op alloc MiB | peak MiB |"
        );
        let _ = writeln!(s, "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|");
        for r in &self.rows {
            let (frac, ceiling) = self.fraction(r);
            let tflops = if r.case.flops > 0.0 {
                format!("{:.1}", r.tflops())
            } else {
                "".into()
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.1} | {:.1} | {:.0} | {} | {} | {} | {:.1} | {:.1} |",
                r.case.op,
                r.case.dtype,
                r.case.shape,
                r.median_s * 1e6,
                r.case.bytes / 1e6,
                r.gbps(),
                tflops,
                frac.map_or("".into(), |f| format!("{:.1}%", f * 100.0)),
                ceiling,
                r.op_alloc as f64 / MIB,
                r.peak as f64 / MIB,
            );
        }
        s
    }

    fn json(&self) -> String {
        let mut s = String::from("{\n");
        let _ = writeln!(s, "  \"device\": \"cuda:0 {}\",", self.dev.arch());
        let _ = writeln!(s, "  \"copy_ceiling_bytes_per_s\": {COPY_CEILING:e},");
        let _ = writeln!(s, "  \"bf16_gemm_ceiling_flops\": {BF16_GEMM_CEILING:e},");
        let _ = writeln!(
            s,
            "  \"f32_gemm_ceiling_flops\": {},",
            self.f32_ceiling
                .map_or("null".to_string(), |c| format!("{c:e}"))
        );
        s.push_str("  \"ops\": [\n");
        for (i, r) in self.rows.iter().enumerate() {
            let (frac, ceiling) = self.fraction(r);
            let _ = write!(
                s,
                "    {{\"op\": {}, \"dtype\": \"{}\", \"shape\": {}, \"median_us\": {:.3}, \
                 \"min_us\": {:.3}, \"iters\": {}, \"bytes\": {}, \"flops\": {}, \"gb_per_s\": {:.3}, \
                 \"tflop_per_s\": {:.4}, \"fraction_of_ceiling\": {}, \"ceiling\": {}, \
                 \"op_alloc_bytes\": {}, \"peak_alloc_bytes\": {}}}",
                json_str(&r.case.op),
                r.case.dtype,
                json_str(&r.case.shape),
                r.median_s * 1e6,
                r.min_s * 1e6,
                r.iters,
                r.case.bytes,
                r.case.flops,
                r.gbps(),
                r.tflops(),
                frac.map_or("null".to_string(), |f| format!("{f:.4}")),
                json_str(&ceiling),
                r.op_alloc,
                r.peak,
            );
            s.push_str(if i + 1 < self.rows.len() { ",\n" } else { "\n" });
        }
        s.push_str("  ]\n}\n");
        s
    }
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

// ----- inputs --------------------------------------------------------------------------------------

fn lay(dims: &[usize]) -> Layout {
    Layout::contiguous(dims)
}

/// `N(0, 1)` samples of `dims` on the GPU.
fn randn(dims: &[usize], dtype: DType, seed: u64) -> Result<Storage> {
    Storage::randn(GPU, &Shape::from(dims), dtype, 0.0, 1.0, seed)
}

/// `n` random ids below `hi` on the GPU.
fn ids(n: usize, hi: usize, seed: u64) -> Result<Storage> {
    let v: Vec<u32> = (0..n as u64)
        .map(|i| (engine::rng::hash(seed, i) % hi as u64) as u32)
        .collect();
    Storage::from_cpu(GPU, CpuStorage::U32(v))
}

fn shape_str(dims: &[usize]) -> String {
    let d: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    format!("[{}]", d.join(", "))
}

fn mem(op: impl Into<String>, dtype: DType, shape: String, bytes: usize) -> Case {
    Case {
        op: op.into(),
        dtype,
        shape,
        bytes: bytes as f64,
        flops: 0.0,
        bound: Bound::Memory,
    }
}

fn gemm(op: impl Into<String>, dtype: DType, (m, k, n): (usize, usize, usize)) -> Case {
    let s = dtype.size_in_bytes();
    Case {
        op: op.into(),
        dtype,
        shape: format!("[{m}, {k}] x [{k}, {n}]"),
        bytes: ((m * k + k * n + m * n) * s) as f64,
        flops: 2.0 * (m * n * k) as f64,
        bound: Bound::Gemm(dtype),
    }
}

// ----- the ops -------------------------------------------------------------------------------------

/// Rows × hidden of the elementwise cases: 16384 tokens of a LLaMA-7B-sized hidden state
/// (64 Mi elements: 256 MiB in f32, 128 MiB in bf16).
const R: usize = 16384;
const H: usize = 4096;
const N: usize = R * H;

fn elementwise(lab: &mut Lab, dt: DType) -> Result<()> {
    let s = dt.size_in_bytes();
    let sh = shape_str(&[R, H]);
    let l = lay(&[R, H]);
    let x = randn(&[R, H], dt, 1)?;
    let y = randn(&[R, H], dt, 2)?;

    let mut dst = Storage::zeros(GPU, &Shape::from([R, H]), dt)?;
    lab.run(
        mem("copy (copy_to_view)", dt, sh.clone(), 2 * N * s),
        || x.copy_to_view(&l, &mut dst, &l),
    )?;
    // The same bytes read through a transposed view ([H, R] buffer seen as [R, H]).
    let lt = lay(&[H, R]).transpose(0, 1);
    lab.run(
        mem("copy (transposed view)", dt, sh.clone(), 2 * N * s),
        || x.copy_to_view(&lt, &mut dst, &l),
    )?;
    drop(dst);

    let other = if dt == DType::F32 {
        DType::BF16
    } else {
        DType::F32
    };
    lab.run(
        mem(
            format!("cast to {other}"),
            dt,
            sh.clone(),
            N * (s + other.size_in_bytes()),
        ),
        || x.to_dtype(&l, other).map(drop),
    )?;
    for (name, op) in [("exp", UnaryOp::Exp), ("silu", UnaryOp::Silu)] {
        lab.run(mem(name, dt, sh.clone(), 2 * N * s), || {
            x.unary(&l, op).map(drop)
        })?;
    }
    lab.run(mem("add", dt, sh.clone(), 3 * N * s), || {
        x.binary(&l, &y, &l, BinaryOp::Add).map(drop)
    })?;
    let row = randn(&[H], dt, 3)?;
    let rowl = lay(&[H]).broadcast_as("bench", &Shape::from([R, H]))?;
    lab.run(
        mem(
            "add broadcast [H] (row)",
            dt,
            format!("{sh} + [{H}]"),
            2 * N * s + H * s,
        ),
        || x.binary(&l, &row, &rowl, BinaryOp::Add).map(drop),
    )?;
    let col = randn(&[R, 1], dt, 4)?;
    let coll = lay(&[R, 1]).broadcast_as("bench", &Shape::from([R, H]))?;
    lab.run(
        mem(
            "mul broadcast [R, 1] (column)",
            dt,
            format!("{sh} * [{R}, 1]"),
            2 * N * s + R * s,
        ),
        || x.binary(&l, &col, &coll, BinaryOp::Mul).map(drop),
    )?;
    lab.run(
        mem("cmp lt (u32 out)", dt, sh.clone(), N * (2 * s + 4)),
        || x.cmp(&l, &y, &l, CmpOp::Lt).map(drop),
    )?;
    let cond = x.cmp(&l, &y, &l, CmpOp::Lt)?;
    lab.run(
        mem("where (u32 cond)", dt, sh.clone(), N * (4 + 3 * s)),
        || cond.where_cond(&l, &x, &l, &y, &l).map(drop),
    )?;
    drop(cond);

    lab.run(
        mem("sum over last dim", dt, sh.clone(), N * s + R * s),
        || x.reduce(&l, 1, ReduceOp::Sum).map(drop),
    )?;
    let (a, b, c) = (64, 1024, 1024);
    let l3 = lay(&[a, b, c]);
    lab.run(
        mem(
            "sum over middle dim",
            dt,
            format!("{} dim 1", shape_str(&[a, b, c])),
            N * s + a * c * s,
        ),
        || x.reduce(&l3, 1, ReduceOp::Sum).map(drop),
    )?;
    lab.run(mem("softmax (last dim)", dt, sh.clone(), 2 * N * s), || {
        x.softmax_last_dim(&l).map(drop)
    })?;
    lab.run(
        mem("log_softmax (last dim)", dt, sh.clone(), 2 * N * s),
        || x.log_softmax_last_dim(&l).map(drop),
    )?;

    let w = randn(&[H], dt, 5)?;
    let wl = lay(&[H]);
    lab.run(mem("rms_norm", dt, sh.clone(), 2 * N * s + H * s), || {
        x.rms_norm(&l, &w, &wl, 1e-5).map(drop)
    })?;
    lab.run(
        mem(
            "rms_norm backward (dx, dw)",
            dt,
            sh.clone(),
            3 * N * s + 2 * H * s,
        ),
        || {
            x.rms_norm_backward(&l, &w, &wl, &y, &l, 1e-5, true)
                .map(drop)
        },
    )?;
    lab.run(
        mem(
            "rms_norm backward (dx only, frozen weight)",
            dt,
            sh.clone(),
            3 * N * s,
        ),
        || {
            x.rms_norm_backward(&l, &w, &wl, &y, &l, 1e-5, false)
                .map(drop)
        },
    )?;

    // Dropout and random fills.
    let shape = Shape::from([R, H]);
    lab.run(mem("dropout mask (p=0.05)", dt, sh.clone(), N * s), || {
        Storage::dropout_mask(GPU, &shape, dt, 0.05, 7).map(drop)
    })?;
    let xt = Tensor::randn([R, H], 0.0, 1.0, 8, dt, GPU)?;
    lab.run(
        mem("dropout (mask, then x*mask)", dt, sh.clone(), 2 * N * s),
        || xt.dropout(0.05, 9, true).map(drop),
    )?;
    lab.run(mem("randn", dt, sh, N * s), || {
        Storage::randn(GPU, &shape, dt, 0.0, 1.0, 10).map(drop)
    })?;
    Ok(())
}

fn rope(lab: &mut Lab, dt: DType) -> Result<()> {
    let s = dt.size_in_bytes();
    // q as the model makes it: [b, t, h, d] projections seen as [b, h, t, d].
    let (b, t, h, d) = (32, 512, 32, 128);
    let n = b * t * h * d;
    let x = randn(&[b, t, h, d], dt, 11)?;
    let xl = lay(&[b, t, h, d]).transpose(1, 2);
    let cos = randn(&[b, t, d / 2], dt, 12)?;
    let sin = randn(&[b, t, d / 2], dt, 13)?;
    let tl = lay(&[b, t, d / 2]);
    lab.run(
        mem(
            "rope (x transposed view)",
            dt,
            format!(
                "{} from {}",
                shape_str(&[b, h, t, d]),
                shape_str(&[b, t, h, d])
            ),
            2 * n * s + 2 * b * t * (d / 2) * s,
        ),
        || x.rope(&xl, &cos, &tl, &sin, &tl, 2).map(drop),
    )
}

fn cross_entropy(lab: &mut Lab, dt: DType) -> Result<()> {
    let s = dt.size_in_bytes();
    let (r, v) = (4096, 49152);
    let sh = shape_str(&[r, v]);
    let l = lay(&[r, v]);
    let x = randn(&[r, v], dt, 14)?;
    let t = ids(r, v, 15)?;
    let tl = lay(&[r]);
    let ignore = engine::IGNORE_INDEX;
    lab.run(
        mem("cross_entropy forward", dt, sh.clone(), r * v * s + 8 * r),
        || x.cross_entropy(&l, &t, &tl, ignore).map(drop),
    )?;
    let g = randn(&[r], DType::F32, 16)?;
    lab.run(
        mem("cross_entropy backward", dt, sh, 2 * r * v * s + 8 * r),
        || {
            x.cross_entropy_backward(&l, &t, &tl, &g, &tl, ignore)
                .map(drop)
        },
    )
}

fn index(lab: &mut Lab, dt: DType) -> Result<()> {
    let s = dt.size_in_bytes();
    let sh = shape_str(&[R, H]);
    let l = lay(&[R, H]);

    // Embedding lookup: 16384 rows of a [49152, 4096] table.
    let vocab = 49152;
    let table = randn(&[vocab, H], dt, 17)?;
    let tl = lay(&[vocab, H]);
    let rid = ids(R, vocab, 18)?;
    let ril = lay(&[R]);
    lab.run(
        mem(
            "index_select (embedding)",
            dt,
            format!("{} rows of {}", R, shape_str(&[vocab, H])),
            2 * N * s + 4 * R,
        ),
        || table.index_select(&tl, &rid, &ril, 0).map(drop),
    )?;
    drop(table);

    let base = randn(&[R, H], dt, 19)?;
    let src = randn(&[R, H], dt, 20)?;
    let pid = ids(R, R, 21)?;
    lab.run(
        mem(
            "index_add (rows, dim 0)",
            dt,
            format!("{sh} += {R} rows"),
            3 * N * s + 4 * R,
        ),
        || base.index_add(&l, &pid, &ril, &src, &l, 0).map(drop),
    )?;
    let cid = ids(N, H, 22)?;
    lab.run(
        mem("gather (dim 1)", dt, sh.clone(), N * (2 * s + 4)),
        || base.gather(&l, &cid, &l, 1).map(drop),
    )?;
    lab.run(mem("scatter_add (dim 1)", dt, sh, N * (3 * s + 4)), || {
        base.scatter_add(&l, &cid, &l, &src, &l, 1).map(drop)
    })?;
    drop((base, src, cid));

    // Router top-k: E = 8 experts, k = 2, per token.
    let (e, k) = (8, 2);
    for rows in [16384, 1 << 20] {
        let logits = randn(&[rows, e], dt, 23)?;
        let ll = lay(&[rows, e]);
        lab.run(
            mem(
                format!("topk k={k}"),
                dt,
                shape_str(&[rows, e]),
                rows * e * s + rows * k * 4,
            ),
            || logits.topk_indices(&ll, k).map(drop),
        )?;
    }
    Ok(())
}

/// `[m, k] x [n, k]ᵀ` (a weight in the `[out, in]` layout, as the model stores it) or
/// `[m, k] x [k, n]` when `!transposed`.
fn matmul_case(
    lab: &mut Lab,
    name: &str,
    dt: DType,
    (m, k, n): (usize, usize, usize),
    transposed: bool,
    bound: Bound,
) -> Result<()> {
    let a = randn(&[1, m, k], dt, 24)?;
    let al = lay(&[1, m, k]);
    let (b, bl) = if transposed {
        (randn(&[1, n, k], dt, 25)?, lay(&[1, n, k]).transpose(1, 2))
    } else {
        (randn(&[1, k, n], dt, 25)?, lay(&[1, k, n]))
    };
    let mut case = gemm(name, dt, (m, k, n));
    if transposed {
        case.shape = format!("[{m}, {k}] x [{n}, {k}]ᵀ");
    }
    case.bound = bound;
    lab.run(case, || a.matmul(&al, &b, &bl).map(drop))
}

fn matmuls(lab: &mut Lab, dt: DType) -> Result<()> {
    let g = Bound::Gemm(dt);
    matmul_case(lab, "matmul 4096³", dt, (4096, 4096, 4096), false, g)?;
    matmul_case(lab, "matmul 7B q/k/v/o", dt, (R, 4096, 4096), true, g)?;
    matmul_case(lab, "matmul 7B gate/up", dt, (R, 4096, 11008), true, g)?;
    matmul_case(lab, "matmul 7B down", dt, (R, 11008, 4096), true, g)?;
    // The LoRA A product: skinny, so memory-bound.
    matmul_case(
        lab,
        "matmul LoRA A (r=16)",
        dt,
        (R, 4096, 16),
        true,
        Bound::Memory,
    )?;
    Ok(())
}

fn attention(lab: &mut Lab, dt: DType) -> Result<()> {
    let (b, h, t, d) = (8, 32, 512, 128);
    let q = Tensor::randn([b, h, t, d], 0.0, 1.0, 26, dt, GPU)?;
    let k = Tensor::randn([b, h, t, d], 0.0, 1.0, 27, dt, GPU)?;
    let v = Tensor::randn([b, h, t, d], 0.0, 1.0, 28, dt, GPU)?;
    let s = dt.size_in_bytes();
    let case = Case {
        op: "causal_attention forward".into(),
        dtype: dt,
        shape: format!("b={b} h={h} t={t} d={d}"),
        bytes: (4 * b * h * t * d * s) as f64,
        flops: 4.0 * (b * h * t * t * d) as f64,
        bound: Bound::Gemm(dt),
    };
    lab.run(case, || causal_attention(&q, &k, &v, None, 0).map(drop))?;
    // Flash attention, and both ops forward + backward, at causal FLOPs (the visible half of the
    // square: forward 2·b·h·t²·d, backward 2.5 times that, FlashAttention-2's count).
    let causal = 2.0 * (b * h * t * t * d) as f64;
    let case = Case {
        op: "flash_attention forward (causal FLOPs)".into(),
        dtype: dt,
        shape: format!("b={b} h={h} t={t} d={d}"),
        bytes: (4 * b * h * t * d * s) as f64,
        flops: causal,
        bound: Bound::Gemm(dt),
    };
    lab.run(case, || flash_attention(&q, &k, &v, None, 0).map(drop))?;
    let (qv, kv, vv) = (q.to_var()?, k.to_var()?, v.to_var()?);
    let g = Tensor::randn([b, h, t, d], 0.0, 1.0, 29, dt, GPU)?;
    type Attention = fn(&Tensor, &Tensor, &Tensor, Option<&Tensor>, usize) -> Result<Tensor>;
    let ops: [(&str, Attention); 2] = [
        ("causal_attention", causal_attention),
        ("flash_attention", flash_attention),
    ];
    for (name, attn) in ops {
        let case = Case {
            op: format!("{name} forward+backward (causal FLOPs)"),
            dtype: dt,
            shape: format!("b={b} h={h} t={t} d={d}"),
            bytes: (8 * b * h * t * d * s) as f64,
            flops: 3.5 * causal,
            bound: Bound::Gemm(dt),
        };
        lab.run(case, || {
            attn(&qv, &kv, &vv, None, 0)?.backward_with_grad(&g)?;
            for x in [&qv, &kv, &vv] {
                x.zero_grad();
            }
            Ok(())
        })?;
    }
    Ok(())
}

fn usage() -> ! {
    eprintln!("usage: cuda_kernels [--json PATH] [--filter SUBSTRING] [--quick]");
    std::process::exit(2);
}

fn main() {
    let mut json = None;
    let mut filter = None;
    let mut quick = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json = Some(args.next().unwrap_or_else(|| usage())),
            "--filter" => filter = Some(args.next().unwrap_or_else(|| usage())),
            "--quick" => quick = true,
            _ => usage(),
        }
    }
    let dev = match mixlora_benches::cuda_from_env().and_then(|()| CudaDevice::get(0)) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cuda_kernels: no usable CUDA GPU: {e}");
            std::process::exit(1);
        }
    };
    let mut lab = Lab {
        dev,
        filter,
        min_iters: if quick { 3 } else { 10 },
        max_iters: if quick { 20 } else { 500 },
        f32_ceiling: None,
        rows: Vec::new(),
    };
    if let Err(e) = run_all(&mut lab) {
        eprintln!("cuda_kernels: {e}");
        std::process::exit(1);
    }
    println!(
        "cuda_kernels on cuda:0 ({}): median of per-call CUDA-event times\n",
        lab.dev.arch()
    );
    print!("{}", lab.markdown());
    if let Some(path) = json {
        if let Err(e) = std::fs::write(&path, lab.json()) {
            eprintln!("cuda_kernels: writing {path}: {e}");
            std::process::exit(1);
        }
        eprintln!("wrote {path}");
    }
}

fn run_all(lab: &mut Lab) -> Result<()> {
    // The GEMM ceilings first, so that the f32 GEMMs have theirs.
    let filter = lab.filter.take();
    for dt in [DType::F32, DType::BF16] {
        matmul_case(
            lab,
            "ceiling: matmul 8192³",
            dt,
            (8192, 8192, 8192),
            false,
            Bound::Gemm(dt),
        )?;
    }
    lab.filter = filter;
    for dt in [DType::F32, DType::BF16] {
        elementwise(lab, dt)?;
        rope(lab, dt)?;
        cross_entropy(lab, dt)?;
        index(lab, dt)?;
        matmuls(lab, dt)?;
        attention(lab, dt)?;
        attention_softmax(lab, dt)?;
        moe(lab, dt)?;
        optim_and_chunked_loss(lab, dt)?;
        lora(lab, dt)?;
    }
    Ok(())
}

/// The fused LoRA primitives at M = 4096 tokens, r = 16, dropout 0.1 (mask recomputed in the
/// kernels), on the 7B projections' (in, out), then the whole forward, fused vs the composite it
/// replaced (cast, dropout mask, mul, two matmuls, scale, cast, add). Minimal bytes, `s` the base
/// element size, adapter operands f32: codes `M·in·s + M·r·4 + r·in·4`; expand-add
/// `2·M·out·s + M·r·4 + out·r·4`; grad_codes `M·out·s + 2·M·r·4 + 2·out·r·4` (the kernels read
/// g twice, so 50% is their ceiling here); grad_a and grad_x `M·in·s + M·r·4 + r·in·4`.
fn lora(lab: &mut Lab, dt: DType) -> Result<()> {
    let s = dt.size_in_bytes();
    let (m, r, p, seed, scale) = (4096usize, 16usize, 0.1, 7u64, 2.0);
    for (name, n_in, n_out) in [
        ("q/k/v/o", 4096usize, 4096usize),
        ("gate/up", 4096, 11008),
        ("down", 11008, 4096),
    ] {
        let x = randn(&[m, n_in], dt, 40)?;
        let y = randn(&[m, n_out], dt, 41)?;
        let g = randn(&[m, n_out], dt, 42)?;
        let a = randn(&[r, n_in], DType::F32, 43)?;
        let b = randn(&[n_out, r], DType::F32, 44)?;
        let z = randn(&[m, r], DType::F32, 45)?;
        let (xl, yl, al, bl, zl) = (
            lay(&[m, n_in]),
            lay(&[m, n_out]),
            lay(&[r, n_in]),
            lay(&[n_out, r]),
            lay(&[m, r]),
        );
        let small = m * r * 4;
        lab.run(
            mem(
                format!("lora_codes {name}"),
                dt,
                shape_str(&[m, n_in]),
                m * n_in * s + small + r * n_in * 4,
            ),
            || {
                lora::codes(
                    lora::Codes {
                        x: op(&x, &xl),
                        a: op(&a, &al),
                    },
                    p,
                    seed,
                )
                .map(drop)
            },
        )?;
        lab.run(
            mem(
                format!("lora_expand_add {name}"),
                dt,
                shape_str(&[m, n_out]),
                2 * m * n_out * s + small + n_out * r * 4,
            ),
            || {
                let o = lora::ExpandAdd {
                    y: op(&y, &yl),
                    z: op(&z, &zl),
                    b: op(&b, &bl),
                };
                lora::expand_add(o, scale).map(drop)
            },
        )?;
        lab.run(
            mem(
                format!("lora_grad_codes {name}"),
                dt,
                shape_str(&[m, n_out]),
                m * n_out * s + 2 * small + 2 * n_out * r * 4,
            ),
            || {
                let o = lora::GradCodes {
                    g: op(&g, &yl),
                    z: op(&z, &zl),
                    b: op(&b, &bl),
                };
                lora::grad_codes(o, scale).map(drop)
            },
        )?;
        lab.run(
            mem(
                format!("lora_grad_a {name}"),
                dt,
                shape_str(&[m, n_in]),
                m * n_in * s + small + r * n_in * 4,
            ),
            || {
                lora::grad_a(
                    lora::GradA {
                        x: op(&x, &xl),
                        dz: op(&z, &zl),
                    },
                    p,
                    seed,
                )
                .map(drop)
            },
        )?;
        lab.run(
            mem(
                format!("lora_grad_x {name}"),
                dt,
                shape_str(&[m, n_in]),
                m * n_in * s + small + r * n_in * 4,
            ),
            || {
                lora::grad_x(
                    lora::GradX {
                        dz: op(&z, &zl),
                        a: op(&a, &al),
                    },
                    p,
                    seed,
                    dt,
                )
                .map(drop)
            },
        )?;
        // The whole forward through the tensor ops (no tape: nothing tracks a gradient).
        let xt = Tensor::randn([m, n_in], 0.0, 1.0, 46, dt, GPU)?;
        let yt = Tensor::randn([m, n_out], 0.0, 1.0, 47, dt, GPU)?;
        let at = Tensor::randn([r, n_in], 0.0, 0.1, 48, DType::F32, GPU)?;
        let bt = Tensor::randn([n_out, r], 0.0, 0.1, 49, DType::F32, GPU)?;
        let fwd = m * n_in * s + 2 * m * n_out * s;
        lab.run(
            mem(
                format!("lora_add forward {name}"),
                dt,
                shape_str(&[m, n_in]),
                fwd,
            ),
            || yt.lora_add(&xt, &at, &bt, scale, Some((p, seed))).map(drop),
        )?;
        lab.run(
            mem(
                format!("lora composite forward {name}"),
                dt,
                shape_str(&[m, n_in]),
                fwd,
            ),
            || {
                let xa = xt.to_dtype(DType::F32)?.dropout(p, seed, true)?;
                let zz = xa.matmul(&at.t()?)?.affine(scale, 0.0)?;
                let d = zz.matmul(&bt.t()?)?.to_dtype(dt)?;
                yt.add(&d).map(drop)
            },
        )?;
    }
    Ok(())
}

/// The fused attention softmax and the fused softmax backward on `[b, h, t, t]` scores (64 Mi
/// elements, as the elementwise cases): causal, every key visible (comparable with the plain
/// softmax above), and causal with left padding.
fn attention_softmax(lab: &mut Lab, dt: DType) -> Result<()> {
    let s = dt.size_in_bytes();
    let (b, h, t) = (2, 8, 2048);
    let n = b * h * t * t;
    let sh = shape_str(&[b, h, t, t]);
    let l = lay(&[b, h, t, t]);
    let x = randn(&[b, h, t, t], dt, 29)?;
    let scale = 0.125;
    // Visible scores of a causal [b, h, t, t] softmax under a key mask (row i sees keys ≤ i).
    let visible = |mask: Option<&[u32]>| -> usize {
        (0..b)
            .map(|bi| {
                let mut seen = 0; // real keys among 0 ..= i
                (0..t)
                    .map(|i| {
                        seen += mask.map_or(1, |m| m[bi * t + i] as usize);
                        seen
                    })
                    .sum::<usize>()
            })
            .sum::<usize>()
            * h
    };
    let v = visible(None);
    lab.run(
        mem("causal_softmax (causal)", dt, sh.clone(), (v + n) * s),
        || x.causal_softmax(&l, scale, 0, None).map(drop),
    )?;
    lab.run(
        mem(
            "causal_softmax (every key visible)",
            dt,
            sh.clone(),
            2 * n * s,
        ),
        || x.causal_softmax(&l, scale, t, None).map(drop),
    )?;
    // Left padding: sequence 1 starts with t/4 padding tokens.
    let mv: Vec<u32> = (0..b * t)
        .map(|p| u32::from(p / t == 0 || p % t >= t / 4))
        .collect();
    let v = visible(Some(&mv));
    let mask = Storage::from_cpu(GPU, CpuStorage::U32(mv))?;
    let ml = lay(&[b, t]);
    lab.run(
        mem(
            "causal_softmax (causal, key mask)",
            dt,
            sh.clone(),
            (v + n) * s + b * t * 4,
        ),
        || x.causal_softmax(&l, scale, 0, Some((&mask, &ml))).map(drop),
    )?;
    let y = x.causal_softmax(&l, scale, 0, None)?;
    let g = randn(&[b, h, t, t], dt, 30)?;
    lab.run(mem("softmax_backward", dt, sh, 3 * n * s), || {
        y.softmax_backward(&l, &g, &l, scale).map(drop)
    })
}

/// The MoE routing and grouped-expert kernels (kernels/src/moe_route.cu and moe_grouped.cu) at
/// LLaMA-2-7B sizes: T = 16384 tokens, E = 8 experts, k = 2 (S = T·k = 32768 slots), H = 4096,
/// I = 11008, LoRA rank r = 16; `s` the element size, weights and scales of permute/combine in
/// f32 (4 bytes). Minimal bytes (FLOPs where counted):
/// - route_topk: logits in, probs out `2·T·E·s`, ids and weights out `T·k·(4 + s)`;
///   its backward: weights, gw in `2·T·k·s`, ids `T·k·4`, dlogits out `T·E·s`;
/// - group (count, scan, scatter): ids read twice and perm written `3·S·4` (the per-tile counts
///   are `(E+1)·S/256·4`, negligible);
/// - permute: `T·H·s` in (each token row, read k times from L2 at best), `S·H·s` out, `S·4` perm;
/// - combine: `S·H·s` in, `T·H·s` out, `S·4` inverse, `T·k·4` weights; combine_dw (weight
///   gradient): `S·H·s + T·H·s` in, `S·4` out;
/// - grouped_matmul `[M, K] · w[e]ᵀ → [M, N]`: `(M·K + E·N·K + M·N)·s`, `2·M·N·K` FLOPs — LoRA A
///   (K = H, N = r) and B (K = r, N = I), and the input gradients (the same kernel with w read
///   transposed: A's `[S, r] → [S, H]`, B's `[S, I] → [S, r]`); all memory-bound at r = 16
///   (≤ 16 FLOPs per byte in bf16), so they are rated against the copy ceiling;
/// - grouped_matmul_dw `dw[e] = dy[seg]ᵀ x[seg]`: `(M·N + M·K + E·N·K)·s`, `2·M·N·K` FLOPs.
fn moe(lab: &mut Lab, dt: DType) -> Result<()> {
    let s = dt.size_in_bytes();
    let (t, e, k) = (16384usize, 8usize, 2usize);
    let m = t * k;

    let logits = randn(&[t, e], dt, 40)?;
    let ll = lay(&[t, e]);
    lab.run(
        mem(
            format!("moe_route_topk E={e} k={k}"),
            dt,
            shape_str(&[t, e]),
            2 * t * e * s + t * k * (4 + s),
        ),
        || route_topk(&logits, &ll, k).map(drop),
    )?;
    let (_, rids, rw) = route_topk(&logits, &ll, k)?;
    let gw = randn(&[t, k], dt, 41)?;
    let kl = lay(&[t, k]);
    lab.run(
        mem(
            "moe_route_topk_backward",
            dt,
            shape_str(&[t, k]),
            2 * t * k * s + t * k * 4 + t * e * s,
        ),
        || {
            let o = route::RouteTopkBackward {
                w: op(&rw, &kl),
                ids: op(&rids, &kl),
                gw: op(&gw, &kl),
            };
            route::route_topk_backward(o, e).map(drop)
        },
    )?;
    lab.run(
        mem("moe_group", DType::U32, shape_str(&[t, k]), 3 * m * 4),
        || group(&rids, &kl, e).map(drop),
    )?;
    let (perm, off) = group(&rids, &kl, e)?;
    moe_permute_combine(lab, dt, &perm)?;
    moe_grouped_matmuls(lab, dt, &off)
}

/// The permute and combine rows of [`moe`], over the slot order `perm` `[S]`.
fn moe_permute_combine(lab: &mut Lab, dt: DType, perm: &Storage) -> Result<()> {
    let s = dt.size_in_bytes();
    let (t, k, h) = (16384usize, 2usize, H);
    let m = t * k;
    let acc = DType::F32;
    let (pl, kl) = (lay(&[m]), lay(&[t, k]));
    let inv = grouped::invert_perm(grouped::InvertPerm {
        perm: op(perm, &pl),
    })?;

    let x = randn(&[t, h], dt, 42)?;
    lab.run(
        mem(
            "moe_permute",
            dt,
            format!("{} -> {}", shape_str(&[t, h]), shape_str(&[m, h])),
            t * h * s + m * h * s + m * 4,
        ),
        || {
            let xl = lay(&[t, h]);
            let o = grouped::Permute {
                x: op(&x, &xl),
                perm: op(perm, &pl),
                scale: None,
            };
            grouped::permute(o, k).map(drop)
        },
    )?;
    drop(x);
    let y = randn(&[m, h], dt, 43)?;
    let w = randn(&[t, k], acc, 44)?;
    lab.run(
        mem(
            "moe_combine",
            dt,
            format!("{} -> {}", shape_str(&[m, h]), shape_str(&[t, h])),
            m * h * s + t * h * s + m * 4 + t * k * 4,
        ),
        || {
            let yl = lay(&[m, h]);
            let o = grouped::Combine {
                y: op(&y, &yl),
                inv: op(&inv, &pl),
                w: op(&w, &kl),
            };
            grouped::combine(o).map(drop)
        },
    )?;
    let g = randn(&[t, h], dt, 45)?;
    lab.run(
        mem(
            "moe_combine_dw",
            dt,
            shape_str(&[m, h]),
            m * h * s + t * h * s + m * 4,
        ),
        || {
            let (yl, gl) = (lay(&[m, h]), lay(&[t, h]));
            let o = grouped::CombineDw {
                y: op(&y, &yl),
                inv: op(&inv, &pl),
                g: op(&g, &gl),
            };
            grouped::combine_dw(o, k).map(drop)
        },
    )?;
    drop((g, w));
    Ok(())
}

/// The grouped matmul rows of [`moe`], over the expert segments `off` `[E+1]`.
fn moe_grouped_matmuls(lab: &mut Lab, dt: DType, off: &Storage) -> Result<()> {
    let s = dt.size_in_bytes();
    let (t, e, k, h, i, r) = (16384usize, 8usize, 2usize, H, 11008usize, 16usize);
    let m = t * k;
    let ol = lay(&[e + 1]);
    // Grouped matmuls over the sorted slots (y stands for x_sorted [S, H]).
    let y = randn(&[m, h], dt, 43)?;
    let gmm = |op: &str, (mm, kk, nn): (usize, usize, usize)| Case {
        op: op.into(),
        dtype: dt,
        shape: format!("[{mm}, {kk}] x {e}·[{kk}, {nn}]"),
        bytes: ((mm * kk + e * nn * kk + mm * nn) * s) as f64,
        flops: 2.0 * (mm * nn * kk) as f64,
        bound: Bound::Memory,
    };
    let a = randn(&[e, r, h], dt, 46)?;
    let b = randn(&[e, i, r], dt, 47)?;
    let z = randn(&[m, r], dt, 48)?;
    let (al, bl, zl, yl) = (lay(&[e, r, h]), lay(&[e, i, r]), lay(&[m, r]), lay(&[m, h]));
    lab.run(gmm("grouped_matmul LoRA A (x·Aᵀ)", (m, h, r)), || {
        gmm_run((&y, &yl), (&a, &al), (off, &ol), false)
    })?;
    lab.run(gmm("grouped_matmul LoRA B (z·Bᵀ)", (m, r, i)), || {
        gmm_run((&z, &zl), (&b, &bl), (off, &ol), false)
    })?;
    lab.run(
        gmm("grouped_matmul A input grad (dz·A)", (m, r, h)),
        || gmm_run((&z, &zl), (&a, &al), (off, &ol), true),
    )?;
    drop(y);
    let dy = randn(&[m, i], dt, 49)?;
    let dyl = lay(&[m, i]);
    lab.run(
        gmm("grouped_matmul B input grad (dy·B)", (m, i, r)),
        || gmm_run((&dy, &dyl), (&b, &bl), (off, &ol), true),
    )?;
    lab.run(gmm("grouped_matmul_dw B (dyᵀ·z)", (m, i, r)), || {
        gmm_dw_run((&dy, &dyl), (&z, &zl), (off, &ol), e)
    })?;
    drop(dy);
    let x = randn(&[m, h], dt, 50)?;
    lab.run(gmm("grouped_matmul_dw A (dzᵀ·x)", (m, r, h)), || {
        gmm_dw_run((&z, &zl), (&x, &yl), (off, &ol), e)
    })?;
    Ok(())
}

/// `moe_route_topk` on the logits `[T, E]`: `(probs, ids, weights)`.
fn route_topk(logits: &Storage, l: &Layout, k: usize) -> Result<(Storage, Storage, Storage)> {
    route::route_topk(
        route::RouteTopk {
            logits: op(logits, l),
        },
        k,
    )
}

/// `moe_group` of the ids `[T, k]`: `(perm, offsets)`.
fn group(ids: &Storage, l: &Layout, e: usize) -> Result<(Storage, Storage)> {
    grouped::group(grouped::Group { ids: op(ids, l) }, e)
}

/// One `grouped_matmul` of `x` with `w` over the segments `off`, the result dropped.
fn gmm_run(
    x: (&Storage, &Layout),
    w: (&Storage, &Layout),
    off: (&Storage, &Layout),
    trans_w: bool,
) -> Result<()> {
    let o = grouped::GroupedMatmul {
        x: op(x.0, x.1),
        w: op(w.0, w.1),
        offsets: op(off.0, off.1),
    };
    grouped::grouped_matmul(o, trans_w).map(drop)
}

/// One `grouped_matmul_dw` of `dy` and `x` over the segments `off`, the result dropped.
fn gmm_dw_run(
    dy: (&Storage, &Layout),
    x: (&Storage, &Layout),
    off: (&Storage, &Layout),
    e: usize,
) -> Result<()> {
    let o = grouped::GroupedMatmulDw {
        dy: op(dy.0, dy.1),
        x: op(x.0, x.1),
        offsets: op(off.0, off.1),
    };
    grouped::grouped_matmul_dw(o, e).map(drop)
}

/// The fused multi-tensor AdamW step and the vocabulary-chunk cross-entropy.
///
/// Bytes (`s` the parameter or logits element size, moments f32):
/// - adamw_step_multi: per element p read and written, g read, m and v read and written:
///   `3s + 4·4` (28 B per f32 element, 22 per bf16); the tensors are MixLoRA-7B-like adapter
///   pieces: 256 × [16, 4096] LoRA factors and 32 × [8, 4096] routers (17.8 M elements), all in
///   one launch;
/// - cross_entropy_chunk_update `[N, C]`: the chunk's logits once, targets, the `[N, 3]` f32
///   state read and written: `N·C·s + 4N + 24N`;
/// - cross_entropy_chunk_backward `[N, C]`: logits read, dlogits written, targets, lse and row
///   grads (the launcher's f32 copies of lse and g are in the time): `2·N·C·s + 12N`;
/// - linear_cross_entropy forward + backward at SmolLM2's head (N = 4096 tokens, H = 576,
///   V = 49152, chunks of 8192, weight frozen) against `matmul` + `cross_entropy_rows`: GEMM
///   FLOPs `6·N·H·V` chunked (the backward recomputes the logits) and `4·N·H·V` unchunked; the
///   point is the allocator's peak (the `[N, V]` logits and their gradient vs one `[N, C]` chunk).
fn optim_and_chunked_loss(lab: &mut Lab, dt: DType) -> Result<()> {
    use engine::fused::linear_cross_entropy::primitives as lce;
    use engine::fused::OperandMut;
    use engine::{adamw_step, AdamWHyper};
    let s = dt.size_in_bytes();
    // AdamW over every adapter tensor of a MixLoRA-7B-sized model, one launch.
    let mut shapes = vec![[16usize, 4096usize]; 256];
    shapes.extend(vec![[8, 4096]; 32]);
    let mut ps = Vec::new();
    for (i, sh) in shapes.iter().enumerate() {
        let p = Tensor::randn(sh.to_vec(), 0.0, 0.02, 40 + i as u64, dt, GPU)?.to_var()?;
        let g = Tensor::randn(sh.to_vec(), 0.0, 1e-3, 900 + i as u64, dt, GPU)?;
        p.mul(&g)?.sum_all()?.backward()?;
        ps.push(p);
    }
    let moments = |ps: &[Tensor]| -> Result<Vec<Tensor>> {
        ps.iter()
            .map(|p| Tensor::zeros(p.shape().clone(), dt.accumulation(), GPU))
            .collect()
    };
    let (ms, vs) = (moments(&ps)?, moments(&ps)?);
    let n: usize = ps.iter().map(|p| p.elem_count()).sum();
    let h = AdamWHyper {
        lr: 2e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        grad_scale: 1.0,
        step: 1,
    };
    lab.run(
        mem(
            "adamw_step_multi (288 tensors)",
            dt,
            format!("{n} elements"),
            n * (3 * s + 16),
        ),
        || adamw_step(&ps, &ms, &vs, &h),
    )?;
    drop((ps, ms, vs));

    // One vocabulary chunk of SmolLM2-sized logits.
    let (r, c) = (4096, 8192);
    let sh = shape_str(&[r, c]);
    let x = randn(&[r, c], dt, 50)?;
    let l = lay(&[r, c]);
    let t = ids(r, 49152, 51)?;
    let tl = lay(&[r]);
    let ignore = engine::IGNORE_INDEX;
    let acc = dt.accumulation();
    let init: Vec<f64> = (0..r).flat_map(|_| [f64::NEG_INFINITY, 0.0, 0.0]).collect();
    let mut st = Storage::upload_f64(GPU, &init, acc)?;
    let sl = lay(&[r, 3]);
    lab.run(
        mem(
            "cross_entropy_chunk_update",
            dt,
            sh.clone(),
            r * c * s + 28 * r,
        ),
        || {
            let o = lce::ChunkUpdate {
                x: Operand::new(&x, &l),
                targets: Operand::new(&t, &tl),
                state: OperandMut { s: &mut st, l: &sl },
            };
            lce::chunk_update(o, 8192, 49152, ignore)
        },
    )?;
    let lse = Storage::upload_f64(GPU, &vec![12.0; r], acc)?;
    let g = randn(&[r], acc, 52)?;
    lab.run(
        mem(
            "cross_entropy_chunk_backward",
            dt,
            sh,
            2 * r * c * s + 12 * r,
        ),
        || {
            let o = lce::ChunkBackward {
                x: Operand::new(&x, &l),
                targets: Operand::new(&t, &tl),
                lse: Operand::new(&lse, &tl),
                grad_rows: Operand::new(&g, &tl),
            };
            lce::chunk_backward(o, 8192, ignore).map(drop)
        },
    )?;
    drop((x, st, lse, g));

    // The LM-head loss, chunked and not, forward + backward (the weight frozen, as in training).
    let (n, hd, v) = (4096, 576, 49152);
    let hid = Tensor::randn([n, hd], 0.0, 1.0, 53, dt, GPU)?.to_var()?;
    let w = Tensor::randn([v, hd], 0.0, 0.05, 54, dt, GPU)?;
    let tt = Tensor::from_vec(
        (0..n as u64)
            .map(|i| (engine::rng::hash(55, i) % v as u64) as u32)
            .collect::<Vec<u32>>(),
        n,
        GPU,
    )?;
    let gemm_case = |op: &str, flops: usize| Case {
        op: op.into(),
        dtype: dt,
        shape: format!("N={n} H={hd} V={v}"),
        bytes: ((n * hd + v * hd) * s) as f64,
        flops: flops as f64,
        bound: Bound::Gemm(dt),
    };
    lab.run(
        gemm_case("linear_cross_entropy fwd+bwd chunk 8192", 6 * n * hd * v),
        || {
            hid.zero_grad();
            hid.linear_cross_entropy_rows(&w, &tt, ignore, 8192)?
                .sum_all()?
                .backward()
        },
    )?;
    lab.run(
        gemm_case(
            "matmul + cross_entropy fwd+bwd (full logits)",
            4 * n * hd * v,
        ),
        || {
            hid.zero_grad();
            hid.matmul(&w.t()?)?
                .cross_entropy_rows(&tt, ignore)?
                .sum_all()?
                .backward()
        },
    )
}

/// A primitive's operand: a storage and its view.
fn op<'a>(s: &'a Storage, l: &'a Layout) -> Operand<'a, Storage> {
    Operand::new(s, l)
}
