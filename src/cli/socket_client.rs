//! The `send` and `status` commands: small clients of the daemon's socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
pub enum SocketClientError {
    #[error("cannot connect to {path}: {}", connect_hint(source))]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon closed the connection before answering everything")]
    Closed,
    #[error("unexpected answer from the daemon: {0}")]
    BadAnswer(String),
    #[error("no answer from the daemon within {} (--timeout)", humantime::format_duration(*.0))]
    Timeout(Duration),
}

/// What a failed connect means, by its errno.
fn connect_hint(error: &std::io::Error) -> String {
    match error.kind() {
        std::io::ErrorKind::PermissionDenied => format!(
            "{error}: add your user to the iot-cognito-relay group (sudo usermod -aG iot-cognito-relay $USER, then log in again)"
        ),
        std::io::ErrorKind::NotFound => format!(
            "{error}: the daemon is not running, or its socket.path differs (pass --config or --socket)"
        ),
        std::io::ErrorKind::ConnectionRefused => {
            format!("{error}: nothing listens there; the daemon is not running")
        }
        _ => error.to_string(),
    }
}

/// Maps a read or write error to the timeout it really is, or to the I/O error.
fn io_error(timeout: Duration) -> impl Fn(std::io::Error) -> SocketClientError + Copy {
    move |error| {
        if timed_out(&error) {
            SocketClientError::Timeout(timeout)
        } else {
            SocketClientError::Io(error)
        }
    }
}

/// A read or write that hit the socket's timeout.
fn timed_out(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// What `send` publishes: one argument, or one message per stdin line.
pub enum Payloads {
    One(String),
    Lines(Box<dyn BufRead + Send>),
}

/// Connects within `timeout` (a Unix socket's `connect` blocks while the daemon's listen
/// backlog is full), then makes every read and write give up after `timeout` too.
fn connect(path: &Path, timeout: Duration) -> Result<UnixStream, SocketClientError> {
    let (result, outcome) = std::sync::mpsc::channel();
    let owned = path.to_owned();
    // A blocking connect cannot be given a deadline; on timeout the thread is left behind
    // and ends with the process.
    std::thread::spawn(move || {
        let _ = result.send(UnixStream::connect(owned));
    });
    let stream = match outcome.recv_timeout(timeout) {
        Ok(connected) => connected.map_err(|source| SocketClientError::Connect {
            path: path.display().to_string(),
            source,
        })?,
        Err(_) => return Err(SocketClientError::Timeout(timeout)),
    };
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// How `send` turns its input into protocol lines.
pub enum Framing {
    /// Each input is a payload for `topic`.
    Message {
        topic: String,
        qos: u8,
        options: MessageOptions,
    },
    /// Each input is already a protocol line; an `id` is added where missing so that every
    /// line gets its answer.
    Json,
}

/// `send`'s `--ttl`, `--priority` and `--conflate`, given to every message.
#[derive(Debug, Default)]
pub struct MessageOptions {
    pub ttl: Option<u32>,
    pub priority: Option<String>,
    pub conflate: bool,
}

/// The protocol line of one `send` payload.
fn message_line(topic: &str, qos: u8, options: &MessageOptions, payload: &str, id: u64) -> String {
    let mut line = json!({"topic": topic, "payload": payload_value(payload), "qos": qos, "id": id});
    if let Some(ttl) = options.ttl {
        line["ttl"] = json!(ttl);
    }
    if let Some(priority) = &options.priority {
        line["priority"] = json!(priority);
    }
    if options.conflate {
        line["conflate"] = json!(true);
    }
    line.to_string()
}

fn protocol_line(line: &str, id: u64) -> String {
    match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(mut object)) => {
            // `"id": null` means no id to the daemon, which then answers nothing on success.
            let slot = object.entry("id").or_insert(Value::Null);
            if slot.is_null() {
                *slot = id.into();
            }
            Value::Object(object).to_string()
        }
        // Sent as is: the daemon answers what is wrong with it.
        _ => line.to_owned(),
    }
}

/// A payload given on the command line: JSON when it parses as JSON, otherwise text.
fn payload_value(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

/// How many times in a row `send` connects again to a daemon that closed the connection
/// without taking a line (a daemon that keeps doing so is not idle-closing: it refuses).
const MAX_RECONNECTS_IN_A_ROW: u32 = 3;
/// Lines `send` has out unanswered at most: its memory stays bounded however long the input.
const MAX_UNANSWERED: usize = 1024;

/// What the threads of `send` report to it.
enum Event {
    /// The next protocol line from the input.
    Line(String),
    /// The input ended (or failed).
    InputDone(std::io::Result<()>),
    /// An answer on connection `n`.
    Answer(u32, String),
    /// Connection `n` was closed by the daemon (or failed).
    Closed(u32),
}

/// Sends every input and waits for each answer, giving up when the daemon leaves an owed
/// answer waiting for `timeout`. When the daemon closes the connection (e.g. after
/// `socket.idle_timeout` of quiet between a sensor's lines), `send` connects again and sends
/// every line not yet answered once more: a line may arrive twice, never not at all. Returns
/// how many were refused; each refusal is printed to stderr.
pub fn send(
    socket: &Path,
    framing: Framing,
    payloads: Payloads,
    timeout: Duration,
) -> Result<u64, SocketClientError> {
    let (events, inbox) = std::sync::mpsc::channel();
    let link = Link::open(socket, timeout, 0, &events)?;
    // One credit per line the input may frame: given back with each answer.
    let (credit, credits) = std::sync::mpsc::sync_channel(MAX_UNANSWERED);
    for _ in 0..MAX_UNANSWERED {
        let _ = credit.try_send(());
    }
    // Not scoped: on a timeout this thread may sit in a stdin read, and must not be joined.
    let input = events.clone();
    std::thread::spawn(move || {
        let result = frame_inputs(&framing, payloads, &input, &credits);
        let _ = input.send(Event::InputDone(result));
    });
    let mut sending = Sending {
        socket,
        timeout,
        events,
        credit,
        link,
        unanswered: Unanswered::default(),
        input_done: false,
        refused: 0,
        reconnects: 0,
    };
    loop {
        if sending.input_done && sending.unanswered.is_empty() {
            return Ok(sending.refused);
        }
        let event = match inbox.recv_timeout(timeout) {
            Ok(event) => event,
            // Nothing owed: the input is slow, not the daemon.
            Err(_) if sending.unanswered.is_empty() => continue,
            Err(_) => return Err(SocketClientError::Timeout(timeout)),
        };
        sending.handle(event)?;
    }
}

/// What `send` threads through its loop: the connection, and what it still owes.
struct Sending<'a> {
    socket: &'a Path,
    timeout: Duration,
    events: std::sync::mpsc::Sender<Event>,
    /// Given back with each answer, so the input may frame one more line.
    credit: std::sync::mpsc::SyncSender<()>,
    link: Link,
    unanswered: Unanswered,
    input_done: bool,
    refused: u64,
    /// Connections in a row the daemon closed with lines unanswered.
    reconnects: u32,
}

impl Sending<'_> {
    fn handle(&mut self, event: Event) -> Result<(), SocketClientError> {
        match event {
            Event::Line(line) => self.write_line(line),
            Event::InputDone(result) => {
                result.map_err(io_error(self.timeout))?;
                self.input_done = true;
                self.link.finish_writing();
                Ok(())
            }
            Event::Answer(n, text) if n == self.link.number => self.take_answer(text),
            Event::Closed(n) if n == self.link.number => self.closed(),
            // From a connection given up already.
            Event::Answer(..) | Event::Closed(_) => Ok(()),
        }
    }

    fn write_line(&mut self, line: String) -> Result<(), SocketClientError> {
        if self.link.closed {
            // The daemon closed the (idle) connection: a new one, with what it left
            // unanswered.
            self.reopen()?;
        }
        self.link.write(&line);
        self.unanswered.push(line);
        Ok(())
    }

    fn take_answer(&mut self, text: String) -> Result<(), SocketClientError> {
        self.reconnects = 0;
        let answer: Value =
            serde_json::from_str(&text).map_err(|_| SocketClientError::BadAnswer(text.clone()))?;
        self.unanswered.answered(&answer);
        let _ = self.credit.try_send(());
        if answer["ok"] != Value::Bool(true) {
            self.refused += 1;
            eprintln!(
                "message {}: {}: {}",
                answer["id"],
                answer["error"].as_str().unwrap_or("error"),
                answer["message"].as_str().unwrap_or("")
            );
        }
        Ok(())
    }

    fn closed(&mut self) -> Result<(), SocketClientError> {
        self.link.closed = true;
        if self.unanswered.is_empty() {
            // An idle close: the next line opens a new connection.
            return Ok(());
        }
        self.reconnects += 1;
        if self.reconnects > MAX_RECONNECTS_IN_A_ROW {
            return Err(SocketClientError::Closed);
        }
        self.reopen()?;
        if self.input_done {
            self.link.finish_writing();
        }
        Ok(())
    }

    /// A new connection, and every line not answered yet written to it again.
    fn reopen(&mut self) -> Result<(), SocketClientError> {
        self.link = Link::open(
            self.socket,
            self.timeout,
            self.link.number + 1,
            &self.events,
        )?;
        for line in self.unanswered.lines() {
            self.link.write(line);
        }
        Ok(())
    }
}

/// Lines written and not answered yet, with the id each answer will carry.
#[derive(Debug, Default)]
struct Unanswered(Vec<(Option<Value>, String)>);

impl Unanswered {
    fn push(&mut self, line: String) {
        self.0.push((line_id(&line), line));
    }

    /// Answers come as lines finish (an error at once, an ok once stored): matched by id; a
    /// line that had none (not JSON) is answered without one.
    fn answered(&mut self, answer: &Value) {
        let id = answer.get("id").filter(|id| !id.is_null());
        if let Some(at) = self
            .0
            .iter()
            .position(|(line_id, _)| line_id.as_ref() == id)
        {
            self.0.remove(at);
        } else if !self.0.is_empty() {
            self.0.remove(0);
        }
    }

    fn lines(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(_, line)| line.as_str())
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The id the daemon's answer to `line` carries (None for a line that is not a JSON object).
fn line_id(line: &str) -> Option<Value> {
    serde_json::from_str::<Value>(line)
        .ok()?
        .get("id")
        .filter(|id| !id.is_null())
        .cloned()
}

/// One connection of `send`: its write half, and a thread that reports its answers.
struct Link {
    number: u32,
    writer: UnixStream,
    /// The daemon closed it (its reader said so), or a write failed.
    closed: bool,
}

impl Link {
    fn open(
        socket: &Path,
        timeout: Duration,
        number: u32,
        events: &std::sync::mpsc::Sender<Event>,
    ) -> Result<Link, SocketClientError> {
        let stream = connect(socket, timeout)?;
        let writer = stream.try_clone()?;
        // Reads block without a deadline here: `send` keeps the time itself.
        stream.set_read_timeout(None)?;
        let events = events.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            loop {
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => {
                        let _ = events.send(Event::Closed(number));
                        return;
                    }
                    Ok(_) => {
                        let text = std::mem::take(&mut line).trim_end().to_owned();
                        if events.send(Event::Answer(number, text)).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Link {
            number,
            writer,
            closed: false,
        })
    }

    /// A failed write means the daemon closed the connection: its reader reports that, and
    /// the line is sent again on the next one.
    fn write(&mut self, line: &str) {
        if !self.closed
            && self
                .writer
                .write_all(format!("{line}\n").as_bytes())
                .is_err()
        {
            self.closed = true;
        }
    }

    /// Nothing more to send: the daemon answers what it has and closes.
    fn finish_writing(&self) {
        let _ = self.writer.shutdown(std::net::Shutdown::Write);
    }
}

/// Turns each input into one protocol line (ids 1, 2, …) for `send`.
fn frame_inputs(
    framing: &Framing,
    payloads: Payloads,
    events: &std::sync::mpsc::Sender<Event>,
    credits: &std::sync::mpsc::Receiver<()>,
) -> std::io::Result<()> {
    let mut count = 0u64;
    let mut frame = |payload: &str| {
        // Waits while MAX_UNANSWERED lines are out; `send` gone means nothing more to do.
        let _ = credits.recv();
        count += 1;
        let line = match framing {
            Framing::Message {
                topic,
                qos,
                options,
            } => message_line(topic, *qos, options, payload, count),
            Framing::Json => protocol_line(payload, count),
        };
        let _ = events.send(Event::Line(line));
    };
    match payloads {
        Payloads::One(text) => frame(&text),
        Payloads::Lines(lines) => {
            for line in lines.lines() {
                let line = line?;
                if !line.trim().is_empty() {
                    frame(&line);
                }
            }
        }
    }
    Ok(())
}

/// Asks the daemon for its status object, giving up after `timeout`.
pub fn status(socket: &Path, timeout: Duration) -> Result<Value, SocketClientError> {
    let mut stream = connect(socket, timeout)?;
    let io = io_error(timeout);
    stream.write_all(b"{\"op\":\"status\"}\n").map_err(io)?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(io)?;
    let answer: Value =
        serde_json::from_str(&line).map_err(|_| SocketClientError::BadAnswer(line.clone()))?;
    match answer.get("status") {
        Some(status) if answer["ok"] == Value::Bool(true) => Ok(status.clone()),
        _ => Err(SocketClientError::BadAnswer(line)),
    }
}

/// Asks the daemon to list, requeue or purge its dead letters; returns the answer object.
pub fn dead_letters(
    socket: &Path,
    action: &str,
    timeout: Duration,
) -> Result<Value, SocketClientError> {
    let mut stream = connect(socket, timeout)?;
    let io = io_error(timeout);
    let request = json!({"op": "dead_letters", "action": action});
    stream
        .write_all(format!("{request}\n").as_bytes())
        .map_err(io)?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(io)?;
    let answer: Value =
        serde_json::from_str(&line).map_err(|_| SocketClientError::BadAnswer(line.clone()))?;
    if answer["ok"] == Value::Bool(true) {
        Ok(answer)
    } else {
        Err(SocketClientError::BadAnswer(line.trim_end().to_owned()))
    }
}

/// The human form of a `dead-letters` answer.
pub fn format_dead_letters(answer: &Value) -> String {
    if let Some(count) = answer["requeued"].as_u64() {
        return format!("requeued {count} message(s)\n");
    }
    if let Some(count) = answer["purged"].as_u64() {
        return format!("purged {count} message(s)\n");
    }
    let listed = answer["dead_letters"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if listed.is_empty() {
        return "no dead letters\n".to_owned();
    }
    listed
        .iter()
        .map(|letter| {
            format!(
                "{}  {}  {} bytes  {}\n",
                letter["at"].as_str().unwrap_or("-"),
                letter["topic"].as_str().unwrap_or("-"),
                letter["bytes"],
                letter["reason"].as_str().unwrap_or("-"),
            )
        })
        .collect()
}

/// A status field as shown: `-` when absent, a string without its quotes.
fn shown_field(status: &Value, name: &str) -> String {
    match &status[name] {
        Value::Null => "-".to_owned(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// The lines `status` adds only when something needs the operator: a clock far off, a
/// policy attached again, filters the policy refuses.
fn warning_lines(status: &Value) -> String {
    let skew = match status["clock_skew_s"].as_i64() {
        Some(skew) => format!(
            "clock:               {} s {} the server's; connections are refused: fix NTP\n",
            skew.abs(),
            if skew > 0 { "behind" } else { "ahead of" }
        ),
        None => String::new(),
    };
    let reattached = match status["policy_reattached_at"].as_str() {
        Some(at) => format!(
            "policy:              attached again at {at} ({} times since start): IoT Core turned this identity away\n",
            shown_field(status, "policy_reattaches_total")
        ),
        None => String::new(),
    };
    let refused = match status["refused_filters"].as_array() {
        Some(filters) if !filters.is_empty() => format!(
            "refused filters:     {}: the IoT policy does not allow them, nothing arrives on them\n",
            filters
                .iter()
                .map(|f| f.as_str().unwrap_or("?"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => String::new(),
    };
    format!("{skew}{reattached}{refused}")
}

/// The human form of `status`.
pub fn format_status(status: &Value) -> String {
    let field = |name: &str| shown_field(status, name);
    let since = |at: &str| match status[at].as_str() {
        Some(time) => format!(" since {time}"),
        None => String::new(),
    };
    let oldest = match status["oldest_spooled_age_s"].as_u64() {
        Some(age) => format!(", oldest waiting {age} s"),
        None => String::new(),
    };
    format!(
        "version:             {} (up {} s)
state:               {}
endpoint:            {} ({})
identity:            {}
registration:        {} (device {})
credentials expire:  {}
last refresh:        {}
last error:          {}
mqtt last error:     {}{}
last connected:      {} ({} reconnects)
mqtt bytes:          {} sent, {} received
spool:               {} messages, {} bytes{oldest}, {}
published:           {} ({} republished)
dropped:             {}, expired {}, conflated {}
dead letters:        {} ({} since start)
inbox:               {} messages ({} dropped), {}
{}",
        field("version"),
        field("uptime_s"),
        field("state"),
        field("endpoint"),
        field("region"),
        field("identity_id"),
        field("registration_mode"),
        field("device_name"),
        field("credentials_expire_at"),
        field("last_refresh"),
        field("last_error"),
        field("mqtt_last_error"),
        since("mqtt_last_error_at"),
        field("last_connected_at"),
        field("reconnects_total"),
        field("bytes_sent_total"),
        field("bytes_received_total"),
        field("spool_messages"),
        field("spool_bytes"),
        field("spool_state"),
        field("published_total"),
        field("republished_total"),
        field("dropped_total"),
        field("expired_total"),
        field("conflated_total"),
        field("dead_letters"),
        field("dead_letter_total"),
        field("inbox_messages"),
        field("inbox_dropped_total"),
        field("inbox_state"),
        warning_lines(status),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_gives_every_message_its_options() {
        let plain = message_line("t", 1, &MessageOptions::default(), "21.5", 7);
        assert_eq!(
            serde_json::from_str::<Value>(&plain).expect("json"),
            serde_json::json!({"topic": "t", "payload": 21.5, "qos": 1, "id": 7})
        );
        let options = MessageOptions {
            ttl: Some(60),
            priority: Some("high".into()),
            conflate: true,
        };
        let line = message_line("t", 0, &options, "on", 8);
        assert_eq!(
            serde_json::from_str::<Value>(&line).expect("json"),
            serde_json::json!({"topic": "t", "payload": "on", "qos": 0, "id": 8,
                "ttl": 60, "priority": "high", "conflate": true})
        );
    }

    #[test]
    fn a_clock_far_off_gets_its_own_line() {
        let skewed = serde_json::json!({"state": "backoff", "clock_skew_s": 900});
        let text = format_status(&skewed);
        assert!(
            text.contains(
                "clock:               900 s behind the server's; connections are refused: fix NTP"
            ),
            "{text}"
        );
        let fine = serde_json::json!({"state": "connected", "clock_skew_s": null});
        assert!(!format_status(&fine).contains("clock:"));
    }

    #[test]
    fn status_shows_every_field_and_the_warnings_last() {
        let status = serde_json::json!({
            "version": "1.2.3", "uptime_s": 60, "state": "connected",
            "endpoint": "a1.iot", "region": "eu-west-1", "identity_id": "eu-west-1:abc",
            "mqtt_last_error": "reset", "mqtt_last_error_at": "10:00",
            "spool_messages": 2, "oldest_spooled_age_s": 5,
            "policy_reattached_at": "09:00", "policy_reattaches_total": 1,
            "refused_filters": ["cmd/#", "admin/+"],
        });
        let text = format_status(&status);
        assert!(text.starts_with("version:             1.2.3 (up 60 s)\nstate:               connected\nendpoint:            a1.iot (eu-west-1)\n"), "{text}");
        assert!(
            text.contains("\nmqtt last error:     reset since 10:00\n"),
            "{text}"
        );
        assert!(
            text.contains("\nspool:               2 messages, - bytes, oldest waiting 5 s, -\n"),
            "{text}"
        );
        assert!(text.ends_with("\ninbox:               - messages (- dropped), -\npolicy:              attached again at 09:00 (1 times since start): IoT Core turned this identity away\nrefused filters:     cmd/#, admin/+: the IoT policy does not allow them, nothing arrives on them\n"), "{text}");
    }

    #[test]
    fn an_answer_settles_the_line_with_its_id_or_else_the_oldest() {
        let mut unanswered = Unanswered::default();
        unanswered.push(r#"{"topic":"a","payload":1,"id":1}"#.to_owned());
        unanswered.push("not json".to_owned());
        unanswered.push(r#"{"topic":"b","payload":2,"id":3}"#.to_owned());
        unanswered.push(r#"{"topic":"c","payload":3,"id":4}"#.to_owned());
        unanswered.answered(&serde_json::json!({"ok": true, "id": 3}));
        // Without an id: the line that had none.
        unanswered.answered(&serde_json::json!({"ok": false, "error": "bad_json"}));
        assert_eq!(
            unanswered.lines().collect::<Vec<_>>(),
            [
                r#"{"topic":"a","payload":1,"id":1}"#,
                r#"{"topic":"c","payload":3,"id":4}"#
            ]
        );
        // An id no line carries: the oldest line.
        unanswered.answered(&serde_json::json!({"ok": true, "id": 9}));
        assert_eq!(
            unanswered.lines().collect::<Vec<_>>(),
            [r#"{"topic":"c","payload":3,"id":4}"#]
        );
        unanswered.answered(&serde_json::json!({"ok": true, "id": 4}));
        assert!(unanswered.is_empty());
        unanswered.answered(&serde_json::json!({"ok": true, "id": 5}));
        assert!(unanswered.is_empty());
    }
}

/// How long `subscribe` waits to connect and for the daemon to confirm the subscription.
pub const SUBSCRIBE_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why `subscribe` stopped early.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error(transparent)]
    Socket(#[from] SocketClientError),
    /// The daemon refused the request (e.g. `invalid_topic` for a bad filter).
    #[error("{code}: {message}")]
    Refused { code: String, message: String },
    #[error("cannot write a message out: {0}")]
    Output(std::io::Error),
}

/// `subscribe`: prints one JSON line per message (`topic`, and `payload` or
/// `payload_base64`) to `out`, and acks each one only after it is written and flushed; a
/// message not printed is not acked and comes again. Returns after `count` messages (the
/// last ack confirmed by the daemon), or when the daemon closes the connection.
pub fn subscribe(
    socket: &Path,
    filters: &[String],
    count: Option<u64>,
    out: &mut dyn Write,
) -> Result<u64, SubscribeError> {
    let mut stream = connect(socket, SUBSCRIBE_ANSWER_TIMEOUT)?;
    let io = io_error(SUBSCRIBE_ANSWER_TIMEOUT);
    let request = json!({"op": "subscribe", "topics": filters, "id": "subscribe"});
    stream
        .write_all(format!("{request}\n").as_bytes())
        .map_err(io)?;
    let mut reader = BufReader::new(stream.try_clone().map_err(SocketClientError::Io)?);
    let answer = read_json(&mut reader, io)?;
    refused(&answer)?;
    if answer["id"] != "subscribe" {
        return Err(SocketClientError::BadAnswer(answer.to_string()).into());
    }
    // Messages may be far apart: wait for them as long as it takes.
    stream
        .set_read_timeout(None)
        .map_err(SocketClientError::Io)?;
    let mut printed = 0u64;
    let mut last_ack: Option<i64> = None;
    loop {
        if count.is_some_and(|count| printed >= count) && last_ack.is_none() {
            return Ok(printed);
        }
        let line = match read_json(&mut reader, io) {
            Ok(line) => line,
            Err(SocketClientError::Closed) if count.is_none() => return Ok(printed),
            Err(error) => return Err(error.into()),
        };
        if line["op"] != "message" {
            // The answer to an ack: the last one closes a `--count` run.
            refused(&line)?;
            if line["id"].as_i64().is_some() && line["id"].as_i64() == last_ack {
                last_ack = None;
            }
            continue;
        }
        if count.is_some_and(|count| printed >= count) {
            // More than asked for: not acked, so it goes to the next subscriber.
            continue;
        }
        let Some(seq) = line["seq"].as_i64() else {
            return Err(SocketClientError::BadAnswer(line.to_string()).into());
        };
        let mut shown = serde_json::Map::new();
        shown.insert("topic".into(), line["topic"].clone());
        for key in ["payload", "payload_base64"] {
            if let Some(value) = line.get(key) {
                shown.insert(key.into(), value.clone());
            }
        }
        writeln!(out, "{}", Value::Object(shown)).map_err(SubscribeError::Output)?;
        out.flush().map_err(SubscribeError::Output)?;
        printed += 1;
        let ack = json!({"op": "ack", "seq": seq, "id": seq});
        stream
            .write_all(format!("{ack}\n").as_bytes())
            .map_err(SocketClientError::Io)?;
        last_ack = Some(seq);
    }
}

fn read_json(
    reader: &mut impl BufRead,
    io: impl Fn(std::io::Error) -> SocketClientError,
) -> Result<Value, SocketClientError> {
    let mut line = String::new();
    if reader.read_line(&mut line).map_err(io)? == 0 {
        return Err(SocketClientError::Closed);
    }
    serde_json::from_str(&line).map_err(|_| SocketClientError::BadAnswer(line.trim_end().into()))
}

fn refused(answer: &Value) -> Result<(), SubscribeError> {
    if answer["ok"] == Value::Bool(false) {
        return Err(SubscribeError::Refused {
            code: answer["error"].as_str().unwrap_or("error").to_owned(),
            message: answer["message"].as_str().unwrap_or_default().to_owned(),
        });
    }
    Ok(())
}
