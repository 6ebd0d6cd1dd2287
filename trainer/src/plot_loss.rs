//! `mixlora plot-loss`: the training-loss curves of several runs in one PNG, from their
//! `metrics.jsonl`: this trainer's (lines of `"kind": "train"`; evaluation lines are skipped) or
//! any file of one JSON object per optimizer step with `"step"` and `"loss"` (the reference
//! trainer's harness writes those). Each curve is the moving mean over `smooth` steps, so that
//! runs of batch 16 read as trends rather than noise.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::error::{Error, Result};

/// One run's per-step losses, in step order.
#[derive(Debug, Clone, PartialEq)]
pub struct LossCurve {
    pub label: String,
    /// `(step, loss)`.
    pub points: Vec<(usize, f64)>,
}

impl LossCurve {
    /// The mean loss of the last `frac` of the steps (at least one step).
    pub fn tail_mean(&self, frac: f64) -> f64 {
        let n = ((self.points.len() as f64 * frac).ceil() as usize).clamp(1, self.points.len());
        let tail = &self.points[self.points.len() - n..];
        tail.iter().map(|p| p.1).sum::<f64>() / n as f64
    }
}

/// Reads the training losses of `path`: a `metrics.jsonl`, or a run folder that holds one.
pub fn read_losses(label: &str, path: &Path) -> Result<LossCurve> {
    let file: PathBuf = if path.is_dir() {
        path.join("metrics.jsonl")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
    let bad =
        |line: usize, msg: &str| Error::Config(format!("{} line {line}: {msg}", file.display()));
    let mut points: Vec<(usize, f64)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let j: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(i + 1, &format!("not JSON: {e}")))?;
        if j.get("kind").is_some_and(|k| k != "train") {
            continue;
        }
        let step = j["step"]
            .as_u64()
            .ok_or_else(|| bad(i + 1, "no integer `step`"))? as usize;
        let loss = j["loss"]
            .as_f64()
            .ok_or_else(|| bad(i + 1, "no number `loss`"))?;
        if let Some(&(last, _)) = points.last() {
            if step <= last {
                return Err(bad(
                    i + 1,
                    &format!("step {step} after step {last}: one run per file, in step order"),
                ));
            }
        }
        points.push((step, loss));
    }
    if points.is_empty() {
        return Err(Error::Config(format!(
            "{}: no training steps (lines with `step` and `loss`)",
            file.display()
        )));
    }
    Ok(LossCurve {
        label: label.to_string(),
        points,
    })
}

/// The moving mean of `points`' losses over windows of `window` steps (the window shrinks at
/// the start): a curve of the same steps.
pub fn smooth(points: &[(usize, f64)], window: usize) -> Vec<(usize, f64)> {
    let w = window.max(1);
    let mut sum = 0.0;
    points
        .iter()
        .enumerate()
        .map(|(i, &(step, loss))| {
            sum += loss;
            if i >= w {
                sum -= points[i - w].1;
            }
            (step, sum / (i + 1).min(w) as f64)
        })
        .collect()
}

/// The default window: 1% of the longest run's steps, at least 1.
pub fn default_window(curves: &[LossCurve]) -> usize {
    let longest = curves.iter().map(|c| c.points.len()).max().unwrap_or(0);
    (longest / 100).max(1)
}

/// Draws `curves`, each smoothed over `window` steps, into a PNG at `out` with the font file
/// `font` (registered as plot-routing does).
pub fn plot_losses(curves: &[LossCurve], window: usize, out: &Path, font: &Path) -> Result<()> {
    let err = |what: &str, e: &dyn std::fmt::Display| {
        Error::Config(format!("{}: {what}: {e}", out.display()))
    };
    crate::plot::register_font_file(font)?;
    let lines: Vec<Vec<(usize, f64)>> = curves.iter().map(|c| smooth(&c.points, window)).collect();
    let max_step = lines
        .iter()
        .flatten()
        .map(|p| p.0)
        .max()
        .unwrap_or(1)
        .max(1);
    let (lo, hi) = lines
        .iter()
        .flatten()
        .map(|p| p.1)
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return Err(Error::Config(format!(
            "{}: no finite loss to draw",
            out.display()
        )));
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let root = BitMapBackend::new(out, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| err("drawing", &x))?;
    let caption = if window > 1 {
        format!("training loss (moving mean of {window} steps)")
    } else {
        "training loss".to_string()
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0usize..max_step, (lo - pad)..(hi + pad))
        .map_err(|x| err("chart", &x))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|x| err("axes", &x))?;
    for (k, (c, line)) in curves.iter().zip(&lines).enumerate() {
        let colour = Palette99::pick(k).to_rgba();
        chart
            .draw_series(LineSeries::new(
                line.iter().copied().filter(|p| p.1.is_finite()),
                colour.stroke_width(2),
            ))
            .map_err(|x| err("curves", &x))?
            .label(c.label.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], colour.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|x| err("legend", &x))?;
    root.present().map_err(|x| err("writing the PNG", &x))?;
    Ok(())
}

/// One line per run for a person: steps, first and last loss, the mean of the last 10%.
pub fn summary(c: &LossCurve) -> String {
    let (first, last) = (c.points[0], c.points[c.points.len() - 1]);
    format!(
        "{}: {} steps (to step {}), loss {:.4} -> {:.4}, mean of the last 10% {:.4}",
        c.label,
        c.points.len(),
        last.0,
        first.1,
        last.1,
        c.tail_mean(0.1)
    )
}
