//! The emulated cloud for integration tests: moto (AWS) and mosquitto (IoT Core's broker),
//! provisioned like the CloudFormation template, plus the real daemon binary.
//!
//! Every `Cloud` lives in its own network namespace with only loopback up, so the brokers'
//! listeners (mosquitto's websockets listener binds every interface) are unreachable from
//! outside, and fixed ports cannot collide between tests. Processes join the namespace through
//! `ip netns exec`; the test talks to them through Unix sockets (not network-scoped), files and
//! child processes. Everything is torn down on drop, also when a test panics.
//!
//! Needs root (network namespaces), `ip`, `openssl`, mosquitto + mosquitto-clients, and a
//! Python with moto[server] and boto3 (`.venv`, see README).
// Each test binary uses a part of the harness.
#![allow(dead_code, unused_imports)]

mod app;
mod broker;
mod cloud;
mod daemon;
mod disk;
mod downlink;
mod gate;
mod http_proxy;
mod link;
mod namespace;
mod process;
mod profile;
mod proxies;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub use app::*;
pub use broker::*;
pub use cloud::*;
pub use daemon::*;
pub use disk::*;
pub use downlink::*;
pub use gate::*;
pub use http_proxy::*;
pub use link::*;
pub use namespace::*;
pub use process::*;
pub use profile::*;
pub use proxies::*;

pub const MOTO_PORT: u16 = 5000;
pub const WSS_PORT: u16 = 8443;
pub const MQTT_PORT: u16 = 1883;
pub const FAULT_PROXY_PORT: u16 = 5001;
pub const WS_PROXY_PORT: u16 = 8444;
pub const ATTACH_PROXY_PORT: u16 = 5002;
pub const COGNITO_PROXY_PORT: u16 = 5003;
/// The cloud's address on the veth links to device namespaces ([`DeviceLink`]); in the test
/// certificate's SAN.
pub const CLOUD_LINK_IP: &str = "10.77.0.1";
pub(super) const START_TIMEOUT: Duration = Duration::from_secs(30);
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
/// What moto's GetCredentialsForIdentity always returns.
pub const MOTO_SECRET_KEY: &str = "ABCSECRETKEY";
pub const MOTO_SESSION_TOKEN: &str = "ABC12345";
