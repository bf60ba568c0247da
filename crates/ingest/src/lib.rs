//! Telemetry ingest: MQTT 3.1.1 and 5 over mutual TLS, part of `devid-server run` beside the
//! HTTPS API (which it never imports: the two meet only in the composition root, `devid-server`,
//! through `devid_store::StateChangeSink`, the message store and the live-message channel).
//!
//! Per connection, in order: TLS 1.3 handshake with a client certificate chained to the fleet
//! CA -> CONNECT (client id must equal the certificate's device id) -> registry check (active
//! only) -> for each PUBLISH: authorise (least privilege, [`policy`]) -> durable append through
//! the group-commit writer ([`commit`]) -> PUBACK. At most `mqtt.receive_maximum` messages of a
//! connection wait for their commit; further reading waits (backpressure).
//!
//! Code map:
//! * [`shared`]: [`Ingest`], what every session shares; [`listener`]: [`serve`], the accept
//!   loop.
//! * [`tls`]: reason codes of failed handshakes (which device a certificate names is
//!   `devid_tls::identity`'s rule).
//! * [`session`]: one connection, from TCP accept to close.
//! * [`commit`]: the group-commit writer thread (one transaction + fsync per batch).
//! * [`live`]: device id -> live session, for takeover and live revocation.
//! * [`policy`]: what a device may publish and subscribe.
//! * [`limits`]: token buckets, per-source handshake limits, audit rate limiting.
//! * [`storage`]: the free-disk watermark and the per-device byte quota (0x97 refusals).
//! * [`metrics`]: Prometheus metrics (encoded by the root's `GET /metrics`).
//!
//! Invariants: a PUBACK is sent only after its message is durably committed; no payload is
//! ever logged, audited or put in an error; a device that is suspended or revoked loses its
//! session at once (on this node) and cannot reconnect; the registry is reached only through
//! `devid_store::IngestRegistry` (read devices, note last-seen, audit refusals: never write a
//! device), and its blocking calls run on the blocking pool except `try_device_now`.
#![forbid(unsafe_code)]

pub mod commit;
pub mod limits;
pub mod listener;
pub mod live;
pub mod metrics;
pub mod policy;
pub mod session;
pub mod shared;
pub mod storage;
pub mod tls;

pub use listener::serve;
pub use shared::Ingest;
