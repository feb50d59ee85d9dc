//! The `send` and `status` commands: small clients of the daemon's socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::{Value, json};

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {source} (is the daemon running?)")]
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
}

/// What `send` publishes: one argument, or one message per stdin line.
pub enum Payloads<'a> {
    One(&'a str),
    Lines(Box<dyn BufRead + Send + 'a>),
}

fn connect(path: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.display().to_string(),
        source,
    })
}

/// How `send` turns its input into protocol lines.
pub enum Framing {
    /// Each input is a payload for `topic`.
    Message { topic: String, qos: u8 },
    /// Each input is already a protocol line; an `id` is added where missing so that every
    /// line gets its answer.
    Json,
}

fn protocol_line(line: &str, id: u64) -> String {
    match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(mut object)) => {
            object.entry("id").or_insert(id.into());
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

/// Sends every input and waits for each answer. Returns how many were refused; each refusal
/// is printed to stderr.
pub fn send(socket: &Path, framing: Framing, payloads: Payloads<'_>) -> Result<u64, ClientError> {
    let stream = connect(socket)?;
    let mut writer = stream.try_clone()?;
    // Written by one thread while this one reads answers, so neither side's buffer fills up.
    std::thread::scope(|scope| {
        let sender = scope.spawn(move || -> Result<u64, std::io::Error> {
        let mut count = 0u64;
        let mut write = |payload: &str, count: &mut u64| -> std::io::Result<()> {
            *count += 1;
            let line = match &framing {
                Framing::Message { topic, qos } => {
                    json!({"topic": topic, "payload": payload_value(payload), "qos": qos, "id": *count})
                        .to_string()
                }
                Framing::Json => protocol_line(payload, *count),
            };
            writer.write_all(format!("{line}\n").as_bytes())
        };
        match payloads {
            Payloads::One(text) => write(text, &mut count)?,
            Payloads::Lines(lines) => {
                for line in lines.lines() {
                    let line = line?;
                    if !line.trim().is_empty() {
                        write(&line, &mut count)?;
                    }
                }
            }
        }
        writer.shutdown(std::net::Shutdown::Write)?;
        Ok(count)
    });
        let mut answers = 0u64;
        let mut refused = 0u64;
        for line in BufReader::new(stream).lines() {
            let line = line?;
            let answer: Value =
                serde_json::from_str(&line).map_err(|_| ClientError::BadAnswer(line.clone()))?;
            answers += 1;
            if answer["ok"] != Value::Bool(true) {
                refused += 1;
                eprintln!(
                    "message {}: {}: {}",
                    answer["id"],
                    answer["error"].as_str().unwrap_or("error"),
                    answer["message"].as_str().unwrap_or("")
                );
            }
        }
        let sent = sender
            .join()
            .map_err(|_| ClientError::BadAnswer("sender thread failed".into()))??;
        if answers < sent {
            return Err(ClientError::Closed);
        }
        Ok(refused)
    })
}

/// Asks the daemon for its status object.
pub fn status(socket: &Path) -> Result<Value, ClientError> {
    let mut stream = connect(socket)?;
    stream.write_all(b"{\"op\":\"status\"}\n")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    let answer: Value =
        serde_json::from_str(&line).map_err(|_| ClientError::BadAnswer(line.clone()))?;
    match answer.get("status") {
        Some(status) if answer["ok"] == Value::Bool(true) => Ok(status.clone()),
        _ => Err(ClientError::BadAnswer(line)),
    }
}

/// Asks the daemon to list, requeue or purge its dead letters; returns the answer object.
pub fn dead_letters(socket: &Path, action: &str) -> Result<Value, ClientError> {
    let mut stream = connect(socket)?;
    let request = json!({"op": "dead_letters", "action": action});
    stream.write_all(format!("{request}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    let answer: Value =
        serde_json::from_str(&line).map_err(|_| ClientError::BadAnswer(line.clone()))?;
    if answer["ok"] == Value::Bool(true) {
        Ok(answer)
    } else {
        Err(ClientError::BadAnswer(line.trim_end().to_owned()))
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

/// The human form of `status`.
pub fn format_status(status: &Value) -> String {
    let field = |name: &str| match &status[name] {
        Value::Null => "-".to_owned(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    format!(
        "state:               {}\nidentity:            {}\ncredentials expire:  {}\nlast refresh:        {}\nlast error:          {}\nspool:               {} messages, {} bytes\npublished:           {} ({} republished)\ndropped:             {}\ndead letters:        {} ({} since start)\n",
        field("state"),
        field("identity_id"),
        field("credentials_expire_at"),
        field("last_refresh"),
        field("last_error"),
        field("spool_messages"),
        field("spool_bytes"),
        field("published_total"),
        field("republished_total"),
        field("dropped_total"),
        field("dead_letters"),
        field("dead_letter_total"),
    )
}
