//! The spool thread: commands in, the decisions of `behind.rs` (write-behind) and `policy.rs`
//! (size, full disk, housekeeping) carried out against the `Store`, counters out. What it
//! decides lives in those pure types; this is the I/O around them.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, watch};

use super::behind::{self, Acked, Stamp, WriteBehind};
use super::dead_letters::{DeadLetter, DeadLetterAction, DeadLetterCommand, DeadLetterReply};
use super::policy::{
    self, CLOCK_SAVE_EVERY, Chore, DiskFigures, DiskFull, DiskFullStep, Freeing, Housekeeping,
    Limits, Removals, Room, SpoolClock, TRIM_CHUNK_ROWS, VACUUM_CHUNK_PAGES,
};
use super::reserve::Reserve;
use super::salvage::{self, Salvage};
use super::store::{self, Commit, DiskRead, Opened, Store};
use super::{
    AppendError, COMMAND_QUEUE, Command, Cursors, Operation, ReadBatch, ReadError, Settings,
    SpoolStats, StorageFault, StoredMessage, Waiter,
};
use crate::config::OnFull;
use crate::message::{Message, Priority};
use crate::repeats::Repeats;

/// Now, in seconds since the Unix epoch (0 for a clock before it).
pub(super) fn unix_seconds() -> u64 {
    unix_millis() / 1000
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

/// What reaches the spool thread: commands in order, and acknowledged ids ahead of them.
pub(super) struct Requests {
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) removals: mpsc::UnboundedReceiver<Vec<i64>>,
    /// Reads queued and not yet answered (counted up by `Spool::read_after`).
    pub(super) reads_waiting: Arc<AtomicUsize>,
}

impl Requests {
    /// A read is queued behind the commands in hand: they are held, not committed, until it
    /// is answered (an fsync ahead of it would stall the publisher, which drains the spool),
    /// unless that would hold too much.
    /// With a zero window the read could not see them anyway (committed before published).
    fn read_first(&self, held: &WriteBehind<Waiter>) -> bool {
        self.reads_waiting.load(Ordering::Acquire) > 0
            && !held.overfull()
            && !held.window().is_zero()
    }
}

/// How a wait for the next command ended.
enum Woken {
    Command(Command),
    /// Acknowledged ids.
    Removed(Vec<i64>),
    /// A deadline (commit window, removal delay, housekeeping) came first.
    Timeout,
    Closed,
}

/// The spool thread's state: the database, what is held in memory, and the counters.
pub(super) struct Spooler {
    store: Store,
    limits: Limits,
    stats: SpoolStats,
    /// Pages in use, as measured after the last change.
    live_bytes: u64,
    /// The acceptance time of the oldest row on disk, as of the last `measure`.
    oldest_on_disk: Option<Option<u64>>,
    reserve: Reserve,
    housekeeping: Housekeeping,
    /// Accepted, not committed, not acknowledged (write-behind).
    held: WriteBehind<Waiter>,
    /// Acknowledged, expired and conflated rows waiting to be deleted together.
    removals: Removals,
    /// Messages without a `ttl` expire after this long (zero: never).
    max_age: Duration,
    /// Ages messages for `ttl` and `max_age`.
    clock: SpoolClock,
    /// The spool clock at the start: the acceptance time of rows from older spools.
    clock_at_start: u64,
    clock_saved_at: Instant,
    /// The highest id of each priority any read has handed out: what is at or below may be in
    /// flight, so conflation leaves it alone.
    handed: Cursors,
    drop_log: Repeats,
    fault_log: Repeats,
    expiry_log: Repeats,
}

impl Spooler {
    /// Takes over an opened store: the WAL's and the dead letters' bounds applied, the disk
    /// reserve written.
    pub(super) fn new(
        mut store: Store,
        opened: Opened,
        settings: Settings,
    ) -> rusqlite::Result<Spooler> {
        let limits = Limits {
            max_bytes: settings.max_bytes,
            on_full: settings.on_full,
            page_size: store.page_size(),
        };
        let reserve = Reserve::beside(store.path());
        let now = Instant::now();
        let clock = SpoolClock::resume(opened.clock, unix_millis(), now);
        // Nothing is in flight yet: of each topic's conflating messages only the newest stays.
        let conflated = store.conflate_all()?;
        let mut spooler = Spooler {
            store,
            limits,
            stats: SpoolStats {
                messages: opened.messages.saturating_sub(conflated),
                last_id: opened.last_id,
                last_high_id: opened.last_high_id,
                dead_letters: opened.dead_letters,
                conflated_total: conflated,
                ..SpoolStats::default()
            },
            live_bytes: 0,
            oldest_on_disk: None,
            reserve,
            housekeeping: Housekeeping::new(now),
            held: WriteBehind::new(settings.commit_window),
            removals: Removals::default(),
            max_age: settings.max_age,
            clock,
            clock_at_start: clock.at(now),
            clock_saved_at: now,
            handed: Cursors::default(),
            drop_log: Repeats::default(),
            fault_log: Repeats::default(),
            expiry_log: Repeats::default(),
        };
        spooler.store.set_wal_limit(spooler.limits.wal_pages())?;
        // Spools written before dead letters had a byte bound may hold more.
        if let Err(error) = spooler.bound_dead_letters() {
            tracing::warn!(%error, "cannot bound the dead letters");
        }
        spooler.measure()?;
        spooler.reserve.restore(spooler.limits.disk_reserve());
        Ok(spooler)
    }

    pub(super) fn stats(&self) -> SpoolStats {
        self.stats
    }

    /// Salvages what reads back from the corrupt spool moved to `aside` (see `salvage.rs`).
    pub(super) fn salvage(&mut self, aside: &Path) -> Salvage {
        let outcome = salvage::salvage(&mut self.store, aside, &mut self.stats.last_id);
        self.stats.messages += outcome.saved;
        let _ = self.measure();
        outcome
    }

    /// The thread's loop, until the handle is dropped.
    pub(super) fn serve(
        mut self,
        mut requests: Requests,
        stats: watch::Sender<SpoolStats>,
        clock: tokio::runtime::Runtime,
    ) {
        let mut next: Option<Command> = None;
        loop {
            while let Ok(ids) = requests.removals.try_recv() {
                self.acknowledge(&ids, &stats);
            }
            let command = match next.take() {
                Some(command) => command,
                None => match requests.commands.try_recv() {
                    Ok(command) => command,
                    Err(TryRecvError::Disconnected) => break,
                    Err(TryRecvError::Empty) => {
                        if self.idle_step(&stats) {
                            continue;
                        }
                        match wait(&clock, &mut requests, self.next_deadline()) {
                            Woken::Command(command) => command,
                            Woken::Removed(ids) => {
                                self.acknowledge(&ids, &stats);
                                self.after_command(&stats);
                                continue;
                            }
                            Woken::Timeout => continue,
                            Woken::Closed => break,
                        }
                    }
                },
            };
            if let Command::Append {
                message,
                done,
                queued,
            } = command
            {
                next = self.hold_appends(&mut requests, (message, (done, queued)), &stats);
            } else {
                let read = matches!(command, Command::ReadAfter { .. });
                self.handle(command, &stats);
                if read {
                    requests.reads_waiting.fetch_sub(1, Ordering::AcqRel);
                }
            }
            if !requests.read_first(&self.held) {
                self.after_command(&stats);
            }
        }
        // The daemon is going: what the broker has is answered, the rest goes to disk.
        while let Ok(ids) = requests.removals.try_recv() {
            self.acknowledge(&ids, &stats);
        }
        self.settle(&stats);
        self.save_clock();
    }

    /// Saves the spool clock in a transaction of its own (the daemon stops).
    fn save_clock(&mut self) {
        let now = Instant::now();
        let clock = self.clock.at(now);
        let saved = self.store.begin().and_then(|tx| {
            tx.save_clock(clock, unix_millis())
                .and_then(|()| tx.commit())
        });
        match saved {
            Ok(()) => self.clock_saved_at = now,
            Err(error) => tracing::debug!(%error, "cannot save the spool clock"),
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        [
            self.held.commit_at(),
            self.removals.deadline(),
            self.housekeeping.due_at(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Appends waiting together are held together (and with a zero window, committed
    /// together: group commit). Returns the first other command met.
    fn hold_appends(
        &mut self,
        requests: &mut Requests,
        first: (Message, Waiter),
        stats: &watch::Sender<SpoolStats>,
    ) -> Option<Command> {
        let mut batch = vec![first];
        let mut next = None;
        while batch.len() + self.held.len() < behind::MAX_HELD
            || (requests.read_first(&self.held) && batch.len() < COMMAND_QUEUE)
        {
            match requests.commands.try_recv() {
                Ok(Command::Append {
                    message,
                    done,
                    queued,
                }) => batch.push((message, (done, queued))),
                Ok(other) => {
                    next = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        self.hold(batch, stats);
        next
    }

    /// Every command but appends.
    fn handle(&mut self, command: Command, stats: &watch::Sender<SpoolStats>) {
        match command {
            Command::Append {
                message,
                done,
                queued,
            } => {
                self.hold(vec![(message, (done, queued))], stats);
            }
            Command::ReadAfter {
                after,
                limit,
                max_bytes,
                reply,
            } => {
                let read = self.read_after(after, limit, max_bytes);
                self.publish_stats(stats);
                let _ = reply.send(read);
            }
            Command::DeadLetters(command) => {
                // Buried or requeued rows must be on disk, and new ids above every held one;
                // listing and purging touch only the dead letters (no fsync for a `list`).
                if command.moves_messages() {
                    self.settle(stats);
                }
                self.dead_letters(command, stats);
            }
            Command::SetLimits(settings) => {
                self.settle(stats);
                self.limits.max_bytes = settings.max_bytes;
                self.limits.on_full = settings.on_full;
                self.held.set_window(settings.commit_window);
                self.max_age = settings.max_age;
                if let Err(error) = self
                    .store
                    .set_wal_limit(self.limits.wal_pages())
                    .and_then(|()| self.bound_dead_letters())
                {
                    self.record_fault(Operation::Write, &error);
                }
                self.housekeeping.touched();
            }
            Command::Flush { done } => {
                self.settle(stats);
                let _ = done.send(());
            }
        }
    }

    /// Between commands, unless a read waits: a due commit or deletion, and one bounded trim
    /// when over the limit (lowered, or a commit that overshot), so a long trim never holds up
    /// reads, removals or the watchdog probe.
    fn after_command(&mut self, stats: &watch::Sender<SpoolStats>) {
        let now = Instant::now();
        if self.held.commit_due(now) {
            self.commit_held(stats);
        }
        if self.removals.due(now) {
            self.flush_removals(stats);
        }
        self.trim_step(stats);
    }

    /// With no command waiting: a due commit or removal, else housekeeping. `true` if it did
    /// something (look for commands again before the next step).
    fn idle_step(&mut self, stats: &watch::Sender<SpoolStats>) -> bool {
        let now = Instant::now();
        if self.held.commit_due(now) {
            self.commit_held(stats);
            return true;
        }
        if self.removals.due(now) {
            self.flush_removals(stats);
            return true;
        }
        if self.trim_step(stats) {
            return true;
        }
        self.housekeep(now, stats)
    }

    /// Commits what is held and deletes what was acknowledged.
    fn settle(&mut self, stats: &watch::Sender<SpoolStats>) {
        if !self.held.is_empty() {
            self.commit_held(stats);
        }
        self.flush_removals(stats);
    }

    /// Holds new messages in memory; the publisher hears of them at once (the counters move).
    /// With `reject-new`, one that would not fit on disk is refused now, before it is sent.
    fn hold(&mut self, batch: Vec<(Message, Waiter)>, stats: &watch::Sender<SpoolStats>) {
        let now = Instant::now();
        self.housekeeping.traffic(now);
        let stamp = Stamp {
            wall: unix_seconds(),
            clock: self.clock.at(now),
        };
        let mut refused = Vec::new();
        let mut conflated = Vec::new();
        for (message, waiter) in batch {
            let size = (message.topic.len() + message.payload.len()) as u64;
            if self.limits.on_full == OnFull::RejectNew && !self.fits_held(size) {
                // The per-row estimate runs ahead of the pages really used: commit what is
                // held (its size is then measured) before refusing, or a newer message could
                // later fit where an older one was refused.
                if !self.held.is_empty() {
                    self.commit_held(stats);
                }
                if !self.fits_held(size) {
                    refused.push(waiter);
                    continue;
                }
            }
            if message.options.conflate {
                conflated.extend(self.conflate(&message.topic, now));
            }
            self.stats.last_id += 1;
            if message.options.priority == Priority::High {
                self.stats.last_high_id = self.stats.last_id;
            }
            self.stats.messages += 1;
            self.held
                .push(self.stats.last_id, message, now, stamp, waiter);
        }
        self.publish_stats(stats);
        for (done, _queued) in refused {
            let _ = done.send(Err(AppendError::Full(self.limits.max_bytes)));
        }
        for (done, _queued) in conflated {
            let _ = done.send(Ok(()));
        }
    }

    /// A conflating message on `topic` arrives: the waiting conflating ones on that topic that
    /// no read has handed out go, held ones at once (their writers are returned, to be
    /// answered `ok`), rows on disk with the next deletion (reads skip them meanwhile).
    fn conflate(&mut self, topic: &str, now: Instant) -> Vec<Waiter> {
        let held = self.held.conflate(topic);
        let mut dropped = held.len() as u64;
        match self.store.conflating(topic) {
            Ok(rows) => {
                for (id, priority) in rows {
                    if id > self.handed.of(priority) && self.removals.add(id, now) {
                        dropped += 1;
                    }
                }
            }
            // Not conflated this time: older values are still published, nothing is lost.
            Err(error) => self.record_fault(Operation::Read, &error),
        }
        self.stats.messages = self.stats.messages.saturating_sub(dropped);
        self.stats.conflated_total += dropped;
        held
    }

    fn fits_held(&self, size: u64) -> bool {
        let held = (self.held.bytes(), self.held.len());
        self.limits.fits_held(self.live_bytes, held, size)
    }

    /// The broker acknowledged `ids` (or QoS 0 ones went out). Held ones are answered `ok`
    /// and never written; committed ones are deleted later, together.
    fn acknowledge(&mut self, ids: &[i64], stats: &watch::Sender<SpoolStats>) {
        let now = Instant::now();
        let mut delivered = Vec::new();
        for &id in ids {
            match self.held.acknowledge(id) {
                Acked::Delivered(waiter) => {
                    self.stats.messages = self.stats.messages.saturating_sub(1);
                    delivered.push(waiter);
                }
                Acked::Sent => self.stats.messages = self.stats.messages.saturating_sub(1),
                Acked::NotHeld => {
                    // Counted now (the drain waits for zero); a row found missing at the
                    // deletion is counted back.
                    if self.removals.add(id, now) {
                        self.stats.messages = self.stats.messages.saturating_sub(1);
                    }
                }
            }
        }
        self.publish_stats(stats);
        for (done, _queued) in delivered {
            let _ = done.send(Ok(()));
        }
    }

    /// Writes everything held in one transaction (one fsync) and answers its writers.
    /// Acknowledged rows waiting to be deleted go in the same transaction.
    fn commit_held(&mut self, stats: &watch::Sender<SpoolStats>) {
        let held = self.held.take();
        let counted = held.iter().filter(|h| !h.sent).count() as u64;
        // Counted while held; the commit counts the rows it writes.
        self.stats.messages = self.stats.messages.saturating_sub(counted);
        let mut rows = Vec::with_capacity(held.len());
        let mut accepted = Vec::with_capacity(held.len());
        let mut waiters = Vec::with_capacity(held.len());
        for h in held {
            rows.push(StoredMessage {
                id: h.id,
                message: h.message,
            });
            accepted.push((h.accepted.wall, h.accepted.clock));
            waiters.push((h.waiter, h.sent));
        }
        let results = self.append_batch(&rows, &accepted);
        let now = Instant::now();
        for (row, ((_, sent), result)) in rows.iter().zip(waiters.iter().zip(&results)) {
            // QoS 0 that already went out: durable as promised, and now forgotten.
            if *sent && result.is_ok() && self.removals.add(row.id, now) {
                self.stats.messages = self.stats.messages.saturating_sub(1);
            }
        }
        self.publish_stats(stats);
        for (((done, _queued), _), result) in waiters.into_iter().zip(results) {
            let _ = done.send(result);
        }
    }

    /// Deletes the acknowledged rows when no commit is coming to take them along.
    fn flush_removals(&mut self, stats: &watch::Sender<SpoolStats>) {
        if self.removals.is_empty() {
            return;
        }
        self.delete_removals();
        let _ = self.measure();
        self.publish_stats(stats);
    }

    /// Deletes the gathered acknowledged rows in a transaction of their own. On a failure
    /// they are counted back and forgotten: sent again later, a duplicate, never a loss.
    fn delete_removals(&mut self) {
        if self.removals.is_empty() {
            return;
        }
        let ids = self.removals.take();
        match self.store.delete(&ids) {
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

    /// One idle housekeeping step; `false` when there is nothing (more) to do.
    fn housekeep(&mut self, now: Instant, stats: &watch::Sender<SpoolStats>) -> bool {
        if self.housekeeping.due_at().is_none_or(|at| now < at) {
            return false;
        }
        let step = (|| -> rusqlite::Result<Option<bool>> {
            let disk = DiskFigures {
                free_pages: self.store.free_pages()?,
                messages: self.stats.messages,
                incremental_vacuum: self.store.incremental_vacuum(),
                wal_bytes: self.store.wal_file_bytes(),
                wal_reserve: self.limits.wal_reserve(),
            };
            Ok(match self.housekeeping.chore(now, disk) {
                None => None,
                Some(Chore::Vacuum) => {
                    let left = self.store.vacuum(VACUUM_CHUNK_PAGES)?;
                    Some(self.housekeeping.vacuumed(disk.free_pages, left))
                }
                Some(Chore::Checkpoint) => {
                    self.store.checkpoint()?;
                    self.housekeeping.checkpointed();
                    Some(false)
                }
                Some(Chore::Done) => Some(false),
            })
        })();
        let more = match step {
            Ok(None) => return false,
            Ok(Some(more)) => more,
            Err(error) if store::is_disk_full(&error) => false,
            Err(error) => {
                self.record_fault(Operation::Write, &error);
                false
            }
        };
        if !more {
            self.housekeeping.finished();
            self.reserve.restore(self.limits.disk_reserve());
        }
        let _ = self.measure();
        self.publish_stats(stats);
        more
    }

    /// Over `max_bytes` with `drop-oldest`: drops the oldest, one bounded chunk. `true` when
    /// it dropped some.
    fn trim_step(&mut self, stats: &watch::Sender<SpoolStats>) -> bool {
        if self
            .limits
            .trim(self.live_bytes, self.stats.messages)
            .is_none()
        {
            return false;
        }
        // Acknowledged rows first: they free space, and are never counted as dropped.
        self.flush_removals(stats);
        let Some(trim) = self.limits.trim(self.live_bytes, self.stats.messages) else {
            return false;
        };
        let dropped = match self.drop_oldest(&mut Freeing::new(trim.bytes, trim.rows)) {
            Ok(dropped) => dropped,
            Err(error) => {
                if !store::is_disk_full(&error) {
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

    /// Drops the oldest rows as `freeing` says, counted as dropped.
    fn drop_oldest(&mut self, freeing: &mut Freeing) -> rusqlite::Result<u64> {
        let dropped = self.store.drop_oldest(freeing)?;
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

    /// A write committed: a write fault is over, and housekeeping may have work.
    fn wrote(&mut self) {
        self.housekeeping.wrote(Instant::now());
        self.cleared(Operation::Write);
    }

    /// An operation of `kind` worked: a fault it cures is over.
    fn cleared(&mut self, kind: Operation) {
        if policy::clears(self.stats.fault, kind) {
            match kind {
                Operation::Write => tracing::info!("spool storage works again"),
                Operation::Read => tracing::info!("spool reads work again"),
            }
            self.stats.fault = None;
            self.fault_log.clear();
        }
    }

    fn record_fault(&mut self, operation: Operation, error: &rusqlite::Error) {
        let fault = StorageFault {
            operation,
            code: store::extended_code(error),
        };
        self.stats.fault = Some(policy::fault_after(self.stats.fault, fault));
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

    /// The storage fault's text for a writer or reader, `error` when none stands.
    fn fault_text(&self, error: &rusqlite::Error) -> String {
        self.stats
            .fault
            .map_or_else(|| error.to_string(), |f| f.to_string())
    }

    /// Refreshes the on-disk figures: pages in use, and `stats.bytes` with the WAL.
    fn measure(&mut self) -> rusqlite::Result<()> {
        self.live_bytes = self.store.live_bytes()?;
        self.stats.bytes = self.live_bytes + self.store.wal_file_bytes();
        self.oldest_on_disk = self.store.oldest_accepted_at(self.removals.ids())?;
        Ok(())
    }

    /// Counters go out before any answer, so a writer that got `ok` sees its message counted.
    fn publish_stats(&mut self, stats: &watch::Sender<SpoolStats>) {
        // Rows on disk are older than anything held.
        self.stats.oldest_accepted_at = match self.oldest_on_disk {
            Some(on_disk) => on_disk,
            None => self.held.oldest_accepted_at(),
        };
        stats.send_if_modified(|current| {
            let changed = *current != self.stats;
            *current = self.stats;
            changed
        });
    }

    /// Commits `batch` (ids given), making room on a full disk as `DiskFull` says; one result
    /// per row, for its writer.
    fn append_batch(
        &mut self,
        batch: &[StoredMessage],
        accepted_at: &[(u64, u64)],
    ) -> Vec<Result<(), AppendError>> {
        let before = self.stats;
        let mut outcome = self.try_append_batch(batch, accepted_at);
        let bytes = batch
            .iter()
            .map(|m| (m.message.topic.len() + m.message.payload.len()) as u64)
            .map(|size| size + policy::ROW_OVERHEAD)
            .sum::<u64>();
        let mut full = DiskFull::new(self.limits.on_full, bytes);
        // A failed transaction changed no counter: each round starts from what is on disk.
        while outcome.as_ref().is_err_and(store::is_disk_full) && self.make_room(&mut full) {
            outcome = self.try_append_batch(batch, accepted_at);
        }
        let results = match outcome {
            Ok(results) => {
                self.wrote();
                results
            }
            Err(error) => vec![Err(self.refusal(&error)); batch.len()],
        };
        let dropped = self.stats.dropped_total - before.dropped_total;
        if dropped > 0 {
            self.log_drops(
                dropped,
                if full.dropped_for_room() {
                    "disk full: dropped the oldest messages to make room"
                } else {
                    "spool full: dropped the oldest messages to make room"
                },
            );
        }
        let _ = self.measure();
        // At the limit, a WAL grown past its share by this commit would keep the spool over
        // `max_bytes` on disk until housekeeping: fold it back now.
        if self.stats.bytes > self.limits.max_bytes {
            let _ = self.store.checkpoint();
            let _ = self.measure();
        }
        results
    }

    /// Carries out the next step on a full disk; `false` when the commit must be refused.
    fn make_room(&mut self, full: &mut DiskFull) -> bool {
        match full.next(self.stats.messages, self.reserve.is_there()) {
            DiskFullStep::Refuse => false,
            DiskFullStep::GiveReserve => {
                let gave = self.reserve.release();
                if gave {
                    tracing::warn!(
                        "disk is full and the spool empty: gave the spool's disk reserve to new messages"
                    );
                }
                gave
            }
            DiskFullStep::DropOldest { bytes } => {
                // The reserve's space lets the checkpoint (which may grow the db by the WAL's
                // new pages) and the deletion write. It is restored in idle time, once
                // vacuuming gives space back. Freed pages stay in the db here: the retried
                // insert reuses them, so later checkpoints need no growth and the spool cycles
                // in the space it has.
                self.reserve.release();
                // Fold the WAL back first: the deletion then reuses its space.
                let _ = self.store.checkpoint();
                // Acknowledged rows first: they free space, and are never counted as dropped.
                self.delete_removals();
                let dropped = self.drop_oldest(&mut Freeing::new(bytes, usize::MAX));
                let _ = self.store.checkpoint();
                matches!(dropped, Ok(n) if n > 0)
            }
        }
    }

    /// What a writer hears when its commit failed.
    fn refusal(&mut self, error: &rusqlite::Error) -> AppendError {
        if store::is_disk_full(error) {
            const TEXT: &str = "disk is full; refusing new messages until space is free";
            if let Some(held_back) = self.fault_log.admit(TEXT) {
                tracing::warn!(held_back, "{TEXT}");
            }
            AppendError::Full(self.stats.bytes)
        } else {
            self.record_fault(Operation::Write, error);
            AppendError::Storage(self.fault_text(error))
        }
    }

    /// One transaction: the acknowledged rows deleted, then `batch` inserted, older rows
    /// dropped for room (`drop-oldest`) or rows refused (`reject-new`) as `Limits::room` says.
    /// `accepted_at`: each row's acceptance time (wall clock in seconds since the Unix epoch,
    /// spool clock), where known. The spool clock is saved along when it is due. Counters
    /// change only once the transaction commits.
    fn try_append_batch(
        &mut self,
        batch: &[StoredMessage],
        accepted_at: &[(u64, u64)],
    ) -> rusqlite::Result<Vec<Result<(), AppendError>>> {
        let removed: Vec<i64> = self.removals.ids().iter().copied().collect();
        let mut last_id = self.stats.last_id;
        let tx = self.store.begin()?;
        let mut inserter = tx.inserter()?;
        let mut commit = Appending {
            tx: &tx,
            limits: self.limits,
            // Only rows older than this commit may go: its own rows are answered `ok` with it.
            first_id: batch.first().map_or(i64::MAX, |m| m.id),
            used: 0,
            messages: self.stats.messages,
            dropped: 0,
        };
        // Acknowledged rows go in the same transaction, first: no commit of their own, and a
        // drop-oldest below never counts one of them as dropped.
        let deleted = commit.tx.delete(&removed)?;
        commit.used = commit.measured()?;
        let mut results = Vec::with_capacity(batch.len());
        for (index, row) in batch.iter().enumerate() {
            let size = (row.message.topic.len() + row.message.payload.len()) as u64;
            if !commit.make_room(size)? {
                results.push(Err(AppendError::Full(self.limits.max_bytes)));
                continue;
            }
            inserter.insert(row, accepted_at.get(index).copied())?;
            commit.used += size + policy::ROW_OVERHEAD;
            commit.messages += 1;
            last_id = last_id.max(row.id);
            results.push(Ok(()));
        }
        commit.settle(batch, &mut results)?;
        let now = Instant::now();
        let save_clock = now >= self.clock_saved_at + CLOCK_SAVE_EVERY;
        if save_clock {
            commit.tx.save_clock(self.clock.at(now), unix_millis())?;
        }
        let Appending {
            messages, dropped, ..
        } = commit;
        drop(inserter);
        tx.commit()?;
        if save_clock {
            self.clock_saved_at = now;
        }
        // Rows already gone (dropped meanwhile) were counted off twice.
        self.stats.messages = messages + removed.len() as u64 - deleted.min(removed.len() as u64);
        self.stats.dropped_total += dropped;
        self.stats.last_id = last_id;
        self.removals = Removals::default();
        Ok(results)
    }

    /// The next messages after the cursors: each priority from disk and then from memory, high
    /// first; a full read of high ones brings one normal one too (if one waits). A row that
    /// cannot be decoded (a damaged file) can never be published and would hold back every
    /// message behind it: it is logged, removed and counted as dropped, and the rest goes on.
    /// Expired rows are never returned: they go with the next deletion. A failed query is an
    /// error (and a fault).
    fn read_after(
        &mut self,
        after: Cursors,
        limit: usize,
        max_bytes: usize,
    ) -> Result<ReadBatch, ReadError> {
        let now = Instant::now();
        let (max_age, now_ms, unknown) = (self.max_age, self.clock.at(now), self.clock_at_start);
        let expired = move |clock: Option<u64>, ttl| {
            policy::expired(clock.unwrap_or(unknown), ttl, max_age, now_ms)
        };
        let mut read = DiskRead::default();
        let mut more = false;
        for priority in [Priority::High, Priority::Normal] {
            let (limit, max_bytes) = if priority == Priority::Normal && read.good.len() >= limit {
                (read.good.len() + 1, usize::MAX)
            } else {
                (limit, max_bytes)
            };
            let cursor = after.of(priority);
            let skip = self.removals.ids();
            let disk = self.store.read_after(
                priority, cursor, limit, max_bytes, skip, &expired, &mut read,
            );
            let disk_done = match disk {
                Ok(done) => done,
                Err(error) => {
                    self.record_fault(Operation::Read, &error);
                    return Err(ReadError::Storage(self.fault_text(&error)));
                }
            };
            // Held ids are above every row on disk: order holds across disk and memory.
            let all = disk_done
                && self.held.read_after(
                    priority,
                    cursor,
                    limit,
                    max_bytes,
                    &expired,
                    &mut read.bytes,
                    &mut read.good,
                );
            more |= !all;
        }
        self.cleared(Operation::Read);
        for message in &read.good {
            let handed = self.handed.of_mut(message.message.options.priority);
            *handed = (*handed).max(message.id);
        }
        self.drop_expired(&read.expired, now);
        self.drop_broken(&read.broken);
        Ok(ReadBatch {
            messages: read.good,
            more,
        })
    }

    /// Expired rows go with the next deletion; they are counted and logged (rate-limited).
    fn drop_expired(&mut self, ids: &[i64], now: Instant) {
        let mut expired = 0;
        for &id in ids {
            if self.removals.add(id, now) {
                expired += 1;
            }
        }
        if expired == 0 {
            return;
        }
        self.stats.messages = self.stats.messages.saturating_sub(expired);
        self.stats.expired_total += expired;
        const TEXT: &str = "dropped expired messages (their ttl or spool.max_age passed)";
        if let Some(held_back) = self.expiry_log.admit(TEXT) {
            tracing::info!(
                expired,
                expired_total = self.stats.expired_total,
                held_back,
                "{TEXT}"
            );
        }
    }

    fn drop_broken(&mut self, broken: &[(i64, rusqlite::Error)]) {
        if broken.is_empty() {
            return;
        }
        for (id, error) in broken {
            tracing::error!(spool_id = id, %error, "undecodable spool row dropped");
        }
        let ids: Vec<i64> = broken.iter().map(|(id, _)| *id).collect();
        match self.store.delete(&ids) {
            Ok(deleted) => {
                self.stats.messages = self.stats.messages.saturating_sub(deleted);
                self.stats.dropped_total += deleted;
                self.wrote();
            }
            Err(error) => self.record_fault(Operation::Write, &error),
        }
        let _ = self.measure();
    }

    fn dead_letters(&mut self, command: DeadLetterCommand, stats: &watch::Sender<SpoolStats>) {
        // Rows moved between the tables: the on-disk size is measured again (idle time also
        // gives freed pages back).
        self.housekeeping.touched();
        match command {
            DeadLetterCommand::Bury { ids, reason, done } => {
                let bound = self.limits.dead_letter_bytes();
                match self.store.bury(&ids, &reason, unix_seconds(), bound) {
                    Ok((moved, trimmed)) => {
                        self.stats.messages = self.stats.messages.saturating_sub(moved);
                        self.stats.dead_letters += moved;
                        self.stats.dead_letter_total += moved;
                        self.count_trimmed(trimmed);
                    }
                    // The messages stay queued: tried again, never lost.
                    Err(error) => {
                        tracing::error!(%error, "cannot move messages to the dead letters");
                    }
                }
                let _ = self.measure();
                self.publish_stats(stats);
                let _ = done.send(());
            }
            DeadLetterCommand::Operator { action, reply } => {
                let result = self.dead_letter_action(action).map_err(|error| {
                    tracing::error!(%error, "dead-letter operation failed");
                    error.to_string()
                });
                self.publish_stats(stats);
                let _ = reply.send(result);
            }
        }
    }

    fn dead_letter_action(
        &mut self,
        action: DeadLetterAction,
    ) -> rusqlite::Result<DeadLetterReply> {
        Ok(match action {
            DeadLetterAction::List => DeadLetterReply::Listed(
                self.store
                    .list_dead_letters(super::dead_letters::MAX_DEAD_LETTERS_LISTED)?
                    .into_iter()
                    .map(DeadLetter::from)
                    .collect(),
            ),
            DeadLetterAction::Requeue => {
                // Ids after every id handed out, also those of messages acknowledged from
                // memory and never written (the publisher's cursor may be past them).
                let (count, highest) = self.store.requeue_dead_letters(self.stats.last_id)?;
                self.stats.messages += count;
                self.stats.last_id = self.stats.last_id.max(highest);
                self.stats.dead_letters = 0;
                DeadLetterReply::Requeued(count)
            }
            DeadLetterAction::Purge => {
                let purged = self.store.purge_dead_letters()?;
                self.stats.dead_letters = 0;
                DeadLetterReply::Purged(purged)
            }
        })
    }

    fn bound_dead_letters(&mut self) -> rusqlite::Result<()> {
        let trimmed = self
            .store
            .bound_dead_letters(self.limits.dead_letter_bytes())?;
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
            max_dead_letters = store::MAX_DEAD_LETTERS,
            max_bytes = self.limits.dead_letter_bytes(),
            dropped_total = self.stats.dropped_total,
            "dead letters over their bound: deleted the oldest (list them with `iot-cognito-relay dead-letters list`)"
        );
    }
}

/// The next command or removal, or `Timeout` at `deadline`.
fn wait(
    clock: &tokio::runtime::Runtime,
    requests: &mut Requests,
    deadline: Option<Instant>,
) -> Woken {
    clock.block_on(async {
        let deadline = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            Some(ids) = requests.removals.recv() => Woken::Removed(ids),
            command = requests.commands.recv() => command.map_or(Woken::Closed, Woken::Command),
            () = deadline => Woken::Timeout,
        }
    })
}

/// One commit under way, with the figures it keeps as it goes.
struct Appending<'a, 'db> {
    tx: &'a Commit<'db>,
    limits: Limits,
    /// The commit's first id: only older rows may be dropped.
    first_id: i64,
    /// Estimated pages in use plus the WAL's share, as this transaction goes.
    used: u64,
    messages: u64,
    dropped: u64,
}

impl Appending<'_, '_> {
    /// Pages in use plus the WAL's share, measured.
    fn measured(&self) -> rusqlite::Result<u64> {
        Ok(self.tx.live_bytes()? + self.limits.wal_reserve())
    }

    fn drop_oldest(&mut self) -> rusqlite::Result<Option<u64>> {
        let freed = self.tx.drop_oldest_below(self.first_id)?;
        if freed.is_some() {
            self.messages = self.messages.saturating_sub(1);
            self.dropped += 1;
        }
        Ok(freed)
    }

    /// Whether a row of `size` can go in, after dropping older rows if `Limits::room` says so.
    fn make_room(&mut self, size: u64) -> rusqlite::Result<bool> {
        if self.limits.room(self.used, size) != Room::Fits {
            // The per-row estimate runs ahead of the pages really used: measure before
            // refusing, or a later transaction (measured afresh) takes newer messages after
            // older ones were refused.
            self.used = self.measured()?;
        }
        match self.limits.room(self.used, size) {
            Room::Fits => Ok(true),
            Room::Refuse => Ok(false),
            Room::DropOlder => {
                // Bounded like a trim; anything left over is trimmed between commands.
                let mut dropped_here = 0;
                while self.limits.room(self.used, size) == Room::DropOlder
                    && dropped_here < TRIM_CHUNK_ROWS
                {
                    let Some(freed) = self.drop_oldest()? else {
                        break;
                    };
                    self.used = self.used.saturating_sub(freed + policy::ROW_OVERHEAD);
                    dropped_here += 1;
                }
                if self.limits.room(self.used, size) != Room::Fits {
                    self.used = self.measured()?;
                }
                // Nothing older is left to drop: this one does not fit.
                Ok(self.limits.room(self.used, size) == Room::Fits
                    || dropped_here >= TRIM_CHUNK_ROWS)
            }
        }
    }

    /// The per-row estimate runs behind the pages really used: settle on what the pages say
    /// before anything is answered. Older rows go first (drop-oldest); then this commit's
    /// newest rows are refused, never its older ones dropped after their `ok`.
    fn settle(
        &mut self,
        batch: &[StoredMessage],
        results: &mut [Result<(), AppendError>],
    ) -> rusqlite::Result<()> {
        let max_bytes = self.limits.max_bytes;
        let mut actual = self.measured()?;
        while actual > max_bytes && self.limits.on_full == OnFull::DropOldest {
            if self.drop_oldest()?.is_none() {
                break;
            }
            actual = self.measured()?;
        }
        for (row, result) in batch.iter().zip(results.iter_mut()).rev() {
            if actual <= max_bytes {
                break;
            }
            if result.is_ok() {
                self.tx.delete(&[row.id])?;
                *result = Err(AppendError::Full(max_bytes));
                self.messages = self.messages.saturating_sub(1);
                actual = self.measured()?;
            }
        }
        Ok(())
    }
}
