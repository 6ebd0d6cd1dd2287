//! `mixlora bench table6 --adapters N,...` on tiny shapes on the CPU: adapter groups of each
//! variant against the variant's single run, the JSON list and the markdown table, and the
//! refused lists.

use std::process::Command;

use trainer::bench::{
    table6_multi, table6_multi_json, table6_multi_markdown, BenchShape, BenchVariant, Table6Args,
};

fn args(checkpointing: bool, adapters: &[usize]) -> Table6Args {
    Table6Args {
        device: engine::Device::Cpu,
        shape: BenchShape::Tiny,
        batch: 2,
        seq: 8,
        layers: Some(1),
        warmup: 1,
        steps: 1,
        variants: vec![
            BenchVariant::Lora,
            BenchVariant::MixloraNaive,
            BenchVariant::MixloraFused,
        ],
        gradient_checkpointing: checkpointing,
        base_dtype: Default::default(),
        group_mode: None,
        attention: None,
        adapters: adapters.to_vec(),
        json: None,
        fused: Default::default(),
        profile: Default::default(),
    }
}

const SCHEMA: [&str; 9] = [
    "shape",
    "n_adapters",
    "gradient_checkpointing",
    "tokens_per_s_total",
    "peak_gib",
    "peak_gib_per_adapter",
    "single_tokens_per_s",
    "single_peak_gib",
    "variant",
];

#[test]
fn adapter_groups_are_measured_against_the_single_run() {
    for ck in [false, true] {
        let a = args(ck, &[1, 2]);
        let rows = table6_multi(&a, |_| {}).unwrap();
        let got: Vec<(BenchVariant, usize)> =
            rows.iter().map(|r| (r.variant, r.n_adapters)).collect();
        assert_eq!(
            got,
            [
                (BenchVariant::Lora, 1),
                (BenchVariant::Lora, 2),
                (BenchVariant::MixloraNaive, 1),
                (BenchVariant::MixloraNaive, 2),
                (BenchVariant::MixloraFused, 1),
                (BenchVariant::MixloraFused, 2),
            ]
        );
        for r in &rows {
            let what = format!("{:?} with {} (checkpointing {ck})", r.variant, r.n_adapters);
            let (g, s) = (r.grouped.as_ref().unwrap(), r.single.as_ref().unwrap());
            assert_eq!(r.gradient_checkpointing, ck);
            assert_eq!(g.losses.len(), r.n_adapters, "{what}");
            assert_eq!(s.losses.len(), 1, "{what}");
            assert!(g.losses.iter().all(|l| l.is_finite() && *l > 0.0), "{what}");
            assert!(g.tokens_per_s > 0.0 && s.tokens_per_s > 0.0, "{what}");
            assert!(r.tokens_per_s_ratio().unwrap() > 0.0, "{what}");
            // Adapter 0 of a group is the single run's adapter on its batch with its dropout
            // seeds: the grouped forward computes its loss bit for bit on the CPU.
            assert_eq!(g.losses[0].to_bits(), s.losses[0].to_bits(), "{what}");
            // Adapter 1 has its own batch.
            if r.n_adapters == 2 {
                assert_ne!(g.losses[1], g.losses[0], "{what}");
            }
            // The CPU counts its live tensor buffers: every run has a peak.
            assert!(g.peak_gib.is_some_and(|p| p > 0.0), "{what}");
            assert!(r.peak_gib_per_adapter().is_some_and(|p| p > 0.0), "{what}");
            assert!(
                r.memory_per_adapter_ratio().is_some_and(|x| x > 0.0),
                "{what}"
            );
        }
        let json: serde_json::Value =
            serde_json::from_str(&table6_multi_json(&a, &rows).unwrap()).unwrap();
        let list = json.as_array().expect("a list");
        assert_eq!(list.len(), 6);
        for (e, r) in list.iter().zip(&rows) {
            for k in SCHEMA {
                assert!(e.get(k).is_some(), "{k} missing in {e}");
            }
            assert_eq!(e["shape"], "tiny");
            assert_eq!(e["n_adapters"], r.n_adapters);
            assert_eq!(e["gradient_checkpointing"], ck);
            assert!(e["tokens_per_s_total"].as_f64().unwrap() > 0.0);
            assert!(e["single_tokens_per_s"].as_f64().unwrap() > 0.0);
            assert!(
                e["peak_gib"].is_number() && e["single_peak_gib"].is_number(),
                "{e}"
            );
            assert_eq!(e["losses"].as_array().unwrap().len(), r.n_adapters);
        }
        let variants: Vec<&str> = list
            .iter()
            .map(|e| e["variant"].as_str().unwrap())
            .collect();
        assert_eq!(variants[..2], ["lora", "lora"]);
        assert_eq!(variants[4], "mixlora_fused");
        let md = table6_multi_markdown(&a, &rows);
        assert!(md.contains("| lora | 2 |"), "{md}");
        assert!(md.contains(&format!(
            "gradient checkpointing {}",
            if ck { "on" } else { "off" }
        )));
        assert_eq!(md.lines().filter(|l| l.starts_with("| mixlora")).count(), 4);
    }
}

/// `--group-mode sequential`: each adapter's forward and backward before the next adapter's;
/// adapter 0 still computes the single run's loss bit for bit, adapter 1 its own, and the JSON
/// says the mode.
#[test]
fn adapters_one_after_another_are_measured_against_the_single_run() {
    let a = Table6Args {
        group_mode: Some(Some(model::GroupMode::Sequential)),
        variants: vec![BenchVariant::Lora, BenchVariant::MixloraFused],
        ..args(true, &[2])
    };
    let rows = table6_multi(&a, |_| {}).unwrap();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        let what = format!("{:?}", r.variant);
        let (g, s) = (r.grouped.as_ref().unwrap(), r.single.as_ref().unwrap());
        assert_eq!(g.losses.len(), 2, "{what}");
        assert_eq!(g.losses[0].to_bits(), s.losses[0].to_bits(), "{what}");
        assert_ne!(g.losses[1], g.losses[0], "{what}");
        assert!(g.tokens_per_s > 0.0 && g.peak_gib.is_some(), "{what}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&table6_multi_json(&a, &rows).unwrap()).unwrap();
    assert_eq!(json[0]["group_mode"], "sequential");
}

#[test]
fn the_single_run_is_measured_when_1_is_not_listed() {
    let mut a = args(false, &[2]);
    a.variants = vec![BenchVariant::Lora];
    let rows = table6_multi(&a, |_| {}).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].n_adapters, 2);
    let s = rows[0].single.as_ref().unwrap();
    assert!(s.tokens_per_s > 0.0 && s.losses[0].is_finite());
}

#[test]
fn bad_adapter_lists_are_refused() {
    let err = |list: &[usize]| {
        table6_multi(&args(false, list), |_| {})
            .unwrap_err()
            .to_string()
    };
    let e = err(&[1, 0]);
    assert!(e.contains("--adapters lists 0"), "{e}");
    let e = err(&[2, 1, 2]);
    assert!(e.contains("--adapters lists 2 twice"), "{e}");
    let e = err(&[]);
    assert!(e.contains("--adapters needs at least one number"), "{e}");
    let mut a = args(false, &[1]);
    a.steps = 0;
    let e = table6_multi(&a, |_| {}).unwrap_err().to_string();
    assert!(e.contains("--steps"), "{e}");
}

/// The command itself, at SmolLM2's shape cut to one layer: `--adapters 1,2` writes the JSON list
/// and prints the table; `--adapters 0` is refused in one line.
#[test]
fn the_command_writes_the_list_at_smollm2_shape() {
    let bin = env!("CARGO_BIN_EXE_mixlora");
    let json =
        std::env::temp_dir().join(format!("mixlora-bench-multi-{}.json", std::process::id()));
    let common = [
        "bench",
        "table6",
        "--device",
        "cpu",
        "--shape",
        "smollm2",
        "--layers",
        "1",
        "--batch",
        "1",
        "--seq",
        "8",
        "--warmup",
        "0",
        "--steps",
        "1",
        "--variants",
        "lora",
    ];
    let out = Command::new(bin)
        .args(common)
        .args(["--adapters", "1,2", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("smollm2, 1×8 tokens per adapter"),
        "{stdout}"
    );
    assert!(stdout.contains("| lora | 1 |") && stdout.contains("| lora | 2 |"));
    let list: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    let n: Vec<u64> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["n_adapters"].as_u64().unwrap())
        .collect();
    assert_eq!(n, [1, 2]);
    assert_eq!(list[0]["shape"], "smollm2");
    assert_eq!(list[1]["layers"], 1);

    let out = Command::new(bin)
        .args(common)
        .args(["--adapters", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--adapters lists 0"), "{stderr}");
}

/// What `--group-mode sequential` is for, measured by the command (one process per mode, so
/// that no other test moves the CPU's memory count): with gradient checkpointing, two fused
/// MixLoRA adapters one after another hold about one adapter's activations, so their peak per
/// adapter is well below the exact mode's (which holds both until the one backward).
#[test]
fn adapters_one_after_another_peak_below_the_exact_mode() {
    let per_adapter = |mode: &str| -> (f64, f64) {
        let json = std::env::temp_dir().join(format!(
            "mixlora-bench-multi-{mode}-{}.json",
            std::process::id()
        ));
        let out = Command::new(env!("CARGO_BIN_EXE_mixlora"))
            .args(["bench", "table6", "--device", "cpu", "--shape", "tiny"])
            .args(["--variants", "mixlora-fused", "--adapters", "2"])
            .args(["--gradient-checkpointing", "--group-mode", mode])
            .args(["--warmup", "1", "--steps", "1", "--json"])
            .arg(&json)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let list: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let _ = std::fs::remove_file(&json);
        let row = &list[0];
        assert_eq!(row["group_mode"], mode);
        let ratio = row["peak_gib_per_adapter"].as_f64().unwrap()
            / row["single_peak_gib"].as_f64().unwrap();
        (ratio, row["peak_gib"].as_f64().unwrap())
    };
    let (exact, exact_peak) = per_adapter("exact");
    let (sequential, sequential_peak) = per_adapter("sequential");
    eprintln!(
        "peak per adapter over single: exact {exact:.2} ({exact_peak} GiB), sequential \
         {sequential:.2} ({sequential_peak} GiB)"
    );
    assert!(
        sequential < 0.6 && sequential < exact - 0.1,
        "sequential {sequential:.2}, exact {exact:.2}"
    );
}
