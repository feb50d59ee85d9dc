//! Raw sockets (`[[socket.raw]]`) for sensors that cannot speak JSON, like the AWS IoT Device
//! Client's Sensor Publish: every record (a line, or up to a configured one-byte delimiter)
//! becomes one message's payload on the socket's fixed topic. Nothing is answered; the spool's
//! backpressure slows the writer instead. Records over IoT Core's payload limit are skipped.

use std::sync::Arc;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::config::{RawSocketConfig, SocketConfig};
use crate::heartbeat::Heartbeat;
use crate::ingest::{Pace, accept_clients};
use crate::lines::{Next, RecordReader};
use crate::protocol::{MAX_PAYLOAD_BYTES, Message, PayloadKind, Qos};
use crate::spool::Spool;

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
        accept_clients(&this.listener, &this.limits, &this.heartbeat, |stream| {
            let server = this.clone();
            async move { server.serve(stream).await }
        })
        .await;
    }

    async fn serve(&self, stream: UnixStream) {
        let qos = Qos::from_u8(self.raw.qos).unwrap_or(Qos::AtLeastOnce);
        let mut reader = RecordReader::new(
            stream,
            self.raw.delimiter_byte(),
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
                    };
                    if let Err(error) = self.spool.append(message).await {
                        tracing::warn!(topic = %self.raw.topic, %error, "raw socket record not stored");
                    }
                }
                Next::TooLong => {
                    tracing::warn!(
                        topic = %self.raw.topic,
                        "raw socket record over {MAX_PAYLOAD_BYTES} bytes skipped"
                    );
                }
                Next::Idle | Next::End => return,
            }
        }
    }
}
