//! Recovery from a corrupt spool file: the db is moved aside with its WAL, and every row
//! that can still be read is copied into a fresh spool.

use super::*;

/// `path` with `suffix` appended to its file name (SQLite's `-wal` / `-shm` naming).
pub(super) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

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
pub(super) fn template_header(near: &Path, page_size: u32) -> Option<Vec<u8>> {
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
pub(super) fn repair_header(copy: &Path) -> std::io::Result<()> {
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

/// A message from a row selected as `id, topic, payload, qos, kind`. An unknown QoS number
/// (a row written by hand or another tool) is kept at least once: never dropped unasked.
pub(super) fn row_message(row: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
    Ok(Message {
        topic: row.get(1)?,
        payload: payload_bytes(row, 2)?,
        qos: Qos::from_u8(row.get(3)?).unwrap_or(Qos::AtLeastOnce),
        kind: PayloadKind::from_u8(row.get(4)?),
    })
}

/// A payload's bytes. The column is declared BLOB, but SQLite keeps whatever type was written:
/// a TEXT value (written by hand or by another tool) is the same bytes and must not be dropped.
pub(super) fn payload_bytes(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<Vec<u8>> {
    use rusqlite::types::ValueRef;
    match row.get_ref(index)? {
        ValueRef::Blob(bytes) | ValueRef::Text(bytes) => Ok(bytes.to_vec()),
        _ => row.get(index),
    }
}

/// One run of a salvage: what it saved, and whether it read to the end.
#[derive(Default)]
pub(super) struct SalvageRun {
    pub(super) outcome: Salvage,
    /// Rows an earlier run had stored already.
    pub(super) already_here: u64,
    /// Read to the end, or to data that will never read: nothing more to gain next time.
    pub(super) finished: bool,
    /// Nothing could be read for corruption (a damaged header, for one).
    pub(super) unreadable: bool,
}

/// Reads a corrupt spool read-only, in id order, a chunk at a time.
pub(super) struct SalvageReader {
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
        let has_kind: bool = db.query_row(
            "SELECT COUNT(*) > 0 FROM pragma_table_info('messages') WHERE name = 'kind'",
            [],
            |row| row.get(0),
        )?;
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
            "SELECT id, topic, payload, qos, {} FROM messages WHERE id > ?1 ORDER BY id LIMIT ?2",
            if has_kind { "kind" } else { "NULL" }
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
pub(super) fn free_disk_bytes(path: &Path) -> Option<u64> {
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
