//! The downlink hub: one thread owns the inbox (SQLite) and the [`Dispatcher`]; the MQTT side
//! hands it received messages, socket peers subscribe, ack and leave through [`Downlink`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::downlink::dispatch::{AppId, Dispatcher};
use crate::downlink::inbox::{InboxError, InboxStats, InboxStore};
use crate::downlink::render::message_line;
use crate::repeats::Repeats;

/// Requests waiting for the hub thread; a full queue makes senders wait.
const COMMAND_QUEUE: usize = 1024;
/// After a failed inbox read, handing the message out is tried again this long after, twice
/// as long after each further failure, up to `MAX_RETRY_DELAY`.
const RETRY_DELAY: Duration = Duration::from_secs(1);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// Why received messages were not stored (the broker then gets no PUBACK and sends again).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ReceiveError {
    #[error("inbox storage failed: {0}")]
    Storage(String),
    #[error("the inbox is closed")]
    Closed,
}

/// Why an ack was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AckError {
    #[error("seq {0} is not a message this connection holds unacked")]
    UnknownSeq(i64),
    #[error("inbox storage failed: {0}")]
    Storage(String),
    #[error("the inbox is closed")]
    Closed,
}

/// Message lines for one subscribed app (bounded by the dispatcher's per-app window).
pub type Deliveries = mpsc::UnboundedSender<String>;

enum Command {
    Receive {
        messages: Vec<(String, Vec<u8>)>,
        done: oneshot::Sender<Result<(), ReceiveError>>,
    },
    Subscribe {
        app: AppId,
        filters: Vec<String>,
        deliveries: Deliveries,
    },
    Ack {
        app: AppId,
        seq: i64,
        done: oneshot::Sender<Result<(), AckError>>,
    },
    Leave {
        app: AppId,
    },
}

/// A cheap, cloneable handle to the hub thread.
#[derive(Clone)]
pub struct Downlink {
    commands: mpsc::Sender<Command>,
    stats: watch::Receiver<InboxStats>,
    next_app: Arc<AtomicU64>,
}

impl Downlink {
    /// Opens the inbox in `dir` and starts the hub thread.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Downlink, InboxError> {
        let inbox = InboxStore::open(dir, max_bytes)?;
        let mut dispatcher = Dispatcher::default();
        for (seq, topic) in inbox.pending()? {
            dispatcher.arrive(seq, topic);
        }
        let (stats_tx, stats) = watch::channel(inbox.stats());
        let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
        let thread_error =
            |e| InboxError::Storage(rusqlite::Error::ToSqlConversionFailure(Box::new(e)));
        // The hub thread's clock for retries.
        let clock = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(thread_error)?;
        let hub = Hub {
            inbox,
            dispatcher,
            apps: HashMap::new(),
            stats: stats_tx,
            retry_at: None,
            retry_delay: RETRY_DELAY,
            read_log: Repeats::default(),
        };
        std::thread::Builder::new()
            .name("downlink".into())
            .spawn(move || hub.serve(receiver, clock))
            .map_err(thread_error)?;
        Ok(Downlink {
            commands,
            stats,
            next_app: Arc::new(AtomicU64::new(1)),
        })
    }

    /// Stores received messages (relative topic, payload) durably; `Ok` only once they are
    /// committed, which is when the broker may be sent its PUBACK.
    pub async fn receive(&self, messages: Vec<(String, Vec<u8>)>) -> Result<(), ReceiveError> {
        let (done, result) = oneshot::channel();
        self.commands
            .send(Command::Receive { messages, done })
            .await
            .map_err(|_| ReceiveError::Closed)?;
        result.await.unwrap_or(Err(ReceiveError::Closed))
    }

    /// A fresh id for a connection that subscribes (ids order apps by subscription time).
    pub fn new_app(&self) -> AppId {
        self.next_app.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds `filters` to `app`; matching messages go to `deliveries` as lines.
    pub async fn subscribe(&self, app: AppId, filters: Vec<String>, deliveries: Deliveries) {
        let _ = self
            .commands
            .send(Command::Subscribe {
                app,
                filters,
                deliveries,
            })
            .await;
    }

    /// `app` is done with `seq`: it leaves the inbox.
    pub async fn ack(&self, app: AppId, seq: i64) -> Result<(), AckError> {
        let (done, result) = oneshot::channel();
        self.commands
            .send(Command::Ack { app, seq, done })
            .await
            .map_err(|_| AckError::Closed)?;
        result.await.unwrap_or(Err(AckError::Closed))
    }

    /// `app` disconnected: its unacked messages go to the next subscriber.
    pub async fn leave(&self, app: AppId) {
        let _ = self.commands.send(Command::Leave { app }).await;
    }

    /// Inbox counters after the latest change.
    pub fn stats(&self) -> watch::Receiver<InboxStats> {
        self.stats.clone()
    }
}

struct Hub {
    inbox: InboxStore,
    dispatcher: Dispatcher,
    apps: HashMap<AppId, Deliveries>,
    stats: watch::Sender<InboxStats>,
    /// A message could not be read for its app: when to hand it out again.
    retry_at: Option<Instant>,
    retry_delay: Duration,
    read_log: Repeats,
}

impl Hub {
    fn serve(mut self, mut commands: mpsc::Receiver<Command>, clock: tokio::runtime::Runtime) {
        loop {
            let next = clock.block_on(async {
                match self.retry_at {
                    Some(at) => tokio::time::timeout_at(at.into(), commands.recv())
                        .await
                        .ok(),
                    None => Some(commands.recv().await),
                }
            });
            match next {
                Some(Some(command)) => self.handle(command),
                Some(None) => break,
                // Time to try the failed reads again (`deliver` below).
                None => self.retry_at = None,
            }
            self.deliver();
            self.stats.send_if_modified(|stats| {
                let now = self.inbox.stats();
                let changed = *stats != now;
                *stats = now;
                changed
            });
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Receive { messages, done } => {
                let pushed = self.inbox.push(&messages);
                self.inbox.record(pushed.is_ok());
                let result = match pushed {
                    Ok(pushed) => {
                        for seq in &pushed.dropped {
                            self.dispatcher.forget(*seq);
                        }
                        if !pushed.dropped.is_empty() {
                            tracing::warn!(
                                dropped = pushed.dropped.len(),
                                "inbox full (downlink.max_bytes): dropped the oldest messages no app acked"
                            );
                        }
                        for (seq, topic) in pushed.stored {
                            self.dispatcher.arrive(seq, topic);
                        }
                        Ok(())
                    }
                    Err(error) => {
                        tracing::error!(%error, "cannot store received messages; the broker will send them again");
                        Err(ReceiveError::Storage(error.to_string()))
                    }
                };
                let _ = done.send(result);
            }
            Command::Subscribe {
                app,
                filters,
                deliveries,
            } => {
                self.dispatcher.subscribe(app, filters);
                self.apps.insert(app, deliveries);
            }
            Command::Ack { app, seq, done } => {
                let result = if !self.dispatcher.ack(app, seq) {
                    Err(AckError::UnknownSeq(seq))
                } else {
                    // Gone from the dispatcher either way: a failed delete only means the
                    // message may come again after a restart (at least once).
                    let removed = self.inbox.remove(seq);
                    self.inbox.record(removed.is_ok());
                    removed
                        .map(|_| ())
                        .map_err(|e| AckError::Storage(e.to_string()))
                };
                let _ = done.send(result);
            }
            Command::Leave { app } => self.leave(app),
        }
    }

    fn leave(&mut self, app: AppId) {
        self.apps.remove(&app);
        let released = self.dispatcher.leave(app);
        if released > 0 {
            tracing::info!(
                released,
                "an app disconnected without acking; its messages go to the next subscriber"
            );
        }
    }

    /// Sends every message the dispatcher hands out to its app.
    fn deliver(&mut self) {
        loop {
            let mut gone = Vec::new();
            for (app, seq) in self.dispatcher.assign() {
                let loaded = self.inbox.load(seq);
                self.inbox.record(loaded.is_ok());
                let message = match loaded {
                    Ok(Some(message)) => message,
                    Ok(None) => {
                        self.dispatcher.forget(seq);
                        continue;
                    }
                    Err(error) => {
                        // Free again, and handed out again after a pause: never left with
                        // an app that was not sent it.
                        self.dispatcher.release(seq);
                        self.retry_at = Some(Instant::now() + self.retry_delay);
                        self.retry_delay = (self.retry_delay * 2).min(MAX_RETRY_DELAY);
                        if let Some(held_back) = self.read_log.admit("inbox read") {
                            tracing::error!(%error, seq, held_back, "cannot read an inbox message; trying again");
                        }
                        continue;
                    }
                };
                self.retry_delay = RETRY_DELAY;
                let line = message_line(seq, &message.topic, &message.payload);
                let sent = self
                    .apps
                    .get(&app)
                    .is_some_and(|deliveries| deliveries.send(line).is_ok());
                if !sent {
                    gone.push(app);
                }
            }
            if gone.is_empty() {
                return;
            }
            // Their messages are free again: hand them to the others.
            for app in gone {
                self.leave(app);
            }
        }
    }
}

/// One socket connection's side of the downlink: registered with the hub at its first
/// `subscribe`, left when the connection ends.
pub struct Subscription {
    downlink: Downlink,
    /// 0 until the first subscribe.
    app: AtomicU64,
    deliveries: Deliveries,
}

impl Subscription {
    /// The subscription and the message lines for the connection's writer.
    pub fn new(downlink: Downlink) -> (Subscription, mpsc::UnboundedReceiver<String>) {
        let (deliveries, lines) = mpsc::unbounded_channel();
        let subscription = Subscription {
            downlink,
            app: AtomicU64::new(0),
            deliveries,
        };
        (subscription, lines)
    }

    pub async fn subscribe(&self, filters: Vec<String>) {
        let mut app = self.app.load(Ordering::Relaxed);
        if app == 0 {
            app = self.downlink.new_app();
            self.app.store(app, Ordering::Relaxed);
        }
        self.downlink
            .subscribe(app, filters, self.deliveries.clone())
            .await;
    }

    /// Whether the connection has subscribed (its silence is then expected).
    pub fn is_subscribed(&self) -> bool {
        self.app.load(Ordering::Relaxed) != 0
    }

    pub async fn ack(&self, seq: i64) -> Result<(), AckError> {
        match self.app.load(Ordering::Relaxed) {
            0 => Err(AckError::UnknownSeq(seq)),
            app => self.downlink.ack(app, seq).await,
        }
    }

    /// The connection ended: what it holds unacked goes to the next subscriber.
    pub async fn close(&self) {
        let app = self.app.load(Ordering::Relaxed);
        if app != 0 {
            self.downlink.leave(app).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn next(lines: &mut mpsc::UnboundedReceiver<String>) -> serde_json::Value {
        let line = tokio::time::timeout(std::time::Duration::from_secs(5), lines.recv())
            .await
            .expect("a line in time")
            .expect("open");
        serde_json::from_str(&line).expect("json")
    }

    #[tokio::test]
    async fn stored_messages_reach_a_subscriber_and_leave_on_ack_or_return_on_leave() {
        let dir = tempfile::tempdir().expect("tempdir");
        let downlink = Downlink::open(dir.path(), 1 << 20).expect("open");
        downlink
            .receive(vec![
                ("commands/a".into(), b"1".to_vec()),
                ("commands/b".into(), b"text".to_vec()),
            ])
            .await
            .expect("stored");
        let (first, mut lines) = Subscription::new(downlink.clone());
        first.subscribe(vec!["commands/#".into()]).await;
        let a = next(&mut lines).await;
        assert_eq!(
            (a["topic"].clone(), a["payload"].clone()),
            ("commands/a".into(), 1.into())
        );
        let b = next(&mut lines).await;
        assert_eq!(b["payload"], "text");
        let seq_a = a["seq"].as_i64().expect("seq");
        first.ack(seq_a).await.expect("ack");
        assert_eq!(first.ack(seq_a).await, Err(AckError::UnknownSeq(seq_a)));
        first.close().await;

        let (second, mut lines) = Subscription::new(downlink.clone());
        second.subscribe(vec!["commands/b".into()]).await;
        let again = next(&mut lines).await;
        assert_eq!(again["seq"], b["seq"], "the unacked one, redelivered");
        second
            .ack(again["seq"].as_i64().expect("seq"))
            .await
            .expect("ack");
        let mut stats = downlink.stats();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while stats.borrow_and_update().messages != 0 {
                let _ = stats.changed().await;
            }
        })
        .await;
        assert_eq!(stats.borrow().messages, 0);
    }
}
