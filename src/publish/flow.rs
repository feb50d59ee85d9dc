//! The publisher's decisions, as data: what to read from the spool, what to publish and when,
//! what the broker has acknowledged, and when a connection ends. No I/O and no clock of its
//! own: the publisher's loop (`publisher.rs`) asks [`Flow::next`] what to do at `now`, does
//! it, and reports back what happened. So linger, quotas, the in-flight window, renewal and
//! the drain are unit-tested here without a broker, a spool or a runtime.
//!
//! A `Flow` lives as long as the publisher: IoT Core's quotas, the republish count and the
//! dead-letter strikes carry over reconnects. [`Flow::connect`] starts each connection's part
//! afresh from the oldest message still in the spool: rumqttc forgets unacknowledged
//! publishes when the broker reports no session, so republishing is ours to do (duplicates are
//! allowed, loss is not).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::message::Priority;
use crate::message::Qos;
use crate::publish::batch::{Batcher, Outgoing};
use crate::publish::quota::Quota;
use crate::spool::{Cursors, ReadBatch};
use crate::topic::TopicRules;

/// SigV4 websocket connections are cut after 24 hours; from this age on, a connection is
/// renewed at its first quiet moment (nothing in flight), so nothing is sent twice...
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(23 * 3600);
/// ...and at the latest this much later, whatever is in flight.
pub const QUIET_MOMENT_WAIT: Duration = Duration::from_secs(30 * 60);
/// A planned reconnect waits at most this long for in-flight publishes to be acknowledged.
pub const RENEW_GRACE: Duration = Duration::from_secs(10);
/// A publish without PUBACK for this long means the connection is stuck: reconnect, republish.
/// On a slow link each publish also gets the time to send what is ahead of it, itself
/// included, at [`SLOWEST_LINK_BYTES_PER_S`]: a backlog of large publishes on a cellular
/// uplink is slow, not stuck.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// The slowest uplink the deadlines allow for: 8 kbit/s (a weak GPRS or NB-IoT uplink).
pub const SLOWEST_LINK_BYTES_PER_S: u64 = 1024;
/// At most this many spool messages are read at once (the read is also bounded in bytes).
pub const MAX_READ: usize = 4096;
/// While high-priority messages wait, a normal one may go out only after this many high ones
/// since the last normal one: alarms overtake the backlog, and a steady stream of them still
/// lets the backlog move (no promotion by age: an old normal message is not an alarm).
pub const HIGH_BEFORE_NORMAL: u32 = 10;
/// After a failed spool read, the next try comes this much later.
pub const SPOOL_READ_RETRY: Duration = Duration::from_secs(1);
/// The oldest message goes to the dead letters once the broker closed this many connections
/// in a row while it was out unacknowledged: IoT Core disconnects a client that publishes
/// where its policy forbids, so such a message would otherwise hold back the queue forever.
pub const DEAD_LETTER_STRIKES: u32 = 5;
/// After the broker closed this many connections in a row right after CONNECT (no CONNACK),
/// the policy attachment is taken as lost and attached again. That close is IoT Core's only
/// answer to an identity no attached policy lets connect; one or two can be a broker-side
/// restart, three at growing delays (1, 2, 4 s) are not.
pub const REATTACH_AFTER_CLOSES: u32 = 3;

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Shutdown: the spool is empty and nothing is in flight.
    Drained,
    /// A planned reconnect (another identity, or the 24-hour limit).
    Renew,
    /// The connection failed or could not be made.
    Failed(String),
}

/// How a connection failed, as far as the strikes and the policy attachment care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The broker closed an MQTT connection it had let in (TCP, TLS and the websocket upgrade
    /// went through). Before the CONNACK it is IoT Core's answer to an identity that no
    /// attached policy lets connect; after it, to a publish its policy denies.
    Closed,
    /// The network, TLS, the upgrade, a timeout, a local error: says nothing of the policy.
    Other,
}

/// What the broker's side of a connection reports, as far as publishing cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerEvent {
    /// CONNACK with success.
    Connected,
    /// CONNACK with an error code.
    Refused(String),
    /// A publish went on the wire with this packet id (ids are assigned in request order).
    Sent(u16),
    /// PUBACK for this packet id.
    Acked(u16),
}

/// What the daemon's other parts say, read at each decision.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outside {
    /// SIGTERM: drain, then end.
    pub stopping: bool,
    /// The spool holds no message (acknowledged ones are removed).
    pub spool_empty: bool,
    /// The highest high-priority id the spool ever accepted: one beyond what is planned or
    /// sent is read at once, ahead of planned normal publishes.
    pub last_high_id: i64,
}

/// One publish for the loop to hand to the MQTT client.
#[derive(Debug, PartialEq)]
pub struct Publish {
    pub topic: String,
    pub qos: Qos,
    pub payload: Vec<u8>,
    /// How many of its messages went out before (on an earlier connection).
    pub republished: u64,
}

/// Spool messages IoT Core will never accept, for the dead letters.
#[derive(Debug, PartialEq)]
pub struct Burial {
    pub ids: Vec<i64>,
    pub topic: String,
    pub reason: String,
}

/// The next thing the loop does.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Read messages after the cursors, then report with [`Flow::on_read`].
    Read {
        after: Cursors,
        max_messages: usize,
        max_bytes: usize,
    },
    Publish(Publish),
    /// Acknowledged (or sent, for QoS 0): remove these from the spool.
    Remove(Vec<i64>),
    Bury(Burial),
    /// Close the connection (cleanly unless `Failed`) and report how it ended.
    End(Ended),
    /// Nothing to do until an event, or until this moment.
    Wait(Option<Instant>),
}

/// The oldest message and how many connections in a row dropped while it was out.
struct Strikes {
    first_id: i64,
    count: u32,
}

/// See the module docs.
pub struct Flow {
    rules: Arc<TopicRules>,
    batcher: Batcher,
    linger: Duration,
    max_in_flight: usize,
    /// IoT Core's per-connection quotas, kept across reconnects.
    quota: Quota,
    /// Highest spool id of each priority ever handed to a connection; ids at or below it
    /// are republishes.
    highest_sent: Cursors,
    /// High-priority publishes since the last normal one (see [`HIGH_BEFORE_NORMAL`]).
    high_streak: u32,
    /// See [`DEAD_LETTER_STRIKES`].
    strikes: Option<Strikes>,
    /// The oldest message of a connection the broker closed while it was out: a strike once
    /// the next CONNACK shows the policy is still attached (until then the close may have
    /// been the attachment's fault, not the message's).
    unconfirmed_strike: Option<(Vec<i64>, String)>,
    /// Connections in a row the broker closed before its CONNACK (see [`REATTACH_AFTER_CLOSES`]).
    closed_before_connack: u32,
    /// The policy attachment looks lost: attach it again.
    reattach_due: bool,
    /// The last failed connection's oldest message went to the dead letters.
    buried_head: bool,
    link: Link,
}

/// One connection's part of the flow.
struct Link {
    identity_id: String,
    opened: Instant,
    connected: bool,
    /// Spool messages up to these ids (per priority) are planned or sent on this connection.
    cursors: Cursors,
    /// The spool may hold messages after `cursors` that were not read yet.
    unread: bool,
    /// The last read filled its limit: more are right behind.
    more_behind: bool,
    /// A read is out; what it brings comes after every planned publish.
    reading: bool,
    /// No read before this moment (the last one failed).
    read_retry_at: Option<Instant>,
    /// How many publishes the last read planned: the next read goes out once half of that
    /// is left (see [`Flow::read_ahead`]).
    last_read_plans: usize,
    /// Planned publishes not sent yet (window full, quota, linger): high-priority ones first,
    /// each priority oldest first.
    ready: VecDeque<Outgoing>,
    /// An open array waiting for `linger`: (its first spool id, when it was first seen).
    held: Option<(i64, Instant)>,
    paced_until: Option<Instant>,
    lingering_until: Option<Instant>,
    renew_by: Option<Instant>,
    window: Window,
    /// The first publish of this connection (the oldest message) and its full topic.
    head: Option<(Vec<i64>, String)>,
    /// A dead letter to hand out before the end it caused.
    burial: Option<Burial>,
    ended: Option<Ended>,
    /// A message that is not in the spool (the health report): (relative topic, payload).
    /// Sent QoS 0 ahead of the spool when the quota allows; gone with the connection.
    unspooled: Option<(String, Vec<u8>)>,
}

impl Link {
    fn new(identity_id: &str, now: Instant) -> Link {
        Link {
            identity_id: identity_id.to_owned(),
            opened: now,
            connected: false,
            cursors: Cursors::default(),
            unread: true,
            more_behind: false,
            reading: false,
            read_retry_at: None,
            last_read_plans: 0,
            ready: VecDeque::new(),
            held: None,
            paced_until: None,
            lingering_until: None,
            renew_by: None,
            window: Window::default(),
            head: None,
            burial: None,
            ended: None,
            unspooled: None,
        }
    }
}

impl Flow {
    pub fn new(
        rules: Arc<TopicRules>,
        batcher: Batcher,
        linger: Duration,
        max_in_flight: u16,
        quota: Quota,
    ) -> Flow {
        Flow {
            rules,
            batcher,
            linger,
            max_in_flight: usize::from(max_in_flight.max(1)),
            quota,
            highest_sent: Cursors::default(),
            high_streak: 0,
            strikes: None,
            unconfirmed_strike: None,
            closed_before_connack: 0,
            reattach_due: false,
            buried_head: false,
            link: Link::new("", Instant::now()),
        }
    }

    /// A new connection for `identity_id` begins: it starts from the oldest spool message.
    pub fn connect(&mut self, identity_id: &str, now: Instant) {
        self.link = Link::new(identity_id, now);
    }

    /// New quota limits (SIGHUP).
    pub fn set_limits(&mut self, max_publishes: u32, max_bytes: u64) {
        self.quota.set_limits(max_publishes, max_bytes);
    }

    /// Whether news from the spool could change a decision now (else the loop need not wake):
    /// while paced, only if it would start a read ahead.
    pub fn listens_to_spool(&self) -> bool {
        let link = &self.link;
        link.connected && link.renew_by.is_none() && (link.paced_until.is_none() || !link.unread)
    }

    /// Whether a change of identity would schedule a reconnect (one is not scheduled already).
    pub fn listens_to_sessions(&self) -> bool {
        self.link.renew_by.is_none()
    }

    /// Whether the broker's closes say the policy attachment is lost, so it should be
    /// attached again. Reading it clears it.
    pub fn take_reattach_due(&mut self) -> bool {
        std::mem::take(&mut self.reattach_due)
    }

    /// Whether a strike since the last read sent the oldest message to the dead letters
    /// (then the reconnect delays start over). Reading it clears it.
    pub fn take_buried_head(&mut self) -> bool {
        std::mem::take(&mut self.buried_head)
    }

    /// A message to publish once (QoS 0) on this connection, never spooled: the health report.
    /// A newer one replaces one still waiting; the connection's end drops it. `false` when
    /// not connected (then it is dropped at once: a stale report is noise).
    pub fn offer_unspooled(&mut self, topic: String, payload: Vec<u8>) -> bool {
        if !self.link.connected || self.link.ended.is_some() {
            return false;
        }
        self.link.unspooled = Some((topic, payload));
        true
    }

    /// The spool changed: new messages may be there, and may fill a lingering array.
    pub fn on_spool_changed(&mut self) {
        self.link.unread = true;
        self.link.lingering_until = None;
    }

    /// Reconnect once in-flight publishes are acknowledged (the identity changed).
    /// `false` if a reconnect was already scheduled.
    pub fn renew(&mut self, now: Instant) -> bool {
        if self.link.renew_by.is_some() {
            return false;
        }
        self.link.renew_by = Some(now + RENEW_GRACE);
        true
    }

    pub fn on_read(&mut self, read: ReadBatch) {
        let link = &mut self.link;
        link.reading = false;
        link.more_behind = read.more;
        // News that came while the read was out is kept: it may be after what was read.
        link.unread |= link.more_behind;
        let planned = self.batcher.plan(read.messages);
        link.last_read_plans = planned.len();
        for outgoing in planned {
            // High-priority publishes go ahead of every planned normal one.
            let at = match outgoing.priority {
                Priority::High => link
                    .ready
                    .iter()
                    .position(|o| o.priority == Priority::Normal)
                    .unwrap_or(link.ready.len()),
                Priority::Normal => link.ready.len(),
            };
            link.ready.insert(at, outgoing);
        }
    }

    /// Not an empty spool: look again shortly (the spool reports the fault itself). What is
    /// planned still goes out.
    pub fn on_read_failed(&mut self, now: Instant) {
        self.link.reading = false;
        self.link.unread = true;
        self.link.read_retry_at = Some(now + SPOOL_READ_RETRY);
    }

    pub fn on_broker(&mut self, event: BrokerEvent, now: Instant) {
        let window = &mut self.link.window;
        match event {
            BrokerEvent::Connected => {
                self.link.connected = true;
                self.closed_before_connack = 0;
                if let Some((ids, topic)) = self.unconfirmed_strike.take() {
                    self.link.burial = self.strike(ids, topic);
                }
            }
            BrokerEvent::Refused(code) => {
                self.fail(
                    format!("broker refused the connection: {code}"),
                    Failure::Other,
                );
            }
            BrokerEvent::Sent(packet_id) => {
                if let Some((ids, qos, bytes)) = window.unassigned.pop_front() {
                    match qos {
                        Qos::AtMostOnce => window.delivered.extend(ids),
                        Qos::AtLeastOnce => {
                            let ahead = window.in_flight_bytes() + bytes;
                            let deadline = now + ack_deadline(ahead);
                            window.in_flight.insert(packet_id, (ids, deadline, bytes));
                        }
                    }
                }
            }
            BrokerEvent::Acked(packet_id) => {
                if let Some((ids, _, _)) = window.in_flight.remove(&packet_id) {
                    window.delivered.extend(ids);
                }
            }
        }
    }

    /// The connection failed (I/O, the client's queue, the event loop). The first failure
    /// reported is the one that counts. Only the broker's closes count against the oldest
    /// message or the policy attachment: never a timeout, a slow link or a local error.
    pub fn fail(&mut self, reason: String, failure: Failure) {
        if self.link.ended.is_some() {
            return;
        }
        match failure {
            Failure::Closed if !self.link.connected => {
                // The identity was turned away: the attachment is in doubt, not the message.
                self.unconfirmed_strike = None;
                self.closed_before_connack += 1;
                if self.closed_before_connack >= REATTACH_AFTER_CLOSES {
                    self.closed_before_connack = 0;
                    self.reattach_due = true;
                }
            }
            Failure::Closed => self.unconfirmed_strike = self.closed_on_head(),
            Failure::Other => {}
        }
        self.link.ended = Some(Ended::Failed(reason));
    }

    /// What to do at `now`. The loop calls it until it answers `Wait`.
    pub fn next(&mut self, now: Instant, outside: Outside) -> Action {
        if !self.link.window.delivered.is_empty() {
            // Acknowledged messages leave the spool even when the connection just ended.
            return Action::Remove(std::mem::take(&mut self.link.window.delivered));
        }
        if let Some(burial) = self.link.burial.take() {
            return Action::Bury(burial);
        }
        if let Some(ended) = self.link.ended.take() {
            return Action::End(ended);
        }
        self.expire_timers(now);
        if self.link.ended.is_some() {
            return self.next(now, outside);
        }
        if self.link.renew_by.is_some_and(|by| now >= by) {
            return Action::End(Ended::Renew);
        }
        if let Some(action) = self.send(now, outside) {
            return action;
        }
        if self.link.window.outstanding() == 0 {
            if outside.stopping && outside.spool_empty {
                return Action::End(Ended::Drained);
            }
            if self.link.connected && self.link.renew_by.is_some() {
                return Action::End(Ended::Renew);
            }
        }
        Action::Wait(self.wake_at(now))
    }

    /// Deadlines that passed: pacing and linger are over, the connection's age calls for a
    /// renewal, a publish waited too long for its PUBACK.
    fn expire_timers(&mut self, now: Instant) {
        let link = &mut self.link;
        if link.paced_until.is_some_and(|at| now >= at) {
            link.paced_until = None;
        }
        if link.lingering_until.is_some_and(|at| now >= at) {
            link.lingering_until = None;
        }
        if link.read_retry_at.is_some_and(|at| now >= at) {
            link.read_retry_at = None;
        }
        let aged = link.opened + MAX_CONNECTION_AGE;
        let quiet = link.window.outstanding() == 0;
        if link.renew_by.is_none() && now >= aged && (quiet || now >= aged + QUIET_MOMENT_WAIT) {
            tracing::info!("connection nears the 24-hour limit; reconnecting");
            link.renew_by = Some(now + RENEW_GRACE);
        }
        if link
            .window
            .earliest_deadline()
            .is_some_and(|deadline| now >= deadline)
        {
            self.fail(
                format!(
                    "no PUBACK in time ({}s, plus the time to send what was ahead at {} B/s)",
                    ACK_TIMEOUT.as_secs(),
                    SLOWEST_LINK_BYTES_PER_S
                ),
                Failure::Other,
            );
        }
    }

    /// The next read or publish, if the connection may send now.
    fn send(&mut self, now: Instant, outside: Outside) -> Option<Action> {
        if !self.link.connected || self.link.renew_by.is_some() {
            return None;
        }
        if let Some(read) = self.read_ahead(outside.last_high_id) {
            return Some(read);
        }
        let link = &mut self.link;
        if link.paced_until.is_some() || link.lingering_until.is_some() {
            return None;
        }
        let room = self.max_in_flight.saturating_sub(link.window.outstanding());
        if room == 0 {
            return None;
        }
        if let Some((relative, payload)) = link.unspooled.take() {
            let topic = self.rules.full_topic(&link.identity_id, &relative);
            let size = (topic.len() + payload.len()) as u64;
            if let Some(at) = self.quota.ready_at(size, now) {
                link.paced_until = Some(at);
                link.unspooled = Some((relative, payload));
                return None;
            }
            self.quota.record(size, now);
            // Tracked like any publish: packet ids are matched to requests in order.
            link.window
                .unassigned
                .push_back((Vec::new(), Qos::AtMostOnce, size));
            return Some(Action::Publish(Publish {
                topic,
                qos: Qos::AtMostOnce,
                payload,
                republished: 0,
            }));
        }
        self.publish_next(now, outside)
    }

    /// A read once the planned publishes run down to half of what the last read planned (or
    /// to one), while they still go out: its time (the spool thread may be committing a
    /// flood) overlaps pacing and acknowledgements instead of stopping the publishes. At most
    /// a read and a half is planned at once.
    fn read_ahead(&mut self, last_high_id: i64) -> Option<Action> {
        let link = &mut self.link;
        let planned_high = link
            .ready
            .iter()
            .rev()
            .find(|o| o.priority == Priority::High)
            .and_then(|o| o.ids.last().copied())
            .unwrap_or(link.cursors.high);
        let high_waits = last_high_id > planned_high;
        if link.reading
            || !link.unread
            || link.read_retry_at.is_some()
            || (link.ready.len() > (link.last_read_plans / 2).max(1) && !high_waits)
        {
            return None;
        }
        let mut after = link.cursors;
        for priority in [Priority::High, Priority::Normal] {
            let last = link.ready.iter().rposition(|o| o.priority == priority);
            // An open array at the end may still grow: it is planned again with what comes.
            let last = match last {
                Some(index) if link.ready[index].open => {
                    link.ready.remove(index);
                    link.ready.iter().rposition(|o| o.priority == priority)
                }
                other => other,
            };
            if let Some(id) = last.and_then(|index| link.ready[index].ids.last().copied()) {
                *after.of_mut(priority) = id;
            }
        }
        link.unread = false;
        link.reading = true;
        Some(Action::Read {
            after,
            max_messages: self
                .max_in_flight
                .saturating_mul(self.batcher.max_messages())
                .min(MAX_READ),
            max_bytes: self.max_in_flight.saturating_mul(self.batcher.max_bytes()),
        })
    }

    /// The oldest planned publish, unless linger, the topic rules or the quota hold it back.
    fn publish_next(&mut self, now: Instant, outside: Outside) -> Option<Action> {
        let index = self.next_ready()?;
        let link = &mut self.link;
        let outgoing = link.ready.remove(index)?;
        if self.lingers(&outgoing, now, outside) {
            self.link.ready.insert(index, outgoing);
            return None;
        }
        let link = &mut self.link;
        let priority = outgoing.priority;
        let cursor = link.cursors.of_mut(priority);
        let last = *outgoing.ids.last().unwrap_or(cursor);
        let topic = self.rules.full_topic(&link.identity_id, &outgoing.topic);
        if let Err(error) = TopicRules::check_full(&topic) {
            // Never accepted by IoT Core, whatever we do: out of the queue.
            *cursor = (*cursor).max(last);
            return Some(Action::Bury(Burial {
                ids: outgoing.ids,
                topic,
                reason: error.to_string(),
            }));
        }
        // IoT Core counts the topic it receives, prefix included.
        let size = (topic.len() + outgoing.payload.len()) as u64;
        if let Some(at) = self.quota.ready_at(size, now) {
            // Over IoT Core's quota: it goes first once the quota allows.
            link.paced_until = Some(at);
            link.ready.insert(index, outgoing);
            return None;
        }
        link.held = None;
        self.quota.record(size, now);
        if link.head.is_none() {
            link.head = Some((outgoing.ids.clone(), topic.clone()));
        }
        let highest_sent = self.highest_sent.of_mut(priority);
        let republished = outgoing
            .ids
            .iter()
            .filter(|&&id| id <= *highest_sent)
            .count() as u64;
        *highest_sent = (*highest_sent).max(last);
        *link.cursors.of_mut(priority) = last;
        self.high_streak = match priority {
            Priority::High => self.high_streak.saturating_add(1),
            Priority::Normal => 0,
        };
        link.window
            .unassigned
            .push_back((outgoing.ids, outgoing.qos, size));
        Some(Action::Publish(Publish {
            topic,
            qos: outgoing.qos,
            payload: outgoing.payload,
            republished,
        }))
    }

    /// The newest array may wait up to `linger` for more readings, unless the spool had more
    /// than we read (then more are right behind it).
    fn lingers(&mut self, outgoing: &Outgoing, now: Instant, outside: Outside) -> bool {
        let link = &mut self.link;
        if !link.ready.is_empty()
            || !outgoing.open
            || link.more_behind
            || self.linger.is_zero()
            || outside.stopping
        {
            return false;
        }
        let first = outgoing.ids[0];
        let since = match link.held {
            Some((id, since)) if id == first => since,
            _ => link.held.insert((first, now)).1,
        };
        if now < since + self.linger {
            link.lingering_until = Some(since + self.linger);
            return true;
        }
        false
    }

    /// Which planned publish goes next: the first high-priority one, unless
    /// [`HIGH_BEFORE_NORMAL`] of them went since the last normal one and a normal one waits.
    fn next_ready(&self) -> Option<usize> {
        let ready = &self.link.ready;
        let first_normal = ready.iter().position(|o| o.priority == Priority::Normal);
        match ready.front()? {
            o if o.priority == Priority::High && self.high_streak < HIGH_BEFORE_NORMAL => Some(0),
            o if o.priority == Priority::High => first_normal.or(Some(0)),
            _ => Some(0),
        }
    }

    /// The earliest deadline the flow waits for, if any.
    fn wake_at(&self, now: Instant) -> Option<Instant> {
        let link = &self.link;
        let aged = link.opened + MAX_CONNECTION_AGE;
        // Once aged, acks wake the loop for a quiet moment; the timer only for the latest one.
        let age = link.renew_by.is_none().then(|| {
            if now < aged {
                aged
            } else {
                aged + QUIET_MOMENT_WAIT
            }
        });
        let ack = link.window.earliest_deadline();
        [
            link.paced_until,
            link.lingering_until,
            link.read_retry_at,
            link.renew_by,
            age,
            ack,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The broker closed the connection: its oldest message, if it was out unacknowledged. An
    /// acknowledged one breaks the row of strikes; a connection that never published it
    /// neither counts nor breaks the row.
    fn closed_on_head(&mut self) -> Option<(Vec<i64>, String)> {
        let (ids, topic) = self.link.head.take()?;
        if !self.link.window.holds(*ids.first()?) {
            self.strikes = None;
            return None;
        }
        Some((ids, topic))
    }

    /// Another strike for the oldest message; the last one moves it to the dead letters.
    fn strike(&mut self, ids: Vec<i64>, topic: String) -> Option<Burial> {
        let first_id = *ids.first()?;
        let count = match &self.strikes {
            Some(strikes) if strikes.first_id == first_id => strikes.count + 1,
            _ => 1,
        };
        if count < DEAD_LETTER_STRIKES {
            self.strikes = Some(Strikes { first_id, count });
            return None;
        }
        self.strikes = None;
        self.buried_head = true;
        Some(Burial {
            ids,
            topic,
            reason: format!(
                "the broker dropped the connection right after it, {count} times in a row \
                 (IoT Core does so for a publish its policy denies)"
            ),
        })
    }
}

/// What one connection has sent and not yet seen acknowledged.
#[derive(Default)]
struct Window {
    /// Published, waiting for a packet id (assigned in request order): the spool ids each
    /// publish carries, and its size (topic and payload).
    unassigned: VecDeque<(Vec<i64>, Qos, u64)>,
    /// Packet id → (spool ids, its PUBACK deadline, its size), waiting for PUBACK.
    in_flight: HashMap<u16, (Vec<i64>, Instant, u64)>,
    /// Spool ids the broker has (QoS 1) or that went out (QoS 0): to remove from the spool.
    delivered: Vec<i64>,
}

impl Window {
    fn outstanding(&self) -> usize {
        self.unassigned.len() + self.in_flight.len()
    }

    /// Whether spool message `id` went out on this connection and is not acknowledged.
    fn holds(&self, id: i64) -> bool {
        self.unassigned.iter().any(|(ids, _, _)| ids.contains(&id))
            || self.in_flight.values().any(|(ids, _, _)| ids.contains(&id))
    }

    fn in_flight_bytes(&self) -> u64 {
        self.in_flight.values().map(|(_, _, bytes)| bytes).sum()
    }

    fn earliest_deadline(&self) -> Option<Instant> {
        self.in_flight
            .values()
            .map(|(_, deadline, _)| *deadline)
            .min()
    }
}

/// How long a publish may wait for its PUBACK when `ahead` bytes (itself included) go out
/// before it: [`ACK_TIMEOUT`] plus their time at [`SLOWEST_LINK_BYTES_PER_S`].
fn ack_deadline(ahead: u64) -> Duration {
    ACK_TIMEOUT + Duration::from_secs(ahead / SLOWEST_LINK_BYTES_PER_S)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BatchConfig, ByteSize};
    use crate::message::{Message, PayloadKind};
    use crate::spool::StoredMessage;

    const POOL: &str = "us-east-1:0b7c5a57-6a4f-4a62-9d36-3f1c0e3b6a11";
    const IDENTITY: &str = "us-east-1:9f0e3a2b-1c4d-4e5f-8a9b-0c1d2e3f4a5b";
    const RUNNING: Outside = Outside {
        stopping: false,
        spool_empty: false,
        last_high_id: 0,
    };

    struct Setup {
        max_in_flight: u16,
        batch: BatchConfig,
        quota: (u32, u64),
    }

    impl Default for Setup {
        fn default() -> Setup {
            Setup {
                max_in_flight: 10,
                batch: BatchConfig::default(),
                quota: (0, 0),
            }
        }
    }

    impl Setup {
        fn flow(self) -> Flow {
            let rules = TopicRules::new("{identity_pool_id}/{identity_id}", POOL, "us-east-1");
            Flow::new(
                Arc::new(rules),
                Batcher::new(&self.batch),
                self.batch.linger,
                self.max_in_flight,
                Quota::new(self.quota.0, self.quota.1),
            )
        }
    }

    fn stored(id: i64, topic: &str, qos: Qos) -> StoredMessage {
        StoredMessage {
            id,
            message: Message {
                topic: topic.into(),
                payload: format!("{{\"n\":{id}}}").into_bytes(),
                qos,
                kind: PayloadKind::Json,
                options: Default::default(),
            },
        }
    }

    /// A read's answer as the spool gives it: more behind when it filled `wanted`.
    fn batch(messages: Vec<StoredMessage>, wanted: usize) -> ReadBatch {
        let more = messages.len() >= wanted;
        ReadBatch { messages, more }
    }

    fn spool(ids: std::ops::RangeInclusive<i64>) -> Vec<StoredMessage> {
        ids.map(|id| stored(id, "t", Qos::AtLeastOnce)).collect()
    }

    /// Connects and answers the first read with `messages`; returns the read's limit.
    fn connect_and_read(flow: &mut Flow, now: Instant, messages: Vec<StoredMessage>) -> usize {
        flow.connect(IDENTITY, now);
        assert_eq!(
            flow.next(now, RUNNING),
            Action::Wait(Some(now + MAX_CONNECTION_AGE))
        );
        flow.on_broker(BrokerEvent::Connected, now);
        let Action::Read {
            after: Cursors { high: 0, normal: 0 },
            max_messages,
            ..
        } = flow.next(now, RUNNING)
        else {
            panic!("a new connection reads from the oldest message");
        };
        flow.on_read(batch(messages, max_messages));
        max_messages
    }

    /// Takes publishes until the flow does something else; returns them and that.
    fn publishes(flow: &mut Flow, now: Instant, outside: Outside) -> (Vec<Publish>, Action) {
        let mut sent = Vec::new();
        loop {
            match flow.next(now, outside) {
                Action::Publish(publish) => sent.push(publish),
                other => return (sent, other),
            }
        }
    }

    fn numbers(sent: &[Publish]) -> Vec<String> {
        sent.iter()
            .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
            .collect()
    }

    fn high(ids: std::ops::RangeInclusive<i64>) -> Vec<StoredMessage> {
        ids.map(|id| {
            let mut message = stored(id, "t", Qos::AtLeastOnce);
            message.message.options.priority = Priority::High;
            message
        })
        .collect()
    }

    fn ids_of(sent: &[Publish]) -> Vec<i64> {
        sent.iter()
            .map(|p| {
                let text = String::from_utf8_lossy(&p.payload);
                text.trim_start_matches("{\"n\":")
                    .trim_end_matches('}')
                    .parse()
                    .expect("a test payload")
            })
            .collect()
    }

    /// High-priority messages go first; while they keep coming, one normal message goes per
    /// `HIGH_BEFORE_NORMAL` high ones, and each priority keeps its order.
    #[test]
    fn high_priority_goes_first_and_one_normal_follows_each_ten_high() {
        let mut flow = Setup {
            max_in_flight: 100,
            ..Setup::default()
        }
        .flow();
        let now = Instant::now();
        // As the spool answers: high ones first.
        let mut read = high(26..=50);
        read.extend(spool(1..=5));
        connect_and_read(&mut flow, now, read);
        let (sent, _) = publishes(&mut flow, now, RUNNING);
        let mut expected: Vec<i64> = (26..=35).collect();
        expected.push(1);
        expected.extend(36..=45);
        expected.push(2);
        expected.extend(46..=50);
        expected.extend(3..=5);
        assert_eq!(ids_of(&sent), expected);
    }

    /// A high-priority message the spool accepts while normal publishes are planned is read
    /// at once and overtakes them; the cursors go on per priority.
    #[test]
    fn a_new_high_priority_message_overtakes_the_planned_normal_ones() {
        let mut flow = Setup {
            max_in_flight: 2,
            ..Setup::default()
        }
        .flow();
        let now = Instant::now();
        connect_and_read(&mut flow, now, spool(1..=8));
        let (sent, then) = publishes(&mut flow, now, RUNNING);
        assert_eq!(ids_of(&sent), [1, 2]);
        assert!(matches!(then, Action::Wait(_)), "{then:?}");
        flow.on_spool_changed();
        let alarm = Outside {
            last_high_id: 9,
            ..RUNNING
        };
        let Action::Read { after, .. } = flow.next(now, alarm) else {
            panic!("a waiting high-priority message is read at once");
        };
        assert_eq!(after, Cursors { high: 0, normal: 8 });
        flow.on_read(batch(high(9..=9), 10));
        for packet in 1..=2 {
            flow.on_broker(BrokerEvent::Sent(packet), now);
            flow.on_broker(BrokerEvent::Acked(packet), now);
        }
        assert_eq!(flow.next(now, alarm), Action::Remove(vec![1, 2]));
        let (sent, _) = publishes(&mut flow, now, alarm);
        assert_eq!(ids_of(&sent), [9, 3]);
    }

    #[test]
    fn an_unspooled_report_goes_first_within_the_quota_and_never_outlives_its_connection() {
        let mut flow = Setup {
            quota: (1, 0),
            ..Setup::default()
        }
        .flow();
        let now = Instant::now();
        flow.connect(IDENTITY, now);
        assert!(
            !flow.offer_unspooled("health".into(), b"{}".to_vec()),
            "not before CONNACK"
        );
        connect_and_read(&mut flow, now, spool(1..=3));
        assert!(flow.offer_unspooled("health".into(), b"{\"a\":1}".to_vec()));
        let (sent, _) = publishes(&mut flow, now, RUNNING);
        assert_eq!(
            sent.len(),
            1,
            "one publish per second, and the report takes it"
        );
        assert_eq!(sent[0].topic, format!("{POOL}/{IDENTITY}/health"));
        assert_eq!(sent[0].qos, Qos::AtMostOnce);
        let second = now + Duration::from_millis(1100);
        let (sent, _) = publishes(&mut flow, second, RUNNING);
        assert_eq!(numbers(&sent), ["{\"n\":1}"]);
        // Its packet id does not shift the spool messages' ids.
        flow.on_broker(BrokerEvent::Sent(0), second);
        flow.on_broker(BrokerEvent::Sent(1), second);
        flow.on_broker(BrokerEvent::Acked(1), second);
        assert_eq!(flow.next(second, RUNNING), Action::Remove(vec![1]));
        // Over the quota it waits; a new connection drops it.
        assert!(flow.offer_unspooled("health".into(), b"{}".to_vec()));
        assert!(matches!(flow.next(now, RUNNING), Action::Wait(_)));
        let later = now + Duration::from_secs(5);
        connect_and_read(&mut flow, later, spool(2..=3));
        let (sent, _) = publishes(&mut flow, later, RUNNING);
        assert_eq!(numbers(&sent), ["{\"n\":2}"], "the report was dropped");
    }

    #[test]
    fn publishes_in_spool_order_after_connack_and_then_waits_for_acks() {
        let mut flow = Setup::default().flow();
        let now = Instant::now();
        connect_and_read(&mut flow, now, spool(1..=3));
        let (sent, then) = publishes(&mut flow, now, RUNNING);
        assert_eq!(numbers(&sent), ["{\"n\":1}", "{\"n\":2}", "{\"n\":3}"]);
        assert!(
            sent.iter()
                .all(|p| p.topic == format!("{POOL}/{IDENTITY}/t"))
        );
        assert!(sent.iter().all(|p| p.republished == 0));
        // The spool had less than asked for: no second read until it changes.
        assert_eq!(then, Action::Wait(Some(now + MAX_CONNECTION_AGE)));
        for packet_id in 1..=3 {
            flow.on_broker(BrokerEvent::Sent(packet_id), now);
        }
        assert_eq!(
            flow.next(now, RUNNING),
            Action::Wait(Some(now + ACK_TIMEOUT))
        );
        flow.on_spool_changed();
        assert!(matches!(
            flow.next(now, RUNNING),
            Action::Read {
                after: Cursors { high: 0, normal: 3 },
                ..
            }
        ));
    }

    #[test]
    fn pubacks_remove_what_each_acknowledges_in_the_order_they_come() {
        let mut flow = Setup::default().flow();
        let now = Instant::now();
        connect_and_read(&mut flow, now, spool(1..=3));
        publishes(&mut flow, now, RUNNING);
        for packet_id in 1..=3 {
            flow.on_broker(BrokerEvent::Sent(packet_id), now);
        }
        flow.on_broker(BrokerEvent::Acked(2), now);
        assert_eq!(flow.next(now, RUNNING), Action::Remove(vec![2]));
        flow.on_broker(BrokerEvent::Acked(3), now);
        flow.on_broker(BrokerEvent::Acked(1), now);
        assert_eq!(flow.next(now, RUNNING), Action::Remove(vec![3, 1]));
        // An unknown or repeated PUBACK removes nothing.
        flow.on_broker(BrokerEvent::Acked(2), now);
        assert!(matches!(flow.next(now, RUNNING), Action::Wait(_)));
    }

    #[test]
    fn qos0_messages_leave_the_spool_once_sent() {
        let mut flow = Setup::default().flow();
        let now = Instant::now();
        connect_and_read(&mut flow, now, vec![stored(1, "t", Qos::AtMostOnce)]);
        let (sent, _) = publishes(&mut flow, now, RUNNING);
        assert_eq!(sent[0].qos, Qos::AtMostOnce);
        flow.on_broker(BrokerEvent::Sent(1), now);
        assert_eq!(flow.next(now, RUNNING), Action::Remove(vec![1]));
    }

    /// The window bounds what is out; a read goes ahead of it once half of what the last read
    /// planned is left, so the next publishes are ready when an acknowledgement makes room.
    #[test]
    fn the_in_flight_window_bounds_publishes_and_reads_go_ahead_of_it() {
        let mut flow = Setup {
            max_in_flight: 2,
            ..Setup::default()
        }
        .flow();
        let now = Instant::now();
        let limit = connect_and_read(&mut flow, now, spool(1..=2));
        assert_eq!(limit, 2, "a read takes what the window holds");
        let (sent, then) = publishes(&mut flow, now, RUNNING);
        assert_eq!(numbers(&sent), ["{\"n\":1}"]);
        // The full read said more are behind; one of its two is left: read after it.
        let read_ahead = Action::Read {
            after: Cursors { high: 0, normal: 2 },
            max_messages: 2,
            max_bytes: 2 * crate::message::MAX_PAYLOAD_BYTES,
        };
        assert_eq!(then, read_ahead);
        assert_eq!(
            flow.next(now, RUNNING),
            Action::Publish(Publish {
                topic: format!("{POOL}/{IDENTITY}/t"),
                qos: Qos::AtLeastOnce,
                payload: b"{\"n\":2}".to_vec(),
                republished: 0,
            }),
            "publishes go on while the read is out"
        );
        flow.on_read(batch(spool(3..=4), 2));
        assert_eq!(
            flow.next(now, RUNNING),
            Action::Wait(Some(now + MAX_CONNECTION_AGE)),
            "the window is full"
        );
        flow.on_broker(BrokerEvent::Sent(1), now);
        flow.on_broker(BrokerEvent::Sent(2), now);
        flow.on_broker(BrokerEvent::Acked(1), now);
        assert_eq!(flow.next(now, RUNNING), Action::Remove(vec![1]));
        let (sent, then) = publishes(&mut flow, now, RUNNING);
        assert_eq!(numbers(&sent), ["{\"n\":3}"], "one slot, one publish");
        assert_eq!(
            then,
            Action::Read {
                after: Cursors { high: 0, normal: 4 },
                max_messages: 2,
                max_bytes: 2 * crate::message::MAX_PAYLOAD_BYTES,
            }
        );
    }

    /// While the quota holds the next publish back, the read after it goes out: its time
    /// overlaps the pacing instead of adding to it (docs/benchmarks.md, "Quota run").
    #[test]
    fn a_read_goes_out_while_the_quota_paces() {
        let mut flow = Setup {
            quota: (1, 0),
            ..Setup::default()
        }
        .flow();
        let now = Instant::now();
        connect_and_read(&mut flow, now, spool(1..=2));
        flow.on_spool_changed();
        let (sent, then) = publishes(&mut flow, now, RUNNING);
        assert_eq!(numbers(&sent), ["{\"n\":1}"]);
        let Action::Read {
            after: Cursors { high: 0, normal: 2 },
            ..
        } = then
        else {
            panic!("expected a read after 2 while paced, got {then:?}");
        };
        flow.on_read(batch(spool(3..=3), 10));
        let Action::Wait(Some(paced)) = flow.next(now, RUNNING) else {
            panic!("paced");
        };
        assert!(paced > now && paced <= now + Duration::from_millis(1050));
        let (sent, _) = publishes(&mut flow, paced, RUNNING);
        assert_eq!(numbers(&sent), ["{\"n\":2}"]);
    }

    /// A message that arrives while a read is out may be after what it read: the next read
    /// still comes.
    #[test]
    fn news_during_a_read_is_not_lost() {
        let mut flow = Setup::default().flow();
        let now = Instant::now();
        flow.connect(IDENTITY, now);
        flow.on_broker(BrokerEvent::Connected, now);
        let Action::Read {
            after: Cursors { high: 0, normal: 0 },
            ..
        } = flow.next(now, RUNNING)
        else {
            panic!("a read");
        };
        flow.on_spool_changed();
        flow.on_read(batch(spool(1..=1), 10));
        let then = flow.next(now, RUNNING);
        let Action::Read {
            after: Cursors { high: 0, normal: 1 },
            ..
        } = then
        else {
            panic!("expected a read after 1, got {then:?}");
        };
        let (sent, _) = publishes(&mut flow, now, RUNNING);
        assert_eq!(numbers(&sent), ["{\"n\":1}"]);
    }

    /// A failed read does not stop what is planned; the read is tried again after
    /// `SPOOL_READ_RETRY`.
    #[test]
    fn a_failed_read_is_retried_later_and_planned_publishes_go_on() {
        let mut flow = Setup {
            max_in_flight: 2,
            ..Setup::default()
        }
        .flow();
        let now = Instant::now();
        connect_and_read(&mut flow, now, spool(1..=2));
        let (sent, then) = publishes(&mut flow, now, RUNNING);
        assert_eq!(numbers(&sent), ["{\"n\":1}"]);
        let Action::Read {
            after: Cursors { high: 0, normal: 2 },
            ..
        } = then
        else {
            panic!("a read ahead");
        };
        flow.on_read_failed(now);
        let (sent, then) = publishes(&mut flow, now, RUNNING);
        assert_eq!(numbers(&sent), ["{\"n\":2}"]);
        assert_eq!(then, Action::Wait(Some(now + SPOOL_READ_RETRY)));
        let Action::Read {
            after: Cursors { high: 0, normal: 2 },
            ..
        } = flow.next(now + SPOOL_READ_RETRY, RUNNING)
        else {
            panic!("the read again");
        };
    }

    #[test]
    fn an_open_array_lingers_and_grows_until_linger_ends() {
        let linger = Duration::from_millis(100);
        let mut flow = Setup {
            batch: BatchConfig {
                max_messages: 10,
                max_bytes: ByteSize(4096),
                linger,
            },
            ..Setup::default()
        }
        .flow();
        let t0 = Instant::now();
        connect_and_read(&mut flow, t0, spool(1..=2));
        assert_eq!(flow.next(t0, RUNNING), Action::Wait(Some(t0 + linger)));
        // More arrive 40 ms later: the array is planned again with them, still lingering
        // from when it was first seen.
        let t1 = t0 + Duration::from_millis(40);
        flow.on_spool_changed();
        let Action::Read {
            after: Cursors { high: 0, normal: 0 },
            max_messages,
            ..
        } = flow.next(t1, RUNNING)
        else {
            panic!("the lone open array is read again");
        };
        flow.on_read(batch(spool(1..=3), max_messages));
        assert_eq!(flow.next(t1, RUNNING), Action::Wait(Some(t0 + linger)));
        let (sent, _) = publishes(&mut flow, t0 + linger, RUNNING);
        assert_eq!(numbers(&sent), ["[{\"n\":1},{\"n\":2},{\"n\":3}]"]);
    }

    #[test]
    fn a_stopping_daemon_does_not_linger_and_ends_once_the_spool_is_empty() {
        let mut flow = Setup {
            batch: BatchConfig {
                max_messages: 10,
                max_bytes: ByteSize(4096),
                linger: Duration::from_secs(5),
            },
            ..Setup::default()
        }
        .flow();
        let now = Instant::now();
        let stopping = Outside {
            stopping: true,
            spool_empty: false,
            ..RUNNING
        };
        connect_and_read(&mut flow, now, spool(1..=2));
        let (sent, then) = publishes(&mut flow, now, stopping);
        assert_eq!(sent.len(), 1, "no linger while draining");
        assert!(matches!(then, Action::Wait(_)));
        flow.on_broker(BrokerEvent::Sent(1), now);
        flow.on_broker(BrokerEvent::Acked(1), now);
        assert_eq!(flow.next(now, stopping), Action::Remove(vec![1, 2]));
        // Removal is not confirmed until the spool says it is empty.
        assert!(matches!(flow.next(now, stopping), Action::Wait(_)));
        let drained = Outside {
            stopping: true,
            spool_empty: true,
            ..RUNNING
        };
        assert_eq!(flow.next(now, drained), Action::End(Ended::Drained));
    }

    #[test]
    fn the_quota_paces_publishes_and_carries_over_a_reconnect() {
        let mut flow = Setup {
            quota: (2, 0),
            ..Setup::default()
        }
        .flow();
        let now = Instant::now();
        connect_and_read(&mut flow, now, spool(1..=5));
        let (sent, then) = publishes(&mut flow, now, RUNNING);
        assert_eq!(sent.len(), 1, "a burst of at most quota/10, at least 1");
        let Action::Wait(Some(paced)) = then else {
            panic!("paced: {then:?}")
        };
        assert!(paced > now && paced <= now + Duration::from_secs(1));
        // Reconnecting right away does not reset the quota's count.
        flow.fail("dropped".into(), Failure::Other);
        assert_eq!(
            flow.next(now, RUNNING),
            Action::End(Ended::Failed("dropped".into()))
        );
        connect_and_read(&mut flow, now, spool(1..=5));
        let (sent, then) = publishes(&mut flow, now, RUNNING);
        assert!(sent.is_empty());
        assert!(matches!(then, Action::Wait(Some(at)) if at > now));
    }

    #[test]
    fn a_reconnect_republishes_from_the_oldest_unacknowledged_message() {
        let mut flow = Setup::default().flow();
        let now = Instant::now();
        connect_and_read(&mut flow, now, spool(1..=3));
        publishes(&mut flow, now, RUNNING);
        for packet_id in 1..=3 {
            flow.on_broker(BrokerEvent::Sent(packet_id), now);
        }
        flow.on_broker(BrokerEvent::Acked(1), now);
        flow.fail("connection reset".into(), Failure::Closed);
        assert_eq!(flow.next(now, RUNNING), Action::Remove(vec![1]));
        assert_eq!(
            flow.next(now, RUNNING),
            Action::End(Ended::Failed("connection reset".into()))
        );
        // The spool removed 1; the next connection reads 2 and 3 again.
        connect_and_read(&mut flow, now, spool(2..=4));
        let (sent, _) = publishes(&mut flow, now, RUNNING);
        assert_eq!(
            sent.iter().map(|p| p.republished).collect::<Vec<_>>(),
            [1, 1, 0]
        );
    }

    #[test]
    fn a_renewal_waits_for_in_flight_publishes_to_be_acknowledged() {
        let mut flow = Setup::default().flow();
        let now = Instant::now();
        connect_and_read(&mut flow, now, spool(1..=1));
        publishes(&mut flow, now, RUNNING);
        flow.on_broker(BrokerEvent::Sent(1), now);
        assert!(flow.renew(now));
        assert!(!flow.renew(now), "one renewal at a time");
        assert!(!flow.listens_to_spool() && !flow.listens_to_sessions());
        flow.on_spool_changed();
        assert_eq!(
            flow.next(now, RUNNING),
            Action::Wait(Some(now + RENEW_GRACE))
        );
        flow.on_broker(BrokerEvent::Acked(1), now);
        assert_eq!(flow.next(now, RUNNING), Action::Remove(vec![1]));
        assert_eq!(flow.next(now, RUNNING), Action::End(Ended::Renew));
    }

    #[test]
    fn a_renewal_does_not_wait_past_its_grace_for_acks() {
        let mut flow = Setup::default().flow();
        let now = Instant::now();
        connect_and_read(&mut flow, now, spool(1..=1));
        publishes(&mut flow, now, RUNNING);
        flow.on_broker(BrokerEvent::Sent(1), now);
        flow.renew(now);
        assert_eq!(
            flow.next(now + RENEW_GRACE, RUNNING),
            Action::End(Ended::Renew)
        );
    }

    #[test]
    fn a_connection_renews_before_the_24_hour_limit() {
        let mut flow = Setup::default().flow();
        let t0 = Instant::now();
        connect_and_read(&mut flow, t0, Vec::new());
        assert_eq!(
            flow.next(t0, RUNNING),
            Action::Wait(Some(t0 + MAX_CONNECTION_AGE))
        );
        assert!(MAX_CONNECTION_AGE < Duration::from_secs(24 * 3600));
        assert_eq!(
            flow.next(t0 + MAX_CONNECTION_AGE, RUNNING),
            Action::End(Ended::Renew)
        );
    }

    #[test]
    fn an_aged_connection_is_renewed_at_a_quiet_moment_or_at_the_latest_half_an_hour_later() {
        let mut flow = Setup::default().flow();
        let t0 = Instant::now();
        connect_and_read(&mut flow, t0, Vec::new());
        let aged = t0 + MAX_CONNECTION_AGE;
        // One in flight when the age comes: no renewal yet (the loop waits for its ack).
        flow.on_spool_changed();
        let Action::Read { .. } = flow.next(aged - Duration::from_secs(2), RUNNING) else {
            panic!("expected a read");
        };
        flow.on_read(ReadBatch {
            messages: spool(1..=1),
            more: false,
        });
        let before = aged - Duration::from_secs(1);
        assert_eq!(publishes(&mut flow, before, RUNNING).0.len(), 1);
        flow.on_broker(BrokerEvent::Sent(1), before);
        assert!(matches!(flow.next(aged, RUNNING), Action::Wait(Some(_))));
        // Its ack makes the quiet moment.
        let acked = aged + Duration::from_secs(2);
        flow.on_broker(BrokerEvent::Acked(1), acked);
        assert_eq!(flow.next(acked, RUNNING), Action::Remove(vec![1]));
        assert_eq!(flow.next(acked, RUNNING), Action::End(Ended::Renew));

        // Never quiet (a reading every 5 s goes out before the last one is acknowledged):
        // renewed half an hour after the age all the same.
        let mut flow = Setup::default().flow();
        connect_and_read(&mut flow, t0, Vec::new());
        let mut at = aged - Duration::from_secs(5);
        let mut id: i64 = 0;
        loop {
            id += 1;
            flow.on_spool_changed();
            let Action::Read { .. } = flow.next(at, RUNNING) else {
                break;
            };
            flow.on_read(ReadBatch {
                messages: spool(id..=id),
                more: false,
            });
            assert_eq!(publishes(&mut flow, at, RUNNING).0.len(), 1);
            flow.on_broker(BrokerEvent::Sent(id as u16), at);
            if id > 1 {
                flow.on_broker(BrokerEvent::Acked(id as u16 - 1), at);
                assert_eq!(flow.next(at, RUNNING), Action::Remove(vec![id - 1]));
            }
            at += Duration::from_secs(5);
        }
        let latest = aged + QUIET_MOMENT_WAIT;
        assert!(
            (latest..latest + Duration::from_secs(5)).contains(&at),
            "renewal began {:?} after the age",
            at - aged
        );
        flow.on_broker(BrokerEvent::Acked(id as u16 - 1), at);
        assert_eq!(flow.next(at, RUNNING), Action::Remove(vec![id - 1]));
        assert_eq!(flow.next(at, RUNNING), Action::End(Ended::Renew));
    }

    #[test]
    fn a_publish_without_puback_for_a_minute_fails_the_connection() {
        let mut flow = Setup::default().flow();
        let t0 = Instant::now();
        connect_and_read(&mut flow, t0, spool(1..=1));
        publishes(&mut flow, t0, RUNNING);
        flow.on_broker(BrokerEvent::Sent(1), t0);
        assert_eq!(flow.next(t0, RUNNING), Action::Wait(Some(t0 + ACK_TIMEOUT)));
        assert_eq!(
            flow.next(t0 + ACK_TIMEOUT, RUNNING),
            Action::End(Ended::Failed(
                "no PUBACK in time (60s, plus the time to send what was ahead at 1024 B/s)".into()
            ))
        );
    }

    /// One connection that published message 1 and was closed by the broker (`failure`).
    fn publish_head_then(flow: &mut Flow, now: Instant, failure: Failure) {
        connect_and_read(flow, now, spool(1..=2));
        publishes(flow, now, RUNNING);
        flow.on_broker(BrokerEvent::Sent(1), now);
        flow.fail("closed".into(), failure);
        assert!(matches!(
            flow.next(now, RUNNING),
            Action::End(Ended::Failed(_))
        ));
    }

    #[test]
    fn the_oldest_message_goes_to_the_dead_letters_once_the_last_strike_is_confirmed() {
        let mut flow = Setup::default().flow();
        let now = Instant::now();
        for _ in 0..DEAD_LETTER_STRIKES {
            publish_head_then(&mut flow, now, Failure::Closed);
        }
        assert!(!flow.take_buried_head());
        // The next CONNACK shows the policy is attached: the close was the message's fault.
        flow.connect(IDENTITY, now);
        flow.on_broker(BrokerEvent::Connected, now);
        let Action::Bury(burial) = flow.next(now, RUNNING) else {
            panic!("buried after {DEAD_LETTER_STRIKES} strikes");
        };
        assert_eq!(burial.ids, [1]);
        assert_eq!(burial.topic, format!("{POOL}/{IDENTITY}/t"));
        assert!(matches!(
            flow.next(now, RUNNING),
            Action::Read {
                after: Cursors { high: 0, normal: 0 },
                ..
            }
        ));
        assert!(flow.take_buried_head());
        assert!(!flow.take_buried_head());
    }

    /// A backlog of large publishes on a slow link: each one's PUBACK deadline grows by the
    /// time to send what is ahead of it, so the link is found slow, not stuck.
    #[test]
    fn puback_deadlines_allow_for_the_bytes_ahead_on_a_slow_link() {
        let mut flow = Setup::default().flow();
        let t0 = Instant::now();
        let big = |id: i64| StoredMessage {
            id,
            message: Message {
                topic: "t".into(),
                payload: vec![b'x'; 100 * 1024],
                qos: Qos::AtLeastOnce,
                kind: PayloadKind::Binary,
                options: Default::default(),
            },
        };
        connect_and_read(&mut flow, t0, (1..=3).map(big).collect());
        let (sent, _) = publishes(&mut flow, t0, RUNNING);
        assert_eq!(sent.len(), 3);
        for packet_id in 1..=3 {
            flow.on_broker(BrokerEvent::Sent(packet_id), t0);
        }
        // The first: 60 s plus its own ~100 s at 1 KiB/s.
        let first = t0 + ACK_TIMEOUT + Duration::from_secs(100);
        assert_eq!(flow.next(t0, RUNNING), Action::Wait(Some(first)));
        assert!(matches!(
            flow.next(t0 + ACK_TIMEOUT, RUNNING),
            Action::Wait(_)
        ));
        // Acknowledged in turn, each within its own deadline: no failure.
        flow.on_broker(BrokerEvent::Acked(1), first - Duration::from_secs(1));
        assert_eq!(
            flow.next(first - Duration::from_secs(1), RUNNING),
            Action::Remove(vec![1])
        );
        let second = t0 + ACK_TIMEOUT + Duration::from_secs(200);
        assert_eq!(flow.next(first, RUNNING), Action::Wait(Some(second)));
        assert!(matches!(
            flow.next(second, RUNNING),
            Action::End(Ended::Failed(_))
        ));
    }

    /// A slow or flaky link: timeouts and local errors never count against a message.
    #[test]
    fn timeouts_and_local_errors_never_strike() {
        let mut flow = Setup::default().flow();
        let t0 = Instant::now();
        for round in 0..3 * DEAD_LETTER_STRIKES {
            let now = t0 + ACK_TIMEOUT * round;
            connect_and_read(&mut flow, now, spool(1..=2));
            publishes(&mut flow, now, RUNNING);
            flow.on_broker(BrokerEvent::Sent(1), now);
            if round % 2 == 0 {
                assert_eq!(
                    flow.next(now + ACK_TIMEOUT, RUNNING),
                    Action::End(Ended::Failed(
                        "no PUBACK in time (60s, plus the time to send what was ahead at 1024 B/s)"
                            .into()
                    ))
                );
            } else {
                flow.fail("Flush timeout".into(), Failure::Other);
                assert!(matches!(flow.next(now, RUNNING), Action::End(_)));
            }
        }
        flow.connect(IDENTITY, t0);
        flow.on_broker(BrokerEvent::Connected, t0);
        assert!(matches!(flow.next(t0, RUNNING), Action::Read { .. }));
        assert!(!flow.take_buried_head());
    }

    #[test]
    fn connections_that_fail_before_publishing_neither_count_nor_break_the_strikes() {
        let mut flow = Setup::default().flow();
        let now = Instant::now();
        for _ in 1..DEAD_LETTER_STRIKES {
            publish_head_then(&mut flow, now, Failure::Closed);
        }
        // The network is down for a while: connects fail before anything goes out.
        for _ in 0..DEAD_LETTER_STRIKES {
            flow.connect(IDENTITY, now);
            flow.fail("connection refused".into(), Failure::Other);
            assert!(matches!(flow.next(now, RUNNING), Action::End(_)));
        }
        publish_head_then(&mut flow, now, Failure::Closed);
        flow.connect(IDENTITY, now);
        flow.on_broker(BrokerEvent::Connected, now);
        assert!(matches!(flow.next(now, RUNNING), Action::Bury(_)));
    }

    /// The policy was detached while connected: the publish that found it out is not blamed.
    #[test]
    fn a_close_after_connect_puts_the_attachment_in_doubt_and_drops_the_pending_strike() {
        let mut flow = Setup::default().flow();
        let now = Instant::now();
        for _ in 0..DEAD_LETTER_STRIKES - 1 {
            publish_head_then(&mut flow, now, Failure::Closed);
        }
        // The last strike would bury it, but the next connection is closed before its CONNACK.
        publish_head_then(&mut flow, now, Failure::Closed);
        flow.connect(IDENTITY, now);
        flow.fail("connection closed by peer".into(), Failure::Closed);
        assert!(matches!(flow.next(now, RUNNING), Action::End(_)));
        flow.connect(IDENTITY, now);
        flow.on_broker(BrokerEvent::Connected, now);
        assert!(matches!(flow.next(now, RUNNING), Action::Read { .. }));
        assert!(!flow.take_buried_head());
    }

    #[test]
    fn closes_before_connack_in_a_row_call_for_attaching_the_policy_again() {
        let mut flow = Setup::default().flow();
        let now = Instant::now();
        let closed_after_connect = |flow: &mut Flow| {
            flow.connect(IDENTITY, now);
            flow.fail("connection closed by peer".into(), Failure::Closed);
            assert!(matches!(flow.next(now, RUNNING), Action::End(_)));
        };
        // A CONNACK in between starts the count over; network faults do not count.
        for _ in 1..REATTACH_AFTER_CLOSES {
            closed_after_connect(&mut flow);
        }
        flow.connect(IDENTITY, now);
        flow.on_broker(BrokerEvent::Connected, now);
        for _ in 1..REATTACH_AFTER_CLOSES {
            closed_after_connect(&mut flow);
            flow.connect(IDENTITY, now);
            flow.fail("connection refused".into(), Failure::Other);
            assert!(!flow.take_reattach_due());
        }
        closed_after_connect(&mut flow);
        assert!(flow.take_reattach_due());
        assert!(!flow.take_reattach_due());
        // Another row is needed for the next call.
        for _ in 1..REATTACH_AFTER_CLOSES {
            closed_after_connect(&mut flow);
        }
        assert!(!flow.take_reattach_due());
        closed_after_connect(&mut flow);
        assert!(flow.take_reattach_due());
    }

    #[test]
    fn an_acknowledged_head_starts_the_strikes_over() {
        let mut flow = Setup::default().flow();
        let now = Instant::now();
        for _ in 1..DEAD_LETTER_STRIKES {
            publish_head_then(&mut flow, now, Failure::Closed);
        }
        connect_and_read(&mut flow, now, spool(1..=2));
        publishes(&mut flow, now, RUNNING);
        flow.on_broker(BrokerEvent::Sent(1), now);
        flow.on_broker(BrokerEvent::Acked(1), now);
        flow.fail("dropped".into(), Failure::Closed);
        assert_eq!(flow.next(now, RUNNING), Action::Remove(vec![1]));
        assert!(matches!(flow.next(now, RUNNING), Action::End(_)));
        flow.connect(IDENTITY, now);
        flow.on_broker(BrokerEvent::Connected, now);
        assert!(matches!(flow.next(now, RUNNING), Action::Read { .. }));
        assert!(!flow.take_buried_head());
    }

    #[test]
    fn a_topic_too_long_once_prefixed_is_buried_and_the_rest_flows() {
        let mut flow = Setup::default().flow();
        let now = Instant::now();
        let long = "x".repeat(200);
        connect_and_read(
            &mut flow,
            now,
            vec![
                stored(1, &long, Qos::AtLeastOnce),
                stored(2, "t", Qos::AtLeastOnce),
            ],
        );
        let Action::Bury(burial) = flow.next(now, RUNNING) else {
            panic!("the long topic is buried");
        };
        assert_eq!(burial.ids, [1]);
        let (sent, _) = publishes(&mut flow, now, RUNNING);
        assert_eq!(numbers(&sent), ["{\"n\":2}"]);
    }

    #[test]
    fn a_failed_read_is_retried_shortly() {
        let mut flow = Setup::default().flow();
        let now = Instant::now();
        flow.connect(IDENTITY, now);
        flow.on_broker(BrokerEvent::Connected, now);
        assert!(matches!(flow.next(now, RUNNING), Action::Read { .. }));
        flow.on_read_failed(now);
        assert_eq!(
            flow.next(now, RUNNING),
            Action::Wait(Some(now + SPOOL_READ_RETRY))
        );
        assert!(matches!(
            flow.next(now + SPOOL_READ_RETRY, RUNNING),
            Action::Read {
                after: Cursors { high: 0, normal: 0 },
                ..
            }
        ));
    }

    #[test]
    fn a_refused_connack_ends_the_connection() {
        let mut flow = Setup::default().flow();
        let now = Instant::now();
        flow.connect(IDENTITY, now);
        flow.on_broker(BrokerEvent::Refused("NotAuthorized".into()), now);
        assert_eq!(
            flow.next(now, RUNNING),
            Action::End(Ended::Failed(
                "broker refused the connection: NotAuthorized".into()
            ))
        );
    }
}
