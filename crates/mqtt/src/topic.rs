//! Topic names, topic filters and the devid per-device namespace.
//!
//! A device `<id>` may publish to `devices/<id>/telemetry[/...]` and
//! `devices/<id>/events[/...]`, and (when its policy allows) subscribe to filters inside
//! `devices/<id>/commands[/...]`. Nothing else. The id segment must be a literal, valid device
//! id: one containing `/`, `+`, `#` or NUL can never match, so no wildcard or extra level can
//! reach another device's topics.

/// Longest topic name or filter accepted, in bytes.
pub const MAX_TOPIC_LEN: usize = 256;

/// Longest device id, in bytes (as `devid-proto`).
pub const MAX_DEVICE_ID_LEN: usize = 64;

/// The first level of every devid topic.
pub const ROOT: &str = "devices";

/// The kind of a device topic (its third level).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `devices/<id>/telemetry/...`: the device publishes.
    Telemetry,
    /// `devices/<id>/events/...`: the device publishes.
    Events,
    /// `devices/<id>/commands/...`: the device subscribes.
    Commands,
}

impl Kind {
    /// The level as it appears in topics.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Telemetry => "telemetry",
            Kind::Events => "events",
            Kind::Commands => "commands",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "telemetry" => Some(Kind::Telemetry),
            "events" => Some(Kind::Events),
            "commands" => Some(Kind::Commands),
            _ => None,
        }
    }
}

/// Whether `id` is a device id that can stand as one literal topic level: lowercase
/// `[a-z0-9-]{1,64}` (so never `/`, `+`, `#` or NUL).
pub fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_DEVICE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A valid topic name to publish to: 1 to [`MAX_TOPIC_LEN`] bytes, no wildcard (`+`, `#`) and
/// no NUL.
pub fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= MAX_TOPIC_LEN
        && !topic.bytes().any(|b| b == b'+' || b == b'#' || b == 0)
}

/// A valid topic filter: 1 to [`MAX_TOPIC_LEN`] bytes, no NUL, `+` only as a whole level and
/// `#` only as the whole last level.
pub fn valid_topic_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > MAX_TOPIC_LEN || filter.bytes().any(|b| b == 0) {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, level)| {
        if level.contains('#') {
            *level == "#" && i == last
        } else if level.contains('+') {
            *level == "+"
        } else {
            true
        }
    })
}

/// A device topic split into its parts: `devices/<device>/<kind>[/<rest>]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceTopic<'a> {
    /// The device id level.
    pub device: &'a str,
    /// The kind level.
    pub kind: Kind,
    /// What follows `<kind>/`, if anything.
    pub rest: Option<&'a str>,
}

/// Split `devices/<device>/<kind>[/<rest>]`; `None` for anything else (including a device
/// level that is not a valid device id).
pub fn parse_device_topic(topic: &str) -> Option<DeviceTopic<'_>> {
    let after_root = topic.strip_prefix(ROOT)?.strip_prefix('/')?;
    let (device, after_device) = after_root.split_once('/')?;
    if !valid_device_id(device) {
        return None;
    }
    let (kind, rest) = match after_device.split_once('/') {
        Some((k, r)) => (k, Some(r)),
        None => (after_device, None),
    };
    Some(DeviceTopic {
        device,
        kind: Kind::parse(kind)?,
        rest,
    })
}

/// Whether `device` may publish to `topic`: a valid topic name in its own telemetry or
/// events subtree.
pub fn may_publish(device: &str, topic: &str) -> bool {
    if !valid_device_id(device) || !valid_topic_name(topic) {
        return false;
    }
    matches!(
        parse_device_topic(topic),
        Some(DeviceTopic { device: d, kind: Kind::Telemetry | Kind::Events, .. }) if d == device
    )
}

/// Whether `device` may subscribe to `filter`: a valid filter inside its own commands
/// subtree (`devices/<device>/commands`, `devices/<device>/commands/#`, ...). The policy
/// decides separately whether commands may be subscribed at all.
pub fn may_subscribe(device: &str, filter: &str) -> bool {
    if !valid_device_id(device) || !valid_topic_filter(filter) {
        return false;
    }
    matches!(
        parse_device_topic(filter),
        Some(DeviceTopic { device: d, kind: Kind::Commands, .. }) if d == device
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_rules() {
        let d = "dev-a";
        for ok in [
            "devices/dev-a/telemetry",
            "devices/dev-a/telemetry/temp",
            "devices/dev-a/telemetry/a/b/c",
            "devices/dev-a/events/boot",
            "devices/dev-a/telemetry/",
        ] {
            assert!(may_publish(d, ok), "{ok}");
        }
        for bad in [
            "devices/dev-b/telemetry/temp",
            "devices/dev-a/commands/x",
            "devices/dev-a/telemetryx",
            "devices/dev-a/other",
            "devices/dev-a",
            "devices/+/telemetry/x",
            "devices/dev-a/telemetry/+",
            "devices/dev-a/telemetry/#",
            "devices/dev-a/telemetry/\0",
            "devices//dev-a/telemetry",
            "/devices/dev-a/telemetry",
            "Devices/dev-a/telemetry",
            "devices/dev-a/Telemetry",
            "devices/DEV-A/telemetry",
            "",
            "x",
        ] {
            assert!(!may_publish(d, bad), "{bad:?}");
        }
        let long = format!("devices/dev-a/telemetry/{}", "x".repeat(MAX_TOPIC_LEN));
        assert!(!may_publish(d, &long));
        // an invalid device id never publishes, whatever the topic
        for bad_id in ["", "a/b", "+", "#", "a\0", "A", &"a".repeat(65)] {
            let t = format!("devices/{bad_id}/telemetry/x");
            assert!(!may_publish(bad_id, &t), "{bad_id:?}");
        }
    }

    #[test]
    fn subscribe_rules() {
        let d = "dev-a";
        for ok in [
            "devices/dev-a/commands",
            "devices/dev-a/commands/#",
            "devices/dev-a/commands/+",
            "devices/dev-a/commands/+/x/#",
            "devices/dev-a/commands/reboot",
        ] {
            assert!(may_subscribe(d, ok), "{ok}");
        }
        for bad in [
            "#",
            "+/+/+",
            "devices/#",
            "devices/+/commands/#",
            "devices/dev-a/#",
            "devices/dev-a/+/x",
            "devices/dev-b/commands/#",
            "devices/dev-a/telemetry/#",
            "devices/dev-a/commands/a#",
            "devices/dev-a/commands/#/x",
            "devices/dev-a/commands/x+",
            "$share/g/devices/dev-a/commands/#",
            "devices/dev-a/commands/\0",
        ] {
            assert!(!may_subscribe(d, bad), "{bad:?}");
        }
    }

    #[test]
    fn filters() {
        assert!(valid_topic_filter("a/+/b/#"));
        assert!(valid_topic_filter("#"));
        assert!(valid_topic_filter("+"));
        assert!(!valid_topic_filter("a/#/b"));
        assert!(!valid_topic_filter("a/b#"));
        assert!(!valid_topic_filter("a+/b"));
        assert!(!valid_topic_filter(""));
    }
}
