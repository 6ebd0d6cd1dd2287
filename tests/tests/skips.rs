//! A skipped test says so in the test output: `testutil::skip` writes past libtest's capture.

use std::process::Command;

/// The probe: skips, as a test without its input would. Ignored in normal runs; the test below
/// runs it in a child process of this binary.
#[test]
#[ignore = "a probe, run by a_skip_is_printed_even_when_the_output_is_captured"]
fn probe_that_skips() {
    testutil::skip("the probe's reason");
}

#[test]
fn a_skip_is_printed_even_when_the_output_is_captured() {
    for threads in ["1", "2"] {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "probe_that_skips"])
            .arg(format!("--test-threads={threads}"))
            .output()
            .expect("run this test binary");
        let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "{text}");
        assert!(
            text.contains("SKIPPED probe_that_skips: the probe's reason\n"),
            "with {threads} test threads, no skip line in:\n{text}"
        );
    }
}
