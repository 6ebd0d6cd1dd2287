//! `mixlora plot-loss`: reading this trainer's metrics.jsonl and the reference harness's (one
//! object per step), smoothing, the PNG, the per-run lines of the command, and one-line errors
//! naming the file and line.

use std::path::PathBuf;

use trainer::plot::find_font;
use trainer::plot_loss::{default_window, plot_losses, read_losses, smooth, summary, LossCurve};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mixlora-plot-loss-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// This trainer's lines: train records with evaluations between them.
fn ours(steps: usize) -> String {
    let mut s = String::new();
    for k in 1..=steps {
        let loss = 2.0 / (k as f64).sqrt();
        s += &format!(
            "{{\"kind\":\"train\",\"step\":{k},\"epoch\":0.1,\"loss\":{loss},\"lr\":0.0002,\
             \"grad_norm\":1.0,\"tokens_per_s\":1.0,\"elapsed_s\":1.0}}\n"
        );
        if k % 4 == 0 {
            s += &format!("{{\"kind\":\"eval\",\"step\":{k},\"report\":{{\"average\":0.5}}}}\n");
        }
    }
    s
}

#[test]
fn reads_both_formats_smooths_and_draws() {
    let dir = tmp("run-a");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("metrics.jsonl"), ours(12)).unwrap();
    let a = read_losses("ours", &dir).unwrap();
    assert_eq!(a.points.len(), 12, "evaluation lines are skipped");
    assert_eq!(a.points[3], (4, 1.0));
    let reference = tmp("ref.jsonl");
    let lines: String = (1..=20)
        .map(|k| {
            format!(
                "{{\"step\": {k}, \"epoch\": 0.5, \"loss\": {}, \"aux_loss\": null}}\n",
                3.0 - 0.1 * k as f64
            )
        })
        .collect();
    std::fs::write(&reference, lines + "\n").unwrap();
    let b = read_losses("reference", &reference).unwrap();
    assert_eq!(b.points.len(), 20);
    assert!((b.tail_mean(0.1) - (1.1 + 1.0) / 2.0).abs() < 1e-12);
    // The moving mean: the window shrinks at the start, then slides.
    let m = smooth(&[(1, 1.0), (2, 3.0), (3, 5.0), (4, 7.0)], 2);
    assert_eq!(m, vec![(1, 1.0), (2, 2.0), (3, 4.0), (4, 6.0)]);
    assert_eq!(smooth(&m, 1), m);
    let curves = vec![a, b];
    assert_eq!(default_window(&curves), 1);
    let long = LossCurve {
        label: "long".into(),
        points: (1..=1000).map(|k| (k, 1.0)).collect(),
    };
    assert_eq!(default_window(&[long]), 10);
    assert!(
        summary(&curves[1]).starts_with("reference: 20 steps (to step 20), loss 2.9000 -> 1.0000")
    );
    let Some(font) = find_font(None) else {
        testutil::skip("no TrueType font on this machine (set MIXLORA_FONT to draw)");
        return;
    };
    let out = tmp("loss.png");
    plot_losses(&curves, 3, &out, &font).unwrap();
    let png = std::fs::read(&out).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let w = u32::from_be_bytes(png[16..20].try_into().unwrap());
    assert_eq!(w, 960);
}

#[test]
fn the_command_prints_a_line_per_run_and_writes_the_png() {
    let Some(font) = find_font(None) else {
        testutil::skip("no TrueType font on this machine (set MIXLORA_FONT to draw)");
        return;
    };
    let a = tmp("cmd-a.jsonl");
    std::fs::write(&a, ours(30)).unwrap();
    let dir = tmp("cmd-run");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("metrics.jsonl"), ours(10)).unwrap();
    let out = tmp("cmd.png");
    let bin = env!("CARGO_BIN_EXE_mixlora");
    let r = std::process::Command::new(bin)
        .args(["plot-loss", "--run"])
        .arg(format!("first={}", a.display()))
        .arg("--run")
        .arg(&dir)
        .arg("--out")
        .arg(&out)
        .arg("--font")
        .arg(&font)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines[0].starts_with("first: 30 steps"), "{stdout}");
    assert!(lines[1].starts_with("cmd-run: 10 steps"), "{stdout}");
    assert!(std::fs::metadata(&out).unwrap().len() > 1000);
}

#[test]
fn malformed_metrics_are_one_line_errors_naming_the_file_and_line() {
    let cases = [
        (
            "{\"step\": 1, \"loss\": 2.0}\nnot json\n",
            "line 2: not JSON",
        ),
        ("{\"step\": 1}\n", "line 1: no number `loss`"),
        ("{\"loss\": 1.0}\n", "line 1: no integer `step`"),
        (
            "{\"step\": 2, \"loss\": 1.0}\n{\"step\": 2, \"loss\": 1.0}\n",
            "line 2: step 2 after step 2",
        ),
        ("{\"kind\": \"eval\", \"step\": 4}\n", "no training steps"),
        ("", "no training steps"),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let p = tmp(&format!("bad{i}.jsonl"));
        std::fs::write(&p, text).unwrap();
        let e = read_losses("x", &p).unwrap_err().to_string();
        assert!(
            e.contains(want) && e.contains(&format!("bad{i}.jsonl")),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
    }
    let missing = read_losses("x", &tmp("missing.jsonl"))
        .unwrap_err()
        .to_string();
    assert!(
        missing.contains("missing.jsonl") && !missing.contains('\n'),
        "{missing}"
    );
}
