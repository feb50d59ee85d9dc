//! The identity cache: the device's Cognito identity ids, kept in the state dir so that the
//! client id and topics survive restarts (and so that a fleet does not mint a new identity at
//! every boot). Nothing secret is written here.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::state_file::write_private;

/// File name inside the state dir.
pub const CACHE_FILE: &str = "identity.json";

/// What is remembered across restarts, per identity pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityCache {
    pub identity_pool_id: String,
    /// The unauthenticated identity used to read the bootstrap secret.
    #[serde(default)]
    pub unauth_identity_id: Option<String>,
    /// The authenticated identity: MQTT client id and topic prefix.
    #[serde(default)]
    pub identity_id: Option<String>,
    /// The IoT policy attached to `identity_id` (the secret's `IoTPolicy` then); another name
    /// in the secret means attaching again.
    #[serde(default)]
    pub attached_policy: Option<String>,
}

impl IdentityCache {
    /// Loads the cache for `identity_pool_id`; a missing, unreadable or foreign cache is empty.
    pub fn load(state_dir: &Path, identity_pool_id: &str) -> IdentityCache {
        let path = state_dir.join(CACHE_FILE);
        let fresh = IdentityCache {
            identity_pool_id: identity_pool_id.to_owned(),
            ..IdentityCache::default()
        };
        let Ok(text) = std::fs::read_to_string(&path) else {
            return fresh;
        };
        match serde_json::from_str::<IdentityCache>(&text) {
            Ok(cache) if cache.identity_pool_id == identity_pool_id => cache,
            Ok(_) => {
                tracing::warn!(path = %path.display(), "identity cache is for another identity pool; ignoring it");
                fresh
            }
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "identity cache is unreadable; ignoring it");
                fresh
            }
        }
    }

    /// Writes atomically (temp file + rename), mode 0600.
    pub fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        write_private(&state_dir.join(CACHE_FILE), text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_ignores_other_pools() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = IdentityCache {
            identity_pool_id: "us-east-1:pool".into(),
            unauth_identity_id: Some("us-east-1:u".into()),
            identity_id: Some("us-east-1:a".into()),
            attached_policy: Some("relay-iot-policy".into()),
        };
        cache.save(dir.path()).expect("save");
        assert_eq!(IdentityCache::load(dir.path(), "us-east-1:pool"), cache);
        assert_eq!(
            IdentityCache::load(dir.path(), "us-east-1:other").identity_id,
            None
        );
    }
}
