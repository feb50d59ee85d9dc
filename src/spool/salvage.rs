//! Recovery from a corrupt spool file: the db is moved aside with its WAL, and every row
//! that can still be read is copied into a fresh spool.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rusqlite::{Connection, params};

use super::store::{Store, is_corruption, row_message};
use super::{OpenError, SPOOL_FILE};
use crate::message::Message;
use crate::state_file::with_suffix;

/// Rows (or payload bytes) read and stored per step.
const SALVAGE_CHUNK: i64 = 1000;
const SALVAGE_CHUNK_BYTES: usize = 1024 * 1024;
/// Marks a moved-aside spool whose salvage finished (`spool.db.corrupt-<time>.done`)...
pub(super) const SALVAGE_DONE_SUFFIX: &str = ".done";
/// ...and holds the last id salvaged so far (`.progress`), where the next start goes on.
const SALVAGE_PROGRESS_SUFFIX: &str = ".progress";
/// A salvage stops while this much disk is still free (the next start goes on from there).
const SALVAGE_HEADROOM: u64 = 2 * 1024 * 1024;

/// Renames the db with its `-wal` and `-shm` together: the WAL holds the newest committed
/// (acknowledged) messages, and it only makes sense next to its own db.
pub(super) fn move_aside(path: &Path) -> Result<PathBuf, OpenError> {
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let aside = path.with_extension(format!("db.corrupt-{stamp}"));
    let error = |source| OpenError::MoveAside {
        path: path.to_owned(),
        source,
    };
    // Sidecars first: a db renamed without its WAL would open later as an older, "valid" one.
    for suffix in ["-wal", "-shm"] {
        match std::fs::rename(with_suffix(path, suffix), with_suffix(&aside, suffix)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(error(e)),
        }
    }
    std::fs::rename(path, &aside).map_err(error)?;
    Ok(aside)
}

/// What came back from a corrupt spool.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Salvage {
    pub(super) saved: u64,
    /// `None` when the old spool cannot even say how many it held.
    pub(super) lost: Option<u64>,
}

/// A header for a db of `page_size` as SQLite writes it, from a throwaway db next to `near`.
fn template_header(near: &Path, page_size: u32) -> Option<Vec<u8>> {
    let path = with_suffix(near, ".template");
    let _ = std::fs::remove_file(&path);
    let made = Connection::open(&path).and_then(|db| {
        db.pragma_update(None, "page_size", page_size)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.execute_batch("CREATE TABLE t (x); DROP TABLE t;")?;
        db.close().map_err(|(_, e)| e)
    });
    let header = made
        .ok()
        .and_then(|()| std::fs::read(&path).ok())
        .map(|bytes| bytes.get(..100).map(<[u8]>::to_vec));
    for file in [
        path.clone(),
        with_suffix(&path, "-wal"),
        with_suffix(&path, "-shm"),
    ] {
        let _ = std::fs::remove_file(file);
    }
    header.flatten()
}

/// Rewrites the 100-byte header of the db at `copy` (a salvage copy) so SQLite opens it: the
/// page size comes from the WAL's header (or the old header when it is still plausible), the
/// page count from the file length. The tables' pages after the header are left as they are.
fn repair_header(copy: &Path) -> std::io::Result<()> {
    let wal = std::fs::read(with_suffix(copy, "-wal")).unwrap_or_default();
    let mut db = std::fs::read(copy)?;
    let plausible = |size: u32| (512..=65536).contains(&size) && size.is_power_of_two();
    let from_wal = wal
        .get(8..12)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    let from_header = db
        .get(16..18)
        .map(|b| match u16::from_be_bytes([b[0], b[1]]) {
            1 => 65536,
            size => u32::from(size),
        });
    let page_size = [from_wal, from_header]
        .into_iter()
        .flatten()
        .find(|&size| plausible(size))
        .unwrap_or(4096);
    let mut header = template_header(copy, page_size)
        .ok_or_else(|| std::io::Error::other("cannot build a template header"))?;
    let pages = u32::try_from(db.len() as u64 / u64::from(page_size)).unwrap_or(u32::MAX);
    header[28..32].copy_from_slice(&pages.to_be_bytes());
    if db.len() < 100 {
        return Err(std::io::Error::other("file shorter than a header"));
    }
    db[..100].copy_from_slice(&header);
    std::fs::write(copy, db)
}

/// One run of a salvage: what it saved, and whether it read to the end.
#[derive(Default)]
struct SalvageRun {
    pub(super) outcome: Salvage,
    /// Rows an earlier run had stored already.
    pub(super) already_here: u64,
    /// Read to the end, or to data that will never read: nothing more to gain next time.
    pub(super) finished: bool,
    /// Nothing could be read for corruption (a damaged header, for one).
    pub(super) unreadable: bool,
}

/// Reads a corrupt spool read-only, in id order, a chunk at a time.
struct SalvageReader {
    db: Connection,
    select: String,
    after: i64,
    /// How many rows the file says it holds, when it can say.
    pub(super) expected: Option<u64>,
    /// The highest id it holds (0 when it cannot say).
    pub(super) highest: i64,
}

impl SalvageReader {
    /// Reads the rows with an id above `after`.
    pub(super) fn open(path: &Path, after: i64) -> rusqlite::Result<SalvageReader> {
        // Read-only: the moved files stay as they were found, for inspection.
        let db = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        // Columns an older spool may lack are read as NULL (the defaults).
        let column = |name: &'static str| -> rusqlite::Result<&'static str> {
            let has: bool = db.query_row(
                "SELECT COUNT(*) > 0 FROM pragma_table_info('messages') WHERE name = ?1",
                [name],
                |row| row.get(0),
            )?;
            Ok(if has { name } else { "NULL" })
        };
        let optional = [
            column("kind")?,
            column("priority")?,
            column("ttl")?,
            column("conflate")?,
        ]
        .join(", ");
        let expected: Option<i64> = db
            .query_row(
                "SELECT COUNT(*) FROM messages WHERE id > ?1",
                [after],
                |row| row.get(0),
            )
            .ok();
        let highest: i64 = db
            .query_row("SELECT IFNULL(MAX(id), 0) FROM messages", [], |row| {
                row.get(0)
            })
            .unwrap_or(0);
        let select = format!(
            "SELECT id, topic, payload, qos, {optional} FROM messages WHERE id > ?1 ORDER BY id LIMIT ?2"
        );
        Ok(SalvageReader {
            db,
            select,
            after,
            expected: expected.map(i64::unsigned_abs),
            highest,
        })
    }

    /// The id of the last row read.
    pub(super) fn after(&self) -> i64 {
        self.after
    }

    /// The next rows into `rows`, at most `SALVAGE_CHUNK` of them or `SALVAGE_CHUNK_BYTES` of
    /// payload; `Ok(false)` at the end. On an error, `rows` holds what was read before it.
    /// An undecodable row is lost; the ones after it are still worth reading.
    pub(super) fn next_chunk(&mut self, rows: &mut Vec<(i64, Message)>) -> rusqlite::Result<bool> {
        let mut select = self.db.prepare_cached(&self.select)?;
        let mut query = select.query(params![self.after, SALVAGE_CHUNK])?;
        let mut any = false;
        let mut bytes = 0;
        while let Some(row) = query.next()? {
            any = true;
            self.after = row.get(0)?;
            if let Ok(message) = row_message(row) {
                bytes += message.payload.len();
                rows.push((self.after, message));
            }
            if bytes >= SALVAGE_CHUNK_BYTES {
                break;
            }
        }
        Ok(any)
    }
}

/// Bytes free for this process on the file system holding `path`, if it can say.
fn free_disk_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let dir = path.parent()?;
    let name = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is a valid value for statvfs to overwrite.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is a NUL-terminated path and `stat` a statvfs it may write.
    if unsafe { libc::statvfs(name.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    // The field types differ between architectures (32-bit ARM).
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    Some(u64::from(stat.f_bavail as u64) * u64::from(stat.f_frsize as u64))
}

/// Moved-aside spools in `dir` whose salvage has not finished (no `.done` marker), oldest
/// first.
pub(super) fn unfinished_salvages(dir: &Path) -> Vec<PathBuf> {
    let prefix = format!("{SPOOL_FILE}.corrupt-");
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|entry| {
                    let name = entry.file_name().into_string().ok()?;
                    let stamp: u64 = name.strip_prefix(&prefix)?.parse().ok()?;
                    let path = entry.path();
                    (!with_suffix(&path, SALVAGE_DONE_SUFFIX).exists()).then_some((stamp, path))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.into_iter().map(|(_, path)| path).collect()
}

/// Copies what reads back from the corrupt spool moved to `aside` (with its WAL) into this
/// one, ids and order kept, a chunk at a time: memory and the transaction stay bounded, and
/// nothing but the new rows needs disk space (the moved files are read in place, read-only,
/// and stay for inspection). A damaged header hides everything behind it: then a copy with
/// a sound header is read instead. Finished (read to the end, or to unreadable data), the
/// files get a `.done` marker; stopped early (the disk is full), the next start goes on.
pub(super) fn salvage(store: &mut Store, aside: &Path, last_id: &mut i64) -> Salvage {
    let mut salvage = salvage_chunks(store, aside, aside, last_id);
    if salvage.unreadable && salvage.outcome.saved == 0 {
        salvage = salvage_repaired_copy(store, aside, last_id);
    }
    if salvage.finished {
        if let Err(error) = std::fs::write(with_suffix(aside, SALVAGE_DONE_SUFFIX), b"") {
            tracing::warn!(%error, "cannot mark the salvage finished; the next start reads the file again (nothing twice: rows already here are skipped)");
        }
    } else {
        tracing::warn!(
            aside = %aside.display(),
            "salvage stopped before the end (little disk space left); the next start goes on"
        );
    }
    salvage.outcome
}

/// Salvages from a copy of `aside` whose header is rebuilt (needs the file's size free).
fn salvage_repaired_copy(store: &mut Store, aside: &Path, last_id: &mut i64) -> SalvageRun {
    let copy = with_suffix(aside, ".salvage");
    let cleanup = |copy: &Path| {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(with_suffix(copy, suffix));
        }
    };
    cleanup(&copy);
    let copied = std::fs::copy(aside, &copy).and_then(|_| {
        match std::fs::copy(with_suffix(aside, "-wal"), with_suffix(&copy, "-wal")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    });
    let run = match copied.and_then(|()| repair_header(&copy)) {
        Ok(()) => salvage_chunks(store, &copy, aside, last_id),
        Err(error) => {
            tracing::warn!(%error, "cannot repair a copy of the corrupt spool's header");
            // Unreadable as it is, and no room to repair a copy: try again next start.
            SalvageRun::default()
        }
    };
    cleanup(&copy);
    run
}

/// Reads `source` (the moved-aside spool `aside`, or a repaired copy of it) in chunks of
/// `SALVAGE_CHUNK` rows (or `SALVAGE_CHUNK_BYTES`), each stored in a transaction of its own,
/// from where an earlier run got to (`aside`'s progress file). Stops while the disk still
/// has `SALVAGE_HEADROOM` free: the daemon must go on working, and publishing what was
/// salvaged makes room for the rest at a later start.
fn salvage_chunks(store: &mut Store, source: &Path, aside: &Path, last_id: &mut i64) -> SalvageRun {
    let mut run = SalvageRun::default();
    let progress = with_suffix(aside, SALVAGE_PROGRESS_SUFFIX);
    let after = std::fs::read_to_string(&progress)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0);
    let mut reader = match SalvageReader::open(source, after) {
        Ok(reader) => reader,
        Err(error) => {
            tracing::warn!(%error, "cannot read the corrupt spool");
            // Corrupt: a repaired copy may read; anything else: the next start tries again.
            run.unreadable = is_corruption(&error);
            return run;
        }
    };
    run.outcome.lost = reader.expected;
    // New ids go above every id the old spool used, so what is salvaged later (a run that
    // stopped early) still comes first.
    *last_id = (*last_id).max(reader.highest);
    let mut rows = Vec::new();
    loop {
        if free_disk_bytes(store.path()).is_some_and(|free| free < SALVAGE_HEADROOM) {
            break;
        }
        rows.clear();
        // What was read before an error is still stored.
        let read = reader.next_chunk(&mut rows);
        match store.store_salvaged(&rows, *last_id) {
            Ok((saved, here, highest)) => {
                *last_id = highest;
                run.outcome.saved += saved;
                run.already_here += here;
                // Into the db at once: the WAL never holds more than a chunk, so the
                // salvage needs about the rows' size free, not twice that.
                let _ = store.checkpoint();
                // Not read again by a later run (a failed write only means rows read
                // again, and skipped when they are still here).
                let _ = std::fs::write(&progress, reader.after().to_string());
            }
            Err(error) => {
                tracing::error!(%error, "cannot store salvaged messages");
                break;
            }
        }
        match read {
            Ok(true) => {}
            Ok(false) => {
                run.finished = true;
                break;
            }
            Err(error) => {
                tracing::warn!(%error, saved = run.outcome.saved, "salvage stopped at unreadable data");
                run.unreadable = is_corruption(&error) && run.outcome.saved == 0;
                run.finished = true;
                run.outcome.lost = None;
                break;
            }
        }
    }
    let here = run.outcome.saved + run.already_here;
    run.outcome.lost = run
        .outcome
        .lost
        .filter(|_| run.finished)
        .map(|total| total.saturating_sub(here));
    run
}
