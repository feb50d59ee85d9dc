//! A real HTTP proxy (tinyproxy, with Basic auth) in the test's network namespace, and a
//! firewall that lets only the proxy reach the emulated cloud.

use super::*;

/// The proxy's port inside the namespace.
pub const HTTP_PROXY_PORT: u16 = 18888;
/// The proxy runs as this uid: the firewall lets only it reach moto and the broker.
const PROXY_UID: u32 = 65534;

/// A running tinyproxy; its log names every request it forwarded.
pub struct HttpProxy {
    _process: Process,
    log: PathBuf,
}

impl HttpProxy {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Cloud {
    /// Starts tinyproxy on 127.0.0.1:`HTTP_PROXY_PORT`, requiring `user`:`password`.
    pub fn start_http_proxy(&self, user: &str, password: &str) -> HttpProxy {
        let dir = self.dir.path().join("http-proxy");
        std::fs::create_dir_all(&dir).expect("proxy dir");
        // tinyproxy drops to nobody and writes its log as nobody.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .expect("chmod proxy dir");
        let log = dir.join("tinyproxy.log");
        let config = dir.join("tinyproxy.conf");
        std::fs::write(
            &config,
            format!(
                "User nobody\nGroup nogroup\nPort {HTTP_PROXY_PORT}\nListen 127.0.0.1\nTimeout 60\n\
                 MaxClients 50\nLogFile \"{}\"\nLogLevel Connect\nBasicAuth {user} {password}\n\
                 DisableViaHeader Yes\n",
                log.display()
            ),
        )
        .expect("proxy config");
        let process = Process {
            name: "tinyproxy",
            child: Some(
                self.namespace
                    .command("tinyproxy")
                    .arg("-d")
                    .arg("-c")
                    .arg(&config)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start tinyproxy (apt install tinyproxy-bin)"),
            ),
        };
        wait_for("tinyproxy to listen", START_TIMEOUT, || {
            self.namespace
                .command("bash")
                .args([
                    "-c",
                    &format!("exec 3<>/dev/tcp/127.0.0.1/{HTTP_PROXY_PORT}"),
                ])
                .status()
                .is_ok_and(|status| status.success())
        });
        HttpProxy {
            _process: process,
            log,
        }
    }

    /// From now on only the proxy (its uid) may open TCP connections to `ports` in the
    /// namespace: everyone else is refused, so whatever still works went through the proxy.
    pub fn allow_only_the_proxy_to(&self, ports: &[u16]) {
        let ports = ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let rules = format!(
            "table inet relay_test {{\n chain out {{\n  type filter hook output priority 0\n  \
             tcp dport {{ {ports} }} meta skuid != {PROXY_UID} reject with tcp reset\n }}\n}}\n"
        );
        let status = self
            .namespace
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .expect("stdin")
                    .write_all(rules.as_bytes())?;
                child.wait()
            })
            .expect("nft");
        assert!(status.success(), "nft {rules}");
    }
}
