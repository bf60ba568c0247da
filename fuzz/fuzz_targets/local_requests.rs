//! Fuzz the agent's local socket protocol: one JSON request line from an application
//! (`devid_agent::local::parse_request`), then the topic check the outbox applies. Never
//! panic; a publish that parses carries exactly the bytes its base64 names.
#![no_main]

use devid_agent::local::{parse_request, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Request::Publish { topic, payload, .. }) = parse_request(data) {
        let _ = devid_agent::topic::validate_suffix(&topic);
        assert!(payload.len() <= data.len());
    }
});
