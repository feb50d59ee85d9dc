//! The disk reserve: a file of zeros beside the spool. On a full disk it is what lets a
//! checkpoint and the deletion of the oldest messages write (both need a little space); it is
//! given up then, and written again in idle time once there is room.

use std::path::{Path, PathBuf};

use crate::state_file::with_suffix;

const RESERVE_SUFFIX: &str = ".reserve";
/// Chunk written while restoring the reserve.
const RESERVE_WRITE_CHUNK: usize = 64 * 1024;

pub(super) struct Reserve {
    path: PathBuf,
    /// Not there (given up, or not yet written).
    missing: bool,
}

impl Reserve {
    /// The reserve of the spool at `spool`, not written yet.
    pub(super) fn beside(spool: &Path) -> Reserve {
        Reserve {
            path: with_suffix(spool, RESERVE_SUFFIX),
            missing: true,
        }
    }

    pub(super) fn is_there(&self) -> bool {
        !self.missing
    }

    /// Writes the reserve (`bytes` long) if it is missing. On failure (the disk is full) the
    /// partial file is removed, so the reserve never takes space the spool needs; it is tried
    /// again later.
    pub(super) fn restore(&mut self, bytes: u64) {
        if !self.missing {
            return;
        }
        let written = (|| -> std::io::Result<()> {
            use std::io::Write;
            let mut file = std::fs::File::create(&self.path)?;
            let chunk = vec![0u8; RESERVE_WRITE_CHUNK];
            let mut left = bytes;
            while left > 0 {
                let n = chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                file.write_all(&chunk[..n])?;
                left -= n as u64;
            }
            file.sync_all()
        })();
        match written {
            Ok(()) => self.missing = false,
            Err(error) => {
                let _ = std::fs::remove_file(&self.path);
                tracing::debug!(%error, "cannot restore the spool's disk reserve yet");
            }
        }
    }

    /// Gives the reserve's space back to the file system; `true` if there was one.
    pub(super) fn release(&mut self) -> bool {
        self.missing = true;
        std::fs::remove_file(&self.path).is_ok()
    }
}
