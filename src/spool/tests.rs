use super::*;
use crate::message::{Options, PayloadKind, Priority, Qos};
use crate::state_file::with_suffix;
use rusqlite::Connection;
use salvage::SALVAGE_DONE_SUFFIX;
use store::SPOOL_PAGE_SIZE;

fn settings(max_bytes: u64, on_full: OnFull, commit_window: Duration) -> Settings {
    Settings {
        max_bytes,
        on_full,
        commit_window,
        max_age: Duration::ZERO,
    }
}

/// Writes `rows` straight into the database, in one transaction.
fn commit_rows(store: &mut Store, rows: &[StoredMessage]) {
    let commit = store.begin().expect("begin");
    let mut inserter = commit.inserter().expect("inserter");
    for row in rows {
        inserter.insert(row, None).expect("insert");
    }
    drop(inserter);
    commit.commit().expect("commit");
}

fn message(topic: &str, payload: &[u8]) -> Message {
    Message {
        topic: topic.into(),
        payload: payload.to_vec(),
        qos: Qos::AtLeastOnce,
        kind: PayloadKind::Json,
        options: Default::default(),
    }
}

fn stored(id: i64, payload: &str) -> StoredMessage {
    StoredMessage {
        id,
        message: message("t", payload.as_bytes()),
    }
}

async fn read_ids(spool: &Spool) -> Vec<i64> {
    read_all(spool).await.iter().map(|m| m.id).collect()
}

async fn read_all(spool: &Spool) -> Vec<StoredMessage> {
    spool
        .read_after(Cursors::default(), 1_000_000, usize::MAX)
        .await
        .expect("read")
        .messages
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

/// A window long enough that nothing in these tests reaches it by accident.
const LONG_WINDOW: Duration = Duration::from_secs(30);

/// One figure of the spool file, read past the spool (its own connection, committed data
/// only).
fn on_disk(dir: &Path, sql: &str) -> i64 {
    Connection::open(dir.join(SPOOL_FILE))
        .and_then(|db| db.query_row(sql, [], |row| row.get(0)))
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Rows really on disk.
fn rows_on_disk(dir: &Path) -> i64 {
    on_disk(dir, "SELECT COUNT(*) FROM messages")
}

/// A read queued behind a flood of appends is answered before their commits (the
/// publisher must not wait for fsyncs, see "Quota run" in docs/benchmarks.md), yet it sees
/// every message sent before it, and each of them is then committed and answered.
#[tokio::test]
async fn a_read_behind_a_flood_sees_everything_sent_before_it() {
    const SENT: usize = 6000;
    for window in [Duration::ZERO, LONG_WINDOW] {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open_with(dir.path(), settings(64 << 20, OnFull::DropOldest, window))
            .expect("open");
        let mut answers = Vec::new();
        for i in 0..SENT {
            let payload = i.to_string();
            answers.push(
                spool
                    .submit(message("t", payload.as_bytes()))
                    .await
                    .expect("queued"),
            );
        }
        let read = read_all(&spool).await;
        assert_eq!(read.len(), SENT, "window {window:?}");
        assert!(
            read.iter()
                .enumerate()
                .all(|(i, m)| m.message.payload == i.to_string().into_bytes()),
            "in the order sent"
        );
        spool.flush().await;
        for answer in answers {
            assert_eq!(answer.await, Ok(Ok(())));
        }
        assert_eq!(rows_on_disk(dir.path()), SENT as i64);
    }
}

/// With a zero window every message is committed before the publisher
/// can read it, also when a read is queued behind a flood of appends.
#[tokio::test]
async fn a_zero_window_commits_before_anything_is_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open_with(
        dir.path(),
        settings(64 << 20, OnFull::DropOldest, Duration::ZERO),
    )
    .expect("open");
    let mut answers = Vec::new();
    for i in 0..3000 {
        let payload = i.to_string();
        answers.push(
            spool
                .submit(message("t", payload.as_bytes()))
                .await
                .expect("queued"),
        );
    }
    let read = read_all(&spool).await;
    let committed = rows_on_disk(dir.path());
    assert!(!read.is_empty());
    assert!(
        read.len() as i64 <= committed,
        "{} read, {committed} committed",
        read.len()
    );
    spool.flush().await;
    assert_eq!(read_all(&spool).await.len(), 3000);
}

/// A message the broker acknowledges within the window is read from memory,
/// answered `ok` at the acknowledgement and never written.
#[tokio::test]
async fn write_behind_answers_at_the_ack_and_never_writes_an_acked_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open_with(
        dir.path(),
        settings(1 << 20, OnFull::DropOldest, LONG_WINDOW),
    )
    .expect("open");
    let mut answer = spool.submit(message("t", b"1")).await.expect("queued");
    let read = read_all(&spool).await;
    assert_eq!(read.len(), 1, "handed to the publisher at once");
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut answer)
            .await
            .is_err(),
        "no ok before it is durable or acknowledged"
    );
    spool.remove(vec![read[0].id]);
    let answered = tokio::time::timeout(Duration::from_secs(5), answer).await;
    assert_eq!(answered.expect("answered at the ack"), Ok(Ok(())));
    spool.flush().await;
    assert_eq!(rows_on_disk(dir.path()), 0, "never written");
    assert_eq!(spool.stats().borrow().messages, 0);
    assert!(read_all(&spool).await.is_empty());
}

/// What is not acknowledged when the window ends is committed, all of it in one
/// go, and only then answered `ok`; reads go on in id order from disk into memory.
#[tokio::test]
async fn write_behind_commits_what_the_window_left_and_keeps_the_order() {
    const WINDOW: Duration = Duration::from_millis(300);
    let dir = tempfile::tempdir().expect("tempdir");
    let spool =
        Spool::open_with(dir.path(), settings(1 << 20, OnFull::DropOldest, WINDOW)).expect("open");
    let started = std::time::Instant::now();
    let first = spool.submit(message("t", b"1")).await.expect("queued");
    let second = spool.submit(message("t", b"2")).await.expect("queued");
    // Read (sent) at once, never acknowledged.
    assert_eq!(read_all(&spool).await.len(), 2);
    assert_eq!(first.await, Ok(Ok(())));
    assert_eq!(second.await, Ok(Ok(())));
    assert!(started.elapsed() >= WINDOW, "{:?}", started.elapsed());
    assert_eq!(rows_on_disk(dir.path()), 2, "committed");
    // Held again, behind the committed ones; one committed row is acknowledged (its
    // deletion waits to be batched): reads skip it and go on into memory in order.
    let third = spool.submit(message("t", b"3")).await.expect("queued");
    spool.remove(vec![1]);
    let ids: Vec<i64> = read_all(&spool).await.iter().map(|m| m.id).collect();
    assert_eq!(ids, [2, 3]);
    assert_eq!(
        spool
            .read_after(Cursors { high: 0, normal: 2 }, 10, usize::MAX)
            .await
            .expect("read")
            .messages
            .len(),
        1
    );
    assert_eq!(spool.stats().borrow().messages, 2);
    assert_eq!(third.await, Ok(Ok(())));
    spool.flush().await;
    assert_eq!(
        rows_on_disk(dir.path()),
        2,
        "row 1 deleted, row 3 committed"
    );
}

/// QoS 0 has no PUBACK: going out is not an acknowledgement, its `ok` still
/// waits for the commit (and it is not sent twice).
#[tokio::test]
async fn write_behind_qos0_is_answered_only_once_committed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open_with(
        dir.path(),
        settings(1 << 20, OnFull::DropOldest, LONG_WINDOW),
    )
    .expect("open");
    let mut m = message("t", b"0");
    m.qos = Qos::AtMostOnce;
    let mut answer = spool.submit(m).await.expect("queued");
    let id = read_all(&spool).await[0].id;
    spool.remove(vec![id]);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut answer)
            .await
            .is_err()
    );
    assert!(read_all(&spool).await.is_empty(), "not sent again");
    assert_eq!(spool.stats().borrow().messages, 0, "delivered");
    spool.flush().await;
    assert_eq!(answer.await, Ok(Ok(())));
}

/// With `reject-new`, a message that cannot fit is refused when it arrives, not
/// after it went out from memory.
#[tokio::test]
async fn write_behind_reject_new_refuses_before_holding() {
    const LIMIT: u64 = 256 * 1024;
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open_with(dir.path(), settings(LIMIT, OnFull::RejectNew, LONG_WINDOW))
        .expect("open");
    // More than the limit holds; every answer is awaited (accepted ones are committed
    // after READ_GRACE, nothing reads them here), so a slow machine cannot blur the count.
    let mut answers = Vec::new();
    for _ in 0..300 {
        answers.push(
            spool
                .submit(message("t", &[0; 1000]))
                .await
                .expect("queued"),
        );
    }
    let mut outcomes = Vec::new();
    for answer in answers {
        let outcome = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("answered")
            .expect("answer sent");
        outcomes.push(outcome);
    }
    let accepted = outcomes
        .iter()
        .take_while(|outcome| outcome.is_ok())
        .count();
    assert!(
        accepted > 0 && accepted < outcomes.len(),
        "{accepted} accepted"
    );
    assert!(
        outcomes[accepted..]
            .iter()
            .all(|outcome| *outcome == Err(AppendError::Full(LIMIT))),
        "once full, every later one is refused as full"
    );
    assert_eq!(
        read_all(&spool).await.len(),
        accepted,
        "the refused ones are not read"
    );
}

/// Drop-oldest makes room only with rows older than the commit: a row of the same commit
/// was answered `ok` (or is about to be), so it is never what gets dropped; what does not
/// fit is answered `spool_full` instead.
#[tokio::test]
async fn drop_oldest_never_drops_rows_of_the_commit_that_makes_room() {
    const LIMIT: u64 = 256 * 1024;
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open_with(dir.path(), settings(LIMIT, OnFull::DropOldest, LONG_WINDOW))
        .expect("open");
    // One commit's worth (`behind::MAX_UNREAD` held messages are committed together),
    // more than the limit holds.
    let mut answers = Vec::new();
    for n in 0..behind::MAX_UNREAD as u32 {
        let mut payload = vec![0; 1024];
        payload[..4].copy_from_slice(&n.to_be_bytes());
        answers.push(spool.submit(message("t", &payload)).await.expect("queued"));
    }
    let mut accepted = Vec::new();
    for (n, answer) in answers.into_iter().enumerate() {
        let outcome = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("answered")
            .expect("answer sent");
        if outcome.is_ok() {
            accepted.push(n as u32);
        } else {
            assert_eq!(outcome, Err(AppendError::Full(LIMIT)));
        }
    }
    let kept: Vec<u32> = read_all(&spool)
        .await
        .iter()
        .map(|m| u32::from_be_bytes(m.message.payload[..4].try_into().expect("n")))
        .collect();
    let lost: Vec<&u32> = accepted.iter().filter(|n| !kept.contains(n)).collect();
    assert!(
        lost.is_empty(),
        "answered ok, then dropped: {lost:?} ({} accepted, {} kept)",
        accepted.len(),
        kept.len()
    );
    assert!(
        accepted.len() < 300,
        "more than the limit holds was refused"
    );
}

fn page_size(dir: &Path) -> i64 {
    on_disk(dir, "PRAGMA page_size")
}

/// Small pages for new spools and for old ones whose queue is empty (a commit
/// then writes less); an old spool with messages keeps its pages, and its ids go on.
#[tokio::test]
async fn spools_take_small_pages_when_it_costs_nothing() {
    let fresh = tempfile::tempdir().expect("tempdir");
    drop(Spool::open(fresh.path(), 1 << 20, OnFull::DropOldest).expect("open"));
    assert_eq!(page_size(fresh.path()), SPOOL_PAGE_SIZE);

    let old = |rows: &str| {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Connection::open(dir.path().join(SPOOL_FILE)).expect("old spool");
        db.pragma_update(None, "journal_mode", "WAL").expect("wal");
        db.execute_batch(&format!(
            "CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
                 payload BLOB NOT NULL, qos INTEGER NOT NULL, size INTEGER NOT NULL);
             {rows}"
        ))
        .expect("old rows");
        assert_eq!(page_size(dir.path()), 4096);
        dir
    };
    let emptied = old(
        "INSERT INTO messages (topic, payload, qos, size) VALUES ('t', X'31', 1, 2);
         DELETE FROM messages;",
    );
    let spool = Spool::open(emptied.path(), 1 << 20, OnFull::DropOldest).expect("open");
    spool.append(message("t", b"2")).await.expect("append");
    assert_eq!(
        read_all(&spool).await[0].id,
        2,
        "ids go on after the old sequence"
    );
    assert_eq!(page_size(emptied.path()), SPOOL_PAGE_SIZE);

    let busy = old("INSERT INTO messages (topic, payload, qos, size) VALUES ('t', X'31', 1, 2);");
    let spool = Spool::open(busy.path(), 1 << 20, OnFull::DropOldest).expect("open");
    assert_eq!(read_all(&spool).await.len(), 1);
    assert_eq!(page_size(busy.path()), 4096);
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
    let len = |read: Result<ReadBatch, ReadError>| read.expect("read").messages.len();
    assert_eq!(len(spool.read_after(Cursors::default(), 100, 8).await), 2);
    assert_eq!(len(spool.read_after(Cursors::default(), 100, 9).await), 3);
    assert_eq!(len(spool.read_after(Cursors::default(), 100, 1).await), 1);
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
    spool.remove(stored.iter().take(4).map(|m| m.id).collect());
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
    // The counters after a read: a trim may follow the last commit (over the limit),
    // and the read comes after it.
    let kept = read_all(&drop_oldest).await;
    let stats = *drop_oldest.stats().borrow();
    assert!(stats.messages < 260, "{stats:?}");
    assert_eq!(stats.messages + stats.dropped_total, 1000);
    assert_eq!(kept.len() as u64, stats.messages);
    assert_eq!(
        kept.last().expect("kept").message.payload[..4],
        999u32.to_be_bytes()
    );
}

/// `max_bytes` bounds the files on disk (pages and WAL), not topic + payload.
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

#[test]
fn acknowledged_ids_are_deleted_by_runs() {
    assert_eq!(store::runs(&[]), vec![]);
    assert_eq!(store::runs(&[7, 1, 2, 3, 8, 2]), vec![(1, 3), (7, 8)]);
    assert_eq!(store::runs(&[5, 9]), vec![(5, 5), (9, 9)]);
}

/// After a backlog drains, idle time gives the pages back: the files shrink.
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
        spool.remove(chunk.iter().map(|m| m.id).collect());
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

/// A lower `max_bytes` on a full spool is reached in bounded steps; the spool
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
    spool
        .set_limits(settings(1 << 20, OnFull::DropOldest, Duration::ZERO))
        .await;
    let mut slowest = std::time::Duration::ZERO;
    let mut steps = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let asked = std::time::Instant::now();
        spool
            .read_after(
                Cursors {
                    high: i64::MAX,
                    normal: i64::MAX,
                },
                1,
                1,
            )
            .await
            .expect("probe");
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

/// The kind a payload arrived as survives the spool; rows from an older spool
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

/// Acknowledged rows that live only in the WAL (the daemon was killed before a
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
        let mut store = Store::open(&path).expect("store").0;
        commit_rows(&mut store, &[stored(1, "1")]);
    }
    assert!(
        !with_suffix(&path, "-wal").exists(),
        "the WAL was checkpointed and removed on close"
    );
    let mut store = Store::open(&path).expect("store").0;
    commit_rows(&mut store, &[stored(2, "2"), stored(3, "3")]);
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

/// A salvage that an earlier start did not finish (the moved-aside file
/// has no `.done` marker) is finished by the next start: what that run stored is not
/// stored again, and a newer message that took one of the old ids keeps it (the old row
/// gets a new id). Finished, it is never read again.
#[tokio::test]
async fn an_unfinished_salvage_is_finished_at_the_next_start_and_nothing_comes_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let aside = dir.path().join(format!("{SPOOL_FILE}.corrupt-1"));
    {
        let mut old = Store::open(&aside).expect("old spool").0;
        let rows: Vec<_> = (1..=5).map(|n| stored(n, &n.to_string())).collect();
        commit_rows(&mut old, &rows);
    }
    {
        // Where the interrupted run stopped: rows 1 and 2 salvaged, then a new message
        // was accepted as id 3.
        let mut fresh = Store::open(&dir.path().join(SPOOL_FILE)).expect("new").0;
        commit_rows(
            &mut fresh,
            &[stored(1, "1"), stored(2, "2"), stored(3, "new")],
        );
    }
    let spool = Spool::open(dir.path(), 1 << 20, OnFull::DropOldest).expect("open");
    let read: Vec<(i64, Vec<u8>)> = read_all(&spool)
        .await
        .into_iter()
        .map(|m| (m.id, m.message.payload))
        .collect();
    let expected: Vec<(i64, Vec<u8>)> =
        [(1, "1"), (2, "2"), (3, "new"), (4, "4"), (5, "5"), (6, "3")]
            .into_iter()
            .map(|(id, p)| (id, p.as_bytes().to_vec()))
            .collect();
    assert_eq!(read, expected);
    assert!(with_suffix(&aside, SALVAGE_DONE_SUFFIX).exists());
    drop(spool);
    std::thread::sleep(Duration::from_millis(100));
    let spool = Spool::open(dir.path(), 1 << 20, OnFull::DropOldest).expect("reopen");
    assert_eq!(
        read_all(&spool).await.len(),
        6,
        "a finished salvage is not read again"
    );
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

/// Dead letters are bounded by bytes too (an eighth of
/// `max_bytes`), the oldest go first and are counted; the newest stays.
#[tokio::test]
async fn dead_letters_are_bounded_by_bytes_and_the_oldest_go_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open(dir.path(), 1 << 20, OnFull::DropOldest).expect("open");
    let big = vec![b'x'; 30_000];
    for _ in 0..10 {
        spool.append(message("t", &big)).await.expect("append");
    }
    let ids: Vec<i64> = read_all(&spool).await.iter().map(|m| m.id).collect();
    for id in &ids {
        spool.bury(vec![*id], "refused".into()).await;
    }
    let stats = *spool.stats().borrow();
    // 128 KiB hold four of 30 KB.
    assert_eq!(
        (
            stats.dead_letters,
            stats.dead_letter_total,
            stats.dropped_total
        ),
        (4, 10, 6)
    );
    let Ok(DeadLetterReply::Listed(listed)) = spool.dead_letters(DeadLetterAction::List).await
    else {
        panic!("list")
    };
    let kept: Vec<i64> = listed.iter().map(|d| d.id).collect();
    assert_eq!(kept.len(), 4);
    assert!(kept.windows(2).all(|w| w[0] < w[1]), "{kept:?}");

    // One larger than the whole bound still stays: it is the newest.
    drop(spool);
    let spool = Spool::open(dir.path(), 64 << 10, OnFull::DropOldest).expect("reopen");
    let stats = *spool.stats().borrow();
    assert_eq!(
        stats.dead_letters, 1,
        "reopened with a lower max_bytes: bounded at once"
    );
}

/// Listing and purging dead letters commit nothing (no fsync per call).
#[tokio::test]
async fn listing_dead_letters_does_not_commit_held_messages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open_with(
        dir.path(),
        settings(1 << 20, OnFull::DropOldest, LONG_WINDOW),
    )
    .expect("open");
    let _answer = spool.submit(message("t", b"held")).await.expect("queued");
    assert_eq!(read_all(&spool).await.len(), 1);
    for action in [DeadLetterAction::List, DeadLetterAction::Purge] {
        assert!(spool.dead_letters(action).await.is_ok());
    }
    assert_eq!(rows_on_disk(dir.path()), 0, "still held in memory");
    assert_eq!(
        spool.dead_letters(DeadLetterAction::Requeue).await,
        Ok(DeadLetterReply::Requeued(0))
    );
    assert_eq!(rows_on_disk(dir.path()), 1, "a requeue settles first");
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
    let ids = read_ids(&spool).await;
    spool.bury(vec![ids[0]], "refused".into()).await;
    spool.bury(vec![ids[2]], "refused again".into()).await;
    let rest = spool
        .read_after(Cursors::default(), 10, usize::MAX)
        .await
        .expect("read")
        .messages;
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
        .read_after(Cursors::default(), 10, usize::MAX)
        .await
        .expect("read")
        .messages
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

    let ids = read_ids(&spool).await;
    spool.bury(ids[1..].to_vec(), "refused".into()).await;
    assert_eq!(
        spool.dead_letters(DeadLetterAction::Purge).await,
        Ok(DeadLetterReply::Purged(2))
    );
    let stats = *spool.stats().borrow();
    assert_eq!((stats.messages, stats.dead_letters), (1, 0));
}

fn with_options(topic: &str, payload: &str, options: Options) -> Message {
    Message {
        options,
        ..message(topic, payload.as_bytes())
    }
}

fn high(payload: &str) -> Message {
    with_options(
        "t",
        payload,
        Options {
            priority: Priority::High,
            ..Options::default()
        },
    )
}

fn conflating(topic: &str, payload: &str) -> Message {
    with_options(
        topic,
        payload,
        Options {
            conflate: true,
            ..Options::default()
        },
    )
}

fn payloads(read: &[StoredMessage]) -> Vec<String> {
    read.iter()
        .map(|m| String::from_utf8_lossy(&m.message.payload).into_owned())
        .collect()
}

/// High-priority messages come before every normal one, each priority in order, from disk and
/// from memory alike; a read full of high ones still brings one normal one, and the cursors
/// continue each priority where it was.
#[tokio::test]
async fn high_priority_messages_are_read_first_and_a_full_read_brings_one_normal() {
    let dir = tempfile::tempdir().expect("tempdir");
    for window in [Duration::ZERO, LONG_WINDOW] {
        let dir = dir.path().join(format!("{}", window.as_secs()));
        std::fs::create_dir(&dir).expect("dir");
        let spool =
            Spool::open_with(&dir, settings(1 << 20, OnFull::DropOldest, window)).expect("open");
        // With a window the messages are read from memory (or, past the read grace, from
        // disk): the order is the same.
        for message in [
            message("t", b"n1"),
            message("t", b"n2"),
            high("h1"),
            message("t", b"n3"),
            high("h2"),
            high("h3"),
        ] {
            let answer = spool.submit(message).await.expect("submit");
            if window.is_zero() {
                answer.await.expect("answer").expect("ok");
            }
        }
        let all = spool
            .read_after(Cursors::default(), 100, usize::MAX)
            .await
            .expect("read");
        assert_eq!(
            payloads(&all.messages),
            ["h1", "h2", "h3", "n1", "n2", "n3"]
        );
        assert!(!all.more);
        let two = spool
            .read_after(Cursors::default(), 2, usize::MAX)
            .await
            .expect("read");
        assert_eq!(payloads(&two.messages), ["h1", "h2", "n1"], "{window:?}");
        assert!(two.more);
        let cursors = Cursors {
            high: two.messages[1].id,
            normal: two.messages[2].id,
        };
        let rest = spool
            .read_after(cursors, 100, usize::MAX)
            .await
            .expect("read");
        assert_eq!(payloads(&rest.messages), ["h3", "n2", "n3"], "{window:?}");
    }
}

/// A spool whose clock was saved `ago_ms` after one `ttl`-carrying and one plain message were
/// accepted (as if the daemon had run that long), reopened with `max_age`.
fn aged_spool(dir: &Path, ago_ms: u64, max_age: Duration) -> Spool {
    {
        let (mut store, _) = Store::open(&dir.join(SPOOL_FILE)).expect("store");
        let mut short = stored(1, "short-lived");
        short.message.options.ttl = Some(2);
        let plain = stored(2, "plain");
        let wall = 1_700_000_000;
        let commit = store.begin().expect("begin");
        let mut inserter = commit.inserter().expect("inserter");
        inserter.insert(&short, Some((wall, 0))).expect("insert");
        inserter.insert(&plain, Some((wall, 0))).expect("insert");
        drop(inserter);
        // Saved with a wall clock in the future: the downtime counts as nothing.
        commit.save_clock(ago_ms, u64::MAX / 2).expect("clock");
        commit.commit().expect("commit");
    }
    Spool::open_with(
        dir,
        Settings {
            max_age,
            ..settings(1 << 20, OnFull::DropOldest, Duration::ZERO)
        },
    )
    .expect("open")
}

/// A message past its `ttl` (or, without one, `spool.max_age`) is never read: it is counted
/// in `expired_total` and deleted. Age counts across restarts by the saved spool clock.
#[tokio::test]
async fn expired_messages_are_never_read_and_are_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let young = dir.path().join("young");
    std::fs::create_dir(&young).expect("dir");
    let spool = aged_spool(&young, 1000, Duration::ZERO);
    assert_eq!(payloads(&read_all(&spool).await), ["short-lived", "plain"]);
    assert_eq!(spool.stats().borrow().expired_total, 0);

    let old = dir.path().join("old");
    std::fs::create_dir(&old).expect("dir");
    let spool = aged_spool(&old, 3000, Duration::ZERO);
    assert_eq!(payloads(&read_all(&spool).await), ["plain"]);
    let stats = wait_stats(&spool, |s| s.expired_total == 1).await;
    assert_eq!(stats.messages, 1);
    spool.flush().await;
    assert_eq!(rows_on_disk(&old), 1, "the expired row was deleted");

    let max_age = dir.path().join("max_age");
    std::fs::create_dir(&max_age).expect("dir");
    let spool = aged_spool(&max_age, 3000, Duration::from_secs(2));
    assert_eq!(
        read_all(&spool).await.len(),
        0,
        "max_age covers the plain one"
    );
    wait_stats(&spool, |s| s.expired_total == 2 && s.messages == 0).await;
}

/// A conflating message replaces the waiting conflating ones on its topic (held or on disk)
/// that no read handed out; others (another topic, not conflating, already read) stay. Their
/// writers were answered `ok`. After a restart only the newest per topic is left.
#[tokio::test]
async fn only_the_newest_waiting_conflating_message_per_topic_stays() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let spool = Spool::open_with(
            dir.path(),
            settings(1 << 20, OnFull::DropOldest, LONG_WINDOW),
        )
        .expect("open");
        spool.append(conflating("a", "a1")).await.expect("ok");
        spool.append(conflating("a", "a2")).await.expect("ok");
        spool.append(message("a", b"plain")).await.expect("ok");
        spool.append(conflating("b", "b1")).await.expect("ok");
        // Read: handed out, so it may be in flight and is not touched.
        let read = read_all(&spool).await;
        assert_eq!(payloads(&read), ["a2", "plain", "b1"]);
        spool.append(conflating("a", "a3")).await.expect("ok");
        spool.append(conflating("b", "b2")).await.expect("ok");
        spool.append(conflating("b", "b3")).await.expect("ok");
        let stats = *spool.stats().borrow();
        assert_eq!((stats.conflated_total, stats.messages), (2, 5));
        assert_eq!(
            payloads(&read_all(&spool).await),
            ["a2", "plain", "b1", "a3", "b3"]
        );
        spool.flush().await;
    }
    std::thread::sleep(Duration::from_millis(100));
    let spool = Spool::open(dir.path(), 1 << 20, OnFull::DropOldest).expect("reopen");
    assert_eq!(payloads(&read_all(&spool).await), ["plain", "a3", "b3"]);
    let stats = *spool.stats().borrow();
    assert_eq!((stats.conflated_total, stats.messages), (2, 3));
}
