//! The durable spool: every message answered `ok` is in here until the broker acknowledged it.
//!
//! SQLite in WAL mode, owned by one thread. Appends arriving together share one transaction and
//! one fsync (group commit); their senders are told only after that commit, which is what makes
//! an `ok` answer a promise. The publisher reads in id order and removes after PUBACK.
//!
//! Size: `max_bytes` bounds what the spool really takes on disk, its pages in use plus the WAL
//! (kept to an eighth of `max_bytes` by checkpoints). Pages freed by delivery are given back to
//! the file system in idle time (incremental vacuum), so the file shrinks after a backlog.
//! Over the limit (a lowered `max_bytes`) with `drop-oldest`, the oldest are dropped in bounded
//! chunks between other work, so the spool thread never stalls for long.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rusqlite::{Connection, ErrorCode, OptionalExtension, params};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use crate::config::OnFull;
use crate::message::{Message, PayloadKind, Qos};
use crate::ops::logging::Repeats;

/// File name of the spool inside the state dir.
pub const SPOOL_FILE: &str = "spool.db";
/// Most appends committed in one transaction.
const MAX_GROUP_COMMIT: usize = 4096;
/// Commands waiting for the spool thread; a full queue makes writers wait (backpressure).
const COMMAND_QUEUE: usize = 8192;
/// Bytes of messages waiting for their commit, across all writers: beyond this, writers wait.
const MAX_QUEUED_BYTES: u32 = 32 * 1024 * 1024;
/// What a row costs beyond its topic and payload (cell and record headers, pointers), for the
/// estimate made inside a transaction; the real size is measured after each commit.
const ROW_OVERHEAD: u64 = 32;
/// The WAL may take this share of `max_bytes` (1/8) before a checkpoint folds it back in...
const WAL_SHARE: u64 = 8;
/// ...within these bounds, in pages.
const WAL_MIN_PAGES: u64 = 4;
const WAL_MAX_PAGES: u64 = 1000;
/// One trim transaction (over `max_bytes`) drops at most this many rows or bytes: each stays
/// short, so the spool thread answers the publisher and the watchdog probe in between.
const TRIM_CHUNK_ROWS: usize = 1000;
const TRIM_CHUNK_BYTES: u64 = 4 * 1024 * 1024;
/// Pages given back per idle vacuum step (bounded for the same reason).
const VACUUM_CHUNK_PAGES: u64 = 256;
/// Free pages worth a vacuum while messages remain (an empty spool is always compacted).
const VACUUM_MIN_FREE_PAGES: u64 = 256;
/// Disk full with `drop-oldest`: how many times to drop (twice as much each time) and retry.
const DISK_FULL_RETRIES: u32 = 4;
/// Rows read per step while salvaging a corrupt spool.
const SALVAGE_CHUNK: i64 = 1000;
/// File kept next to the spool, full of zeros, holding back disk space for a full disk: in WAL
/// mode even a DELETE must first grow the WAL (and a checkpoint the db), so on a disk with no
/// byte free `drop-oldest` could never make room. Released when the disk is full, restored
/// from the space the dropped messages give back.
const RESERVE_SUFFIX: &str = ".reserve";
/// The reserve, in multiples of the WAL's share (a checkpoint may grow the db by a whole WAL,
/// and the deletion needs WAL frames of its own).
const RESERVE_WALS: u64 = 2;
/// Chunk written while restoring the reserve.
const RESERVE_WRITE_CHUNK: usize = 64 * 1024;

/// Why an append was not accepted.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AppendError {
    #[error("spool is full ({0} bytes)")]
    Full(u64),
    #[error("spool storage failed: {0}")]
    Storage(String),
    #[error("spool is closed")]
    Closed,
}

/// Why a read returned nothing: not the same as an empty spool.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ReadError {
    #[error("spool read failed: {0}")]
    Storage(String),
    #[error("spool is closed")]
    Closed,
}

/// Why the spool could not be opened at all.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open spool {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot move corrupt spool {path} aside: {source}")]
    MoveAside {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the spool thread: {0}")]
    Thread(std::io::Error),
}

/// A message as stored, with the id that orders it.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub id: i64,
    pub message: Message,
}

/// Which kind of spool operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Read,
    Write,
}

/// The storage failure behind the spool's last failed operation (not a full disk: that is the
/// `on_full` policy's business).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageFault {
    pub operation: Operation,
    /// SQLite's extended result code; -1 when the failure was not SQLite's own.
    pub code: i32,
}

impl std::fmt::Display for StorageFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let operation = match self.operation {
            Operation::Read => "read",
            Operation::Write => "write",
        };
        if self.code < 0 {
            write!(f, "{operation} failed")
        } else {
            write!(
                f,
                "{operation} failed: {} (SQLite code {})",
                rusqlite::ffi::code_to_str(self.code),
                self.code
            )
        }
    }
}

/// Counters the spool publishes after every change, for the publisher and `status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    pub messages: u64,
    /// On disk: pages in use plus the WAL.
    pub bytes: u64,
    pub dropped_total: u64,
    /// Highest id ever appended; the publisher wakes when it moves.
    pub last_id: i64,
    /// Messages in the dead-letter table now, and moved there since the start.
    pub dead_letters: u64,
    pub dead_letter_total: u64,
    /// Set while the spool's last operation of that kind failed; the watchdog stops pinging.
    pub fault: Option<StorageFault>,
}

enum Command {
    Append {
        message: Message,
        done: oneshot::Sender<Result<(), AppendError>>,
        /// The message's share of `MAX_QUEUED_BYTES`, given back once it is committed.
        queued: OwnedSemaphorePermit,
    },
    ReadAfter {
        after: i64,
        limit: usize,
        max_bytes: usize,
        reply: oneshot::Sender<Result<Vec<StoredMessage>, ReadError>>,
    },
    Remove {
        ids: Vec<i64>,
    },
    /// Dead letters: see the block at the end of this file.
    DeadLetters(DeadLetterCommand),
    SetLimits {
        max_bytes: u64,
        on_full: OnFull,
    },
}

/// A cheap, cloneable handle to the spool thread.
#[derive(Clone)]
pub struct Spool {
    commands: mpsc::Sender<Command>,
    queued_bytes: Arc<Semaphore>,
    stats: watch::Receiver<SpoolStats>,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`. A corrupt file is moved aside with its WAL, what
    /// reads back from it is salvaged into a fresh spool; never fatal.
    pub fn open(dir: &Path, max_bytes: u64, on_full: OnFull) -> Result<Spool, OpenError> {
        let path = dir.join(SPOOL_FILE);
        let store = match Store::open(&path, max_bytes, on_full) {
            Ok(store) => store,
            Err(OpenError::Sqlite { source, .. }) if is_corruption(&source) => {
                let aside = move_aside(&path)?;
                tracing::error!(
                    spool = %path.display(),
                    moved_to = %aside.display(),
                    error = %source,
                    "spool file is corrupt; moved it aside with its WAL and started a fresh one"
                );
                let mut store = Store::open(&path, max_bytes, on_full)?;
                let salvage = store.salvage_from(&aside);
                tracing::warn!(
                    saved = salvage.saved,
                    lost = %salvage.lost.map_or_else(|| "unknown".to_owned(), |n| n.to_string()),
                    moved_to = %aside.display(),
                    "salvaged messages from the corrupt spool"
                );
                store
            }
            Err(other) => return Err(other),
        };
        let (stats_tx, stats) = watch::channel(store.stats);
        let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
        std::thread::Builder::new()
            .name("spool".into())
            .spawn(move || store.serve(receiver, stats_tx))
            .map_err(OpenError::Thread)?;
        Ok(Spool {
            commands,
            queued_bytes: Arc::new(Semaphore::new(MAX_QUEUED_BYTES as usize)),
            stats,
        })
    }

    /// Queues `message`; waits while the spool is behind (backpressure). The returned receiver
    /// resolves once the message is durable or refused.
    pub async fn submit(
        &self,
        message: Message,
    ) -> Result<oneshot::Receiver<Result<(), AppendError>>, AppendError> {
        let size =
            (message.topic.len() + message.payload.len()).clamp(1, MAX_QUEUED_BYTES as usize);
        let queued = self
            .queued_bytes
            .clone()
            .acquire_many_owned(size as u32)
            .await
            .map_err(|_| AppendError::Closed)?;
        let (done, receiver) = oneshot::channel();
        self.commands
            .send(Command::Append {
                message,
                done,
                queued,
            })
            .await
            .map_err(|_| AppendError::Closed)?;
        Ok(receiver)
    }

    /// Appends and waits until the message is durable.
    pub async fn append(&self, message: Message) -> Result<(), AppendError> {
        self.submit(message)
            .await?
            .await
            .unwrap_or(Err(AppendError::Closed))
    }

    /// Up to `limit` messages with an id above `after`, oldest first, ending once their
    /// payloads add up to `max_bytes` (the first one always comes): bounds the memory a read
    /// takes when messages are large. A failed read is an error, never an empty spool.
    pub async fn read_after(
        &self,
        after: i64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, ReadError> {
        let (reply, receiver) = oneshot::channel();
        let command = Command::ReadAfter {
            after,
            limit,
            max_bytes,
            reply,
        };
        self.commands
            .send(command)
            .await
            .map_err(|_| ReadError::Closed)?;
        receiver.await.unwrap_or(Err(ReadError::Closed))
    }

    /// Forgets delivered messages. Ids already dropped are ignored.
    pub async fn remove(&self, ids: Vec<i64>) {
        if !ids.is_empty() {
            let _ = self.commands.send(Command::Remove { ids }).await;
        }
    }

    /// New `max_bytes` / `on_full` (SIGHUP). A lower limit with `drop-oldest` trims the oldest
    /// in bounded chunks.
    pub async fn set_limits(&self, max_bytes: u64, on_full: OnFull) {
        let _ = self
            .commands
            .send(Command::SetLimits { max_bytes, on_full })
            .await;
    }

    /// Counters after the latest change.
    pub fn stats(&self) -> watch::Receiver<SpoolStats> {
        self.stats.clone()
    }
}

fn is_corruption(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    ) || matches!(error, rusqlite::Error::QueryReturnedNoRows)
}

fn is_disk_full(error: &rusqlite::Error) -> bool {
    error.sqlite_error_code() == Some(ErrorCode::DiskFull)
}

fn extended_code(error: &rusqlite::Error) -> i32 {
    match error {
        rusqlite::Error::SqliteFailure(failure, _) => failure.extended_code,
        _ => -1,
    }
}

/// `path` with `suffix` appended to its file name (SQLite's `-wal` / `-shm` naming).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Renames the db with its `-wal` and `-shm` together: the WAL holds the newest committed
/// (acknowledged) messages, and it only makes sense next to its own db.
fn move_aside(path: &Path) -> Result<PathBuf, OpenError> {
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
struct Salvage {
    saved: u64,
    /// `None` when the old spool cannot even say how many it held.
    lost: Option<u64>,
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

/// A payload's bytes. The column is declared BLOB, but SQLite keeps whatever type was written:
/// a TEXT value (written by hand or by another tool) is the same bytes and must not be dropped.
fn payload_bytes(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<Vec<u8>> {
    use rusqlite::types::ValueRef;
    match row.get_ref(index)? {
        ValueRef::Blob(bytes) | ValueRef::Text(bytes) => Ok(bytes.to_vec()),
        _ => row.get(index),
    }
}

/// Reads `(id, message)` rows from a salvage copy in id order into `rows`, as far as the file
/// lets it. Returns how many the copy says it held, when it can say.
fn read_salvage(copy: &Path, rows: &mut Vec<(i64, Message)>) -> rusqlite::Result<Option<u64>> {
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
            let message = (|| {
                Ok::<_, rusqlite::Error>(Message {
                    topic: row.get(1)?,
                    payload: payload_bytes(row, 2)?,
                    qos: Qos::from_u8(row.get(3)?).unwrap_or(Qos::AtLeastOnce),
                    kind: PayloadKind::from_u8(row.get(4)?),
                })
            })();
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

/// The SQLite side, owned by the spool thread.
struct Store {
    db: Connection,
    path: PathBuf,
    max_bytes: u64,
    on_full: OnFull,
    stats: SpoolStats,
    page_size: u64,
    /// Pages in use, as measured after the last commit.
    live_bytes: u64,
    incremental_vacuum: bool,
    /// The disk reserve file (`RESERVE_SUFFIX`) is not there (released, or not yet written).
    reserve_missing: bool,
    /// A write happened since idle maintenance last found nothing to do.
    dirty: bool,
    /// Pages were given back: a truncating checkpoint makes the files shrink.
    shrunk: bool,
    drop_log: Repeats,
    fault_log: Repeats,
}

impl Store {
    fn open(path: &Path, max_bytes: u64, on_full: OnFull) -> Result<Store, OpenError> {
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
        // Incremental auto-vacuum lets idle time give freed pages back to the file system. It
        // must be chosen before the first table; an older spool is converted once (VACUUM).
        let auto_vacuum: i64 = db
            .query_row("PRAGMA auto_vacuum", [], |row| row.get(0))
            .map_err(sqlite)?;
        if auto_vacuum != 2 {
            let tables: i64 = db
                .query_row("SELECT COUNT(*) FROM sqlite_master", [], |row| row.get(0))
                .map_err(sqlite)?;
            db.pragma_update(None, "auto_vacuum", "INCREMENTAL")
                .map_err(sqlite)?;
            if tables > 0 {
                tracing::info!(spool = %path.display(), "converting the spool to incremental vacuum (once)");
                db.execute_batch("VACUUM").map_err(sqlite)?;
            }
        }
        db.pragma_update(None, "journal_mode", "WAL")
            .map_err(sqlite)?;
        // FULL: a committed append survives power loss, which is what `ok` promises.
        db.pragma_update(None, "synchronous", "FULL")
            .map_err(sqlite)?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS messages (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 topic TEXT NOT NULL,
                 payload BLOB NOT NULL,
                 qos INTEGER NOT NULL,
                 size INTEGER NOT NULL
             );",
        )
        .map_err(sqlite)?;
        let dead_letters = create_dead_letters(&db).map_err(sqlite)?;
        // The payload's kind at ingest (`PayloadKind`). Rows from older spools have none
        // (NULL): they are sent alone, byte for byte, which never changes a payload.
        let has_kind: bool = db
            .query_row(
                "SELECT COUNT(*) > 0 FROM pragma_table_info('messages') WHERE name = 'kind'",
                [],
                |row| row.get(0),
            )
            .map_err(sqlite)?;
        if !has_kind {
            db.execute_batch("ALTER TABLE messages ADD COLUMN kind INTEGER;")
                .map_err(sqlite)?;
        }
        let messages: i64 = db
            .query_row("SELECT COUNT(*) FROM messages", [], |row| row.get(0))
            .map_err(sqlite)?;
        let last_id: i64 = db
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'messages'",
                [],
                |row| row.get(0),
            )
            .optional()
            .map_err(sqlite)?
            .unwrap_or(0);
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
            },
            page_size: page_size.unsigned_abs().max(512),
            live_bytes: 0,
            incremental_vacuum: auto_vacuum == 2,
            reserve_missing: true,
            dirty: true,
            shrunk: false,
            drop_log: Repeats::default(),
            fault_log: Repeats::default(),
        };
        store.apply_wal_limit().map_err(sqlite)?;
        store.measure().map_err(sqlite)?;
        store.restore_reserve();
        Ok(store)
    }

    fn reserve_path(&self) -> PathBuf {
        with_suffix(&self.path, RESERVE_SUFFIX)
    }

    /// Writes the reserve file if it is missing. On failure (the disk is full) the partial file
    /// is removed, so the reserve never takes space the spool needs; it is retried later.
    fn restore_reserve(&mut self) {
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
    fn release_reserve(&mut self) -> bool {
        self.reserve_missing = true;
        std::fs::remove_file(self.reserve_path()).is_ok()
    }

    /// The WAL's share of `max_bytes`, in pages.
    fn wal_pages(&self) -> u64 {
        (self.max_bytes / WAL_SHARE / self.page_size).clamp(WAL_MIN_PAGES, WAL_MAX_PAGES)
    }

    /// Bytes kept for the WAL when deciding whether a message fits.
    fn wal_reserve(&self) -> u64 {
        self.wal_pages() * self.page_size
    }

    fn apply_wal_limit(&self) -> rusqlite::Result<()> {
        // Both fit in i64: pages are capped at WAL_MAX_PAGES, page sizes at 64 KiB.
        let pages = self.wal_pages() as i64;
        self.db.pragma_update(None, "wal_autocheckpoint", pages)?;
        // A WAL grown by one big transaction is cut back to this at its next reset.
        self.db
            .pragma_update(None, "journal_size_limit", pages * self.page_size as i64)?;
        Ok(())
    }

    fn wal_file_bytes(&self) -> u64 {
        std::fs::metadata(with_suffix(&self.path, "-wal")).map_or(0, |m| m.len())
    }

    /// Pages in use (inside a transaction: as that transaction sees them).
    fn live_pages_bytes(db: &Connection, page_size: u64) -> rusqlite::Result<u64> {
        let pages: i64 = db.query_row("PRAGMA page_count", [], |row| row.get(0))?;
        let free: i64 = db.query_row("PRAGMA freelist_count", [], |row| row.get(0))?;
        Ok(pages.saturating_sub(free).unsigned_abs() * page_size)
    }

    /// Refreshes the on-disk figures: pages in use, and `stats.bytes` with the WAL.
    fn measure(&mut self) -> rusqlite::Result<()> {
        self.live_bytes = Self::live_pages_bytes(&self.db, self.page_size)?;
        self.stats.bytes = self.live_bytes + self.wal_file_bytes();
        Ok(())
    }

    /// How far over `max_bytes` the spool is (pages in use plus the WAL's reserve).
    fn excess(&self) -> u64 {
        (self.live_bytes + self.wal_reserve()).saturating_sub(self.max_bytes)
    }

    /// Over `max_bytes` with `drop-oldest`. The newest message stays: it was just accepted.
    fn must_trim(&self) -> bool {
        self.excess() > 0 && self.on_full == OnFull::DropOldest && self.stats.messages > 1
    }

    /// Copies what reads back from the corrupt spool moved to `aside` (with its WAL) into this
    /// fresh one, ids and order kept. Works on a copy: the moved files stay for inspection.
    fn salvage_from(&mut self, aside: &Path) -> Salvage {
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
        if let Err(error) = copied {
            tracing::error!(%error, "cannot copy the corrupt spool to salvage it");
            cleanup(&copy);
            return Salvage::default();
        }
        let mut rows: Vec<(i64, Message)> = Vec::new();
        let mut expected = read_salvage(&copy, &mut rows);
        // A damaged header hides everything behind it: give the copy a sound one and retry.
        if matches!(&expected, Err(e) if is_corruption(e)) && rows.is_empty() {
            if let Err(error) = repair_header(&copy) {
                tracing::warn!(%error, "cannot repair the corrupt spool's header");
            }
            let _ = std::fs::remove_file(with_suffix(&copy, "-shm"));
            expected = read_salvage(&copy, &mut rows);
        }
        cleanup(&copy);
        let expected = match expected {
            Ok(count) => count,
            Err(error) => {
                tracing::warn!(%error, saved = rows.len(), "salvage stopped at unreadable data");
                None
            }
        };
        let saved = rows.len() as u64;
        let stored = (|| -> rusqlite::Result<()> {
            let tx = self.db.transaction()?;
            {
                let mut insert = tx.prepare(
                    "INSERT OR IGNORE INTO messages (id, topic, payload, qos, size, kind)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?;
                for (id, message) in &rows {
                    insert.execute(params![
                        id,
                        message.topic,
                        message.payload,
                        message.qos.as_u8(),
                        (message.topic.len() + message.payload.len()) as i64,
                        message.kind.as_u8(),
                    ])?;
                }
            }
            tx.commit()
        })();
        if let Err(error) = stored {
            tracing::error!(%error, "cannot store the salvaged messages");
            return Salvage {
                saved: 0,
                lost: expected,
            };
        }
        self.stats.messages += saved;
        self.stats.last_id = self.stats.last_id.max(rows.last().map_or(0, |(id, _)| *id));
        let _ = self.measure();
        Salvage {
            saved,
            lost: expected.map(|total| total.saturating_sub(saved)),
        }
    }

    fn serve(mut self, mut commands: mpsc::Receiver<Command>, stats: watch::Sender<SpoolStats>) {
        use tokio::sync::mpsc::error::TryRecvError;
        let mut next: Option<Command> = None;
        loop {
            let command = match next.take() {
                Some(command) => command,
                None => match commands.try_recv() {
                    Ok(command) => command,
                    Err(TryRecvError::Disconnected) => return,
                    Err(TryRecvError::Empty) => {
                        // Idle: bounded housekeeping, then look for work again.
                        if self.maintain(&stats) {
                            continue;
                        }
                        match commands.blocking_recv() {
                            Some(command) => command,
                            None => return,
                        }
                    }
                },
            };
            match command {
                Command::Append {
                    message,
                    done,
                    queued,
                } => {
                    let mut batch = vec![(message, done)];
                    let mut held = vec![queued];
                    while batch.len() < MAX_GROUP_COMMIT {
                        match commands.try_recv() {
                            Ok(Command::Append {
                                message,
                                done,
                                queued,
                            }) => {
                                batch.push((message, done));
                                held.push(queued);
                            }
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.append_batch(batch, &stats);
                    drop(held);
                }
                Command::ReadAfter {
                    after,
                    limit,
                    max_bytes,
                    reply,
                } => {
                    let read = self.read_after(after, limit, max_bytes);
                    self.publish_stats(&stats);
                    let _ = reply.send(read);
                }
                Command::Remove { ids } => {
                    self.remove(&ids);
                    self.publish_stats(&stats);
                }
                Command::DeadLetters(command) => self.dead_letters(command, &stats),
                Command::SetLimits { max_bytes, on_full } => {
                    self.max_bytes = max_bytes;
                    self.on_full = on_full;
                    if let Err(error) = self.apply_wal_limit() {
                        self.record_fault(Operation::Write, &error);
                    }
                    self.dirty = true;
                }
            }
            // Over the limit (lowered, or a commit that overshot): one bounded trim between
            // commands, so a long trim never holds up reads, removals or the watchdog probe.
            if self.must_trim() {
                self.trim_chunk(&stats);
            }
        }
    }

    /// One step of idle housekeeping; `false` when there is nothing (more) to do.
    fn maintain(&mut self, stats: &watch::Sender<SpoolStats>) -> bool {
        if self.must_trim() {
            return self.trim_chunk(stats);
        }
        if !self.dirty {
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

    /// Drops the oldest messages, at most one bounded chunk, to get back under `max_bytes`.
    /// `true` when it dropped some.
    fn trim_chunk(&mut self, stats: &watch::Sender<SpoolStats>) -> bool {
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
    fn drop_oldest(&mut self, bytes: u64, max_rows: usize) -> rusqlite::Result<u64> {
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

    fn log_drops(&mut self, dropped: u64, text: &'static str) {
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
    fn wrote(&mut self) {
        self.dirty = true;
        if self.stats.fault.is_some() {
            tracing::info!("spool storage works again");
            self.stats.fault = None;
            self.fault_log.clear();
        }
    }

    fn record_fault(&mut self, operation: Operation, error: &rusqlite::Error) {
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
    fn publish_stats(&self, stats: &watch::Sender<SpoolStats>) {
        stats.send_if_modified(|current| {
            let changed = *current != self.stats;
            *current = self.stats;
            changed
        });
    }

    fn append_batch(
        &mut self,
        batch: Vec<(Message, oneshot::Sender<Result<(), AppendError>>)>,
        stats: &watch::Sender<SpoolStats>,
    ) {
        let before = self.stats;
        let mut outcome = self.try_append_batch(&batch);
        if outcome.is_err() {
            self.stats = before;
        }
        // Disk full with drop-oldest: make room by dropping the oldest, then try again.
        let mut room = batch
            .iter()
            .map(|(m, _)| (m.topic.len() + m.payload.len()) as u64 + ROW_OVERHEAD)
            .sum::<u64>();
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
            match self.drop_oldest(room, usize::MAX) {
                Ok(dropped) if dropped > 0 => {}
                _ => break,
            }
            self.checkpoint_truncate();
            room = room.saturating_mul(2);
            let kept = self.stats;
            outcome = self.try_append_batch(&batch);
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
        self.publish_stats(stats);
        for ((_, done), result) in batch.into_iter().zip(results) {
            let _ = done.send(result);
        }
    }

    /// Folds the WAL into the db and truncates it (errors only mean it stays as it is).
    fn checkpoint_truncate(&self) {
        let _ = self
            .db
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    }

    fn try_append_batch(
        &mut self,
        batch: &[(Message, oneshot::Sender<Result<(), AppendError>>)],
    ) -> rusqlite::Result<Vec<Result<(), AppendError>>> {
        let reserve = self.wal_reserve();
        let tx = self.db.transaction()?;
        let mut results = Vec::with_capacity(batch.len());
        // Estimated pages in use plus the WAL's share, as this transaction goes.
        let mut used = Self::live_pages_bytes(&tx, self.page_size)? + reserve;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO messages (topic, payload, qos, size, kind) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut oldest = tx.prepare_cached(
                "DELETE FROM messages WHERE id = (SELECT MIN(id) FROM messages) RETURNING size",
            )?;
            for (message, _) in batch {
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
                            .query_row([], |row| row.get::<_, i64>(0))
                            .optional()?
                        else {
                            break;
                        };
                        used = used.saturating_sub(freed.unsigned_abs() + ROW_OVERHEAD);
                        dropped_here += 1;
                        self.stats.messages = self.stats.messages.saturating_sub(1);
                        self.stats.dropped_total += 1;
                    }
                }
                insert.execute(params![
                    message.topic,
                    message.payload,
                    message.qos.as_u8(),
                    size as i64,
                    message.kind.as_u8(),
                ])?;
                used += cost;
                self.stats.messages += 1;
                self.stats.last_id = tx.last_insert_rowid();
                results.push(Ok(()));
            }
        }
        tx.commit()?;
        Ok(results)
    }

    /// The next messages after `after`. A row that cannot be decoded (a damaged file) can never
    /// be published and would hold back every message behind it: it is logged, removed and
    /// counted as dropped, and the rest goes on. A failed query is an error (and a fault).
    fn read_after(
        &mut self,
        after: i64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, ReadError> {
        let mut good = Vec::new();
        let mut broken = Vec::new();
        let mut bytes = 0usize;
        let result = (|| -> rusqlite::Result<()> {
            let mut select = self.db.prepare_cached(
                "SELECT id, topic, payload, qos, kind FROM messages WHERE id > ?1 ORDER BY id LIMIT ?2",
            )?;
            let mut rows = select.query(params![after, limit as i64])?;
            while bytes < max_bytes
                && let Some(row) = rows.next()?
            {
                let id: i64 = row.get(0)?;
                let message = (|| {
                    Ok::<_, rusqlite::Error>(Message {
                        topic: row.get(1)?,
                        payload: payload_bytes(row, 2)?,
                        qos: Qos::from_u8(row.get(3)?).unwrap_or(Qos::AtLeastOnce),
                        kind: PayloadKind::from_u8(row.get(4)?),
                    })
                })();
                match message {
                    Ok(message) => {
                        bytes += message.payload.len();
                        good.push(StoredMessage { id, message });
                    }
                    Err(error) => broken.push((id, error)),
                }
            }
            Ok(())
        })();
        if let Err(error) = result {
            self.record_fault(Operation::Read, &error);
            return Err(ReadError::Storage(
                self.stats
                    .fault
                    .map_or_else(|| error.to_string(), |f| f.to_string()),
            ));
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
            let before = self.stats.messages;
            self.remove(&ids);
            self.stats.dropped_total += before - self.stats.messages;
        }
        Ok(good)
    }

    fn remove(&mut self, ids: &[i64]) {
        let before = self.stats;
        let result = (|| -> rusqlite::Result<()> {
            let tx = self.db.transaction()?;
            {
                let mut delete =
                    tx.prepare_cached("DELETE FROM messages WHERE id = ?1 RETURNING 1")?;
                for id in ids {
                    if delete
                        .query_row([id], |row| row.get::<_, i64>(0))
                        .optional()?
                        .is_some()
                    {
                        self.stats.messages = self.stats.messages.saturating_sub(1);
                    }
                }
            }
            tx.commit()
        })();
        match result {
            Ok(()) => self.wrote(),
            Err(error) => {
                self.stats = before;
                // The messages stay and are sent again later: a duplicate, never a loss.
                self.record_fault(Operation::Write, &error);
            }
        }
        let _ = self.measure();
    }
}

// ---------------------------------------------------------------------------------------------
// Dead letters: messages the broker never accepts (it drops the connection each time the same
// oldest message goes out, or the full topic breaks IoT Core's limits). They would hold back
// every message behind them forever; the publisher moves them here, and an operator lists,
// requeues or purges them (`iot-cognito-relay dead-letters`).

/// Most dead letters kept; beyond it the oldest are deleted and counted in `dropped_total`.
const MAX_DEAD_LETTERS: i64 = 1000;
/// Most dead letters one `list` answer carries (the newest).
pub const MAX_DEAD_LETTERS_LISTED: usize = 100;

/// One dead letter as `dead-letters list` shows it (no payload: it may be binary or 128 KiB).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub topic: String,
    pub bytes: u64,
    pub qos: u8,
    pub reason: String,
    /// When it was moved here, RFC 3339.
    pub at: String,
}

/// What an operator asks of the dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterAction {
    List,
    /// Back into the spool, behind everything queued.
    Requeue,
    Purge,
}

/// The answer to a [`DeadLetterAction`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterReply {
    Listed(Vec<DeadLetter>),
    Requeued(u64),
    Purged(u64),
}

pub enum DeadLetterCommand {
    /// Moves spool messages into the dead-letter table (the publisher).
    Bury {
        ids: Vec<i64>,
        reason: String,
        done: oneshot::Sender<()>,
    },
    Operator {
        action: DeadLetterAction,
        reply: oneshot::Sender<Result<DeadLetterReply, String>>,
    },
}

impl Spool {
    /// Moves `ids` out of the queue into the dead-letter table, with the reason; returns once
    /// done, so the next read no longer sees them.
    pub async fn bury(&self, ids: Vec<i64>, reason: String) {
        let (done, receiver) = oneshot::channel();
        let command = Command::DeadLetters(DeadLetterCommand::Bury { ids, reason, done });
        if self.commands.send(command).await.is_ok() {
            let _ = receiver.await;
        }
    }

    /// Lists, requeues or purges the dead letters. `Err`: the storage failed (its message).
    pub async fn dead_letters(&self, action: DeadLetterAction) -> Result<DeadLetterReply, String> {
        let (reply, receiver) = oneshot::channel();
        let command = Command::DeadLetters(DeadLetterCommand::Operator { action, reply });
        self.commands
            .send(command)
            .await
            .map_err(|_| "spool is closed".to_owned())?;
        receiver
            .await
            .unwrap_or_else(|_| Err("spool is closed".to_owned()))
    }
}

/// Creates the table; returns how many dead letters it holds.
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

impl Store {
    /// Counters go out before the answer, as for appends.
    fn dead_letters(&mut self, command: DeadLetterCommand, stats: &watch::Sender<SpoolStats>) {
        // Rows moved between the tables: the on-disk size is measured again (idle time also
        // gives freed pages back).
        self.dirty = true;
        match command {
            DeadLetterCommand::Bury { ids, reason, done } => {
                let before = self.stats;
                if let Err(error) = self.bury(&ids, &reason) {
                    self.stats = before;
                    // The messages stay queued: tried again, never lost.
                    tracing::error!(%error, "cannot move messages to the dead letters");
                }
                self.publish_stats(stats);
                let _ = done.send(());
            }
            DeadLetterCommand::Operator { action, reply } => {
                let before = self.stats;
                let result = match action {
                    DeadLetterAction::List => self.list_dead_letters().map(DeadLetterReply::Listed),
                    DeadLetterAction::Requeue => {
                        self.requeue_dead_letters().map(DeadLetterReply::Requeued)
                    }
                    DeadLetterAction::Purge => {
                        self.purge_dead_letters().map(DeadLetterReply::Purged)
                    }
                };
                let result = result.map_err(|error| {
                    self.stats = before;
                    tracing::error!(%error, "dead-letter operation failed");
                    error.to_string()
                });
                self.publish_stats(stats);
                let _ = reply.send(result);
            }
        }
    }

    fn bury(&mut self, ids: &[i64], reason: &str) -> rusqlite::Result<()> {
        let at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let tx = self.db.transaction()?;
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
                    self.stats.messages = self.stats.messages.saturating_sub(1);
                    self.stats.dead_letters += 1;
                    self.stats.dead_letter_total += 1;
                }
            }
            let trimmed = tx.execute(
                "DELETE FROM dead_letters WHERE id <= (SELECT MAX(id) FROM dead_letters) - ?1",
                [MAX_DEAD_LETTERS],
            )?;
            self.stats.dead_letters = self.stats.dead_letters.saturating_sub(trimmed as u64);
            self.stats.dropped_total += trimmed as u64;
        }
        tx.commit()
    }

    fn list_dead_letters(&mut self) -> rusqlite::Result<Vec<DeadLetter>> {
        let mut select = self.db.prepare_cached(
            "SELECT id, topic, length(payload), qos, reason, at FROM dead_letters
             ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = select.query_map([MAX_DEAD_LETTERS_LISTED as i64], |row| {
            let at: i64 = row.get(5)?;
            Ok(DeadLetter {
                id: row.get(0)?,
                topic: row.get(1)?,
                bytes: row.get::<_, i64>(2)?.unsigned_abs(),
                qos: row.get(3)?,
                reason: row.get(4)?,
                at: humantime::format_rfc3339_seconds(
                    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(at.unsigned_abs()),
                )
                .to_string(),
            })
        })?;
        let mut listed: Vec<DeadLetter> = rows.collect::<rusqlite::Result<_>>()?;
        listed.reverse();
        Ok(listed)
    }

    fn requeue_dead_letters(&mut self) -> rusqlite::Result<u64> {
        let tx = self.db.transaction()?;
        let count: i64 = tx.query_row("SELECT COUNT(*) FROM dead_letters", [], |row| row.get(0))?;
        tx.execute(
            "INSERT INTO messages (topic, payload, qos, size, kind)
             SELECT topic, payload, qos, size, kind FROM dead_letters ORDER BY id",
            [],
        )?;
        tx.execute("DELETE FROM dead_letters", [])?;
        let last_id = tx.last_insert_rowid();
        tx.commit()?;
        if count > 0 {
            self.stats.messages += count.unsigned_abs();
            self.stats.last_id = self.stats.last_id.max(last_id);
        }
        self.stats.dead_letters = 0;
        Ok(count.unsigned_abs())
    }

    fn purge_dead_letters(&mut self) -> rusqlite::Result<u64> {
        let purged = self.db.execute("DELETE FROM dead_letters", [])?;
        self.stats.dead_letters = 0;
        Ok(purged as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(topic: &str, payload: &[u8]) -> Message {
        Message {
            topic: topic.into(),
            payload: payload.to_vec(),
            qos: Qos::AtLeastOnce,
            kind: PayloadKind::Json,
        }
    }

    async fn read_all(spool: &Spool) -> Vec<StoredMessage> {
        spool
            .read_after(0, 1_000_000, usize::MAX)
            .await
            .expect("read")
    }

    /// What the spool takes on disk: the db and its WAL.
    fn files_bytes(dir: &Path) -> u64 {
        ["", "-wal"]
            .iter()
            .map(|suffix| {
                std::fs::metadata(with_suffix(&dir.join(SPOOL_FILE), suffix)).map_or(0, |m| m.len())
            })
            .sum()
    }

    /// Waits for the spool's counters to satisfy `done`.
    async fn wait_stats(spool: &Spool, done: impl Fn(&SpoolStats) -> bool) -> SpoolStats {
        let mut stats = spool.stats();
        tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                if done(&stats.borrow_and_update()) {
                    return *stats.borrow();
                }
                let _ = stats.changed().await;
            }
        })
        .await
        .expect("spool counters never got there")
    }

    #[tokio::test]
    async fn an_undecodable_row_is_dropped_and_does_not_hold_back_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let spool = Spool::open(dir.path(), 1 << 20, OnFull::DropOldest).expect("open");
            for i in 1..=3 {
                spool
                    .append(message("t", format!("{i}").as_bytes()))
                    .await
                    .expect("append");
            }
        }
        // Damage the middle row the way a bad disk might: its topic is no longer text.
        rusqlite::Connection::open(dir.path().join(SPOOL_FILE))
            .and_then(|db| db.execute("UPDATE messages SET topic = X'FF' WHERE id = 2", []))
            .expect("damage a row");
        let spool = Spool::open(dir.path(), 1 << 20, OnFull::DropOldest).expect("reopen");
        let stored = read_all(&spool).await;
        let payloads: Vec<_> = stored.iter().map(|m| m.message.payload.clone()).collect();
        assert_eq!(payloads, [b"1".to_vec(), b"3".to_vec()]);
        let stats = *spool.stats().borrow();
        assert_eq!((stats.messages, stats.dropped_total), (2, 1));
        assert_eq!(read_all(&spool).await.len(), 2, "gone for good");
    }

    #[tokio::test]
    async fn a_read_ends_at_its_byte_budget_but_always_returns_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path(), 1 << 20, OnFull::DropOldest).expect("open");
        for payload in ["aaaa", "bbbb", "cccc"] {
            spool
                .append(message("t", payload.as_bytes()))
                .await
                .expect("append");
        }
        let len = |read: Result<Vec<StoredMessage>, ReadError>| read.expect("read").len();
        assert_eq!(len(spool.read_after(0, 100, 8).await), 2);
        assert_eq!(len(spool.read_after(0, 100, 9).await), 3);
        assert_eq!(len(spool.read_after(0, 100, 1).await), 1);
    }

    #[tokio::test]
    async fn appended_messages_survive_reopen_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let spool = Spool::open(dir.path(), 1 << 20, OnFull::DropOldest).expect("open");
            for i in 0..10 {
                spool
                    .append(message("t", format!("{i}").as_bytes()))
                    .await
                    .expect("append");
            }
        }
        let spool = Spool::open(dir.path(), 1 << 20, OnFull::DropOldest).expect("reopen");
        let stored = read_all(&spool).await;
        let payloads: Vec<_> = stored.iter().map(|m| m.message.payload.clone()).collect();
        let expected: Vec<_> = (0..10).map(|i| format!("{i}").into_bytes()).collect();
        assert_eq!(payloads, expected);
        spool
            .remove(stored.iter().take(4).map(|m| m.id).collect())
            .await;
        let rest = read_all(&spool).await;
        assert_eq!(rest.len(), 6);
        assert_eq!(spool.stats().borrow().messages, 6);
    }

    #[tokio::test]
    async fn reject_new_refuses_and_drop_oldest_counts() {
        const LIMIT: u64 = 256 * 1024;
        let dir = tempfile::tempdir().expect("tempdir");
        let reject = Spool::open(dir.path(), LIMIT, OnFull::RejectNew).expect("open");
        let mut accepted = 0;
        while reject.append(message("t", &[0; 1000])).await.is_ok() {
            accepted += 1;
        }
        assert!((100..260).contains(&accepted), "{accepted}");
        assert_eq!(
            reject.append(message("t", &[0; 1000])).await,
            Err(AppendError::Full(LIMIT))
        );
        drop(reject);

        let other = tempfile::tempdir().expect("tempdir");
        let drop_oldest = Spool::open(other.path(), LIMIT, OnFull::DropOldest).expect("open");
        for i in 0..1000u32 {
            let payload = [&i.to_be_bytes()[..], &[0; 996]].concat();
            assert_eq!(drop_oldest.append(message("t", &payload)).await, Ok(()));
        }
        let stats = *drop_oldest.stats().borrow();
        assert!(stats.messages < 260, "{stats:?}");
        assert_eq!(stats.messages + stats.dropped_total, 1000);
        let kept = read_all(&drop_oldest).await;
        assert_eq!(kept.len() as u64, stats.messages);
        assert_eq!(
            kept.last().expect("kept").message.payload[..4],
            999u32.to_be_bytes()
        );
    }

    /// Item 7: `max_bytes` bounds the files on disk (pages and WAL), not topic + payload.
    #[tokio::test]
    async fn max_bytes_bounds_the_files_on_disk_wal_included() {
        const LIMIT: u64 = 256 * 1024;
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path(), LIMIT, OnFull::RejectNew).expect("open");
        // Small messages: SQLite's per-row overhead is a large share of each.
        let mut accepted = 0u64;
        while spool
            .append(message("sensors/t", b"{\"c\":21}"))
            .await
            .is_ok()
        {
            accepted += 1;
            let on_disk = files_bytes(dir.path());
            assert!(
                on_disk <= LIMIT + 64 * 1024,
                "{on_disk} bytes on disk after {accepted} messages, limit {LIMIT}"
            );
        }
        let stats = wait_stats(&spool, |s| s.bytes <= LIMIT).await;
        assert!(accepted > 1000, "{accepted}");
        eprintln!(
            "{accepted} messages of 17 bytes in {LIMIT}: {} bytes counted, {} on disk",
            stats.bytes,
            files_bytes(dir.path())
        );
    }

    /// Item 7: after a backlog drains, idle time gives the pages back: the files shrink.
    #[tokio::test]
    async fn the_files_shrink_after_a_backlog_drains() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path(), 64 << 20, OnFull::DropOldest).expect("open");
        for _ in 0..2000 {
            spool
                .append(message("t", &[7; 2000]))
                .await
                .expect("append");
        }
        let full = files_bytes(dir.path());
        assert!(full > 3 << 20, "{full}");
        for chunk in read_all(&spool).await.chunks(100) {
            spool.remove(chunk.iter().map(|m| m.id).collect()).await;
        }
        let stats = wait_stats(&spool, |s| s.messages == 0 && s.bytes < 256 * 1024).await;
        // Idle housekeeping runs once nothing else is queued; give it a moment to finish.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while files_bytes(dir.path()) > 256 * 1024 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let drained = files_bytes(dir.path());
        eprintln!("{full} bytes on disk with the backlog, {drained} after it drained ({stats:?})");
        assert!(drained < 256 * 1024, "{drained} bytes left on disk");
    }

    /// Item 7: a lower `max_bytes` on a full spool is reached in bounded steps; the spool
    /// keeps answering in between (the watchdog probe is such a read).
    #[tokio::test]
    async fn lowering_max_bytes_trims_in_bounded_steps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path(), 64 << 20, OnFull::DropOldest).expect("open");
        for _ in 0..20 {
            let mut pending = Vec::new();
            for _ in 0..1000 {
                pending.push(spool.submit(message("t", &[1; 900])).await.expect("queued"));
            }
            for answer in pending {
                answer.await.expect("answer").expect("stored");
            }
        }
        let before = *spool.stats().borrow();
        assert_eq!(before.messages, 20_000);
        spool.set_limits(1 << 20, OnFull::DropOldest).await;
        let mut slowest = std::time::Duration::ZERO;
        let mut steps = std::collections::BTreeSet::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let asked = std::time::Instant::now();
            spool.read_after(i64::MAX, 1, 1).await.expect("probe");
            slowest = slowest.max(asked.elapsed());
            let now = *spool.stats().borrow();
            steps.insert(now.messages);
            if now.bytes <= 1 << 20 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never trimmed: {now:?}"
            );
        }
        let after = *spool.stats().borrow();
        eprintln!(
            "trim 20000 -> {} messages in {} observed steps, slowest probe {slowest:?}",
            after.messages,
            steps.len()
        );
        assert_eq!(after.dropped_total, 20_000 - after.messages);
        assert!(after.messages > 500, "{after:?}");
        assert!(steps.len() > 3, "in several chunks: {steps:?}");
        assert!(
            slowest < std::time::Duration::from_secs(1),
            "the spool answered within {slowest:?}"
        );
        // The newest messages are the ones kept.
        let kept = read_all(&spool).await;
        assert_eq!(kept.last().map(|m| m.id), Some(20_000));
    }

    /// Item 11: the kind a payload arrived as survives the spool; rows from an older spool
    /// (no kind column) survive the upgrade and read back as opaque bytes. The old daemon wrote
    /// payloads as BLOBs; a TEXT payload (the same bytes) must not be taken for a damaged row.
    #[tokio::test]
    async fn payload_kind_is_kept_and_old_rows_are_opaque() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            // The schema and pragmas of the spool before the kind column (commit 3e7f798).
            let db = Connection::open(dir.path().join(SPOOL_FILE)).expect("old spool");
            db.pragma_update(None, "journal_mode", "WAL").expect("wal");
            db.execute_batch(
                "CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
                     payload BLOB NOT NULL, qos INTEGER NOT NULL, size INTEGER NOT NULL);
                 INSERT INTO messages (topic, payload, qos, size) VALUES ('t', X'3432', 1, 3);
                 INSERT INTO messages (topic, payload, qos, size) VALUES ('t', '42', 1, 3);",
            )
            .expect("old rows");
        }
        let spool = Spool::open(dir.path(), 1 << 20, OnFull::DropOldest).expect("open");
        assert_eq!(spool.stats().borrow().messages, 2);
        for kind in [PayloadKind::Json, PayloadKind::Text, PayloadKind::Binary] {
            let mut m = message("t", b"42");
            m.kind = kind;
            spool.append(m).await.expect("append");
        }
        let read = read_all(&spool).await;
        let kinds: Vec<_> = read.iter().map(|m| m.message.kind).collect();
        assert_eq!(
            kinds,
            [
                PayloadKind::Binary,
                PayloadKind::Binary,
                PayloadKind::Json,
                PayloadKind::Text,
                PayloadKind::Binary
            ]
        );
        assert!(read.iter().all(|m| m.message.payload == b"42"), "{read:?}");
        assert_eq!(spool.stats().borrow().dropped_total, 0);
    }

    /// Item 5: acknowledged rows that live only in the WAL (the daemon was killed before a
    /// checkpoint) survive a corrupt db header: the WAL moves aside with the db, and what
    /// reads back is salvaged into the fresh spool.
    #[tokio::test]
    async fn corrupt_header_keeps_the_rows_in_the_wal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(SPOOL_FILE);
        {
            // Checkpointed on close: page 1 is in the db file, not in the WAL. A Store, not a
            // Spool: dropping a Spool does not wait for its thread to close the connection, and
            // a WAL still holding page 1 would hide the corrupt header below.
            let mut store = Store::open(&path, 1 << 20, OnFull::DropOldest).expect("store");
            let (done, _) = oneshot::channel();
            store
                .try_append_batch(&[(message("t", b"1"), done)])
                .expect("commit");
        }
        assert!(
            !with_suffix(&path, "-wal").exists(),
            "the WAL was checkpointed and removed on close"
        );
        let mut store = Store::open(&path, 1 << 20, OnFull::DropOldest).expect("store");
        let (done, _) = oneshot::channel();
        let (done2, _) = oneshot::channel();
        store
            .try_append_batch(&[(message("t", b"2"), done), (message("t", b"3"), done2)])
            .expect("commit");
        // Killed: the connection never closes, so nothing is checkpointed.
        std::mem::forget(store);
        let wal = std::fs::metadata(with_suffix(&path, "-wal"))
            .expect("wal")
            .len();
        assert!(wal > 0, "the new rows are in the WAL");
        let mut bytes = std::fs::read(&path).expect("db");
        bytes[..100].fill(0xa5);
        std::fs::write(&path, bytes).expect("corrupt the header");

        let spool = Spool::open(dir.path(), 1 << 20, OnFull::DropOldest).expect("open anyway");
        let payloads: Vec<_> = read_all(&spool)
            .await
            .into_iter()
            .map(|m| m.message.payload)
            .collect();
        assert_eq!(payloads, [b"1".to_vec(), b"2".to_vec(), b"3".to_vec()]);
        assert_eq!(spool.stats().borrow().last_id, 3);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names
                .iter()
                .any(|n| n.contains("corrupt") && n.ends_with("-wal")),
            "the WAL was moved aside with the db: {names:?}"
        );
        // New ids continue after the salvaged ones.
        spool.append(message("t", b"4")).await.expect("append");
        assert_eq!(read_all(&spool).await.last().map(|m| m.id), Some(4));
    }

    #[tokio::test]
    async fn corrupt_file_is_moved_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(SPOOL_FILE), vec![0x5a; 8192]).expect("write garbage");
        let spool = Spool::open(dir.path(), 1 << 20, OnFull::DropOldest).expect("open anyway");
        spool.append(message("t", b"x")).await.expect("append");
        let aside = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().contains("corrupt"));
        assert!(aside, "the corrupt file must be kept for inspection");
    }

    #[tokio::test]
    async fn dead_letters_leave_the_queue_and_can_be_requeued_or_purged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path(), 1 << 20, OnFull::DropOldest).expect("open");
        for payload in ["bad", "good", "bad2"] {
            spool
                .append(message(payload, payload.as_bytes()))
                .await
                .expect("append");
        }
        let ids: Vec<i64> = spool
            .read_after(0, 10, usize::MAX)
            .await
            .expect("read")
            .iter()
            .map(|m| m.id)
            .collect();
        spool.bury(vec![ids[0]], "refused".into()).await;
        spool.bury(vec![ids[2]], "refused again".into()).await;
        let rest = spool.read_after(0, 10, usize::MAX).await.expect("read");
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].message.topic, "good");
        let stats = *spool.stats().borrow();
        assert_eq!(
            (stats.messages, stats.dead_letters, stats.dead_letter_total),
            (1, 2, 2)
        );
        let Ok(DeadLetterReply::Listed(listed)) = spool.dead_letters(DeadLetterAction::List).await
        else {
            panic!("list")
        };
        let topics: Vec<_> = listed
            .iter()
            .map(|d| (d.topic.as_str(), d.reason.as_str()))
            .collect();
        assert_eq!(topics, [("bad", "refused"), ("bad2", "refused again")]);
        drop(spool);

        // Kept across restarts.
        let spool = Spool::open(dir.path(), 1 << 20, OnFull::DropOldest).expect("reopen");
        assert_eq!(spool.stats().borrow().dead_letters, 2);
        assert_eq!(
            spool.dead_letters(DeadLetterAction::Requeue).await,
            Ok(DeadLetterReply::Requeued(2))
        );
        let queued: Vec<_> = spool
            .read_after(0, 10, usize::MAX)
            .await
            .expect("read")
            .into_iter()
            .map(|m| m.message.topic)
            .collect();
        assert_eq!(
            queued,
            ["good", "bad", "bad2"],
            "requeued behind the queue, in order"
        );
        let stats = *spool.stats().borrow();
        assert_eq!((stats.messages, stats.dead_letters), (3, 0));

        let ids: Vec<i64> = spool
            .read_after(0, 10, usize::MAX)
            .await
            .expect("read")
            .iter()
            .map(|m| m.id)
            .collect();
        spool.bury(ids[1..].to_vec(), "refused".into()).await;
        assert_eq!(
            spool.dead_letters(DeadLetterAction::Purge).await,
            Ok(DeadLetterReply::Purged(2))
        );
        let stats = *spool.stats().borrow();
        assert_eq!((stats.messages, stats.dead_letters), (1, 0));
    }
}
