//! The local interface: a Unix stream socket where apps write one JSON line per message.
//!
//! Each client gets a reader (parse, validate, hand to the spool) and a writer for answers.
//! Answers go through a small queue that drops when full, so a client that never reads its
//! answers loses them and slows nothing else. The spool's bounded queue is the backpressure:
//! when it is behind, the readers stop reading.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::SocketConfig;
use crate::downlink::hub::Subscription;
use crate::downlink::{AckError, Downlink};
use crate::heartbeat::Heartbeat;
use crate::ingest::protocol::{ErrorCode, MAX_LINE_BYTES, Rejection, Request, ok_line, parse_line};
use crate::ingest::records::{Next, RecordReader};
use crate::repeats::Repeats;
use crate::spool::{AppendError, DeadLetterAction, DeadLetterReply, Spool};
use crate::topic::TopicRules;

/// Answers waiting for a slow client before newer ones are dropped.
const ANSWER_QUEUE: usize = 1024;
/// Bytes of answers one client may have waiting (queued or not yet written), so that a
/// client that never reads pins at most this much, whatever its answers hold.
const ANSWER_BYTES: usize = 64 * 1024;
/// Pause after a failed accept (EMFILE: the pending client stays in the backlog).
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);
/// Supplementary groups read for a peer at first; the kernel says when it has more.
const PEER_GROUPS_GUESS: usize = 64;
/// How long an answer may wait for a client that is slow to read before it counts as not reading.
const ANSWER_GRACE: std::time::Duration = std::time::Duration::from_secs(1);
/// Lines of one client on their way through the spool, in order.
const PIPELINE: usize = 1024;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another instance is already listening on {0}")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotSocket(PathBuf),
    #[error("cannot listen on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Binds `path` with `mode`. A socket file left by a crashed run (connecting is refused) is
/// replaced. Anything else is left alone: a socket that accepts, or whose backlog is full
/// (`EAGAIN`, a live instance under load), and any file that is not a socket.
pub async fn bind(path: &Path, mode: u32) -> Result<UnixListener, BindError> {
    use std::os::unix::fs::FileTypeExt;
    let io = |source| BindError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(io(error)),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(BindError::NotSocket(path.to_owned()));
        }
        Ok(_) => match UnixStream::connect(path).await {
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(io)?;
            }
            Ok(_) => return Err(BindError::InUse(path.to_owned())),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(BindError::InUse(path.to_owned()));
            }
            Err(error) => return Err(io(error)),
        },
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    Ok(listener)
}

/// What a `status` request is answered with: the daemon's state, assembled by the reporting
/// layer above the stages. The socket only relays it.
pub trait StatusReport: Send + Sync {
    fn status(&self) -> Value;
}

/// Serves the socket until the daemon stops.
pub struct IngestServer {
    pub listener: UnixListener,
    /// Access rules and limits (`[socket]`).
    pub limits: Arc<SocketConfig>,
    pub spool: Spool,
    pub rules: Arc<TopicRules>,
    pub status: Arc<dyn StatusReport>,
    pub stopping: watch::Receiver<bool>,
    pub heartbeat: Heartbeat,
    /// Cloud-to-device messages for apps that subscribe.
    pub downlink: Downlink,
}

impl IngestServer {
    pub async fn run(self) {
        let server = &self;
        accept_clients(&self.listener, &self.limits, &self.heartbeat, |stream| {
            let client = Peer {
                spool: server.spool.clone(),
                rules: server.rules.clone(),
                status: server.status.clone(),
                stopping: server.stopping.clone(),
                limits: server.limits.clone(),
                downlink: server.downlink.clone(),
            };
            client.serve(stream)
        })
        .await;
    }
}

/// Accepts clients until the daemon stops, for the JSON socket and the raw sockets alike: at
/// most `max_clients` at once (the rest wait in the listen backlog), each admitted by its peer
/// credentials, each served on its own task. Beats `heartbeat` while it waits and per client.
pub async fn accept_clients<F, Fut>(
    listener: &UnixListener,
    limits: &SocketConfig,
    heartbeat: &Heartbeat,
    serve: F,
) where
    F: Fn(UnixStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_clients as usize));
    let per_uid = UidSlots::new(limits.max_clients_per_uid);
    // EMFILE and the like repeat every ACCEPT_RETRY for as long as they last.
    let mut repeats = Repeats::default();
    // Owned here, so the clients end with the server (at shutdown, the supervisor stops it).
    let mut clients = JoinSet::new();
    loop {
        while clients.try_join_next().is_some() {}
        let Ok(slot) = heartbeat.waiting(slots.clone().acquire_owned()).await else {
            return;
        };
        match heartbeat.waiting(listener.accept()).await {
            Ok((stream, _)) => {
                if !admit(limits, &stream).await {
                    continue;
                }
                let uid = stream.peer_cred().ok().map(|peer| peer.uid());
                let Some(uid_slot) = per_uid.take(uid) else {
                    refuse_crowded_uid(&stream, uid.unwrap_or(u32::MAX), &mut repeats).await;
                    continue;
                };
                let client = serve(stream);
                clients.spawn(async move {
                    client.await;
                    drop(uid_slot);
                    drop(slot);
                });
            }
            Err(error) => {
                if let Some(held_back) = repeats.admit(&error.to_string()) {
                    tracing::warn!(%error, held_back, "accept failed");
                }
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
}

/// Connections per peer uid on one socket, at most `limit` each (`socket.max_clients_per_uid`).
#[derive(Clone)]
struct UidSlots {
    limit: u32,
    held: Arc<Mutex<HashMap<u32, u32>>>,
}

/// One connection's share of its uid's slots, given back on drop.
struct UidSlot {
    uid: u32,
    held: Arc<Mutex<HashMap<u32, u32>>>,
}

impl UidSlots {
    fn new(limit: u32) -> UidSlots {
        UidSlots {
            limit,
            held: Arc::default(),
        }
    }

    /// A slot for a peer of `uid` (`None`: its credentials are unknown, not counted), or
    /// `None` when that uid holds `limit` already.
    fn take(&self, uid: Option<u32>) -> Option<Option<UidSlot>> {
        let Some(uid) = uid else {
            return Some(None);
        };
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = held.entry(uid).or_default();
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(Some(UidSlot {
            uid,
            held: self.held.clone(),
        }))
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = held.get_mut(&self.uid) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.uid);
            }
        }
    }
}

/// Answers a peer whose uid holds all its slots with one error line, and logs it (rate
/// limited: a runaway app reconnects in a loop).
async fn refuse_crowded_uid(stream: &UnixStream, uid: u32, repeats: &mut Repeats) {
    if let Some(held_back) = repeats.admit("too many connections from one uid") {
        tracing::warn!(
            uid,
            held_back,
            "refused a client: its uid holds socket.max_clients_per_uid connections"
        );
    }
    let refusal = Rejection::new(
        None,
        ErrorCode::TooManyConnections,
        format!("uid {uid} holds socket.max_clients_per_uid connections to this socket already"),
    );
    let _ = tokio::time::timeout(ANSWER_GRACE, stream.writable()).await;
    let _ = stream.try_write(refusal.to_line().as_bytes());
}

/// Logs who connected and refuses peers outside `socket.allowed_uids` / `allowed_gids` with
/// one error line. A peer's supplementary groups count too (apps join the group with
/// `usermod -aG`). Shared by the JSON socket and the raw sockets.
pub async fn admit(access: &SocketConfig, stream: &UnixStream) -> bool {
    let Ok(peer) = stream.peer_cred() else {
        return access.allows(u32::MAX, u32::MAX);
    };
    let (uid, gid) = (peer.uid(), peer.gid());
    tracing::debug!(uid, gid, pid = peer.pid(), "client connected");
    if access.allows(uid, gid)
        || (!access.allowed_gids.is_empty()
            && peer_groups(stream)
                .iter()
                .any(|group| access.allowed_gids.contains(group)))
    {
        return true;
    }
    tracing::warn!(
        uid,
        gid,
        pid = peer.pid(),
        "refused a client not in socket.allowed_uids / allowed_gids"
    );
    let refusal = Rejection::new(
        None,
        ErrorCode::PermissionDenied,
        format!(
            "uid {uid} / gid {gid} may not use this socket (socket.allowed_uids, socket.allowed_gids)"
        ),
    );
    let _ = tokio::time::timeout(ANSWER_GRACE, stream.writable()).await;
    let _ = stream.try_write(refusal.to_line().as_bytes());
    false
}

/// The peer's supplementary groups as the kernel recorded them at connect (`SO_PEERGROUPS`,
/// Linux 4.13+): unlike `/proc/<pid>/status` it cannot name another process that reused the
/// pid, and works under `ProtectProc=`. Empty when unavailable.
fn peer_groups(stream: &UnixStream) -> Vec<u32> {
    use std::os::fd::AsRawFd;
    const GID_BYTES: usize = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; PEER_GROUPS_GUESS];
    // Twice at most: the first ERANGE tells the size the kernel needs.
    for _ in 0..2 {
        let mut len = (groups.len() * GID_BYTES) as libc::socklen_t;
        // SAFETY: the buffer is `len` bytes of initialised gid_t that outlive the call; the
        // kernel writes at most `len` bytes and sets `len` to what it wrote (or needs).
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = (len as usize).div_ceil(GID_BYTES);
        if rc == 0 {
            groups.truncate(needed.min(groups.len()));
            return groups;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE)
            || needed <= groups.len()
        {
            break;
        }
        groups.resize(needed, 0);
    }
    Vec::new()
}

/// An answer line and its share of the client's `ANSWER_BYTES`, released once written or
/// dropped.
type Answer = (String, OwnedSemaphorePermit);

/// One step of a client's answer pipeline, kept in line order.
enum PendingAnswer {
    /// An answer known at once (status, rejection).
    Ready(String),
    /// A message on its way into the spool; answered once it is durable (or refused).
    Stored {
        id: Option<Value>,
        done: oneshot::Receiver<Result<(), AppendError>>,
    },
    /// Registers the filters after queueing the answer, so the answer precedes any message.
    Subscribe {
        id: Option<Value>,
        topics: Vec<String>,
    },
    Ack {
        id: Option<Value>,
        seq: i64,
    },
    Status {
        id: Option<Value>,
    },
    DeadLetters {
        id: Option<Value>,
        action: DeadLetterAction,
    },
}

struct Peer {
    spool: Spool,
    rules: Arc<TopicRules>,
    status: Arc<dyn StatusReport>,
    stopping: watch::Receiver<bool>,
    limits: Arc<SocketConfig>,
    downlink: Downlink,
}

impl Peer {
    async fn serve(self, stream: UnixStream) {
        let (read_half, write_half) = stream.into_split();
        let (answers, answer_queue) = mpsc::channel::<Answer>(ANSWER_QUEUE);
        let budget = Arc::new(Semaphore::new(ANSWER_BYTES));
        let (subscription, messages) = Subscription::new(self.downlink.clone());
        let subscription = Arc::new(subscription);
        let writer = tokio::spawn(write_out(write_half, answer_queue, messages));
        let answerer = Answerer {
            answers,
            budget,
            subscription: subscription.clone(),
            spool: self.spool.clone(),
            status: self.status.clone(),
            deaf: false,
        };
        let (pipeline, pending) = mpsc::channel::<PendingAnswer>(PIPELINE);
        let acker = tokio::spawn(answerer.run(pending));
        self.read_lines(read_half, &pipeline, &subscription).await;
        drop(pipeline);
        let _ = acker.await;
        // Before waiting for the writer: leaving drops the hub's end of the message lines.
        subscription.close().await;
        let _ = writer.await;
    }

    /// Reads lines of at most `MAX_LINE_BYTES` (a longer one is answered and skipped) at no
    /// more than the per-client rate; a half line left idle ends the connection.
    async fn read_lines(
        &self,
        read_half: tokio::net::unix::OwnedReadHalf,
        pipeline: &mpsc::Sender<PendingAnswer>,
        subscription: &Subscription,
    ) {
        let mut reader =
            RecordReader::new(read_half, b'\n', MAX_LINE_BYTES, self.limits.idle_timeout);
        let mut pace = Pace::new(self.limits.max_messages_per_second);
        let mut repeats = Repeats::default();
        loop {
            let step = match reader.next().await {
                Next::Record(line) => {
                    pace.wait().await;
                    match self.handle_line(&line).await {
                        Some(Err(rejection)) => Some(refused(rejection, &mut repeats)),
                        Some(Ok(step)) => Some(step),
                        None => None,
                    }
                }
                Next::TooLong => {
                    let message = format!("line exceeds {MAX_LINE_BYTES} bytes; skipped");
                    let rejection = Rejection::new(None, ErrorCode::LineTooLong, message);
                    Some(refused(rejection, &mut repeats))
                }
                Next::Idle => {
                    let message = format!(
                        "incomplete line: no newline within {} of its first byte (socket.idle_timeout); idle, connection closed",
                        humantime::format_duration(self.limits.idle_timeout)
                    );
                    let rejection = Rejection::new(None, ErrorCode::InvalidJson, message);
                    let _ = pipeline
                        .send(PendingAnswer::Ready(rejection.to_line()))
                        .await;
                    return;
                }
                // A subscriber waits for messages in silence: that is its use of the slot.
                Next::Silent if subscription.is_subscribed() => None,
                Next::Silent => {
                    tracing::debug!(
                        idle_timeout = %humantime::format_duration(self.limits.idle_timeout),
                        "closed a client that sent nothing for socket.idle_timeout"
                    );
                    return;
                }
                Next::End => return,
            };
            if let Some(step) = step
                && pipeline.send(step).await.is_err()
            {
                return;
            }
        }
    }

    /// What to answer a line with; `None` for a blank line.
    async fn handle_line(&self, line: &[u8]) -> Option<Result<PendingAnswer, Rejection>> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        let step = match parse_line(line, &self.rules) {
            Ok(Request::Status { id }) => PendingAnswer::Status { id },
            // Answered when their turn comes, within the answer budget: a list prepared
            // here for every pipelined request would pin megabytes before the budget applies.
            Ok(Request::DeadLetters { id, action }) => PendingAnswer::DeadLetters { id, action },
            Ok(Request::Subscribe { id, topics }) => PendingAnswer::Subscribe { id, topics },
            Ok(Request::Ack { id, seq }) => PendingAnswer::Ack { id, seq },
            Ok(Request::Publish { id, .. }) if *self.stopping.borrow() => {
                return Some(Err(Rejection::new(
                    id,
                    ErrorCode::ShuttingDown,
                    "the daemon is stopping; send again later",
                )));
            }
            Ok(Request::Publish { id, message }) => match self.spool.submit(message).await {
                Ok(done) => PendingAnswer::Stored { id, done },
                Err(error) => return Some(Err(refusal(id, &error))),
            },
            Err(rejection) => return Some(Err(rejection)),
        };
        Some(Ok(step))
    }
}

/// A client's writer: its answers and, once it subscribed, its message lines. Message lines
/// are never dropped like answers: an app holds at most the dispatcher's window of them
/// unacked, and a lost one would sit with it until it disconnects.
async fn write_out(
    mut write_half: tokio::net::unix::OwnedWriteHalf,
    mut answer_queue: mpsc::Receiver<Answer>,
    mut messages: mpsc::UnboundedReceiver<String>,
) {
    let mut out = Vec::new();
    let mut written = Vec::new();
    loop {
        tokio::select! {
            biased;
            answer = answer_queue.recv() => match answer {
                Some((line, permit)) => {
                    out.extend_from_slice(line.as_bytes());
                    written.push(permit);
                }
                None => break,
            },
            Some(line) = messages.recv() => out.extend_from_slice(line.as_bytes()),
        };
        // Answers already queued go in the same write: a pipelining app's burst of
        // `ok`s costs one syscall, not one each. (The budget bounds the batch.)
        while let Ok((line, permit)) = answer_queue.try_recv() {
            out.extend_from_slice(line.as_bytes());
            written.push(permit);
        }
        if write_half.write_all(&out).await.is_err() {
            break;
        }
        out.clear();
        written.clear();
    }
}

/// Answers a client's lines in their order, each once its step has settled.
struct Answerer {
    answers: mpsc::Sender<Answer>,
    budget: Arc<Semaphore>,
    subscription: Arc<Subscription>,
    spool: Spool,
    status: Arc<dyn StatusReport>,
    /// The client stopped reading its answers (see `deliver`).
    deaf: bool,
}

impl Answerer {
    async fn run(mut self, mut pending: mpsc::Receiver<PendingAnswer>) {
        while let Some(step) = pending.recv().await {
            if let Some(answer) = self.settle(step).await {
                self.deliver(answer).await;
            }
        }
    }

    /// Waits for `step` to finish; its answer, if it has one to give after that.
    async fn settle(&mut self, step: PendingAnswer) -> Option<String> {
        match step {
            PendingAnswer::Ready(line) => Some(line),
            PendingAnswer::Stored { id, done } => {
                match done.await.unwrap_or(Err(AppendError::Closed)) {
                    Ok(()) => id.as_ref().map(ok_line),
                    Err(error) => Some(refusal(id, &error).to_line()),
                }
            }
            PendingAnswer::Subscribe { id, topics } => {
                if let Some(id) = &id {
                    self.deliver(ok_line(id)).await;
                }
                self.subscription.subscribe(topics).await;
                None
            }
            PendingAnswer::Ack { id, seq } => match self.subscription.ack(seq).await {
                Ok(()) => id.as_ref().map(ok_line),
                Err(error) => Some(ack_refusal(id, &error).to_line()),
            },
            PendingAnswer::Status { id } => Some(with_id(
                serde_json::json!({"ok": true, "status": self.status.status()}),
                id,
            )),
            PendingAnswer::DeadLetters { id, action } => {
                Some(with_id(dead_letters_answer(&self.spool, action).await, id))
            }
        }
    }

    /// Queues an answer for the client's writer, within the client's `ANSWER_BYTES` (a line
    /// larger than the whole budget takes all of it). A client that reads gets its answers even
    /// in bursts (up to `ANSWER_GRACE` of waiting); one that stops reading is marked deaf and
    /// loses answers without slowing anything, until its queue has drained again.
    async fn deliver(&mut self, line: String) {
        let (answers, budget) = (&self.answers, &self.budget);
        let bytes = line.len().clamp(1, ANSWER_BYTES) as u32;
        // Every permit back means every queued answer was written.
        self.deaf = self.deaf && budget.available_permits() < ANSWER_BYTES;
        if self.deaf {
            if let Ok(permit) = budget.clone().try_acquire_many_owned(bytes) {
                let _ = answers.try_send((line, permit));
            }
            return;
        }
        let queued = async {
            let permit = budget.clone().acquire_many_owned(bytes).await.ok()?;
            answers.send((line, permit)).await.ok()
        };
        self.deaf = tokio::time::timeout(ANSWER_GRACE, queued).await.is_err();
    }
}

/// `answer` with the request's `id`, as a line.
fn with_id(mut answer: Value, id: Option<Value>) -> String {
    if let Some(id) = id {
        answer["id"] = id;
    }
    format!("{answer}\n")
}

/// The answer to a `dead_letters` request.
async fn dead_letters_answer(spool: &Spool, action: DeadLetterAction) -> Value {
    match spool.dead_letters(action).await {
        Ok(DeadLetterReply::Listed(listed)) => {
            serde_json::json!({"ok": true, "dead_letters": listed})
        }
        Ok(DeadLetterReply::Requeued(count)) => {
            tracing::info!(count, "dead letters requeued");
            serde_json::json!({"ok": true, "requeued": count})
        }
        Ok(DeadLetterReply::Purged(count)) => {
            tracing::info!(count, "dead letters purged");
            serde_json::json!({"ok": true, "purged": count})
        }
        Err(message) => serde_json::json!({
            "ok": false,
            // The protocol's code for a failing disk (docs/protocol.md).
            "error": "storage_error",
            "message": message,
        }),
    }
}

/// A per-client token bucket: `rate` lines per second with a burst of one second's worth,
/// enforced by pausing the reader (the client feels it as backpressure). 0 = no limit.
pub struct Pace {
    interval: Option<std::time::Duration>,
    next: Instant,
}

impl Pace {
    pub fn new(rate: u32) -> Pace {
        let now = Instant::now();
        Pace {
            interval: (rate > 0).then(|| std::time::Duration::from_secs(1) / rate),
            // A new client may send its first second's worth at once.
            next: now
                .checked_sub(std::time::Duration::from_secs(1))
                .unwrap_or(now),
        }
    }

    pub async fn wait(&mut self) {
        let Some(interval) = self.interval else {
            return;
        };
        let now = Instant::now();
        let earliest = now
            .checked_sub(std::time::Duration::from_secs(1))
            .unwrap_or(now);
        self.next = self.next.max(earliest) + interval;
        if self.next > now {
            tokio::time::sleep_until(self.next).await;
        }
    }
}

/// Logs a refused line for the operator (one line per kind of refusal and client every few
/// minutes, however fast a broken app repeats it) and turns it into the client's answer.
fn refused(rejection: Rejection, repeats: &mut Repeats) -> PendingAnswer {
    if let Some(held_back) = repeats.admit(rejection.code.as_str()) {
        tracing::info!(
            error_code = rejection.code.as_str(),
            held_back,
            reason = %rejection.message,
            "message refused"
        );
    }
    PendingAnswer::Ready(rejection.to_line())
}

fn ack_refusal(id: Option<Value>, error: &AckError) -> Rejection {
    let code = match error {
        AckError::UnknownSeq(_) => ErrorCode::UnknownSeq,
        AckError::Storage(_) => ErrorCode::StorageError,
        AckError::Closed => ErrorCode::ShuttingDown,
    };
    Rejection::new(id, code, error.to_string())
}

fn refusal(id: Option<Value>, error: &AppendError) -> Rejection {
    let code = match error {
        AppendError::Closed => ErrorCode::ShuttingDown,
        AppendError::Full(_) => ErrorCode::SpoolFull,
        AppendError::Storage(_) => ErrorCode::StorageError,
    };
    Rejection::new(id, code, error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_uid_holds_at_most_its_share_of_the_slots() {
        let slots = UidSlots::new(2);
        let first = slots.take(Some(1000)).expect("first");
        let _second = slots.take(Some(1000)).expect("second");
        assert!(
            slots.take(Some(1000)).is_none(),
            "a third from the same uid"
        );
        assert!(
            slots.take(Some(1001)).is_some(),
            "another uid is not held back"
        );
        assert!(
            slots.take(None).is_some(),
            "a peer without credentials is not counted"
        );
        drop(first);
        assert!(slots.take(Some(1000)).is_some(), "a slot given back");
    }

    #[tokio::test(start_paused = true)]
    async fn pace_allows_a_one_second_burst_then_the_rate() {
        let mut pace = Pace::new(5);
        let started = Instant::now();
        for _ in 0..5 {
            pace.wait().await;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_millis(50),
            "the burst is free"
        );
        for _ in 0..10 {
            pace.wait().await;
        }
        let elapsed = started.elapsed();
        assert!(
            elapsed >= std::time::Duration::from_millis(1900),
            "{elapsed:?}"
        );
        assert!(
            elapsed <= std::time::Duration::from_millis(2100),
            "{elapsed:?}"
        );

        let mut unlimited = Pace::new(0);
        let started = Instant::now();
        for _ in 0..1000 {
            unlimited.wait().await;
        }
        assert_eq!(started.elapsed(), std::time::Duration::ZERO);
    }
}
