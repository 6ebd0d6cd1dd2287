//! `mixlora bench recipe` on the CPU: the built-in model and the embedded tasks (ragged lengths),
//! the real training loop timed; the report's figures are consistent and the bad arguments are
//! one-line errors.

/// `bench recipe` on the CPU in f32, a step of warm-up, batch 4 in micro-batches of 2.
const CPU_RUN: [&str; 12] = [
    "bench",
    "recipe",
    "--device",
    "cpu",
    "--dtype",
    "f32",
    "--warmup",
    "1",
    "--batch",
    "4",
    "--micro-batch",
    "2",
];

#[test]
fn the_recipe_bench_times_the_training_loop() {
    let bin = env!("CARGO_BIN_EXE_mixlora");
    let json = std::env::temp_dir().join(format!("mixlora-recipe-{}.json", std::process::id()));
    let out = std::process::Command::new(bin)
        .args(CPU_RUN)
        .args(["--steps", "3", "--cutoff-len", "320", "--json"])
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
    assert!(r["driver_allocs_per_step"].is_null(), "{r}");
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

/// `bench recipe`'s arguments as the command line gives them.
fn recipe_args(args: &[&str]) -> trainer::bench::recipe::RecipeArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: trainer::bench::recipe::RecipeArgs,
    }
    Cli::try_parse_from(std::iter::once("recipe").chain(args.iter().copied()))
        .expect("arguments")
        .a
}

/// A short f32 run on the CPU (a step of warm-up, two timed, batch 4) with `extra` arguments.
fn cpu_recipe_args(extra: &[&str]) -> trainer::bench::recipe::RecipeArgs {
    let base = [
        "--device", "cpu", "--dtype", "f32", "--warmup", "1", "--steps", "2", "--batch", "4",
    ];
    let args: Vec<&str> = base.iter().chain(extra).copied().collect();
    recipe_args(&args)
}

#[test]
fn the_recipe_bench_runs_data_parallel_over_the_same_global_batch() {
    // Two ranks as threads (the in-process communicator): the steps are `mixlora train`'s data
    // parallel ones, so the timed steps hold the same real tokens as one process's, and the
    // report says how many ranks ran them.
    let a = cpu_recipe_args(&["--micro-batch", "1", "--cutoff-len", "160"]);
    let one = trainer::bench::recipe::recipe(&a, |_| {}).expect("one process");
    assert_eq!(one.ranks, 1);
    let comms = engine::dist::FakeComm::world(2, std::time::Duration::from_secs(120));
    let ranks: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let a = &a;
                s.spawn(move || trainer::bench::recipe::recipe_on(a, Some(&c), |_| {}))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in ranks {
        let r = r.expect("a rank");
        assert_eq!((r.ranks, r.steps, r.tokens), (2, one.steps, one.tokens));
        assert!(r.tokens_per_s > 0.0);
    }
    let json: serde_json::Value =
        serde_json::from_str(&trainer::bench::recipe::recipe_json(&a, &one)).unwrap();
    assert_eq!(json["gpus"], 1);
}

/// `--profile-rows N` prints, after the figures, where `--steps` more steps' time went: at most N
/// op rows, then the total (stderr; the summary on stdout stays one line).
#[test]
fn the_recipe_bench_prints_an_op_profile_on_request() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mixlora"))
        .args(CPU_RUN)
        .args(["--steps", "2", "--profile-rows", "5"])
        .output()
        .unwrap();
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{e}");
    assert_eq!(o.lines().count(), 1, "{o}");
    let at = e
        .find("profile of 2 more steps:")
        .unwrap_or_else(|| panic!("{e}"));
    let table: Vec<&str> = e[at..].lines().skip(2).collect();
    let total = table
        .iter()
        .position(|l| l.ends_with("total in backend ops"));
    let total = total.unwrap_or_else(|| panic!("no total in {e}"));
    assert!((1..=5).contains(&total), "{total} op rows: {e}");
    let ms: f64 = table[total]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(ms > 0.0, "{e}");
}

/// `--adapters N`: N adapters (seeds `--seed`, `--seed` + 1) trained together as a seed sweep
/// trains them, in fixed shapes and in every group mode: the timed steps hold more real tokens
/// than one adapter's (each adapter its own data order), the report says how many and how.
#[test]
fn the_recipe_bench_times_several_adapters_on_one_base() {
    let one = trainer::bench::recipe::recipe(&cpu_recipe_args(&["--micro-batch", "2"]), |_| {})
        .expect("one adapter");
    for mode in ["exact", "sequential", "shared"] {
        let a = cpu_recipe_args(&[
            "--micro-batch",
            "2",
            "--adapters",
            "2",
            "--group-mode",
            mode,
            "--cuda-graphs",
            if mode == "shared" { "off" } else { "eager" },
        ]);
        let mut lines = Vec::new();
        let two = trainer::bench::recipe::recipe(&a, |l| lines.push(l.to_string())).expect(mode);
        assert_eq!(two.steps, one.steps, "{mode}");
        assert!(
            two.tokens > one.tokens,
            "{mode}: {} vs {}",
            two.tokens,
            one.tokens
        );
        if mode != "shared" {
            for n in ["seed42", "seed43"] {
                let tag = format!("[{n}] fixed-shape micro-steps:");
                assert!(
                    lines.iter().any(|l| l.starts_with(&tag)),
                    "{mode}: {lines:#?}"
                );
            }
        }
        let json: serde_json::Value =
            serde_json::from_str(&trainer::bench::recipe::recipe_json(&a, &two)).unwrap();
        assert_eq!(
            (json["adapters"].as_u64(), json["group_mode"].as_str()),
            (Some(2), Some(mode))
        );
    }
    let e = trainer::bench::recipe::recipe(&cpu_recipe_args(&["--adapters", "0"]), |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("--adapters must be at least 1"), "{e}");
}

#[test]
fn the_recipe_bench_refuses_gpus_on_the_cpu() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mixlora"))
        .args(["bench", "recipe", "--device", "cpu", "--gpus", "2"])
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        e.lines().count() == 1 && (e.contains("needs --device cuda") || e.contains("CUDA build")),
        "{e}"
    );
}

#[test]
fn the_recipe_bench_times_fixed_shape_and_packed_steps_on_the_same_data() {
    // `--cuda-graphs eager` pads the same micro-batches to fixed shapes: the timed steps hold the
    // same real tokens. `--packing` fills rows with several examples: more real tokens a step.
    let with = |extra: &[&str]| {
        let base = ["--micro-batch", "2", "--cutoff-len", "512"];
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let a = cpu_recipe_args(&args);
        let r = trainer::bench::recipe::recipe(&a, |_| {}).expect("bench");
        (r.tokens, trainer::bench::recipe::recipe_json(&a, &r))
    };
    let (off, off_json) = with(&[]);
    let (fixed, fixed_json) = with(&["--cuda-graphs", "eager"]);
    let (packed, packed_json) = with(&["--packing"]);
    let (auto, auto_json) = with(&["--cuda-graphs", "auto"]);
    assert_eq!(off, fixed, "fixed shapes add only padding");
    assert_eq!(auto, off);
    assert!(
        packed > off,
        "packed rows hold more examples: {packed} vs {off}"
    );
    let v = |j: &str| serde_json::from_str::<serde_json::Value>(j).unwrap();
    let (o, f, p) = (v(&off_json), v(&fixed_json), v(&packed_json));
    assert_eq!(
        (o["cuda_graphs"].as_str(), o["packing"].as_bool()),
        (Some("off"), Some(false))
    );
    assert_eq!(f["cuda_graphs"].as_str(), Some("eager"));
    assert_eq!(p["packing"].as_bool(), Some(true));
    // The JSON says what ran: `auto` on the CPU is `off`.
    assert_eq!(v(&auto_json)["cuda_graphs"].as_str(), Some("off"));
}

/// The SmolLM2 GGUF that `scripts/fetch-smollm2.sh` fetches (`$MIXLORA_SMOLLM2_GGUF`, else in
/// `$MIXLORA_CACHE` or `~/.cache/mixlora`); `None`, saying why, when it is absent.
fn smollm2_gguf() -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    let path = match std::env::var_os("MIXLORA_SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => std::env::var_os("MIXLORA_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/mixlora")))?
            .join("SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    if path.is_file() {
        return Some(path);
    }
    eprintln!(
        "SKIPPED: {} not found (run scripts/fetch-smollm2.sh or set MIXLORA_SMOLLM2_GGUF)",
        path.display()
    );
    None
}

/// A GGUF file's bytes with its metadata kept and its tensors left out (a header that says 0
/// tensors, then the metadata entries as they are).
fn metadata_only(gguf: &[u8]) -> Vec<u8> {
    let mut pos = 4; // after the magic
    let u32_at = |pos: &mut usize| {
        let v = u32::from_le_bytes(gguf[*pos..*pos + 4].try_into().unwrap());
        *pos += 4;
        v
    };
    let version = u32_at(&mut pos);
    let u64_at = |pos: &mut usize| {
        let v = u64::from_le_bytes(gguf[*pos..*pos + 8].try_into().unwrap());
        *pos += 8;
        v
    };
    let _tensors = u64_at(&mut pos);
    let n_kv = u64_at(&mut pos);
    let start = pos;
    // Bytes of the scalar value types; 8 is a string, 9 an array.
    let size = |t: u32| [1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8][t as usize];
    let skip_string = |pos: &mut usize| {
        let n = u64_at(pos) as usize;
        *pos += n;
    };
    for _ in 0..n_kv {
        skip_string(&mut pos);
        let t = u32::from_le_bytes(gguf[pos..pos + 4].try_into().unwrap());
        pos += 4;
        match t {
            8 => skip_string(&mut pos),
            9 => {
                let item = u32::from_le_bytes(gguf[pos..pos + 4].try_into().unwrap());
                pos += 4;
                let count = u64_at(&mut pos) as usize;
                if item == 8 {
                    (0..count).for_each(|_| skip_string(&mut pos));
                } else {
                    pos += size(item) * count;
                }
            }
            t => pos += size(t),
        }
    }
    let mut out = b"GGUF".to_vec();
    out.extend(version.to_le_bytes());
    out.extend(0u64.to_le_bytes());
    out.extend(n_kv.to_le_bytes());
    out.extend(&gguf[start..pos]);
    out
}

/// With `--shape`, the model file gives only its tokenizer: a copy of the SmolLM2 GGUF without
/// its tensors (which `mixlora train` refuses, naming a missing tensor) runs the bench at the
/// tiny shape with SmolLM2's vocabulary.
#[test]
fn a_shape_reads_only_the_model_files_tokenizer() {
    let Some(gguf) = smollm2_gguf() else { return };
    let dir = std::env::temp_dir().join(format!("mixlora-recipe-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tok = dir.join("smollm2-metadata.gguf");
    std::fs::write(&tok, metadata_only(&std::fs::read(&gguf).unwrap())).unwrap();
    assert!(std::fs::metadata(&tok).unwrap().len() < 4 << 20);
    let path = tok.to_str().unwrap();
    let args = [
        "--model",
        path,
        "--shape",
        "tiny",
        "--micro-batch",
        "2",
        "--cutoff-len",
        "160",
    ];
    let a = cpu_recipe_args(&args);
    let r = trainer::bench::recipe::recipe(&a, |_| {}).expect("the shape bench on the tokenizer");
    assert!(r.tokens > 0 && r.tokens_per_s > 0.0);

    let bin = env!("CARGO_BIN_EXE_mixlora");
    let out = std::process::Command::new(bin)
        .args(["train", "--max-steps", "1", "--model", path, "--out"])
        .arg(dir.join("run"))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        e.contains("smollm2-metadata.gguf") && e.contains("not found"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
