//! Topic suffixes applications may publish to.
//!
//! An application names only the suffix (`telemetry/temp`, `events/door`); the agent puts
//! `devices/<id>/` in front, so an application can never reach another device's topics or
//! the command topics.

/// Longest topic suffix accepted, in bytes.
pub const MAX_SUFFIX_LEN: usize = 128;

/// Why a topic suffix was refused. The message names the rule, never the payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// The suffix does not start with `telemetry/` or `events/`.
    #[error("topic must start with telemetry/ or events/ followed by a name, e.g. telemetry/temp")]
    Prefix,
    /// Longer than [`MAX_SUFFIX_LEN`].
    #[error("topic longer than {MAX_SUFFIX_LEN} bytes")]
    TooLong,
    /// A wildcard, NUL or control character.
    #[error("topic must not contain '+', '#', NUL or control characters")]
    Forbidden,
    /// `..`, an empty level or a trailing `/`.
    #[error("topic must not contain '..', empty levels ('//') or end with '/'")]
    Levels,
}

/// Check an application's topic suffix: `telemetry/<name>` or `events/<name>`, at most
/// [`MAX_SUFFIX_LEN`] bytes, no `+`, `#`, NUL or control characters, no `..`, no empty level.
pub fn validate_suffix(suffix: &str) -> Result<(), TopicError> {
    if suffix.len() > MAX_SUFFIX_LEN {
        return Err(TopicError::TooLong);
    }
    let rest = suffix
        .strip_prefix("telemetry/")
        .or_else(|| suffix.strip_prefix("events/"))
        .ok_or(TopicError::Prefix)?;
    if rest.is_empty() {
        return Err(TopicError::Prefix);
    }
    if suffix
        .chars()
        .any(|c| c == '+' || c == '#' || c == '\0' || c.is_control())
    {
        return Err(TopicError::Forbidden);
    }
    if suffix.contains("..") || suffix.contains("//") || suffix.ends_with('/') {
        return Err(TopicError::Levels);
    }
    Ok(())
}

/// The full MQTT topic for `suffix` of device `device_id`.
pub fn full_topic(device_id: &str, suffix: &str) -> String {
    format!("devices/{device_id}/{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_rules() {
        for ok in [
            "telemetry/temp",
            "events/door/open",
            "telemetry/a.b",
            "events/x-1_2",
        ] {
            assert_eq!(validate_suffix(ok), Ok(()), "{ok}");
            assert!(devid_mqtt::topic::may_publish(
                "dev-1",
                &full_topic("dev-1", ok)
            ));
        }
        let cases: &[(&str, TopicError)] = &[
            ("commands/x", TopicError::Prefix),
            ("telemetry", TopicError::Prefix),
            ("telemetry/", TopicError::Prefix),
            ("/telemetry/x", TopicError::Prefix),
            ("telemetry/+", TopicError::Forbidden),
            ("events/#", TopicError::Forbidden),
            ("events/a\0b", TopicError::Forbidden),
            ("events/a\nb", TopicError::Forbidden),
            ("telemetry/../commands/x", TopicError::Levels),
            ("telemetry/a..b", TopicError::Levels),
            ("telemetry/a//b", TopicError::Levels),
            ("telemetry/a/", TopicError::Levels),
        ];
        for (bad, why) in cases {
            assert_eq!(validate_suffix(bad).as_ref(), Err(why), "{bad:?}");
        }
        let long = format!("telemetry/{}", "a".repeat(MAX_SUFFIX_LEN));
        assert_eq!(validate_suffix(&long), Err(TopicError::TooLong));
    }
}
