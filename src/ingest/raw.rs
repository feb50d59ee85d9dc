//! Raw sockets (`[[socket.raw]]`) for sensors that cannot speak JSON, like the AWS IoT Device
//! Client's Sensor Publish: every record (a line, or up to a configured one-byte delimiter)
//! becomes one message's payload on the socket's fixed topic. Nothing is answered; the spool's
//! backpressure slows the writer instead. Records over IoT Core's payload limit are skipped.

use std::sync::{Arc, Mutex};

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{RawSocketConfig, SocketConfig};
use crate::heartbeat::Heartbeat;
use crate::ingest::records::{Next, RecordReader};
use crate::ingest::server::{Pace, accept_clients};
use crate::message::{MAX_PAYLOAD_BYTES, Message, PayloadKind};
use crate::repeats::Repeats;
use crate::spool::{AppendError, Spool};

/// Records of one client on their way into the spool: the reader goes on while earlier
/// records wait for their group commit, as on the JSON socket.
const PIPELINE: usize = 1024;

/// Serves one raw socket until the daemon stops.
pub struct RawServer {
    pub listener: UnixListener,
    pub raw: RawSocketConfig,
    pub limits: Arc<SocketConfig>,
    pub spool: Spool,
    pub stopping: watch::Receiver<bool>,
    pub heartbeat: Heartbeat,
}

impl RawServer {
    pub async fn run(self) {
        let this = Arc::new(self);
        // One limiter per socket, not per client: a sensor that reconnects for every record
        // would otherwise log each failure.
        let repeats = Arc::new(Mutex::new(Repeats::default()));
        accept_clients(&this.listener, &this.limits, &this.heartbeat, |stream| {
            let server = this.clone();
            let repeats = repeats.clone();
            async move { server.serve(stream, repeats).await }
        })
        .await;
    }

    async fn serve(&self, stream: UnixStream, repeats: Arc<Mutex<Repeats>>) {
        let (pipeline, mut pending) =
            mpsc::channel::<oneshot::Receiver<Result<(), AppendError>>>(PIPELINE);
        let topic = self.raw.topic.clone();
        let acker_repeats = repeats.clone();
        let acker = tokio::spawn(async move {
            while let Some(done) = pending.recv().await {
                if let Err(error) = done.await.unwrap_or(Err(AppendError::Closed)) {
                    not_stored(&acker_repeats, &topic, &error);
                }
            }
        });
        self.read_records(stream, &pipeline, &repeats).await;
        drop(pipeline);
        let _ = acker.await;
    }

    async fn read_records(
        &self,
        stream: UnixStream,
        pipeline: &mpsc::Sender<oneshot::Receiver<Result<(), AppendError>>>,
        repeats: &Mutex<Repeats>,
    ) {
        let qos = self.raw.qos;
        let mut reader = RecordReader::new(
            stream,
            self.raw.delimiter.0,
            MAX_PAYLOAD_BYTES,
            self.limits.idle_timeout,
        );
        let mut pace = Pace::new(self.limits.max_messages_per_second);
        loop {
            match reader.next().await {
                Next::Record(payload) if payload.is_empty() => {}
                Next::Record(payload) => {
                    if *self.stopping.borrow() {
                        return;
                    }
                    pace.wait().await;
                    let message = Message {
                        topic: self.raw.topic.clone(),
                        payload,
                        qos,
                        // A record is opaque bytes: never merged into a batch array.
                        kind: PayloadKind::Binary,
                        options: Default::default(),
                    };
                    match self.spool.submit(message).await {
                        Ok(done) => {
                            if pipeline.send(done).await.is_err() {
                                return;
                            }
                        }
                        Err(error) => not_stored(repeats, &self.raw.topic, &error),
                    }
                }
                Next::TooLong => {
                    let held_back = repeats
                        .lock()
                        .ok()
                        .and_then(|mut repeats| repeats.admit("too long"));
                    if let Some(held_back) = held_back {
                        tracing::warn!(
                            topic = %self.raw.topic,
                            held_back,
                            "raw socket record over {MAX_PAYLOAD_BYTES} bytes skipped"
                        );
                    }
                }
                Next::Idle | Next::Silent | Next::End => return,
            }
        }
    }
}

/// Logs a record the spool refused, at most once per `REPEAT_EVERY` for the same error.
fn not_stored(repeats: &Mutex<Repeats>, topic: &str, error: &AppendError) {
    let held_back = repeats
        .lock()
        .ok()
        // Compared without its figures: a full spool's size changes with every record.
        .and_then(|mut repeats| repeats.admit(&without_digits(&error.to_string())));
    if let Some(held_back) = held_back {
        tracing::warn!(topic, %error, held_back, "raw socket record not stored");
    }
}

fn without_digits(text: &str) -> String {
    text.chars().filter(|c| !c.is_ascii_digit()).collect()
}
