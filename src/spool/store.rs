//! The SQLite side of the spool, owned by the spool thread: appends with group commit,
//! reads in id order, removal after PUBACK, the size bound, idle maintenance.

use super::*;

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
    let has_kind: bool = db.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('messages') WHERE name = 'kind'",
        [],
        |row| row.get(0),
    )?;
    if !has_kind {
        db.execute_batch("ALTER TABLE messages ADD COLUMN kind INTEGER;")?;
    }
    // When each message was accepted (seconds since the Unix epoch): the oldest one's age is
    // in `status`. Rows from older spools have none (NULL: unknown).
    let has_accepted_at: bool = db.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('messages') WHERE name = 'accepted_at'",
        [],
        |row| row.get(0),
    )?;
    if !has_accepted_at {
        db.execute_batch("ALTER TABLE messages ADD COLUMN accepted_at INTEGER;")?;
    }
    Ok(dead_letters)
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

/// What one read found on disk.
#[derive(Default)]
struct DiskRead {
    good: Vec<StoredMessage>,
    /// Rows that cannot be decoded (a damaged file).
    broken: Vec<(i64, rusqlite::Error)>,
    /// Payload bytes in `good`.
    bytes: usize,
    /// Every row after the cursor was read: the held messages may follow.
    done: bool,
}

/// The SQLite side, owned by the spool thread.
pub(super) struct Store {
    pub(super) db: Connection,
    pub(super) path: PathBuf,
    pub(super) max_bytes: u64,
    pub(super) on_full: OnFull,
    pub(super) stats: SpoolStats,
    pub(super) page_size: u64,
    /// Pages in use, as measured after the last commit.
    pub(super) live_bytes: u64,
    pub(super) incremental_vacuum: bool,
    /// The disk reserve file (`RESERVE_SUFFIX`) is not there (released, or not yet written).
    pub(super) reserve_missing: bool,
    /// A write happened since idle maintenance last found nothing to do.
    pub(super) dirty: bool,
    /// When a message last came or a write last committed: maintenance waits for
    /// `MAINTAIN_WHEN_QUIET` after it.
    pub(super) last_traffic: Instant,
    /// Pages were given back: a truncating checkpoint makes the files shrink.
    pub(super) shrunk: bool,
    pub(super) drop_log: Repeats,
    pub(super) fault_log: Repeats,
    /// Accepted, not committed, not acknowledged (write-behind).
    pub(super) pending: Pending<Waiter>,
    /// Acknowledged rows waiting to be deleted together.
    pub(super) removals: super::serve::Removals,
    /// The acceptance time of the oldest row on disk, as of the last `measure`.
    pub(super) oldest_on_disk: Option<Option<u64>>,
}

impl Store {
    pub(super) fn open(path: &Path, max_bytes: u64, on_full: OnFull) -> Result<Store, OpenError> {
        let sqlite = |source| OpenError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let db = Connection::open(path).map_err(sqlite)?;
        let check: String = db
            .query_row("PRAGMA quick_check", [], |row| row.get(0))
            .map_err(sqlite)?;
        if check != "ok" {
            return Err(sqlite(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
                Some(check),
            )));
        }
        let dead_letters = prepare_schema(&db, path).map_err(sqlite)?;
        let messages: i64 = db
            .query_row("SELECT COUNT(*) FROM messages", [], |row| row.get(0))
            .map_err(sqlite)?;
        // Dead letters use AUTOINCREMENT, so sqlite_sequence is there.
        let sequence: i64 = db
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'messages'",
                [],
                |row| row.get(0),
            )
            .optional()
            .map_err(sqlite)?
            .unwrap_or(0);
        let highest: i64 = db
            .query_row("SELECT IFNULL(MAX(id), 0) FROM messages", [], |row| {
                row.get(0)
            })
            .map_err(sqlite)?;
        let last_id = sequence.max(highest);
        let page_size: i64 = db
            .query_row("PRAGMA page_size", [], |row| row.get(0))
            .map_err(sqlite)?;
        let auto_vacuum: i64 = db
            .query_row("PRAGMA auto_vacuum", [], |row| row.get(0))
            .map_err(sqlite)?;
        let mut store = Store {
            db,
            path: path.to_owned(),
            max_bytes,
            on_full,
            stats: SpoolStats {
                messages: messages.unsigned_abs(),
                bytes: 0,
                dropped_total: 0,
                last_id,
                dead_letters,
                dead_letter_total: 0,
                fault: None,
                oldest_accepted_at: None,
            },
            page_size: page_size.unsigned_abs().max(512),
            live_bytes: 0,
            incremental_vacuum: auto_vacuum == 2,
            reserve_missing: true,
            dirty: true,
            last_traffic: Instant::now(),
            shrunk: false,
            drop_log: Repeats::default(),
            fault_log: Repeats::default(),
            pending: Pending::new(Duration::ZERO),
            removals: Default::default(),
            oldest_on_disk: None,
        };
        store.apply_wal_limit().map_err(sqlite)?;
        // Spools written before dead letters had a byte bound may hold more.
        if let Err(error) = store.bound_dead_letters() {
            tracing::warn!(%error, "cannot bound the dead letters");
        }
        store.measure().map_err(sqlite)?;
        store.restore_reserve();
        Ok(store)
    }

    pub(super) fn reserve_path(&self) -> PathBuf {
        with_suffix(&self.path, RESERVE_SUFFIX)
    }

    /// Writes the reserve file if it is missing. On failure (the disk is full) the partial file
    /// is removed, so the reserve never takes space the spool needs; it is retried later.
    pub(super) fn restore_reserve(&mut self) {
        if !self.reserve_missing {
            return;
        }
        let want = self.wal_reserve() * RESERVE_WALS;
        let path = self.reserve_path();
        let written = (|| -> std::io::Result<()> {
            use std::io::Write;
            let mut file = std::fs::File::create(&path)?;
            let chunk = vec![0u8; RESERVE_WRITE_CHUNK];
            let mut left = want;
            while left > 0 {
                let n = chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                file.write_all(&chunk[..n])?;
                left -= n as u64;
            }
            file.sync_all()
        })();
        match written {
            Ok(()) => self.reserve_missing = false,
            Err(error) => {
                let _ = std::fs::remove_file(&path);
                tracing::debug!(%error, "cannot restore the spool's disk reserve yet");
            }
        }
    }

    /// Gives the reserve's space back to the file system; `true` if there was one.
    pub(super) fn release_reserve(&mut self) -> bool {
        self.reserve_missing = true;
        std::fs::remove_file(self.reserve_path()).is_ok()
    }

    /// The WAL's share of `max_bytes`, in pages.
    pub(super) fn wal_pages(&self) -> u64 {
        (self.max_bytes / WAL_SHARE / self.page_size)
            .clamp(WAL_MIN_PAGES, WAL_MAX_BYTES / self.page_size)
    }

    /// Bytes kept for the WAL when deciding whether a message fits.
    pub(super) fn wal_reserve(&self) -> u64 {
        self.wal_pages() * self.page_size
    }

    pub(super) fn apply_wal_limit(&self) -> rusqlite::Result<()> {
        // Both fit in i64: the WAL is capped at WAL_MAX_BYTES.
        let pages = self.wal_pages() as i64;
        self.db.pragma_update(None, "wal_autocheckpoint", pages)?;
        // A WAL grown by one big transaction is cut back to this at its next reset.
        self.db
            .pragma_update(None, "journal_size_limit", pages * self.page_size as i64)?;
        Ok(())
    }

    pub(super) fn wal_file_bytes(&self) -> u64 {
        std::fs::metadata(with_suffix(&self.path, "-wal")).map_or(0, |m| m.len())
    }

    /// Pages in use (inside a transaction: as that transaction sees them).
    pub(super) fn live_pages_bytes(db: &Connection, page_size: u64) -> rusqlite::Result<u64> {
        // Asked at every commit: prepared once.
        let pages: i64 = db
            .prepare_cached("PRAGMA page_count")?
            .query_row([], |row| row.get(0))?;
        let free: i64 = db
            .prepare_cached("PRAGMA freelist_count")?
            .query_row([], |row| row.get(0))?;
        Ok(pages.saturating_sub(free).unsigned_abs() * page_size)
    }

    /// Refreshes the on-disk figures: pages in use, and `stats.bytes` with the WAL.
    pub(super) fn measure(&mut self) -> rusqlite::Result<()> {
        self.live_bytes = Self::live_pages_bytes(&self.db, self.page_size)?;
        self.stats.bytes = self.live_bytes + self.wal_file_bytes();
        self.oldest_on_disk = self.oldest_row_accepted_at()?;
        Ok(())
    }

    /// The oldest row's acceptance time, skipping acknowledged rows not deleted yet:
    /// `None` without rows, `Some(None)` when it is not known (a row from an older spool).
    fn oldest_row_accepted_at(&self) -> rusqlite::Result<Option<Option<u64>>> {
        let mut oldest = self
            .db
            .prepare_cached("SELECT id, accepted_at FROM messages ORDER BY id")?;
        let mut rows = oldest.query([])?;
        while let Some(row) = rows.next()? {
            if !self.removals.ids.contains(&row.get(0)?) {
                let at: Option<i64> = row.get(1)?;
                return Ok(Some(at.map(i64::unsigned_abs)));
            }
        }
        Ok(None)
    }

    /// How far over `max_bytes` the spool is (pages in use plus the WAL's reserve).
    pub(super) fn excess(&self) -> u64 {
        (self.live_bytes + self.wal_reserve()).saturating_sub(self.max_bytes)
    }

    /// Over `max_bytes` with `drop-oldest`. The newest message stays: it was just accepted.
    pub(super) fn must_trim(&self) -> bool {
        self.excess() > 0 && self.on_full == OnFull::DropOldest && self.stats.messages > 1
    }

    /// Copies what reads back from the corrupt spool moved to `aside` (with its WAL) into this
    /// one, ids and order kept, a chunk at a time: memory and the transaction stay bounded, and
    /// nothing but the new rows needs disk space (the moved files are read in place, read-only,
    /// and stay for inspection). A damaged header hides everything behind it: then a copy with
    /// a sound header is read instead. Finished (read to the end, or to unreadable data), the
    /// files get a `.done` marker; stopped early (the disk is full), the next start goes on.
    pub(super) fn salvage_from(&mut self, aside: &Path) -> Salvage {
        let mut salvage = self.salvage_chunks(aside, aside);
        if salvage.unreadable && salvage.outcome.saved == 0 {
            salvage = self.salvage_repaired_copy(aside);
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
        let _ = self.measure();
        salvage.outcome
    }

    /// Salvages from a copy of `aside` whose header is rebuilt (needs the file's size free).
    fn salvage_repaired_copy(&mut self, aside: &Path) -> SalvageRun {
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
            Ok(()) => self.salvage_chunks(&copy, aside),
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
    fn salvage_chunks(&mut self, source: &Path, aside: &Path) -> SalvageRun {
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
        self.stats.last_id = self.stats.last_id.max(reader.highest);
        let mut rows = Vec::new();
        loop {
            if free_disk_bytes(&self.path).is_some_and(|free| free < SALVAGE_HEADROOM) {
                break;
            }
            rows.clear();
            // What was read before an error is still stored.
            let read = reader.next_chunk(&mut rows);
            match self.store_salvaged(&rows) {
                Ok((saved, here)) => {
                    run.outcome.saved += saved;
                    run.already_here += here;
                    // Into the db at once: the WAL never holds more than a chunk, so the
                    // salvage needs about the rows' size free, not twice that.
                    self.checkpoint_truncate();
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

    /// Stores one chunk of salvaged rows; how many are new here, and how many an earlier run
    /// stored already. A row whose id is taken by the same message (that earlier run) is
    /// skipped; by another message (accepted after a run that stopped early), it gets a new id.
    fn store_salvaged(&mut self, rows: &[(i64, Message)]) -> rusqlite::Result<(u64, u64)> {
        if rows.is_empty() {
            return Ok((0, 0));
        }
        let tx = self.db.transaction()?;
        let (mut saved, mut here) = (0, 0);
        let mut last_id = self.stats.last_id;
        {
            let mut existing =
                tx.prepare_cached("SELECT topic, payload FROM messages WHERE id = ?1")?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO messages (id, topic, payload, qos, size, kind)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
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
                ])?;
                last_id = last_id.max(id);
                saved += 1;
            }
        }
        tx.commit()?;
        self.stats.messages += saved;
        self.stats.last_id = last_id;
        Ok((saved, here))
    }

    /// One step of idle housekeeping; `false` when there is nothing (more) to do.
    pub(super) fn maintain(&mut self, stats: &watch::Sender<SpoolStats>) -> bool {
        if self.must_trim() {
            return self.trim_chunk(stats);
        }
        if self.maintenance_at().is_none_or(|at| Instant::now() < at) {
            return false;
        }
        let step = (|| -> rusqlite::Result<bool> {
            let free: i64 = self
                .db
                .query_row("PRAGMA freelist_count", [], |row| row.get(0))?;
            let free = free.unsigned_abs();
            if self.incremental_vacuum
                && free > 0
                && (free >= VACUUM_MIN_FREE_PAGES || self.stats.messages == 0)
            {
                self.db
                    .execute_batch(&format!("PRAGMA incremental_vacuum({VACUUM_CHUNK_PAGES})"))?;
                let left: i64 = self
                    .db
                    .query_row("PRAGMA freelist_count", [], |row| row.get(0))?;
                self.shrunk = true;
                // No progress: stop rather than spin.
                return Ok(left.unsigned_abs() < free);
            }
            if self.shrunk || self.wal_file_bytes() > self.wal_reserve() {
                // Folds the WAL into the db and truncates both: the files really shrink.
                self.db
                    .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
                self.shrunk = false;
            }
            Ok(false)
        })();
        let more = match step {
            Ok(more) => more,
            Err(error) if is_disk_full(&error) => false,
            Err(error) => {
                self.record_fault(Operation::Write, &error);
                false
            }
        };
        if !more {
            self.dirty = false;
            self.restore_reserve();
        }
        let _ = self.measure();
        self.publish_stats(stats);
        more
    }

    /// When idle maintenance (vacuum, truncating checkpoint) may run: once no message came
    /// and no write committed for `MAINTAIN_WHEN_QUIET`. Each step waits for an fsync, and a
    /// message arriving meanwhile would wait behind it; pages given back while messages flow
    /// are only taken again by the next commits. `None`: nothing to do.
    pub(super) fn maintenance_at(&self) -> Option<Instant> {
        self.dirty
            .then_some(self.last_traffic + MAINTAIN_WHEN_QUIET)
    }

    /// Drops the oldest messages, at most one bounded chunk, to get back under `max_bytes`.
    /// `true` when it dropped some.
    pub(super) fn trim_chunk(&mut self, stats: &watch::Sender<SpoolStats>) -> bool {
        // Acknowledged rows first: they free space, and are never counted as dropped.
        self.flush_removals(stats);
        let excess = self.excess();
        let rows = TRIM_CHUNK_ROWS.min(self.stats.messages.saturating_sub(1) as usize);
        let result = self.drop_oldest(excess.min(TRIM_CHUNK_BYTES), rows);
        let dropped = match result {
            Ok(dropped) => dropped,
            Err(error) => {
                if !is_disk_full(&error) {
                    self.record_fault(Operation::Write, &error);
                }
                0
            }
        };
        if dropped > 0 {
            self.log_drops(dropped, "spool over max_bytes: dropped the oldest messages");
        }
        let _ = self.measure();
        self.publish_stats(stats);
        dropped > 0
    }

    /// Deletes oldest rows (one transaction) until their estimated size reaches `bytes` or
    /// `max_rows` went; counts them as dropped. Returns how many.
    pub(super) fn drop_oldest(&mut self, bytes: u64, max_rows: usize) -> rusqlite::Result<u64> {
        let tx = self.db.transaction()?;
        let mut dropped = 0u64;
        let mut freed = 0u64;
        {
            let mut oldest = tx.prepare_cached(
                "DELETE FROM messages WHERE id = (SELECT MIN(id) FROM messages) RETURNING size",
            )?;
            while freed < bytes.max(1) && (dropped as usize) < max_rows {
                let Some(size) = oldest
                    .query_row([], |row| row.get::<_, i64>(0))
                    .optional()?
                else {
                    break;
                };
                freed += size.unsigned_abs() + ROW_OVERHEAD;
                dropped += 1;
            }
        }
        tx.commit()?;
        self.stats.messages = self.stats.messages.saturating_sub(dropped);
        self.stats.dropped_total += dropped;
        self.wrote();
        Ok(dropped)
    }

    pub(super) fn log_drops(&mut self, dropped: u64, text: &'static str) {
        if let Some(held_back) = self.drop_log.admit(text) {
            tracing::warn!(
                dropped,
                dropped_total = self.stats.dropped_total,
                held_back,
                "{text}"
            );
        }
    }

    /// A write committed: a write fault is over, and idle housekeeping may have work.
    pub(super) fn wrote(&mut self) {
        self.dirty = true;
        self.last_traffic = Instant::now();
        if self.stats.fault.is_some() {
            tracing::info!("spool storage works again");
            self.stats.fault = None;
            self.fault_log.clear();
        }
    }

    pub(super) fn record_fault(&mut self, operation: Operation, error: &rusqlite::Error) {
        let fault = StorageFault {
            operation,
            code: extended_code(error),
        };
        // A failed read must not replace a failed write: a later good read would clear it.
        let keeps_write = operation == Operation::Read
            && self
                .stats
                .fault
                .is_some_and(|f| f.operation == Operation::Write);
        if !keeps_write {
            self.stats.fault = Some(fault);
        }
        // One text for every storage failure, so alternating ones are held back too.
        const TEXT: &str = "spool storage failed";
        if let Some(held_back) = self.fault_log.admit(TEXT) {
            tracing::error!(
                %error,
                fault = %fault,
                held_back,
                "{TEXT}; messages are refused with storage_error and watchdog pings withheld"
            );
        }
    }

    /// Counters go out before any answer, so a writer that got `ok` sees its message counted.
    pub(super) fn publish_stats(&mut self, stats: &watch::Sender<SpoolStats>) {
        // Rows on disk are older than anything held.
        self.stats.oldest_accepted_at = match self.oldest_on_disk {
            Some(on_disk) => on_disk,
            None => self.pending.oldest_accepted_at(),
        };
        stats.send_if_modified(|current| {
            let changed = *current != self.stats;
            *current = self.stats;
            changed
        });
    }

    /// Commits `batch` (ids given), dropping the oldest to make room on a full disk with
    /// `drop-oldest`; one result per row, for its writer.
    pub(super) fn append_batch(
        &mut self,
        batch: &[StoredMessage],
        accepted_at: &[u64],
    ) -> Vec<Result<(), AppendError>> {
        let before = self.stats;
        let mut outcome = self.try_append_batch(batch, accepted_at);
        if outcome.is_err() {
            self.stats = before;
        }
        // Disk full with drop-oldest: make room by dropping the oldest, then try again.
        let mut room = batch
            .iter()
            .map(|m| (m.message.topic.len() + m.message.payload.len()) as u64 + ROW_OVERHEAD)
            .sum::<u64>();
        // Nothing is left to drop, and the reserve exists only to let drops happen on a full
        // disk: its space takes new messages instead of refusing every one.
        if outcome.as_ref().is_err_and(is_disk_full)
            && self.stats.messages == 0
            && self.release_reserve()
        {
            tracing::warn!(
                "disk is full and the spool empty: gave the spool's disk reserve to new messages"
            );
            outcome = self.try_append_batch(batch, accepted_at);
            if outcome.is_err() {
                self.stats = before;
            }
        }
        let mut attempts = 0;
        let mut disk_full = false;
        while let Err(error) = &outcome
            && is_disk_full(error)
            && self.on_full == OnFull::DropOldest
            && attempts < DISK_FULL_RETRIES
            && self.stats.messages > 0
        {
            attempts += 1;
            disk_full = true;
            // The reserve's space lets the checkpoint (which may grow the db by the WAL's new
            // pages) and the deletion write. It is restored in idle time, once vacuuming gives
            // space back. Freed pages stay in the db here: the retried insert reuses them, so
            // later checkpoints need no growth and the spool cycles in the space it has.
            self.release_reserve();
            // Fold the WAL back first: the deletion then reuses its space instead of growing it.
            self.checkpoint_truncate();
            // Acknowledged rows first: they free space, and are never counted as dropped.
            self.delete_removals();
            match self.drop_oldest(room, usize::MAX) {
                Ok(dropped) if dropped > 0 => {}
                _ => break,
            }
            self.checkpoint_truncate();
            room = room.saturating_mul(2);
            let kept = self.stats;
            outcome = self.try_append_batch(batch, accepted_at);
            if outcome.is_err() {
                self.stats = kept;
            }
        }
        let results = match outcome {
            Ok(results) => {
                self.wrote();
                results
            }
            Err(error) => {
                let refusal = if is_disk_full(&error) {
                    const TEXT: &str = "disk is full; refusing new messages until space is free";
                    if let Some(held_back) = self.fault_log.admit(TEXT) {
                        tracing::warn!(held_back, "{TEXT}");
                    }
                    AppendError::Full(self.stats.bytes)
                } else {
                    self.record_fault(Operation::Write, &error);
                    AppendError::Storage(
                        self.stats
                            .fault
                            .map_or_else(|| error.to_string(), |f| f.to_string()),
                    )
                };
                vec![Err(refusal); batch.len()]
            }
        };
        let dropped = self.stats.dropped_total - before.dropped_total;
        if dropped > 0 {
            self.log_drops(
                dropped,
                if disk_full {
                    "disk full: dropped the oldest messages to make room"
                } else {
                    "spool full: dropped the oldest messages to make room"
                },
            );
        }
        let _ = self.measure();
        // At the limit, a WAL grown past its share by this commit would keep the spool over
        // `max_bytes` on disk until idle maintenance: fold it back now.
        if self.stats.bytes > self.max_bytes {
            self.checkpoint_truncate();
            let _ = self.measure();
        }
        results
    }

    /// Folds the WAL into the db and truncates it (errors only mean it stays as it is).
    pub(super) fn checkpoint_truncate(&self) {
        let _ = self
            .db
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    }

    /// `accepted_at`: each row's acceptance time (seconds since the Unix epoch), where known.
    pub(super) fn try_append_batch(
        &mut self,
        batch: &[StoredMessage],
        accepted_at: &[u64],
    ) -> rusqlite::Result<Vec<Result<(), AppendError>>> {
        let reserve = self.wal_reserve();
        let tx = self.db.transaction()?;
        // Acknowledged rows go in the same transaction, first: no commit of their own, and a
        // drop-oldest below never counts one of them as dropped.
        let removed: Vec<i64> = self.removals.ids.iter().copied().collect();
        let deleted = delete_in(&tx, &removed)?;
        let mut results = Vec::with_capacity(batch.len());
        // Estimated pages in use plus the WAL's share, as this transaction goes.
        let mut used = Self::live_pages_bytes(&tx, self.page_size)? + reserve;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO messages (id, topic, payload, qos, size, kind, accepted_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            // Only rows older than this commit: its own rows are answered `ok` with it.
            let mut oldest = tx.prepare_cached(
                "DELETE FROM messages WHERE id = (SELECT MIN(id) FROM messages WHERE id < ?1) RETURNING size",
            )?;
            let first_id = batch.first().map_or(i64::MAX, |m| m.id);
            for (index, StoredMessage { id, message }) in batch.iter().enumerate() {
                let size = (message.topic.len() + message.payload.len()) as u64;
                let cost = size + ROW_OVERHEAD;
                if used + cost > self.max_bytes {
                    // The per-row estimate runs ahead of the pages really used: measure before
                    // refusing, or a later transaction (measured afresh) takes newer messages
                    // after older ones were refused.
                    used = Self::live_pages_bytes(&tx, self.page_size)? + reserve;
                }
                if used + cost > self.max_bytes {
                    if self.on_full == OnFull::RejectNew {
                        results.push(Err(AppendError::Full(self.max_bytes)));
                        continue;
                    }
                    // Bounded like a trim; anything left over is trimmed between commands.
                    let mut dropped_here = 0;
                    while used + cost > self.max_bytes && dropped_here < TRIM_CHUNK_ROWS {
                        let Some(freed) = oldest
                            .query_row([first_id], |row| row.get::<_, i64>(0))
                            .optional()?
                        else {
                            break;
                        };
                        used = used.saturating_sub(freed.unsigned_abs() + ROW_OVERHEAD);
                        dropped_here += 1;
                        self.stats.messages = self.stats.messages.saturating_sub(1);
                        self.stats.dropped_total += 1;
                    }
                    if used + cost > self.max_bytes {
                        used = Self::live_pages_bytes(&tx, self.page_size)? + reserve;
                    }
                    if used + cost > self.max_bytes && dropped_here < TRIM_CHUNK_ROWS {
                        // Nothing older is left to drop: this one does not fit.
                        results.push(Err(AppendError::Full(self.max_bytes)));
                        continue;
                    }
                }
                insert.execute(params![
                    id,
                    message.topic,
                    message.payload,
                    message.qos.as_u8(),
                    size as i64,
                    message.kind.as_u8(),
                    accepted_at.get(index).map(|&at| at as i64),
                ])?;
                used += cost;
                self.stats.messages += 1;
                self.stats.last_id = self.stats.last_id.max(*id);
                results.push(Ok(()));
            }
            // The per-row estimate runs behind the pages really used: settle on what the pages
            // say before anything is answered. Older rows go first (drop-oldest); then this
            // commit's newest rows are refused, never its older ones dropped after their `ok`.
            let mut actual = Self::live_pages_bytes(&tx, self.page_size)? + reserve;
            while actual > self.max_bytes && self.on_full == OnFull::DropOldest {
                if oldest
                    .query_row([first_id], |row| row.get::<_, i64>(0))
                    .optional()?
                    .is_none()
                {
                    break;
                }
                self.stats.messages = self.stats.messages.saturating_sub(1);
                self.stats.dropped_total += 1;
                actual = Self::live_pages_bytes(&tx, self.page_size)? + reserve;
            }
            let mut refuse = tx.prepare_cached("DELETE FROM messages WHERE id = ?1")?;
            for (StoredMessage { id, .. }, result) in batch.iter().zip(results.iter_mut()).rev() {
                if actual <= self.max_bytes {
                    break;
                }
                if result.is_ok() {
                    refuse.execute([id])?;
                    *result = Err(AppendError::Full(self.max_bytes));
                    self.stats.messages = self.stats.messages.saturating_sub(1);
                    actual = Self::live_pages_bytes(&tx, self.page_size)? + reserve;
                }
            }
        }
        tx.commit()?;
        // Rows already gone (dropped meanwhile) were counted off twice.
        self.stats.messages += removed.len() as u64 - deleted.min(removed.len() as u64);
        self.removals = Default::default();
        Ok(results)
    }

    /// The next messages after `after`. A row that cannot be decoded (a damaged file) can never
    /// be published and would hold back every message behind it: it is logged, removed and
    /// counted as dropped, and the rest goes on. A failed query is an error (and a fault).
    pub(super) fn read_after(
        &mut self,
        after: i64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, ReadError> {
        let read = self.read_disk(after, limit, max_bytes);
        let DiskRead {
            mut good,
            broken,
            bytes,
            done: disk_done,
        } = match read {
            Ok(read) => read,
            Err(error) => {
                self.record_fault(Operation::Read, &error);
                return Err(ReadError::Storage(
                    self.stats
                        .fault
                        .map_or_else(|| error.to_string(), |f| f.to_string()),
                ));
            }
        };
        if disk_done {
            // Held ids are above every row on disk: order holds across memory and disk.
            self.pending
                .read_after(after, limit, max_bytes, bytes, &mut good);
        }
        if self
            .stats
            .fault
            .is_some_and(|f| f.operation == Operation::Read)
        {
            tracing::info!("spool reads work again");
            self.stats.fault = None;
            self.fault_log.clear();
        }
        if !broken.is_empty() {
            for (id, error) in &broken {
                tracing::error!(spool_id = id, %error, "undecodable spool row dropped");
            }
            let ids: Vec<i64> = broken.iter().map(|(id, _)| *id).collect();
            match self.delete_rows(&ids) {
                Ok(deleted) => {
                    self.stats.messages = self.stats.messages.saturating_sub(deleted);
                    self.stats.dropped_total += deleted;
                    self.wrote();
                }
                Err(error) => self.record_fault(Operation::Write, &error),
            }
            let _ = self.measure();
        }
        Ok(good)
    }

    /// The rows after `after` on disk, as [`Store::read_after`] bounds them.
    fn read_disk(&self, after: i64, limit: usize, max_bytes: usize) -> rusqlite::Result<DiskRead> {
        let mut read = DiskRead::default();
        // Acknowledged rows not deleted yet are skipped: read as many more.
        let wanted = limit.saturating_add(self.removals.ids.len());
        // No `LIMIT ?`: SQLite plans a bound LIMIT by its value, so it would compile the
        // statement again at every read. Rows come one step at a time; stepping stops early.
        let mut select = self.db.prepare_cached(
            "SELECT id, topic, payload, qos, kind FROM messages WHERE id > ?1 ORDER BY id",
        )?;
        let mut rows = select.query(params![after])?;
        let mut seen = 0usize;
        while read.good.len() < limit && read.bytes < max_bytes && seen < wanted {
            let Some(row) = rows.next()? else {
                // Every row after `after` was seen: the held messages come next.
                read.done = true;
                break;
            };
            seen += 1;
            let id: i64 = row.get(0)?;
            if self.removals.ids.contains(&id) {
                continue;
            }
            let message = row_message(row);
            match message {
                Ok(message) => {
                    read.bytes += message.payload.len();
                    read.good.push(StoredMessage { id, message });
                }
                Err(error) => read.broken.push((id, error)),
            }
        }
        Ok(read)
    }

    /// Deletes the gathered acknowledged rows in a transaction of their own. On a failure
    /// they are counted back and forgotten: sent again later, a duplicate, never a loss.
    pub(super) fn delete_removals(&mut self) {
        if self.removals.ids.is_empty() {
            return;
        }
        let removals = std::mem::take(&mut self.removals);
        let ids: Vec<i64> = removals.ids.into_iter().collect();
        match self.delete_rows(&ids) {
            Ok(deleted) => {
                // Rows already gone (dropped meanwhile) were counted off twice.
                self.stats.messages += ids.len() as u64 - deleted.min(ids.len() as u64);
                self.wrote();
            }
            Err(error) => {
                self.stats.messages += ids.len() as u64;
                self.record_fault(Operation::Write, &error);
            }
        }
    }

    /// Deletes rows `ids` in one transaction; how many were there. Ids already gone are
    /// ignored.
    pub(super) fn delete_rows(&mut self, ids: &[i64]) -> rusqlite::Result<u64> {
        let tx = self.db.transaction()?;
        let deleted = delete_in(&tx, ids)?;
        tx.commit()?;
        Ok(deleted)
    }
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
