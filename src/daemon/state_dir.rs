//! The state dir: created private, refused when others could write to it, and locked so that
//! one daemon at a time uses it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::{DaemonError, LOCK_FILE};

/// Creates the state dir (mode 0700): it holds the spool and the identity cache. One that every
/// user could write to is refused: someone may have planted a spool or an identity there.
/// Returns the instance lock; a second daemon on the same dir fails here, before it changes
/// anything (the lock file already exists then).
pub fn prepare_state_dir(dir: &Path) -> Result<std::fs::File, DaemonError> {
    use std::os::unix::fs::MetadataExt;
    let error = |source| DaemonError::StateDir {
        path: dir.display().to_string(),
        source,
    };
    if let Ok(meta) = std::fs::metadata(dir)
        && meta.mode() & 0o002 != 0
    {
        return Err(DaemonError::InsecureStateDir {
            path: dir.display().to_string(),
            mode: meta.mode() & 0o7777,
        });
    }
    std::fs::create_dir_all(dir).map_err(error)?;
    let lock = lock_instance(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(error)?;
    Ok(lock)
}

/// Takes the exclusive, non-blocking `flock` on `<dir>/daemon.lock`.
fn lock_instance(dir: &Path) -> Result<std::fs::File, DaemonError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(LOCK_FILE);
    let lock_error = |source| DaemonError::Lock {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(lock_error)?;
    // SAFETY: flock on a file descriptor this function owns; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let error = std::io::Error::last_os_error();
        return Err(match error.raw_os_error() {
            Some(libc::EWOULDBLOCK) => DaemonError::AlreadyRunning(dir.display().to_string()),
            _ => lock_error(error),
        });
    }
    Ok(file)
}
