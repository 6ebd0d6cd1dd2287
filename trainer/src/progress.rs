//! Progress of a long piece of work counted in items (questions, examples, ...): a bar on stderr
//! when stderr is a terminal, else a plain line every few seconds (`eval: 12/32 items (38%),
//! 0.17 items/s, ETA 1m58s [boolq]`) and one at the end, so logs in files show it too.
//!
//! The plain-line mode writes to any [`Write`] and reads any clock ([`Reporter::lines`]), which
//! is how its output is tested.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Set by [`hide_progress`].
static HIDDEN: AtomicBool = AtomicBool::new(false);

/// From now on, [`Reporter::stderr`] reports nothing in this process (a data-parallel rank
/// other than 0: rank 0 alone shows the progress of the work every rank does).
pub fn hide_progress() {
    HIDDEN.store(true, Ordering::Relaxed);
}

/// Seconds between two plain lines of [`Reporter::stderr`] when stderr is not a terminal.
pub const LINE_EVERY: Duration = Duration::from_secs(10);

/// The time since the work started.
pub type Clock = Box<dyn Fn() -> Duration + Send>;

/// Reports the progress of `total` items of work.
pub struct Reporter {
    label: String,
    unit: &'static str,
    total: u64,
    out: Output,
}

enum Output {
    Bar(ProgressBar),
    Lines(Mutex<Lines>),
    Hidden,
}

struct Lines {
    sink: Box<dyn Write + Send>,
    clock: Clock,
    every: Duration,
    /// When the last line was written.
    last: Duration,
    done: u64,
    message: String,
}

impl Reporter {
    /// `label: done/total unit` on stderr: a bar on a terminal, else a plain line every
    /// [`LINE_EVERY`] and one at the end; nothing after [`hide_progress`].
    pub fn stderr(label: &str, total: usize, unit: &'static str) -> Reporter {
        if HIDDEN.load(Ordering::Relaxed) {
            Self::hidden()
        } else if std::io::stderr().is_terminal() {
            Self::bar(label, total, unit)
        } else {
            Self::lines(
                label,
                total,
                unit,
                LINE_EVERY,
                Box::new(std::io::stderr()),
                wall_clock(),
            )
        }
    }

    /// A bar drawn on stderr.
    pub fn bar(label: &str, total: usize, unit: &'static str) -> Reporter {
        let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
        let template = format!(
            "{label} {{bar:30.cyan/blue}} {{pos}}/{{len}} {unit} [{{elapsed_precise}} < \
             {{eta_precise}}, {{per_sec}}] {{msg}}"
        );
        let style = ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        bar.set_style(style);
        Reporter {
            label: label.to_string(),
            unit,
            total: total as u64,
            out: Output::Bar(bar),
        }
    }

    /// Plain lines into `sink`: one at the first update at least `every` after the previous
    /// line (or the start), and one at [`finish`](Reporter::finish); `clock` is the time since
    /// the start.
    pub fn lines(
        label: &str,
        total: usize,
        unit: &'static str,
        every: Duration,
        sink: Box<dyn Write + Send>,
        clock: Clock,
    ) -> Reporter {
        Reporter {
            label: label.to_string(),
            unit,
            total: total as u64,
            out: Output::Lines(Mutex::new(Lines {
                sink,
                clock,
                every,
                last: Duration::ZERO,
                done: 0,
                message: String::new(),
            })),
        }
    }

    /// Reports nothing.
    pub fn hidden() -> Reporter {
        Reporter {
            label: String::new(),
            unit: "",
            total: 0,
            out: Output::Hidden,
        }
    }

    /// A short note after the counts (the task being evaluated, ...).
    pub fn set_message(&self, message: &str) {
        match &self.out {
            Output::Bar(b) => b.set_message(message.to_string()),
            Output::Lines(l) => lock(l).message = message.to_string(),
            Output::Hidden => {}
        }
    }

    /// `n` more items done.
    pub fn inc(&self, n: usize) {
        match &self.out {
            Output::Bar(b) => b.inc(n as u64),
            Output::Lines(l) => {
                let mut l = lock(l);
                l.done = (l.done + n as u64).min(self.total);
                let now = (l.clock)();
                if now.saturating_sub(l.last) >= l.every {
                    l.last = now;
                    let line = self.line(l.done, now, &l.message);
                    l.write(&line);
                }
            }
            Output::Hidden => {}
        }
    }

    /// The work is over: the bar is cleared, or the final line written (`label: done/total unit
    /// in 3m04s (0.17 unit/s)`).
    pub fn finish(&self) {
        match &self.out {
            Output::Bar(b) => b.finish_and_clear(),
            Output::Lines(l) => {
                let mut l = lock(l);
                let now = (l.clock)();
                let line = format!(
                    "{}: {}/{} {} in {} ({})",
                    self.label,
                    l.done,
                    self.total,
                    self.unit,
                    duration(now),
                    rate(l.done, now, self.unit)
                );
                l.write(&line);
            }
            Output::Hidden => {}
        }
    }

    /// `label: done/total unit (pct%), rate, ETA t [message]`.
    fn line(&self, done: u64, elapsed: Duration, message: &str) -> String {
        let pct = (done * 100).checked_div(self.total).unwrap_or(100);
        let eta = if done == 0 {
            "ETA unknown".to_string()
        } else {
            let left = elapsed.as_secs_f64() * (self.total - done) as f64 / done as f64;
            format!("ETA {}", duration(Duration::from_secs_f64(left)))
        };
        let mut s = format!(
            "{}: {done}/{} {} ({pct}%), {}, {eta}",
            self.label,
            self.total,
            self.unit,
            rate(done, elapsed, self.unit)
        );
        if !message.is_empty() {
            s += &format!(" [{message}]");
        }
        s
    }
}

impl Lines {
    fn write(&mut self, line: &str) {
        // Progress is advisory: a closed stderr must not stop the work.
        let _ = writeln!(self.sink, "{line}").and_then(|()| self.sink.flush());
    }
}

fn lock(l: &Mutex<Lines>) -> std::sync::MutexGuard<'_, Lines> {
    l.lock().unwrap_or_else(|e| e.into_inner())
}

/// The time since this call.
pub fn wall_clock() -> Clock {
    let start = Instant::now();
    Box::new(move || start.elapsed())
}

/// `0.17 items/s`, or `12.3 items/s`.
fn rate(done: u64, elapsed: Duration, unit: &str) -> String {
    let r = done as f64 / elapsed.as_secs_f64().max(1e-9);
    if r < 10.0 {
        format!("{r:.2} {unit}/s")
    } else {
        format!("{r:.1} {unit}/s")
    }
}

/// `42s`, `3m04s`, `1h02m`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs_f64().round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// A sink and a clock for tests of the plain lines.
#[cfg(test)]
pub(crate) mod testing {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    /// A `Write` whose bytes the test reads back.
    #[derive(Clone, Default)]
    pub(crate) struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        pub(crate) fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Shared;
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn plain_lines_every_period_and_at_the_end() {
        let out = Shared::default();
        let now = Arc::new(Mutex::new(Duration::ZERO));
        let clock_now = now.clone();
        let p = Reporter::lines(
            "eval",
            32,
            "items",
            Duration::from_secs(10),
            Box::new(out.clone()),
            Box::new(move || *clock_now.lock().unwrap()),
        );
        p.set_message("boolq");
        let at = |secs: u64, n: usize| {
            *now.lock().unwrap() = Duration::from_secs(secs);
            p.inc(n);
        };
        at(4, 2); // too early for a line
        at(10, 2); // 4 items in 10 s
        at(15, 4); // 5 s after the last line: none
        at(40, 8); // 16 items in 40 s, 16 left: ETA 40 s
        p.set_message("arc_e");
        at(200, 16);
        p.finish();
        assert_eq!(
            out.text(),
            "eval: 4/32 items (12%), 0.40 items/s, ETA 1m10s [boolq]\n\
             eval: 16/32 items (50%), 0.40 items/s, ETA 40s [boolq]\n\
             eval: 32/32 items (100%), 0.16 items/s, ETA 0s [arc_e]\n\
             eval: 32/32 items in 3m20s (0.16 items/s)\n"
        );
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(Duration::from_secs_f64(4.4)), "4s");
        assert_eq!(duration(Duration::from_secs(184)), "3m04s");
        assert_eq!(duration(Duration::from_secs(3720)), "1h02m");
    }

    #[test]
    fn after_hide_progress_stderr_reporters_are_hidden() {
        // Process-wide, as for a data-parallel rank other than 0; no test reads stderr.
        hide_progress();
        let p = Reporter::stderr("eval", 10, "questions");
        assert!(matches!(p.out, Output::Hidden));
        p.inc(3);
        p.finish();
    }

    #[test]
    fn hidden_reports_nothing_and_accepts_everything() {
        let p = Reporter::hidden();
        p.set_message("x");
        p.inc(5);
        p.finish();
    }
}
