//! What the systemd unit's sandbox lets the daemon write: `ProtectSystem=strict` makes every
//! path read-only but its state and runtime directories and `ReadWritePaths=`, and
//! `PrivateTmp=yes` gives it a `/tmp` no app sees. A config naming a path outside passes every
//! other check and then fails in the unit ("Read-only file system"), so `check-config` says so.

use std::path::{Path, PathBuf};

use crate::config::Config;

/// The unit's sandbox as `systemctl show` reports it (drop-ins included).
#[derive(Debug, Default, PartialEq)]
pub struct UnitSandbox {
    pub writable: Vec<PathBuf>,
    pub private_tmp: bool,
}

impl UnitSandbox {
    /// From `systemctl show -p StateDirectory -p RuntimeDirectory -p ReadWritePaths -p
    /// PrivateTmp -p ProtectSystem` output; `None` when the unit does not confine writes.
    pub fn from_show(text: &str) -> Option<UnitSandbox> {
        let mut sandbox = UnitSandbox::default();
        let mut strict = false;
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let words = value.split_whitespace();
            match key {
                "StateDirectory" => sandbox
                    .writable
                    .extend(words.map(|dir| Path::new("/var/lib").join(dir))),
                "RuntimeDirectory" => sandbox
                    .writable
                    .extend(words.map(|dir| Path::new("/run").join(dir))),
                // `-` (ignore if missing) and `+` (outside the root image) prefixes.
                "ReadWritePaths" => sandbox
                    .writable
                    .extend(words.map(|path| PathBuf::from(path.trim_start_matches(['-', '+'])))),
                "PrivateTmp" => sandbox.private_tmp = value == "yes",
                "ProtectSystem" => strict = value == "strict",
                _ => {}
            }
        }
        strict.then_some(sandbox)
    }

    /// One line per path the daemon must write that the unit does not let it, with the fix.
    pub fn findings(&self, config: &Config) -> Vec<String> {
        let mut places = vec![("state.dir", config.state.dir.clone())];
        let mut sockets = vec![("socket.path", config.socket.path.clone())];
        sockets.extend(
            config
                .socket
                .raw
                .iter()
                .map(|raw| ("socket.raw path", raw.path.clone())),
        );
        // A socket file is created in its directory.
        places.extend(
            sockets
                .iter()
                .filter_map(|(key, path)| path.parent().map(|dir| (*key, dir.to_owned()))),
        );
        let mut findings = Vec::new();
        for (key, path) in places {
            if self.private_tmp && (path.starts_with("/tmp") || path.starts_with("/var/tmp")) {
                findings.push(format!(
                    "{key} {} is in the unit's private /tmp (PrivateTmp=yes): apps outside the unit never see it; use a directory under /run/iot-cognito-relay or /var/lib/iot-cognito-relay",
                    path.display()
                ));
            } else if !self.writable.iter().any(|dir| path.starts_with(dir)) {
                findings.push(format!(
                    "{key} {} is read-only for the unit (ProtectSystem=strict): add `ReadWritePaths={}` in a drop-in (systemctl edit iot-cognito-relay)",
                    path.display(),
                    path.display()
                ));
            }
        }
        findings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOWN: &str = "StateDirectory=iot-cognito-relay\nRuntimeDirectory=iot-cognito-relay\n\
                         ReadWritePaths=-/data/relay\nPrivateTmp=yes\nProtectSystem=strict\n";

    fn config(state: &str, socket: &str, raw: Option<&str>) -> Config {
        let mut text = format!(
            "[identity]\nidentity_pool_id = \"us-east-1:0b7c5a57-6a4f-4a62-9d36-3f1c0e3b6a11\"\nsecret_id = \"s\"\n\
             [state]\ndir = {state:?}\n[socket]\npath = {socket:?}\n"
        );
        if let Some(raw) = raw {
            text.push_str(&format!(
                "[[socket.raw]]\npath = {raw:?}\ntopic = \"raw\"\n"
            ));
        }
        toml::from_str(&text).expect("config")
    }

    #[test]
    fn paths_outside_the_units_writable_set_are_named_with_the_fix() {
        let sandbox = UnitSandbox::from_show(SHOWN).expect("confined");
        let shipped = config(
            "/var/lib/iot-cognito-relay",
            "/run/iot-cognito-relay/relay.sock",
            None,
        );
        assert!(sandbox.findings(&shipped).is_empty());
        let granted = config(
            "/data/relay/state",
            "/run/iot-cognito-relay/relay.sock",
            None,
        );
        assert!(
            sandbox.findings(&granted).is_empty(),
            "ReadWritePaths= counts"
        );

        let outside = config(
            "/data/spool",
            "/tmp/relay.sock",
            Some("/run/sensors/raw.sock"),
        );
        let findings = sandbox.findings(&outside);
        assert_eq!(findings.len(), 3, "{findings:#?}");
        assert!(
            findings[0].contains("state.dir /data/spool")
                && findings[0].contains("ReadWritePaths=/data/spool")
        );
        assert!(findings[1].contains("private /tmp"));
        assert!(findings[2].contains("ReadWritePaths=/run/sensors"));
    }

    #[test]
    fn a_unit_that_does_not_confine_writes_has_nothing_to_say() {
        assert_eq!(
            UnitSandbox::from_show("ProtectSystem=no\nPrivateTmp=no\n"),
            None
        );
        assert_eq!(UnitSandbox::from_show(""), None);
    }
}
