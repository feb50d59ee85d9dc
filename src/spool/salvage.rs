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

/// Reads `(id, message)` rows from a salvage copy in id order into `rows`, as far as the file
/// lets it. Returns how many the copy says it held, when it can say.
pub(super) fn read_salvage(
    copy: &Path,
    rows: &mut Vec<(i64, Message)>,
) -> rusqlite::Result<Option<u64>> {
    let db = Connection::open(copy)?;
    let has_kind: bool = db.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('messages') WHERE name = 'kind'",
        [],
        |row| row.get(0),
    )?;
    let expected: Option<i64> = db
        .query_row("SELECT COUNT(*) FROM messages", [], |row| row.get(0))
        .ok();
    let sql = format!(
        "SELECT id, topic, payload, qos, {} FROM messages WHERE id > ?1 ORDER BY id LIMIT ?2",
        if has_kind { "kind" } else { "NULL" }
    );
    let mut select = db.prepare(&sql)?;
    let mut after = rows.last().map_or(0, |(id, _)| *id);
    loop {
        let mut query = select.query(params![after, SALVAGE_CHUNK])?;
        let mut any = false;
        while let Some(row) = query.next()? {
            any = true;
            after = row.get(0)?;
            let message = row_message(row);
            // An undecodable row is lost; the ones after it are still worth reading.
            if let Ok(message) = message {
                rows.push((after, message));
            }
        }
        if !any {
            return Ok(expected.map(i64::unsigned_abs));
        }
    }
}
