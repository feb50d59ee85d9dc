//! The spool thread's loop: commands in, write-behind (`behind.rs`) and idle housekeeping in
//! between. What it decides is in `Pending`; this is the I/O around it.

use std::collections::BTreeSet;

use tokio::sync::mpsc::error::TryRecvError;

use super::*;

/// How a wait for the next command ended.
enum Woken {
    Command(Command),
    /// Acknowledged ids.
    Removed(Vec<i64>),
    /// A deadline (commit window, removal delay) came first.
    Timeout,
    Closed,
}

/// Acknowledged rows still on disk, deleted together later (`REMOVE_BATCH`, `REMOVE_DELAY`),
/// in the next commit's transaction or, if none comes first, in one of their own.
#[derive(Default)]
pub(super) struct Removals {
    pub(super) ids: BTreeSet<i64>,
    since: Option<Instant>,
}

impl Removals {
    fn due(&self, now: Instant) -> bool {
        self.ids.len() >= REMOVE_BATCH || self.since.is_some_and(|at| now >= at + REMOVE_DELAY)
    }

    fn deadline(&self) -> Option<Instant> {
        self.since.map(|at| at + REMOVE_DELAY)
    }

    fn add(&mut self, id: i64, now: Instant) -> bool {
        self.since.get_or_insert(now);
        self.ids.insert(id)
    }
}

/// What reaches the spool thread: commands in order, and acknowledged ids ahead of them.
pub(super) struct Inbox {
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) removals: mpsc::UnboundedReceiver<Vec<i64>>,
    /// Reads queued and not yet answered (counted up by `Spool::read_after`).
    pub(super) reads_waiting: Arc<AtomicUsize>,
}

impl Inbox {
    /// A read is queued behind the commands in hand: they are held, not committed, until it
    /// is answered (an fsync ahead of it would stall the publisher, which drains the spool),
    /// unless that would hold too much.
    /// With a zero window the read could not see them anyway (committed before published).
    fn read_first(&self, pending: &Pending<Waiter>) -> bool {
        self.reads_waiting.load(Ordering::Acquire) > 0
            && !pending.overfull()
            && !pending.window().is_zero()
    }
}

impl Store {
    pub(super) fn serve(
        mut self,
        mut inbox: Inbox,
        stats: watch::Sender<SpoolStats>,
        clock: tokio::runtime::Runtime,
    ) {
        let mut next: Option<Command> = None;
        loop {
            while let Ok(ids) = inbox.removals.try_recv() {
                self.acknowledge(&ids, &stats);
            }
            let command = match next.take() {
                Some(command) => command,
                None => match inbox.commands.try_recv() {
                    Ok(command) => command,
                    Err(TryRecvError::Disconnected) => break,
                    Err(TryRecvError::Empty) => {
                        if self.idle_step(&stats) {
                            continue;
                        }
                        let deadline = [
                            self.pending.commit_at(),
                            self.removals.deadline(),
                            self.maintenance_at(),
                        ]
                        .into_iter()
                        .flatten()
                        .min();
                        match wait(&clock, &mut inbox, deadline) {
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
                // Appends waiting together are held together (and with a zero window,
                // committed together: group commit).
                let mut batch = vec![(message, (done, queued))];
                while batch.len() + self.pending.len() < behind::MAX_HELD
                    || (inbox.read_first(&self.pending) && batch.len() < COMMAND_QUEUE)
                {
                    match inbox.commands.try_recv() {
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
                self.hold(batch, &stats);
            } else {
                let read = matches!(command, Command::ReadAfter { .. });
                self.handle(command, &stats);
                if read {
                    inbox.reads_waiting.fetch_sub(1, Ordering::AcqRel);
                }
            }
            if !inbox.read_first(&self.pending) {
                self.after_command(&stats);
            }
        }
        // The daemon is going: what the broker has is answered, the rest goes to disk.
        while let Ok(ids) = inbox.removals.try_recv() {
            self.acknowledge(&ids, &stats);
        }
        self.settle(&stats);
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
            Command::SetLimits {
                max_bytes,
                on_full,
                commit_window,
            } => {
                self.settle(stats);
                self.max_bytes = max_bytes;
                self.on_full = on_full;
                self.pending.set_window(commit_window);
                if let Err(error) = self
                    .apply_wal_limit()
                    .and_then(|()| self.bound_dead_letters())
                {
                    self.record_fault(Operation::Write, &error);
                }
                self.dirty = true;
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
        if self.pending.commit_due(now) {
            self.commit_held(stats);
        }
        if self.removals.due(now) {
            self.flush_removals(stats);
        }
        if self.must_trim() {
            self.trim_chunk(stats);
        }
    }

    /// With no command waiting: a due commit or removal, else housekeeping. `true` if it did
    /// something (look for commands again before the next step).
    fn idle_step(&mut self, stats: &watch::Sender<SpoolStats>) -> bool {
        let now = Instant::now();
        if self.pending.commit_due(now) {
            self.commit_held(stats);
            return true;
        }
        if self.removals.due(now) {
            self.flush_removals(stats);
            return true;
        }
        self.maintain(stats)
    }

    /// Commits what is held and deletes what was acknowledged.
    pub(super) fn settle(&mut self, stats: &watch::Sender<SpoolStats>) {
        if !self.pending.is_empty() {
            self.commit_held(stats);
        }
        self.flush_removals(stats);
    }

    /// Holds new messages in memory; the publisher hears of them at once (the counters move).
    /// With `reject-new`, one that would not fit on disk is refused now, before it is sent.
    fn hold(&mut self, batch: Vec<(Message, Waiter)>, stats: &watch::Sender<SpoolStats>) {
        let now = Instant::now();
        self.last_traffic = now;
        let mut refused = Vec::new();
        for (message, waiter) in batch {
            let size = (message.topic.len() + message.payload.len()) as u64;
            if self.on_full == OnFull::RejectNew && !self.fits_held(size) {
                // The per-row estimate runs ahead of the pages really used: commit what is
                // held (its size is then measured) before refusing, or a newer message could
                // later fit where an older one was refused.
                if !self.pending.is_empty() {
                    self.commit_held(stats);
                }
                if !self.fits_held(size) {
                    refused.push(waiter);
                    continue;
                }
            }
            self.stats.last_id += 1;
            self.stats.messages += 1;
            self.pending
                .push(self.stats.last_id, message, now, unix_seconds(), waiter);
        }
        self.publish_stats(stats);
        for (done, _queued) in refused {
            let _ = done.send(Err(AppendError::Full(self.max_bytes)));
        }
    }

    /// Whether `size` more bytes fit with what is on disk and held (an estimate; the commit
    /// measures again).
    fn fits_held(&self, size: u64) -> bool {
        let held = self.pending.bytes() + self.pending.len() as u64 * ROW_OVERHEAD;
        self.live_bytes + self.wal_reserve() + held + size + ROW_OVERHEAD <= self.max_bytes
    }

    /// The broker acknowledged `ids` (or QoS 0 ones went out). Held ones are answered `ok`
    /// and never written; committed ones are deleted later, together.
    fn acknowledge(&mut self, ids: &[i64], stats: &watch::Sender<SpoolStats>) {
        let now = Instant::now();
        let mut delivered = Vec::new();
        for &id in ids {
            match self.pending.acknowledge(id) {
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
    pub(super) fn commit_held(&mut self, stats: &watch::Sender<SpoolStats>) {
        let held = self.pending.take();
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
            accepted.push(h.accepted_at);
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
    pub(super) fn flush_removals(&mut self, stats: &watch::Sender<SpoolStats>) {
        if self.removals.ids.is_empty() {
            return;
        }
        self.delete_removals();
        let _ = self.measure();
        self.publish_stats(stats);
    }
}

/// The next command or removal, or `Timeout` at `deadline`.
fn wait(clock: &tokio::runtime::Runtime, inbox: &mut Inbox, deadline: Option<Instant>) -> Woken {
    clock.block_on(async {
        let deadline = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            Some(ids) = inbox.removals.recv() => Woken::Removed(ids),
            command = inbox.commands.recv() => command.map_or(Woken::Closed, Woken::Command),
            () = deadline => Woken::Timeout,
        }
    })
}
