//! Fuzz the bodies of `POST /v1/enroll` and `POST /v1/renew` as the HTTPS API reads them
//! (issue 15): serde_json into the proto types, the requested device id, and the CSR they
//! carry through the CA's proof-of-possession check. Never panic.
#![no_main]

use devid_proto::{DeviceId, EnrollRequest, RenewRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<EnrollRequest>(data) {
        if let Some(id) = req.device_id.as_deref() {
            let _ = DeviceId::parse(id);
        }
        let _ = devid_ca::csr::verify_csr_pem(&req.csr);
    }
    if let Ok(req) = serde_json::from_slice::<RenewRequest>(data) {
        let _ = devid_ca::csr::verify_csr_pem(&req.csr);
    }
});
