//! Write-behind: the messages the spool holds in memory before it commits them.
//!
//! An accepted message is handed to the publisher at once, from memory. It is written to disk
//! only if the broker has not acknowledged it when the commit window of the oldest held message
//! ends; then everything held goes in one transaction with one fsync. Its writer hears `ok` at
//! the first of the two, the commit or the PUBACK, so `ok` still means "on stable storage or
//! acknowledged by IoT Core". Online, most messages never touch the disk.
//!
//! Pure: time comes in as arguments, and the waiter (the writer's answer channel) is a type
//! parameter, so the decisions are unit-tested without a database or a clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::message::{Message, Priority, Qos};

use super::StoredMessage;

/// Most messages held at once, and so in one commit (group commit).
pub(super) const MAX_HELD: usize = 4096;
/// Most topic + payload bytes held at once (one commit's size, in bytes).
pub(super) const MAX_HELD_BYTES: u64 = 4 * 1024 * 1024;
/// While a read waits, commits are put off (the publisher drains the spool; an fsync ahead of
/// its read would hold the drain up), up to this many held messages: the command queue's worth
/// behind one full commit.
pub(super) const MAX_DEFERRED_HELD: usize = MAX_HELD + super::COMMAND_QUEUE;
/// The same bound in topic + payload bytes.
pub(super) const MAX_DEFERRED_HELD_BYTES: u64 = 4 * MAX_HELD_BYTES;
/// A held message the publisher has not read this long after it arrived is committed at once:
/// nothing can acknowledge a message that was not sent (offline, or behind a backlog), so its
/// window would only delay its `ok`, and a writer that waits for each `ok` would crawl.
pub(super) const READ_GRACE: Duration = Duration::from_millis(50);
/// This many held messages not read by the publisher are committed at once, grace or not: a
/// burst the publisher is not taking (offline, or a flood) gains nothing by waiting, and
/// pipelining writers (at most 1024 unanswered lines each) would stall on the grace.
pub(super) const MAX_UNREAD: usize = 256;

/// One message accepted, not committed, not acknowledged.
pub(super) struct Held<W> {
    pub(super) id: i64,
    pub(super) message: Message,
    pub(super) arrived: Instant,
    /// When it was accepted (stored with its row).
    pub(super) accepted: Stamp,
    /// Whoever waits for the answer.
    pub(super) waiter: W,
    /// A QoS 0 message that went out. Nothing acknowledges QoS 0, so going out is not the
    /// broker having it: its `ok` still waits for the commit; it is just not sent again.
    pub(super) sent: bool,
    /// The publisher read it (it may be in flight).
    read: bool,
}

/// When a message was accepted: the wall clock (seconds since the Unix epoch, for `status`)
/// and the spool clock (seconds, for expiry: see `policy::SpoolClock`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Stamp {
    pub(super) wall: u64,
    pub(super) clock: u64,
}

impl<W> Held<W> {
    fn size(&self) -> u64 {
        (self.message.topic.len() + self.message.payload.len()) as u64
    }
}

/// What an acknowledged (or, for QoS 0, sent) id means.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Acked<W> {
    /// Held and now acknowledged: answer `ok`; it is never written.
    Delivered(W),
    /// Held, QoS 0, gone out: stays held until the commit, then is forgotten.
    Sent,
    /// Not held (committed earlier, or unknown): the disk row goes.
    NotHeld,
}

/// The held messages, in id order (ids are given in arrival order).
pub(super) struct WriteBehind<W> {
    held: VecDeque<Held<W>>,
    bytes: u64,
    window: Duration,
    /// How many held messages the publisher has read.
    read: usize,
}

impl<W> WriteBehind<W> {
    pub(super) fn new(window: Duration) -> WriteBehind<W> {
        WriteBehind {
            held: VecDeque::new(),
            bytes: 0,
            window,
            read: 0,
        }
    }

    pub(super) fn window(&self) -> Duration {
        self.window
    }

    pub(super) fn set_window(&mut self, window: Duration) {
        self.window = window;
    }

    pub(super) fn len(&self) -> usize {
        self.held.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Topic and payload bytes held.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Holds a message; `id` must be above every id held.
    pub(super) fn push(
        &mut self,
        id: i64,
        message: Message,
        now: Instant,
        accepted: Stamp,
        waiter: W,
    ) {
        debug_assert!(self.held.back().is_none_or(|last| last.id < id));
        let held = Held {
            id,
            message,
            arrived: now,
            accepted,
            waiter,
            sent: false,
            read: false,
        };
        self.bytes += held.size();
        self.held.push_back(held);
    }

    /// When what is held must be committed: the oldest's window ends, or the oldest one not
    /// read by the publisher outstays `READ_GRACE`. `None` when nothing is held.
    pub(super) fn commit_at(&self) -> Option<Instant> {
        let window_end = self.held.front()?.arrived + self.window;
        // Read ones are mostly at the front (reads go in id order within a priority).
        let unread_end = (self.read < self.held.len())
            .then(|| self.held.iter().find(|held| !held.read))
            .flatten()
            .map(|held| held.arrived + READ_GRACE);
        Some(unread_end.map_or(window_end, |at| at.min(window_end)))
    }

    /// Whether what is held must be committed now: the oldest's window is over, or as much is
    /// held as one commit should take.
    pub(super) fn commit_due(&self, now: Instant) -> bool {
        self.commit_at().is_some_and(|at| now >= at) || self.full() || self.unread() >= MAX_UNREAD
    }

    /// Held messages the publisher has not read.
    fn unread(&self) -> usize {
        self.held.len() - self.read
    }

    /// As much held as one commit takes: commit before holding more.
    pub(super) fn full(&self) -> bool {
        self.held.len() >= MAX_HELD || self.bytes >= MAX_HELD_BYTES
    }

    /// So much held that even a waiting read does not put the commit off any longer.
    pub(super) fn overfull(&self) -> bool {
        self.held.len() >= MAX_DEFERRED_HELD || self.bytes >= MAX_DEFERRED_HELD_BYTES
    }

    /// The broker acknowledged `id` (QoS 1), or a QoS 0 `id` went out.
    pub(super) fn acknowledge(&mut self, id: i64) -> Acked<W> {
        let Ok(index) = self.held.binary_search_by_key(&id, |held| held.id) else {
            return Acked::NotHeld;
        };
        let held = &mut self.held[index];
        if held.message.qos == Qos::AtMostOnce {
            if held.sent {
                return Acked::NotHeld;
            }
            held.sent = true;
            return Acked::Sent;
        }
        let Some(held) = self.remove(index) else {
            return Acked::NotHeld;
        };
        Acked::Delivered(held.waiter)
    }

    fn remove(&mut self, index: usize) -> Option<Held<W>> {
        let held = self.held.remove(index)?;
        self.bytes -= held.size();
        self.read -= usize::from(held.read);
        Some(held)
    }

    /// A conflating message on `topic` arrives: the held conflating ones on that topic the
    /// publisher has not read are worth nothing now. Their writers are returned (answered `ok`:
    /// they were accepted, and conflation is the app's choice).
    pub(super) fn conflate(&mut self, topic: &str) -> Vec<W> {
        let mut dropped = Vec::new();
        let mut index = 0;
        while index < self.held.len() {
            let held = &self.held[index];
            if held.message.options.conflate && !held.read && held.message.topic == topic {
                if let Some(held) = self.remove(index) {
                    dropped.push(held.waiter);
                }
            } else {
                index += 1;
            }
        }
        dropped
    }

    /// When the oldest held message was accepted (seconds since the Unix epoch).
    pub(super) fn oldest_accepted_at(&self) -> Option<u64> {
        self.held.front().map(|held| held.accepted.wall)
    }

    /// Everything held, oldest first, for one commit.
    pub(super) fn take(&mut self) -> Vec<Held<W>> {
        self.bytes = 0;
        self.read = 0;
        self.held.drain(..).collect()
    }

    /// Held messages of `priority` not yet sent with an id above `after`, oldest first, added
    /// to `into` while it has fewer than `limit` and their payloads (counted in `bytes`) stay
    /// under `max_bytes` (one always comes into an empty read). None with a zero window. One
    /// `expired` says is past its time (from its spool clock and ttl) is passed over: it is
    /// committed with the rest and dropped from the disk. `true` when every such message was
    /// taken.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn read_after(
        &mut self,
        priority: Priority,
        after: i64,
        limit: usize,
        max_bytes: usize,
        expired: &dyn Fn(Option<u64>, Option<u32>) -> bool,
        bytes: &mut usize,
        into: &mut Vec<StoredMessage>,
    ) -> bool {
        // No window: every message is committed before it is published.
        if self.window.is_zero() {
            return true;
        }
        let start = self.held.partition_point(|held| held.id <= after);
        for held in self.held.iter_mut().skip(start) {
            if held.sent
                || held.message.options.priority != priority
                || expired(Some(held.accepted.clock), held.message.options.ttl)
            {
                continue;
            }
            if into.len() >= limit || (*bytes >= max_bytes && !into.is_empty()) {
                return false;
            }
            *bytes += held.message.payload.len();
            if !held.read {
                held.read = true;
                self.read += 1;
            }
            into.push(StoredMessage {
                id: held.id,
                message: held.message.clone(),
            });
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::PayloadKind;

    const WINDOW: Duration = Duration::from_millis(200);

    fn never(_: Option<u64>, _: Option<u32>) -> bool {
        false
    }

    fn message(qos: Qos) -> Message {
        Message {
            topic: "t".into(),
            payload: b"12345".to_vec(),
            qos,
            kind: PayloadKind::Json,
            options: Default::default(),
        }
    }

    fn ids(read: &[StoredMessage]) -> Vec<i64> {
        read.iter().map(|m| m.id).collect()
    }

    /// What the publisher does when it is connected: it reads what arrives at once.
    fn read_everything<W>(pending: &mut WriteBehind<W>) -> Vec<i64> {
        let mut read = Vec::new();
        pending.read_after(
            Priority::Normal,
            0,
            usize::MAX,
            usize::MAX,
            &never,
            &mut 0,
            &mut read,
        );
        ids(&read)
    }

    #[test]
    fn a_message_acknowledged_within_the_window_is_answered_and_never_committed() {
        let start = Instant::now();
        let mut pending = WriteBehind::new(WINDOW);
        pending.push(
            1,
            message(Qos::AtLeastOnce),
            start,
            Stamp::default(),
            "writer 1",
        );
        read_everything(&mut pending);
        pending.push(
            2,
            message(Qos::AtLeastOnce),
            start + WINDOW / 2,
            Stamp::default(),
            "writer 2",
        );
        read_everything(&mut pending);
        assert!(!pending.commit_due(start + WINDOW / 2));
        assert_eq!(pending.acknowledge(1), Acked::Delivered("writer 1"));
        // The window that counts is now the next oldest's.
        assert_eq!(pending.commit_at(), Some(start + WINDOW / 2 + WINDOW));
        assert!(!pending.commit_due(start + WINDOW));
        assert!(pending.commit_due(start + WINDOW * 3 / 2));
        let committed: Vec<_> = pending.take().into_iter().map(|h| h.waiter).collect();
        assert_eq!(
            committed,
            ["writer 2"],
            "only the unacknowledged one is written"
        );
        assert!(pending.is_empty() && pending.bytes() == 0);
        assert_eq!(pending.commit_at(), None);
        assert!(!pending.commit_due(start + WINDOW * 10));
    }

    /// Offline (or behind a backlog) nothing reads the held messages: nothing can acknowledge
    /// them either, so they are committed after `READ_GRACE`, not after the whole window.
    #[test]
    fn a_message_nobody_reads_is_committed_after_the_read_grace() {
        let start = Instant::now();
        let mut pending = WriteBehind::new(WINDOW);
        pending.push(1, message(Qos::AtLeastOnce), start, Stamp::default(), ());
        assert_eq!(pending.commit_at(), Some(start + READ_GRACE));
        assert!(!pending.commit_due(start + READ_GRACE / 2));
        assert!(pending.commit_due(start + READ_GRACE));
        // A burst nobody reads goes at once.
        let mut burst = WriteBehind::new(WINDOW);
        for id in 1..=MAX_UNREAD as i64 {
            assert!(!burst.commit_due(start), "{id}");
            burst.push(id, message(Qos::AtLeastOnce), start, Stamp::default(), ());
        }
        assert!(burst.commit_due(start));
        // Read (sent): the window counts; a newer unread one brings the commit forward.
        assert_eq!(read_everything(&mut pending), [1]);
        assert_eq!(pending.commit_at(), Some(start + WINDOW));
        let later = start + Duration::from_millis(100);
        pending.push(2, message(Qos::AtLeastOnce), later, Stamp::default(), ());
        assert_eq!(
            pending.commit_at(),
            Some((later + READ_GRACE).min(start + WINDOW))
        );
        // After a reconnect the publisher reads from the start again: still read.
        assert_eq!(read_everything(&mut pending), [1, 2]);
        assert_eq!(pending.commit_at(), Some(start + WINDOW));
    }

    #[test]
    fn an_acknowledgement_for_a_committed_or_unknown_id_goes_to_the_disk() {
        let mut pending = WriteBehind::new(WINDOW);
        pending.push(
            5,
            message(Qos::AtLeastOnce),
            Instant::now(),
            Stamp::default(),
            (),
        );
        assert_eq!(pending.acknowledge(4), Acked::NotHeld);
        assert_eq!(pending.acknowledge(6), Acked::NotHeld);
        assert_eq!(pending.acknowledge(5), Acked::Delivered(()));
        assert_eq!(pending.acknowledge(5), Acked::NotHeld, "answered once");
    }

    #[test]
    fn qos0_going_out_is_not_an_acknowledgement() {
        let now = Instant::now();
        let mut pending = WriteBehind::new(WINDOW);
        pending.push(1, message(Qos::AtMostOnce), now, Stamp::default(), "w");
        assert_eq!(pending.acknowledge(1), Acked::Sent);
        assert_eq!(pending.len(), 1, "still held: its ok waits for the commit");
        let mut read = Vec::new();
        pending.read_after(
            Priority::Normal,
            0,
            10,
            usize::MAX,
            &never,
            &mut 0,
            &mut read,
        );
        assert!(read.is_empty(), "not sent twice");
        assert_eq!(pending.acknowledge(1), Acked::NotHeld);
        let taken = pending.take();
        assert!(taken[0].sent);
    }

    /// A held message past its time is never read (a reconnect reads from the start again);
    /// it stays held, to be committed and dropped from the disk.
    #[test]
    fn an_expired_held_message_is_never_read() {
        let now = Instant::now();
        let mut pending = WriteBehind::new(WINDOW);
        let mut short = message(Qos::AtLeastOnce);
        short.options.ttl = Some(1);
        let young = Stamp {
            wall: 0,
            clock: 5000,
        };
        pending.push(1, short, now, Stamp::default(), ());
        pending.push(2, message(Qos::AtLeastOnce), now, young, ());
        let at_3s = |clock: Option<u64>, ttl: Option<u32>| {
            crate::spool::policy::expired(clock.unwrap_or(0), ttl, Duration::ZERO, 3000)
        };
        let mut read = Vec::new();
        let all = pending.read_after(
            Priority::Normal,
            0,
            10,
            usize::MAX,
            &at_3s,
            &mut 0,
            &mut read,
        );
        assert_eq!(ids(&read), [2]);
        assert!(all);
        assert_eq!(pending.len(), 2, "still held until its commit");
    }

    #[test]
    fn a_full_hold_is_committed_at_once_and_a_zero_window_always() {
        let now = Instant::now();
        let mut pending = WriteBehind::new(WINDOW);
        for id in 1..=MAX_HELD as i64 {
            assert!(!pending.commit_due(now), "{id}");
            pending.push(id, message(Qos::AtLeastOnce), now, Stamp::default(), ());
            if id % 128 == 0 {
                // Read (sent) as they come: only the count makes it due.
                pending.read_after(
                    Priority::Normal,
                    id - 128,
                    128,
                    usize::MAX,
                    &never,
                    &mut 0,
                    &mut Vec::new(),
                );
            }
        }
        assert!(pending.commit_due(now));

        let mut big = WriteBehind::new(WINDOW);
        let mut m = message(Qos::AtLeastOnce);
        m.payload = vec![0; MAX_HELD_BYTES as usize];
        big.push(1, m, now, Stamp::default(), ());
        assert!(big.commit_due(now));

        let mut write_through = WriteBehind::new(Duration::ZERO);
        assert!(!write_through.commit_due(now), "nothing held");
        write_through.push(1, message(Qos::AtLeastOnce), now, Stamp::default(), ());
        assert!(write_through.commit_due(now));
    }

    #[test]
    fn reads_continue_after_the_cursor_in_id_order_within_their_budget() {
        let now = Instant::now();
        let mut pending = WriteBehind::new(WINDOW);
        for id in [3, 4, 7, 9] {
            pending.push(id, message(Qos::AtLeastOnce), now, Stamp::default(), ());
        }
        let mut read = |after, limit, max_bytes, bytes| {
            let mut out = Vec::new();
            pending.read_after(
                Priority::Normal,
                after,
                limit,
                max_bytes,
                &never,
                &mut { bytes },
                &mut out,
            );
            ids(&out)
        };
        assert_eq!(read(0, 10, usize::MAX, 0), [3, 4, 7, 9]);
        assert_eq!(read(4, 10, usize::MAX, 0), [7, 9]);
        assert_eq!(read(0, 2, usize::MAX, 0), [3, 4]);
        // 5-byte payloads: a budget of 10 takes two; one already over it still takes one.
        assert_eq!(read(0, 10, 10, 0), [3, 4]);
        assert_eq!(read(0, 10, 1, 0), [3]);
        assert_eq!(read(9, 10, usize::MAX, 0), Vec::<i64>::new());
    }
}
