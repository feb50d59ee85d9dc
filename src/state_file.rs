//! Small files in the state dir (identity cache, device credentials, held subscriptions):
//! written whole or not at all.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// `path` with `suffix` appended to its file name (`.tmp`, and SQLite's `-wal` / `-shm`).
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Writes `bytes` to `path` atomically: a temp file beside it (mode 0600), fsync'd, renamed.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temp = with_suffix(path, ".tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temp, path)
}
