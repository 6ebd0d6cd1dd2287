//! An opt-in per-op profile of the CPU backend: with `MIXLORA_PROFILE=1` in the environment,
//! every backend call adds its wall time to a table keyed by op (matmuls also by shape and
//! operand layout), which [`report`] prints and clears. Off, the cost is one relaxed atomic load
//! per op.
//!
//! On the GPU, `MIXLORA_PROFILE=1` brackets each launch with synchronisations (a launch's wall
//! time, its launch latency included), while `MIXLORA_PROFILE=gpu` brackets it with CUDA events
//! and never waits: the table then holds the kernels' own GPU times, and the report adds the GPU
//! span from the first launch to the last, so `span − busy` is the time the GPU sat idle waiting
//! for the host.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// 0: not read yet, 1: off, 2: on, 3: on with GPU events (`MIXLORA_PROFILE=gpu`).
static STATE: AtomicU8 = AtomicU8::new(0);
static TABLE: Mutex<Option<HashMap<String, (u64, f64)>>> = Mutex::new(None);

/// Whether profiling is on (`MIXLORA_PROFILE` set to anything but `0` or empty).
pub fn enabled() -> bool {
    state() >= 2
}

/// Whether GPU launches are timed with CUDA events rather than synchronisations
/// (`MIXLORA_PROFILE=gpu`).
pub fn gpu_events() -> bool {
    state() == 3
}

fn state() -> u8 {
    match STATE.load(Ordering::Relaxed) {
        0 => {
            let v = std::env::var("MIXLORA_PROFILE").unwrap_or_default();
            let s = match v.as_str() {
                "" | "0" => 1,
                "gpu" => 3,
                _ => 2,
            };
            STATE.store(s, Ordering::Relaxed);
            s
        }
        s => s,
    }
}

/// Runs `f`, adding its time under the key `name()` when profiling is on.
#[inline]
pub(crate) fn timed<R>(name: impl FnOnce() -> String, f: impl FnOnce() -> R) -> R {
    if !enabled() {
        return f();
    }
    let t0 = Instant::now();
    let r = f();
    let dt = t0.elapsed().as_secs_f64();
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let e = table
        .get_or_insert_with(HashMap::new)
        .entry(name())
        .or_insert((0, 0.0));
    e.0 += 1;
    e.1 += dt;
    r
}

/// Adds `dt` under `name` (profiling on or not: callers check [`enabled`]).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn record(name: &str, dt: std::time::Duration) {
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let e = table
        .get_or_insert_with(HashMap::new)
        .entry(name.to_string())
        .or_insert((0, 0.0));
    e.0 += 1;
    e.1 += dt.as_secs_f64();
}

/// The table so far as `(key, calls, seconds)`, longest first, and clears it.
pub fn take() -> Vec<(String, u64, f64)> {
    take_with_span().0
}

/// [`take`], with the GPU span of the event-timed launches since the last call (cleared too).
fn take_with_span() -> (Vec<(String, u64, f64)>, Option<f64>) {
    #[cfg(feature = "cuda")]
    crate::backend::cuda::launch::flush_events();
    let span = GPU_SPAN.lock().unwrap_or_else(|e| e.into_inner()).take();
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let mut rows: Vec<_> = table
        .take()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, (n, s))| (k, n, s))
        .collect();
    rows.sort_by(|a, b| b.2.total_cmp(&a.2));
    (rows, span)
}

/// Prints the table (the `top` longest entries, or as many as `MIXLORA_PROFILE_ROWS` says, and
/// the total) and clears it.
pub fn report(top: usize) {
    let top = std::env::var("MIXLORA_PROFILE_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(top);
    let (rows, span) = take_with_span();
    let total: f64 = rows.iter().map(|r| r.2).sum();
    println!("{:>9} {:>6} {:>7}  op", "ms", "%", "calls");
    for (k, n, s) in rows.iter().take(top) {
        println!(
            "{:>9.1} {:>6.1} {:>7}  {k}",
            s * 1e3,
            100.0 * s / total.max(1e-12),
            n
        );
    }
    println!(
        "{:>9.1} {:>6} {:>7}  total in backend ops",
        total * 1e3,
        "",
        ""
    );
    if let Some(span) = span {
        println!(
            "{:>9.1} {:>6.1} {:>7}  GPU span, first launch to last (busy: the total above)",
            span * 1e3,
            100.0 * total / span.max(1e-12),
            ""
        );
    }
}

/// Seconds of GPU time from the first event-timed launch to the last (`MIXLORA_PROFILE=gpu`).
static GPU_SPAN: Mutex<Option<f64>> = Mutex::new(None);

/// Adds `secs` to the GPU span of the event-timed launches.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn add_gpu_span(secs: f64) {
    let mut s = GPU_SPAN.lock().unwrap_or_else(|e| e.into_inner());
    *s = Some(s.unwrap_or(0.0) + secs);
}
