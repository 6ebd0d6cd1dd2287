//! scripts/reference-parity-report.py on made-up run folders (ours and the reference harness's
//! formats): the JSON of benches/results/reference-parity-smollm2.json, the verdicts, and a
//! one-line error naming a broken file. Skips, saying why, without python3.

use std::path::{Path, PathBuf};
use std::process::Command;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir()
        .join(format!("mixlora-parity-{}", std::process::id()))
        .join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A run folder: eval.json with `acc` per task (arc_e, arc_c, boolq, obqa), 40 steps whose loss
/// falls linearly to `last`, and (for the reference) summary.json.
fn run(name: &str, acc: [f64; 4], last: f64, reference: bool) -> PathBuf {
    let d = tmp(name);
    let tasks: Vec<_> = ["arc_e", "arc_c", "boolq", "obqa"]
        .iter()
        .zip(acc)
        .map(|(t, a)| serde_json::json!({"task": t, "correct": 1, "total": 2, "accuracy": a}))
        .collect();
    let eval = serde_json::json!({"tasks": tasks, "average": 0.0});
    std::fs::write(d.join("eval.json"), eval.to_string()).unwrap();
    let mut lines = String::new();
    for k in 1..=40 {
        let loss = last + (40 - k) as f64 * 0.01;
        lines += &if reference {
            format!("{{\"step\": {k}, \"loss\": {loss}, \"aux_loss\": null}}\n")
        } else {
            format!(
                "{{\"kind\":\"train\",\"step\":{k},\"loss\":{loss},\"elapsed_s\":{}}}\n",
                2.5 * k as f64
            )
        };
        if !reference && k % 20 == 0 {
            lines += &format!("{{\"kind\":\"eval\",\"step\":{k}}}\n");
        }
    }
    std::fs::write(d.join("metrics.jsonl"), lines).unwrap();
    if reference {
        std::fs::write(
            d.join("summary.json"),
            r#"{"train_loop_s": 321.5, "steps": 40}"#,
        )
        .unwrap();
    }
    d
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/reference-parity-report.py")
}

fn python() -> bool {
    let ok = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        testutil::skip("no python3 on this machine: the report script does not run");
    }
    ok
}

#[test]
fn writes_the_parity_json_and_the_verdicts() {
    if !python() {
        return;
    }
    let om = run("ours-mixlora", [0.5, 0.4, 0.6, 0.5], 0.15, false);
    let ol = run("ours-lora", [0.5, 0.4, 0.6, 0.5], 0.13, false);
    let rm = run("ref-mixlora", [0.5, 0.4, 0.6, 0.54], 0.16, true);
    let rl = run("ref-lora", [0.48, 0.4, 0.62, 0.5], 0.13, true);
    let json = tmp("out").join("parity.json");
    let out = Command::new("python3")
        .arg(script())
        .args(["--seed", "42", "--ours-mixlora"])
        .arg(&om)
        .arg("--ours-lora")
        .arg(&ol)
        .arg("--ref-mixlora")
        .arg(&rm)
        .arg("--ref-lora")
        .arg(&rl)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["seed"], 42);
    let m = &v["ours"]["mixlora"];
    assert_eq!(m["arc_e"], 50.0);
    assert_eq!(m["avg"], 50.0);
    // The loop time: the last step's elapsed_s (ours), train_loop_s (the reference's).
    assert_eq!(m["train_s"], 100.0);
    assert_eq!(v["reference"]["lora"]["train_s"], 321.5);
    // The mean of the last 5% of 40 steps: the last 2, (0.16 + 0.15) / 2.
    assert_eq!(m["final_loss"], 0.155);
    assert_eq!(v["reference"]["mixlora"]["avg"], 51.0);
    for side in ["ours", "reference"] {
        for kind in ["mixlora", "lora"] {
            let r = &v[side][kind];
            for key in [
                "arc_e",
                "arc_c",
                "boolq",
                "obqa",
                "avg",
                "train_s",
                "final_loss",
            ] {
                assert!(r[key].is_number(), "{side} {kind} {key}: {v}");
            }
        }
    }
    assert!(
        stdout.contains("mixlora: average -1.00 points against the reference: within 1 point"),
        "{stdout}"
    );
    assert!(stdout.contains("lora: average +0.00 points"), "{stdout}");
}

#[test]
fn a_broken_file_is_a_one_line_error_naming_it() {
    if !python() {
        return;
    }
    let good = run("good", [0.5; 4], 0.1, false);
    let bad = run("bad-ref", [0.5; 4], 0.1, true);
    std::fs::write(bad.join("summary.json"), "{}").unwrap();
    let out = Command::new("python3")
        .arg(script())
        .args(["--seed", "1", "--ours-mixlora"])
        .arg(&good)
        .arg("--ours-lora")
        .arg(&good)
        .arg("--ref-mixlora")
        .arg(&bad)
        .arg("--ref-lora")
        .arg(&good)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        e.contains("bad-ref/summary.json") && e.contains("train_loop_s"),
        "{e}"
    );
    assert_eq!(e.trim().lines().count(), 1, "{e}");
}
