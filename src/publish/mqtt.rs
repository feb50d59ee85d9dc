//! One MQTT-over-WebSockets connection to IoT Core, signed with the current credentials.
//!
//! rumqttc reconnects on its own and without backoff, and signs only once; so each connection
//! here is a fresh client and event loop, built with a freshly presigned URL, and dropped on the
//! first error. The publisher decides when to try again.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rumqttc::{
    AsyncClient, ConnectionError, Event, MqttOptions, StateError, TlsConfiguration, Transport,
};
use rustls::ClientConfig;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::{MqttConfig, Proxy, url_host};
use crate::identity::Session;
use crate::message::MAX_PAYLOAD_BYTES;
use crate::publish::flow::{Failure, SLOWEST_LINK_BYTES_PER_S};
use crate::publish::inbound::MAX_RECEIVE_BATCH;
use crate::publish::signer::{SignError, presign};
use crate::publish::wire::WireBytes;
use crate::topic::MAX_TOPIC_BYTES;

/// Room for the fixed header, topic and packet id around the largest payload IoT Core accepts.
const MAX_PACKET_BYTES: usize = MAX_PAYLOAD_BYTES + MAX_TOPIC_BYTES + 64;

/// What every connection is built from.
#[derive(Clone)]
pub struct MqttSettings {
    pub config: MqttConfig,
    pub region: String,
    pub tls: Arc<ClientConfig>,
    pub max_in_flight: u16,
    /// `clean_session = false`: the broker keeps the subscriptions and queues QoS 1 messages
    /// while the daemon is away (downlink on; see `publish::inbound`).
    pub persistent_session: bool,
    /// The HTTP(S) proxy the WebSocket goes through (HTTP CONNECT), with the TLS config for an
    /// `https://` one.
    pub proxy: Option<(Proxy, Option<Arc<ClientConfig>>)>,
    /// Counts the bytes of every connection on its TCP stream.
    pub wire: Arc<WireBytes>,
}

impl MqttSettings {
    /// `mqtt.url`, else `wss://<mqtt.endpoint or the secret's IoTEndpoint>/mqtt`.
    pub fn broker_url(&self, session: &Session) -> String {
        if !self.config.url.is_empty() {
            return self.config.url.clone();
        }
        let endpoint = if self.config.endpoint.is_empty() {
            &session.iot_endpoint
        } else {
            &self.config.endpoint
        };
        format!("wss://{endpoint}/mqtt")
    }
}

/// A live connection attempt: the client to publish with and the events of its event loop.
pub struct Connection {
    pub client: AsyncClient,
    pub events: mpsc::UnboundedReceiver<Result<Event, ConnectionError>>,
    pump: JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

/// The host (and port, if any) of a broker URL, for `status`: no path, no query.
pub fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split(['/', '?']).next().unwrap_or_default().to_owned()
}

/// rumqttc's proxy for `proxy`, sending Basic credentials with the CONNECT request.
fn mqtt_proxy(proxy: &Proxy, tls: Option<&Arc<ClientConfig>>) -> rumqttc::Proxy {
    let ty = match tls {
        Some(tls) if proxy.tls => rumqttc::ProxyType::Https(TlsConfiguration::Rustls(tls.clone())),
        _ => rumqttc::ProxyType::Http,
    };
    let auth = match &proxy.credentials {
        Some((username, password)) => rumqttc::ProxyAuth::Basic {
            username: username.clone(),
            password: password.expose().clone(),
        },
        None => rumqttc::ProxyAuth::None,
    };
    let addr = if proxy.host.contains(':') {
        format!("[{}]", proxy.host)
    } else {
        proxy.host.clone()
    };
    rumqttc::Proxy {
        ty,
        auth,
        addr,
        port: proxy.port,
    }
}

/// Starts connecting as `session.identity_id`, signed with `session.credentials` now.
pub fn connect(settings: &MqttSettings, session: &Session) -> Result<Connection, SignError> {
    let url = presign(
        &settings.broker_url(session),
        &settings.region,
        &session.credentials,
        SystemTime::now(),
    )?;
    let broker_url = settings.broker_url(session);
    let mut options = MqttOptions::new(session.identity_id.clone(), url, 443);
    if let Some((proxy, tls)) = &settings.proxy
        && !proxy.bypasses(url_host(&broker_url))
    {
        options.set_proxy(mqtt_proxy(proxy, tls.as_ref()));
    }
    let transport = if settings.config.url.starts_with("ws://") {
        Transport::Ws
    } else {
        Transport::Wss(TlsConfiguration::Rustls(settings.tls.clone()))
    };
    options
        .set_transport(transport)
        .set_keep_alive(settings.config.keep_alive)
        // Unacknowledged publishes live in the spool and are republished by the publisher
        // either way; a persistent session is for what the broker sends us.
        .set_clean_session(!settings.persistent_session)
        // Received messages are acknowledged only once they are committed to the inbox.
        .set_manual_acks(true)
        .set_inflight(settings.max_in_flight)
        .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
    // The publisher never has more than max_in_flight publishes outstanding, nor more acks
    // than one received batch, so this never fills.
    let capacity = usize::from(settings.max_in_flight) + MAX_RECEIVE_BATCH + 8;
    let (client, mut event_loop) = AsyncClient::new(options, capacity);
    // rumqttc bounds both the connect and every flush with this one setting: it is sized for
    // the flush on a slow link, and the connect gets its own bound below.
    let wire = settings.wire.clone();
    event_loop
        .network_options
        .set_connection_timeout(FLUSH_TIMEOUT.as_secs())
        .set_stream_wrapper(Arc::new(move |stream| wire.meter(stream)));
    let (sender, events) = mpsc::unbounded_channel();
    let pump = tokio::spawn(async move {
        // The first poll connects (TCP, TLS, upgrade, CONNECT, CONNACK); the connection is
        // dropped if it fails, so cutting it short harms nothing.
        let first = tokio::time::timeout(CONNECT_TIMEOUT, event_loop.poll())
            .await
            .unwrap_or(Err(ConnectionError::NetworkTimeout));
        let failed = first.is_err();
        if sender.send(first).is_err() || failed {
            return;
        }
        loop {
            let event = event_loop.poll().await;
            let failed = event.is_err();
            if sender.send(event).is_err() || failed {
                break;
            }
        }
    });
    Ok(Connection {
        client,
        events,
        pump,
    })
}

/// Whether a new session (`None`: withdrawn) calls for a new connection. Fresh credentials
/// do not: IoT Core does not cut a connection when the credentials that signed it expire (it
/// lasts up to 24 hours), and a reconnect per refresh would cost a TLS handshake, an upgrade,
/// CONNECT and SUBSCRIBE every hour. Another identity or endpoint does, and so does a
/// withdrawn session (the device's user was refused).
pub fn needs_new_connection(current: &Session, new: Option<&Session>) -> bool {
    new.is_none_or(|new| {
        new.identity_id != current.identity_id || new.iot_endpoint != current.iot_endpoint
    })
}

/// Whether the broker closed the connection it had let in: IoT Core's answer to a CONNECT no
/// policy allows (`doctor`'s trial connection).
pub fn closed_by_broker(error: &ConnectionError) -> bool {
    failure(error) == Failure::Closed
}

/// Whether the broker closed a connection it had let in (see [`Failure`]). TCP, TLS and the
/// websocket upgrade fail with their own errors; once the MQTT stream runs, rumqttc reports
/// the peer's close as an aborted stream or an I/O error of the byte stream under it.
pub fn failure(error: &ConnectionError) -> Failure {
    use std::io::ErrorKind;
    let closed = match error {
        ConnectionError::MqttState(StateError::ConnectionAborted) => true,
        ConnectionError::MqttState(
            StateError::Io(io) | StateError::Deserialization(rumqttc::mqttbytes::Error::Io(io)),
        ) => matches!(
            io.kind(),
            ErrorKind::UnexpectedEof
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe
        ),
        _ => false,
    };
    if closed {
        Failure::Closed
    } else {
        Failure::Other
    }
}

/// TCP + TLS + websocket upgrade + CONNACK must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// One flush writes a burst (under 64 KiB, plus the packet that crossed it) after what the
/// socket still holds: two of the largest packets at the slowest link the PUBACK deadlines
/// allow for (about 4 minutes). A dead link is found by it.
const FLUSH_TIMEOUT: Duration =
    Duration::from_secs(2 * MAX_PACKET_BYTES as u64 / SLOWEST_LINK_BYTES_PER_S);

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(date: &str) -> ConnectionError {
        let response = tungstenite::http::Response::builder()
            .status(403)
            .header("Date", date)
            .body(None)
            .expect("response");
        ConnectionError::Websocket(tungstenite::Error::Http(response))
    }

    fn session(identity_id: &str, access_key_id: &str, iot_endpoint: &str) -> Session {
        let expires_at = SystemTime::now() + Duration::from_secs(3600);
        Session {
            identity_id: identity_id.into(),
            credentials: crate::identity::aws::AwsCredentials::for_test(
                access_key_id,
                "s",
                "t",
                expires_at,
            ),
            iot_endpoint: iot_endpoint.into(),
            refresh_at: expires_at,
        }
    }

    #[test]
    fn fresh_credentials_keep_the_connection_another_identity_does_not() {
        let current = session("us-east-1:a", "AKID1", "e-ats.iot");
        let refreshed = session("us-east-1:a", "AKID2", "e-ats.iot");
        assert!(!needs_new_connection(&current, Some(&refreshed)));
        assert!(needs_new_connection(&current, None), "withdrawn");
        let other = session("us-east-1:b", "AKID2", "e-ats.iot");
        assert!(needs_new_connection(&current, Some(&other)));
        let moved = session("us-east-1:a", "AKID2", "f-ats.iot");
        assert!(needs_new_connection(&current, Some(&moved)));
    }

    #[test]
    fn only_a_close_of_the_running_mqtt_stream_counts_as_the_brokers() {
        use std::io::{Error, ErrorKind};
        let io = |kind: ErrorKind| Error::new(kind, "test");
        let closed = [
            ConnectionError::MqttState(StateError::ConnectionAborted),
            ConnectionError::MqttState(StateError::Io(io(ErrorKind::ConnectionReset))),
            ConnectionError::MqttState(StateError::Deserialization(rumqttc::mqttbytes::Error::Io(
                io(ErrorKind::UnexpectedEof),
            ))),
        ];
        for error in &closed {
            assert_eq!(failure(error), Failure::Closed, "{error}");
        }
        let other = [
            // TCP refused, the upgrade refused, timeouts, a missing PINGRESP.
            ConnectionError::Io(io(ErrorKind::ConnectionRefused)),
            ConnectionError::Io(io(ErrorKind::ConnectionReset)),
            refused("Sun, 29 Nov 2026 15:10:00 GMT"),
            ConnectionError::NetworkTimeout,
            ConnectionError::FlushTimeout,
            ConnectionError::MqttState(StateError::AwaitPingResp),
            ConnectionError::MqttState(StateError::Io(io(ErrorKind::TimedOut))),
        ];
        for error in &other {
            assert_eq!(failure(error), Failure::Other, "{error}");
        }
    }
}
