//! One MQTT connection: TLS handshake and CONNECT within `mqtt.connect_timeout_secs`,
//! authentication against the certificate and the registry, then the session loop
//! (read -> authorise -> durable append -> PUBACK) until either side closes.

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devid_mqtt::{reason, BytesMut, Codec, ConnAckProps, Connect, Packet, PacketError, Protocol};
use devid_mqtt::{Publish, Will, MAX_MSG_ID_LEN};
use devid_proto::{DeviceId, DeviceState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::commit::{Ack, Outcome, Pending, Work};
use super::limits::{SourceSlot, TokenBucket};
use super::live::{CloseReason, LiveGuard, SessionHandle};
use super::policy::Policy;
use super::tls::{failure_reason, is_certificate_failure};
use crate::shared::{sanitize, AuditRow, Ingest};
use devid_stdx::now_ms;
use devid_store::{CertStanding, DeviceRecord, IngestRegistry, NewMessage, StoreError};
use devid_tls::identity::{identity_of, CertIdentity};

/// Time allowed to write to a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed for the close handshake.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Most subscriptions remembered per session.
const MAX_SUBSCRIPTIONS: usize = 32;

type Stream = TlsStream<TcpStream>;

/// Serve one accepted TCP connection to the end.
pub(crate) async fn handle(
    tcp: TcpStream,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    tel: Arc<Ingest>,
    slot: SourceSlot,
) {
    let deadline = tokio::time::Instant::now() + tel.settings.connect_timeout();
    let mut stream = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let why = failure_reason(&e);
            tel.metrics.handshake_failed(why);
            tracing::debug!(%addr, reason = why, "MQTT TLS handshake failed");
            if is_certificate_failure(why) {
                tel.audit(
                    &tel.registry,
                    AuditRow {
                        key: format!("src:{}:{why}", addr.ip()),
                        actor: "anonymous".into(),
                        source: addr.to_string(),
                        device: None,
                        action: "mqtt.connect",
                        detail: why.to_owned(),
                    },
                );
            }
            return;
        }
        Err(_) => {
            tel.metrics.handshake_failed("handshake_timeout");
            tracing::debug!(%addr, "MQTT TLS handshake timed out");
            return;
        }
    };
    tel.metrics.handshakes.inc();
    let identity = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|der| identity_of(der).ok());
    let mut codec = Codec::server(tel.settings.max_packet_bytes());
    let mut inbuf = BytesMut::with_capacity(READ_MIN);
    let connect =
        match tokio::time::timeout_at(deadline, read_connect(&mut stream, &mut codec, &mut inbuf))
            .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(why)) => {
                tel.metrics.handshake_failed(why);
                tracing::debug!(%addr, reason = why, "MQTT connection ended before CONNECT");
                return;
            }
            Err(_) => {
                tel.metrics.handshake_failed("connect_timeout");
                tracing::debug!(%addr, "no CONNECT within mqtt.connect_timeout_secs");
                return;
            }
        };
    drop(slot);
    let Some(proto) = codec.protocol() else {
        return;
    };
    let mut conn = Conn {
        stream,
        codec,
        proto,
        // grows to what the packets need; an idle session keeps next to nothing
        out: BytesMut::new(),
    };
    let accepted = match authenticate(&tel, addr, identity, &connect, proto).await {
        Ok(a) => a,
        Err(r) => {
            tel.metrics.connect_refused(r.why);
            tracing::info!(%addr, device_id = ?r.device, reason = r.why, "MQTT CONNECT refused");
            tel.audit(
                &tel.registry,
                AuditRow {
                    key: match &r.device {
                        Some(d) => format!("dev:{d}:{}", r.why),
                        None => format!("src:{}:{}", addr.ip(), r.why),
                    },
                    actor: r
                        .device
                        .as_ref()
                        .map(|d| format!("device:{d}"))
                        .unwrap_or_else(|| "anonymous".into()),
                    source: addr.to_string(),
                    device: r.device.clone(),
                    action: "mqtt.connect",
                    detail: r.detail.clone(),
                },
            );
            let code = match proto {
                Protocol::V5 => r.v5,
                Protocol::V311 => r.v3,
            };
            let _ = conn.codec.encode(
                Packet::ConnAck {
                    code,
                    session_present: false,
                    props: ConnAckProps::default(),
                },
                &mut conn.out,
            );
            conn.close().await;
            return;
        }
    };
    Session::start(tel, conn, inbuf, accepted, addr).run().await;
}

/// The stream with its codec and output buffer.
/// Smallest read buffer (an idle session holds this much).
const READ_MIN: usize = 512;
/// Largest read buffer a busy session grows to.
const READ_MAX: usize = 64 << 10;

struct Conn {
    stream: Stream,
    codec: Codec,
    proto: Protocol,
    out: BytesMut,
}

impl Conn {
    /// Flush what is buffered, then close (TLS close_notify, FIN), within a second.
    async fn close(&mut self) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            if !self.out.is_empty() {
                self.stream.write_all(&self.out).await?;
                self.out.clear();
            }
            self.stream.flush().await?;
            self.stream.shutdown().await
        })
        .await;
    }
}

async fn read_connect(
    stream: &mut Stream,
    codec: &mut Codec,
    buf: &mut BytesMut,
) -> Result<Box<Connect>, &'static str> {
    loop {
        match codec.decode(buf) {
            Ok(Some(Packet::Connect(c))) => return Ok(c),
            Ok(Some(_)) => return Err("first_packet_not_connect"),
            Ok(None) => {}
            Err(PacketError::TooLarge { .. }) => return Err("connect_too_large"),
            Err(PacketError::NotConnect) => return Err("not_mqtt"),
            Err(_) => return Err("malformed_connect"),
        }
        match stream.read_buf(buf).await {
            Ok(0) => return Err("closed_before_connect"),
            Ok(_) => {}
            Err(_) => return Err("read_error_before_connect"),
        }
    }
}

/// A refused CONNECT.
struct Refused {
    why: &'static str,
    v5: u8,
    v3: u8,
    device: Option<String>,
    detail: String,
}

fn refused(why: &'static str, v5: u8, v3: u8, device: Option<&DeviceId>) -> Refused {
    Refused {
        why,
        v5,
        v3,
        device: device.map(|d| d.to_string()),
        detail: why.to_owned(),
    }
}

/// An authenticated session's parameters.
struct Accepted {
    id: DeviceId,
    policy: Policy,
    guard: LiveGuard,
    keep_alive: Duration,
    announce_keep_alive: Option<u16>,
    will: Option<Will>,
    key_fingerprint: String,
    cert_serial: String,
    cert_not_after_ms: i64,
}

async fn authenticate(
    tel: &Arc<Ingest>,
    addr: SocketAddr,
    identity: Option<CertIdentity>,
    connect: &Connect,
    proto: Protocol,
) -> Result<Accepted, Refused> {
    use reason::*;
    let Some(identity) = identity else {
        return Err(refused(
            "cert_unreadable",
            NOT_AUTHORIZED,
            V3_NOT_AUTHORIZED,
            None,
        ));
    };
    let Ok(id) = identity.device.clone() else {
        return Err(refused(
            "cert_names_no_device",
            NOT_AUTHORIZED,
            V3_NOT_AUTHORIZED,
            None,
        ));
    };
    if &*connect.client_id != id.as_str() {
        let mut r = refused(
            "client_id_mismatch",
            CLIENT_ID_NOT_VALID,
            V3_IDENTIFIER_REJECTED,
            Some(&id),
        );
        r.detail = format!(
            "client_id_mismatch client_id={}",
            sanitize(&connect.client_id)
        );
        return Err(r);
    }
    if identity.not_after_ms <= now_ms() {
        return Err(refused(
            "cert_expired",
            BAD_CREDENTIALS,
            V3_NOT_AUTHORIZED,
            Some(&id),
        ));
    }
    if connect.auth_method.is_some() {
        return Err(refused(
            "enhanced_auth_not_supported",
            0x8C,
            V3_NOT_AUTHORIZED,
            Some(&id),
        ));
    }
    if let Some(w) = &connect.will {
        if w.qos > 1 {
            return Err(refused(
                "will_qos_not_supported",
                QOS_NOT_SUPPORTED,
                V3_NOT_AUTHORIZED,
                Some(&id),
            ));
        }
        if w.retain && proto == Protocol::V5 {
            return Err(refused(
                "will_retain_not_supported",
                RETAIN_NOT_SUPPORTED,
                V3_NOT_AUTHORIZED,
                Some(&id),
            ));
        }
        if !devid_mqtt::topic::may_publish(id.as_str(), &w.topic)
            || w.payload.len() > tel.settings.max_payload_bytes as usize
        {
            let mut r = refused(
                "will_topic_denied",
                NOT_AUTHORIZED,
                V3_NOT_AUTHORIZED,
                Some(&id),
            );
            r.detail = format!("will_topic_denied topic={}", sanitize(&w.topic));
            return Err(r);
        }
    }
    // Register BEFORE reading the registry: a state change committed after our read finds
    // us in the table (see live.rs).
    let guard = tel.live.register(id.as_str());
    let record = match read_device(&tel.registry, &id).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, %addr, "registry lookup failed");
            return Err(refused(
                "registry_unavailable",
                0x88,
                V3_SERVER_UNAVAILABLE,
                Some(&id),
            ));
        }
    };
    let record = match record {
        None => {
            return Err(refused(
                "device_unknown",
                BAD_CREDENTIALS,
                V3_NOT_AUTHORIZED,
                Some(&id),
            ))
        }
        Some(r) => r,
    };
    match record.state {
        DeviceState::Active => {}
        DeviceState::Suspended => {
            return Err(refused(
                "device_suspended",
                NOT_AUTHORIZED,
                V3_NOT_AUTHORIZED,
                Some(&id),
            ))
        }
        DeviceState::Revoked => {
            return Err(refused(
                "device_revoked",
                BAD_CREDENTIALS,
                V3_NOT_AUTHORIZED,
                Some(&id),
            ))
        }
    }
    match record.certificate_standing(&identity.serial_hex, &identity.key_fingerprint) {
        // The first use of a renewed certificate: from now on its predecessor is dead (and
        // that must be on disk before this session is accepted).
        CertStanding::Current if record.predecessor.is_some() => {
            if let Err(e) = mark_cert_used(&tel.registry, &id, &identity.serial_hex).await {
                tracing::error!(error = %e, %addr, "recording a certificate's first use failed");
                return Err(refused(
                    "registry_unavailable",
                    0x88,
                    V3_SERVER_UNAVAILABLE,
                    Some(&id),
                ));
            }
        }
        CertStanding::Current | CertStanding::Predecessor => {}
        // Renewed since, or re-enrolled: an older certificate is dead, whatever its key.
        CertStanding::Superseded => {
            return Err(refused(
                "cert_superseded",
                BAD_CREDENTIALS,
                V3_NOT_AUTHORIZED,
                Some(&id),
            ));
        }
    }
    if guard.handle.reason() != CloseReason::None {
        let why = guard.handle.reason();
        return Err(refused(
            why.code(),
            NOT_AUTHORIZED,
            V3_NOT_AUTHORIZED,
            Some(&id),
        ));
    }
    tel.seen(&id, record.last_seen_ms);
    let max_ka = tel.settings.max_keepalive_secs;
    let (ka, announce) = if connect.keep_alive == 0 || connect.keep_alive > max_ka {
        (max_ka, Some(max_ka))
    } else {
        (connect.keep_alive, None)
    };
    Ok(Accepted {
        policy: Policy::named(&record.policy),
        id,
        guard,
        // 1.5 x keep-alive, as MQTT asks of servers
        keep_alive: Duration::from_millis(u64::from(ka) * 1500),
        announce_keep_alive: announce,
        will: connect.will.clone(),
        key_fingerprint: identity.key_fingerprint,
        cert_serial: identity.serial_hex,
        cert_not_after_ms: identity.not_after_ms,
    })
}

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// The client sent DISCONNECT (no will).
    Normal,
    /// The connection broke or the client misbehaved: the will is published.
    Abnormal(&'static str),
    /// The server closes with this MQTT 5 reason code (the will is published).
    Server(u8, &'static str),
    /// An operator (state change), a newer session or shutdown closes it (no will).
    Closed(CloseReason),
}

struct Session {
    tel: Arc<Ingest>,
    conn: Conn,
    inbuf: BytesMut,
    /// How much buffer the next read gets: doubles while reads fill it, halves when they do
    /// not, so a busy session reads in large chunks and an idle one holds [`READ_MIN`] bytes.
    read_size: usize,
    addr: SocketAddr,
    id: DeviceId,
    device: Arc<str>,
    policy: Policy,
    handle: Arc<SessionHandle>,
    _guard: LiveGuard,
    inflight: usize,
    window: usize,
    ack_tx: mpsc::UnboundedSender<Ack>,
    ack_rx: mpsc::UnboundedReceiver<Ack>,
    msg_bucket: TokenBucket,
    byte_bucket: TokenBucket,
    throttle_until: Option<Instant>,
    keep_alive: Duration,
    last_rx: Instant,
    will: Option<Will>,
    subscriptions: Vec<String>,
    key_fingerprint: String,
    cert_serial: String,
    cert_not_after_ms: i64,
}

impl Session {
    fn start(
        tel: Arc<Ingest>,
        mut conn: Conn,
        inbuf: BytesMut,
        a: Accepted,
        addr: SocketAddr,
    ) -> Self {
        let s = &tel.settings;
        let now = Instant::now();
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let _ = conn.codec.encode(
            Packet::ConnAck {
                code: reason::SUCCESS,
                session_present: false,
                props: ConnAckProps {
                    max_qos: 1,
                    retain_available: false,
                    receive_max: s.receive_maximum,
                    max_packet_size: Some(s.max_packet_bytes()),
                    server_keep_alive: a.announce_keep_alive,
                    wildcard_subscription_available: true,
                    reason_string: None,
                },
            },
            &mut conn.out,
        );
        Session {
            msg_bucket: TokenBucket::new(s.messages_per_sec, s.messages_burst, now),
            byte_bucket: TokenBucket::new(s.bytes_per_sec, s.bytes_burst, now),
            window: usize::from(s.receive_maximum),
            device: Arc::from(a.id.as_str()),
            handle: a.guard.handle.clone(),
            _guard: a.guard,
            id: a.id,
            policy: a.policy,
            keep_alive: a.keep_alive,
            will: a.will,
            key_fingerprint: a.key_fingerprint,
            cert_serial: a.cert_serial,
            cert_not_after_ms: a.cert_not_after_ms,
            tel,
            conn,
            inbuf,
            read_size: READ_MIN,
            addr,
            inflight: 0,
            ack_tx,
            ack_rx,
            throttle_until: None,
            last_rx: now,
            subscriptions: Vec::new(),
        }
    }

    async fn run(mut self) {
        self.tel.metrics.connects.inc();
        self.tel.metrics.connections.inc();
        tracing::debug!(device_id = %self.id, addr = %self.addr, protocol = self.conn.proto.as_str(), "MQTT session open");
        let end = self.serve().await;
        self.tel.metrics.connections.dec();
        self.finish(end).await;
    }

    async fn serve(&mut self) -> End {
        let recheck = Duration::from_secs(self.tel.settings.registry_recheck_secs);
        let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + recheck, recheck);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ka_sleep = tokio::time::sleep(self.keep_alive);
        tokio::pin!(ka_sleep);
        let throttle_sleep = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(throttle_sleep);
        let mut throttle_armed = false;
        let cert_left = u64::try_from(self.cert_not_after_ms.saturating_sub(now_ms())).unwrap_or(0);
        let cert_sleep = tokio::time::sleep(Duration::from_millis(cert_left));
        tokio::pin!(cert_sleep);
        loop {
            if self.handle.reason() != CloseReason::None {
                return End::Closed(self.handle.reason());
            }
            if let Err(end) = self.process_input().await {
                return end;
            }
            if !self.conn.out.is_empty() {
                if let Err(end) = self.flush().await {
                    return end;
                }
            }
            match self.throttle_until {
                Some(t) if !throttle_armed => {
                    throttle_sleep.as_mut().reset(t.into());
                    throttle_armed = true;
                }
                _ => {}
            }
            let can_read = self.can_read();
            if self.inbuf.is_empty() && self.inbuf.capacity() > self.read_size {
                // give a burst's buffer back (decoded packets keep their own slices of it)
                self.inbuf = BytesMut::new();
            }
            let spare = self.inbuf.capacity() - self.inbuf.len();
            if can_read && spare < READ_MIN / 2 {
                self.inbuf.reserve(self.read_size);
            }
            let spare = self.inbuf.capacity() - self.inbuf.len();
            tokio::select! {
                biased;
                why = self.handle.closed() => return End::Closed(why),
                Some(ack) = self.ack_rx.recv() => {
                    if let Err(end) = self.on_ack(ack) {
                        return end;
                    }
                    while let Ok(ack) = self.ack_rx.try_recv() {
                        if let Err(end) = self.on_ack(ack) {
                            return end;
                        }
                    }
                    // the client's silence while it waited for our commits is not its fault
                    self.last_rx = Instant::now();
                }
                r = self.conn.stream.read_buf(&mut self.inbuf), if can_read => match r {
                    Ok(0) => return End::Abnormal("closed_by_client"),
                    Ok(n) => {
                        self.last_rx = Instant::now();
                        if n >= spare {
                            self.read_size = (self.read_size * 2).min(READ_MAX);
                        } else if n < self.read_size / 4 {
                            self.read_size = (self.read_size / 2).max(READ_MIN);
                        }
                    }
                    Err(_) => return End::Abnormal("read_error"),
                },
                () = &mut throttle_sleep, if throttle_armed => {
                    throttle_armed = false;
                    self.throttle_until = None;
                }
                () = &mut ka_sleep => {
                    let due = self.last_rx + self.keep_alive;
                    if Instant::now() >= due && can_read {
                        return End::Server(reason::KEEP_ALIVE_TIMEOUT, "keepalive_timeout");
                    }
                    let next = if can_read { due } else { Instant::now() + self.keep_alive };
                    ka_sleep.as_mut().reset(next.into());
                }
                _ = recheck.tick() => {
                    let check = registry_says_close(
                        self.tel.registry.clone(),
                        self.tel.clone(),
                        self.id.clone(),
                        self.cert_serial.clone(),
                        self.key_fingerprint.clone(),
                    );
                    if let Some(why) = check.await {
                        self.tel.metrics.live_revocations.inc();
                        return End::Closed(why);
                    }
                }
                () = &mut cert_sleep => return End::Server(reason::NOT_AUTHORIZED, "cert_expired"),
            }
        }
    }

    fn can_read(&self) -> bool {
        self.throttle_until.is_none() && self.inflight < self.window
    }

    /// Decode and handle buffered packets while the window and the rate limits allow.
    async fn process_input(&mut self) -> Result<(), End> {
        while self.can_read() {
            let packet = match self.conn.codec.decode(&mut self.inbuf) {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(()),
                Err(PacketError::TooLarge { .. }) => {
                    return Err(End::Server(reason::PACKET_TOO_LARGE, "packet_too_large"))
                }
                Err(_) => return Err(End::Server(reason::MALFORMED_PACKET, "malformed_packet")),
            };
            self.on_packet(packet).await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), End> {
        let Conn { stream, out, .. } = &mut self.conn;
        let write = async {
            stream.write_all(out).await?;
            stream.flush().await
        };
        let r = tokio::select! {
            biased;
            why = self.handle.closed() => return Err(End::Closed(why)),
            r = tokio::time::timeout(WRITE_TIMEOUT, write) => r,
        };
        match r {
            Ok(Ok(())) => {
                self.conn.out.clear();
                Ok(())
            }
            Ok(Err(_)) => Err(End::Abnormal("write_error")),
            Err(_) => Err(End::Abnormal("write_timeout")),
        }
    }

    async fn on_packet(&mut self, packet: Packet) -> Result<(), End> {
        match packet {
            Packet::Publish(p) => self.on_publish(p).await,
            Packet::Subscribe { packet_id, filters } => {
                self.on_subscribe(packet_id, filters);
                Ok(())
            }
            Packet::Unsubscribe { packet_id, filters } => {
                self.subscriptions
                    .retain(|s| !filters.iter().any(|f| &**f == s.as_str()));
                self.encode(Packet::UnsubAck {
                    packet_id,
                    count: filters.len(),
                })
            }
            Packet::PingReq => self.encode(Packet::PingResp),
            Packet::Disconnect { reason } => {
                if reason == 0x04 {
                    // "disconnect with will message"
                    Err(End::Abnormal("disconnect_with_will"))
                } else {
                    Err(End::Normal)
                }
            }
            // The server sends no PUBLISH yet (commands): acks from the client are ignored.
            Packet::PubAck { .. } | Packet::PubRec { .. } | Packet::PubComp { .. } => Ok(()),
            Packet::Connect(_) => Err(End::Server(reason::PROTOCOL_ERROR, "second_connect")),
            Packet::Auth => Err(End::Server(reason::PROTOCOL_ERROR, "auth_not_supported")),
            _ => Err(End::Server(reason::PROTOCOL_ERROR, "unexpected_packet")),
        }
    }

    fn encode(&mut self, p: Packet) -> Result<(), End> {
        self.conn
            .codec
            .encode(p, &mut self.conn.out)
            .map_err(|_| End::Server(reason::UNSPECIFIED_ERROR, "encode_failed"))
    }

    fn deny(&mut self, kind: &'static str, action: &'static str, code: &'static str, topic: &str) {
        self.tel.metrics.denied(kind);
        tracing::debug!(device_id = %self.id, reason = code, topic = %sanitize(topic), "MQTT request denied");
        self.tel.audit(
            &self.tel.registry,
            AuditRow {
                key: format!("dev:{}:{code}", self.id),
                actor: format!("device:{}", self.id),
                source: self.addr.to_string(),
                device: Some(self.id.to_string()),
                action,
                detail: format!("{code} topic={}", sanitize(topic)),
            },
        );
    }

    async fn submit(&mut self, work: Work, packet_id: Option<NonZeroU16>) -> Result<(), End> {
        self.inflight += 1;
        self.tel
            .commits
            .submit(Pending {
                work,
                packet_id,
                reply: self.ack_tx.clone(),
            })
            .await
            .map_err(|_| End::Server(reason::UNSPECIFIED_ERROR, "writer_stopped"))
    }

    async fn on_publish(&mut self, p: Publish) -> Result<(), End> {
        let v5 = self.conn.proto == Protocol::V5;
        if p.qos > 1 {
            self.deny("qos2", "mqtt.publish", "qos_not_supported", &p.topic);
            return Err(End::Server(reason::QOS_NOT_SUPPORTED, "qos_not_supported"));
        }
        if p.topic_alias.is_some() {
            return Err(End::Server(reason::TOPIC_ALIAS_INVALID, "topic_alias"));
        }
        if p.retain && v5 {
            return Err(End::Server(
                reason::RETAIN_NOT_SUPPORTED,
                "retain_not_supported",
            ));
        }
        if p.payload.len() > self.tel.settings.max_payload_bytes as usize {
            return Err(End::Server(reason::PACKET_TOO_LARGE, "payload_too_large"));
        }
        if !self.policy.may_publish(&self.device, &p.topic) {
            self.deny("publish", "mqtt.publish", "publish_denied", &p.topic);
            if !v5 {
                // 3.1.1 cannot say "refused" in a PUBACK: close so the device learns.
                return Err(End::Server(reason::NOT_AUTHORIZED, "publish_denied"));
            }
            return match p.packet_id {
                Some(pid) => {
                    self.submit(Work::Echo(reason::NOT_AUTHORIZED), Some(pid))
                        .await
                }
                None => Ok(()),
            };
        }
        if let Some(m) = &p.msg_id {
            if m.is_empty() || m.len() > MAX_MSG_ID_LEN {
                self.deny("msg_id", "mqtt.publish", "msg_id_invalid", &p.topic);
                return match p.packet_id {
                    Some(pid) => {
                        self.submit(Work::Echo(reason::IMPLEMENTATION_SPECIFIC), Some(pid))
                            .await
                    }
                    None => Ok(()),
                };
            }
        }
        if let Some(code) = self.storage_refusal(&p) {
            self.tel.metrics.storage_refused(code);
            self.deny(code, "mqtt.publish", code, &p.topic);
            if !v5 {
                // 3.1.1 cannot say "quota exceeded" in a PUBACK: close so the device learns
                // (it keeps the message and redelivers later).
                return Err(End::Server(reason::QUOTA_EXCEEDED, code));
            }
            return match p.packet_id {
                Some(pid) => {
                    self.submit(Work::Echo(reason::QUOTA_EXCEEDED), Some(pid))
                        .await
                }
                None => Ok(()),
            };
        }
        let now = Instant::now();
        let len = p.payload.len();
        let wait_msgs = self.msg_bucket.take(1.0, now);
        let wait_bytes = self.byte_bucket.take(len as f64, now);
        let wait = wait_msgs.max(wait_bytes);
        if !wait.is_zero() {
            self.tel.metrics.limited(if wait_bytes > wait_msgs {
                "bytes"
            } else {
                "messages"
            });
            self.throttle_until = Some(now + wait);
        }
        self.tel.metrics.messages_in.inc();
        self.tel.metrics.bytes_in.inc_by(len as u64);
        let msg = NewMessage {
            device_id: self.device.clone(),
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            msg_id: p.msg_id,
            received_ms: now_ms(),
        };
        self.submit(Work::Store(msg), p.packet_id).await
    }

    /// Why this publish must be refused to protect the disk, if it must: the data dir's
    /// file system is below `storage.min_free_bytes`, or the device is past its quota (then
    /// nothing is charged). From memory; no query per message.
    fn storage_refusal(&self, p: &Publish) -> Option<&'static str> {
        if self.tel.disk.as_ref().is_some_and(|d| d.is_low()) {
            return Some("disk_full");
        }
        let q = self.tel.quota.as_ref()?;
        let bytes = devid_store::RECORD_OVERHEAD
            + p.payload.len() as u64
            + p.topic.len() as u64
            + self.device.len() as u64
            + p.msg_id.as_ref().map_or(0, |m| m.len() as u64);
        (!q.charge(&self.device, bytes, now_ms())).then_some("quota_exceeded")
    }

    /// [`Session::storage_refusal`] for the will message.
    fn will_refusal(&self, w: &Will) -> Option<&'static str> {
        if self.tel.disk.as_ref().is_some_and(|d| d.is_low()) {
            return Some("disk_full");
        }
        let q = self.tel.quota.as_ref()?;
        let bytes = devid_store::RECORD_OVERHEAD
            + w.payload.len() as u64
            + w.topic.len() as u64
            + self.device.len() as u64;
        (!q.charge(&self.device, bytes, now_ms())).then_some("quota_exceeded")
    }

    fn on_subscribe(&mut self, packet_id: NonZeroU16, filters: Vec<(devid_mqtt::ByteString, u8)>) {
        let v5 = self.conn.proto == Protocol::V5;
        let mut codes = Vec::with_capacity(filters.len());
        for (filter, qos) in filters {
            if self.policy.may_subscribe(&self.device, &filter) {
                codes.push(qos.min(1));
                if self.subscriptions.len() < MAX_SUBSCRIPTIONS
                    && !self.subscriptions.iter().any(|s| s.as_str() == &*filter)
                {
                    self.subscriptions.push(filter.to_string());
                }
            } else {
                self.deny("subscribe", "mqtt.subscribe", "subscribe_denied", &filter);
                codes.push(if v5 {
                    reason::NOT_AUTHORIZED
                } else {
                    reason::V3_SUBACK_FAILURE
                });
            }
        }
        // TODO(commands): deliver devices/<id>/commands/... to these subscriptions once the
        // server has a command source.
        let _ = self.encode(Packet::SubAck { packet_id, codes });
    }

    fn on_ack(&mut self, ack: Ack) -> Result<(), End> {
        self.inflight = self.inflight.saturating_sub(1);
        let Some(pid) = ack.packet_id else {
            return Ok(());
        };
        let code = match ack.outcome {
            Outcome::Stored | Outcome::Duplicate => reason::SUCCESS,
            Outcome::Echo(code) => code,
            // the commit failed and the disk is (now) below the watermark: say so
            Outcome::Failed
                if self.conn.proto == Protocol::V5
                    && self.tel.disk.as_ref().is_some_and(|d| d.was_low()) =>
            {
                reason::QUOTA_EXCEEDED
            }
            Outcome::Failed if self.conn.proto == Protocol::V5 => reason::UNSPECIFIED_ERROR,
            Outcome::Failed => {
                // 3.1.1 has no failed PUBACK: close; the client redelivers after reconnecting.
                return Err(End::Server(reason::UNSPECIFIED_ERROR, "commit_failed"));
            }
        };
        self.conn
            .codec
            .encode_puback(pid, code, &mut self.conn.out)
            .map_err(|_| End::Server(reason::UNSPECIFIED_ERROR, "encode_failed"))
    }

    async fn finish(mut self, end: End) {
        let v5 = self.conn.proto == Protocol::V5;
        let (code, why, will) = match end {
            End::Normal => (None, "client_disconnect", false),
            End::Abnormal(why) => (None, why, true),
            End::Server(code, why) => (Some(code), why, true),
            End::Closed(r) => {
                let code = match r {
                    CloseReason::TakenOver => reason::SESSION_TAKEN_OVER,
                    CloseReason::Shutdown => reason::SERVER_SHUTTING_DOWN,
                    _ => reason::ADMINISTRATIVE_ACTION,
                };
                if matches!(r, CloseReason::Suspended | CloseReason::Revoked) {
                    self.tel.audit(
                        &self.tel.registry,
                        AuditRow {
                            key: format!("dev:{}:session_closed", self.id),
                            actor: "server".into(),
                            source: self.addr.to_string(),
                            device: Some(self.id.to_string()),
                            action: "mqtt.session",
                            detail: format!("session closed: {}", r.code()),
                        },
                    );
                }
                (Some(code), r.code(), false)
            }
        };
        self.tel.metrics.disconnected(why);
        tracing::debug!(device_id = %self.id, reason = why, "MQTT session closed");
        if will {
            // a will is a publish too: it passes the watermark and the quota or is dropped
            if let Some(why) = self.will.as_ref().and_then(|w| self.will_refusal(w)) {
                self.tel.metrics.storage_refused(why);
                tracing::debug!(device_id = %self.id, reason = why, "will message not stored");
                self.will = None;
            }
            if let Some(w) = self.will.take() {
                let msg = NewMessage {
                    device_id: self.device.clone(),
                    topic: w.topic,
                    payload: w.payload,
                    qos: w.qos,
                    msg_id: None,
                    received_ms: now_ms(),
                };
                let _ = self
                    .tel
                    .commits
                    .submit(Pending {
                        work: Work::Store(msg),
                        packet_id: None,
                        reply: self.ack_tx.clone(),
                    })
                    .await;
            }
        }
        if let (true, Some(code)) = (v5, code) {
            let _ = self
                .conn
                .codec
                .encode(Packet::Disconnect { reason: code }, &mut self.conn.out);
        }
        self.conn.close().await;
    }
}

/// Re-read the registry: `Some` when the session must end (not active any more, or the
/// device's key changed).
async fn registry_says_close(
    store: Arc<dyn IngestRegistry>,
    tel: Arc<Ingest>,
    id: DeviceId,
    serial_hex: String,
    key_fingerprint: String,
) -> Option<CloseReason> {
    match read_device(&store, &id).await {
        Ok(Some(r)) => match r.state {
            DeviceState::Active
                if r.certificate_standing(&serial_hex, &key_fingerprint)
                    != CertStanding::Superseded =>
            {
                tel.seen(&id, r.last_seen_ms);
                None
            }
            DeviceState::Active => Some(CloseReason::Revoked),
            DeviceState::Suspended => Some(CloseReason::Suspended),
            DeviceState::Revoked => Some(CloseReason::Revoked),
        },
        Ok(None) => Some(CloseReason::Revoked),
        // a database hiccup does not cut live sessions; the next check decides
        Err(e) => {
            tracing::warn!(error = %e, "registry re-check failed");
            None
        }
    }
}

/// Record the first use of device `id`'s current certificate (on the blocking pool).
async fn mark_cert_used(
    store: &Arc<dyn IngestRegistry>,
    id: &DeviceId,
    serial_hex: &str,
) -> Result<bool, StoreError> {
    let (store, id, serial) = (store.clone(), id.clone(), serial_hex.to_owned());
    match tokio::task::spawn_blocking(move || store.mark_cert_used(&id, &serial)).await {
        Ok(r) => r,
        Err(e) => Err(StoreError::Db {
            operation: "record a certificate's first use",
            detail: format!("the task failed: {e}"),
        }),
    }
}

/// The registry's record of `id`: read in place when the store can answer at once, else on
/// the blocking pool.
async fn read_device(
    store: &Arc<dyn IngestRegistry>,
    id: &DeviceId,
) -> Result<Option<DeviceRecord>, StoreError> {
    if let Some(r) = store.try_device_now(id) {
        return r;
    }
    let (store, id) = (store.clone(), id.clone());
    match tokio::task::spawn_blocking(move || store.device(&id)).await {
        Ok(r) => r,
        Err(e) => Err(StoreError::Db {
            operation: "read device",
            detail: format!("the lookup task failed: {e}"),
        }),
    }
}
