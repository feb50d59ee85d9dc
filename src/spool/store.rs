//! The spool's SQLite database, owned by the spool thread: the schema and its upgrades, and the
//! statements that append, read, delete and move rows. No policy: what to commit, drop, trim or
//! vacuum, and when, is decided in `policy.rs` and `behind.rs` and carried out by `serve.rs`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, ErrorCode, OptionalExtension, Transaction, params};

use super::StoredMessage;
use super::policy::Freeing;
use crate::message::{Message, Options, PayloadKind, Priority, Qos};
use crate::state_file::with_suffix;

/// Page size of new (and emptied) spools. Every commit writes whole pages to the WAL, and
/// flash wears by the 4 KiB pages the kernel writes back: 1 KiB pages make a small commit
/// touch one or two of them instead of three (measured in docs/benchmarks.md).
pub(super) const SPOOL_PAGE_SIZE: i64 = 1024;
/// Expired rows one read passes over, beyond what it returns: a read through a long expired
/// backlog comes back (with "more behind") instead of holding the spool thread.
const EXPIRED_PER_READ: usize = 4096;
/// Most dead letters kept; beyond it (or the byte bound) the oldest are deleted.
pub(super) const MAX_DEAD_LETTERS: i64 = 1000;

pub(super) fn is_corruption(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    ) || matches!(error, rusqlite::Error::QueryReturnedNoRows)
}

pub(super) fn is_disk_full(error: &rusqlite::Error) -> bool {
    error.sqlite_error_code() == Some(ErrorCode::DiskFull)
}

pub(super) fn extended_code(error: &rusqlite::Error) -> i32 {
    match error {
        rusqlite::Error::SqliteFailure(failure, _) => failure.extended_code,
        _ => -1,
    }
}

/// Settings and tables, made or brought up to date; returns the dead letters' count.
fn prepare_schema(db: &Connection, path: &Path) -> rusqlite::Result<u64> {
    // Incremental auto-vacuum lets idle time give freed pages back to the file system. It
    // must be chosen before the first table; an older spool is converted once (VACUUM).
    let auto_vacuum: i64 = db.query_row("PRAGMA auto_vacuum", [], |row| row.get(0))?;
    let tables: i64 = db.query_row("SELECT COUNT(*) FROM sqlite_master", [], |row| row.get(0))?;
    // The page size of a spool with messages stays (changing it rewrites the whole file);
    // one whose queue is empty takes the new size at little cost.
    let page_size: i64 = db.query_row("PRAGMA page_size", [], |row| row.get(0))?;
    let resize = page_size != SPOOL_PAGE_SIZE && tables > 0 && queue_is_empty(db)?;
    if tables == 0 {
        db.pragma_update(None, "page_size", SPOOL_PAGE_SIZE)?;
    }
    if auto_vacuum != 2 || resize {
        db.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        if tables > 0 {
            tracing::info!(spool = %path.display(), "converting the spool to incremental vacuum and 1 KiB pages (once)");
            let converted = (|| {
                if resize {
                    // The page size of a database in WAL mode cannot change.
                    db.pragma_update(None, "journal_mode", "DELETE")?;
                    db.pragma_update(None, "page_size", SPOOL_PAGE_SIZE)?;
                }
                db.execute_batch("VACUUM")
            })();
            if let Err(error) = converted {
                // VACUUM rewrites the whole file: on a nearly full disk it cannot, and that must
                // never keep the daemon from starting. The spool works as it is (its files only
                // shrink less after a backlog); the conversion is tried again at the next start.
                tracing::warn!(
                    spool = %path.display(),
                    %error,
                    "cannot convert the spool now (it needs about its own size free); it keeps its old layout until a later start"
                );
                db.pragma_update(None, "auto_vacuum", auto_vacuum)?;
            }
        }
    }
    db.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: a committed append survives power loss, which is what `ok` promises.
    db.pragma_update(None, "synchronous", "FULL")?;
    // Ids are handed out by the spool thread (write-behind holds messages before they have
    // rows): no AUTOINCREMENT, whose sqlite_sequence row would be one more page per commit.
    // Older spools keep theirs; `last_id` reads both.
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS messages (
             id INTEGER PRIMARY KEY,
             topic TEXT NOT NULL,
             payload BLOB NOT NULL,
             qos INTEGER NOT NULL,
             size INTEGER NOT NULL
         );",
    )?;
    let dead_letters = create_dead_letters(db)?;
    // The payload's kind at ingest (`PayloadKind`). Rows from older spools have none
    // (NULL): they are sent alone, byte for byte, which never changes a payload.
    add_column_if_missing(db, "kind")?;
    // When each message was accepted (seconds since the Unix epoch): the oldest one's age is
    // in `status`. Rows from older spools have none (NULL: unknown).
    add_column_if_missing(db, "accepted_at")?;
    add_option_columns(db)?;
    Ok(dead_letters)
}

/// Message options: rows from older spools have none (normal priority, no ttl, not
/// conflating). `clock` is the spool clock at acceptance (`policy::SpoolClock`), which ages
/// messages for `ttl` and `spool.max_age`.
fn add_option_columns(db: &Connection) -> rusqlite::Result<()> {
    for column in ["priority", "ttl", "clock", "conflate"] {
        add_column_if_missing(db, column)?;
    }
    // Partial indexes: only high-priority and conflating rows are in them, so a spool that does
    // not use these options writes no index pages.
    db.execute_batch(
        "CREATE INDEX IF NOT EXISTS high_priority ON messages(id) WHERE priority = 1;
         CREATE INDEX IF NOT EXISTS conflating ON messages(topic) WHERE conflate = 1;
         CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)
             WITHOUT ROWID;",
    )
}

/// Adds the INTEGER column `name` to `messages` if an older spool lacks it.
fn add_column_if_missing(db: &Connection, name: &str) -> rusqlite::Result<()> {
    let has: bool = db.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('messages') WHERE name = ?1",
        [name],
        |row| row.get(0),
    )?;
    if !has {
        db.execute_batch(&format!("ALTER TABLE messages ADD COLUMN {name} INTEGER;"))?;
    }
    Ok(())
}

/// Whether an existing spool's queue is empty.
fn queue_is_empty(db: &Connection) -> rusqlite::Result<bool> {
    let has_table: bool = db.query_row(
        "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'messages'",
        [],
        |row| row.get(0),
    )?;
    if !has_table {
        return Ok(true);
    }
    db.query_row("SELECT NOT EXISTS (SELECT 1 FROM messages)", [], |row| {
        row.get(0)
    })
}

fn create_dead_letters(db: &Connection) -> rusqlite::Result<u64> {
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS dead_letters (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             topic TEXT NOT NULL,
             payload BLOB NOT NULL,
             qos INTEGER NOT NULL,
             size INTEGER NOT NULL,
             reason TEXT NOT NULL,
             at INTEGER NOT NULL,
             kind INTEGER
         );",
    )?;
    let count: i64 = db.query_row("SELECT COUNT(*) FROM dead_letters", [], |row| row.get(0))?;
    Ok(count.unsigned_abs())
}

/// A message from a row selected as `id, topic, payload, qos, kind, priority, ttl, conflate`.
/// An unknown QoS number (a row written by hand or another tool) is kept at least once: never
/// dropped unasked.
pub(super) fn row_message(row: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
    Ok(Message {
        topic: row.get(1)?,
        payload: payload_bytes(row, 2)?,
        qos: Qos::from_u8(row.get(3)?).unwrap_or(Qos::AtLeastOnce),
        kind: PayloadKind::from_u8(row.get(4)?),
        options: Options {
            priority: Priority::from_u8(row.get(5)?),
            ttl: row.get(6)?,
            conflate: row.get::<_, Option<bool>>(7)?.unwrap_or(false),
        },
    })
}

/// A payload's bytes. The column is declared BLOB, but SQLite keeps whatever type was written:
/// a TEXT value (written by hand or by another tool) is the same bytes and must not be dropped.
fn payload_bytes(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<Vec<u8>> {
    use rusqlite::types::ValueRef;
    match row.get_ref(index)? {
        ValueRef::Blob(bytes) | ValueRef::Text(bytes) => Ok(bytes.to_vec()),
        _ => row.get(index),
    }
}

/// What the database held when it was opened.
#[derive(Debug, Clone, Copy)]
pub(super) struct Opened {
    pub(super) messages: u64,
    /// The highest id ever used (also by rows deleted since).
    pub(super) last_id: i64,
    /// The highest high-priority id waiting.
    pub(super) last_high_id: i64,
    pub(super) dead_letters: u64,
    /// The spool clock and the wall clock (both in milliseconds) when it was saved.
    pub(super) clock: Option<(u64, u64)>,
}

/// What one read found.
#[derive(Default)]
pub(super) struct DiskRead {
    pub(super) good: Vec<StoredMessage>,
    /// Rows that cannot be decoded (a damaged file).
    pub(super) broken: Vec<(i64, rusqlite::Error)>,
    /// Payload bytes in `good`.
    pub(super) bytes: usize,
    /// Rows past their time: never returned, to be deleted.
    pub(super) expired: Vec<i64>,
}

/// A dead letter as listed: the row without its payload.
pub(super) struct DeadLetterRow {
    pub(super) id: i64,
    pub(super) topic: String,
    pub(super) bytes: u64,
    pub(super) qos: u8,
    pub(super) reason: String,
    /// Seconds since the Unix epoch.
    pub(super) at: u64,
}

/// The SQLite database.
pub(super) struct Store {
    db: Connection,
    path: PathBuf,
    page_size: u64,
    incremental_vacuum: bool,
}

impl Store {
    /// Opens (or creates) the database at `path`, checked and brought up to date.
    pub(super) fn open(path: &Path) -> rusqlite::Result<(Store, Opened)> {
        let db = Connection::open(path)?;
        let check: String = db.query_row("PRAGMA quick_check", [], |row| row.get(0))?;
        if check != "ok" {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
                Some(check),
            ));
        }
        let dead_letters = prepare_schema(&db, path)?;
        let messages: i64 = db.query_row("SELECT COUNT(*) FROM messages", [], |row| row.get(0))?;
        // Dead letters use AUTOINCREMENT, so sqlite_sequence is there.
        let sequence: i64 = db
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'messages'",
                [],
                |row| row.get(0),
            )
            .optional()?
            .unwrap_or(0);
        let highest: i64 = db.query_row("SELECT IFNULL(MAX(id), 0) FROM messages", [], |row| {
            row.get(0)
        })?;
        let highest_high: i64 = db.query_row(
            "SELECT IFNULL(MAX(id), 0) FROM messages WHERE priority = 1",
            [],
            |row| row.get(0),
        )?;
        let page_size: i64 = db.query_row("PRAGMA page_size", [], |row| row.get(0))?;
        let auto_vacuum: i64 = db.query_row("PRAGMA auto_vacuum", [], |row| row.get(0))?;
        let clock = db
            .query_row(
                "SELECT (SELECT value FROM meta WHERE key = 'clock'),
                        (SELECT value FROM meta WHERE key = 'clock_wall')",
                [],
                |row| Ok((row.get::<_, Option<i64>>(0)?, row.get::<_, Option<i64>>(1)?)),
            )
            .map(|saved| match saved {
                (Some(clock), Some(wall)) => Some((clock.unsigned_abs(), wall.unsigned_abs())),
                _ => None,
            })?;
        let store = Store {
            db,
            path: path.to_owned(),
            page_size: page_size.unsigned_abs().max(512),
            incremental_vacuum: auto_vacuum == 2,
        };
        let opened = Opened {
            messages: messages.unsigned_abs(),
            last_id: sequence.max(highest),
            last_high_id: highest_high,
            dead_letters,
            clock,
        };
        Ok((store, opened))
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn page_size(&self) -> u64 {
        self.page_size
    }

    pub(super) fn incremental_vacuum(&self) -> bool {
        self.incremental_vacuum
    }

    /// Checkpoints after `pages` WAL pages; a WAL grown by one big transaction is cut back to
    /// that size at its next reset.
    pub(super) fn set_wal_limit(&self, pages: u64) -> rusqlite::Result<()> {
        // Both fit in i64: the WAL is capped well below.
        let pages = pages as i64;
        self.db.pragma_update(None, "wal_autocheckpoint", pages)?;
        self.db
            .pragma_update(None, "journal_size_limit", pages * self.page_size as i64)?;
        Ok(())
    }

    pub(super) fn wal_file_bytes(&self) -> u64 {
        std::fs::metadata(with_suffix(&self.path, "-wal")).map_or(0, |m| m.len())
    }

    /// Bytes of the pages in use.
    pub(super) fn live_bytes(&self) -> rusqlite::Result<u64> {
        live_pages_bytes(&self.db, self.page_size)
    }

    pub(super) fn free_pages(&self) -> rusqlite::Result<u64> {
        let free: i64 = self
            .db
            .query_row("PRAGMA freelist_count", [], |row| row.get(0))?;
        Ok(free.unsigned_abs())
    }

    /// Gives up to `pages` free pages back to the file system; the free pages left.
    pub(super) fn vacuum(&self, pages: u64) -> rusqlite::Result<u64> {
        self.db
            .execute_batch(&format!("PRAGMA incremental_vacuum({pages})"))?;
        self.free_pages()
    }

    /// Folds the WAL into the db and truncates both.
    pub(super) fn checkpoint(&self) -> rusqlite::Result<()> {
        self.db
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
    }

    /// The oldest row's acceptance time, skipping `skip` (acknowledged rows not deleted yet):
    /// `None` without rows, `Some(None)` when it is not known (a row from an older spool).
    pub(super) fn oldest_accepted_at(
        &self,
        skip: &BTreeSet<i64>,
    ) -> rusqlite::Result<Option<Option<u64>>> {
        let mut oldest = self
            .db
            .prepare_cached("SELECT id, accepted_at FROM messages ORDER BY id")?;
        let mut rows = oldest.query([])?;
        while let Some(row) = rows.next()? {
            if !skip.contains(&row.get(0)?) {
                let at: Option<i64> = row.get(1)?;
                return Ok(Some(at.map(i64::unsigned_abs)));
            }
        }
        Ok(None)
    }

    /// A transaction that appends rows (see [`Commit`]).
    pub(super) fn begin(&mut self) -> rusqlite::Result<Commit<'_>> {
        Ok(Commit {
            tx: self.db.transaction()?,
            page_size: self.page_size,
        })
    }

    /// The rows of `priority` after `after` in id order, added to `read` while it has fewer
    /// than `limit` and its payloads stay under `max_bytes` (one always comes into an empty
    /// read). Rows in `skip` are passed over, and rows `expired` says are past their time (from
    /// their spool clock and ttl) are listed in `read.expired`, never returned; both are read as
    /// many more, the expired ones up to `EXPIRED_PER_READ`. `true` when every row was seen.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn read_after(
        &self,
        priority: Priority,
        after: i64,
        limit: usize,
        max_bytes: usize,
        skip: &BTreeSet<i64>,
        expired: &dyn Fn(Option<u64>, Option<u32>) -> bool,
        read: &mut DiskRead,
    ) -> rusqlite::Result<bool> {
        // No `LIMIT ?`: SQLite plans a bound LIMIT by its value, so it would compile the
        // statement again at every read. Rows come one step at a time; stepping stops early.
        // High-priority rows are found through their partial index.
        let mut select = self.db.prepare_cached(match priority {
            Priority::High => {
                "SELECT id, topic, payload, qos, kind, priority, ttl, conflate, clock
                 FROM messages WHERE priority = 1 AND id > ?1 ORDER BY id"
            }
            Priority::Normal => {
                "SELECT id, topic, payload, qos, kind, priority, ttl, conflate, clock
                 FROM messages WHERE id > ?1 AND IFNULL(priority, 0) != 1 ORDER BY id"
            }
        })?;
        let mut rows = select.query(params![after])?;
        let mut budget = limit
            .saturating_add(skip.len())
            .saturating_add(EXPIRED_PER_READ);
        while read.good.len() < limit && (read.bytes < max_bytes || read.good.is_empty()) {
            let Some(row) = rows.next()? else {
                return Ok(true);
            };
            if budget == 0 {
                return Ok(false);
            }
            budget -= 1;
            let id: i64 = row.get(0)?;
            if skip.contains(&id) {
                continue;
            }
            match row_message(row) {
                Ok(message) => {
                    let clock: Option<i64> = row.get(8)?;
                    if expired(clock.map(i64::unsigned_abs), message.options.ttl) {
                        read.expired.push(id);
                        continue;
                    }
                    read.bytes += message.payload.len();
                    read.good.push(StoredMessage { id, message });
                }
                Err(error) => read.broken.push((id, error)),
            }
        }
        Ok(false)
    }

    /// The waiting conflating rows on `topic`: their ids and priorities.
    pub(super) fn conflating(&self, topic: &str) -> rusqlite::Result<Vec<(i64, Priority)>> {
        let mut select = self.db.prepare_cached(
            "SELECT id, priority FROM messages WHERE conflate = 1 AND topic = ?1",
        )?;
        let rows = select.query_map([topic], |row| {
            Ok((row.get(0)?, Priority::from_u8(row.get(1)?)))
        })?;
        rows.collect()
    }

    /// Keeps only the newest conflating row of each topic (at a start, when nothing is in
    /// flight); how many went.
    pub(super) fn conflate_all(&mut self) -> rusqlite::Result<u64> {
        let deleted = self.db.execute(
            "DELETE FROM messages WHERE conflate = 1 AND id NOT IN
                 (SELECT MAX(id) FROM messages WHERE conflate = 1 GROUP BY topic)",
            [],
        )?;
        Ok(deleted as u64)
    }

    /// Deletes rows `ids` in one transaction; how many were there (ids already gone are
    /// ignored).
    pub(super) fn delete(&mut self, ids: &[i64]) -> rusqlite::Result<u64> {
        let tx = self.db.transaction()?;
        let deleted = delete_in(&tx, ids)?;
        tx.commit()?;
        Ok(deleted)
    }

    /// Deletes the oldest rows (one transaction) while `freeing` wants more; how many went.
    pub(super) fn drop_oldest(&mut self, freeing: &mut Freeing) -> rusqlite::Result<u64> {
        let tx = self.db.transaction()?;
        {
            let mut oldest = tx.prepare_cached(
                "DELETE FROM messages WHERE id = (SELECT MIN(id) FROM messages) RETURNING size",
            )?;
            while freeing.more() {
                let Some(size) = oldest
                    .query_row([], |row| row.get::<_, i64>(0))
                    .optional()?
                else {
                    break;
                };
                freeing.dropped(size.unsigned_abs());
            }
        }
        tx.commit()?;
        Ok(freeing.rows())
    }

    /// Moves rows `ids` to the dead letters with `reason` and the time `at`, then deletes the
    /// oldest dead letters beyond `MAX_DEAD_LETTERS` or `max_bytes`; how many moved, and
    /// (rows, bytes) deleted.
    pub(super) fn bury(
        &mut self,
        ids: &[i64],
        reason: &str,
        at: u64,
        max_bytes: u64,
    ) -> rusqlite::Result<(u64, (u64, u64))> {
        let tx = self.db.transaction()?;
        let mut moved = 0;
        {
            let mut copy = tx.prepare_cached(
                "INSERT INTO dead_letters (topic, payload, qos, size, reason, at, kind)
                 SELECT topic, payload, qos, size, ?2, ?3, kind FROM messages WHERE id = ?1",
            )?;
            let mut delete =
                tx.prepare_cached("DELETE FROM messages WHERE id = ?1 RETURNING size")?;
            for id in ids {
                copy.execute(params![id, reason, at as i64])?;
                if delete
                    .query_row([id], |row| row.get::<_, i64>(0))
                    .optional()?
                    .is_some()
                {
                    moved += 1;
                }
            }
        }
        let trimmed = trim_dead_letters(&tx, max_bytes)?;
        tx.commit()?;
        Ok((moved, trimmed))
    }

    /// Deletes the oldest dead letters beyond `MAX_DEAD_LETTERS` or `max_bytes` (the newest
    /// stays); (rows, bytes) deleted.
    pub(super) fn bound_dead_letters(&mut self, max_bytes: u64) -> rusqlite::Result<(u64, u64)> {
        let tx = self.db.transaction()?;
        let trimmed = trim_dead_letters(&tx, max_bytes)?;
        tx.commit()?;
        Ok(trimmed)
    }

    /// The newest `limit` dead letters, oldest first.
    pub(super) fn list_dead_letters(&self, limit: usize) -> rusqlite::Result<Vec<DeadLetterRow>> {
        let mut select = self.db.prepare_cached(
            "SELECT id, topic, length(payload), qos, reason, at FROM dead_letters
             ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = select.query_map([limit as i64], |row| {
            Ok(DeadLetterRow {
                id: row.get(0)?,
                topic: row.get(1)?,
                bytes: row.get::<_, i64>(2)?.unsigned_abs(),
                qos: row.get(3)?,
                reason: row.get(4)?,
                at: row.get::<_, i64>(5)?.unsigned_abs(),
            })
        })?;
        let mut listed: Vec<DeadLetterRow> = rows.collect::<rusqlite::Result<_>>()?;
        listed.reverse();
        Ok(listed)
    }

    /// Moves every dead letter back into the queue with ids after `last_id`, in order; how
    /// many, and the highest id given.
    pub(super) fn requeue_dead_letters(&mut self, last_id: i64) -> rusqlite::Result<(u64, i64)> {
        let tx = self.db.transaction()?;
        let count: i64 = tx.query_row("SELECT COUNT(*) FROM dead_letters", [], |row| row.get(0))?;
        tx.execute(
            "INSERT INTO messages (id, topic, payload, qos, size, kind)
             SELECT ?1 + ROW_NUMBER() OVER (ORDER BY id), topic, payload, qos, size, kind
             FROM dead_letters ORDER BY id",
            [last_id],
        )?;
        tx.execute("DELETE FROM dead_letters", [])?;
        let highest = if count > 0 {
            tx.last_insert_rowid()
        } else {
            last_id
        };
        tx.commit()?;
        Ok((count.unsigned_abs(), highest))
    }

    pub(super) fn purge_dead_letters(&mut self) -> rusqlite::Result<u64> {
        Ok(self.db.execute("DELETE FROM dead_letters", [])? as u64)
    }

    /// Stores salvaged rows in one transaction; (new here, stored by an earlier run, highest
    /// id now). A row whose id is taken by the same message (that earlier run) is skipped; by
    /// another message (accepted after a run that stopped early), it gets an id after
    /// `last_id`.
    pub(super) fn store_salvaged(
        &mut self,
        rows: &[(i64, Message)],
        mut last_id: i64,
    ) -> rusqlite::Result<(u64, u64, i64)> {
        if rows.is_empty() {
            return Ok((0, 0, last_id));
        }
        let tx = self.db.transaction()?;
        let (mut saved, mut here) = (0, 0);
        {
            let mut existing =
                tx.prepare_cached("SELECT topic, payload FROM messages WHERE id = ?1")?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO messages (id, topic, payload, qos, size, kind, priority, ttl, conflate)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            for (id, message) in rows {
                let taken: Option<(String, Vec<u8>)> = existing
                    .query_row([id], |row| Ok((row.get(0)?, payload_bytes(row, 1)?)))
                    .optional()?;
                let id = match taken {
                    None => *id,
                    Some((topic, payload))
                        if topic == message.topic && payload == message.payload =>
                    {
                        here += 1;
                        continue;
                    }
                    Some(_) => {
                        last_id += 1;
                        last_id
                    }
                };
                insert.execute(params![
                    id,
                    message.topic,
                    message.payload,
                    message.qos.as_u8(),
                    (message.topic.len() + message.payload.len()) as i64,
                    message.kind.as_u8(),
                    message.options.priority.as_u8(),
                    message.options.ttl,
                    message.options.conflate,
                ])?;
                last_id = last_id.max(id);
                saved += 1;
            }
        }
        tx.commit()?;
        Ok((saved, here, last_id))
    }
}

/// One commit: acknowledged rows deleted, new rows inserted, older rows dropped for room, all
/// in one transaction (one fsync) that takes effect at `commit`.
pub(super) struct Commit<'a> {
    tx: Transaction<'a>,
    page_size: u64,
}

impl Commit<'_> {
    /// Bytes of the pages in use, as this transaction sees them.
    pub(super) fn live_bytes(&self) -> rusqlite::Result<u64> {
        live_pages_bytes(&self.tx, self.page_size)
    }

    /// Deletes rows `ids`; how many were there.
    pub(super) fn delete(&self, ids: &[i64]) -> rusqlite::Result<u64> {
        delete_in(&self.tx, ids)
    }

    /// The statement that inserts rows, prepared once for the whole commit.
    pub(super) fn inserter(&self) -> rusqlite::Result<Inserter<'_>> {
        Ok(Inserter(self.tx.prepare_cached(
            "INSERT INTO messages
                 (id, topic, payload, qos, size, kind, accepted_at, clock, priority, ttl, conflate)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?))
    }

    /// Saves the spool clock with the wall clock it was read at.
    pub(super) fn save_clock(&self, clock: u64, wall: u64) -> rusqlite::Result<()> {
        let mut save = self
            .tx
            .prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")?;
        save.execute(params!["clock", clock as i64])?;
        save.execute(params!["clock_wall", wall as i64])?;
        Ok(())
    }

    /// Deletes the oldest row with an id below `below`; its topic + payload size, `None` when
    /// there is none.
    pub(super) fn drop_oldest_below(&self, below: i64) -> rusqlite::Result<Option<u64>> {
        let size = self
            .tx
            .prepare_cached(
                "DELETE FROM messages WHERE id = (SELECT MIN(id) FROM messages WHERE id < ?1) RETURNING size",
            )?
            .query_row([below], |row| row.get::<_, i64>(0))
            .optional()?;
        Ok(size.map(i64::unsigned_abs))
    }

    pub(super) fn commit(self) -> rusqlite::Result<()> {
        self.tx.commit()
    }
}

/// Inserts rows into a commit.
pub(super) struct Inserter<'a>(rusqlite::CachedStatement<'a>);

impl Inserter<'_> {
    /// Inserts `row`, accepted at `accepted` (wall clock and spool clock, where known).
    pub(super) fn insert(
        &mut self,
        row: &StoredMessage,
        accepted: Option<(u64, u64)>,
    ) -> rusqlite::Result<()> {
        let message = &row.message;
        let options = &message.options;
        self.0.execute(params![
            row.id,
            message.topic,
            message.payload,
            message.qos.as_u8(),
            (message.topic.len() + message.payload.len()) as i64,
            message.kind.as_u8(),
            accepted.map(|(wall, _)| wall as i64),
            accepted.map(|(_, clock)| clock as i64),
            options.priority.as_u8(),
            options.ttl,
            options.conflate,
        ])?;
        Ok(())
    }
}

/// Pages in use, in bytes (inside a transaction: as that transaction sees them).
fn live_pages_bytes(db: &Connection, page_size: u64) -> rusqlite::Result<u64> {
    // Asked at every commit: prepared once.
    let pages: i64 = db
        .prepare_cached("PRAGMA page_count")?
        .query_row([], |row| row.get(0))?;
    let free: i64 = db
        .prepare_cached("PRAGMA freelist_count")?
        .query_row([], |row| row.get(0))?;
    Ok(pages.saturating_sub(free).unsigned_abs() * page_size)
}

fn trim_dead_letters(db: &Connection, max_bytes: u64) -> rusqlite::Result<(u64, u64)> {
    let mut trim = db.prepare_cached(
        "DELETE FROM dead_letters WHERE id IN (
             SELECT id FROM (
                 SELECT id,
                        ROW_NUMBER() OVER (ORDER BY id DESC) AS newest_first,
                        SUM(size) OVER (ORDER BY id DESC) AS bytes_to_here
                 FROM dead_letters)
             WHERE newest_first > 1 AND (newest_first > ?1 OR bytes_to_here > ?2))
         RETURNING size",
    )?;
    let sizes = trim.query_map(
        params![
            MAX_DEAD_LETTERS,
            i64::try_from(max_bytes).unwrap_or(i64::MAX)
        ],
        |row| row.get::<_, i64>(0),
    )?;
    let (mut rows, mut bytes) = (0, 0);
    for size in sizes {
        rows += 1;
        bytes += size?.unsigned_abs();
    }
    Ok((rows, bytes))
}

/// Deletes rows `ids` inside the caller's transaction, one statement per run of consecutive
/// ids (acknowledged rows mostly come in runs); how many were there.
fn delete_in(db: &Connection, ids: &[i64]) -> rusqlite::Result<u64> {
    if ids.is_empty() {
        return Ok(0);
    }
    let mut delete = db.prepare_cached("DELETE FROM messages WHERE id BETWEEN ?1 AND ?2")?;
    let mut deleted = 0;
    for (first, last) in runs(ids) {
        deleted += delete.execute(params![first, last])? as u64;
    }
    Ok(deleted)
}

/// `ids` as runs of consecutive ids, in order: [7, 1, 2, 3, 8] is 1..=3 and 7..=8.
pub(super) fn runs(ids: &[i64]) -> Vec<(i64, i64)> {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for id in sorted {
        match runs.last_mut() {
            Some((_, last)) if *last + 1 == id => *last = id,
            _ => runs.push((id, id)),
        }
    }
    runs
}
