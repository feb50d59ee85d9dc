//! The durable spool: every message answered `ok` is in here until the broker acknowledged it.
//!
//! SQLite in WAL mode, owned by one thread. Appends arriving together share one transaction and
//! one fsync (group commit); their senders are told only after that commit, which is what makes
//! an `ok` answer a promise. The publisher reads in id order and removes after PUBACK.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rusqlite::{Connection, ErrorCode, OptionalExtension, params};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use crate::config::OnFull;
use crate::protocol::{Message, Qos};

/// File name of the spool inside the state dir.
pub const SPOOL_FILE: &str = "spool.db";
/// Most appends committed in one transaction.
const MAX_GROUP_COMMIT: usize = 4096;
/// Commands waiting for the spool thread; a full queue makes writers wait (backpressure).
const COMMAND_QUEUE: usize = 8192;
/// Bytes of messages waiting for their commit, across all writers: beyond this, writers wait.
const MAX_QUEUED_BYTES: u32 = 32 * 1024 * 1024;

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

/// Counters the spool publishes after every change, for the publisher and `status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    pub messages: u64,
    pub bytes: u64,
    pub dropped_total: u64,
    /// Highest id ever appended; the publisher wakes when it moves.
    pub last_id: i64,
    /// Messages in the dead-letter table now, and moved there since the start.
    pub dead_letters: u64,
    pub dead_letter_total: u64,
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
        reply: oneshot::Sender<Vec<StoredMessage>>,
    },
    Remove {
        ids: Vec<i64>,
    },
    /// Dead letters: see the block at the end of this file.
    DeadLetters(DeadLetterCommand),
}

/// A cheap, cloneable handle to the spool thread.
#[derive(Clone)]
pub struct Spool {
    commands: mpsc::Sender<Command>,
    queued_bytes: Arc<Semaphore>,
    stats: watch::Receiver<SpoolStats>,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`. A corrupt file is moved aside, never fatal.
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
                    "spool file is corrupt; moved it aside and started a fresh one"
                );
                Store::open(&path, max_bytes, on_full)?
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
    /// takes when messages are large.
    pub async fn read_after(
        &self,
        after: i64,
        limit: usize,
        max_bytes: usize,
    ) -> Vec<StoredMessage> {
        let (reply, receiver) = oneshot::channel();
        let command = Command::ReadAfter {
            after,
            limit,
            max_bytes,
            reply,
        };
        if self.commands.send(command).await.is_err() {
            return Vec::new();
        }
        receiver.await.unwrap_or_default()
    }

    /// Forgets delivered messages. Ids already dropped are ignored.
    pub async fn remove(&self, ids: Vec<i64>) {
        if !ids.is_empty() {
            let _ = self.commands.send(Command::Remove { ids }).await;
        }
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

fn move_aside(path: &Path) -> Result<PathBuf, OpenError> {
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let aside = path.with_extension(format!("db.corrupt-{stamp}"));
    std::fs::rename(path, &aside).map_err(|source| OpenError::MoveAside {
        path: path.to_owned(),
        source,
    })?;
    for suffix in ["-wal", "-shm"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(side));
    }
    Ok(aside)
}

/// The SQLite side, owned by the spool thread.
struct Store {
    db: Connection,
    max_bytes: u64,
    on_full: OnFull,
    stats: SpoolStats,
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
        let (messages, bytes): (i64, i64) = db
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
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
        Ok(Store {
            db,
            max_bytes,
            on_full,
            stats: SpoolStats {
                messages: messages.unsigned_abs(),
                bytes: bytes.unsigned_abs(),
                dropped_total: 0,
                last_id,
                dead_letters,
                dead_letter_total: 0,
            },
        })
    }

    fn serve(mut self, mut commands: mpsc::Receiver<Command>, stats: watch::Sender<SpoolStats>) {
        let mut next = commands.blocking_recv();
        while let Some(command) = next.take() {
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
                    let _ = reply.send(self.read_after(after, limit, max_bytes));
                    self.publish_stats(&stats);
                }
                Command::Remove { ids } => {
                    self.remove(&ids);
                    self.publish_stats(&stats);
                }
                Command::DeadLetters(command) => self.dead_letters(command, &stats),
            }
            if next.is_none() {
                next = commands.blocking_recv();
            }
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
        let outcome = self.try_append_batch(&batch);
        let results = match outcome {
            Ok(results) => results,
            Err(error) => {
                self.stats = before;
                let refusal = if error.sqlite_error_code() == Some(ErrorCode::DiskFull) {
                    tracing::warn!("disk is full; refusing new messages until space is free");
                    AppendError::Full(self.stats.bytes)
                } else {
                    tracing::error!(%error, "spool write failed");
                    AppendError::Storage(error.to_string())
                };
                vec![Err(refusal); batch.len()]
            }
        };
        let dropped = self.stats.dropped_total - before.dropped_total;
        if dropped > 0 {
            tracing::warn!(
                dropped,
                dropped_total = self.stats.dropped_total,
                "spool full: dropped the oldest messages to make room"
            );
        }
        self.publish_stats(stats);
        for ((_, done), result) in batch.into_iter().zip(results) {
            let _ = done.send(result);
        }
    }

    fn try_append_batch(
        &mut self,
        batch: &[(Message, oneshot::Sender<Result<(), AppendError>>)],
    ) -> rusqlite::Result<Vec<Result<(), AppendError>>> {
        let tx = self.db.transaction()?;
        let mut results = Vec::with_capacity(batch.len());
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO messages (topic, payload, qos, size) VALUES (?1, ?2, ?3, ?4)",
            )?;
            let mut oldest = tx.prepare_cached(
                "DELETE FROM messages WHERE id = (SELECT MIN(id) FROM messages) RETURNING size",
            )?;
            for (message, _) in batch {
                let size = (message.topic.len() + message.payload.len()) as u64;
                if self.stats.bytes + size > self.max_bytes {
                    if self.on_full == OnFull::RejectNew {
                        results.push(Err(AppendError::Full(self.max_bytes)));
                        continue;
                    }
                    while self.stats.bytes + size > self.max_bytes {
                        let Some(freed) = oldest
                            .query_row([], |row| row.get::<_, i64>(0))
                            .optional()?
                        else {
                            break;
                        };
                        self.stats.bytes = self.stats.bytes.saturating_sub(freed.unsigned_abs());
                        self.stats.messages = self.stats.messages.saturating_sub(1);
                        self.stats.dropped_total += 1;
                    }
                }
                insert.execute(params![
                    message.topic,
                    message.payload,
                    message.qos.as_u8(),
                    size as i64
                ])?;
                self.stats.bytes += size;
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
    /// counted as dropped, and the rest goes on.
    fn read_after(&mut self, after: i64, limit: usize, max_bytes: usize) -> Vec<StoredMessage> {
        let mut good = Vec::new();
        let mut broken = Vec::new();
        let mut bytes = 0usize;
        let result = (|| -> rusqlite::Result<()> {
            let mut select = self.db.prepare_cached(
                "SELECT id, topic, payload, qos FROM messages WHERE id > ?1 ORDER BY id LIMIT ?2",
            )?;
            let mut rows = select.query(params![after, limit as i64])?;
            while bytes < max_bytes
                && let Some(row) = rows.next()?
            {
                let id: i64 = row.get(0)?;
                let message = (|| {
                    Ok::<_, rusqlite::Error>(Message {
                        topic: row.get(1)?,
                        payload: row.get(2)?,
                        qos: Qos::from_u8(row.get(3)?).unwrap_or(Qos::AtLeastOnce),
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
            tracing::error!(%error, "spool read failed");
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
        good
    }

    fn remove(&mut self, ids: &[i64]) {
        let before = self.stats;
        let result = (|| -> rusqlite::Result<()> {
            let tx = self.db.transaction()?;
            {
                let mut delete =
                    tx.prepare_cached("DELETE FROM messages WHERE id = ?1 RETURNING size")?;
                for id in ids {
                    if let Some(size) = delete
                        .query_row([id], |row| row.get::<_, i64>(0))
                        .optional()?
                    {
                        self.stats.bytes = self.stats.bytes.saturating_sub(size.unsigned_abs());
                        self.stats.messages = self.stats.messages.saturating_sub(1);
                    }
                }
            }
            tx.commit()
        })();
        if let Err(error) = result {
            self.stats = before;
            // The messages stay and are sent again later: a duplicate, never a loss.
            tracing::error!(%error, "spool delete failed");
        }
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
             at INTEGER NOT NULL
         );",
    )?;
    let count: i64 = db.query_row("SELECT COUNT(*) FROM dead_letters", [], |row| row.get(0))?;
    Ok(count.unsigned_abs())
}

impl Store {
    /// Counters go out before the answer, as for appends.
    fn dead_letters(&mut self, command: DeadLetterCommand, stats: &watch::Sender<SpoolStats>) {
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
                "INSERT INTO dead_letters (topic, payload, qos, size, reason, at)
                 SELECT topic, payload, qos, size, ?2, ?3 FROM messages WHERE id = ?1",
            )?;
            let mut delete =
                tx.prepare_cached("DELETE FROM messages WHERE id = ?1 RETURNING size")?;
            for id in ids {
                copy.execute(params![id, reason, at as i64])?;
                if let Some(size) = delete
                    .query_row([id], |row| row.get::<_, i64>(0))
                    .optional()?
                {
                    self.stats.bytes = self.stats.bytes.saturating_sub(size.unsigned_abs());
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
        let (count, bytes): (i64, i64) = tx.query_row(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM dead_letters",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        tx.execute(
            "INSERT INTO messages (topic, payload, qos, size)
             SELECT topic, payload, qos, size FROM dead_letters ORDER BY id",
            [],
        )?;
        tx.execute("DELETE FROM dead_letters", [])?;
        let last_id = tx.last_insert_rowid();
        tx.commit()?;
        if count > 0 {
            self.stats.messages += count.unsigned_abs();
            self.stats.bytes += bytes.unsigned_abs();
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
        }
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
        let stored = spool.read_after(0, 100, usize::MAX).await;
        let payloads: Vec<_> = stored.iter().map(|m| m.message.payload.clone()).collect();
        assert_eq!(payloads, [b"1".to_vec(), b"3".to_vec()]);
        let stats = *spool.stats().borrow();
        assert_eq!((stats.messages, stats.dropped_total), (2, 1));
        assert_eq!(
            spool.read_after(0, 100, usize::MAX).await.len(),
            2,
            "gone for good"
        );
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
        assert_eq!(spool.read_after(0, 100, 8).await.len(), 2);
        assert_eq!(spool.read_after(0, 100, 9).await.len(), 3);
        assert_eq!(spool.read_after(0, 100, 1).await.len(), 1);
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
        let stored = spool.read_after(0, 100, usize::MAX).await;
        let payloads: Vec<_> = stored.iter().map(|m| m.message.payload.clone()).collect();
        let expected: Vec<_> = (0..10).map(|i| format!("{i}").into_bytes()).collect();
        assert_eq!(payloads, expected);
        spool
            .remove(stored.iter().take(4).map(|m| m.id).collect())
            .await;
        let rest = spool.read_after(0, 100, usize::MAX).await;
        assert_eq!(rest.len(), 6);
        assert_eq!(spool.stats().borrow().messages, 6);
    }

    #[tokio::test]
    async fn reject_new_refuses_and_drop_oldest_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reject = Spool::open(dir.path(), 100, OnFull::RejectNew).expect("open");
        assert_eq!(reject.append(message("t", &[0; 60])).await, Ok(()));
        assert_eq!(
            reject.append(message("t", &[0; 60])).await,
            Err(AppendError::Full(100))
        );
        drop(reject);

        let other = tempfile::tempdir().expect("tempdir");
        let drop_oldest = Spool::open(other.path(), 100, OnFull::DropOldest).expect("open");
        for i in 0..5u8 {
            assert_eq!(drop_oldest.append(message("t", &[i; 40])).await, Ok(()));
        }
        let stats = *drop_oldest.stats().borrow();
        assert_eq!(stats.messages, 2);
        assert_eq!(stats.dropped_total, 3);
        let kept = drop_oldest.read_after(0, 10, usize::MAX).await;
        assert_eq!(kept[0].message.payload, vec![3; 40]);
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
            .iter()
            .map(|m| m.id)
            .collect();
        spool.bury(vec![ids[0]], "refused".into()).await;
        spool.bury(vec![ids[2]], "refused again".into()).await;
        let rest = spool.read_after(0, 10, usize::MAX).await;
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
