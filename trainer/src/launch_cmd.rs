//! `mixlora train --gpus N` (and `mixlora bench recipe --gpus N`) and the ranks of a data-parallel run: the launcher starts one child
//! process per GPU of this host with the standard variables (like `torchrun --nproc-per-node`);
//! a process that finds `WORLD_SIZE` in its environment (a child, or a worker another launcher
//! started on one of several hosts) is one rank: it meets the others at the master address
//! (rank 0 hands out the NCCL unique id) and trains with an NCCL communicator on GPU
//! `LOCAL_RANK`. The variables are read here and nowhere else.

use std::process::{Child, Command};
use std::time::Duration;

use trainer::config::RunPlan;
use trainer::dist::World;

use super::Result;

/// The launch flags of `mixlora train`.
#[derive(clap::Args, Debug, Clone)]
pub struct LaunchArgs {
    /// Data parallel on this host: one process per GPU (GPUs 0..N), each running its share of
    /// every step's micro-batches; the global batch, the data order and the losses are those of
    /// one process. Needs a CUDA build and `--device cuda`. On several hosts, start one
    /// `mixlora train` per GPU with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set
    /// instead [default: one process, no data parallelism].
    #[arg(long, value_name = "N")]
    pub gpus: Option<usize>,
    /// Seconds a rank of a data-parallel run waits for the others (the rendezvous, each
    /// collective) before the run stops with an error naming the rank that did not answer.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub dist_timeout: u64,
}

/// The environment variables of a data-parallel run (shown by `--help`).
pub const ENVIRONMENT: &str = "
  WORLD_SIZE, RANK       a data-parallel rank of `mixlora train` (set by --gpus for its
  LOCAL_RANK             children, or by another launcher on several hosts): the world size,
  MASTER_ADDR            this rank, its GPU on this host (default: RANK), rank 0's host
  MASTER_PORT            (default 127.0.0.1) and the port of its rendezvous";

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// What `mixlora train` is, given its launch flags and the environment.
pub enum Role {
    /// One process, no data parallelism.
    Single,
    /// The launcher of `--gpus N` (its children do the training).
    Launcher(usize),
    /// One rank of a data-parallel run.
    Rank(World),
}

/// The role of this process; refuses `--gpus` where it cannot work.
pub fn role(args: &LaunchArgs, plan: &RunPlan) -> Result<Role> {
    role_on(args, plan.shared.device)
}

/// [`role`] of a command that runs on `device` (`mixlora bench recipe`).
pub fn role_on(args: &LaunchArgs, device: engine::Device) -> Result<Role> {
    let world = World::from_vars(var)?;
    let wants_gpus = args.gpus.is_some() || world.is_some();
    if wants_gpus && !cfg!(feature = "cuda") {
        return Err(
            "data parallel (--gpus, WORLD_SIZE) needs a CUDA build: cargo build \
                    --release -p mixlora-trainer --features cuda"
                .into(),
        );
    }
    if wants_gpus && !matches!(device, engine::Device::Cuda(_)) {
        return Err(
            "data parallel (--gpus, WORLD_SIZE) needs --device cuda (it runs over NCCL)".into(),
        );
    }
    match (args.gpus, world) {
        (Some(_), Some(_)) => Err(
            "--gpus starts the ranks itself: unset WORLD_SIZE, or leave --gpus out to be one \
             rank"
                .into(),
        ),
        (Some(0), None) => Err("--gpus 0: give at least one GPU".into()),
        (Some(1), None) | (None, None) => Ok(Role::Single),
        (Some(n), None) => Ok(Role::Launcher(n)),
        (None, Some(w)) => Ok(Role::Rank(w)),
    }
}

/// The command line without `--gpus N` / `--gpus=N`: what each child runs.
fn child_args() -> Vec<std::ffi::OsString> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in std::env::args_os().skip(1) {
        if skip {
            skip = false;
            continue;
        }
        let s = a.to_string_lossy();
        if s == "--gpus" {
            skip = true;
            continue;
        }
        if s.starts_with("--gpus=") {
            continue;
        }
        out.push(a);
    }
    out
}

/// A free TCP port on this host for the children's rendezvous (`MASTER_PORT` when set).
fn free_port() -> Result<u16> {
    if let Some(p) = var("MASTER_PORT") {
        return Ok(p
            .parse()
            .map_err(|_| format!("MASTER_PORT={p}: not a port"))?);
    }
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(l.local_addr()?.port())
}

/// `--gpus n`: starts rank `i` on GPU `i` for every `i < n`, waits for them; when one fails, stops
/// the others and reports it. Ctrl-C reaches the children directly (one process group): they
/// stop together at a step boundary and rank 0 saves the checkpoint.
pub fn launch(n: usize) -> Result<()> {
    let exe = std::env::current_exe()?;
    let port = free_port()?;
    let args = child_args();
    // The children handle Ctrl-C; this process only waits for them.
    let _ = ctrlc::set_handler(|| {});
    eprintln!("--gpus {n}: starting {n} ranks (rendezvous at 127.0.0.1:{port})");
    let mut children: Vec<Child> = Vec::with_capacity(n);
    for rank in 0..n {
        let child = Command::new(&exe)
            .args(&args)
            .env("WORLD_SIZE", n.to_string())
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            // NVLink multicast (NVLS) stays off.
            .env("NCCL_NVLS_ENABLE", "0")
            .spawn();
        match child {
            Ok(c) => children.push(c),
            Err(e) => {
                stop_all(&mut children);
                return Err(format!("cannot start rank {rank}: {e}").into());
            }
        }
    }
    let mut done = vec![false; n];
    loop {
        for (rank, c) in children.iter_mut().enumerate() {
            if done[rank] {
                continue;
            }
            if let Some(status) = c.try_wait()? {
                done[rank] = true;
                if !status.success() {
                    stop_all(&mut children);
                    let code = status.code();
                    if code == Some(trainer::interrupt::EXIT_STATUS.into()) {
                        return Err(Box::new(super::Stopped(format!(
                            "rank {rank} was interrupted; the ranks stopped (rank 0 printed \
                             the command that continues)"
                        ))));
                    }
                    return Err(format!(
                        "rank {rank} failed ({status}); the other ranks were stopped"
                    )
                    .into());
                }
            }
        }
        if done.iter().all(|&d| d) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Ends the children still running (each by its own id) and reaps them.
fn stop_all(children: &mut [Child]) {
    for c in children.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
}

/// This rank's communicator: the rendezvous at the master address (rank 0 makes the NCCL
/// unique id), then NCCL on GPU `LOCAL_RANK`.
#[cfg(feature = "cuda")]
pub fn communicator(w: &World, timeout: Duration) -> Result<Box<dyn engine::dist::Communicator>> {
    use engine::dist::{nccl_unique_id, NcclComm, NCCL_UNIQUE_ID_BYTES};
    let (listener, id) = if w.rank == 0 {
        let l = trainer::dist::Listener::bind(&w.master)?;
        (Some(l), nccl_unique_id(w.size)?.to_vec())
    } else {
        (None, Vec::new())
    };
    let id = trainer::dist::rendezvous(w, listener, &id, timeout)?;
    let id: [u8; NCCL_UNIQUE_ID_BYTES] = id
        .try_into()
        .map_err(|v: Vec<u8>| format!("rendezvous: an id of {} bytes", v.len()))?;
    Ok(Box::new(NcclComm::new(
        w.local_rank,
        w.rank,
        w.size,
        &id,
        timeout,
    )?))
}

#[cfg(not(feature = "cuda"))]
pub fn communicator(_: &World, _: Duration) -> Result<Box<dyn engine::dist::Communicator>> {
    Err("data parallel needs a CUDA build".into())
}

/// What would leave some ranks idle part of each step: an adapter whose micro-batches per step
/// (`batch / micro_batch`) are not a multiple of the `n` ranks (rank `r` runs the micro-batches
/// `m` with `m % n == r`), one line each.
pub fn uneven_shards(plan: &RunPlan, n: usize) -> Vec<String> {
    plan.adapters
        .iter()
        .filter_map(|a| {
            let c = &a.config;
            let micro = c.batch_size.div_ceil(c.micro_batch_size.max(1));
            (micro % n != 0).then(|| {
                format!(
                    "{}: {micro} micro-batches a step (--batch {} / --micro-batch {}) on {n} GPUs: \
                     some GPUs run {} and others {}; a multiple of {n} keeps them all busy",
                    a.name,
                    c.batch_size,
                    c.micro_batch_size,
                    micro.div_ceil(n),
                    micro / n
                )
            })
        })
        .collect()
}

/// Each adapter of the plan on this rank's GPU.
pub fn place(plan: &mut RunPlan, w: &World) {
    let dev = engine::Device::Cuda(w.local_rank);
    plan.shared.device = dev;
    for a in &mut plan.adapters {
        a.config.device = dev;
    }
}
