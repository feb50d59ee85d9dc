//! MQTT topic filters relative to the device prefix: what a local app or `[downlink] topics`
//! may name, and which topics a filter matches (MQTT 3.1.1, section 4.7).

use crate::topic::{MAX_TOPIC_BYTES, MAX_TOPIC_SLASHES, TopicRules};

/// Why a filter was refused; the text is shown to the local app or the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("topic filter is empty")]
    Empty,
    #[error("topic filter must not contain NUL")]
    Nul,
    #[error("topic filter must not start with '/'")]
    LeadingSlash,
    #[error("topic filter must not start with '$' (reserved topics)")]
    Reserved,
    #[error("'#' must be the whole last level of a topic filter")]
    MisplacedHash,
    #[error("'+' must be a whole level of a topic filter")]
    MisplacedPlus,
    #[error("full topic filter would be {0} bytes; IoT Core allows {MAX_TOPIC_BYTES}")]
    TooLong(usize),
    #[error("full topic filter would have {0} '/'; IoT Core allows {MAX_TOPIC_SLASHES}")]
    TooDeep(usize),
}

/// Checks a relative filter, and the full one (prefix added) against IoT Core's limits.
pub fn validate(rules: &TopicRules, relative: &str) -> Result<(), FilterError> {
    if relative.is_empty() {
        return Err(FilterError::Empty);
    }
    if relative.contains('\0') {
        return Err(FilterError::Nul);
    }
    if relative.starts_with('/') {
        return Err(FilterError::LeadingSlash);
    }
    if relative.starts_with('$') {
        return Err(FilterError::Reserved);
    }
    let levels: Vec<&str> = relative.split('/').collect();
    for (index, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || index + 1 != levels.len()) {
            return Err(FilterError::MisplacedHash);
        }
        if level.contains('+') && *level != "+" {
            return Err(FilterError::MisplacedPlus);
        }
    }
    let (prefix_len, prefix_slashes) = rules.prefix_cost();
    let len = prefix_len + relative.len();
    if len > MAX_TOPIC_BYTES {
        return Err(FilterError::TooLong(len));
    }
    let slashes = prefix_slashes + levels.len() - 1;
    if slashes > MAX_TOPIC_SLASHES {
        return Err(FilterError::TooDeep(slashes));
    }
    Ok(())
}

/// Whether `topic` (no wildcards) matches `filter` (valid, see [`validate`]).
pub fn matches(filter: &str, topic: &str) -> bool {
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        match level {
            // The parent level too: `a/#` matches `a`.
            "#" => return true,
            "+" => {
                if topic_levels.next().is_none() {
                    return false;
                }
            }
            exact => {
                if topic_levels.next() != Some(exact) {
                    return false;
                }
            }
        }
    }
    topic_levels.next().is_none()
}

/// Whether any of `filters` matches `topic`.
pub fn any_matches(filters: &[String], topic: &str) -> bool {
    filters.iter().any(|filter| matches(filter, topic))
}

#[cfg(test)]
mod tests {
    use super::*;

    const POOL: &str = "us-east-1:0b7c5a57-6a4f-4a62-9d36-3f1c0e3b6a11";

    fn rules() -> TopicRules {
        TopicRules::new("{identity_pool_id}/{identity_id}", POOL, "us-east-1")
    }

    #[test]
    fn wildcards_match_like_mqtt() {
        assert!(matches("commands/#", "commands/reboot"));
        assert!(matches("commands/#", "commands"));
        assert!(matches("commands/#", "commands/a/b"));
        assert!(!matches("commands/#", "command"));
        assert!(!matches("commands/#", "config/x"));
        assert!(matches("#", "anything/at/all"));
        assert!(matches("+/reboot", "commands/reboot"));
        assert!(!matches("+/reboot", "commands/x/reboot"));
        assert!(matches("a/+/c", "a//c"), "+ matches an empty level");
        assert!(!matches("a/+", "a"));
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("a/b/c", "a/b"));
    }

    #[test]
    fn misplaced_wildcards_and_reserved_names_are_refused() {
        let rules = rules();
        assert_eq!(validate(&rules, "commands/#"), Ok(()));
        assert_eq!(validate(&rules, "+/x/+"), Ok(()));
        assert_eq!(validate(&rules, ""), Err(FilterError::Empty));
        assert_eq!(validate(&rules, "a/#/b"), Err(FilterError::MisplacedHash));
        assert_eq!(validate(&rules, "a#"), Err(FilterError::MisplacedHash));
        assert_eq!(validate(&rules, "a+/b"), Err(FilterError::MisplacedPlus));
        assert_eq!(validate(&rules, "/a"), Err(FilterError::LeadingSlash));
        assert_eq!(validate(&rules, "$aws/things"), Err(FilterError::Reserved));
        assert_eq!(validate(&rules, "a\0"), Err(FilterError::Nul));
    }

    #[test]
    fn the_full_filter_keeps_to_iot_core_limits() {
        let rules = rules();
        // The prefix takes 2 of the 7 slashes.
        assert_eq!(validate(&rules, "a/b/c/d/e/f"), Ok(()));
        assert_eq!(
            validate(&rules, "a/b/c/d/e/f/g"),
            Err(FilterError::TooDeep(8))
        );
        let long = "x".repeat(200);
        assert!(matches!(
            validate(&rules, &long),
            Err(FilterError::TooLong(_))
        ));
    }

    /// A property: a filter without wildcards matches exactly the same topic.
    #[test]
    fn a_plain_filter_matches_only_itself() {
        use proptest::prelude::*;
        proptest!(|(a in "[a-z/]{1,12}", b in "[a-z/]{1,12}")| {
            prop_assert_eq!(matches(&a, &b), a == b);
        });
    }
}
