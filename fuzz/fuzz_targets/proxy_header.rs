//! Fuzz the PROXY protocol v2 parser the HTTPS and MQTT listeners run on connections from
//! trusted load balancers: never panic; whatever parses must re-encode to an equal header for
//! a TCP family; a header's declared length is always bounded.
#![no_main]

use devid_stdx::proxy::{self, Header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(fixed) = data.get(..proxy::FIXED_LEN) {
        let fixed: &[u8; proxy::FIXED_LEN] = fixed.try_into().expect("16 bytes");
        if let Ok(len) = proxy::header_len(fixed) {
            assert!(len <= proxy::FIXED_LEN + proxy::MAX_BODY_LEN);
        }
    }
    if let Ok(Header::Proxied(src)) = proxy::parse(data) {
        // the destination is not kept; any destination of the same family round-trips src
        let dst = match src {
            std::net::SocketAddr::V4(_) => "127.0.0.1:1".parse().expect("addr"),
            std::net::SocketAddr::V6(_) => "[::1]:1".parse().expect("addr"),
        };
        assert_eq!(proxy::parse(&proxy::encode(src, dst)), Ok(Header::Proxied(src)));
    }
    // the trusted-range parser sees operator config, but must not panic either
    if let Ok(s) = std::str::from_utf8(data) {
        let ranges: Vec<String> = s.split(',').map(str::to_owned).collect();
        if let Ok(t) = proxy::Trusted::parse(&ranges) {
            let _ = t.contains("127.0.0.1".parse().expect("ip"));
        }
    }
});
