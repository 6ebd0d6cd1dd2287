//! `mixlora plot-routing`: the routing picture of a MixLoRA adapter, from the JSON that
//! `mixlora eval --routing` writes: one heatmap per task, layers down and experts across, each
//! cell the share of that layer's routed (token, slot) pairs that went to the expert (a uniform
//! router gives `1/E` everywhere). The colour scale runs from white (0) to dark blue (the
//! largest share in the file), and every cell is labelled with its share in percent.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::error::{Error, Result};

/// Where a TrueType font is looked for when none is given.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// The font file to use: `font`, else the first of [`FONT_CANDIDATES`] that exists.
pub fn find_font(font: Option<&Path>) -> Option<PathBuf> {
    font.map(Path::to_path_buf).or_else(|| {
        FONT_CANDIDATES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
    })
}

/// Makes the TrueType font file `font` the plots' "sans-serif" (plotters keeps it for the life
/// of the process).
pub(crate) fn register_font_file(font: &Path) -> Result<()> {
    let bytes = std::fs::read(font).map_err(|e| Error::io(font, e))?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| Error::Config(format!("{}: not a TrueType font", font.display())))
}

/// Routing shares: per task (in file order), `[layer][expert]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingShares {
    pub num_experts: usize,
    pub tasks: Vec<(String, Vec<Vec<f64>>)>,
}

/// Reads the JSON of `mixlora eval --routing`.
pub fn read_routing(path: &Path) -> Result<RoutingShares> {
    let bad = |msg: String| Error::Config(format!("{}: {msg}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    let j: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let e = j["num_experts"]
        .as_u64()
        .filter(|&e| e > 0)
        .ok_or_else(|| bad("no positive `num_experts`".into()))? as usize;
    let tasks = j["tasks"]
        .as_object()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| bad("no `tasks` object".into()))?;
    let mut out = Vec::new();
    for (name, layers) in tasks {
        let rows = layers
            .as_array()
            .filter(|l| !l.is_empty())
            .ok_or_else(|| bad(format!("task {name}: no layers")))?;
        let mut shares = Vec::new();
        for (li, row) in rows.iter().enumerate() {
            let v: Option<Vec<f64>> = row
                .as_array()
                .map(|r| r.iter().map(serde_json::Value::as_f64).collect())
                .unwrap_or(None);
            match v {
                Some(v) if v.len() == e && v.iter().all(|x| x.is_finite() && *x >= 0.0) => {
                    shares.push(v)
                }
                _ => {
                    return Err(bad(format!(
                        "task {name}, layer {li}: expected {e} non-negative shares"
                    )))
                }
            }
        }
        out.push((name.clone(), shares));
    }
    Ok(RoutingShares {
        num_experts: e,
        tasks: out,
    })
}

/// Draws `shares` into a PNG at `out` with the font file `font`.
pub fn plot_routing(shares: &RoutingShares, out: &Path, font: &Path) -> Result<()> {
    let err = |what: &str, e: &dyn std::fmt::Display| {
        Error::Config(format!("{}: {what}: {e}", out.display()))
    };
    register_font_file(font)?;

    let e = shares.num_experts;
    let layers = shares.tasks.iter().map(|(_, l)| l.len()).max().unwrap_or(1);
    let (cell_w, cell_h) = (44u32, (480 / layers as u32).clamp(14, 40));
    let panel_w = 90 + cell_w * e as u32;
    let panel_h = 100 + cell_h * layers as u32;
    let n = shares.tasks.len() as u32;
    let root = BitMapBackend::new(out, (panel_w * n, panel_h)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| err("drawing", &x))?;
    let top = shares
        .tasks
        .iter()
        .flat_map(|(_, l)| l.iter().flatten())
        .fold(0.0f64, |m, &x| m.max(x))
        .max(1e-12);
    for (panel, (task, rows)) in root.split_evenly((1, n as usize)).iter().zip(&shares.tasks) {
        let mut chart = ChartBuilder::on(panel)
            .caption(task, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(34)
            .y_label_area_size(40)
            .build_cartesian_2d(0.0..e as f64, 0.0..rows.len() as f64)
            .map_err(|x| err("chart", &x))?;
        // Tick labels sit in the middle of each cell: ticks at k + 0.5 show k.
        let (ne, nl) = (e as f64, rows.len() as f64);
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("expert")
            .y_desc("layer")
            .x_labels(e * 2 + 1)
            .y_labels(rows.len() * 2 + 1)
            .x_label_formatter(&|v| cell_label(*v, ne))
            .y_label_formatter(&|v| cell_label(*v, nl))
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(|x| err("axes", &x))?;
        for (l, row) in rows.iter().enumerate() {
            for (x, &share) in row.iter().enumerate() {
                let (xi, yi) = (x as f64, l as f64);
                let shade = RGBColor(
                    (255.0 * (1.0 - share / top)) as u8,
                    (255.0 * (1.0 - 0.8 * share / top)) as u8,
                    255,
                );
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(xi, yi), (xi + 1.0, yi + 1.0)],
                        shade.filled(),
                    )))
                    .map_err(|x| err("cells", &x))?;
                let ink = if share / top > 0.6 { WHITE } else { BLACK };
                chart
                    .draw_series(std::iter::once(Text::new(
                        format!("{:.0}", 100.0 * share),
                        (xi + 0.3, yi + 0.7),
                        ("sans-serif", 11).into_font().color(&ink),
                    )))
                    .map_err(|x| err("labels", &x))?;
            }
        }
    }
    root.present().map_err(|x| err("writing the PNG", &x))?;
    Ok(())
}

/// The label of tick `v` on an axis of `n` unit cells: the cell index at cell centres
/// (`k + 0.5`), nothing elsewhere.
fn cell_label(v: f64, n: f64) -> String {
    let k = v - 0.5;
    if k >= 0.0 && k < n && (k - k.round()).abs() < 1e-6 {
        format!("{}", k.round() as i64)
    } else {
        String::new()
    }
}
