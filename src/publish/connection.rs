//! The publisher: moves messages from the spool to IoT Core, in order, and removes each one
//! only after the broker acknowledged it.
//!
//! Every connection starts from the oldest message still in the spool: rumqttc forgets unacked
//! publishes when the broker reports no session, so republishing is ours to do (duplicates are
//! allowed, loss is not).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{ConnectReturnCode, Event, Outgoing, Packet, QoS};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{BatchConfig, PublishConfig};
use crate::identity::{RefusalSignal, Session};
use crate::message::Qos;
use crate::ops::heartbeat::Heartbeat;
use crate::ops::logging::Repeats;
use crate::ops::status::LinkState;
use crate::publish::batch::{self, Batcher};
use crate::publish::mqtt::{self, MqttSettings};
use crate::publish::quota::Quota;
use crate::retry::Backoff;
use crate::spool::Spool;
use crate::topic::TopicRules;

/// Never sign a connect with credentials that expire sooner than this.
const MIN_SIGNING_VALIDITY: Duration = Duration::from_secs(30);
/// SigV4 websocket connections are cut after 24 hours; reconnect cleanly before that.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(23 * 3600);
/// A planned reconnect waits at most this long for in-flight publishes to be acknowledged.
const RENEW_GRACE: Duration = Duration::from_secs(10);
/// Reconnect delays: at least 1 s (IoT Core allows one connect per second per client id).
const RECONNECT_FLOOR: Duration = Duration::from_secs(1);
const RECONNECT_CAP: Duration = Duration::from_secs(30);
/// A publish without PUBACK for this long means the connection is stuck: reconnect, republish.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);
const ACK_CHECK: Duration = Duration::from_secs(5);
/// An idle connection still goes round its loop this often, to show the watchdog it is alive.
const BEAT_EVERY: Duration = Duration::from_secs(2);
/// At most this many spool messages are read at once (the read is also bounded in bytes).
const MAX_READ: usize = 1024;
/// After a failed spool read, the next try comes this much later.
const SPOOL_READ_RETRY: Duration = Duration::from_secs(1);
/// How long a clean disconnect may take.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// The oldest message goes to the dead letters once this many connections in a row dropped
/// while it was out unacknowledged: IoT Core disconnects a client that publishes where its
/// policy forbids, so such a message would otherwise hold back the queue forever.
pub const DEAD_LETTER_STRIKES: u32 = 5;

/// Delivery counters for `status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublishCounters {
    pub published_total: u64,
    pub republished_total: u64,
    /// How far the server's clock was from this device's (seconds, positive: the server is
    /// ahead) when it last refused an upgrade with 403, if that was more than allowed.
    pub clock_skew_s: Option<i64>,
}

/// The oldest message and how many connections in a row dropped while it was out.
struct Strikes {
    first_id: i64,
    count: u32,
}

/// How one connection ended.
enum Ended {
    /// Shutdown: the spool is empty and nothing is in flight.
    Drained,
    /// A planned reconnect (fresh credentials, or the 24-hour limit).
    Renew,
    /// The connection failed or could not be made.
    Failed(String),
}

/// See the module docs.
pub struct Publisher {
    spool: Spool,
    sessions: watch::Receiver<Option<Arc<Session>>>,
    /// Tells the identity manager when IoT Core refuses a connection for authorization.
    refusals: RefusalSignal,
    settings: MqttSettings,
    rules: Arc<TopicRules>,
    link: watch::Sender<LinkState>,
    counters: watch::Sender<PublishCounters>,
    /// Highest spool id ever handed to a connection; ids at or below it are republishes.
    highest_sent: i64,
    /// IoT Core's per-connection quotas, kept across reconnects.
    quota: Quota,
    /// The quota settings; SIGHUP may change them.
    limits: watch::Receiver<PublishConfig>,
    /// `[batch]`: how messages share publishes, and how long an open array may wait.
    batcher: Batcher,
    linger: Duration,
    /// See [`DEAD_LETTER_STRIKES`].
    strikes: Option<Strikes>,
    /// The last failed connection's oldest message went to the dead letters.
    buried_head: bool,
}

impl Publisher {
    pub fn new(
        spool: Spool,
        sessions: watch::Receiver<Option<Arc<Session>>>,
        refusals: RefusalSignal,
        settings: MqttSettings,
        rules: Arc<TopicRules>,
        limits: watch::Receiver<PublishConfig>,
        batch: &BatchConfig,
    ) -> (
        Publisher,
        watch::Receiver<LinkState>,
        watch::Receiver<PublishCounters>,
    ) {
        let (link, link_rx) = watch::channel(LinkState::Starting);
        let (counters, counters_rx) = watch::channel(PublishCounters::default());
        let quota = Quota::new(
            limits.borrow().max_publishes_per_second,
            limits.borrow().max_bytes_per_second.0,
        );
        let publisher = Publisher {
            spool,
            sessions,
            refusals,
            settings,
            rules,
            link,
            counters,
            highest_sent: 0,
            quota,
            limits,
            batcher: Batcher::new(batch),
            linger: batch.linger,
            strikes: None,
            buried_head: false,
        };
        (publisher, link_rx, counters_rx)
    }

    /// Publishes until `stopping` turns true and everything is delivered; the caller bounds
    /// the drain with a timeout. Beats `heartbeat` each time its loops go round.
    pub async fn run(mut self, mut stopping: watch::Receiver<bool>, heartbeat: Heartbeat) {
        let mut backoff = Backoff::new(RECONNECT_FLOOR, RECONNECT_CAP, RECONNECT_FLOOR);
        let mut repeats = Repeats::default();
        loop {
            if *stopping.borrow() && self.spool.stats().borrow().messages == 0 {
                return;
            }
            let spool = self.spool.clone();
            let session = heartbeat
                .waiting(async {
                    tokio::select! {
                        session = self.wait_for_session() => Some(session),
                        _ = stopped_and_empty(&mut stopping, &spool) => None,
                    }
                })
                .await;
            let Some(session) = session else { return };
            self.link.send_replace(LinkState::Connecting);
            let started = Instant::now();
            let ended = self
                .run_connection(&session, &mut stopping, &heartbeat)
                .await;
            if *self.link.borrow() == LinkState::Connected {
                // The outage (if any) is over: its next warning is news again.
                repeats.clear();
                if self.counters.borrow().clock_skew_s.is_some() {
                    self.counters.send_modify(|c| c.clock_skew_s = None);
                }
            }
            match ended {
                Ended::Drained => return,
                Ended::Renew => {
                    backoff.reset();
                    // Keep to one connect per second per client id.
                    heartbeat
                        .waiting(tokio::time::sleep_until(started + RECONNECT_FLOOR))
                        .await;
                }
                Ended::Failed(error) => {
                    if started.elapsed() > RECONNECT_CAP || self.buried_head {
                        // A long-lived connection, or the cause of the drops is out of the
                        // queue now: start the delays over.
                        backoff.reset();
                        self.buried_head = false;
                    }
                    let was_stopping = *stopping.borrow();
                    let mut delay = backoff.next_delay();
                    if was_stopping {
                        // The drain has little time: keep trying, at IoT Core's connect rate.
                        delay = delay.min(RECONNECT_FLOOR);
                    }
                    if let Some(held_back) = repeats.admit(&error) {
                        tracing::warn!(
                            identity_id = %session.identity_id,
                            state = "backoff",
                            %error,
                            retry_in_ms = delay.as_millis() as u64,
                            held_back,
                            "MQTT connection lost"
                        );
                    }
                    tracing::debug!(retry_in_ms = delay.as_millis() as u64, "reconnect backoff");
                    self.link.send_replace(LinkState::Backoff);
                    let spool = self.spool.clone();
                    let stopped = heartbeat
                        .waiting(async {
                            tokio::select! {
                                _ = tokio::time::sleep(delay) => false,
                                stopped = backoff_interrupted(&mut stopping, &spool, was_stopping) => {
                                    // SIGTERM: drain at once, within one connect per second.
                                    tokio::time::sleep_until(started + RECONNECT_FLOOR).await;
                                    stopped
                                }
                            }
                        })
                        .await;
                    if stopped {
                        return;
                    }
                }
            }
        }
    }

    /// A websocket upgrade refused with 403 while this device's clock is far off the server's:
    /// SigV4 signatures are refused, and no retry helps until the clock is fixed. Says so once
    /// per episode, and shows it in `status`.
    fn diagnose_skew(&self, error: &rumqttc::ConnectionError) {
        let Some(skew) = mqtt::refused_upgrade_skew(error, std::time::SystemTime::now()) else {
            return;
        };
        if skew.abs() <= mqtt::MAX_CLOCK_SKEW_S {
            return;
        }
        let first = self.counters.borrow().clock_skew_s.is_none();
        self.counters.send_modify(|c| c.clock_skew_s = Some(skew));
        if first {
            tracing::error!(
                clock_skew_s = skew,
                "the broker refused the connection (403) and this device's clock is {} s {} the server's: signatures are dated wrong; fix NTP",
                skew.abs(),
                if skew > 0 { "behind" } else { "ahead of" }
            );
        }
    }

    /// The latest session whose credentials are still good for signing.
    async fn wait_for_session(&mut self) -> Arc<Session> {
        loop {
            if let Some(session) = self.sessions.borrow_and_update().clone()
                && session.credentials.valid_for(MIN_SIGNING_VALIDITY)
            {
                return session;
            }
            if self.sessions.changed().await.is_err() {
                // The identity manager is gone; the daemon is shutting down.
                std::future::pending::<()>().await;
            }
        }
    }

    async fn run_connection(
        &mut self,
        session: &Session,
        stopping: &mut watch::Receiver<bool>,
        heartbeat: &Heartbeat,
    ) -> Ended {
        let valid_for = session
            .credentials
            .expires_at
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        tracing::info!(
            identity_id = %session.identity_id,
            state = "connecting",
            credentials_valid_s = valid_for.as_secs(),
            "connecting to the broker"
        );
        let mut connection = match mqtt::connect(&self.settings, session) {
            Ok(connection) => connection,
            Err(error) => return Ended::Failed(error.to_string()),
        };
        let max_in_flight = usize::from(self.settings.max_in_flight);
        let mut spool_stats = self.spool.stats();
        let mut renew_by: Option<Instant> = None;
        let age_limit = tokio::time::sleep(MAX_CONNECTION_AGE);
        tokio::pin!(age_limit);
        let mut window = Window::default();
        let mut ended: Option<Ended> = None;
        let mut paced_until: Option<Instant> = None;
        // An open array waiting for `linger`: (its first spool id, when it was first seen).
        let mut held: Option<(i64, Instant)> = None;
        let mut lingering_until: Option<Instant> = None;
        let mut identity_gone = false;
        let mut ack_check = tokio::time::interval(ACK_CHECK);
        let mut beat = tokio::time::interval(BEAT_EVERY);
        let mut cursor = 0i64;
        // Planned publishes not sent yet (window full, quota, linger), oldest first; all
        // after `cursor`. `more_behind`: the spool had more than the last read took.
        let mut ready: VecDeque<batch::Outgoing> = VecDeque::new();
        let mut more_behind = false;
        // The first publish of this connection (the oldest message) and its full topic.
        let mut head: Option<(Vec<i64>, String)> = None;

        loop {
            heartbeat.beat();
            let outstanding = window.outstanding();
            if window.connected
                && renew_by.is_none()
                && paced_until.is_none()
                && lingering_until.is_none()
                && outstanding < max_in_flight
            {
                if self.limits.has_changed().unwrap_or(false) {
                    let limits = self.limits.borrow_and_update();
                    self.quota.set_limits(
                        limits.max_publishes_per_second,
                        limits.max_bytes_per_second.0,
                    );
                }
                // A lone open array may still grow: plan it again with what arrived since.
                if ready.len() == 1 && ready.front().is_some_and(|o| o.open) {
                    ready.clear();
                }
                if ready.is_empty() {
                    let room = max_in_flight - outstanding;
                    let wanted = room
                        .saturating_mul(self.batcher.max_messages())
                        .min(MAX_READ);
                    let budget = room.saturating_mul(self.batcher.max_bytes());
                    let read = match self.spool.read_after(cursor, wanted, budget).await {
                        Ok(read) => read,
                        // Not an empty spool: look again shortly (the spool reports the fault).
                        Err(_) => {
                            paced_until = Some(Instant::now() + SPOOL_READ_RETRY);
                            Vec::new()
                        }
                    };
                    more_behind = read.len() == wanted;
                    ready.extend(self.batcher.plan(read));
                }
                while window.outstanding() < max_in_flight
                    && let Some(outgoing) = ready.pop_front()
                {
                    // The newest array may wait up to `linger` for more readings, unless the
                    // spool had more than we read (then more are right behind it).
                    if ready.is_empty()
                        && outgoing.open
                        && !more_behind
                        && !self.linger.is_zero()
                        && !*stopping.borrow()
                    {
                        let first = outgoing.ids[0];
                        let since = match held {
                            Some((id, since)) if id == first => since,
                            _ => held.insert((first, Instant::now())).1,
                        };
                        if since.elapsed() < self.linger {
                            lingering_until = Some(since + self.linger);
                            ready.push_front(outgoing);
                            break;
                        }
                    }
                    let topic = self.rules.full_topic(&session.identity_id, &outgoing.topic);
                    if let Err(error) = TopicRules::check_full(&topic) {
                        // Never accepted by IoT Core, whatever we do: out of the queue.
                        let last = *outgoing.ids.last().unwrap_or(&cursor);
                        self.bury(outgoing.ids, &topic, error.to_string()).await;
                        cursor = cursor.max(last);
                        continue;
                    }
                    // IoT Core counts the topic it receives, prefix included.
                    let size = (topic.len() + outgoing.payload.len()) as u64;
                    if let Some(at) = self.quota.ready_at(size, Instant::now()) {
                        // Over IoT Core's quota: it goes first once the quota allows, with no
                        // trip to the spool in between.
                        paced_until = Some(at);
                        ready.push_front(outgoing);
                        break;
                    }
                    held = None;
                    self.quota.record(size, Instant::now());
                    if head.is_none() {
                        head = Some((outgoing.ids.clone(), topic.clone()));
                    }
                    let qos = match outgoing.qos {
                        Qos::AtMostOnce => QoS::AtMostOnce,
                        Qos::AtLeastOnce => QoS::AtLeastOnce,
                    };
                    if let Err(error) =
                        connection
                            .client
                            .try_publish(topic, qos, false, outgoing.payload)
                    {
                        return Ended::Failed(format!("publish queue: {error}"));
                    }
                    let repeated = outgoing
                        .ids
                        .iter()
                        .filter(|&&id| id <= self.highest_sent)
                        .count();
                    if repeated > 0 {
                        self.counters
                            .send_modify(|c| c.republished_total += repeated as u64);
                    }
                    let last = *outgoing.ids.last().unwrap_or(&cursor);
                    self.highest_sent = self.highest_sent.max(last);
                    cursor = last;
                    window.unassigned.push_back((outgoing.ids, outgoing.qos));
                }
            }
            if window.outstanding() == 0 {
                if *stopping.borrow() && self.spool.stats().borrow().messages == 0 {
                    close(connection).await;
                    return Ended::Drained;
                }
                if window.connected && renew_by.is_some() {
                    close(connection).await;
                    return Ended::Renew;
                }
            }
            let renew_deadline = renew_by.unwrap_or_else(|| Instant::now() + MAX_CONNECTION_AGE);

            tokio::select! {
                event = connection.events.recv() => {
                    let mut next = event;
                    // Take whatever else is already waiting before touching the spool again.
                    loop {
                        match next {
                            Some(Ok(event)) => {
                                if let Err(end) = window.on_event(event, session, &self.link) {
                                    ended = Some(end);
                                    break;
                                }
                            }
                            Some(Err(error)) => {
                                self.diagnose_skew(&error);
                                if crate::identity::is_authorization_refusal(&error) {
                                    self.refusals.raise();
                                }
                                ended = Some(Ended::Failed(error.to_string()));
                                break;
                            }
                            None => {
                                ended = Some(Ended::Failed("event loop stopped".into()));
                                break;
                            }
                        }
                        match connection.events.try_recv() {
                            Ok(event) => next = Some(event),
                            Err(_) => break,
                        }
                    }
                }
                _ = tokio::time::sleep_until(paced_until.unwrap_or_else(Instant::now)), if paced_until.is_some() => {
                    paced_until = None;
                }
                _ = tokio::time::sleep_until(lingering_until.unwrap_or_else(Instant::now)), if lingering_until.is_some() => {
                    lingering_until = None;
                }
                changed = spool_stats.changed(), if window.connected && renew_by.is_none() && paced_until.is_none() => {
                    if changed.is_err() {
                        return Ended::Failed("spool closed".into());
                    }
                    // New messages may fill the lingering array: look again.
                    lingering_until = None;
                }
                changed = stopping.changed() => {
                    if changed.is_err() {
                        return Ended::Drained;
                    }
                }
                changed = self.sessions.changed(), if renew_by.is_none() && !identity_gone => {
                    identity_gone = changed.is_err();
                    if changed.is_ok() {
                        tracing::info!("new credentials: reconnecting with them once in-flight messages are acknowledged");
                        renew_by = Some(Instant::now() + RENEW_GRACE);
                    }
                }
                _ = &mut age_limit, if renew_by.is_none() => {
                    tracing::info!("connection nears the 24-hour limit; reconnecting");
                    renew_by = Some(Instant::now() + RENEW_GRACE);
                }
                _ = tokio::time::sleep_until(renew_deadline), if renew_by.is_some() => {
                    close(connection).await;
                    return Ended::Renew;
                }
                _ = beat.tick() => {}
                _ = ack_check.tick(), if !window.in_flight.is_empty() => {
                    if window.oldest_in_flight().is_some_and(|sent| sent.elapsed() > ACK_TIMEOUT) {
                        ended = Some(Ended::Failed(format!("no PUBACK within {}s", ACK_TIMEOUT.as_secs())));
                    }
                }
            }
            // Acknowledged messages leave the spool even when the connection just ended.
            if !window.delivered.is_empty() {
                let count = window.delivered.len() as u64;
                self.spool
                    .remove(std::mem::take(&mut window.delivered))
                    .await;
                self.counters.send_modify(|c| c.published_total += count);
            }
            if let Some(ended) = ended {
                if matches!(ended, Ended::Failed(_)) {
                    self.count_strike(head.take(), &window).await;
                }
                return ended;
            }
        }
    }
}

impl Publisher {
    /// After a failed connection: another strike for the oldest message if the connection
    /// dropped while it was out unacknowledged; the last strike moves it to the dead letters.
    /// A connection that never published it neither counts nor breaks the row.
    async fn count_strike(&mut self, head: Option<(Vec<i64>, String)>, window: &Window) {
        let Some((ids, topic)) = head else { return };
        let Some(&first_id) = ids.first() else { return };
        if !window.holds(first_id) {
            self.strikes = None;
            return;
        }
        let count = match &self.strikes {
            Some(strikes) if strikes.first_id == first_id => strikes.count + 1,
            _ => 1,
        };
        if count < DEAD_LETTER_STRIKES {
            self.strikes = Some(Strikes { first_id, count });
            return;
        }
        self.strikes = None;
        let reason = format!(
            "the broker dropped the connection right after it, {count} times in a row \
             (IoT Core does so for a publish its policy denies)"
        );
        self.bury(ids, &topic, reason).await;
        self.buried_head = true;
    }

    /// Moves spool messages to the dead letters, with one journal warning.
    async fn bury(&mut self, ids: Vec<i64>, topic: &str, reason: String) {
        tracing::warn!(
            topic,
            %reason,
            messages = ids.len(),
            "message moved to the dead letters; `iot-cognito-relay dead-letters` lists, requeues or purges them"
        );
        self.spool.bury(ids, reason).await;
    }
}

/// What one connection has sent and not yet seen acknowledged.
#[derive(Default)]
struct Window {
    connected: bool,
    /// Published, waiting for rumqttc to assign a packet id (it does so in request order):
    /// the spool ids each publish carries.
    unassigned: VecDeque<(Vec<i64>, Qos)>,
    /// Packet id → (spool ids, when it went out), waiting for PUBACK.
    in_flight: HashMap<u16, (Vec<i64>, Instant)>,
    /// Spool ids the broker has (QoS 1) or that went out (QoS 0): to remove from the spool.
    delivered: Vec<i64>,
}

impl Window {
    fn outstanding(&self) -> usize {
        self.unassigned.len() + self.in_flight.len()
    }

    /// Whether spool message `id` went out on this connection and is not acknowledged.
    fn holds(&self, id: i64) -> bool {
        self.unassigned.iter().any(|(ids, _)| ids.contains(&id))
            || self.in_flight.values().any(|(ids, _)| ids.contains(&id))
    }

    fn oldest_in_flight(&self) -> Option<Instant> {
        self.in_flight.values().map(|(_, sent)| *sent).min()
    }

    fn on_event(
        &mut self,
        event: Event,
        session: &Session,
        link: &watch::Sender<LinkState>,
    ) -> Result<(), Ended> {
        match event {
            Event::Incoming(Packet::ConnAck(ack)) => {
                if ack.code != ConnectReturnCode::Success {
                    return Err(Ended::Failed(format!(
                        "broker refused the connection: {:?}",
                        ack.code
                    )));
                }
                self.connected = true;
                link.send_replace(LinkState::Connected);
                tracing::info!(identity_id = %session.identity_id, state = "connected", "connected to the broker");
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some((ids, qos)) = self.unassigned.pop_front() {
                    match qos {
                        Qos::AtMostOnce => self.delivered.extend(ids),
                        Qos::AtLeastOnce => {
                            self.in_flight.insert(pkid, (ids, Instant::now()));
                        }
                    }
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some((ids, _)) = self.in_flight.remove(&ack.pkid) {
                    self.delivered.extend(ids);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Ends a reconnect backoff early: `true` once the daemon is stopping with nothing left to
/// deliver, `false` as soon as stopping begins with messages left (the drain must try now,
/// not after a backoff of up to 30 s that outlasts `drain_timeout`).
async fn backoff_interrupted(
    stopping: &mut watch::Receiver<bool>,
    spool: &Spool,
    was_stopping: bool,
) -> bool {
    loop {
        let now_stopping = *stopping.borrow_and_update();
        if now_stopping && spool.stats().borrow().messages == 0 {
            return true;
        }
        if now_stopping && !was_stopping {
            return false;
        }
        if stopping.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Resolves once the daemon is stopping and the spool is empty: nothing left to deliver.
async fn stopped_and_empty(stopping: &mut watch::Receiver<bool>, spool: &Spool) {
    loop {
        if *stopping.borrow_and_update() && spool.stats().borrow().messages == 0 {
            return;
        }
        if stopping.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Sends DISCONNECT and gives the event loop a moment to put it on the wire.
async fn close(mut connection: mqtt::Connection) {
    let _ = connection.client.try_disconnect();
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(Ok(_)) = connection.events.recv().await {}
    })
    .await;
}
