//! Fuzz the server's configuration file, `devid-server.toml`, as `ServerConfig::load` reads
//! it (TOML, then the checks), and the values parsed out of it (durations, CA key references,
//! PKCS#11 URIs). Operator input, but a panic at start is still a bug.
#![no_main]

use devid_server_config::{parse_duration, CaKeyRef, Pkcs11KeyUri, ServerConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = toml::from_str::<ServerConfig>(text) {
        let _ = cfg.validate();
    }
    let _ = parse_duration("fuzz", text);
    let _ = CaKeyRef::parse(text, std::path::Path::new("/var/lib/devid-server"));
    let _ = Pkcs11KeyUri::parse(text);
});
