//! What the spool thread decides besides write-behind (`behind.rs`): how much of `max_bytes`
//! the WAL and the dead letters may take, whether a message fits, what to give up on a full
//! disk, when idle housekeeping runs and what it does, when acknowledged rows are deleted, and
//! which storage fault stands.
//!
//! Pure: figures and time come in as arguments, choices go out as values; `serve.rs` carries
//! them out against the `Store`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::config::OnFull;

use super::{Operation, StorageFault};

/// Bytes a row costs beyond its topic and payload (an estimate; commits measure pages).
pub(super) const ROW_OVERHEAD: u64 = 32;
/// The WAL may take this share of `max_bytes` (1/8) …
const WAL_SHARE: u64 = 8;
/// … but at least this many pages, and at most `WAL_MAX_BYTES`.
const WAL_MIN_PAGES: u64 = 4;
const WAL_MAX_BYTES: u64 = 4000 * 1024;
/// The dead letters may take this share of `max_bytes` (1/8).
const DEAD_LETTER_SHARE: u64 = 8;
/// The disk reserve holds this many WALs' worth: room for the checkpoint and the deletions that
/// free space on a full disk.
const RESERVE_WALS: u64 = 2;
/// One trim step (over `max_bytes` with `drop-oldest`) drops at most this many rows or bytes,
/// so reads, removals and the watchdog probe never wait long behind it.
pub(super) const TRIM_CHUNK_ROWS: usize = 1000;
const TRIM_CHUNK_BYTES: u64 = 4 * 1024 * 1024;
/// On a full disk with `drop-oldest`, this many rounds of dropping (each twice the room of the
/// last) before a commit is refused.
const DISK_FULL_RETRIES: u32 = 4;
/// Housekeeping waits for this long without a message or a commit.
const MAINTAIN_WHEN_QUIET: Duration = Duration::from_secs(2);
/// Pages one vacuum step gives back.
pub(super) const VACUUM_CHUNK_PAGES: u64 = 256;
/// Free pages worth a vacuum while messages wait (an empty spool gives back every page).
const VACUUM_MIN_FREE_PAGES: u64 = 256;
/// Acknowledged rows are deleted together: this many, …
const REMOVE_BATCH: usize = 1024;
/// … or this long after the first of them, whichever comes first.
const REMOVE_DELAY: Duration = Duration::from_secs(1);

/// The size bound and what to do at it, with the page size the figures are counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Limits {
    pub(super) max_bytes: u64,
    pub(super) on_full: OnFull,
    pub(super) page_size: u64,
}

/// Whether a message fits in a commit under way.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Room {
    Fits,
    /// `reject-new`: it does not fit and is refused.
    Refuse,
    /// `drop-oldest`: older rows must go first.
    DropOlder,
}

/// One bounded trim: drop the oldest until `bytes` are freed or `rows` went.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Trim {
    pub(super) bytes: u64,
    pub(super) rows: usize,
}

impl Limits {
    /// The WAL's share of `max_bytes`, in pages (`wal_autocheckpoint`).
    pub(super) fn wal_pages(&self) -> u64 {
        (self.max_bytes / WAL_SHARE / self.page_size)
            .clamp(WAL_MIN_PAGES, WAL_MAX_BYTES / self.page_size)
    }

    /// Bytes kept for the WAL when deciding whether a message fits.
    pub(super) fn wal_reserve(&self) -> u64 {
        self.wal_pages() * self.page_size
    }

    /// The size of the disk reserve file.
    pub(super) fn disk_reserve(&self) -> u64 {
        self.wal_reserve() * RESERVE_WALS
    }

    /// The dead letters' byte bound.
    pub(super) fn dead_letter_bytes(&self) -> u64 {
        self.max_bytes / DEAD_LETTER_SHARE
    }

    /// How far over `max_bytes` pages in use plus the WAL's reserve are.
    pub(super) fn excess(&self, live_bytes: u64) -> u64 {
        (live_bytes + self.wal_reserve()).saturating_sub(self.max_bytes)
    }

    /// The trim step due with `live_bytes` in use and `messages` waiting, if any. Only with
    /// `drop-oldest`, and the newest message stays: it was just accepted.
    pub(super) fn trim(&self, live_bytes: u64, messages: u64) -> Option<Trim> {
        let excess = self.excess(live_bytes);
        (excess > 0 && self.on_full == OnFull::DropOldest && messages > 1).then(|| Trim {
            bytes: excess.min(TRIM_CHUNK_BYTES),
            rows: TRIM_CHUNK_ROWS.min(usize::try_from(messages - 1).unwrap_or(usize::MAX)),
        })
    }

    /// With `reject-new`, whether a message of `size` topic + payload bytes can be held: what
    /// is on disk, the WAL's reserve, what is held and it must fit (an estimate; the commit
    /// measures again).
    pub(super) fn fits_held(&self, live_bytes: u64, held: (u64, usize), size: u64) -> bool {
        let (held_bytes, held_count) = held;
        let held = held_bytes + held_count as u64 * ROW_OVERHEAD;
        live_bytes + self.wal_reserve() + held + size + ROW_OVERHEAD <= self.max_bytes
    }

    /// Whether a row of `size` topic + payload bytes fits in a commit that has `used` bytes
    /// (pages in use plus the WAL's reserve) so far.
    pub(super) fn room(&self, used: u64, size: u64) -> Room {
        if used + size + ROW_OVERHEAD <= self.max_bytes {
            Room::Fits
        } else if self.on_full == OnFull::RejectNew {
            Room::Refuse
        } else {
            Room::DropOlder
        }
    }
}

/// Deletes the oldest rows until enough bytes are freed or enough rows went.
#[derive(Debug)]
pub(super) struct Freeing {
    want: u64,
    max_rows: usize,
    freed: u64,
    rows: u64,
}

impl Freeing {
    pub(super) fn new(bytes: u64, max_rows: usize) -> Freeing {
        Freeing {
            want: bytes.max(1),
            max_rows,
            freed: 0,
            rows: 0,
        }
    }

    /// Whether one more row should go.
    pub(super) fn more(&self) -> bool {
        self.freed < self.want && usize::try_from(self.rows).is_ok_and(|n| n < self.max_rows)
    }

    /// A row of `size` topic + payload bytes went.
    pub(super) fn dropped(&mut self, size: u64) {
        self.freed += size + ROW_OVERHEAD;
        self.rows += 1;
    }

    pub(super) fn rows(&self) -> u64 {
        self.rows
    }
}

/// The next thing to try when a commit found the disk full.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum DiskFullStep {
    /// Nothing is left to drop: the reserve exists only to let drops happen on a full disk, so
    /// its space takes new messages instead of refusing every one.
    GiveReserve,
    /// Give the reserve's space to a checkpoint and the deletion, drop the oldest to free
    /// `bytes`, then try again.
    DropOldest { bytes: u64 },
    /// Refuse the commit's messages.
    Refuse,
}

/// The rounds of one commit on a full disk.
#[derive(Debug)]
pub(super) struct DiskFull {
    on_full: OnFull,
    room: u64,
    rounds: u32,
    gave_reserve: bool,
}

impl DiskFull {
    /// A commit of `bytes` (rows' topic + payload + overhead) found the disk full.
    pub(super) fn new(on_full: OnFull, bytes: u64) -> DiskFull {
        DiskFull {
            on_full,
            room: bytes,
            rounds: 0,
            gave_reserve: false,
        }
    }

    /// What to try next, with `messages` on disk and the reserve file there or not.
    pub(super) fn next(&mut self, messages: u64, reserve_there: bool) -> DiskFullStep {
        if messages == 0 {
            if reserve_there && !self.gave_reserve {
                self.gave_reserve = true;
                return DiskFullStep::GiveReserve;
            }
            return DiskFullStep::Refuse;
        }
        if self.on_full != OnFull::DropOldest || self.rounds >= DISK_FULL_RETRIES {
            return DiskFullStep::Refuse;
        }
        self.rounds += 1;
        let bytes = self.room;
        self.room = self.room.saturating_mul(2);
        DiskFullStep::DropOldest { bytes }
    }

    /// Whether rows were dropped to make room (the log says "disk full", not "spool full").
    pub(super) fn dropped_for_room(&self) -> bool {
        self.rounds > 0
    }
}

/// What the disk figures look like to housekeeping.
#[derive(Debug, Clone, Copy)]
pub(super) struct DiskFigures {
    pub(super) free_pages: u64,
    pub(super) messages: u64,
    pub(super) incremental_vacuum: bool,
    pub(super) wal_bytes: u64,
    pub(super) wal_reserve: u64,
}

/// One step of idle housekeeping.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Chore {
    /// Give `VACUUM_CHUNK_PAGES` free pages back to the file system.
    Vacuum,
    /// Fold the WAL into the db and truncate both: the files really shrink.
    Checkpoint,
    /// Nothing (more) to do until the next write.
    Done,
}

/// When idle housekeeping runs: once no message came and no write committed for
/// `MAINTAIN_WHEN_QUIET`. Each step waits for an fsync, and a message arriving meanwhile would
/// wait behind it; pages given back while messages flow are only taken again by the next commits.
#[derive(Debug)]
pub(super) struct Housekeeping {
    /// A write happened since housekeeping last found nothing to do.
    dirty: bool,
    last_traffic: Instant,
    /// Pages were given back: a truncating checkpoint makes the files shrink.
    shrunk: bool,
}

impl Housekeeping {
    pub(super) fn new(now: Instant) -> Housekeeping {
        Housekeeping {
            dirty: true,
            last_traffic: now,
            shrunk: false,
        }
    }

    /// A message came.
    pub(super) fn traffic(&mut self, now: Instant) {
        self.last_traffic = now;
    }

    /// A write committed (or rows moved): there may be pages to give back.
    pub(super) fn wrote(&mut self, now: Instant) {
        self.dirty = true;
        self.last_traffic = now;
    }

    /// Rows moved between tables: the on-disk size changes, with no new traffic.
    pub(super) fn touched(&mut self) {
        self.dirty = true;
    }

    /// `None`: nothing to do.
    pub(super) fn due_at(&self) -> Option<Instant> {
        self.dirty
            .then_some(self.last_traffic + MAINTAIN_WHEN_QUIET)
    }

    /// The chore due at `now`, if any (`None` before `due_at`).
    pub(super) fn chore(&self, now: Instant, disk: DiskFigures) -> Option<Chore> {
        if self.due_at().is_none_or(|at| now < at) {
            return None;
        }
        let free = disk.free_pages;
        Some(
            if disk.incremental_vacuum
                && free > 0
                && (free >= VACUUM_MIN_FREE_PAGES || disk.messages == 0)
            {
                Chore::Vacuum
            } else if self.shrunk || disk.wal_bytes > disk.wal_reserve {
                Chore::Checkpoint
            } else {
                Chore::Done
            },
        )
    }

    /// A vacuum step went from `free_before` to `free_after` free pages; `true` if another
    /// step is worth it (no progress: stop rather than spin).
    pub(super) fn vacuumed(&mut self, free_before: u64, free_after: u64) -> bool {
        self.shrunk = true;
        free_after < free_before
    }

    pub(super) fn checkpointed(&mut self) {
        self.shrunk = false;
    }

    /// Nothing more to do until the next write.
    pub(super) fn finished(&mut self) {
        self.dirty = false;
    }
}

/// Acknowledged rows still on disk, deleted together later (`REMOVE_BATCH`, `REMOVE_DELAY`),
/// in the next commit's transaction or, if none comes first, in one of their own.
#[derive(Debug, Default)]
pub(super) struct Removals {
    ids: BTreeSet<i64>,
    since: Option<Instant>,
}

impl Removals {
    pub(super) fn due(&self, now: Instant) -> bool {
        self.ids.len() >= REMOVE_BATCH || self.since.is_some_and(|at| now >= at + REMOVE_DELAY)
    }

    pub(super) fn deadline(&self) -> Option<Instant> {
        self.since.map(|at| at + REMOVE_DELAY)
    }

    /// `true` if `id` was not gathered yet.
    pub(super) fn add(&mut self, id: i64, now: Instant) -> bool {
        self.since.get_or_insert(now);
        self.ids.insert(id)
    }

    pub(super) fn ids(&self) -> &BTreeSet<i64> {
        &self.ids
    }

    pub(super) fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Every gathered id, in order; the gathering starts again.
    pub(super) fn take(&mut self) -> Vec<i64> {
        self.since = None;
        std::mem::take(&mut self.ids).into_iter().collect()
    }
}

/// The spool clock, in milliseconds: the time that counts for `ttl` and `spool.max_age`. While
/// the daemon runs it follows the monotonic clock, so the wall clock jumping (NTP setting a
/// clock that booted at 1970, or at the last shutdown's time) neither ages nor rejuvenates a
/// message. Across a restart it adds the wall-clock time from its last save to the start when
/// the wall clock moved forward, and nothing when it moved back (a clock not set yet): a
/// device without a real-time clock then ages messages only while it runs, never all at once.
#[derive(Debug, Clone, Copy)]
pub(super) struct SpoolClock {
    base_ms: u64,
    started: Instant,
}

/// The spool clock is saved with a commit at most this often (and when the daemon stops).
pub(super) const CLOCK_SAVE_EVERY: Duration = Duration::from_secs(60);

impl SpoolClock {
    /// Goes on from `saved` (the clock and the wall clock then, both in ms), `wall_ms` being the
    /// wall clock now.
    pub(super) fn resume(saved: Option<(u64, u64)>, wall_ms: u64, now: Instant) -> SpoolClock {
        let base_ms = saved.map_or(0, |(clock, wall)| clock + wall_ms.saturating_sub(wall));
        SpoolClock {
            base_ms,
            started: now,
        }
    }

    pub(super) fn at(&self, now: Instant) -> u64 {
        let run = now.saturating_duration_since(self.started).as_millis();
        self.base_ms + u64::try_from(run).unwrap_or(u64::MAX)
    }
}

/// Whether a message accepted at spool clock `accepted_ms`, with its own `ttl` (seconds) or
/// else `max_age` (zero: none), has waited longer than that at `now_ms`.
pub(super) fn expired(accepted_ms: u64, ttl: Option<u32>, max_age: Duration, now_ms: u64) -> bool {
    let limit_ms = match ttl {
        Some(seconds) => u64::from(seconds) * 1000,
        None if max_age.is_zero() => return false,
        None => u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX),
    };
    now_ms.saturating_sub(accepted_ms) > limit_ms
}

/// The fault that stands after `failed`: a failed read never replaces a failed write, since a
/// later good read would clear it and hide the write failure.
pub(super) fn fault_after(current: Option<StorageFault>, failed: StorageFault) -> StorageFault {
    match current {
        Some(write)
            if write.operation == Operation::Write && failed.operation == Operation::Read =>
        {
            write
        }
        _ => failed,
    }
}

/// Whether a good operation of `kind` clears `current`: a commit clears any fault, a read
/// only a failed read.
pub(super) fn clears(current: Option<StorageFault>, kind: Operation) -> bool {
    current.is_some_and(|fault| kind == Operation::Write || fault.operation == Operation::Read)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;

    fn limits(max_bytes: u64, on_full: OnFull) -> Limits {
        Limits {
            max_bytes,
            on_full,
            page_size: KIB,
        }
    }

    #[test]
    fn the_wal_takes_an_eighth_within_its_floor_and_ceiling() {
        assert_eq!(limits(1024 * KIB, OnFull::DropOldest).wal_pages(), 128);
        assert_eq!(
            limits(8 * KIB, OnFull::DropOldest).wal_pages(),
            WAL_MIN_PAGES
        );
        assert_eq!(
            limits(1 << 40, OnFull::DropOldest).wal_reserve(),
            WAL_MAX_BYTES
        );
        let limits = limits(1024 * KIB, OnFull::DropOldest);
        assert_eq!(limits.disk_reserve(), 2 * 128 * KIB);
        assert_eq!(limits.dead_letter_bytes(), 128 * KIB);
    }

    #[test]
    fn drop_oldest_trims_in_bounded_steps_and_keeps_the_newest() {
        let limits = limits(1024 * KIB, OnFull::DropOldest);
        let wal = limits.wal_reserve();
        assert_eq!(
            limits.trim(1024 * KIB - wal, 10),
            None,
            "at the limit: no trim"
        );
        assert_eq!(
            limits.trim(1024 * KIB - wal + 100, 10),
            Some(Trim {
                bytes: 100,
                rows: 9
            })
        );
        assert_eq!(
            limits.trim(100 * 1024 * KIB, 1_000_000),
            Some(Trim {
                bytes: TRIM_CHUNK_BYTES,
                rows: TRIM_CHUNK_ROWS
            }),
            "far over: one bounded chunk at a time"
        );
        assert_eq!(limits.trim(100 * 1024 * KIB, 1), None, "the newest stays");
    }

    #[test]
    fn reject_new_never_trims_and_refuses_what_does_not_fit() {
        let limits = limits(1024 * KIB, OnFull::RejectNew);
        assert_eq!(limits.trim(100 * 1024 * KIB, 1000), None);
        let used = 1024 * KIB - 100;
        assert_eq!(limits.room(used, 100 - ROW_OVERHEAD), Room::Fits);
        assert_eq!(limits.room(used, 101 - ROW_OVERHEAD), Room::Refuse);
    }

    #[test]
    fn drop_oldest_makes_room_for_what_does_not_fit() {
        let limits = limits(1024 * KIB, OnFull::DropOldest);
        assert_eq!(limits.room(0, 1000), Room::Fits);
        assert_eq!(limits.room(1024 * KIB, 1), Room::DropOlder);
    }

    #[test]
    fn what_is_held_counts_towards_the_limit() {
        let limits = limits(1024 * KIB, OnFull::RejectNew);
        let free = 1024 * KIB - limits.wal_reserve();
        assert!(limits.fits_held(0, (0, 0), free - ROW_OVERHEAD));
        assert!(!limits.fits_held(0, (0, 0), free - ROW_OVERHEAD + 1));
        // One held message of 100 bytes takes its size and a row's overhead.
        assert!(!limits.fits_held(0, (100, 1), free - ROW_OVERHEAD - 100));
        assert!(limits.fits_held(0, (100, 1), free - 2 * ROW_OVERHEAD - 100));
    }

    #[test]
    fn freeing_stops_at_its_bytes_or_its_rows() {
        let mut freeing = Freeing::new(100, 10);
        assert!(freeing.more());
        freeing.dropped(50);
        assert!(freeing.more(), "82 of 100 bytes freed");
        freeing.dropped(50);
        assert!(!freeing.more());
        assert_eq!(freeing.rows(), 2);
        let mut freeing = Freeing::new(u64::MAX, 2);
        freeing.dropped(1);
        freeing.dropped(1);
        assert!(!freeing.more(), "two rows at most");
        assert!(
            Freeing::new(0, 1).more(),
            "asked for nothing: one row still goes"
        );
    }

    #[test]
    fn a_full_disk_with_drop_oldest_drops_twice_the_room_each_round_then_refuses() {
        let mut full = DiskFull::new(OnFull::DropOldest, 1000);
        assert!(!full.dropped_for_room());
        let mut rooms = Vec::new();
        while let DiskFullStep::DropOldest { bytes } = full.next(50, true) {
            rooms.push(bytes);
        }
        assert_eq!(rooms, [1000, 2000, 4000, 8000]);
        assert!(full.dropped_for_room());
        assert_eq!(full.next(50, true), DiskFullStep::Refuse);
    }

    #[test]
    fn a_full_disk_with_reject_new_refuses_at_once() {
        let mut full = DiskFull::new(OnFull::RejectNew, 1000);
        assert_eq!(full.next(50, true), DiskFullStep::Refuse);
        assert!(!full.dropped_for_room());
    }

    #[test]
    fn a_full_disk_and_an_empty_spool_give_the_reserve_once() {
        for on_full in [OnFull::RejectNew, OnFull::DropOldest] {
            let mut full = DiskFull::new(on_full, 1000);
            assert_eq!(full.next(0, true), DiskFullStep::GiveReserve);
            assert_eq!(full.next(0, true), DiskFullStep::Refuse);
            let mut no_reserve = DiskFull::new(on_full, 1000);
            assert_eq!(no_reserve.next(0, false), DiskFullStep::Refuse);
        }
    }

    fn disk(free_pages: u64, messages: u64, wal_bytes: u64) -> DiskFigures {
        DiskFigures {
            free_pages,
            messages,
            incremental_vacuum: true,
            wal_bytes,
            wal_reserve: 100 * KIB,
        }
    }

    #[test]
    fn housekeeping_waits_for_quiet_and_a_write() {
        let start = Instant::now();
        let mut house = Housekeeping::new(start);
        let busy = disk(1000, 10, 0);
        assert_eq!(house.chore(start, busy), None, "not quiet yet");
        let quiet = start + MAINTAIN_WHEN_QUIET;
        assert_eq!(house.chore(quiet, busy), Some(Chore::Vacuum));
        house.traffic(quiet);
        assert_eq!(house.chore(quiet, busy), None, "a message came: wait again");
        house.finished();
        assert_eq!(house.due_at(), None);
        assert_eq!(house.chore(quiet + Duration::from_secs(60), busy), None);
        house.wrote(quiet);
        assert_eq!(house.due_at(), Some(quiet + MAINTAIN_WHEN_QUIET));
    }

    #[test]
    fn housekeeping_vacuums_while_it_gains_then_checkpoints_to_shrink_the_files() {
        let start = Instant::now();
        let later = start + MAINTAIN_WHEN_QUIET;
        let mut house = Housekeeping::new(start);
        assert_eq!(
            house.chore(later, disk(VACUUM_MIN_FREE_PAGES - 1, 5, 0)),
            Some(Chore::Done),
            "a few free pages while messages wait are not worth an fsync"
        );
        assert_eq!(
            house.chore(later, disk(3, 0, 0)),
            Some(Chore::Vacuum),
            "an empty spool gives back every page"
        );
        assert!(house.vacuumed(3, 0));
        assert!(!house.vacuumed(3, 3), "no progress: stop");
        assert_eq!(house.chore(later, disk(0, 0, 0)), Some(Chore::Checkpoint));
        house.checkpointed();
        assert_eq!(house.chore(later, disk(0, 0, 0)), Some(Chore::Done));
        assert_eq!(
            house.chore(later, disk(0, 0, 100 * KIB + 1)),
            Some(Chore::Checkpoint),
            "a WAL over its share is cut back"
        );
        let mut plain = disk(1000, 0, 0);
        plain.incremental_vacuum = false;
        assert_eq!(house.chore(later, plain), Some(Chore::Done));
    }

    #[test]
    fn acknowledged_rows_go_by_the_batch_or_after_the_delay() {
        let start = Instant::now();
        let mut removals = Removals::default();
        assert!(!removals.due(start + REMOVE_DELAY * 10), "nothing gathered");
        assert!(removals.add(1, start));
        assert!(!removals.add(1, start), "counted once");
        assert_eq!(removals.deadline(), Some(start + REMOVE_DELAY));
        assert!(!removals.due(start));
        assert!(removals.due(start + REMOVE_DELAY));
        assert_eq!(removals.take(), [1]);
        assert_eq!(removals.deadline(), None);
        for id in 0..REMOVE_BATCH as i64 {
            removals.add(id, start);
        }
        assert!(removals.due(start), "a full batch goes at once");
    }

    #[test]
    fn the_spool_clock_counts_downtime_only_when_the_wall_clock_moved_forward() {
        let now = Instant::now();
        let fresh = SpoolClock::resume(None, 5_000_000, now);
        assert_eq!(fresh.at(now), 0);
        assert_eq!(fresh.at(now + Duration::from_secs(2)), 2000);
        // Saved at clock 10 s, wall 1000 s; started again at wall 1100 s: 100 s were down.
        let resumed = SpoolClock::resume(Some((10_000, 1_000_000)), 1_100_000, now);
        assert_eq!(resumed.at(now), 110_000);
        // A wall clock not set yet (behind the save): the downtime counts as nothing.
        let unset = SpoolClock::resume(Some((10_000, 1_000_000)), 0, now);
        assert_eq!(unset.at(now + Duration::from_secs(1)), 11_000);
    }

    #[test]
    fn a_message_expires_after_its_ttl_or_else_max_age() {
        let none = Duration::ZERO;
        assert!(
            !expired(0, Some(2), none, 2000),
            "exactly its ttl: not longer"
        );
        assert!(expired(0, Some(2), none, 2001));
        assert!(
            !expired(0, None, none, u64::MAX),
            "no ttl, no max_age: never"
        );
        let day = Duration::from_secs(86_400);
        assert!(!expired(0, None, day, 86_400_000));
        assert!(expired(0, None, day, 86_400_001));
        assert!(
            !expired(0, Some(172_800), day, 86_400_001),
            "its own ttl wins"
        );
        assert!(
            !expired(5000, Some(1), none, 0),
            "a clock behind its acceptance"
        );
    }

    #[test]
    fn a_failed_write_stands_until_a_commit_not_a_read() {
        let write = StorageFault {
            operation: Operation::Write,
            code: 10,
        };
        let read = StorageFault {
            operation: Operation::Read,
            code: 11,
        };
        assert_eq!(fault_after(None, read), read);
        assert_eq!(fault_after(Some(write), read), write);
        assert_eq!(fault_after(Some(read), write), write);
        assert!(!clears(Some(write), Operation::Read));
        assert!(clears(Some(write), Operation::Write));
        assert!(clears(Some(read), Operation::Read));
        assert!(!clears(None, Operation::Write));
    }
}
