//! `mixlora plot-routing`: reading the routing JSON (with one-line errors naming the file) and
//! drawing the PNG (one panel per task).

use std::path::PathBuf;

use trainer::plot::{find_font, plot_routing, read_routing};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mixlora-plot-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn routing_json(tasks: usize, layers: usize, e: usize) -> String {
    let share = |t: usize, l: usize, x: usize| ((t + 2 * l + 3 * x) % 5 + 1) as f64;
    let mut obj = serde_json::Map::new();
    for t in 0..tasks {
        let rows: Vec<Vec<f64>> = (0..layers)
            .map(|l| {
                let raw: Vec<f64> = (0..e).map(|x| share(t, l, x)).collect();
                let total: f64 = raw.iter().sum();
                raw.iter().map(|v| v / total).collect()
            })
            .collect();
        obj.insert(format!("task{t}"), serde_json::json!(rows));
    }
    serde_json::json!({"num_experts": e, "layers": layers, "tasks": obj}).to_string()
}

#[test]
fn reads_the_eval_json_and_draws_one_panel_per_task() {
    let input = tmp("routing.json");
    std::fs::write(&input, routing_json(3, 5, 8)).unwrap();
    let shares = read_routing(&input).unwrap();
    assert_eq!(shares.num_experts, 8);
    assert_eq!(shares.tasks.len(), 3);
    assert!(shares.tasks.iter().all(|(_, l)| l.len() == 5));
    let Some(font) = find_font(None) else {
        testutil::skip("no TrueType font on this machine (set MIXLORA_FONT to draw)");
        return;
    };
    let out = tmp("routing.png");
    plot_routing(&shares, &out, &font).unwrap();
    let png = std::fs::read(&out).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // IHDR: width and height, big-endian, at bytes 16..24: three panels side by side.
    let w = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!(w % 3, 0, "{w}");
    assert!(w > 3 * 8 * 40 && h > 5 * 14, "{w}x{h}");
}

#[test]
fn malformed_routing_files_are_one_line_errors_naming_the_file() {
    let cases = [
        ("not json", "not JSON"),
        (
            r#"{"num_experts": 0, "tasks": {"a": [[1.0]]}}"#,
            "num_experts",
        ),
        (r#"{"num_experts": 2, "tasks": {}}"#, "tasks"),
        (r#"{"num_experts": 2, "tasks": {"a": []}}"#, "no layers"),
        (
            r#"{"num_experts": 2, "tasks": {"a": [[0.5]]}}"#,
            "expected 2",
        ),
        (
            r#"{"num_experts": 2, "tasks": {"a": [[0.5, -1.0]]}}"#,
            "non-negative",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let p = tmp(&format!("bad{i}.json"));
        std::fs::write(&p, text).unwrap();
        let e = read_routing(&p).unwrap_err().to_string();
        assert!(
            e.contains(want) && e.contains(&format!("bad{i}.json")),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
    }
    let e = read_routing(&tmp("missing.json")).unwrap_err().to_string();
    assert!(e.contains("missing.json"), "{e}");
}
