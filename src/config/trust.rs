//! Whether a config file can be trusted: who could have written it.

use std::path::Path;

use super::ConfigError;

/// Like the Device Client, trust a config only if no other user can have written it: the file
/// must not be writable by everyone or by a group other than root, nor belong to another
/// ordinary user, and its directory must not let everyone replace it.
pub(super) fn check_not_tamperable(path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::MetadataExt;
    let insecure = |path: &Path, reason: String| ConfigError::Insecure {
        path: path.to_owned(),
        reason,
    };
    // A missing file is reported by the loader, with the usual wording.
    let Ok(file) = std::fs::metadata(path) else {
        return Ok(());
    };
    if file.mode() & 0o002 != 0 {
        return Err(insecure(
            path,
            format!(
                "writable by every user (mode {:04o}); fix with chmod o-w",
                file.mode() & 0o7777
            ),
        ));
    }
    // Group members other than root could rewrite it, e.g. to point the daemon elsewhere.
    if file.mode() & 0o020 != 0 && file.gid() != 0 {
        return Err(insecure(
            path,
            format!(
                "writable by group {} (mode {:04o}); fix with chmod g-w, or chgrp root",
                file.gid(),
                file.mode() & 0o7777
            ),
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if file.uid() != 0 && file.uid() != me {
        return Err(insecure(
            path,
            format!(
                "owned by uid {}, neither root nor this process's user",
                file.uid()
            ),
        ));
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if let Ok(meta) = std::fs::metadata(dir)
        && meta.mode() & 0o002 != 0
        && meta.mode() & 0o1000 == 0
    {
        return Err(insecure(
            dir,
            format!(
                "the config's directory is writable by every user (mode {:04o}); fix with chmod o-w",
                meta.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}
