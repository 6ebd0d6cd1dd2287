//! The launch macro shared by the op files.
//!
//! With the op profile on ([`crate::profile`]), every launch is timed under its kernel's name:
//! between two stream synchronisations ([`ProfileMode::Wall`](crate::profile::ProfileMode), slow,
//! but it says where the GPU time goes without a profiler) or between two CUDA events
//! ([`ProfileMode::GpuEvents`](crate::profile::ProfileMode), no waits).

/// Launches kernel `$name` of module `$src` on `$dev`'s stream with the arguments `$arg`
/// (identifiers, so that each lives until the launch). Expands to `Result<()>`; must be used in
/// an `unsafe` block whose `// SAFETY:` comment says why the sizes are right.
macro_rules! launch {
    ($dev:expr, $op:expr, $src:expr, $name:expr, $cfg:expr, [$($arg:ident),* $(,)?]) => {{
        let dev: &$crate::backend::cuda::CudaDevice = $dev;
        match dev.func(&$src, &$name) {
            Err(e) => Err(e),
            Ok(f) => {
                use cudarc::driver::PushKernelArg;
                let mut b = dev.stream().launch_builder(&f);
                $( b.arg(&$arg); )*
                $crate::backend::cuda::launch::profiled(dev, &$name, || {
                    b.launch($cfg).map(|_| ()).map_err(|e| dev.err($op, e))
                })
            }
        }
    }};
}
pub(crate) use launch;

use std::sync::Mutex;

use super::device::{lock, GpuEvent};

thread_local! {
    /// What the profile adds to the next launches' keys (e.g. a copy's shape), while set.
    static DETAIL: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// While the returned guard lives, profiled launches on this thread are keyed by their kernel
/// name followed by `detail()` (called only when the profile is on): the profile then tells
/// apart, say, the copies of different shapes.
pub(crate) fn profile_detail(detail: impl FnOnce() -> String) -> Option<DetailGuard> {
    if !crate::profile::enabled() {
        return None;
    }
    DETAIL.with(|d| *d.borrow_mut() = Some(detail()));
    Some(DetailGuard)
}

/// Clears the profile detail when dropped.
pub(crate) struct DetailGuard;

impl Drop for DetailGuard {
    fn drop(&mut self) {
        DETAIL.with(|d| *d.borrow_mut() = None);
    }
}

fn profile_key(name: &str) -> String {
    DETAIL.with(|d| match &*d.borrow() {
        Some(detail) => format!("cuda {name} {detail}"),
        None => format!("cuda {name}"),
    })
}

/// Launches timed with CUDA events and not yet read: `(key, start, end)` in launch order.
static PENDING: Mutex<Vec<(String, GpuEvent, GpuEvent)>> = Mutex::new(Vec::new());

/// Launches held before they are read anyway (waiting for them): the GPU span then adds up the
/// spans of the batches, leaving out the gaps between them.
const MAX_PENDING: usize = 1 << 17;

/// Runs `launch` (queued work on `dev`'s stream), timing it under `name` when the profile is on:
/// to completion between two synchronisations, or between two CUDA events in the profile's
/// GPU-events mode (read later by [`flush_events`]).
pub(crate) fn profiled<R>(
    dev: &crate::backend::cuda::CudaDevice,
    name: &str,
    launch: impl FnOnce() -> crate::Result<R>,
) -> crate::Result<R> {
    use crate::profile;
    // A launch recorded into a graph runs later, inside a replay, which is timed as one.
    if !profile::enabled() || dev.capture_pool().is_some() {
        return launch();
    }
    if profile::gpu_events() {
        let start = dev.record_event()?;
        let r = launch()?;
        let end = dev.record_event()?;
        let pending = {
            let mut p = lock(&PENDING);
            p.push((profile_key(name), start, end));
            p.len()
        };
        if pending >= MAX_PENDING {
            flush_events(); // a long run without a report keeps bounded memory
        }
        return Ok(r);
    }
    dev.synchronize()?;
    profile::timed(
        || profile_key(name),
        || {
            let r = launch()?;
            dev.synchronize()?;
            Ok(r)
        },
    )
}

/// Waits for the event-timed launches and adds each one's GPU time to the op profile, and the
/// span from the first to the last to its GPU span (nothing when none are pending).
pub(crate) fn flush_events() {
    use crate::profile;
    let pending = std::mem::take(&mut *lock(&PENDING));
    let (Some(first), Some(last)) = (pending.first(), pending.last()) else {
        return;
    };
    // elapsed_ms waits for the end events; a failed read leaves that launch out of the table.
    if let Ok(ms) = first.1.elapsed_ms(&last.2) {
        profile::add_gpu_span(f64::from(ms) / 1e3);
    }
    for (key, start, end) in &pending {
        if let Ok(ms) = start.elapsed_ms(end) {
            profile::record(
                key,
                std::time::Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3),
            );
        }
    }
}
