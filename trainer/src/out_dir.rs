//! The output folder of `mixlora train` (`--out`): the entries the trainer writes there, whether
//! the folder holds another run, the removal of that run for `--overwrite`, and the checks, made
//! before the first step, that the folder can be written and has room for a checkpoint.

use std::fs;
use std::path::Path;

use crate::checkpoint;
use crate::error::{Error, Result};

/// One line per logged step and evaluation.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// Every setting of the run (also in each checkpoint).
pub const SETTINGS_FILE: &str = checkpoint::SETTINGS_FILE;
/// The final adapter.
pub const ADAPTER_DIR: &str = "adapter";
/// The last evaluation report of a run with evaluation data.
pub const EVAL_FILE: &str = "eval.json";
/// The file written and removed again to see that the folder takes writes.
const PROBE_FILE: &str = ".mixlora-write-probe";

/// Whether `name` is an entry that `mixlora train` writes in its output folder: the files above,
/// `checkpoint-N/` and the temporary folders of a checkpoint being saved.
pub fn is_run_entry(name: &str) -> bool {
    [METRICS_FILE, SETTINGS_FILE, ADAPTER_DIR, EVAL_FILE].contains(&name)
        || checkpoint::is_checkpoint_entry(name)
}

/// The entries of a run in `dir` ([`is_run_entry`]), by name, folders with a trailing `/`,
/// sorted (checkpoints by step); none when `dir` does not exist.
pub fn run_entries(dir: &Path) -> Result<Vec<String>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut found = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_run_entry(&name) {
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            found.push(if is_dir { format!("{name}/") } else { name });
        }
    }
    // Numbers in names compare as numbers: checkpoint-3 before checkpoint-20.
    let key = |s: &String| {
        let digits: String = s.chars().filter(char::is_ascii_digit).collect();
        let stem: String = s.chars().filter(|c| !c.is_ascii_digit()).collect();
        (stem, digits.parse::<u64>().unwrap_or(0))
    };
    found.sort_by_key(key);
    Ok(found)
}

/// `a, b, c and 4 more`: at most six names.
pub fn name_list(names: &[String]) -> String {
    const SHOWN: usize = 6;
    let mut s = names[..names.len().min(SHOWN)].join(", ");
    if names.len() > SHOWN {
        s += &format!(" and {} more", names.len() - SHOWN);
    }
    s
}

/// The refusal of an output folder that holds another run (its `entries`), with the options.
pub fn in_use(dir: &Path, entries: &[String]) -> Error {
    Error::out_dir(
        dir,
        format!(
            "holds another run ({}): pass --resume to continue it, --overwrite to remove it \
             and start afresh, or another --out",
            name_list(entries)
        ),
    )
}

/// Removes the `entries` of a previous run ([`run_entries`]) from `dir`, and nothing else.
pub fn remove_run(dir: &Path, entries: &[String]) -> Result<()> {
    for name in entries {
        let path = dir.join(name.trim_end_matches('/'));
        let removed = if name.ends_with('/') {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match removed {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::out_dir(
                    dir,
                    format!("--overwrite cannot remove {name}: {e}"),
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Creates `dir` and checks that it takes writes and has room for `need` bytes: a small file is
/// written, flushed to the disk (where a full disk shows) and removed, and the free space is
/// compared with `need` ([`check_room`]). On failure, a folder this created is removed again;
/// the error is one line naming the folder.
pub fn check_writable(dir: &Path, need: u64) -> Result<()> {
    let existed = dir.exists();
    fs::create_dir_all(dir)
        .map_err(|e| Error::out_dir(dir, format!("cannot create the output folder: {e}")))?;
    let probe = dir.join(PROBE_FILE);
    let written = checkpoint::write_synced(&probe, &[0; 4096]);
    let _ = fs::remove_file(&probe);
    let checked = written
        .map_err(|e| {
            let why = match e {
                Error::Io { source, .. } => source.to_string(),
                other => other.to_string(),
            };
            Error::out_dir(dir, format!("cannot write in the output folder: {why}"))
        })
        .and_then(|()| check_room(dir, free_bytes(dir), need));
    if checked.is_err() && !existed {
        let _ = fs::remove_dir(dir); // only if still empty
    }
    checked
}

/// Bytes on the disk for one checkpoint and the final adapter of `n_params` f32 adapter
/// parameters: the adapter twice (checkpoint and final), AdamW's two moments, and 1 MiB for the
/// headers, the state, the settings and the metrics.
pub fn bytes_needed(n_params: usize) -> u64 {
    4 * 4 * n_params as u64 + (1 << 20)
}

/// Refuses a disk with less than `need` bytes `free` (unknown: accepted), before a run whose
/// first checkpoint would not fit starts.
pub fn check_room(dir: &Path, free: Option<u64>, need: u64) -> Result<()> {
    match free {
        Some(free) if free < need => Err(Error::out_dir(
            dir,
            format!(
                "{} free on its disk, but a checkpoint and the adapter of this run need about {}",
                mib(free),
                mib(need)
            ),
        )),
        _ => Ok(()),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// Bytes free to an unprivileged user on the file system of `dir`; `None` where unknown.
#[cfg(unix)]
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `statvfs` only writes into `st`, a plain C struct for which all-zero is valid, and
    // reads the NUL-terminated `path`, which outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    // The field types differ between platforms (u32 on some 32-bit ones).
    #[allow(clippy::unnecessary_cast)]
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Bytes free on the file system of `dir`: unknown on this platform.
#[cfg(not(unix))]
pub fn free_bytes(_dir: &Path) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mixlora-outdir-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn run_entries_are_the_trainers_own_and_only_those() {
        let d = tmp("entries");
        assert!(run_entries(&d).unwrap().is_empty(), "a missing folder");
        for dir in [
            "checkpoint-20",
            "checkpoint-3",
            ".tmp-checkpoint-21",
            "adapter",
            "checkpoint-notes",
            "my-checkpoint-3",
        ] {
            fs::create_dir_all(d.join(dir)).unwrap();
        }
        for f in [
            "metrics.jsonl",
            "train_config.toml",
            "notes.txt",
            "eval.json",
        ] {
            fs::write(d.join(f), "x").unwrap();
        }
        let e = run_entries(&d).unwrap();
        assert_eq!(
            e,
            [
                ".tmp-checkpoint-21/",
                "adapter/",
                "checkpoint-3/",
                "checkpoint-20/",
                "eval.json",
                "metrics.jsonl",
                "train_config.toml"
            ]
        );
        remove_run(&d, &e).unwrap();
        let mut left: Vec<String> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["checkpoint-notes", "my-checkpoint-3", "notes.txt"]);
        let msg = in_use(&d, &e).to_string();
        assert!(
            msg.starts_with(&format!("{}: holds another run (", d.display())),
            "{msg}"
        );
        assert!(msg.contains("--resume") && msg.contains("--overwrite") && msg.contains("--out"));
        assert!(msg.contains("and 1 more"), "six names at most: {msg}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn writable_folder_and_room_on_its_disk() {
        let d = tmp("writable");
        check_writable(&d.join("a/b"), 1).unwrap();
        assert!(d.join("a/b").is_dir());
        assert!(
            !d.join("a/b").join(PROBE_FILE).exists(),
            "the probe is removed"
        );
        // No disk has this much room: refused, and the folder it created is gone again.
        let e = check_writable(&d.join("a/c"), u64::MAX)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a/c: ") && e.contains("MiB free on its disk"),
            "{e}"
        );
        assert!(!d.join("a/c").exists());
        // A folder below a file cannot be created.
        fs::write(d.join("file"), "x").unwrap();
        let e = check_writable(&d.join("file/out"), 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("file/out: cannot create the output folder"),
            "{e}"
        );
        assert!(free_bytes(&d).is_some_and(|b| b > 0));

        assert_eq!(bytes_needed(1 << 20), (16 << 20) + (1 << 20));
        check_room(&d, Some(100 << 20), 17 << 20).unwrap();
        check_room(&d, None, u64::MAX).unwrap();
        let e = check_room(&d, Some(3 << 20), 17 << 20)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "{}: 3.0 MiB free on its disk, but a checkpoint and the adapter of this run \
                 need about 17.0 MiB",
                d.display()
            )
        );
        fs::remove_dir_all(&d).unwrap();
    }
}
