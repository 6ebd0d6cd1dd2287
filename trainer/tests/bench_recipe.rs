//! `mixlora bench recipe` on the CPU: the built-in model and the embedded tasks (ragged lengths),
//! the real training loop timed; the report's figures are consistent and the bad arguments are
//! one-line errors.

#[test]
fn the_recipe_bench_times_the_training_loop() {
    let bin = env!("CARGO_BIN_EXE_mixlora");
    let json = std::env::temp_dir().join(format!("mixlora-recipe-{}.json", std::process::id()));
    let out = std::process::Command::new(bin)
        .args([
            "bench",
            "recipe",
            "--device",
            "cpu",
            "--dtype",
            "f32",
            "--warmup",
            "1",
            "--steps",
            "3",
            "--batch",
            "4",
            "--micro-batch",
            "2",
            "--cutoff-len",
            "320",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    assert_eq!(r["steps"], 3);
    assert_eq!(r["device"], "cpu");
    // No GPU busy time on the CPU; its peak is the live tensor buffers' (some MiB here).
    assert!(r["gpu_busy"].is_null(), "{r}");
    let peak = r["peak_gib"].as_f64().unwrap_or(0.0);
    assert!(peak > 0.0 && peak < 1.0, "{r}");
    let tokens = r["tokens"].as_f64().unwrap();
    let (tps, step_ms) = (
        r["tokens_per_s"].as_f64().unwrap(),
        r["step_ms"].as_f64().unwrap(),
    );
    // 3 steps of 4 real sequences of the synthetic tasks: some tens of tokens each.
    assert!(tokens > 3.0 * 4.0 * 10.0, "{r}");
    // tokens/s and the step time describe the same wall time (rounding aside).
    let wall = 3.0 * step_ms / 1e3;
    assert!((tokens / wall - tps).abs() <= 0.01 * tps + 1.0, "{r}");
    // On the CPU the host is never waiting for a device: busy all the step.
    let host_ms = r["host_us_per_step"].as_f64().unwrap() / 1e3;
    assert!((host_ms - step_ms).abs() <= 0.01 * step_ms + 0.01, "{r}");
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("tokens/s"), "{summary}");

    let bad = std::process::Command::new(bin)
        .args(["bench", "recipe", "--device", "cpu", "--warmup", "0"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        e.contains("--warmup and --steps must be at least 1") && e.lines().count() == 1,
        "{e}"
    );
}
