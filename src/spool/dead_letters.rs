//! Dead letters: messages the broker never accepts (it drops the connection each time the same
//! oldest message goes out, or the full topic breaks IoT Core's limits). They would hold back
//! every message behind them forever; the publisher moves them here, and an operator lists,
//! requeues or purges them (`iot-cognito-relay dead-letters`).

use std::time::{Duration, SystemTime};

use tokio::sync::oneshot;

use super::store::DeadLetterRow;
use super::{Command, Spool};

// How many are kept: by count (`store::MAX_DEAD_LETTERS`) and by their share of `max_bytes`
// (`policy::Limits::dead_letter_bytes`, an eighth, so large ones cannot keep the spool over
// its limit); beyond either the oldest are deleted, counted in `dropped_total` and logged. The
// newest one always stays.

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

impl From<DeadLetterRow> for DeadLetter {
    fn from(row: DeadLetterRow) -> DeadLetter {
        DeadLetter {
            id: row.id,
            topic: row.topic,
            bytes: row.bytes,
            qos: row.qos,
            reason: row.reason,
            at: humantime::format_rfc3339_seconds(
                SystemTime::UNIX_EPOCH + Duration::from_secs(row.at),
            )
            .to_string(),
        }
    }
}
