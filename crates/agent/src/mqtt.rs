//! The MQTT 5 client: one connection at a time over TCP + TLS (rustls, client key in the
//! keystore), QoS 1 publishes straight from the durable outbox, a window of unacknowledged
//! messages, keep-alive pings.
//!
//! Packets are framed and encoded by `devid-mqtt` (over `rmqtt-codec`), the same packet layer
//! the server's ingest uses.

use std::collections::HashMap;
use std::io;
use std::num::NonZeroU16;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devid_mqtt::{BytesMut, Codec, Connect, Packet, Protocol, Publish};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;

use crate::outbox::Cursor;
use crate::Ctx;

/// Largest packet accepted from the server (we only expect acks and pings).
const MAX_INBOUND_PACKET: u32 = 256 * 1024;
/// How long to wait for the server's acks before a planned reconnect (renewal).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes read from the outbox per batch.
const READ_BATCH_BYTES: usize = 256 * 1024;

/// An `mqtts://HOST[:PORT]` endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or IP address (no brackets).
    pub host: String,
    /// Port (8883 when absent).
    pub port: u16,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "mqtts://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "mqtts://{}:{}", self.host, self.port)
        }
    }
}

/// Parse the sealed MQTT URL: `mqtts://HOST[:PORT]`, IPv6 in brackets.
pub fn parse_mqtt_url(url: &str) -> Option<Endpoint> {
    let rest = url.strip_prefix("mqtts://")?.trim_end_matches('/');
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => 8883,
            None => return None,
        };
        (h.to_string(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().ok()?),
            None => (rest.to_string(), 8883),
        }
    };
    if host.is_empty() || host.contains(['/', '@', ' ']) || port == 0 {
        return None;
    }
    Some(Endpoint { host, port })
}

/// Why a connection attempt or a session ended.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    /// Retrying soon will not help: the server refused this device, or the server is not
    /// the pinned one.
    Refused(String),
    /// Network, server busy, timeouts: retry with backoff.
    Transient(String),
}

impl Failure {
    pub(crate) fn text(&self) -> &str {
        match self {
            Failure::Refused(s) | Failure::Transient(s) => s,
        }
    }
}

/// How a session ended without failure.
pub(crate) enum Ended {
    /// The agent is stopping.
    Shutdown,
    /// Reconnect now (new certificate).
    Reconnect,
}

enum Inbound {
    Packet(Packet),
    Closed(Failure),
}

fn describe_connack(code: u8) -> Failure {
    use devid_mqtt::reason as r;
    let text =
        |what: &str| format!("the server refused the connection: {what} (CONNACK 0x{code:02x})");
    match code {
        r::BAD_CREDENTIALS | r::NOT_AUTHORIZED => Failure::Refused(text(
            "this device is not authorised (revoked, suspended or unknown to the server)",
        )),
        0x8A => Failure::Refused(text("this device is banned")),
        r::CLIENT_ID_NOT_VALID => Failure::Refused(text("client id (device id) not accepted")),
        0x84 | 0x8C => Failure::Refused(text("protocol or authentication method not supported")),
        r::SERVER_BUSY | 0x88 | r::CONNECTION_RATE_EXCEEDED | r::QUOTA_EXCEEDED => {
            Failure::Transient(text("server busy or unavailable"))
        }
        _ => Failure::Transient(text("unspecified")),
    }
}

fn describe_disconnect(code: u8) -> Failure {
    use devid_mqtt::reason as r;
    let text =
        |what: &str| format!("the server closed the session: {what} (DISCONNECT 0x{code:02x})");
    match code {
        r::NOT_AUTHORIZED | r::BAD_CREDENTIALS | r::ADMINISTRATIVE_ACTION => Failure::Refused(
            text("administrative action or not authorised (device revoked or suspended?)"),
        ),
        r::SESSION_TAKEN_OVER => Failure::Transient(text(
            "another connection used this device id (a cloned device?)",
        )),
        r::SERVER_SHUTTING_DOWN => Failure::Transient(text("server shutting down")),
        r::KEEP_ALIVE_TIMEOUT => Failure::Transient(text("keep-alive timeout")),
        _ => Failure::Transient(text("see the server's log")),
    }
}

fn classify_io(e: &io::Error, pin_mismatch: bool) -> Failure {
    if pin_mismatch {
        return Failure::Refused(
            "the MQTT server's certificate does not chain to the pinned CA (wrong server, wrong \
             pin, or someone in the middle); nothing was sent"
                .into(),
        );
    }
    if let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        use rustls::AlertDescription as A;
        return match inner {
            rustls::Error::AlertReceived(
                a @ (A::CertificateRevoked
                | A::CertificateExpired
                | A::BadCertificate
                | A::AccessDenied
                | A::UnknownCA
                | A::CertificateUnknown
                | A::UnsupportedCertificate
                | A::CertificateRequired),
            ) => Failure::Refused(format!(
                "the server refused this device's certificate (TLS alert {a:?}): revoked, \
                 expired or not from the fleet CA"
            )),
            rustls::Error::InvalidCertificate(c) => Failure::Refused(format!(
                "the MQTT server's certificate is not valid for this endpoint ({c:?})"
            )),
            other => Failure::Transient(format!("TLS: {other}")),
        };
    }
    Failure::Transient(e.to_string())
}

/// An open MQTT session.
pub(crate) struct Conn {
    wr: WriteHalf<TlsStream<TcpStream>>,
    rx: mpsc::Receiver<Inbound>,
    reader: tokio::task::JoinHandle<()>,
    codec: Codec,
    receive_max: u16,
    max_packet: Option<u32>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// TCP, TLS (the keystore signs the handshake) and MQTT CONNECT/CONNACK.
pub(crate) async fn connect(ctx: &Ctx) -> Result<Conn, Failure> {
    let cfg = &ctx.cfg;
    let ep = &ctx.endpoint;
    let tcp = tokio::time::timeout(
        cfg.connect_timeout,
        TcpStream::connect((ep.host.as_str(), ep.port)),
    )
    .await
    .map_err(|_| Failure::Transient(format!("TCP connect to {ep} timed out")))?
    .map_err(|e| Failure::Transient(format!("TCP connect to {ep}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(ep.host.clone())
        .map_err(|_| Failure::Refused(format!("{} is not a valid TLS server name", ep.host)))?;
    let (tls_config, mismatch) = ctx.tls_config();
    mismatch.store(false, Ordering::SeqCst);
    let connector = tokio_rustls::TlsConnector::from(tls_config);
    let signatures_before = ctx.signer.signatures();
    let handshake = tokio::time::timeout(cfg.connect_timeout, connector.connect(name, tcp));
    // The keystore signs inside the handshake and blocks (a TPM signature takes tens of
    // milliseconds). On the multi-threaded runtime, block_in_place hands this worker's other
    // tasks to another worker first, so the local socket and the outbox keep going.
    let result = match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(handshake))
        }
        _ => handshake.await,
    };
    let tls = result
        .map_err(|_| Failure::Transient(format!("TLS handshake with {ep} timed out")))?
        .map_err(|e| classify_io(&e, mismatch.load(Ordering::SeqCst)))?;
    let resumed = matches!(
        tls.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    let signed = ctx.signer.signatures() - signatures_before;
    ctx.update(|s| {
        if resumed {
            s.tls.resumed_handshakes += 1;
        } else {
            s.tls.full_handshakes += 1;
        }
        s.tls.keystore_signatures = ctx.signer.signatures();
    });
    tracing::debug!(resumed, keystore_signatures = signed, "TLS handshake done");

    let (rd, mut wr) = tokio::io::split(tls);
    let window = usize::from(cfg.inflight.max(1));
    let (tx, mut rx) = mpsc::channel(window + 16);
    let reader = tokio::spawn(read_loop(rd, tx, mismatch.clone()));
    let mut codec = Codec::client(Protocol::V5, MAX_INBOUND_PACKET);
    let mut buf = BytesMut::new();
    codec
        .encode(
            Packet::Connect(Box::new(Connect {
                protocol: Protocol::V5,
                client_id: ctx.device_id.as_str().into(),
                keep_alive: cfg.keep_alive.as_secs().clamp(1, 65_535) as u16,
                clean_start: true,
                will: None,
                has_username: false,
                has_password: false,
                session_expiry_secs: 0,
                receive_max: Some(16),
                max_packet_size: Some(MAX_INBOUND_PACKET),
                auth_method: None,
            })),
            &mut buf,
        )
        .map_err(|e| Failure::Transient(e.to_string()))?;
    write_flush(&mut wr, &buf)
        .await
        .map_err(|e| classify_io(&e, false))?;
    let first = tokio::time::timeout(cfg.connect_timeout, rx.recv())
        .await
        .map_err(|_| Failure::Transient("no CONNACK from the server in time".into()))?;
    match first {
        Some(Inbound::Packet(Packet::ConnAck { code, props, .. })) => {
            if code != 0 {
                return Err(describe_connack(code));
            }
            Ok(Conn {
                wr,
                rx,
                reader,
                codec,
                receive_max: props.receive_max.max(1),
                max_packet: props.max_packet_size,
            })
        }
        Some(Inbound::Packet(p)) => Err(Failure::Transient(format!(
            "protocol error: expected CONNACK, got {}",
            packet_name(&p)
        ))),
        Some(Inbound::Closed(f)) => Err(f),
        None => Err(Failure::Transient(
            "the server closed the connection before CONNACK".into(),
        )),
    }
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck { .. } => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck { .. } => "PUBACK",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect { .. } => "DISCONNECT",
        _ => "another packet",
    }
}

async fn write_flush(wr: &mut WriteHalf<TlsStream<TcpStream>>, buf: &[u8]) -> io::Result<()> {
    wr.write_all(buf).await?;
    wr.flush().await
}

async fn read_loop(
    mut rd: ReadHalf<TlsStream<TcpStream>>,
    tx: mpsc::Sender<Inbound>,
    mismatch: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut codec = Codec::client(Protocol::V5, MAX_INBOUND_PACKET);
    let mut buf = BytesMut::with_capacity(8192);
    loop {
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(p)) => {
                    if tx.send(Inbound::Packet(p)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx
                        .send(Inbound::Closed(Failure::Transient(format!(
                            "invalid packet from the server: {e}"
                        ))))
                        .await;
                    return;
                }
            }
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) => {
                let _ = tx
                    .send(Inbound::Closed(Failure::Transient(
                        "the server closed the connection".into(),
                    )))
                    .await;
                return;
            }
            Ok(_) => {}
            Err(e) => {
                let f = classify_io(&e, mismatch.load(Ordering::SeqCst));
                let _ = tx.send(Inbound::Closed(f)).await;
                return;
            }
        }
    }
}

fn permanent_puback_failure(reason: u8) -> bool {
    // 0x83 implementation specific, 0x87 not authorised (topic), 0x90 topic name invalid,
    // 0x99 payload format invalid: sending again cannot succeed. 0x80 (unspecified, e.g. the
    // server could not store it) and 0x97 (quota) may: those are retried.
    matches!(reason, 0x83 | 0x87 | 0x90 | 0x99)
}

/// Publish from the outbox until the connection fails, the agent stops, or a reconnect is
/// requested.
pub(crate) async fn run_session(ctx: &Ctx, mut conn: Conn) -> Result<Ended, Failure> {
    let cfg = &ctx.cfg;
    let window = usize::from(cfg.inflight.min(conn.receive_max).max(1));
    let keep_alive = cfg.keep_alive.max(Duration::from_secs(1));
    let mut cursor = Some(Cursor::new(ctx.outbox.first_pending()));
    let mut inflight: HashMap<u16, (u64, String)> = HashMap::with_capacity(window);
    let mut next_pid: u16 = 0;
    let mut committed = ctx.outbox.committed();
    let mut shutdown = ctx.shutdown.subscribe();
    let mut last_tx = Instant::now();
    let mut last_rx = Instant::now();
    let mut ping_sent: Option<Instant> = None;
    let mut draining: Option<Instant> = None;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut stalled = false;

    loop {
        if *shutdown.borrow() {
            let _ = send_disconnect(&mut conn).await;
            return Ok(Ended::Shutdown);
        }
        if let Some(since) = draining {
            if inflight.is_empty() || since.elapsed() >= DRAIN_TIMEOUT {
                let _ = send_disconnect(&mut conn).await;
                return Ok(Ended::Reconnect);
            }
        }
        let cursor_at = cursor.as_ref().map(Cursor::next_seq).unwrap_or(u64::MAX);
        // Refill when at least half the window is free: one outbox read, one TLS write and
        // one flush for many messages instead of one per acknowledgement.
        let room_for_batch = inflight.len() * 2 <= window;
        if draining.is_none()
            && !stalled
            && room_for_batch
            && cursor_at < *committed.borrow_and_update()
        {
            let room = window - inflight.len();
            let outbox = ctx.outbox.clone();
            let Some(mut cur) = cursor.take() else {
                return Err(Failure::Transient("internal: outbox cursor lost".into()));
            };
            let (batch, cur) = tokio::task::spawn_blocking(move || {
                let r = outbox.read_batch(&mut cur, room, READ_BATCH_BYTES);
                (r, cur)
            })
            .await
            .map_err(|e| Failure::Transient(format!("outbox reader failed: {e}")))?;
            let moved = cur.next_seq() != cursor_at;
            cursor = Some(cur);
            let batch = batch.map_err(|e| Failure::Transient(e.to_string()))?;
            stalled = batch.is_empty() && !moved;
            if !batch.is_empty() {
                buf.clear();
                let max_sent = ctx.max_sent.load(Ordering::Relaxed);
                let mut sent = 0u64;
                for rec in batch {
                    let before = buf.len();
                    let pid = loop {
                        next_pid = next_pid.wrapping_add(1);
                        if next_pid != 0 && !inflight.contains_key(&next_pid) {
                            break next_pid;
                        }
                    };
                    let Some(packet_id) = NonZeroU16::new(pid) else {
                        continue;
                    };
                    let topic = crate::topic::full_topic(&ctx.device_id, &rec.topic);
                    let publish = Publish {
                        topic: topic.into(),
                        qos: 1,
                        packet_id: Some(packet_id),
                        payload: rec.payload.clone().into(),
                        retain: false,
                        dup: rec.seq < max_sent,
                        msg_id: Some(rec.msg_id().into()),
                        topic_alias: None,
                    };
                    let encoded = conn.codec.encode(Packet::Publish(publish), &mut buf);
                    let too_big = conn
                        .max_packet
                        .is_some_and(|m| (buf.len() - before) as u64 > u64::from(m));
                    if encoded.is_err() || too_big {
                        buf.truncate(before);
                        tracing::warn!(
                            topic = %rec.topic,
                            seq = rec.seq,
                            size = rec.payload.len(),
                            "message cannot be sent to this server (larger than it accepts or \
                             not encodable); removed from the outbox"
                        );
                        ctx.outbox.ack(rec.seq);
                        ctx.update(|s| s.mqtt.rejected += 1);
                        continue;
                    }
                    inflight.insert(pid, (rec.seq, rec.topic));
                    ctx.max_sent.fetch_max(rec.seq + 1, Ordering::Relaxed);
                    sent += 1;
                }
                write_flush(&mut conn.wr, &buf)
                    .await
                    .map_err(|e| classify_io(&e, false))?;
                last_tx = Instant::now();
                ctx.update(|s| s.mqtt.published += sent);
            }
            continue;
        }

        let ping_at = if ping_sent.is_some() {
            last_rx + keep_alive + keep_alive / 2
        } else {
            last_tx + keep_alive / 2
        };
        tokio::select! {
            _ = shutdown.changed() => {}
            _ = ctx.reconnect.notified(), if draining.is_none() => {
                tracing::info!("reconnecting with the renewed certificate");
                draining = Some(Instant::now());
            }
            _ = committed.changed(), if draining.is_none() && inflight.len() * 2 <= window => { stalled = false; }
            _ = tokio::time::sleep_until(ping_at.into()) => {
                if ping_sent.is_some() {
                    return Err(Failure::Transient(format!(
                        "no answer from the server within {}s (keep-alive)",
                        (keep_alive + keep_alive / 2).as_secs()
                    )));
                }
                buf.clear();
                conn.codec.encode(Packet::PingReq, &mut buf).map_err(|e| Failure::Transient(e.to_string()))?;
                write_flush(&mut conn.wr, &buf).await.map_err(|e| classify_io(&e, false))?;
                last_tx = Instant::now();
                ping_sent = Some(last_tx);
            }
            _ = tokio::time::sleep(DRAIN_TIMEOUT), if draining.is_some() => {}
            msg = conn.rx.recv() => {
                last_rx = Instant::now();
                ping_sent = None;
                match msg {
                    Some(Inbound::Packet(Packet::PubAck { packet_id, reason })) => {
                        let Some((seq, topic)) = inflight.remove(&packet_id.get()) else {
                            continue;
                        };
                        stalled = false;
                        if reason < 0x80 {
                            ctx.outbox.ack(seq);
                            ctx.update(|s| {
                                s.mqtt.acked += 1;
                                s.mqtt.last_ack_unix = Some(crate::status::unix_now());
                            });
                        } else if permanent_puback_failure(reason) {
                            tracing::warn!(
                                %topic, seq, reason = format!("0x{reason:02x}"),
                                "the server refused a message for good; removed from the outbox"
                            );
                            ctx.outbox.ack(seq);
                            ctx.update(|s| s.mqtt.rejected += 1);
                        } else {
                            return Err(Failure::Transient(format!(
                                "the server could not take a message (PUBACK 0x{reason:02x}); \
                                 sending it again later"
                            )));
                        }
                    }
                    Some(Inbound::Packet(Packet::PingResp)) => {}
                    Some(Inbound::Packet(Packet::Disconnect { reason })) => {
                        return Err(describe_disconnect(reason));
                    }
                    Some(Inbound::Packet(Packet::Publish(p))) => {
                        // We subscribe to nothing; acknowledge QoS 1 so the server moves on.
                        if let (1, Some(pid)) = (p.qos, p.packet_id) {
                            buf.clear();
                            conn.codec
                                .encode(Packet::PubAck { packet_id: pid, reason: 0 }, &mut buf)
                                .map_err(|e| Failure::Transient(e.to_string()))?;
                            write_flush(&mut conn.wr, &buf).await.map_err(|e| classify_io(&e, false))?;
                        }
                    }
                    Some(Inbound::Packet(p)) => {
                        tracing::debug!(packet = packet_name(&p), "ignored packet from the server");
                    }
                    Some(Inbound::Closed(f)) => return Err(f),
                    None => return Err(Failure::Transient("connection reader stopped".into())),
                }
            }
        }
    }
}

async fn send_disconnect(conn: &mut Conn) -> io::Result<()> {
    let mut buf = BytesMut::new();
    if conn
        .codec
        .encode(Packet::Disconnect { reason: 0 }, &mut buf)
        .is_ok()
    {
        write_flush(&mut conn.wr, &buf).await?;
    }
    conn.wr.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_urls() {
        let e = parse_mqtt_url("mqtts://localhost:8883").unwrap_or_else(|| panic!());
        assert_eq!((e.host.as_str(), e.port), ("localhost", 8883));
        let e = parse_mqtt_url("mqtts://iot.example.com").unwrap_or_else(|| panic!());
        assert_eq!(e.port, 8883);
        let e = parse_mqtt_url("mqtts://[::1]:1883/").unwrap_or_else(|| panic!());
        assert_eq!((e.host.as_str(), e.port), ("::1", 1883));
        assert_eq!(e.to_string(), "mqtts://[::1]:1883");
        for bad in [
            "mqtt://x:1",
            "mqtts://",
            "mqtts://x:0",
            "mqtts://x:99999",
            "mqtts://u@x:1",
            "mqtts://[::1",
        ] {
            assert!(parse_mqtt_url(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn refusals_are_told_apart() {
        assert!(matches!(describe_connack(0x87), Failure::Refused(_)));
        assert!(matches!(describe_connack(0x86), Failure::Refused(_)));
        assert!(matches!(describe_connack(0x89), Failure::Transient(_)));
        assert!(matches!(describe_disconnect(0x98), Failure::Refused(_)));
        assert!(matches!(describe_disconnect(0x8B), Failure::Transient(_)));
        assert!(permanent_puback_failure(0x87));
        assert!(!permanent_puback_failure(0x80));
        assert!(!permanent_puback_failure(0x97));
    }
}
