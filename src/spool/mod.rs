//! The durable spool: every message answered `ok` is on disk here, or acknowledged by the broker.
//!
//! SQLite in WAL mode, owned by one thread. Write-behind (`behind.rs`, `spool.commit_window`):
//! an accepted message is held in memory and handed to the publisher at once; what the broker
//! has not acknowledged when the window ends is committed, everything held in one transaction
//! with one fsync. A sender is told `ok` at the commit or at the PUBACK, whichever comes first,
//! which is what makes an `ok` answer a promise. The publisher reads in id order (disk, then
//! memory) and removes after PUBACK; removals of committed rows are gathered and deleted
//! together without an fsync of their own (a lost deletion only means a duplicate).
//!
//! Size: `max_bytes` bounds what the spool really takes on disk, its pages in use plus the WAL
//! (kept to an eighth of `max_bytes` by checkpoints). Pages freed by delivery are given back to
//! the file system in idle time (incremental vacuum), so the file shrinks after a backlog.
//! Over the limit (a lowered `max_bytes`) with `drop-oldest`, the oldest are dropped in bounded
//! chunks between other work, so the spool thread never stalls for long.
//!
//! Here is the handle other tasks hold (`Spool`). The spool thread is split like the
//! publisher: `behind.rs` (what is held in memory and when it is committed) and `policy.rs`
//! (size bounds, full disk, housekeeping, deletions, faults) decide, purely; `serve.rs` is the
//! loop that carries their choices out against `store.rs`, the SQLite database and nothing
//! else. `reserve.rs` keeps disk space for a full disk, `salvage.rs` recovers a corrupt file,
//! `dead_letters.rs` holds what the broker never accepts.

mod behind;
mod dead_letters;
mod policy;
mod reserve;
mod salvage;
mod serve;
mod store;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use crate::config::OnFull;
use crate::message::{Message, Priority};
use serve::{Requests, Spooler};
use store::{Store, is_corruption};

use dead_letters::DeadLetterCommand;
pub use dead_letters::{DeadLetterAction, DeadLetterReply};

/// File name of the spool inside the state dir.
pub const SPOOL_FILE: &str = "spool.db";
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
    /// Highest id ever appended with high priority (0: none since the start).
    pub last_high_id: i64,
    /// Messages in the dead-letter table now, and moved there since the start.
    pub dead_letters: u64,
    pub dead_letter_total: u64,
    /// Set while the spool's last operation of that kind failed; the watchdog stops pinging.
    pub fault: Option<StorageFault>,
    /// When the oldest message waiting was accepted (seconds since the Unix epoch); `None`
    /// when none waits or that is not known (a message from an older spool).
    pub oldest_accepted_at: Option<u64>,
    /// Messages dropped unpublished for their `ttl` or `spool.max_age`, since the start.
    pub expired_total: u64,
    /// Conflating messages dropped for a newer one on their topic, since the start.
    pub conflated_total: u64,
}

/// What the config sets for the spool; a reload may change it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub max_bytes: u64,
    pub on_full: OnFull,
    /// How long a message may be held in memory before it is committed (write-behind).
    pub commit_window: Duration,
    /// Messages without a `ttl` expire after this long; zero: never.
    pub max_age: Duration,
}

/// Where the publisher's reading has got to, per priority (ids of each priority are read in
/// order; high-priority ones first).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursors {
    pub high: i64,
    pub normal: i64,
}

impl Cursors {
    pub fn of(&self, priority: Priority) -> i64 {
        match priority {
            Priority::High => self.high,
            Priority::Normal => self.normal,
        }
    }

    pub fn of_mut(&mut self, priority: Priority) -> &mut i64 {
        match priority {
            Priority::High => &mut self.high,
            Priority::Normal => &mut self.normal,
        }
    }
}

/// What a read brought: messages in the order to publish them (high priority first), and
/// whether more may wait behind them.
#[derive(Debug, Default)]
pub struct ReadBatch {
    pub messages: Vec<StoredMessage>,
    pub more: bool,
}

enum Command {
    Append {
        message: Message,
        done: oneshot::Sender<Result<(), AppendError>>,
        /// The message's share of `MAX_QUEUED_BYTES`, given back once it is committed.
        queued: OwnedSemaphorePermit,
    },
    ReadAfter {
        after: Cursors,
        limit: usize,
        max_bytes: usize,
        reply: oneshot::Sender<Result<ReadBatch, ReadError>>,
    },
    /// Dead letters: see the block at the end of this file.
    DeadLetters(DeadLetterCommand),
    SetLimits(Settings),
    /// Commits what is held and deletes what was acknowledged, then answers.
    Flush {
        done: oneshot::Sender<()>,
    },
}

/// Who waits for a held message's answer: the sender, and its share of `MAX_QUEUED_BYTES`.
type Waiter = (
    oneshot::Sender<Result<(), AppendError>>,
    OwnedSemaphorePermit,
);

/// A cheap, cloneable handle to the spool thread.
#[derive(Clone)]
pub struct Spool {
    commands: mpsc::Sender<Command>,
    /// Acknowledged ids, apart from the commands: the publisher never waits behind a flood
    /// of appends to say what the broker has (each id came from a read, so it is known).
    removals: mpsc::UnboundedSender<Vec<i64>>,
    /// Reads queued and not yet answered: the spool thread answers them before it commits.
    reads_waiting: Arc<AtomicUsize>,
    queued_bytes: Arc<Semaphore>,
    stats: watch::Receiver<SpoolStats>,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`. A corrupt file is moved aside with its WAL, what
    /// reads back from it is salvaged into a fresh spool; never fatal.
    /// Without write-behind (a zero commit window): every `ok` waits for its commit.
    #[cfg(test)]
    pub fn open(dir: &Path, max_bytes: u64, on_full: OnFull) -> Result<Spool, OpenError> {
        let settings = Settings {
            max_bytes,
            on_full,
            commit_window: Duration::ZERO,
            max_age: Duration::ZERO,
        };
        Spool::open_with(dir, settings)
    }

    /// Like [`Spool::open`], with every setting: write-behind holds messages up to
    /// `commit_window` before committing them.
    pub fn open_with(dir: &Path, settings: Settings) -> Result<Spool, OpenError> {
        let path = dir.join(SPOOL_FILE);
        let sqlite = |source| OpenError::Sqlite {
            path: path.clone(),
            source,
        };
        let (store, opened) = match Store::open(&path) {
            Ok(opened) => opened,
            Err(source) if is_corruption(&source) => {
                let aside = salvage::move_aside(&path)?;
                tracing::error!(
                    spool = %path.display(),
                    moved_to = %aside.display(),
                    error = %source,
                    "spool file is corrupt; moved it aside with its WAL and started a fresh one"
                );
                Store::open(&path).map_err(sqlite)?
            }
            Err(source) => return Err(sqlite(source)),
        };
        let mut spooler = Spooler::new(store, opened, settings).map_err(sqlite)?;
        // This start's corrupt file, and any an earlier start could not finish.
        for aside in salvage::unfinished_salvages(dir) {
            let salvage = spooler.salvage(&aside);
            tracing::warn!(
                saved = salvage.saved,
                lost = %salvage.lost.map_or_else(|| "unknown".to_owned(), |n| n.to_string()),
                moved_to = %aside.display(),
                "salvaged messages from the corrupt spool"
            );
        }
        // The spool thread's clock for the commit window.
        let clock = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(OpenError::Thread)?;
        let (stats_tx, stats) = watch::channel(spooler.stats());
        let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
        let (removals, removed) = mpsc::unbounded_channel();
        let reads_waiting = Arc::new(AtomicUsize::new(0));
        let requests = Requests {
            commands: receiver,
            removals: removed,
            reads_waiting: reads_waiting.clone(),
        };
        std::thread::Builder::new()
            .name("spool".into())
            .spawn(move || spooler.serve(requests, stats_tx, clock))
            .map_err(OpenError::Thread)?;
        Ok(Spool {
            commands,
            removals,
            reads_waiting,
            queued_bytes: Arc::new(Semaphore::new(MAX_QUEUED_BYTES as usize)),
            stats,
        })
    }

    /// Queues `message`; waits while the spool is behind (backpressure). The returned receiver
    /// resolves once the message is durable (committed, or acknowledged by the broker) or
    /// refused.
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

    /// Appends and waits until the message is durable (or acknowledged).
    #[cfg(test)]
    pub async fn append(&self, message: Message) -> Result<(), AppendError> {
        self.submit(message)
            .await?
            .await
            .unwrap_or(Err(AppendError::Closed))
    }

    /// Up to `limit` messages after the cursors, high-priority ones first, each priority in id
    /// order, ending once their payloads add up to `max_bytes` (the first one always comes):
    /// bounds the memory a read takes when messages are large. A full read of high-priority
    /// messages still brings one normal message, if one waits, so the publisher can keep normal
    /// ones from starving. Expired messages never come. A failed read is an error, never an
    /// empty spool.
    pub async fn read_after(
        &self,
        after: Cursors,
        limit: usize,
        max_bytes: usize,
    ) -> Result<ReadBatch, ReadError> {
        let (reply, receiver) = oneshot::channel();
        let command = Command::ReadAfter {
            after,
            limit,
            max_bytes,
            reply,
        };
        let slot = self
            .commands
            .reserve()
            .await
            .map_err(|_| ReadError::Closed)?;
        // Counted before it is queued (no await in between), so the spool thread, which counts
        // it down as it answers, never sees it queued and uncounted.
        self.reads_waiting.fetch_add(1, Ordering::AcqRel);
        slot.send(command);
        receiver.await.unwrap_or(Err(ReadError::Closed))
    }

    /// Forgets delivered messages. Ids already dropped are ignored. Never waits: removals go
    /// ahead of queued appends.
    pub fn remove(&self, ids: Vec<i64>) {
        if !ids.is_empty() {
            let _ = self.removals.send(ids);
        }
    }

    /// New `max_bytes` / `on_full` (SIGHUP). A lower limit with `drop-oldest` trims the oldest
    /// in bounded chunks.
    pub async fn set_limits(&self, settings: Settings) {
        let _ = self.commands.send(Command::SetLimits(settings)).await;
    }

    /// Commits every message held in memory (shutdown: nothing accepted is left behind).
    pub async fn flush(&self) {
        let (done, receiver) = oneshot::channel();
        if self.commands.send(Command::Flush { done }).await.is_ok() {
            let _ = receiver.await;
        }
    }

    /// Counters after the latest change.
    pub fn stats(&self) -> watch::Receiver<SpoolStats> {
        self.stats.clone()
    }
}
