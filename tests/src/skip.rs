//! Skipped tests, visible: a test that cannot run here (no GPU, no reference fixture, no shared
//! data) calls [`skip`] and returns. libtest counts it as passed and captures what a passing test
//! prints, so [`skip`] writes its line to the process's stderr directly, past the capture:
//! `cargo test` shows `SKIPPED <test>: <reason>` among its results whatever the flags, and
//! `.ci/run` lists every such line at the end of the run.

use std::fmt::Display;
use std::io::Write;

/// The first word of every skip line (`grep -o 'SKIPPED .*'` finds them: with `--test-threads=1`
/// the line follows libtest's `test <name> ... ` on the same line).
pub const SKIP_MARK: &str = "SKIPPED";

/// The line [`skip`] prints for test `test`: `SKIPPED <test>: <reason>`.
pub fn skip_line(test: &str, reason: impl Display) -> String {
    format!("{SKIP_MARK} {test}: {reason}\n")
}

/// Says, on stderr and uncaptured, that the calling test skips and why. The test is named by its
/// thread (libtest names each test's thread after the test; "a test" where it does not).
pub fn skip(reason: impl Display) {
    let thread = std::thread::current();
    let test = thread.name().filter(|n| *n != "main").unwrap_or("a test");
    let line = skip_line(test, reason);
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_names_the_test_and_the_reason() {
        assert_eq!(
            skip_line("ops::gpu::matmul", "no usable GPU: no driver"),
            "SKIPPED ops::gpu::matmul: no usable GPU: no driver\n"
        );
    }
}
