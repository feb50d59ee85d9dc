//! The publisher: moves messages from the spool to IoT Core, in order, and removes each one
//! only after the broker acknowledged it.
//!
//! Every connection starts from the oldest message still in the spool: rumqttc forgets unacked
//! publishes when the broker reports no session, so republishing is ours to do (duplicates are
//! allowed, loss is not).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use rumqttc::{
    ConnectReturnCode, Event, Outgoing, Packet, QoS, SubscribeFilter, SubscribeReasonCode,
};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::config::{BatchConfig, PublishConfig};
use crate::downlink::Downlink;
use crate::heartbeat::Heartbeat;
use crate::identity::{IdentityWatch, Session, Signal};
use crate::message::Qos;
use crate::publish::batch::Batcher;
use crate::publish::flow::{
    Action, BrokerEvent, Ended, Failure, Flow, Outside, Publish, REATTACH_AFTER_CLOSES,
};
use crate::publish::inbound::{
    HELD_FILTERS_FILE, HeldFilters, Inbound, MAX_RECEIVE_BATCH, Received, Redeliveries,
};
use crate::publish::mqtt::{self, MqttSettings};
use crate::publish::quota::Quota;
use crate::publish::refusal::Refusal;
use crate::repeats::Repeats;
use crate::retry::Backoff;
use crate::spool::{ReadBatch, ReadError, Spool};
use crate::topic::TopicRules;

/// Never sign a connect with credentials that expire sooner than this.
const MIN_SIGNING_VALIDITY: Duration = Duration::from_secs(30);
/// A connect whose credentials are due for a refresh waits this long for fresh ones, then signs
/// with those it has if they are still valid (the refresh is failing: MQTT need not wait for
/// Cognito). A refresh is two AWS calls.
const REFRESH_WAIT: Duration = Duration::from_secs(15);
/// Reconnect delays: at least 1 s (IoT Core allows one connect per second per client id).
const RECONNECT_FLOOR: Duration = Duration::from_secs(1);
const RECONNECT_CAP: Duration = Duration::from_secs(30);
/// An idle connection still goes round its loop this often, to show the watchdog it is alive.
const BEAT_EVERY: Duration = Duration::from_secs(2);
/// How long a clean disconnect may take.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// IoT Core takes at most 8 topic filters per SUBSCRIBE.
const FILTERS_PER_SUBSCRIBE: usize = 8;

/// A spool read the flow asked for, running while the loop publishes and waits; it ends with
/// the messages and how many were asked for.
type PendingRead = Pin<Box<dyn Future<Output = Result<ReadBatch, ReadError>> + Send>>;

/// Where the link to IoT Core stands (`status`'s `state`, minus `stopping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    Starting,
    Connecting,
    Connected,
    Backoff,
}

/// The first pause before storing received messages again after the inbox failed, doubled
/// after each further failure up to the second.
const STORE_DELAY: Duration = Duration::from_secs(1);
const MAX_STORE_DELAY: Duration = Duration::from_secs(30);

/// Delivery counters for `status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublishCounters {
    pub published_total: u64,
    pub republished_total: u64,
    /// How far the server's clock was from this device's (seconds, positive: the server is
    /// ahead) when it last refused an upgrade with 403, if that was more than allowed.
    pub clock_skew_s: Option<i64>,
}

/// The MQTT side as `status` tells it, beyond the counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkReport {
    /// The broker's host (or `mqtt.url`'s), once known.
    pub endpoint: Option<String>,
    /// The last failure of a connection (refused, TLS, closed after CONNECT, ...) and when.
    pub last_error: Option<String>,
    pub last_error_at: Option<std::time::SystemTime>,
    /// The last CONNACK.
    pub last_connected_at: Option<std::time::SystemTime>,
    /// Connections after the first since the start.
    pub reconnects_total: u64,
}

/// See the module docs.
pub struct Publisher {
    spool: Spool,
    sessions: watch::Receiver<Option<Arc<Session>>>,
    /// Tells the identity manager when IoT Core refuses a connection for authorization.
    refusals: Signal,
    /// Asks the identity manager for fresh credentials before a connect.
    refresh_wanted: Signal,
    settings: MqttSettings,
    link: watch::Sender<LinkState>,
    counters: watch::Sender<PublishCounters>,
    /// The quota settings; SIGHUP may change them.
    limits: watch::Receiver<PublishConfig>,
    flow: Flow,
    /// Cloud-to-device: where received messages go, and what to subscribe to.
    downlink: Option<(Downlink, Inbound)>,
    /// Received on this connection, waiting to be stored and then acknowledged.
    received: Vec<rumqttc::Publish>,
    /// What was stored lately, so the broker's redeliveries keep their `seq`.
    redeliveries: Redeliveries,
    /// The inbox refused the last store: it is tried again then (the connection stays; the
    /// messages stay unacknowledged meanwhile), after a pause doubling up to `MAX_STORE_DELAY`.
    store_retry_at: Option<Instant>,
    store_delay: Duration,
    /// Downlink filters (relative) the broker refused in a SUBACK, for `status`.
    refused_filters: watch::Sender<Vec<String>>,
    report: watch::Sender<LinkReport>,
    /// A CONNACK arrived: subscribe (its session-present flag).
    must_subscribe: Option<bool>,
    /// The filters the broker's session holds, and the file that remembers them.
    held: HeldFilters,
    held_path: Option<PathBuf>,
    /// SUBSCRIBE requests not yet on the wire, then by packet id until their SUBACK.
    subscribing: VecDeque<Vec<String>>,
    subscribed: VecDeque<(u16, Vec<String>)>,
    /// Health reports to publish (never spooled) and their relative topic.
    health: Option<(mpsc::Receiver<Vec<u8>>, String)>,
}

impl Publisher {
    pub fn new(
        spool: Spool,
        identity: &IdentityWatch,
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
        let flow = Flow::new(
            rules,
            Batcher::new(batch),
            batch.linger,
            settings.max_in_flight,
            quota,
        );
        let publisher = Publisher {
            spool,
            sessions: identity.sessions.clone(),
            refusals: identity.refusals.clone(),
            refresh_wanted: identity.refresh_wanted.clone(),
            settings,
            link,
            counters,
            limits,
            flow,
            downlink: None,
            received: Vec::new(),
            redeliveries: Redeliveries::default(),
            store_retry_at: None,
            store_delay: STORE_DELAY,
            refused_filters: watch::channel(Vec::new()).0,
            report: watch::channel(LinkReport::default()).0,
            must_subscribe: None,
            held: HeldFilters::default(),
            held_path: None,
            subscribing: VecDeque::new(),
            subscribed: VecDeque::new(),
            health: None,
        };
        (publisher, link_rx, counters_rx)
    }

    /// Receives what IoT Core sends to `inbound`'s filters into `downlink`'s inbox; the
    /// filters the broker's session holds are remembered in `state_dir`.
    pub fn with_downlink(
        mut self,
        downlink: Downlink,
        inbound: Inbound,
        state_dir: &Path,
    ) -> Publisher {
        let path = state_dir.join(HELD_FILTERS_FILE);
        self.held = HeldFilters::load(&path);
        self.held_path = Some(path);
        self.downlink = Some((downlink, inbound));
        self
    }

    /// Downlink filters the broker refused, as `status` shows them.
    pub fn refused_filters(&self) -> watch::Receiver<Vec<String>> {
        self.refused_filters.subscribe()
    }

    /// The MQTT side's last error, connection time and reconnects.
    pub fn link_report(&self) -> watch::Receiver<LinkReport> {
        self.report.subscribe()
    }

    /// Publishes the health reports from `reports` to the relative `topic`.
    pub fn with_health(mut self, reports: mpsc::Receiver<Vec<u8>>, topic: String) -> Publisher {
        self.health = Some((reports, topic));
        self
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
            let delay = match ended {
                Ended::Drained => return,
                Ended::Renew => {
                    backoff.reset();
                    RECONNECT_FLOOR.saturating_sub(started.elapsed())
                }
                Ended::Failed(error) => {
                    self.connection_failed(error, &session, started, &mut backoff, &mut repeats)
                }
            };
            if self
                .back_off(delay, started, &mut stopping, &heartbeat)
                .await
            {
                return;
            }
        }
    }

    /// A connection failed: says so (once per kind of outage), asks for the IoT policy again
    /// when the broker keeps closing right after CONNECT, and returns the delay before the
    /// next connect.
    fn connection_failed(
        &mut self,
        error: String,
        session: &Session,
        started: Instant,
        backoff: &mut Backoff,
        repeats: &mut Repeats,
    ) -> Duration {
        self.report.send_modify(|report| {
            report.last_error = Some(error.clone());
            report.last_error_at = Some(std::time::SystemTime::now());
        });
        if self.flow.take_reattach_due() {
            tracing::warn!(
                identity_id = %session.identity_id,
                closes = REATTACH_AFTER_CLOSES,
                "IoT Core closed the connection right after CONNECT {REATTACH_AFTER_CLOSES} times without a CONNACK in between (what it does when no attached IoT policy allows iot:Connect): asking for the IoT policy to be attached again (at most every 5 minutes)"
            );
            self.refusals.raise();
        }
        if started.elapsed() > RECONNECT_CAP || self.flow.take_buried_head() {
            // A long-lived connection, or the cause of the drops is out of the
            // queue now: start the delays over.
            backoff.reset();
        }
        let delay = backoff.next_delay();
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
        delay
    }

    /// Waits `delay` before the next connect (never sooner than one second after the last
    /// one: IoT Core's connect rate per client id). SIGTERM cuts a long wait short, so the
    /// drain does not outlast `drain_timeout`. `true` when there is nothing left to deliver.
    async fn back_off(
        &mut self,
        delay: Duration,
        started: Instant,
        stopping: &mut watch::Receiver<bool>,
        heartbeat: &Heartbeat,
    ) -> bool {
        let was_stopping = *stopping.borrow();
        let delay = if was_stopping {
            // The drain has little time: keep trying, at IoT Core's connect rate.
            delay.min(RECONNECT_FLOOR)
        } else {
            delay
        };
        let spool = self.spool.clone();
        heartbeat
            .waiting(async {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => false,
                    stopped = backoff_interrupted(stopping, &spool, was_stopping) => {
                        tokio::time::sleep_until(started + RECONNECT_FLOOR).await;
                        stopped
                    }
                }
            })
            .await
    }

    /// A websocket upgrade refused with 403 while this device's clock is far off the server's
    /// ([`Refusal::ClockSkew`]): SigV4 signatures are refused, and no retry helps until the
    /// clock is fixed. Says so once per episode, and shows it in `status`.
    fn diagnose_skew(&self, skew: i64) {
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

    /// The session to sign the next connect with: the latest one, when its credentials are
    /// not due for a refresh; else, after asking for a refresh, a fresh one, or if none comes
    /// within [`REFRESH_WAIT`] the one at hand while it is valid for [`MIN_SIGNING_VALIDITY`].
    async fn wait_for_session(&mut self) -> Arc<Session> {
        loop {
            let latest = self.sessions.borrow_and_update().clone();
            if let Some(session) = latest {
                let usable = session.credentials.valid_for(MIN_SIGNING_VALIDITY);
                if usable && std::time::SystemTime::now() < session.refresh_at {
                    return session;
                }
                self.refresh_wanted.raise();
                if usable {
                    match tokio::time::timeout(REFRESH_WAIT, self.sessions.changed()).await {
                        Ok(Ok(())) => continue,
                        Ok(Err(_)) => std::future::pending::<()>().await,
                        // Still valid (checked again: the wait took time).
                        Err(_) if session.credentials.valid_for(MIN_SIGNING_VALIDITY) => {
                            return session;
                        }
                        Err(_) => continue,
                    }
                }
            }
            if self.sessions.changed().await.is_err() {
                // The identity manager is gone; the daemon is shutting down.
                std::future::pending::<()>().await;
            }
        }
    }

    /// One connection: does what the flow decides, and tells it what happened.
    async fn run_connection(
        &mut self,
        session: &Session,
        stopping: &mut watch::Receiver<bool>,
        heartbeat: &Heartbeat,
    ) -> Ended {
        let mut connection = match self.open_connection(session) {
            Ok(connection) => connection,
            Err(ended) => return ended,
        };
        let mut spool_stats = self.spool.stats();
        let mut identity_gone = false;
        let mut beat = tokio::time::interval(BEAT_EVERY);
        let mut reading: Option<PendingRead> = None;
        loop {
            heartbeat.beat();
            let wake_at = match self.act(&mut connection, &mut reading, stopping).await {
                Ok(wake_at) => wake_at,
                Err(ended) => return ended,
            };
            tokio::select! {
                event = connection.events.recv() => {
                    self.on_events(event, &mut connection, session).await;
                }
                Some(report) = next_report(&mut self.health) => self.offer_health_report(report),
                read = read_done(&mut reading) => match read {
                    Ok(read) => self.flow.on_read(read),
                    Err(_) => self.flow.on_read_failed(Instant::now()),
                },
                _ = tokio::time::sleep_until(wake_at.unwrap_or_else(Instant::now)), if wake_at.is_some() => {}
                _ = tokio::time::sleep_until(self.store_retry_at.unwrap_or_else(Instant::now)), if self.store_retry_at.is_some() => {
                    self.store_retry_at = None;
                    self.subscribe_and_store(&connection, session).await;
                }
                changed = spool_stats.changed(), if self.flow.listens_to_spool() => {
                    if changed.is_err() {
                        return Ended::Failed("spool closed".into());
                    }
                    self.flow.on_spool_changed();
                }
                changed = stopping.changed() => {
                    if changed.is_err() {
                        return Ended::Drained;
                    }
                }
                changed = self.sessions.changed(), if self.flow.listens_to_sessions() && !identity_gone => {
                    identity_gone = changed.is_err();
                    let renew = changed.is_ok()
                        && mqtt::needs_new_connection(session, self.sessions.borrow().as_deref());
                    if renew && self.flow.renew(Instant::now()) {
                        tracing::info!("the identity changed or was withdrawn: reconnecting once in-flight messages are acknowledged");
                    }
                }
                _ = beat.tick() => {}
            }
        }
    }

    /// Opens a connection with `session`, and forgets what belonged to the last one.
    fn open_connection(&mut self, session: &Session) -> Result<mqtt::Connection, Ended> {
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
        let endpoint = mqtt::host_of(&self.settings.broker_url(session));
        self.report
            .send_if_modified(|report| report.endpoint.replace(endpoint.clone()) != Some(endpoint));
        let connection = match mqtt::connect(&self.settings, session) {
            Ok(connection) => connection,
            Err(error) => return Err(Ended::Failed(error.to_string())),
        };
        self.flow.connect(&session.identity_id, Instant::now());
        // Packet ids belong to their connection: what the last one left unacknowledged the
        // broker sends again.
        self.received.clear();
        self.redeliveries.connected();
        // A health report made before this connection describes the old one (it may predate
        // an outage the next report will tell of): the next tick makes a fresh one.
        if let Some((reports, _)) = &mut self.health {
            while reports.try_recv().is_ok() {}
        }
        self.store_retry_at = None;
        self.must_subscribe = None;
        self.subscribing.clear();
        self.subscribed.clear();
        Ok(connection)
    }

    /// What the event loop reported and whatever else already waits, then the subscribing
    /// and storing that asks for.
    async fn on_events(
        &mut self,
        event: Option<Result<Event, rumqttc::ConnectionError>>,
        connection: &mut mqtt::Connection,
        session: &Session,
    ) {
        self.on_event(event, session);
        // Take whatever else is already waiting before deciding again.
        while let Ok(event) = connection.events.try_recv() {
            self.on_event(Some(event), session);
        }
        self.subscribe_and_store(connection, session).await;
    }

    /// A health report goes out on this connection, or not at all: it is never spooled.
    fn offer_health_report(&mut self, report: Vec<u8>) {
        let topic = self
            .health
            .as_ref()
            .map(|(_, topic)| topic.clone())
            .unwrap_or_default();
        if !self.flow.offer_unspooled(topic, report) {
            tracing::debug!("health report dropped: not connected");
        }
    }

    /// Carries out the flow's actions until it waits; `Err` when the connection ended.
    async fn act(
        &mut self,
        connection: &mut mqtt::Connection,
        reading: &mut Option<PendingRead>,
        stopping: &watch::Receiver<bool>,
    ) -> Result<Option<Instant>, Ended> {
        if self.limits.has_changed().unwrap_or(false) {
            let limits = self.limits.borrow_and_update();
            self.flow.set_limits(
                limits.max_publishes_per_second,
                limits.max_bytes_per_second.0,
            );
        }
        loop {
            let spool = *self.spool.stats().borrow();
            let outside = Outside {
                stopping: *stopping.borrow(),
                spool_empty: spool.messages == 0,
                last_high_id: spool.last_high_id,
            };
            match self.flow.next(Instant::now(), outside) {
                Action::Read {
                    after,
                    max_messages,
                    max_bytes,
                } => {
                    let spool = self.spool.clone();
                    *reading = Some(Box::pin(async move {
                        spool.read_after(after, max_messages, max_bytes).await
                    }));
                }
                Action::Publish(publish) => {
                    if let Err(error) = send(connection, publish, &self.counters) {
                        self.flow
                            .fail(format!("publish queue: {error}"), Failure::Other);
                    }
                }
                Action::Remove(ids) => {
                    let count = ids.len() as u64;
                    self.spool.remove(ids);
                    self.counters.send_modify(|c| c.published_total += count);
                }
                Action::Bury(burial) => {
                    tracing::warn!(
                        topic = %burial.topic,
                        reason = %burial.reason,
                        messages = burial.ids.len(),
                        "message moved to the dead letters; `iot-cognito-relay dead-letters` lists, requeues or purges them"
                    );
                    self.spool.bury(burial.ids, burial.reason).await;
                }
                Action::End(ended) => {
                    if !matches!(ended, Ended::Failed(_)) {
                        close(connection).await;
                    }
                    return Err(ended);
                }
                Action::Wait(wake_at) => return Ok(wake_at),
            }
        }
    }

    /// Tells the flow what the event loop reported; a connection error ends the connection.
    fn on_event(
        &mut self,
        event: Option<Result<Event, rumqttc::ConnectionError>>,
        session: &Session,
    ) {
        match event {
            Some(Ok(Event::Incoming(Packet::Publish(publish)))) => self.received.push(publish),
            Some(Ok(Event::Outgoing(Outgoing::Subscribe(packet_id)))) => {
                // Packet ids are assigned in request order.
                // Packet ids wrap and are shared with publishes: matched oldest first.
                if let Some(filters) = self.subscribing.pop_front() {
                    self.subscribed.push_back((packet_id, filters));
                }
            }
            Some(Ok(Event::Incoming(Packet::SubAck(ack)))) => self.on_suback(&ack),
            Some(Ok(event)) => {
                if let Event::Incoming(Packet::ConnAck(ack)) = &event
                    && ack.code == ConnectReturnCode::Success
                {
                    self.must_subscribe = Some(ack.session_present);
                }
                let Some(event) = broker_event(event) else {
                    return;
                };
                if event == BrokerEvent::Connected {
                    self.report.send_modify(|report| {
                        if report.last_connected_at.is_some() {
                            report.reconnects_total += 1;
                        }
                        report.last_connected_at = Some(std::time::SystemTime::now());
                    });
                    self.refusals.clear();
                    self.link.send_replace(LinkState::Connected);
                    tracing::info!(identity_id = %session.identity_id, state = "connected", "connected to the broker");
                }
                self.flow.on_broker(event, Instant::now());
            }
            Some(Err(error)) => {
                match Refusal::classify(&error, std::time::SystemTime::now()) {
                    Refusal::Authorization => self.refusals.raise(),
                    Refusal::ClockSkew { server_ahead_s } => {
                        self.diagnose_skew(server_ahead_s);
                        // The upgrade was refused all the same: the identity manager is told,
                        // as of any refusal (its hold-off bounds the attaches this asks for).
                        self.refusals.raise();
                    }
                    Refusal::Other => {}
                }
                self.flow.fail(error.to_string(), mqtt::failure(&error));
            }
            None => self.flow.fail("event loop stopped".into(), Failure::Other),
        }
    }
}

impl Publisher {
    /// A SUBACK: granted filters are held by the session from now on (remembered on disk);
    /// a refused one (the IoT policy denies it) is said in the log.
    fn on_suback(&mut self, ack: &rumqttc::SubAck) {
        let Some(at) = self.subscribed.iter().position(|(id, _)| *id == ack.pkid) else {
            return;
        };
        let Some((_, filters)) = self.subscribed.remove(at) else {
            return;
        };
        let granted: Vec<bool> = ack
            .return_codes
            .iter()
            .map(|code| matches!(code, SubscribeReasonCode::Success(_)))
            .collect();
        let refused = self.held.on_suback(&filters, &granted);
        for filter in &refused {
            tracing::warn!(%filter, "the broker refused this downlink subscription (SUBACK failure: the IoT policy does not allow it); nothing arrives on it, subscribing again at the next connect");
        }
        if let Some((_, inbound)) = &self.downlink {
            let identity = self.held.identity_id().to_owned();
            let relative = |filter: &String| inbound.relative(&identity, filter);
            self.refused_filters.send_if_modified(|shown| {
                let before = shown.clone();
                shown.retain(|f| !filters.iter().map(relative).any(|r| r == *f));
                shown.extend(refused.iter().map(relative));
                shown.sort();
                shown.dedup();
                *shown != before
            });
        }
        self.save_held();
    }

    /// Writes what the broker's session holds; a failure means subscribing again next time.
    fn save_held(&self) {
        if let Some(path) = &self.held_path
            && let Err(error) = self.held.save(path)
        {
            tracing::warn!(%error, path = %path.display(), "cannot remember the subscribed filters; the next start subscribes to them again");
        }
    }

    /// After a CONNACK: subscribes to the downlink filters. Then commits what was received to
    /// the inbox and only then acknowledges it to the broker; after a failed commit the
    /// messages stay unacknowledged and are committed again after a pause.
    async fn subscribe_and_store(&mut self, connection: &mqtt::Connection, session: &Session) {
        if self.downlink.is_none() {
            // Nothing subscribed, so nothing should come; acknowledge any stray message.
            for publish in std::mem::take(&mut self.received) {
                let _ = connection.client.try_ack(&publish);
            }
            return;
        }
        if let Some(session_present) = self.must_subscribe.take()
            && !self.subscribe(connection, session, session_present)
        {
            return;
        }
        if self.store_retry_at.is_some() {
            return;
        }
        while !self.received.is_empty() {
            if !self.store_batch(connection, session).await {
                return;
            }
        }
    }

    /// Subscribes to the downlink filters the broker's session does not hold; `false` when
    /// the connection is ending.
    fn subscribe(
        &mut self,
        connection: &mqtt::Connection,
        session: &Session,
        session_present: bool,
    ) -> bool {
        let Some((_, inbound)) = &self.downlink else {
            return true;
        };
        let wanted = inbound.subscriptions(&session.identity_id);
        let before = self.held.clone();
        let filters = self
            .held
            .after_connack(&session.identity_id, &wanted, session_present);
        if self.held != before {
            // A new session holds nothing: on disk before anything can be granted, so a
            // restart within this connection cannot believe the old filters held.
            self.save_held();
        }
        tracing::info!(
            session_present,
            filters = filters.len(),
            held = wanted.len() - filters.len(),
            "subscribing to the downlink topics the session does not hold"
        );
        for chunk in filters.chunks(FILTERS_PER_SUBSCRIBE) {
            self.subscribing.push_back(chunk.to_vec());
            let chunk = chunk
                .iter()
                .map(|filter| SubscribeFilter::new(filter.clone(), QoS::AtLeastOnce));
            if let Err(error) = connection.client.try_subscribe_many(chunk) {
                self.flow
                    .fail(format!("subscribe: {error}"), Failure::Other);
                return false;
            }
        }
        true
    }

    /// Commits the next received messages to the inbox, then acknowledges them; `false` when
    /// the rest must wait (the inbox failed: stored later) or the connection is ending.
    async fn store_batch(&mut self, connection: &mqtt::Connection, session: &Session) -> bool {
        let Some((downlink, inbound)) = &self.downlink else {
            return false;
        };
        let take = self.received.len().min(MAX_RECEIVE_BATCH);
        let batch: Vec<rumqttc::Publish> = self.received.drain(..take).collect();
        let (messages, stored) =
            to_store(&batch, inbound, &self.redeliveries, &session.identity_id);
        if let Err(error) = downlink.receive(messages).await {
            // Kept unacknowledged on this connection and stored later: tearing it down
            // would only bring the same messages back at once (a persistent session
            // redelivers after the CONNACK) and stop the uplink with it.
            tracing::warn!(%error, retry_in_ms = self.store_delay.as_millis() as u64, "cannot store received messages; they stay unacknowledged and are stored later");
            self.received.splice(0..0, batch);
            self.store_retry_at = Some(Instant::now() + self.store_delay);
            self.store_delay = (self.store_delay * 2).min(MAX_STORE_DELAY);
            return false;
        }
        self.store_delay = STORE_DELAY;
        for publish in stored {
            self.redeliveries
                .stored(publish.pkid, &publish.topic, &publish.payload);
        }
        for publish in &batch {
            if let Err(error) = connection.client.try_ack(publish) {
                self.received.clear();
                self.flow
                    .fail(format!("ack queue: {error}"), Failure::Other);
                return false;
            }
        }
        true
    }
}

/// What of `batch` goes into the inbox (relative topic and payload), and the publishes it
/// came from. A redelivery of a message stored lately is left out (it keeps its `seq`), and
/// so is a message outside this device's prefix; both are acknowledged all the same.
fn to_store<'a>(
    batch: &'a [rumqttc::Publish],
    inbound: &Inbound,
    redeliveries: &Redeliveries,
    identity_id: &str,
) -> (Vec<(String, Vec<u8>)>, Vec<&'a rumqttc::Publish>) {
    let mut messages = Vec::with_capacity(batch.len());
    let mut stored = Vec::with_capacity(batch.len());
    for publish in batch {
        let topic = &publish.topic;
        if redeliveries.is_redelivery(publish.dup, publish.pkid, topic, &publish.payload) {
            tracing::debug!(%topic, packet_id = publish.pkid, "the broker sent a stored message again; acknowledged, kept with its seq");
            continue;
        }
        match inbound.classify(identity_id, topic) {
            Received::Store(relative) => {
                messages.push((relative, publish.payload.to_vec()));
                stored.push(publish);
            }
            Received::Foreign => {
                tracing::warn!(%topic, "received a message outside this device's prefix; dropped")
            }
        }
    }
    (messages, stored)
}

/// The running read's result; never, when none runs.
async fn read_done(reading: &mut Option<PendingRead>) -> Result<ReadBatch, ReadError> {
    let Some(read) = reading.as_mut() else {
        return std::future::pending().await;
    };
    let done = read.await;
    *reading = None;
    done
}

/// The next health report, if reports are on (otherwise never).
async fn next_report(health: &mut Option<(mpsc::Receiver<Vec<u8>>, String)>) -> Option<Vec<u8>> {
    match health {
        Some((reports, _)) => reports.recv().await,
        None => std::future::pending().await,
    }
}

/// Hands one publish to the MQTT client and counts republishes.
fn send(
    connection: &mqtt::Connection,
    publish: Publish,
    counters: &watch::Sender<PublishCounters>,
) -> Result<(), rumqttc::ClientError> {
    let qos = match publish.qos {
        Qos::AtMostOnce => QoS::AtMostOnce,
        Qos::AtLeastOnce => QoS::AtLeastOnce,
    };
    connection
        .client
        .try_publish(publish.topic, qos, false, publish.payload)?;
    if publish.republished > 0 {
        counters.send_modify(|c| c.republished_total += publish.republished);
    }
    Ok(())
}

/// The part of rumqttc's events that the flow decides on.
fn broker_event(event: Event) -> Option<BrokerEvent> {
    match event {
        Event::Incoming(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => {
            Some(BrokerEvent::Connected)
        }
        Event::Incoming(Packet::ConnAck(ack)) => {
            Some(BrokerEvent::Refused(format!("{:?}", ack.code)))
        }
        Event::Outgoing(Outgoing::Publish(packet_id)) => Some(BrokerEvent::Sent(packet_id)),
        Event::Incoming(Packet::PubAck(ack)) => Some(BrokerEvent::Acked(ack.pkid)),
        _ => None,
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
async fn close(connection: &mut mqtt::Connection) {
    let _ = connection.client.try_disconnect();
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(Ok(_)) = connection.events.recv().await {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const POOL: &str = "us-east-1:0b7c5a57-6a4f-4a62-9d36-3f1c0e3b6a11";
    const IDENTITY: &str = "us-east-1:9f0e3a2b-1c4d-4e5f-8a9b-0c1d2e3f4a5b";

    fn received(topic: &str, packet_id: u16, dup: bool) -> rumqttc::Publish {
        let mut publish = rumqttc::Publish::new(topic, QoS::AtLeastOnce, b"on".to_vec());
        publish.pkid = packet_id;
        publish.dup = dup;
        publish
    }

    #[test]
    fn only_new_messages_under_the_device_prefix_go_to_the_inbox() {
        let rules = Arc::new(TopicRules::new(
            "{identity_pool_id}/{identity_id}",
            POOL,
            "us-east-1",
        ));
        let inbound = Inbound::new(rules, vec!["commands/#".into()]);
        let mut redeliveries = Redeliveries::default();
        let mine = format!("{POOL}/{IDENTITY}/commands/light");
        redeliveries.stored(1, &mine, b"on");
        let batch = [
            received(&mine, 1, true),
            received("someone/else/commands/light", 2, false),
            received(&mine, 3, false),
        ];
        let (messages, stored) = to_store(&batch, &inbound, &redeliveries, IDENTITY);
        assert_eq!(messages, [("commands/light".to_owned(), b"on".to_vec())]);
        assert_eq!(
            stored
                .iter()
                .map(|publish| publish.pkid)
                .collect::<Vec<_>>(),
            [3]
        );
    }
}
