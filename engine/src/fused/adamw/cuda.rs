//! The fused multi-tensor AdamW launcher: one kernel launch for every parameter.
//!
//! The kernel reads a table in device memory: one 48-byte row per tensor (addresses of the
//! parameter, gradient and moment views, length, dtype) followed by one 8-byte entry per chunk of
//! 4096 elements (tensor index, chunk index). The table is rebuilt on the host each step (a few
//! bytes per tensor) and uploaded only when it differs from the last one uploaded to that GPU: the
//! parameters and moments never move, and the caching allocator usually hands the gradients the
//! same blocks every step, so in steady state nothing is uploaded.

use std::sync::Mutex;

use cudarc::driver::LaunchConfig;
use kernels::ADAMW;

use super::primitives::AdamWGroup;
use super::AdamWHyper;
use crate::backend::cpu::CpuStorage;
use crate::backend::cuda::launch::launch;
use crate::backend::cuda::{Contig, CudaDevice, CudaStorage};
use crate::backend::BackendStorage;
use crate::fused::Operand;
use crate::{DType, Error, Layout, Result};

/// Elements per chunk (`ADAMW_CHUNK` in adamw.cu).
const CHUNK: usize = 4096;
/// u32 words per tensor row (`AdamWTensor`, 48 bytes).
const ROW_WORDS: usize = 12;
const THREADS: u32 = 256;
/// Enough blocks to fill an H200 (132 SMs) several times over; blocks stride over the chunks.
const MAX_BLOCKS: usize = 132 * 16;

/// The last table uploaded: (GPU ordinal, its words, the device copy).
type Cached = Option<(usize, Vec<u32>, CudaStorage)>;
static TABLE: Mutex<Cached> = Mutex::new(None);

fn push_u64(w: &mut Vec<u32>, x: u64) {
    w.push(x as u32);
    w.push((x >> 32) as u32);
}

/// The `dtype` code of a table row (`0 f32, 1 bf16, 2 f64` in adamw.cu).
fn dtype_code(op: &'static str, dtype: DType) -> Result<u32> {
    match dtype {
        DType::F32 => Ok(0),
        DType::BF16 => Ok(1),
        DType::F64 => Ok(2),
        DType::U32 => Err(Error::UnsupportedDType { op, dtype }),
    }
}

/// Appends to the chunk list one `(tensor index, chunk index)` entry per `CHUNK` elements of
/// tensor `ti`, `len` elements long.
fn push_chunks(op: &'static str, chunks: &mut Vec<u32>, ti: usize, len: usize) -> Result<()> {
    let ti = u32::try_from(ti).map_err(|_| Error::invalid(op, "too many tensors"))?;
    for c in 0..len.div_ceil(CHUNK) {
        let c = u32::try_from(c).map_err(|_| Error::invalid(op, "tensor too large"))?;
        chunks.extend([ti, c]);
    }
    Ok(())
}

/// How a table kernel is launched over its chunk list.
struct ChunkLaunch {
    n_chunks: usize,
    /// `n_chunks` as the kernel's argument.
    n_chunks32: u32,
    /// Byte offset of the chunk list in the table.
    list_offset: u64,
    /// One block of `THREADS` per chunk, at most `MAX_BLOCKS` (the blocks stride over the rest).
    cfg: LaunchConfig,
}

/// Appends the chunk list to the tensor rows in `words` and says how to launch over it; `None`
/// when there is no chunk, so nothing to launch. The rows are a whole number of 8-byte words
/// (48 or 24 bytes each), so the chunk list stays 8-byte aligned.
fn append_chunks(
    op: &'static str,
    words: &mut Vec<u32>,
    chunks: &[u32],
) -> Result<Option<ChunkLaunch>> {
    let n_chunks = chunks.len() / 2;
    if n_chunks == 0 {
        return Ok(None);
    }
    let n_chunks32 = u32::try_from(n_chunks).map_err(|_| Error::invalid(op, "too many chunks"))?;
    let rows_bytes = words.len() * 4;
    words.extend_from_slice(chunks);
    Ok(Some(ChunkLaunch {
        n_chunks,
        n_chunks32,
        list_offset: rows_bytes as u64,
        cfg: LaunchConfig {
            grid_dim: (n_chunks.min(MAX_BLOCKS) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        },
    }))
}

/// A table of rows followed by its chunk list ([`append_chunks`]), uploaded: the buffer (held
/// until the launch is queued), the addresses of its rows and of its chunk list, and the launch.
struct Table {
    _buffer: CudaStorage,
    rows: u64,
    chunk_list: u64,
    launch: ChunkLaunch,
}

/// Uploads the rows `words` with `chunks` appended (a fresh copy: a recorded graph keeps it);
/// `None` when there is no chunk, so nothing to launch.
fn upload_table(
    op: &'static str,
    dev: &CudaDevice,
    mut words: Vec<u32>,
    chunks: &[u32],
) -> Result<Option<Table>> {
    let Some(launch) = append_chunks(op, &mut words, chunks)? else {
        return Ok(None);
    };
    let buffer = CudaStorage::from_cpu(dev, &CpuStorage::U32(words))?;
    let rows = buffer.ptr();
    Ok(Some(Table {
        chunk_list: rows + launch.list_offset,
        rows,
        launch,
        _buffer: buffer,
    }))
}

/// `scale_at`: `None`, or the address of an f64 in device memory that replaces `h.grad_scale` (a
/// factor that [`clip_factor`] wrote), read by the kernel; when it is not finite the launch
/// changes nothing.
pub(super) fn adamw_step(
    groups: &mut [AdamWGroup<'_, CudaStorage>],
    h: &AdamWHyper,
    scale_at: Option<u64>,
) -> Result<()> {
    const OP: &str = "adamw_step";
    let Some(first) = groups.first() else {
        return Ok(());
    };
    let dev = first.param.dev.clone();
    let n_slots: usize = groups.iter().map(|g| g.slots.len()).sum();
    let mut words: Vec<u32> = Vec::with_capacity(n_slots * ROW_WORDS);
    let mut chunks: Vec<u32> = Vec::new();
    let mut i = 0; // the table row
    for g in groups.iter() {
        let param = &*g.param;
        let pd = param.dtype;
        let code = dtype_code(OP, pd)?;
        let md = pd.accumulation();
        dev_check(OP, &dev, param)?;
        for s in &g.slots {
            for (buf, want) in [(&*s.exp_avg, md), (&*s.exp_avg_sq, md), (s.grad, pd)] {
                if buf.dtype != want {
                    return Err(Error::DTypeMismatch {
                        op: OP,
                        lhs: want,
                        rhs: buf.dtype,
                    });
                }
                dev_check(OP, &dev, buf)?;
            }
            for (buf, off) in [
                (param, s.param_offset),
                (&*s.exp_avg, s.exp_avg_offset),
                (&*s.exp_avg_sq, s.exp_avg_sq_offset),
                (s.grad, s.grad_offset),
            ] {
                if off.checked_add(s.len).is_none_or(|end| end > buf.len) {
                    return Err(Error::invalid(OP, "view exceeds its buffer"));
                }
            }
            for (buf, off) in [
                (param, s.param_offset),
                (s.grad, s.grad_offset),
                (&*s.exp_avg, s.exp_avg_offset),
                (&*s.exp_avg_sq, s.exp_avg_sq_offset),
            ] {
                push_u64(&mut words, buf.ptr_at(off));
            }
            push_u64(&mut words, s.len as u64);
            words.extend([code, 0]);
            push_chunks(OP, &mut chunks, i, s.len)?;
            i += 1;
        }
    }
    let Some(cl) = append_chunks(OP, &mut words, &chunks)? else {
        return Ok(());
    };
    let mut cache = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    // Without the allocator's cache (MIXLORA_CUDA_NO_CACHE=1, as under the memory checker) the
    // table is not kept either: uploaded per step and freed after, so nothing outlives the
    // process's tensors.
    let mut local = None;
    if !dev.caches_buffers() {
        local = Some(CudaStorage::from_cpu(&dev, &CpuStorage::U32(words))?);
    } else {
        let fresh = !matches!(&*cache, Some((o, w, _)) if *o == dev.ordinal() && *w == words);
        if fresh {
            let up = CudaStorage::from_cpu(&dev, &CpuStorage::U32(words.clone()))?;
            *cache = Some((dev.ordinal(), words, up));
        }
    }
    let table = match (&local, &*cache) {
        (Some(t), _) | (None, Some((_, _, t))) => t,
        (None, None) => return Err(Error::invalid(OP, "the tensor table was not uploaded")),
    };
    let tensors = table.ptr();
    let (chunk_list, n_chunks32) = (tensors + cl.list_offset, cl.n_chunks32);
    let k = h.coefficients();
    let (scale, b1, omb1, b2, omb2) = (k.scale, k.b1, k.one_minus_b1, k.b2, k.one_minus_b2);
    let scale_ptr = scale_at.unwrap_or(0);
    let (inv_bc2, eps, decay, step_size) = (k.inv_bc2, k.eps, k.decay, k.step_size);
    let name = "adamw_step_multi";
    // SAFETY: the table holds one 48-byte row per slot (addresses of views checked above to lie
    // inside their buffers, with the dtypes the row's code says) followed by `n_chunks` entries
    // whose tensor index is a row and whose chunk starts below that tensor's length. Rows whose
    // parameters share a buffer write disjoint element ranges (checked by the caller,
    // `engine::adamw_step`), so no element is written by two threads. The table stays alive in
    // `TABLE` or `local` until this returns (a freed buffer is only reused by work queued after
    // this kernel on the same stream; without the cache, freeing waits for it), and the groups
    // hold the write locks of every written buffer until this returns; later work on the single
    // stream is ordered after the kernel. `scale_ptr` is 0 or the address of an f64 that the
    // caller's tensor keeps alive (stream-ordered like the table).
    unsafe {
        launch!(
            &dev,
            OP,
            ADAMW,
            name,
            cl.cfg,
            [
                tensors, chunk_list, n_chunks32, scale, scale_ptr, b1, omb1, b2, omb2, inv_bc2,
                eps, decay, step_size
            ]
        )
    }
}

/// u32 words per row of the sum-of-squares table (`SqTensor`, 24 bytes).
const SQ_ROW_WORDS: usize = 6;

/// `Σ t[i]²` over every tensor in one launch: a table of (address, length, dtype) rows and the
/// list of 4096-element chunks is uploaded, the kernel writes one f64 partial sum per chunk, and
/// the partials are added in order on the host (one download: a few KiB per million elements).
pub(super) fn sum_squares_multi(args: &[Operand<'_, CudaStorage>]) -> Result<f64> {
    const OP: &str = "sum_squares_multi";
    let Some((partials, n)) = sum_squares_partials(args)? else {
        return Ok(0.0);
    };
    let sums = match partials.to_cpu(&Layout::contiguous([n]))? {
        CpuStorage::F64(v) => v,
        _ => return Err(Error::invalid(OP, "partial sums are not f64")),
    };
    Ok(sums.iter().sum())
}

/// `[norm, factor]` (f64, on the device) of [`super::clip_norm_factor`] for the tensors `args`
/// on `dev`: the partial sums of [`sum_squares_multi`], then one thread adds them in order and
/// computes the factor (`clip_factor_f64`). Nothing is read back.
pub(super) fn clip_factor(
    dev: &CudaDevice,
    args: &[Operand<'_, CudaStorage>],
    max_norm: f64,
) -> Result<CudaStorage> {
    const OP: &str = "clip_norm_factor";
    let out = CudaStorage::alloc(dev, OP, 2, DType::F64)?;
    let (partials, n) = match sum_squares_partials(args)? {
        Some(p) => p,
        None => (CudaStorage::from_cpu(dev, &CpuStorage::F64(vec![0.0]))?, 1),
    };
    let n32 = u32::try_from(n).map_err(|_| Error::invalid(OP, "too many chunks"))?;
    let (src, dst) = (partials.ptr(), out.ptr());
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `partials` holds `n` f64 (written by the kernel queued before, or zeroed), `out`
    // two; one thread reads the first and writes the second. Both outlive the launch in stream
    // order (a freed block is reused only by work queued after it).
    unsafe {
        launch!(
            dev,
            OP,
            ADAMW,
            "clip_factor_f64",
            cfg,
            [src, n32, max_norm, dst]
        )
    }?;
    Ok(out)
}

/// Queues the partial sums of squares of `args` (one f64 per 4096-element chunk, in order);
/// `None` when there is no element.
fn sum_squares_partials(args: &[Operand<'_, CudaStorage>]) -> Result<Option<(CudaStorage, usize)>> {
    const OP: &str = "sum_squares_multi";
    let Some(&Operand { s: first, .. }) = args.first() else {
        return Ok(None);
    };
    let dev = first.dev.clone();
    let mut words: Vec<u32> = Vec::with_capacity(args.len() * SQ_ROW_WORDS);
    let mut chunks: Vec<u32> = Vec::new();
    let mut hold: Vec<Contig> = Vec::new();
    for (i, &Operand { s, l }) in args.iter().enumerate() {
        dev_check(OP, &dev, s)?;
        let code = dtype_code(OP, s.dtype)?;
        let c = s.contiguous(OP, l)?; // checks the view against its buffer
        let len = l.elem_count();
        push_u64(&mut words, c.ptr);
        push_u64(&mut words, len as u64);
        words.extend([code, 0]);
        hold.push(c);
        push_chunks(OP, &mut chunks, i, len)?;
    }
    let Some(table) = upload_table(OP, &dev, words, &chunks)? else {
        return Ok(None);
    };
    let cl = &table.launch;
    let partials = CudaStorage::alloc(&dev, OP, cl.n_chunks, DType::F64)?;
    let (tensors, chunk_list, out) = (table.rows, table.chunk_list, partials.ptr());
    let (n_chunks32, name) = (cl.n_chunks32, "sum_squares_multi");
    // SAFETY: the table holds one 24-byte row per tensor (the address of a contiguous run of
    // `len` elements of the row's dtype: the view itself, checked to lie inside its buffer, or a
    // copy held in `hold`) followed by `n_chunks` entries whose tensor index is a row and whose
    // chunk starts below that tensor's length; `partials` holds one f64 per chunk, each written
    // by the block of its chunk; 256 threads per block (the block reduction needs a multiple of
    // 32). `table` and `hold` may go once the kernel is queued: a freed block is reused only by
    // work queued after it on the one stream.
    unsafe {
        launch!(
            &dev,
            OP,
            ADAMW,
            name,
            cl.cfg,
            [tensors, chunk_list, n_chunks32, out]
        )
    }?;
    drop(hold);
    Ok(Some((partials, cl.n_chunks)))
}

/// u32 words per row of the add table (`AddTensor`, 32 bytes).
const ADD_ROW_WORDS: usize = 8;

/// `dst[start + offset ..] += src` for every part in one launch: a table of (destination
/// address, source address, length, dtype) rows and the list of 4096-element chunks is uploaded
/// (inside a capture, recorded with the graph), and the kernel adds chunk by chunk.
pub(super) fn add_many_into(
    dst: &mut CudaStorage,
    start: usize,
    parts: &[(usize, Operand<'_, CudaStorage>)],
) -> Result<()> {
    const OP: &str = "add_many_into";
    let dev = dst.dev.clone();
    let code = dtype_code(OP, dst.dtype)?;
    let es = dst.dtype.size_in_bytes();
    let mut words: Vec<u32> = Vec::with_capacity(parts.len() * ADD_ROW_WORDS);
    let mut chunks: Vec<u32> = Vec::new();
    let mut hold: Vec<Contig> = Vec::new();
    for (i, &(offset, Operand { s, l })) in parts.iter().enumerate() {
        dev_check(OP, &dev, s)?;
        if s.dtype != dst.dtype {
            return Err(Error::DTypeMismatch {
                op: OP,
                lhs: dst.dtype,
                rhs: s.dtype,
            });
        }
        let len = l.elem_count();
        if start + offset + len > dst.len {
            return Err(Error::invalid(
                OP,
                "a part runs past the destination's buffer",
            ));
        }
        let c = s.contiguous(OP, l)?; // checks the view against its buffer
        push_u64(&mut words, dst.ptr() + ((start + offset) * es) as u64);
        push_u64(&mut words, c.ptr);
        push_u64(&mut words, len as u64);
        words.extend([code, 0]);
        hold.push(c);
        push_chunks(OP, &mut chunks, i, len)?;
    }
    let Some(table) = upload_table(OP, &dev, words, &chunks)? else {
        return Ok(());
    };
    let (tensors, chunk_list, cl) = (table.rows, table.chunk_list, &table.launch);
    let (n_chunks32, name) = (cl.n_chunks32, "add_into_multi");
    // SAFETY: the table holds one 32-byte row per part (the destination run, inside `dst`'s
    // buffer as checked above, and the source: the view itself, checked to lie inside its
    // buffer, or a copy held in `hold`; both `len` elements of the row's dtype) followed by
    // `n_chunks` entries whose tensor index is a row and whose chunk starts below that row's
    // length. The destination runs never overlap (the caller checked), so every element is
    // written by one thread. `table` and `hold` are released after the launch is queued: the
    // caching allocator hands their blocks out again only to work queued after it on the stream.
    unsafe {
        launch!(
            &dev,
            OP,
            ADAMW,
            name,
            cl.cfg,
            [tensors, chunk_list, n_chunks32]
        )
    }?;
    drop((table, hold));
    Ok(())
}

fn dev_check(op: &'static str, dev: &CudaDevice, s: &CudaStorage) -> Result<()> {
    if s.dev.ordinal() != dev.ordinal() {
        return Err(Error::DeviceMismatch {
            op,
            lhs: dev.device(),
            rhs: s.device(),
        });
    }
    Ok(())
}
