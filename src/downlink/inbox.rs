//! The inbox: messages from the cloud, on disk until a local app acks them.
//!
//! Its own SQLite file next to the spool (`inbox.db`), not a table inside `spool.db`: the
//! spool's `max_bytes` measures every page of its file, so downlink traffic would eat the
//! uplink's budget (and trigger its drop-oldest); and the spool thread owns its connection,
//! so a second writer there would meet `SQLITE_BUSY` in its group commits.
//!
//! A received batch is one transaction with `synchronous = FULL`: once `push` returns, the
//! messages survive a crash or a power cut, and only then is the broker sent its PUBACK.
//! `max_bytes` bounds the sum of topic and payload sizes (plus a fixed row cost); a batch that
//! would go beyond it drops the oldest messages first, counted in `dropped_total`.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

use crate::state_file::with_suffix;

/// File name of the inbox inside the state dir.
pub const INBOX_FILE: &str = "inbox.db";
/// What a row costs beyond its topic and payload, for the `max_bytes` bound.
const ROW_OVERHEAD: u64 = 32;

/// Why the inbox failed.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("inbox {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("inbox storage failed: {0}")]
    Storage(#[from] rusqlite::Error),
}

/// Counters for `status` and the health report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InboxStats {
    pub messages: u64,
    pub bytes: u64,
    /// Dropped (oldest first) to stay within `max_bytes`, since the start.
    pub dropped_total: u64,
    /// Received from the broker since the start.
    pub received_total: u64,
    /// The last receive had to drop the oldest to fit (`inbox_state` "full"); an ack ends it.
    pub full: bool,
    /// Since when the inbox's storage keeps failing (`inbox_state` "failing"); `None` once an
    /// operation works again.
    pub failing_since: Option<std::time::Instant>,
}

impl InboxStats {
    /// `status`'s `inbox_state`.
    pub fn state(&self) -> &'static str {
        if self.failing_since.is_some() {
            "failing"
        } else if self.full {
            "full"
        } else {
            "ok"
        }
    }
}

/// A stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxMessage {
    pub seq: i64,
    /// Relative to the device prefix.
    pub topic: String,
    pub payload: Vec<u8>,
}

/// What a push did: the new messages' seqs (in order) and the seqs dropped to make room.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pushed {
    pub stored: Vec<(i64, String)>,
    pub dropped: Vec<i64>,
}

/// The inbox's SQLite file and its counters (see the module docs).
pub struct InboxStore {
    db: Connection,
    max_bytes: u64,
    stats: InboxStats,
}

fn cost(topic: &str, payload: &[u8]) -> u64 {
    (topic.len() + payload.len()) as u64 + ROW_OVERHEAD
}

impl InboxStore {
    /// Opens (or creates) `<dir>/inbox.db`. A file SQLite calls corrupt is moved aside (its
    /// messages are lost, which is logged) rather than keeping the daemon from starting.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<InboxStore, InboxError> {
        let path = dir.join(INBOX_FILE);
        // SQLite deletes the WAL when the connection that found the db corrupt closes: a hard
        // link keeps its messages (already acknowledged to the broker) for the move aside.
        let wal = with_suffix(&path, "-wal");
        let kept_wal = with_suffix(&path, "-wal.kept");
        let _ = std::fs::remove_file(&kept_wal);
        let wal_kept = std::fs::hard_link(&wal, &kept_wal).is_ok();
        let opened = Self::open_file(&path, max_bytes);
        let corrupt =
            matches!(&opened, Err(InboxError::Open { source, .. }) if is_corruption(source));
        if !corrupt {
            let _ = std::fs::remove_file(&kept_wal);
        }
        match opened {
            Err(InboxError::Open { source, .. }) if is_corruption(&source) => {
                let aside = path.with_extension(format!(
                    "db.corrupt-{}",
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs())
                ));
                // The WAL goes with the db: it may hold messages already acknowledged to
                // the broker, which only it has.
                if wal_kept {
                    let _ = std::fs::rename(&kept_wal, with_suffix(&aside, "-wal"));
                }
                let _ = std::fs::remove_file(&wal);
                let _ = std::fs::remove_file(with_suffix(&path, "-shm"));
                std::fs::rename(&path, &aside).map_err(|e| InboxError::Open {
                    path: path.clone(),
                    source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
                })?;
                tracing::error!(inbox = %path.display(), moved_to = %aside.display(), error = %source,
                    "inbox file is corrupt; moved it aside and started an empty one");
                Self::open_file(&path, max_bytes)
            }
            other => other,
        }
    }

    fn open_file(path: &Path, max_bytes: u64) -> Result<InboxStore, InboxError> {
        let open = |source| InboxError::Open {
            path: path.to_owned(),
            source,
        };
        let db = Connection::open(path).map_err(open)?;
        let check: String = db
            .query_row("PRAGMA quick_check", [], |row| row.get(0))
            .map_err(open)?;
        if check != "ok" {
            return Err(open(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
                Some(check),
            )));
        }
        db.pragma_update(None, "journal_mode", "WAL")
            .map_err(open)?;
        // FULL: the broker gets its PUBACK only after the commit; it must survive power loss.
        db.pragma_update(None, "synchronous", "FULL")
            .map_err(open)?;
        // AUTOINCREMENT: a seq is never reused, so an app's late ack cannot hit a newer message.
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS inbox (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 topic TEXT NOT NULL,
                 payload BLOB NOT NULL,
                 size INTEGER NOT NULL,
                 received_at INTEGER NOT NULL
             );",
        )
        .map_err(open)?;
        let (messages, bytes): (i64, i64) = db
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM inbox",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .map_err(open)?;
        Ok(InboxStore {
            db,
            max_bytes,
            stats: InboxStats {
                messages: messages.unsigned_abs(),
                bytes: bytes.unsigned_abs(),
                ..InboxStats::default()
            },
        })
    }

    pub fn stats(&self) -> InboxStats {
        self.stats
    }

    /// The outcome of the last storage operation, for `inbox_state`.
    pub fn record(&mut self, worked: bool) {
        if worked {
            self.stats.failing_since = None;
        } else if self.stats.failing_since.is_none() {
            self.stats.failing_since = Some(std::time::Instant::now());
        }
    }

    /// Stores `messages` (relative topic, payload) in one durable transaction, dropping the
    /// oldest stored messages first when they would not fit within `max_bytes`.
    pub fn push(&mut self, messages: &[(String, Vec<u8>)]) -> Result<Pushed, InboxError> {
        let incoming: u64 = messages.iter().map(|(t, p)| cost(t, p)).sum();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let tx = self.db.transaction()?;
        let mut pushed = Pushed::default();
        let mut bytes = self.stats.bytes;
        let mut messages_now = self.stats.messages;
        if bytes + incoming > self.max_bytes {
            let mut oldest = tx.prepare("SELECT seq, size FROM inbox ORDER BY seq")?;
            let mut rows = oldest.query([])?;
            while bytes + incoming > self.max_bytes
                && let Some(row) = rows.next()?
            {
                let (seq, size): (i64, i64) = (row.get(0)?, row.get(1)?);
                pushed.dropped.push(seq);
                bytes = bytes.saturating_sub(size.unsigned_abs());
                messages_now -= 1;
            }
            drop(rows);
            drop(oldest);
            let mut delete = tx.prepare("DELETE FROM inbox WHERE seq = ?1")?;
            for seq in &pushed.dropped {
                delete.execute([seq])?;
            }
        }
        {
            let mut insert = tx.prepare(
                "INSERT INTO inbox (topic, payload, size, received_at) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (topic, payload) in messages {
                let size = cost(topic, payload);
                insert.execute(params![topic, payload, size as i64, now])?;
                pushed.stored.push((tx.last_insert_rowid(), topic.clone()));
                bytes += size;
                messages_now += 1;
            }
        }
        tx.commit()?;
        self.stats.bytes = bytes;
        self.stats.messages = messages_now;
        self.stats.dropped_total += pushed.dropped.len() as u64;
        self.stats.received_total += messages.len() as u64;
        self.stats.full = !pushed.dropped.is_empty();
        Ok(pushed)
    }

    /// Every stored message's seq and topic, oldest first (at start: what waits for apps).
    pub fn pending(&self) -> Result<Vec<(i64, String)>, InboxError> {
        let mut query = self
            .db
            .prepare("SELECT seq, topic FROM inbox ORDER BY seq")?;
        let rows = query.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One message, `None` when it is gone (acked or dropped).
    pub fn load(&self, seq: i64) -> Result<Option<InboxMessage>, InboxError> {
        Ok(self
            .db
            .query_row(
                "SELECT topic, payload FROM inbox WHERE seq = ?1",
                [seq],
                |row| {
                    Ok(InboxMessage {
                        seq,
                        topic: row.get(0)?,
                        payload: row.get(1)?,
                    })
                },
            )
            .optional()?)
    }

    /// Removes an acked message; `false` when it was not there.
    pub fn remove(&mut self, seq: i64) -> Result<bool, InboxError> {
        let size: Option<i64> = self
            .db
            .query_row(
                "DELETE FROM inbox WHERE seq = ?1 RETURNING size",
                [seq],
                |row| row.get(0),
            )
            .optional()?;
        if let Some(size) = size {
            self.stats.full = false;
            self.stats.messages = self.stats.messages.saturating_sub(1);
            self.stats.bytes = self.stats.bytes.saturating_sub(size.unsigned_abs());
        }
        Ok(size.is_some())
    }
}

fn is_corruption(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(items: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        items
            .iter()
            .map(|(t, p)| (t.to_string(), p.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn messages_survive_a_reopen_in_order_until_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut inbox = InboxStore::open(dir.path(), 1 << 20).expect("open");
        let pushed = inbox
            .push(&batch(&[("commands/a", "1"), ("commands/b", "2")]))
            .expect("push");
        assert_eq!(pushed.stored.len(), 2);
        assert!(pushed.stored[0].0 < pushed.stored[1].0);
        assert!(inbox.remove(pushed.stored[0].0).expect("remove"));
        assert!(!inbox.remove(pushed.stored[0].0).expect("again"), "gone");
        drop(inbox);
        let inbox = InboxStore::open(dir.path(), 1 << 20).expect("reopen");
        assert_eq!(
            inbox.pending().expect("pending"),
            vec![(pushed.stored[1].0, "commands/b".into())]
        );
        assert_eq!(inbox.stats().messages, 1);
        let message = inbox
            .load(pushed.stored[1].0)
            .expect("load")
            .expect("there");
        assert_eq!(message.payload, b"2");
    }

    #[test]
    fn over_max_bytes_the_oldest_are_dropped_and_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let one = cost("t", &[b'x'; 100]);
        let mut inbox = InboxStore::open(dir.path(), one * 3).expect("open");
        let payload = "x".repeat(100);
        let mut seqs = Vec::new();
        for _ in 0..3 {
            seqs.extend(inbox.push(&batch(&[("t", &payload)])).expect("push").stored);
        }
        let pushed = inbox.push(&batch(&[("t", &payload)])).expect("push");
        assert_eq!(pushed.dropped, vec![seqs[0].0]);
        let stats = inbox.stats();
        assert_eq!((stats.messages, stats.dropped_total), (3, 1));
        assert_eq!(stats.bytes, one * 3);
        let left: Vec<i64> = inbox
            .pending()
            .expect("pending")
            .iter()
            .map(|p| p.0)
            .collect();
        assert_eq!(left, vec![seqs[1].0, seqs[2].0, pushed.stored[0].0]);
    }

    #[test]
    fn seqs_are_never_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut inbox = InboxStore::open(dir.path(), 1 << 20).expect("open");
        let first = inbox.push(&batch(&[("t", "1")])).expect("push").stored[0].0;
        inbox.remove(first).expect("remove");
        drop(inbox);
        let mut inbox = InboxStore::open(dir.path(), 1 << 20).expect("reopen");
        let second = inbox.push(&batch(&[("t", "2")])).expect("push").stored[0].0;
        assert!(second > first);
    }

    /// The WAL is moved aside with the db, never deleted: it can hold messages already
    /// acknowledged to the broker.
    #[test]
    fn a_corrupt_file_is_moved_aside_with_its_wal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = b"messages only the WAL holds".to_vec();
        std::fs::write(dir.path().join(INBOX_FILE), vec![0x5a; 8192]).expect("garbage");
        std::fs::write(with_suffix(&dir.path().join(INBOX_FILE), "-wal"), &wal).expect("wal");
        let inbox = InboxStore::open(dir.path(), 1 << 20).expect("open anyway");
        assert_eq!(inbox.stats().messages, 0);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names
                .iter()
                .any(|n| n.contains("corrupt") && !n.ends_with("-wal")),
            "{names:?}"
        );
        let aside_wal = names
            .iter()
            .find(|n| n.contains("corrupt") && n.ends_with("-wal"))
            .unwrap_or_else(|| panic!("the WAL was not kept: {names:?}"));
        assert_eq!(
            std::fs::read(dir.path().join(aside_wal)).expect("read"),
            wal
        );
    }
}
