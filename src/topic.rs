//! Topic rules: what a local app may name, and how that becomes an IoT Core topic.
//!
//! IoT Core allows at most 256 bytes and 7 `/` in a topic; the daemon prefixes every relative
//! topic with `<identity_pool_id>/<identity_id>` (as the template's IoT policy requires), so the
//! relative part is checked against the room the prefix leaves.

/// IoT Core's topic length limit, in bytes of UTF-8.
pub const MAX_TOPIC_BYTES: usize = 256;
/// IoT Core's limit on `/` in a publish topic.
pub const MAX_TOPIC_SLASHES: usize = 7;
/// An identity id is `<region>:<uuid>`; before the first sign-in the daemon assumes this length.
const UUID_LEN: usize = 36;

/// Why a relative topic was refused; the text is shown to the local app.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Nothing to publish to.
    #[error("topic is empty")]
    Empty,
    /// Wildcards are for subscriptions, not publishes.
    #[error("topic must not contain wildcards (+ or #)")]
    Wildcard,
    /// NUL is not allowed in an MQTT topic.
    #[error("topic must not contain NUL")]
    Nul,
    /// The prefix and its `/` come first.
    #[error("topic must not start with '/'")]
    LeadingSlash,
    /// `$` topics are IoT Core's own.
    #[error("topic must not start with '$' (reserved topics)")]
    Reserved,
    /// The full topic's length in bytes.
    #[error("full topic would be {0} bytes; IoT Core allows {MAX_TOPIC_BYTES}")]
    TooLong(usize),
    /// The full topic's count of `/`.
    #[error("full topic would have {0} '/'; IoT Core allows {MAX_TOPIC_SLASHES}")]
    TooDeep(usize),
}

/// Expands `mqtt.topic_prefix` and checks relative topics against what it leaves.
#[derive(Debug, Clone)]
pub struct TopicRules {
    template: String,
    identity_pool_id: String,
    /// Length and `/` count of the prefix plus its separator, with the longest identity id.
    prefix_len: usize,
    prefix_slashes: usize,
}

impl TopicRules {
    /// `template` may contain `{identity_pool_id}` and `{identity_id}`.
    pub fn new(template: &str, identity_pool_id: &str, region: &str) -> TopicRules {
        let placeholder_identity = format!("{region}:{}", "0".repeat(UUID_LEN));
        let sample = expand(template, identity_pool_id, &placeholder_identity);
        let separator = usize::from(!sample.is_empty());
        TopicRules {
            template: template.to_owned(),
            identity_pool_id: identity_pool_id.to_owned(),
            prefix_len: sample.len() + separator,
            prefix_slashes: sample.matches('/').count() + separator,
        }
    }

    /// Checks a topic a local app sent, before anything is stored.
    pub fn validate(&self, relative: &str) -> Result<(), TopicError> {
        if relative.is_empty() {
            return Err(TopicError::Empty);
        }
        if relative.contains(['+', '#']) {
            return Err(TopicError::Wildcard);
        }
        if relative.contains('\0') {
            return Err(TopicError::Nul);
        }
        if relative.starts_with('/') {
            return Err(TopicError::LeadingSlash);
        }
        if relative.starts_with('$') {
            return Err(TopicError::Reserved);
        }
        let len = self.prefix_len + relative.len();
        if len > MAX_TOPIC_BYTES {
            return Err(TopicError::TooLong(len));
        }
        let slashes = self.prefix_slashes + relative.matches('/').count();
        if slashes > MAX_TOPIC_SLASHES {
            return Err(TopicError::TooDeep(slashes));
        }
        Ok(())
    }

    /// Checks a full topic against IoT Core's limits at publish time: the prefix is known only
    /// then (the identity id, or a `topic_prefix` changed since the message was spooled), and
    /// a topic IoT Core refuses would hold back the whole queue.
    pub fn check_full(full: &str) -> Result<(), TopicError> {
        if full.contains(['+', '#']) {
            return Err(TopicError::Wildcard);
        }
        if full.contains('\0') {
            return Err(TopicError::Nul);
        }
        if full.len() > MAX_TOPIC_BYTES {
            return Err(TopicError::TooLong(full.len()));
        }
        let slashes = full.matches('/').count();
        if slashes > MAX_TOPIC_SLASHES {
            return Err(TopicError::TooDeep(slashes));
        }
        Ok(())
    }

    /// What the prefix adds to a relative topic or filter, with the longest identity id:
    /// (bytes, `/`), separator included.
    pub fn prefix_cost(&self) -> (usize, usize) {
        (self.prefix_len, self.prefix_slashes)
    }

    /// The prefix with its separator (`<pool>/<identity>/`), empty when there is none.
    pub fn prefix(&self, identity_id: &str) -> String {
        let prefix = expand(&self.template, &self.identity_pool_id, identity_id);
        if prefix.is_empty() {
            prefix
        } else {
            format!("{prefix}/")
        }
    }

    /// The topic IoT Core sees for `relative`, once the identity id is known.
    pub fn full_topic(&self, identity_id: &str, relative: &str) -> String {
        let prefix = expand(&self.template, &self.identity_pool_id, identity_id);
        if prefix.is_empty() {
            relative.to_owned()
        } else {
            format!("{prefix}/{relative}")
        }
    }
}

fn expand(template: &str, identity_pool_id: &str, identity_id: &str) -> String {
    template
        .replace("{identity_pool_id}", identity_pool_id)
        .replace("{identity_id}", identity_id)
        .trim_end_matches('/')
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const POOL: &str = "us-east-1:0b7c5a57-6a4f-4a62-9d36-3f1c0e3b6a11";
    const IDENTITY: &str = "us-east-1:9f0e3a2b-1c4d-4e5f-8a9b-0c1d2e3f4a5b";

    fn rules() -> TopicRules {
        TopicRules::new("{identity_pool_id}/{identity_id}", POOL, "us-east-1")
    }

    #[test]
    fn prefixes_with_pool_and_identity() {
        assert_eq!(
            rules().full_topic(IDENTITY, "sensors/temp"),
            format!("{POOL}/{IDENTITY}/sensors/temp")
        );
    }

    #[test]
    fn rejects_what_spec_forbids() {
        let rules = rules();
        assert_eq!(rules.validate(""), Err(TopicError::Empty));
        assert_eq!(rules.validate("a/+/b"), Err(TopicError::Wildcard));
        assert_eq!(rules.validate("a/#"), Err(TopicError::Wildcard));
        assert_eq!(rules.validate("a\0b"), Err(TopicError::Nul));
        assert_eq!(rules.validate("/a"), Err(TopicError::LeadingSlash));
        assert_eq!(rules.validate("$aws/things"), Err(TopicError::Reserved));
        assert!(rules.validate("sensors/temp").is_ok());
    }

    #[test]
    fn counts_the_prefix_against_iot_limits() {
        let rules = rules();
        // The prefix holds 2 '/', so 5 more are allowed.
        assert!(rules.validate("a/b/c/d/e/f").is_ok());
        assert_eq!(rules.validate("a/b/c/d/e/f/g"), Err(TopicError::TooDeep(8)));
        let full_len = POOL.len() + 1 + IDENTITY.len() + 1;
        let room = MAX_TOPIC_BYTES - full_len;
        assert!(rules.validate(&"x".repeat(room)).is_ok());
        assert_eq!(
            rules.validate(&"x".repeat(room + 1)),
            Err(TopicError::TooLong(MAX_TOPIC_BYTES + 1))
        );
    }

    proptest::proptest! {
        #[test]
        fn accepted_topics_fit_iot_core_once_prefixed(relative in "\\PC{0,300}") {
            let rules = rules();
            if rules.validate(&relative).is_ok() {
                let full = rules.full_topic(IDENTITY, &relative);
                proptest::prop_assert!(full.len() <= MAX_TOPIC_BYTES);
                proptest::prop_assert!(full.matches('/').count() <= MAX_TOPIC_SLASHES);
                proptest::prop_assert!(!full.contains(['+', '#', '\0']));
                proptest::prop_assert!(!relative.starts_with(['/', '$']));
            }
        }

        #[test]
        fn wildcards_anywhere_are_refused(
            head in "[a-z/]{0,20}", wildcard in "[+#]", tail in "[a-z/]{0,20}"
        ) {
            let topic = format!("{head}{wildcard}{tail}");
            proptest::prop_assert!(rules().validate(&topic).is_err());
        }

        #[test]
        fn plain_topics_within_limits_are_accepted(levels in proptest::collection::vec("[a-z0-9_-]{1,20}", 1..=6)) {
            let topic = levels.join("/");
            proptest::prop_assert_eq!(rules().validate(&topic), Ok(()));
        }
    }

    #[test]
    fn full_topics_are_checked_against_iot_limits() {
        let full = rules().full_topic(IDENTITY, "a/b");
        assert_eq!(TopicRules::check_full(&full), Ok(()));
        let long = format!("{full}/{}", "x".repeat(MAX_TOPIC_BYTES));
        assert_eq!(
            TopicRules::check_full(&long),
            Err(TopicError::TooLong(long.len()))
        );
        assert_eq!(
            TopicRules::check_full(&format!("{full}/c/d/e/f/g")),
            Err(TopicError::TooDeep(8))
        );
        assert_eq!(TopicRules::check_full("p/+/x"), Err(TopicError::Wildcard));
    }

    #[test]
    fn empty_prefix_publishes_relative_topic_as_is() {
        let rules = TopicRules::new("", POOL, "us-east-1");
        assert_eq!(rules.full_topic(IDENTITY, "a/b"), "a/b");
        assert!(rules.validate(&"x".repeat(MAX_TOPIC_BYTES)).is_ok());
        assert!(rules.validate("a/b/c/d/e/f/g/h").is_ok());
    }
}
