//! Per-device MQTT policy, named in the registry (the `policy` of the enrolment token).
//!
//! Least privilege always: a device may publish only to `devices/<id>/telemetry/#` and
//! `devices/<id>/events/#`, never anywhere else, whatever its policy. The policy only decides
//! whether it may also subscribe to its own `devices/<id>/commands/#`:
//!
//! | policy | publish | subscribe |
//! |---|---|---|
//! | `default` | own telemetry, events | own commands |
//! | `publish-only` | own telemetry, events | nothing |
//! | any other name | own telemetry, events | nothing (unknown names get the least) |
//!
//! Decision: `default` allows the own-commands subscription because the device agent needs it
//! to receive commands, and it reveals nothing of other devices; operators who want
//! send-only sensors enrol them with `--policy publish-only`.

use devid_mqtt::topic;

/// What a session may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// May subscribe to its own commands subtree.
    pub commands: bool,
}

/// Name of the default policy.
pub const DEFAULT: &str = "default";
/// Name of the publish-only policy.
pub const PUBLISH_ONLY: &str = "publish-only";

impl Policy {
    /// The policy for a registry policy name.
    pub fn named(name: &str) -> Self {
        match name {
            DEFAULT => Policy { commands: true },
            _ => Policy { commands: false },
        }
    }

    /// Whether `device` may publish to `topic`.
    pub fn may_publish(&self, device: &str, topic_name: &str) -> bool {
        topic::may_publish(device, topic_name)
    }

    /// Whether `device` may subscribe to `filter`.
    pub fn may_subscribe(&self, device: &str, filter: &str) -> bool {
        self.commands && topic::may_subscribe(device, filter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_policies() {
        let d = Policy::named("default");
        assert!(d.may_subscribe("a", "devices/a/commands/#"));
        assert!(!d.may_subscribe("a", "devices/b/commands/#"));
        for name in ["publish-only", "lab", ""] {
            let p = Policy::named(name);
            assert!(!p.may_subscribe("a", "devices/a/commands/#"), "{name}");
            assert!(p.may_publish("a", "devices/a/telemetry/x"), "{name}");
        }
    }
}
