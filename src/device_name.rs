//! The device name rule (`identity.device_name`, docs/configuration.md): config validation
//! checks the configured name with it, fleet mode the name it registers under.

/// Longest device name: the user pool's username, and the e-mail's local part.
pub const MAX_DEVICE_NAME_LEN: usize = 64;

/// A name outside the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a device name: use 1-{MAX_DEVICE_NAME_LEN} characters of A-Z a-z 0-9 . _ -")]
pub struct InvalidDeviceName(pub String);

/// `[A-Za-z0-9._-]`, 1 to 64 characters.
pub fn validate_device_name(name: &str) -> Result<(), InvalidDeviceName> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    if name.is_empty() || name.len() > MAX_DEVICE_NAME_LEN || !name.bytes().all(allowed) {
        return Err(InvalidDeviceName(name.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rule() {
        for good in ["a", "rpi-7f3a9c01", "Gate_01.b-2", &"x".repeat(64), "..."] {
            assert!(validate_device_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            &"x".repeat(65),
            "dev ice",
            "dev/ice",
            "dév",
            "a@b",
            "a:b",
            "a\n",
        ] {
            assert!(validate_device_name(bad).is_err(), "{bad:?}");
        }
    }
}
