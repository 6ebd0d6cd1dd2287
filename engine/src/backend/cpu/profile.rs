//! An opt-in per-op profile of the CPU backend: with `MIXLORA_PROFILE=1` in the environment,
//! every backend call adds its wall time to a table keyed by op (matmuls also by shape and
//! operand layout), which [`report`] prints and clears. Off, the cost is one relaxed atomic load
//! per op.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// 0: not read yet, 1: off, 2: on.
static STATE: AtomicU8 = AtomicU8::new(0);
static TABLE: Mutex<Option<HashMap<String, (u64, f64)>>> = Mutex::new(None);

/// Whether profiling is on (`MIXLORA_PROFILE` set to anything but `0` or empty).
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let on = std::env::var("MIXLORA_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0");
            STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
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
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let mut rows: Vec<_> = table
        .take()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, (n, s))| (k, n, s))
        .collect();
    rows.sort_by(|a, b| b.2.total_cmp(&a.2));
    rows
}

/// Prints the table (the `top` longest entries, or as many as `MIXLORA_PROFILE_ROWS` says, and
/// the total) and clears it.
pub fn report(top: usize) {
    let top = std::env::var("MIXLORA_PROFILE_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(top);
    let rows = take();
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
}
