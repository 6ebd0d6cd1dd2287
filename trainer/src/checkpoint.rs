//! Checkpoints: `OUT/checkpoint-STEP/` holds the adapter (written by the caller), the optimizer
//! state (`optimizer.safetensors`), the run's settings (`train_config.toml`, what `--resume`
//! compares its own with) and `trainer_state.json` (step, epoch, data cursor, RNG state, best and
//! last metrics).
//!
//! A checkpoint is written into `OUT/.tmp-checkpoint-STEP/`, every file and the folder are
//! fsynced, and only then is the folder renamed into place (and `OUT` fsynced): a crash or a failed
//! write (a full disk) never leaves a partial `checkpoint-STEP`, and the older checkpoints are only
//! pruned after the new one is complete. `latest` skips temporary folders and any checkpoint whose
//! state file is missing or unreadable.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::Cursor;
use crate::error::{Error, Result};
use crate::optim::AdamW;

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The settings of the run that wrote the checkpoint (as `OUT/train_config.toml`).
pub const SETTINGS_FILE: &str = "train_config.toml";
const PREFIX: &str = "checkpoint-";
const TMP_PREFIX: &str = ".tmp-checkpoint-";
const OLD_PREFIX: &str = ".old-checkpoint-";

/// Everything besides the weights and the optimizer moments that a resumed run needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    pub total_steps: usize,
    /// Epochs completed, as a fraction.
    pub epoch: f64,
    /// Where the data stream stands.
    pub cursor: Cursor,
    /// The host RNG (`engine::rng::Rng::state()`), for dropout seeds.
    pub rng: (u64, u64),
    /// Real tokens trained on so far.
    pub tokens_seen: u64,
    pub last_loss: Option<f64>,
    /// The best evaluation score so far (average accuracy) and its step.
    pub best_metric: Option<f64>,
    pub best_step: Option<usize>,
    /// The last evaluation report, as written to metrics.jsonl.
    pub last_eval: Option<serde_json::Value>,
    /// A hash of the tokenised training examples (`Dataset::fingerprint`): `--resume` refuses
    /// data that differs from the run's. Absent in checkpoints of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_fingerprint: Option<String>,
}

/// Whether `name` is an entry of an output folder that checkpoints make: `checkpoint-STEP` and
/// the temporary `.tmp-checkpoint-STEP` and `.old-checkpoint-STEP` (STEP a number: a user's
/// `checkpoint-notes` is not one).
pub fn is_checkpoint_entry(name: &str) -> bool {
    [PREFIX, TMP_PREFIX, OLD_PREFIX].iter().any(|p| {
        name.strip_prefix(p)
            .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// `OUT/checkpoint-STEP`.
pub fn checkpoint_dir(out_dir: &Path, step: usize) -> PathBuf {
    out_dir.join(format!("{PREFIX}{step}"))
}

/// Writes `bytes` to `path` and flushes them to the disk.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |e| Error::io(path, e);
    let mut f = File::create(path).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

/// fsyncs every file under `dir`, then `dir` itself.
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let p = entry.map_err(|e| Error::io(dir, e))?.path();
        if p.is_dir() {
            sync_tree(&p)?;
        } else {
            File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&p, e))?;
        }
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Saves a checkpoint of step `state.step` and keeps the newest `keep_last` ones. The adapter is
/// written by `write_adapter(dir)` into the (temporary) checkpoint folder, `settings` (the run's
/// `train_config.toml`) beside it. On failure nothing is left behind and the earlier checkpoints
/// are untouched; the error is one line naming the checkpoint and the file.
pub fn save<E: std::fmt::Display>(
    out_dir: &Path,
    state: &TrainerState,
    settings: &str,
    optimizer: &AdamW,
    write_adapter: impl FnOnce(&Path) -> std::result::Result<(), E>,
    keep_last: usize,
) -> Result<PathBuf> {
    let fin = checkpoint_dir(out_dir, state.step);
    fs::create_dir_all(out_dir).map_err(|e| Error::checkpoint(&fin, Error::io(out_dir, e)))?;
    let tmp = out_dir.join(format!("{TMP_PREFIX}{}", state.step));
    let written = write_tmp(&tmp, state, settings, optimizer, write_adapter);
    if let Err(msg) = written {
        let _ = fs::remove_dir_all(&tmp);
        return Err(Error::checkpoint(&fin, msg));
    }
    let placed = (|| -> Result<()> {
        // Saving the same step again replaces the folder in one step (or, where the system
        // cannot, by two renames that put the old one back on failure).
        let old = out_dir.join(format!("{OLD_PREFIX}{}", state.step));
        model::atomic_dir::replace_dir(&tmp, &fin, &old).map_err(|e| Error::io(&fin, e))?;
        sync_dir(out_dir)
    })();
    if let Err(e) = placed {
        let _ = fs::remove_dir_all(&tmp);
        return Err(Error::checkpoint(&fin, e));
    }
    prune(out_dir, keep_last);
    Ok(fin)
}

/// Fills the temporary folder; the message names the file that failed.
fn write_tmp<E: std::fmt::Display>(
    tmp: &Path,
    state: &TrainerState,
    settings: &str,
    optimizer: &AdamW,
    write_adapter: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<(), String> {
    if tmp.exists() {
        fs::remove_dir_all(tmp).map_err(|e| Error::io(tmp, e).to_string())?;
    }
    fs::create_dir_all(tmp).map_err(|e| Error::io(tmp, e).to_string())?;
    write_adapter(tmp).map_err(|e| format!("writing the adapter: {e}"))?;
    optimizer
        .save(&tmp.join(OPTIMIZER_FILE))
        .map_err(|e| e.to_string())?;
    write_synced(&tmp.join(SETTINGS_FILE), settings.as_bytes()).map_err(|e| e.to_string())?;
    let json = serde_json::to_vec_pretty(state).map_err(|e| e.to_string())?;
    // The state file goes last: its presence marks a complete checkpoint.
    write_synced(&tmp.join(STATE_FILE), &json).map_err(|e| e.to_string())?;
    sync_tree(tmp).map_err(|e| e.to_string())
}

/// Reads `dir/trainer_state.json`.
pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join(STATE_FILE);
    let text = fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    serde_json::from_str(&text).map_err(|e| Error::checkpoint(dir, format!("{STATE_FILE}: {e}")))
}

/// The complete checkpoints in `out_dir` (state file readable, optimizer file present, step as in
/// the folder name), oldest first. A missing `out_dir` has none.
pub fn list(out_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let rd = match fs::read_dir(out_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(Error::io(out_dir, e)),
    };
    let mut found = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(out_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(step) = name
            .strip_prefix(PREFIX)
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        let complete =
            dir.join(OPTIMIZER_FILE).is_file() && load_state(&dir).is_ok_and(|s| s.step == step);
        if complete {
            found.push((step, dir));
        }
    }
    found.sort();
    Ok(found)
}

/// The newest complete checkpoint and its state, for `--resume`.
pub fn latest(out_dir: &Path) -> Result<Option<(PathBuf, TrainerState)>> {
    match list(out_dir)?.pop() {
        None => Ok(None),
        Some((_, dir)) => {
            let s = load_state(&dir)?;
            Ok(Some((dir, s)))
        }
    }
}

/// Removes all but the newest `keep_last` complete checkpoints, and leftover temporary folders of
/// interrupted saves. Best effort: what cannot be removed now is tried again next time.
pub fn prune(out_dir: &Path, keep_last: usize) {
    if let Ok(all) = list(out_dir) {
        let n = all.len().saturating_sub(keep_last.max(1));
        for (_, dir) in &all[..n] {
            let _ = fs::remove_dir_all(dir);
        }
    }
    if let Ok(rd) = fs::read_dir(out_dir) {
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TMP_PREFIX) || name.starts_with(OLD_PREFIX) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::AdamWConfig;
    use engine::{DType, Device, Tensor};

    fn tmp_out(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mixlora-ckpt-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn optimizer() -> AdamW {
        let p = Tensor::zeros([2, 2], DType::F32, Device::Cpu)
            .unwrap()
            .to_var()
            .unwrap();
        AdamW::new(vec![("w".into(), p)], AdamWConfig::default()).unwrap()
    }

    fn state(step: usize) -> TrainerState {
        TrainerState {
            step,
            total_steps: 100,
            epoch: step as f64 / 10.0,
            cursor: Cursor {
                epoch: 0,
                position: step * 4,
            },
            rng: (42, step as u64 * 3),
            last_loss: Some(1.5),
            ..Default::default()
        }
    }

    fn adapter(bytes: &'static [u8]) -> impl FnOnce(&Path) -> std::io::Result<()> {
        move |d| fs::write(d.join("adapter_model.safetensors"), bytes)
    }

    #[test]
    fn save_then_latest_round_trips() {
        let out = tmp_out("roundtrip");
        let opt = optimizer();
        let d = save(&out, &state(10), "seed = 7\n", &opt, adapter(b"A10"), 3).unwrap();
        assert_eq!(d, out.join("checkpoint-10"));
        assert_eq!(
            fs::read_to_string(d.join(SETTINGS_FILE)).unwrap(),
            "seed = 7\n",
            "the run's settings travel with the checkpoint"
        );
        save(&out, &state(20), "", &opt, adapter(b"A20"), 3).unwrap();
        let (dir, s) = latest(&out).unwrap().unwrap();
        assert_eq!((dir, s), (out.join("checkpoint-20"), state(20)));
        assert_eq!(
            fs::read(out.join("checkpoint-20/adapter_model.safetensors")).unwrap(),
            b"A20"
        );
        assert!(out.join("checkpoint-20").join(OPTIMIZER_FILE).is_file());
        // Saving the same step again replaces it whole.
        save(&out, &state(20), "", &opt, adapter(b"B20"), 3).unwrap();
        assert_eq!(
            fs::read(out.join("checkpoint-20/adapter_model.safetensors")).unwrap(),
            b"B20"
        );
        fs::remove_dir_all(&out).unwrap();
    }

    #[test]
    fn failure_mid_write_keeps_the_previous_checkpoint() {
        let out = tmp_out("fail");
        let opt = optimizer();
        save(&out, &state(10), "", &opt, adapter(b"A10"), 3).unwrap();
        // The adapter writer dies half way, with the error a full disk gives.
        let e = save(
            &out,
            &state(20),
            "",
            &opt,
            |d: &Path| {
                fs::write(d.join("adapter_model.safetensors"), b"partial")?;
                let mut f = File::create("/dev/full").or_else(|_| File::create(d.join("x")))?;
                f.write_all(&[0; 1 << 16])?;
                f.sync_all()?;
                Err(std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    "No space left on device (os error 28)",
                ))
            },
            3,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with(&format!(
                "checkpoint {}: writing the adapter: ",
                out.join("checkpoint-20").display()
            )),
            "{e}"
        );
        assert!(e.contains("No space left"), "{e}");
        assert!(!e.contains('\n'));
        assert!(!out.join("checkpoint-20").exists());
        assert!(!out.join(".tmp-checkpoint-20").exists());
        let (dir, s) = latest(&out).unwrap().unwrap();
        assert_eq!((dir, s), (out.join("checkpoint-10"), state(10)));
        assert_eq!(
            fs::read(out.join("checkpoint-10/adapter_model.safetensors")).unwrap(),
            b"A10"
        );
        fs::remove_dir_all(&out).unwrap();
    }

    #[test]
    fn latest_ignores_temporary_and_incomplete_folders() {
        let out = tmp_out("incomplete");
        let opt = optimizer();
        save(&out, &state(10), "", &opt, adapter(b"A"), 3).unwrap();
        // A crash during a save leaves a temporary folder; a copied folder lacks its state file;
        // another has a state file for a different step, or garbage.
        for (name, state_text) in [
            (
                ".tmp-checkpoint-30",
                Some(serde_json::to_string(&state(30)).unwrap()),
            ),
            ("checkpoint-40", None),
            (
                "checkpoint-50",
                Some(serde_json::to_string(&state(7)).unwrap()),
            ),
            ("checkpoint-60", Some("{\"step\": ".to_string())),
        ] {
            let d = out.join(name);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join(OPTIMIZER_FILE), b"x").unwrap();
            if let Some(t) = state_text {
                fs::write(d.join(STATE_FILE), t).unwrap();
            }
        }
        fs::create_dir_all(out.join("checkpoint-latest")).unwrap();
        let (dir, s) = latest(&out).unwrap().unwrap();
        assert_eq!((dir, s.step), (out.join("checkpoint-10"), 10));
        // The next save clears the temporary folder.
        save(&out, &state(20), "", &opt, adapter(b"A"), 3).unwrap();
        assert!(!out.join(".tmp-checkpoint-30").exists());
        assert!(latest(&tmp_out("missing")).unwrap().is_none());
        fs::remove_dir_all(&out).unwrap();
    }

    #[test]
    fn keeps_the_newest_n() {
        let out = tmp_out("prune");
        let opt = optimizer();
        for step in [5, 10, 15, 20, 100] {
            save(&out, &state(step), "", &opt, adapter(b"A"), 2).unwrap();
        }
        let steps: Vec<usize> = list(&out).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![20, 100], "numeric, not lexicographic, order");
        fs::remove_dir_all(&out).unwrap();
    }

    #[test]
    fn optimizer_state_survives_a_checkpoint() {
        let out = tmp_out("optim");
        let p = Tensor::from_f64(&[1.0, 2.0], 2, DType::F32, Device::Cpu)
            .unwrap()
            .to_var()
            .unwrap();
        let mut opt = AdamW::new(vec![("w".into(), p.clone())], AdamWConfig::default()).unwrap();
        p.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        opt.step(0.1, 1.0).unwrap();
        let dir = save(&out, &state(1), "", &opt, adapter(b"A"), 1).unwrap();
        let q = Tensor::from_f64(&[1.0, 2.0], 2, DType::F32, Device::Cpu)
            .unwrap()
            .to_var()
            .unwrap();
        let mut opt2 = AdamW::new(vec![("w".into(), q)], AdamWConfig::default()).unwrap();
        opt2.load(&dir.join(OPTIMIZER_FILE)).unwrap();
        assert_eq!(opt2.steps(), 1);
        assert_eq!(
            opt2.to_safetensors().unwrap(),
            opt.to_safetensors().unwrap()
        );
        fs::remove_dir_all(&out).unwrap();
    }
}
