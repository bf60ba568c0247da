//! Fuzz the device's configuration files: the root-owned `/etc/devid/devid.toml` (the anchor:
//! backend, PKCS#11 module, TCTI) and the state dir's `state.toml`, which an attacker with the
//! flash can write (THREATS.md T13). Never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("/etc/devid/devid.toml");
    let _ = devid::anchor::DeviceConfig::parse(path, text.to_owned());
    let _ = devid::state::StateFile::parse(std::path::Path::new("state.toml"), text);
});
