//! Read-only memory maps of model files.

use std::fs::File;
use std::path::Path;

use memmap2::Mmap;

use crate::error::{Error, Result};

/// Maps `path` read-only. An empty file is refused here (it cannot hold any header).
pub fn map_file(path: &Path) -> Result<Mmap> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if len == 0 {
        return Err(Error::format(&crate::error::file_name(path), "empty file"));
    }
    // SAFETY: the map is read-only and lives as long as its owner. Like every mmap-based loader we
    // assume the file is not truncated or rewritten while it is mapped; all reads are bounds-checked
    // against the length seen here.
    unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))
}
