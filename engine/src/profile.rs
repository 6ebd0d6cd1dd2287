//! An opt-in per-op profile of the backends. With a [`ProfileMode`] other than `Off` (set by the
//! binary, [`set_mode`]), every backend call adds its time to a table keyed by op (matmuls also
//! by shape and operand layout), which [`report`] formats and clears. Off, the cost is one
//! relaxed atomic load per op.
//!
//! On the GPU, [`ProfileMode::Wall`] brackets each launch with synchronisations (a launch's wall
//! time, its launch latency included), while [`ProfileMode::GpuEvents`] brackets it with CUDA
//! events and never waits: the table then holds the kernels' own GPU times, and the report adds
//! the GPU span from the first launch to the last, so `span − busy` is the time the GPU sat idle
//! waiting for the host. CPU ops are timed by the wall clock in both modes.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// What the op profile measures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ProfileMode {
    /// No profile.
    #[default]
    Off,
    /// Each op's wall time; on the GPU, each launch between two synchronisations.
    Wall,
    /// On the GPU, each launch between two CUDA events, without waits (the kernels' GPU times
    /// and the GPU span); CPU ops as with `Wall`.
    GpuEvents,
}

impl ProfileMode {
    const ALL: [ProfileMode; 3] = [ProfileMode::Off, ProfileMode::Wall, ProfileMode::GpuEvents];

    /// The mode's name: `off`, `wall` or `gpu`.
    pub fn name(self) -> &'static str {
        match self {
            ProfileMode::Off => "off",
            ProfileMode::Wall => "wall",
            ProfileMode::GpuEvents => "gpu",
        }
    }
}

impl std::fmt::Display for ProfileMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ProfileMode {
    type Err = String;
    /// Parses `off`, `wall` or `gpu`.
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown profile mode `{s}` (expected off, wall or gpu)"))
    }
}

/// The mode as a number: 0 off, 1 wall, 2 GPU events.
static MODE: AtomicU8 = AtomicU8::new(0);
static TABLE: Mutex<Option<HashMap<String, (u64, f64)>>> = Mutex::new(None);

/// Turns the profile on or off for the whole process (from the next op on). Meant for the start
/// of a program, or between two measured steps.
pub fn set_mode(mode: ProfileMode) {
    let m = match mode {
        ProfileMode::Off => 0,
        ProfileMode::Wall => 1,
        ProfileMode::GpuEvents => 2,
    };
    MODE.store(m, Ordering::Relaxed);
}

/// The current mode.
pub fn mode() -> ProfileMode {
    match MODE.load(Ordering::Relaxed) {
        0 => ProfileMode::Off,
        1 => ProfileMode::Wall,
        _ => ProfileMode::GpuEvents,
    }
}

/// Whether the profile is on (any mode but `Off`).
#[inline]
pub fn enabled() -> bool {
    MODE.load(Ordering::Relaxed) != 0
}

/// Whether GPU launches are timed with CUDA events rather than synchronisations.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn gpu_events() -> bool {
    MODE.load(Ordering::Relaxed) == 2
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

/// The total time of the table and the GPU span of the event-timed launches since the last call,
/// and clears both: with [`ProfileMode::GpuEvents`] on a GPU, the seconds the GPU was busy
/// running kernels and the seconds from the first launch to the last.
pub fn take_busy() -> (f64, Option<f64>) {
    let (table, span) = take_with_span();
    (table.iter().map(|r| r.2).sum(), span)
}

/// The table as text, and clears it: the `rows` longest entries (milliseconds, share of the
/// total, calls), the total, and with GPU events the GPU span (busy: the total).
#[must_use]
pub fn report(rows: usize) -> String {
    take_report(rows).0
}

/// [`report`] and the total time of the table ([`take_busy`]'s first figure), from one take.
#[must_use]
pub fn take_report(rows: usize) -> (String, f64) {
    let (table, span) = take_with_span();
    let total: f64 = table.iter().map(|r| r.2).sum();
    // Writing into a String cannot fail.
    let mut out = format!("{:>9} {:>6} {:>7}  op\n", "ms", "%", "calls");
    for (k, n, s) in table.iter().take(rows) {
        let share = 100.0 * s / total.max(1e-12);
        let _ = writeln!(out, "{:>9.1} {share:>6.1} {n:>7}  {k}", s * 1e3);
    }
    let _ = writeln!(
        out,
        "{:>9.1} {:>6} {:>7}  total in backend ops",
        total * 1e3,
        "",
        ""
    );
    if let Some(span) = span {
        let _ = writeln!(
            out,
            "{:>9.1} {:>6.1} {:>7}  GPU span, first launch to last (busy: the total above)",
            span * 1e3,
            100.0 * total / span.max(1e-12),
            ""
        );
    }
    (out, total)
}

/// Seconds of GPU time from the first event-timed launch to the last ([`ProfileMode::GpuEvents`]).
static GPU_SPAN: Mutex<Option<f64>> = Mutex::new(None);

/// Adds `secs` to the GPU span of the event-timed launches.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn add_gpu_span(secs: f64) {
    let mut s = GPU_SPAN.lock().unwrap_or_else(|e| e.into_inner());
    *s = Some(s.unwrap_or(0.0) + secs);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for m in ProfileMode::ALL {
            assert_eq!(m.to_string().parse::<ProfileMode>(), Ok(m));
        }
        let e = "1".parse::<ProfileMode>().unwrap_err();
        assert!(e.contains("expected off, wall or gpu"), "{e}");
    }
}
