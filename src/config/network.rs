//! `[network]`: the HTTP(S) proxy every outbound connection goes through (the AWS API calls and
//! the MQTT WebSocket, by HTTP CONNECT), and the hosts reached directly. Pure: the environment
//! is passed in.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// The config section as written. Its `Debug` masks proxy credentials.
#[derive(Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// `http(s)://[user:pass@]host:port`; empty: `HTTPS_PROXY` / `https_proxy`, else direct.
    pub proxy: String,
    /// Comma-separated hosts (a domain covers its subdomains), IPs and CIDRs reached directly;
    /// empty: `NO_PROXY` / `no_proxy`. Nothing else is exempt, localhost neither.
    pub no_proxy: String,
}

impl fmt::Debug for NetworkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetworkConfig")
            .field("proxy", &mask_credentials(&self.proxy))
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

/// `scheme://***@host…` for a URL with user info; the URL as it is otherwise.
pub fn mask_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// Why a proxy setting cannot be used. Never holds the credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name} {shown:?}: {reason}")]
pub struct ProxyError {
    /// `network.proxy`, `HTTPS_PROXY`, ...
    pub source_name: &'static str,
    /// The value with its credentials masked.
    pub shown: String,
    pub reason: &'static str,
}

/// The proxy in effect, parsed.
#[derive(Clone, PartialEq)]
pub struct Proxy {
    /// TLS to the proxy itself (`https://`).
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Basic credentials, sent with the first request.
    pub credentials: Option<(String, Secret<String>)>,
    bypass: Vec<Bypass>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}{}:{}",
            if self.tls { "https" } else { "http" },
            if self.credentials.is_some() {
                "***@"
            } else {
                ""
            },
            self.host,
            self.port
        )
    }
}

/// One `no_proxy` entry.
#[derive(Debug, Clone, PartialEq)]
enum Bypass {
    All,
    /// Matches the domain and its subdomains.
    Domain(String),
    Ip(IpAddr),
    Net(IpAddr, u8),
}

impl Proxy {
    /// The proxy from `config`, else from the environment (`HTTPS_PROXY`, `https_proxy`;
    /// `NO_PROXY`, `no_proxy`); `None`: direct.
    pub fn resolve(
        config: &NetworkConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Proxy>, ProxyError> {
        let from_env = |names: [&'static str; 2]| {
            names
                .into_iter()
                .find_map(|name| env(name).filter(|v| !v.is_empty()).map(|v| (name, v)))
        };
        let (source_name, url) = if config.proxy.is_empty() {
            match from_env(["HTTPS_PROXY", "https_proxy"]) {
                Some(found) => found,
                None => return Ok(None),
            }
        } else {
            ("network.proxy", config.proxy.clone())
        };
        let no_proxy = if config.no_proxy.is_empty() {
            from_env(["NO_PROXY", "no_proxy"]).map_or_else(String::new, |(_, v)| v)
        } else {
            config.no_proxy.clone()
        };
        let mut proxy = parse(&url).map_err(|reason| ProxyError {
            source_name,
            shown: mask_credentials(&url),
            reason,
        })?;
        proxy.bypass = parse_no_proxy(&no_proxy);
        Ok(Some(proxy))
    }

    /// Whether `host` (a name or an IP literal, without port or brackets) is reached directly.
    pub fn bypasses(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let ip = host.parse::<IpAddr>().ok();
        self.bypass.iter().any(|entry| match entry {
            Bypass::All => true,
            Bypass::Domain(domain) => {
                ip.is_none()
                    && (host == *domain
                        || host
                            .strip_suffix(domain.as_str())
                            .is_some_and(|rest| rest.ends_with('.')))
            }
            Bypass::Ip(entry) => ip == Some(*entry),
            Bypass::Net(net, bits) => ip.is_some_and(|ip| in_network(ip, *net, *bits)),
        })
    }

    /// The proxy as the AWS SDK takes it: credentials percent-encoded in the URL.
    pub fn sdk_url(&self) -> Secret<String> {
        use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
        let auth = self
            .credentials
            .as_ref()
            .map_or_else(String::new, |(user, password)| {
                format!(
                    "{}:{}@",
                    utf8_percent_encode(user, NON_ALPHANUMERIC),
                    utf8_percent_encode(password.expose(), NON_ALPHANUMERIC)
                )
            });
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        Secret::new(format!(
            "{}://{auth}{host}:{}",
            if self.tls { "https" } else { "http" },
            self.port
        ))
    }

    /// The `no_proxy` entries as the AWS SDK's matcher takes them (same meaning as
    /// [`Proxy::bypasses`]).
    pub fn sdk_no_proxy(&self) -> String {
        self.bypass
            .iter()
            .map(|entry| match entry {
                Bypass::All => "*".to_owned(),
                Bypass::Domain(domain) => domain.clone(),
                Bypass::Ip(ip) => ip.to_string(),
                Bypass::Net(net, bits) => format!("{net}/{bits}"),
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn parse(url: &str) -> Result<Proxy, &'static str> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or("not a URL: use http://host:port or https://host:port")?;
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "http" => false,
        "https" => true,
        _ => return Err("the scheme must be http or https"),
    };
    let authority = rest.trim_end_matches('/');
    if authority.contains(['/', '?', '#']) {
        return Err("a proxy URL has no path or query");
    }
    let (user_info, host_port) = match authority.rsplit_once('@') {
        Some((user_info, host_port)) => (Some(user_info), host_port),
        None => (None, authority),
    };
    let credentials = match user_info {
        Some(info) => {
            let (user, password) = info.split_once(':').unwrap_or((info, ""));
            let decode = |part: &str| {
                percent_encoding::percent_decode_str(part)
                    .decode_utf8()
                    .map(|text| text.into_owned())
                    .map_err(|_| "the credentials are not valid UTF-8 once percent-decoded")
            };
            Some((decode(user)?, Secret::new(decode(password)?)))
        }
        None => None,
    };
    let (host, port) = match host_port.strip_prefix('[') {
        Some(bracketed) => {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or("an unclosed [ in the host")?;
            (host, after.strip_prefix(':'))
        }
        None => match host_port.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        },
    };
    if host.is_empty() {
        return Err("no host");
    }
    let port = match port {
        Some(port) => port
            .parse()
            .map_err(|_| "the port is not a number from 1 to 65535")?,
        None if tls => 443,
        None => 80,
    };
    if port == 0 {
        return Err("the port is not a number from 1 to 65535");
    }
    Ok(Proxy {
        tls,
        host: host.to_ascii_lowercase(),
        port,
        credentials,
        bypass: Vec::new(),
    })
}

fn parse_no_proxy(list: &str) -> Vec<Bypass> {
    list.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            if entry == "*" {
                return Bypass::All;
            }
            if let Some((net, bits)) = entry.split_once('/')
                && let (Ok(net), Ok(bits)) = (net.parse::<IpAddr>(), bits.parse::<u8>())
            {
                return Bypass::Net(net, bits);
            }
            let bare = entry.trim_start_matches('[').trim_end_matches(']');
            match bare.parse::<IpAddr>() {
                Ok(ip) => Bypass::Ip(ip),
                Err(_) => Bypass::Domain(
                    entry
                        .trim_start_matches("*.")
                        .trim_start_matches('.')
                        .trim_end_matches('.')
                        .to_ascii_lowercase(),
                ),
            }
        })
        .collect()
}

fn in_network(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) if bits <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) if bits <= 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(
        proxy: &str,
        no_proxy: &str,
        env: &[(&str, &str)],
    ) -> Result<Option<Proxy>, ProxyError> {
        let config = NetworkConfig {
            proxy: proxy.into(),
            no_proxy: no_proxy.into(),
        };
        Proxy::resolve(&config, |name| {
            env.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn the_config_wins_over_the_environment_and_empty_means_direct() {
        assert_eq!(resolve("", "", &[]), Ok(None));
        let from_env = resolve("", "", &[("https_proxy", "http://envproxy:3128")])
            .expect("valid")
            .expect("a proxy");
        assert_eq!((from_env.host.as_str(), from_env.port), ("envproxy", 3128));
        let upper_first = resolve(
            "",
            "",
            &[
                ("HTTPS_PROXY", "http://upper:1"),
                ("https_proxy", "http://lower:2"),
            ],
        )
        .expect("valid")
        .expect("a proxy");
        assert_eq!(upper_first.host, "upper");
        let configured = resolve("https://cfg:8443", "", &[("HTTPS_PROXY", "http://env:1")])
            .expect("valid")
            .expect("a proxy");
        assert_eq!(
            (configured.tls, configured.host.as_str(), configured.port),
            (true, "cfg", 8443)
        );
    }

    #[test]
    fn urls_are_parsed_and_bad_ones_named_without_their_password() {
        for (url, tls, host, port) in [
            ("http://proxy.local:3128", false, "proxy.local", 3128),
            ("http://proxy.local", false, "proxy.local", 80),
            ("https://proxy.local/", true, "proxy.local", 443),
            ("http://[fd00::1]:8080", false, "fd00::1", 8080),
        ] {
            let proxy = parse(url).expect(url);
            assert_eq!(
                (proxy.tls, proxy.host.as_str(), proxy.port),
                (tls, host, port),
                "{url}"
            );
        }
        let with_auth = parse("http://us%40er:p%3Ass@h:1").expect("valid");
        let (user, password) = with_auth.credentials.clone().expect("credentials");
        assert_eq!(
            (user.as_str(), password.expose().as_str()),
            ("us@er", "p:ss")
        );
        assert_eq!(with_auth.sdk_url().expose(), "http://us%40er:p%3Ass@h:1");
        assert_eq!(format!("{with_auth:?}"), "http://***@h:1");

        for bad in [
            "proxy:3128",
            "socks5://h:1",
            "http://h:99999",
            "http://:80",
            "http://h:1/path",
        ] {
            let error = resolve(bad, "", &[]).expect_err(bad);
            assert_eq!(error.source_name, "network.proxy");
        }
        let error = resolve("socks5://user:hunter2@h:1", "", &[]).expect_err("bad scheme");
        assert!(!error.to_string().contains("hunter2"), "{error}");
        let error = resolve("", "", &[("HTTPS_PROXY", "ftp://h")]).expect_err("bad env");
        assert!(error.to_string().starts_with("HTTPS_PROXY"), "{error}");
        let config = NetworkConfig {
            proxy: "http://u:hunter2@h:1".into(),
            no_proxy: String::new(),
        };
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn no_proxy_exempts_what_it_names_and_nothing_else() {
        let proxy = resolve(
            "http://p:1",
            " .internal, example.com ,10.0.0.0/8, 192.168.1.7, [fd00::9], *.corp",
            &[],
        )
        .expect("valid")
        .expect("a proxy");
        for (host, direct) in [
            ("example.com", true),
            ("iot.example.com", true),
            ("notexample.com", false),
            ("a.internal", true),
            ("internal", true),
            ("x.corp", true),
            ("10.1.2.3", true),
            ("11.1.2.3", false),
            ("192.168.1.7", true),
            ("192.168.1.8", false),
            ("fd00::9", true),
            ("localhost", false),
            ("127.0.0.1", false),
            ("cognito-identity.us-east-1.amazonaws.com", false),
        ] {
            assert_eq!(proxy.bypasses(host), direct, "{host}");
        }
        assert_eq!(
            proxy.sdk_no_proxy(),
            "internal,example.com,10.0.0.0/8,192.168.1.7,fd00::9,corp"
        );
        let all = resolve("http://p:1", "*", &[])
            .expect("valid")
            .expect("a proxy");
        assert!(all.bypasses("anything"));
        let from_env = resolve("http://p:1", "", &[("NO_PROXY", "example.com")])
            .expect("valid")
            .expect("a proxy");
        assert!(from_env.bypasses("example.com"));
    }
}
