//! `metrics.jsonl` (one JSON object per line, tagged `"kind": "train"` or `"eval"`) and the
//! progress bar with ETA, drawn on stderr and hidden when stderr is not a terminal (logs in
//! files stay clean; the lines of [`Progress::println`] still go to stderr).

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use engine::Tensor;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::eval::EvalReport;

/// What one optimizer step did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct StepMetrics {
    pub step: usize,
    pub epoch: f64,
    /// The language-model loss (mean over target tokens of the step).
    pub loss: f64,
    /// The load-balance loss, already times its coefficient (MixLoRA only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub aux_loss: Option<f64>,
    /// The router z-loss, already times its coefficient (MixLoRA with `router_z_loss` > 0).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub z_loss: Option<f64>,
    pub lr: f64,
    /// The gradient norm before clipping.
    pub grad_norm: f64,
    /// Real (non-padding) tokens per second over this step.
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    /// Per layer, the fraction of routed tokens each expert received.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub expert_load: Option<Vec<Vec<f64>>>,
}

impl StepMetrics {
    /// A short human-readable line: `step 10/100 loss 1.2345 aux 0.0012 lr 2.00e-4 ...`.
    pub fn summary(&self, total_steps: usize) -> String {
        let mut s = format!("step {}/{} loss {:.4}", self.step, total_steps, self.loss);
        if let Some(a) = self.aux_loss {
            s += &format!(" aux {a:.4}");
        }
        if let Some(z) = self.z_loss {
            s += &format!(" z {z:.4}");
        }
        s + &format!(
            " lr {:.2e} grad_norm {:.3} {:.0} tok/s epoch {:.2}",
            self.lr, self.grad_norm, self.tokens_per_s, self.epoch
        )
    }
}

/// An evaluation at some step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub step: usize,
    pub epoch: f64,
    #[serde(flatten)]
    pub report: EvalReport,
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Record {
    Train(StepMetrics),
    Eval(EvalMetrics),
}

impl Record {
    pub fn step(&self) -> usize {
        match self {
            Record::Train(m) => m.step,
            Record::Eval(m) => m.step,
        }
    }
    /// The JSON line (no newline).
    pub fn to_line(&self) -> String {
        // Serialising these plain structs cannot fail (non-finite floats become null).
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// Appends records to `metrics.jsonl`, one flushed line each.
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// A new, empty file.
    pub fn create(path: &Path) -> Result<MetricsWriter> {
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        Ok(MetricsWriter {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Continues the file of a resumed run: lines after `step` (written after the checkpoint that
    /// is resumed) are dropped, the rest kept.
    pub fn resume(path: &Path, step: usize) -> Result<MetricsWriter> {
        let kept: Vec<String> = match std::fs::read_to_string(path) {
            Ok(text) => text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                        .is_some_and(|s| s as usize <= step)
                })
                .map(str::to_string)
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
            Err(e) => return Err(Error::io(path, e)),
        };
        let mut text = kept.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        crate::checkpoint::write_synced(path, text.as_bytes())?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(MetricsWriter {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write(&mut self, rec: &Record) -> Result<()> {
        let line = rec.to_line() + "\n";
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// Per-layer expert loads (`ForwardOutput::expert_load`, one `[E]` tensor per layer) on the host.
pub fn expert_load_host(loads: &[Tensor]) -> Result<Vec<Vec<f64>>> {
    loads.iter().map(|t| Ok(t.to_vec_f64()?)).collect()
}

/// A progress bar over optimizer steps with ETA.
pub struct Progress {
    bar: ProgressBar,
    visible: bool,
    /// Prints nothing at all (the ranks other than 0 of a data-parallel run).
    quiet: bool,
}

impl Progress {
    /// A bar for steps `start..total` on stderr, hidden when stderr is not a terminal.
    pub fn new(total: usize, start: usize) -> Progress {
        Self::with_target(total, start, std::io::stderr().is_terminal())
    }

    /// A bar drawn on stderr when `visible`, else hidden.
    pub fn with_target(total: usize, start: usize, visible: bool) -> Progress {
        let target = if visible {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(total as u64), target);
        let style = ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_position(start as u64);
        bar.reset_eta();
        Progress {
            bar,
            visible,
            quiet: false,
        }
    }

    /// A bar that draws and prints nothing.
    pub fn quiet(total: usize, start: usize) -> Progress {
        Progress {
            quiet: true,
            ..Self::with_target(total, start, false)
        }
    }

    pub fn is_visible(&self) -> bool {
        self.visible
    }

    /// Moves the bar to `step` with a short status message.
    pub fn update(&self, step: usize, msg: String) {
        self.bar.set_position(step as u64);
        self.bar.set_message(msg);
    }

    /// A line on stderr, above the bar when it is drawn.
    pub fn println(&self, line: &str) {
        if self.quiet {
            return;
        }
        if self.visible {
            self.bar.suspend(|| eprintln!("{line}"));
        } else {
            eprintln!("{line}");
        }
    }

    /// Runs `f` with the bar cleared (another bar may be drawn meanwhile), then redraws it.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        if self.visible {
            self.bar.suspend(f)
        } else {
            f()
        }
    }

    pub fn position(&self) -> usize {
        self.bar.position() as usize
    }

    pub fn finish(&self) {
        self.bar.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::TaskResult;
    use serde_json::{json, Value};

    fn train(step: usize) -> Record {
        Record::Train(StepMetrics {
            step,
            epoch: 0.5,
            loss: 2.25,
            aux_loss: None,
            z_loss: None,
            lr: 1e-4,
            grad_norm: 0.75,
            tokens_per_s: 1000.0,
            elapsed_s: 3.0,
            expert_load: None,
        })
    }

    #[test]
    fn train_line_format() {
        let line = train(3).to_line();
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            v,
            json!({"kind":"train","step":3,"epoch":0.5,"loss":2.25,"lr":1e-4,"grad_norm":0.75,
                   "tokens_per_s":1000.0,"elapsed_s":3.0})
        );
        let mut m = StepMetrics {
            aux_loss: Some(0.01),
            expert_load: Some(vec![vec![0.5, 0.5], vec![1.0, 0.0]]),
            ..Default::default()
        };
        m.loss = f64::NAN;
        let v: Value = serde_json::from_str(&Record::Train(m).to_line()).unwrap();
        assert_eq!(v["aux_loss"], json!(0.01));
        assert_eq!(v["expert_load"], json!([[0.5, 0.5], [1.0, 0.0]]));
        assert_eq!(
            v["loss"],
            Value::Null,
            "a NaN loss is written as null, the line stays valid"
        );
        assert!(train(12).to_line().len() < 200);
        assert!(StepMetrics::default()
            .summary(10)
            .starts_with("step 0/10 loss 0.0000 lr"));
    }

    #[test]
    fn eval_line_format() {
        let report = EvalReport::from_results(vec![
            TaskResult::new("boolq", 3, 4),
            TaskResult::new("arc_e", 1, 4),
        ]);
        let rec = Record::Eval(EvalMetrics {
            step: 7,
            epoch: 1.0,
            report,
        });
        let v: Value = serde_json::from_str(&rec.to_line()).unwrap();
        assert_eq!(v["kind"], "eval");
        assert_eq!(v["step"], 7);
        assert_eq!(v["average"], 0.5);
        assert_eq!(
            v["tasks"][0],
            json!({"task":"boolq","correct":3,"total":4,"accuracy":0.75})
        );
        assert_eq!(serde_json::from_value::<Record>(v).unwrap(), rec);
    }

    #[test]
    fn writer_appends_lines_and_resume_drops_later_ones() {
        let p = std::env::temp_dir().join(format!("mixlora-metrics-{}.jsonl", std::process::id()));
        let mut w = MetricsWriter::create(&p).unwrap();
        for s in 1..=5 {
            w.write(&train(s)).unwrap();
        }
        drop(w);
        let lines = |p: &Path| {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(lines(&p).len(), 5);
        let mut w = MetricsWriter::resume(&p, 3).unwrap();
        w.write(&train(4)).unwrap();
        let steps: Vec<u64> = lines(&p)
            .iter()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, vec![1, 2, 3, 4]);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn hidden_progress_tracks_position() {
        let p = Progress::with_target(100, 10, false);
        assert!(!p.is_visible());
        p.update(11, "loss 1.0".into());
        p.println("a log line");
        assert_eq!(p.position(), 11);
        p.finish();
    }

    #[test]
    fn expert_loads_to_host() {
        let t =
            Tensor::from_f64(&[0.25, 0.75], 2, engine::DType::F32, engine::Device::Cpu).unwrap();
        assert_eq!(expert_load_host(&[t]).unwrap(), vec![vec![0.25, 0.75]]);
    }
}
