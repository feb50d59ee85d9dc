//! Dead letters: messages the broker never accepts (it drops the connection each time the same
//! oldest message goes out, or the full topic breaks IoT Core's limits). They would hold back
//! every message behind them forever; the publisher moves them here, and an operator lists,
//! requeues or purges them (`iot-cognito-relay dead-letters`).

use super::*;

/// Most dead letters kept, by count and by their share of `max_bytes` (an eighth, so large
/// ones cannot keep the spool over its limit); beyond either the oldest are deleted, counted
/// in `dropped_total` and logged. The newest one always stays.
pub(super) const MAX_DEAD_LETTERS: i64 = 1000;
const DEAD_LETTER_SHARE: u64 = 8;
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

impl DeadLetterCommand {
    /// Whether it moves rows between the queue and the dead letters.
    pub(super) fn moves_messages(&self) -> bool {
        matches!(
            self,
            DeadLetterCommand::Bury { .. }
                | DeadLetterCommand::Operator {
                    action: DeadLetterAction::Requeue,
                    ..
                }
        )
    }
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

/// Deletes the oldest dead letters beyond `MAX_DEAD_LETTERS` or `max_bytes` (payload and
/// topic), never the newest; returns the rows and bytes deleted.
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

/// Creates the table; returns how many dead letters it holds.
pub(super) fn create_dead_letters(db: &Connection) -> rusqlite::Result<u64> {
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
    pub(super) fn dead_letters(
        &mut self,
        command: DeadLetterCommand,
        stats: &watch::Sender<SpoolStats>,
    ) {
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
                let _ = self.measure();
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

    pub(super) fn bury(&mut self, ids: &[i64], reason: &str) -> rusqlite::Result<()> {
        let at = unix_seconds();
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
        }
        let trimmed = trim_dead_letters(&tx, self.max_bytes / DEAD_LETTER_SHARE)?;
        tx.commit()?;
        self.count_trimmed(trimmed);
        Ok(())
    }

    /// Keeps the dead letters within their bounds after `max_bytes` was lowered.
    pub(super) fn bound_dead_letters(&mut self) -> rusqlite::Result<()> {
        let tx = self.db.transaction()?;
        let trimmed = trim_dead_letters(&tx, self.max_bytes / DEAD_LETTER_SHARE)?;
        tx.commit()?;
        self.count_trimmed(trimmed);
        Ok(())
    }

    fn count_trimmed(&mut self, (rows, bytes): (u64, u64)) {
        if rows == 0 {
            return;
        }
        self.stats.dead_letters = self.stats.dead_letters.saturating_sub(rows);
        self.stats.dropped_total += rows;
        tracing::warn!(
            deleted = rows,
            bytes,
            max_dead_letters = MAX_DEAD_LETTERS,
            max_bytes = self.max_bytes / DEAD_LETTER_SHARE,
            dropped_total = self.stats.dropped_total,
            "dead letters over their bound: deleted the oldest (list them with `iot-cognito-relay dead-letters list`)"
        );
    }

    pub(super) fn list_dead_letters(&mut self) -> rusqlite::Result<Vec<DeadLetter>> {
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

    pub(super) fn requeue_dead_letters(&mut self) -> rusqlite::Result<u64> {
        let tx = self.db.transaction()?;
        let count: i64 = tx.query_row("SELECT COUNT(*) FROM dead_letters", [], |row| row.get(0))?;
        // Ids after every id handed out, also those of messages acknowledged from memory and
        // never written (the publisher's cursor may be past them).
        tx.execute(
            "INSERT INTO messages (id, topic, payload, qos, size, kind)
             SELECT ?1 + ROW_NUMBER() OVER (ORDER BY id), topic, payload, qos, size, kind
             FROM dead_letters ORDER BY id",
            [self.stats.last_id],
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

    pub(super) fn purge_dead_letters(&mut self) -> rusqlite::Result<u64> {
        let purged = self.db.execute("DELETE FROM dead_letters", [])?;
        self.stats.dead_letters = 0;
        Ok(purged as u64)
    }
}
