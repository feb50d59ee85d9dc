//! Fleet mode (self-registration, docs/operations.md "Fleets"): the device's own user pool user.
//! Its name (`identity.device_name`, or one derived from `/etc/machine-id`) and the password it
//! generated on first start live in `<state dir>/device.json` (mode 0600), written and fsynced
//! before `SignUp`, so a crash can never leave a registered user whose password is lost.

use std::path::Path;

use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::device_name::{InvalidDeviceName, validate_device_name};
use crate::secret::Secret;
use crate::state_file::write_private;

/// File name inside the state dir.
pub const DEVICE_FILE: &str = "device.json";
/// Where the default device name comes from.
pub const MACHINE_ID: &str = "/etc/machine-id";
/// Hex digits of the hash in a derived name: 96 bits, no collision in any real fleet.
const DERIVED_HEX_DIGITS: usize = 24;
/// Prefix of derived names, so an operator sees at once that no one chose them.
const DERIVED_PREFIX: &str = "dev-";
/// Keeps the hash of this program's device names apart from any other use of the machine id.
const DERIVATION_CONTEXT: &[u8] = b"iot-cognito-relay device name v1";
/// Generated password length; the template's pool requires 16 with all four classes.
const PASSWORD_LEN: usize = 40;
const SYMBOLS: &[u8] = b"!#%&*+-.:=?^_~";

/// Why a device name or the device file cannot be used. Never carries the password.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("identity.device_name {0}")]
    InvalidName(#[from] InvalidDeviceName),
    #[error(
        "identity.device_name is empty and {MACHINE_ID} cannot be read ({0}); set identity.device_name"
    )]
    NoMachineId(String),
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
}

/// `dev-` and 24 hex digits of SHA-256 over the machine id and the identity pool id: stable
/// for this machine and stack, different across stacks, and the machine id cannot be read back.
pub fn derive_name(machine_id: &str, identity_pool_id: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(DERIVATION_CONTEXT);
    hash.update([0]);
    hash.update(machine_id.trim().as_bytes());
    hash.update([0]);
    hash.update(identity_pool_id.as_bytes());
    let hex: String = hash
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!("{DERIVED_PREFIX}{}", &hex[..DERIVED_HEX_DIGITS])
}

/// The configured name, or the derived one when the config leaves it empty.
pub fn device_name(configured: &str, identity_pool_id: &str) -> Result<String, DeviceError> {
    if !configured.is_empty() {
        validate_device_name(configured)?;
        return Ok(configured.to_owned());
    }
    let machine_id = std::fs::read_to_string(MACHINE_ID)
        .map_err(|error| DeviceError::NoMachineId(error.to_string()))?;
    if machine_id.trim().is_empty() {
        return Err(DeviceError::NoMachineId("it is empty".into()));
    }
    Ok(derive_name(&machine_id, identity_pool_id))
}

/// A strong random password that meets the template's password policy.
pub fn generate_password() -> Secret<String> {
    let alphabet: Vec<u8> = (b'a'..=b'z')
        .chain(b'A'..=b'Z')
        .chain(b'0'..=b'9')
        .chain(SYMBOLS.iter().copied())
        .collect();
    let mut rng = rand::rng();
    loop {
        let password: String = (0..PASSWORD_LEN)
            .map(|_| char::from(alphabet[rng.random_range(0..alphabet.len())]))
            .collect();
        let has = |test: fn(&u8) -> bool| password.as_bytes().iter().any(test);
        if has(u8::is_ascii_lowercase)
            && has(u8::is_ascii_uppercase)
            && has(u8::is_ascii_digit)
            && has(|b| SYMBOLS.contains(b))
        {
            return Secret::new(password);
        }
    }
}

/// What `device.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceFile {
    pub username: String,
    #[serde(with = "secret_string")]
    pub password: Secret<String>,
    /// `SignUp` succeeded (or the user was found to sign in): never call it again.
    #[serde(default)]
    pub registered: bool,
}

impl DeviceFile {
    /// `None` when the file does not exist (a first start, or a re-flashed device).
    pub fn load(state_dir: &Path) -> Result<Option<DeviceFile>, DeviceError> {
        let path = state_dir.join(DEVICE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(file_error(&path, error.to_string())),
        };
        // serde's message could quote part of the password: only the shape is reported.
        let file: DeviceFile = serde_json::from_str(&text).map_err(|_| {
            file_error(
                &path,
                "not a JSON object {\"username\", \"password\", \"registered\"}".into(),
            )
        })?;
        validate_device_name(&file.username)
            .map_err(|e| file_error(&path, DeviceError::from(e).to_string()))?;
        Ok(Some(file))
    }

    /// Writes atomically and durably: temp file (0600) + fsync, rename, fsync of the dir.
    pub fn save(&self, state_dir: &Path) -> Result<(), DeviceError> {
        let path = state_dir.join(DEVICE_FILE);
        let fail = |error: std::io::Error| file_error(&path, error.to_string());
        let text =
            serde_json::to_string_pretty(self).map_err(|e| file_error(&path, e.to_string()))?;
        write_private(&path, text.as_bytes()).map_err(fail)?;
        std::fs::File::open(state_dir)
            .and_then(|dir| dir.sync_all())
            .map_err(fail)
    }
}

fn file_error(path: &Path, reason: String) -> DeviceError {
    DeviceError::File {
        path: path.display().to_string(),
        reason,
    }
}

/// `Secret<String>` as a plain JSON string in the file (and nowhere else).
mod secret_string {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::secret::Secret;

    pub fn serialize<S: Serializer>(value: &Secret<String>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(value.expose())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Secret<String>, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn derived_names_are_stable_valid_and_hide_the_machine_id() {
        let id = "3d1219c7c4c5404aaa1f6d2a48adfda4";
        let pool = "us-east-1:0b7c5a57-6a4f-4a62-9d36-3f1c0e3b6a11";
        let name = derive_name(id, pool);
        assert_eq!(name, derive_name(&format!("{id}\n"), pool));
        assert!(validate_device_name(&name).is_ok());
        assert_eq!(name.len(), DERIVED_PREFIX.len() + DERIVED_HEX_DIGITS);
        assert!(!name.contains(&id[..8]));
        assert_ne!(name, derive_name(id, "us-east-1:another-pool"));
        assert_ne!(name, derive_name("4d1219c7c4c5404aaa1f6d2a48adfda4", pool));
        // Pinned (checked with Python's hashlib): a change of the derivation would
        // re-register every device of a fleet under a new name.
        assert_eq!(name, "dev-a460dc18e31862ade1d0bf22");
    }

    #[test]
    fn a_configured_name_wins_and_is_checked() {
        assert_eq!(device_name("gate-7", "p").expect("valid"), "gate-7");
        assert!(matches!(
            device_name("gate 7", "p"),
            Err(DeviceError::InvalidName(_))
        ));
    }

    #[test]
    fn passwords_meet_the_pool_policy_and_differ() {
        let a = generate_password();
        let b = generate_password();
        assert_ne!(a.expose(), b.expose());
        let p = a.expose().as_bytes();
        assert_eq!(p.len(), PASSWORD_LEN);
        assert!(p.iter().any(u8::is_ascii_lowercase) && p.iter().any(u8::is_ascii_uppercase));
        assert!(p.iter().any(u8::is_ascii_digit) && p.iter().any(|b| SYMBOLS.contains(b)));
    }

    #[test]
    fn the_file_round_trips_with_mode_0600_and_never_prints_the_password() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(DeviceFile::load(dir.path()).expect("load").is_none());
        let file = DeviceFile {
            username: "gate-7".into(),
            password: Secret::new("Pw-1234567890abcdefXYZ!".into()),
            registered: false,
        };
        file.save(dir.path()).expect("save");
        let path = dir.path().join(DEVICE_FILE);
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let loaded = DeviceFile::load(dir.path()).expect("load").expect("some");
        assert_eq!(loaded.username, "gate-7");
        assert_eq!(loaded.password.expose(), "Pw-1234567890abcdefXYZ!");
        assert!(!format!("{loaded:?}").contains("Pw-1234"));
        std::fs::write(&path, r#"{"username":"gate-7","password":"Pw-1234"#).expect("write");
        let error = DeviceFile::load(dir.path()).expect_err("broken");
        assert!(!error.to_string().contains("Pw-1234"));
    }
}
