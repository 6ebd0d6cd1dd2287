//! Starting a data-parallel run: where each rank stands ([`World`], filled by the binary from
//! its flags and the standard variables `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT`) and the rendezvous of the ranks at the master address ([`rendezvous`]: plain
//! TCP, it hands rank 0's NCCL unique id to every rank). The training loop's side is
//! `run::parallel`; the collectives are `engine::dist`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// One rank's place in a data-parallel run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct World {
    /// This rank, in `0..size`.
    pub rank: usize,
    pub size: usize,
    /// This rank on its host: the GPU it uses.
    pub local_rank: usize,
    /// Where rank 0 listens for the rendezvous (`host:port`).
    pub master: String,
}

impl World {
    /// The world of the standard variables, each as found (`None`: unset). `None` when
    /// `WORLD_SIZE` is unset (not a data-parallel run); an error for a missing or bad one.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<World>> {
        let Some(size) = var("WORLD_SIZE") else {
            return Ok(None);
        };
        let num = |name: &str, v: Option<String>| -> Result<usize> {
            let v =
                v.ok_or_else(|| Error::Parallel(format!("WORLD_SIZE is set but {name} is not")))?;
            v.trim()
                .parse()
                .map_err(|_| Error::Parallel(format!("{name}={v}: not a number")))
        };
        let size = num("WORLD_SIZE", Some(size))?;
        let rank = num("RANK", var("RANK"))?;
        let local_rank = match var("LOCAL_RANK") {
            Some(v) => num("LOCAL_RANK", Some(v))?,
            None => rank,
        };
        let addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let port = num("MASTER_PORT", var("MASTER_PORT"))?;
        if size == 0 || rank >= size {
            return Err(Error::Parallel(format!(
                "RANK={rank} is not a rank of WORLD_SIZE={size}"
            )));
        }
        if port > 65535 {
            return Err(Error::Parallel(format!("MASTER_PORT={port}: not a port")));
        }
        Ok(Some(World {
            rank,
            size,
            local_rank,
            master: format!("{addr}:{port}"),
        }))
    }
}

/// What a rank sends rank 0 first: a tag, its rank and the world size it was given.
const HELLO: &[u8; 8] = b"MIXLRDZ1";

/// Rank 0 listening for the rendezvous, bound before the other ranks are started (so their
/// connections cannot race its bind).
pub struct Listener(TcpListener);

impl Listener {
    /// The port it listens on (the one asked for, or the one the system chose for port 0).
    pub fn port(&self) -> Result<u16> {
        Ok(self.0.local_addr().map_err(|e| io("listen", e))?.port())
    }

    /// Listens on every interface at `master`'s port (0: any free port, see [`Listener::port`]).
    pub fn bind(master: &str) -> Result<Listener> {
        let port = master
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .ok_or_else(|| Error::Parallel(format!("{master}: not host:port")))?;
        TcpListener::bind(("0.0.0.0", port))
            .map(Listener)
            .map_err(|e| Error::Parallel(format!("rendezvous: cannot listen on port {port}: {e}")))
    }
}

fn io(what: &str, e: std::io::Error) -> Error {
    Error::Parallel(format!("rendezvous: {what}: {e}"))
}

/// The rendezvous of `world`'s ranks: rank 0 (with `listener` and its `payload`, e.g. the
/// NCCL unique id) waits for every other rank to connect, checks that each is a distinct rank of
/// the same world, and sends each the payload; every other rank connects to the master address
/// (retrying until rank 0 listens) and receives it. Returns the payload on every rank. Fails
/// when not every rank has arrived, or rank 0 has not answered, within `timeout`.
pub fn rendezvous(
    world: &World,
    listener: Option<Listener>,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    if world.rank == 0 {
        let l = match listener {
            Some(l) => l,
            None => Listener::bind(&world.master)?,
        };
        serve(world, &l.0, payload, deadline, timeout)?;
        return Ok(payload.to_vec());
    }
    join(world, deadline, timeout)
}

fn serve(
    world: &World,
    l: &TcpListener,
    payload: &[u8],
    deadline: Instant,
    timeout: Duration,
) -> Result<()> {
    l.set_nonblocking(true).map_err(|e| io("listen", e))?;
    let mut peers: Vec<Option<TcpStream>> = (0..world.size).map(|_| None).collect();
    let mut arrived = 1;
    while arrived < world.size {
        match l.accept() {
            Ok((mut s, from)) => {
                s.set_nonblocking(false).map_err(|e| io("accept", e))?;
                s.set_read_timeout(Some(timeout))
                    .map_err(|e| io("accept", e))?;
                let mut hello = [0u8; 24];
                s.read_exact(&mut hello)
                    .map_err(|e| io(&format!("reading the hello of {from}"), e))?;
                let num =
                    |i: usize| u64::from_le_bytes(hello[i..i + 8].try_into().unwrap_or([0; 8]));
                let (rank, size) = (num(8) as usize, num(16) as usize);
                if &hello[..8] != HELLO || size != world.size || rank == 0 || rank >= size {
                    return Err(Error::Parallel(format!(
                        "rendezvous: {from} says it is rank {rank} of {size}, this run has \
                         {} ranks",
                        world.size
                    )));
                }
                if peers[rank].is_some() {
                    return Err(Error::Parallel(format!(
                        "rendezvous: two processes say they are rank {rank}"
                    )));
                }
                peers[rank] = Some(s);
                arrived += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> =
                        (1..world.size).filter(|&r| peers[r].is_none()).collect();
                    return Err(Error::Parallel(format!(
                        "rendezvous at {}: ranks {missing:?} did not arrive within {:.0} s",
                        world.master,
                        timeout.as_secs_f64()
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(io("accept", e)),
        }
    }
    for s in peers.iter_mut().flatten() {
        s.write_all(&(payload.len() as u64).to_le_bytes())
            .and_then(|()| s.write_all(payload))
            .map_err(|e| io("sending the id", e))?;
    }
    Ok(())
}

fn join(world: &World, deadline: Instant, timeout: Duration) -> Result<Vec<u8>> {
    let addr = world
        .master
        .to_socket_addrs()
        .map_err(|e| io(&format!("the master address {}", world.master), e))?
        .next()
        .ok_or_else(|| Error::Parallel(format!("{}: no address", world.master)))?;
    let mut s = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::Parallel(format!(
                    "rendezvous: rank 0 did not listen at {} within {:.0} s ({e})",
                    world.master,
                    timeout.as_secs_f64()
                )))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
    s.set_read_timeout(Some(left))
        .map_err(|e| io("connect", e))?;
    let mut hello = HELLO.to_vec();
    hello.extend((world.rank as u64).to_le_bytes());
    hello.extend((world.size as u64).to_le_bytes());
    s.write_all(&hello)
        .map_err(|e| io("sending the hello", e))?;
    let mut len = [0u8; 8];
    s.read_exact(&mut len).map_err(|e| {
        io(
            &format!(
                "waiting for rank 0 at {} (not every rank arrived?)",
                world.master
            ),
            e,
        )
    })?;
    let len = u64::from_le_bytes(len);
    if len > 1 << 20 {
        return Err(Error::Parallel(format!(
            "rendezvous: {} sent a payload of {len} bytes: not rank 0 of this run?",
            world.master
        )));
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload)
        .map_err(|e| io("reading the id", e))?;
    Ok(payload)
}
