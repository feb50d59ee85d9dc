//! Local apps: clients of the daemon's socket, as a sensor app would write to it.

use super::*;

/// A local app on the daemon's socket.
pub struct LocalApp {
    pub(super) stream: UnixStream,
    pub(super) reader: BufReader<UnixStream>,
}

impl LocalApp {
    pub fn connect(path: &Path) -> LocalApp {
        let stream = UnixStream::connect(path).expect("connect to daemon socket");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        LocalApp { stream, reader }
    }

    pub fn send_line(&mut self, line: &str) {
        self.stream.write_all(line.as_bytes()).expect("write");
        self.stream.write_all(b"\n").expect("write");
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    pub fn read_answer(&mut self, timeout: Duration) -> Option<Value> {
        self.stream
            .set_read_timeout(Some(timeout))
            .expect("timeout");
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => serde_json::from_str(&line).ok(),
        }
    }

    pub fn read_to_end(mut self) -> String {
        let mut text = String::new();
        let _ = self.reader.read_to_string(&mut text);
        text
    }
}

/// A local app that keeps writing `{"n": i}` messages (with `id` = i) at a steady rate, one
/// request and answer at a time, reconnecting whenever the daemon is gone. It records the ids
/// the daemon answered `ok`: the ones that must arrive.
pub struct Streamer {
    pub(super) stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub(super) handle: Option<std::thread::JoinHandle<Vec<u64>>>,
}

impl Streamer {
    pub fn start(socket: PathBuf, topic: &str, per_second: u32) -> Streamer {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let topic = topic.to_owned();
        let pause = Duration::from_secs(1) / per_second.max(1);
        let handle = std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut client: Option<LocalApp> = None;
            let mut n = 0u64;
            while !stopped.load(Ordering::SeqCst) {
                let Some(connected) = client.as_mut() else {
                    client = UnixStream::connect(&socket).ok().map(|stream| LocalApp {
                        reader: BufReader::new(stream.try_clone().expect("clone")),
                        stream,
                    });
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                let line = format!(r#"{{"topic":{topic:?},"payload":{{"n":{n}}},"id":{n}}}"#);
                let sent = connected
                    .stream
                    .write_all(format!("{line}\n").as_bytes())
                    .is_ok();
                match sent
                    .then(|| connected.read_answer(Duration::from_secs(10)))
                    .flatten()
                {
                    Some(answer) if answer["ok"] == true && answer["id"] == n => acked.push(n),
                    Some(_) => {}
                    None => client = None,
                }
                n += 1;
                std::thread::sleep(pause);
            }
            acked
        });
        Streamer {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops writing; returns the acknowledged ids.
    pub fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Writes `{"n": i}` for every i in `range` on one connection without waiting in between (a
/// writer thread), and returns the ids answered `ok` once every answer is in.
pub fn send_many(socket: &Path, topic: &str, range: std::ops::Range<u64>) -> Vec<u64> {
    let stream = UnixStream::connect(socket).expect("connect");
    let mut writer = stream.try_clone().expect("clone");
    let topic = topic.to_owned();
    let lines = range.clone();
    let sender = std::thread::spawn(move || {
        let mut buffer = Vec::new();
        for n in lines {
            buffer.extend_from_slice(
                format!("{{\"topic\":{topic:?},\"payload\":{{\"n\":{n}}},\"id\":{n}}}\n")
                    .as_bytes(),
            );
            if buffer.len() > 64 * 1024 {
                writer.write_all(&buffer).expect("write");
                buffer.clear();
            }
        }
        writer.write_all(&buffer).expect("write");
    });
    let mut reader = BufReader::new(stream);
    let mut acked = Vec::new();
    for _ in range {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        let answer: Value = serde_json::from_str(&line).expect("answer json");
        if answer["ok"] == true {
            acked.push(answer["id"].as_u64().expect("id"));
        }
    }
    sender.join().expect("writer");
    acked
}

/// `writers` connections each pipelining `per_writer` publish lines; messages/s until the last
/// `ok` is in.
pub fn pipeline_publishes(socket: &Path, writers: usize, per_writer: u64) -> f64 {
    let started = Instant::now();
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let socket = socket.to_owned();
            std::thread::spawn(move || {
                let stream = UnixStream::connect(&socket).expect("connect");
                let mut writer = stream.try_clone().expect("clone");
                let sender = std::thread::spawn(move || {
                    let mut buffer = Vec::with_capacity(64 * 1024);
                    for n in 0..per_writer {
                        let line = format!(
                            "{{\"topic\":\"bench/w{w}\",\"payload\":{{\"n\":{n},\"celsius\":21.5}},\"id\":{n}}}\n"
                        );
                        buffer.extend_from_slice(line.as_bytes());
                        if buffer.len() >= 60 * 1024 {
                            writer.write_all(&buffer).expect("write");
                            buffer.clear();
                        }
                    }
                    writer.write_all(&buffer).expect("write");
                });
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                for _ in 0..per_writer {
                    line.clear();
                    assert!(reader.read_line(&mut line).expect("read") > 0, "connection closed");
                    assert!(line.contains("\"ok\":true"), "refused: {line}");
                }
                sender.join().expect("sender");
            })
        })
        .collect();
    for handle in handles {
        handle.join().expect("writer");
    }
    (writers as u64 * per_writer) as f64 / started.elapsed().as_secs_f64()
}

/// Waits (up to a minute) until the daemon's `status` says `connected`.
pub fn wait_connected(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut stream = UnixStream::connect(socket).expect("socket");
        stream.write_all(b"{\"op\":\"status\"}\n").expect("status");
        let mut line = String::new();
        BufReader::new(&stream)
            .read_line(&mut line)
            .expect("answer");
        if line.contains("\"state\":\"connected\"") {
            return;
        }
        assert!(Instant::now() < deadline, "never connected: {line}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a docs example as `program -c script` (with `PATH` set when given), asserts it exits 0
/// (its stderr in the message) and returns its stdout.
pub fn run_example(program: &str, script: &str, path: Option<&str>) -> String {
    let mut command = Command::new(program);
    command.args(["-c", script]);
    if let Some(path) = path {
        command.env("PATH", path);
    }
    super::process::run_ok(&mut command)
}

/// The fenced block of docs/protocol.md that follows `marker`.
pub fn doc_example(marker: &str, fence: &str) -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md"))
        .expect("doc");
    let start = doc.find(marker).expect("marker");
    let block = &doc[start..];
    let open = block.find(&format!("```{fence}\n")).expect("fence") + fence.len() + 4;
    let close = open + block[open..].find("```").expect("closing fence");
    block[open..close].to_owned()
}
