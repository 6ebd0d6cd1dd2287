//! `mixlora bench table6` on a tiny shape on the CPU: every variant runs, with and without
//! gradient checkpointing, and the JSON report has the keys the benchmark files use.

use trainer::bench::{table6, table6_json, BenchShape, BenchVariant, Table6Args};

fn args(checkpointing: bool) -> Table6Args {
    Table6Args {
        device: engine::Device::Cpu,
        shape: BenchShape::Tiny,
        batch: 2,
        seq: 16,
        layers: Some(1),
        warmup: 1,
        steps: 1,
        variants: vec![],
        gradient_checkpointing: checkpointing,
        base_dtype: Default::default(),
        group_mode: None,
        attention: None,
        adapters: vec![],
        json: None,
        fused: Default::default(),
        profile: Default::default(),
    }
}

#[test]
fn table6_runs_every_variant_and_reports_json() {
    for ck in [false, true] {
        let a = args(ck);
        let t6 = table6(&a, |_| {}).unwrap();
        assert!(t6.failed.is_empty(), "{:?}", t6.failed);
        let results = &t6.results;
        let keys: Vec<BenchVariant> = results.iter().map(|r| r.variant).collect();
        assert!(keys.contains(&BenchVariant::Lora) && keys.contains(&BenchVariant::MixloraNaive));
        for r in results {
            assert!(r.loss.is_finite() && r.fwd_us_per_token > 0.0 && r.bwd_us_per_token > 0.0);
            // The CPU backend counts its live tensor buffers: a peak of some bytes at least.
            assert!(
                r.peak_gib.is_some_and(|p| p > 0.0 && p < 1.0),
                "CPU peak {:?}",
                r.peak_gib
            );
        }
        let json: serde_json::Value = serde_json::from_str(&table6_json(&a, &t6).unwrap()).unwrap();
        for key in ["device", "batch", "seq"] {
            assert!(json.get(key).is_some(), "{key} missing");
        }
        for v in [
            "lora",
            "mixlora_naive",
            "mixlora_paper",
            "mixlora_grouped",
            "mixlora_fused",
        ] {
            for k in [
                "fwd_us_per_token",
                "bwd_us_per_token",
                "tokens_per_s",
                "peak_gib",
            ] {
                assert!(json[v].get(k).is_some(), "{v}.{k} missing");
            }
        }
        assert_eq!(json["gradient_checkpointing"], ck);
    }
}

#[test]
fn table6_rejects_zero_steps() {
    let mut a = args(false);
    a.steps = 0;
    let e = table6(&a, |_| {}).unwrap_err().to_string();
    assert!(e.contains("--steps"), "{e}");
}

#[test]
fn table6_on_an_fp8_base_reports_its_variants_with_an_fp8_suffix() {
    let dense = Table6Args {
        variants: vec![BenchVariant::Lora, BenchVariant::MixloraFused],
        ..args(false)
    };
    let fp8 = Table6Args {
        base_dtype: trainer::config::BaseDTypeName::Fp8,
        variants: dense.variants.clone(),
        ..args(false)
    };
    let (td, tq) = (
        table6(&dense, |_| {}).unwrap(),
        table6(&fp8, |_| {}).unwrap(),
    );
    assert!(tq.failed.is_empty(), "{:?}", tq.failed);
    for (d, q) in td.results.iter().zip(&tq.results) {
        assert_eq!(d.variant, q.variant);
        assert!(q.loss.is_finite());
        assert_ne!(
            d.loss, q.loss,
            "{:?}: the FP8 products did not run",
            q.variant
        );
    }
    let json: serde_json::Value = serde_json::from_str(&table6_json(&fp8, &tq).unwrap()).unwrap();
    assert_eq!(json["base_dtype"], "fp8");
    for v in ["lora_fp8", "mixlora_fused_fp8"] {
        assert!(json[v].get("tokens_per_s").is_some(), "{v} missing: {json}");
    }
    assert!(json.get("lora").is_none(), "{json}");
    let json: serde_json::Value = serde_json::from_str(&table6_json(&dense, &td).unwrap()).unwrap();
    assert_eq!(json["base_dtype"], "same");
    assert!(json["lora"].get("tokens_per_s").is_some(), "{json}");
}
