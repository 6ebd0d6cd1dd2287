//! [`NcclComm`]: the ranks of a run over NCCL (cudarc's bindings; libnccl is loaded at run time,
//! so the engine builds and links without it). Each collective is enqueued on the device's own
//! stream, after the work that produced its input, and then waited for with a deadline: the host
//! polls the stream and NCCL's asynchronous error, and aborts the communicator when the
//! deadline passes (a peer died or hangs), so that no collective blocks forever.

use std::ffi::c_void;
use std::time::{Duration, Instant};

use cudarc::driver::sys as cu;
use cudarc::nccl::{result, sys};

use super::Communicator;
use crate::backend::cuda::CudaDevice;
use crate::backend::cuda::CudaStorage;
use crate::storage::Storage;
use crate::{DType, Device, Error, Result, Tensor};

/// Bytes of an NCCL unique id (`ncclUniqueId`): what rank 0 makes and every rank needs.
pub const NCCL_UNIQUE_ID_BYTES: usize = 128;

/// Errors (instead of cudarc's panic at the first call) when libnccl cannot be loaded.
fn check_loaded(rank: usize, world: usize) -> Result<()> {
    // SAFETY: only tries to open the library (cudarc caches the handle).
    if unsafe { sys::is_culib_present() } {
        return Ok(());
    }
    Err(Error::Collective {
        op: "load libnccl",
        rank,
        world,
        msg: "NCCL not found: cudarc opens `libnccl.so` (not `libnccl.so.2`) from \
              LD_LIBRARY_PATH; link libnccl.so -> libnccl.so.2 in a folder on it"
            .into(),
    })
}

/// A new NCCL unique id, made by rank 0 of a world of `world` ranks and handed to every rank
/// before [`NcclComm::new`].
pub fn nccl_unique_id(world: usize) -> Result<[u8; NCCL_UNIQUE_ID_BYTES]> {
    check_loaded(0, world)?;
    let id = result::get_uniqueid().map_err(|e| Error::Collective {
        op: "ncclGetUniqueId",
        rank: 0,
        world,
        msg: format!("{e:?} (is libnccl.so.2 on LD_LIBRARY_PATH?)"),
    })?;
    Ok(id.internal.map(|c| c as u8))
}

/// The raw communicator, movable to the thread that initialises it.
struct RawComm(sys::ncclComm_t);
// SAFETY: an NCCL communicator may be used from any thread, one at a time; `NcclComm` uses it
// from the thread that owns it only.
unsafe impl Send for RawComm {}

/// One rank of an NCCL world, bound to one GPU.
pub struct NcclComm {
    comm: RawComm,
    dev: CudaDevice,
    rank: usize,
    world: usize,
    timeout: Duration,
}

impl NcclComm {
    /// Joins the world `id` as `rank` of `world` on GPU `ordinal`. Fails (instead of waiting
    /// forever) when the other ranks have not all joined within `timeout`.
    pub fn new(
        ordinal: usize,
        rank: usize,
        world: usize,
        id: &[u8; NCCL_UNIQUE_ID_BYTES],
        timeout: Duration,
    ) -> Result<NcclComm> {
        let fail = |msg: String| Error::Collective {
            op: "ncclCommInitRank",
            rank,
            world,
            msg,
        };
        check_loaded(rank, world)?;
        let dev = CudaDevice::get(ordinal)?;
        let unique = sys::ncclUniqueId {
            internal: id.map(|b| b as std::ffi::c_char),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let d = dev.clone();
        // ncclCommInitRank blocks until every rank joined: on a helper thread, so the wait has a
        // deadline. A thread left blocked after a timeout dies with the process.
        std::thread::spawn(move || {
            let r = d.bind("ncclCommInitRank").and_then(|()| {
                let mut comm = std::mem::MaybeUninit::uninit();
                // SAFETY: `comm` is written by NCCL on success; the world and rank fit an i32
                // (checked by the caller's launcher: at most a few thousand ranks).
                unsafe {
                    result::comm_init_rank(comm.as_mut_ptr(), world as i32, unique, rank as i32)
                        .map_err(|e| Error::Collective {
                            op: "ncclCommInitRank",
                            rank,
                            world,
                            msg: format!("{e:?}"),
                        })?;
                    Ok(RawComm(comm.assume_init()))
                }
            });
            let _ = tx.send(r);
        });
        let comm = rx.recv_timeout(timeout).map_err(|_| {
            fail(format!(
                "not every rank joined within {:.0} s",
                timeout.as_secs_f64()
            ))
        })??;
        Ok(NcclComm {
            comm,
            dev,
            rank,
            world,
            timeout,
        })
    }

    fn fail(&self, op: &'static str, msg: String) -> Error {
        Error::Collective {
            op,
            rank: self.rank,
            world: self.world,
            msg,
        }
    }

    fn nccl_dtype(d: DType) -> sys::ncclDataType_t {
        match d {
            DType::F32 => sys::ncclDataType_t::ncclFloat32,
            DType::BF16 => sys::ncclDataType_t::ncclBfloat16,
            DType::F64 => sys::ncclDataType_t::ncclFloat64,
            DType::U32 => sys::ncclDataType_t::ncclUint32,
        }
    }

    /// Runs `launch(send, recv, stream)` with `x`'s contiguous buffer and a fresh output of
    /// `out_len` elements, then waits for it with the deadline. Returns the output.
    fn collective(
        &self,
        op: &'static str,
        x: &Tensor,
        out_len: usize,
        launch: impl FnOnce(u64, u64, sys::ncclDataType_t, sys::cudaStream_t) -> Result<()>,
    ) -> Result<Tensor> {
        if x.device() != Device::Cuda(self.dev.ordinal()) {
            return Err(self.fail(
                op,
                format!(
                    "the tensor is on {:?}, the communicator on cuda:{}",
                    x.device(),
                    self.dev.ordinal()
                ),
            ));
        }
        let dtype = Self::nccl_dtype(x.dtype());
        self.dev.bind(op)?;
        let out = CudaStorage::alloc(&self.dev, op, out_len.max(1), x.dtype())?;
        {
            let st = x.storage();
            let s = st
                .as_cuda()
                .ok_or_else(|| self.fail(op, "the tensor is not on a GPU".into()))?;
            let src = s.contiguous(op, x.layout())?;
            let stream = self.dev.stream().cu_stream() as sys::cudaStream_t;
            launch(src.ptr, out.ptr(), dtype, stream)?;
            self.wait(op)?;
        }
        Ok(Tensor::from_storage(Storage::Cuda(out), [out_len], None))
    }

    /// Waits for the stream with the deadline, watching NCCL's asynchronous error; aborts the
    /// communicator when either fails.
    fn wait(&self, op: &'static str) -> Result<()> {
        let start = Instant::now();
        let stream = self.dev.stream().cu_stream();
        loop {
            // SAFETY: the stream is the device's own, alive while `self.dev` is.
            let q = unsafe { cu::cuStreamQuery(stream) };
            match q {
                cu::CUresult::CUDA_SUCCESS => return Ok(()),
                cu::CUresult::CUDA_ERROR_NOT_READY => {}
                e => return Err(self.fail(op, format!("the stream failed: {e:?}"))),
            }
            let mut async_err = sys::ncclResult_t::ncclSuccess;
            // SAFETY: the communicator is alive (not yet destroyed) and `async_err` writable.
            let r = unsafe { sys::ncclCommGetAsyncError(self.comm.0, &mut async_err) };
            if r != sys::ncclResult_t::ncclSuccess
                || (async_err != sys::ncclResult_t::ncclSuccess
                    && async_err != sys::ncclResult_t::ncclInProgress)
            {
                self.abort();
                return Err(self.fail(op, format!("NCCL failed: {async_err:?} ({r:?})")));
            }
            if start.elapsed() > self.timeout {
                self.abort();
                return Err(self.fail(
                    op,
                    format!(
                        "not finished within {:.0} s: a rank died or hangs (communicator aborted)",
                        self.timeout.as_secs_f64()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    fn abort(&self) {
        // SAFETY: aborting a live communicator; later calls on it fail with an NCCL error.
        let _ = unsafe { result::comm_abort(self.comm.0) };
    }

    fn nccl(
        &self,
        op: &'static str,
        r: std::result::Result<result::NcclStatus, result::NcclError>,
    ) -> Result<()> {
        r.map(|_| ()).map_err(|e| self.fail(op, format!("{e:?}")))
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: the communicator is not used after this; destroy frees its resources (an
        // aborted one was freed already and returns an error, ignored).
        let _ = unsafe { result::comm_destroy(self.comm.0) };
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.elem_count();
        self.collective("all_gather", x, self.world * n, |s, r, dt, st| {
            // SAFETY: `s` holds `n` elements of `dt`, `r` room for `world · n`; both stay alive
            // until `wait` returns.
            let res = unsafe {
                result::all_gather(s as *const c_void, r as *mut c_void, n, dt, self.comm.0, st)
            };
            self.nccl("all_gather", res)
        })
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.elem_count();
        self.collective("all_reduce_sum", x, n, |s, r, dt, st| {
            // SAFETY: `s` and `r` each hold `n` elements of `dt`, alive until `wait` returns.
            let res = unsafe {
                result::all_reduce(
                    s as *const c_void,
                    r as *mut c_void,
                    n,
                    dt,
                    sys::ncclRedOp_t::ncclSum,
                    self.comm.0,
                    st,
                )
            };
            self.nccl("all_reduce_sum", res)
        })
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        let n = x.elem_count();
        self.collective("broadcast", x, n, |s, r, dt, st| {
            // SAFETY: `s` and `r` each hold `n` elements of `dt`, alive until `wait` returns.
            let res = unsafe {
                result::broadcast(
                    s as *const c_void,
                    r as *mut c_void,
                    n,
                    dt,
                    root as i32,
                    self.comm.0,
                    st,
                )
            };
            self.nccl("broadcast", res)
        })
    }

    fn barrier(&self) -> Result<()> {
        // One element summed over the ranks: returns when every rank contributed.
        let one = Tensor::zeros([1], DType::F32, Device::Cuda(self.dev.ordinal()))?;
        self.all_reduce_sum(&one).map(|_| ())
    }
}
