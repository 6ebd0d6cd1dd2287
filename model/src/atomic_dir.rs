//! Replacing a folder by a complete new one without a moment where neither is in place.
//!
//! The new folder is written (and fsynced) beside the target first; [`replace_dir`] then puts it
//! in place. Where the target already exists, Linux swaps the two in one step
//! (`renameat2(RENAME_EXCHANGE)`); elsewhere, and on file systems that cannot, the target is
//! renamed aside, the new folder renamed in, and on failure the old one renamed back, so that
//! the target path is missing only between two renames and an error never loses the old folder.

use std::fs;
use std::io;
use std::path::Path;

/// Puts the folder `new` at `target` (both in the same parent folder), replacing what was there;
/// `aside` is a free name in that parent folder for the fallback's old copy. On success `new`
/// no longer exists and the old folder is deleted; on error `target` still holds the old folder
/// (or nothing, if there was none) and `new` is left as it was.
pub fn replace_dir(new: &Path, target: &Path, aside: &Path) -> io::Result<()> {
    replace_dir_with(new, target, aside, true)
}

/// [`replace_dir`], with the atomic exchange switched off when `exchange` is false (the fallback,
/// for tests).
pub fn replace_dir_with(new: &Path, target: &Path, aside: &Path, exchange: bool) -> io::Result<()> {
    if !new.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{}: no such folder to put in place", new.display()),
        ));
    }
    if !target.exists() {
        return fs::rename(new, target);
    }
    if exchange && exchange_paths(new, target)? {
        // `new` now holds the old folder.
        let _ = fs::remove_dir_all(new);
        return Ok(());
    }
    swap_by_renames(new, target, aside, |from, to| fs::rename(from, to))
}

/// The fallback: `target` renamed to `aside`, `new` put in place by `put`, `aside` deleted; when
/// `put` fails, `aside` is renamed back to `target` before the error is returned.
fn swap_by_renames(
    new: &Path,
    target: &Path,
    aside: &Path,
    put: impl Fn(&Path, &Path) -> io::Result<()>,
) -> io::Result<()> {
    match fs::remove_dir_all(aside) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    fs::rename(target, aside)?;
    if let Err(e) = put(new, target) {
        // Put the old folder back before reporting: the target must not be lost.
        fs::rename(aside, target)?;
        return Err(e);
    }
    let _ = fs::remove_dir_all(aside);
    Ok(())
}

/// Swaps two existing paths atomically; `Ok(false)` where the system or the file system cannot.
#[cfg(target_os = "linux")]
fn exchange_paths(a: &Path, b: &Path) -> io::Result<bool> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let nul = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
    };
    let (ca, cb) = (nul(a)?, nul(b)?);
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the call; with
    // AT_FDCWD the kernel resolves them like rename(2) does, and the call touches no memory of
    // ours beyond reading them.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // No renameat2 (old kernels, some sandboxes) or no exchange on this file system.
        Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(libc::EPERM) => {
            Ok(false)
        }
        _ => Err(e),
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange_paths(_a: &Path, _b: &Path) -> io::Result<bool> {
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(root: &Path, name: &str, content: &str) -> std::path::PathBuf {
        let d = root.join(name);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("f"), content).unwrap();
        d
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("mixlora-atomic-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn replaces_an_existing_folder_either_way() {
        for exchange in [true, false] {
            let root = scratch(&format!("replace-{exchange}"));
            let target = folder(&root, "adapter", "old");
            let new = folder(&root, ".adapter.tmp", "new");
            let aside = root.join(".adapter.old");
            replace_dir_with(&new, &target, &aside, exchange).unwrap();
            assert_eq!(fs::read_to_string(target.join("f")).unwrap(), "new");
            assert!(!new.exists(), "the temporary folder is gone");
            assert!(!aside.exists(), "no old copy is left");
            let _ = fs::remove_dir_all(&root);
        }
    }

    #[test]
    fn puts_a_folder_in_place_where_there_was_none() {
        let root = scratch("fresh");
        let new = folder(&root, ".x.tmp", "new");
        let target = root.join("x");
        replace_dir(&new, &target, &root.join(".x.old")).unwrap();
        assert_eq!(fs::read_to_string(target.join("f")).unwrap(), "new");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn a_failed_replacement_keeps_the_old_folder() {
        let root = scratch("fail");
        let target = folder(&root, "ckpt", "old");
        let aside = root.join(".ckpt.old");
        // The new folder is missing: the call fails before touching the target.
        assert!(replace_dir_with(&root.join(".gone"), &target, &aside, false).is_err());
        assert_eq!(fs::read_to_string(target.join("f")).unwrap(), "old");
        // The rename that puts the new folder in place fails (a full disk, say): the old folder
        // is renamed back, a stale leftover at `aside` having been cleared first.
        let new = folder(&root, ".ckpt.tmp", "new");
        folder(&root, ".ckpt.old", "stale");
        let failing = |_: &Path, _: &Path| Err(io::Error::other("no space left on device"));
        let err = swap_by_renames(&new, &target, &aside, failing).unwrap_err();
        assert!(err.to_string().contains("no space"));
        assert_eq!(fs::read_to_string(target.join("f")).unwrap(), "old");
        assert_eq!(fs::read_to_string(new.join("f")).unwrap(), "new");
        assert!(!aside.exists());
        let _ = fs::remove_dir_all(&root);
    }
}
