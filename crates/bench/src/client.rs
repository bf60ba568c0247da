//! The load generator's MQTT-over-TLS client: TCP from one of several 127.0.0.x source
//! addresses (so tens of thousands of connections and TIME_WAIT sockets do not exhaust one
//! address's ephemeral ports), TLS 1.3 with the device's certificate, CONNECT / CONNACK with
//! devid's own packet layer ([`devid_mqtt::Codec::client`]).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::num::NonZeroU16;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use devid_mqtt::{ByteString, Codec, Connect, Packet, Protocol};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::BenchError;

/// Largest packet the client accepts.
pub const MAX_PACKET: u32 = 1 << 20;

/// Where to connect, and from which source addresses.
#[derive(Debug)]
pub struct Endpoint {
    /// The server's MQTT address.
    pub addr: SocketAddr,
    sources: Vec<Ipv4Addr>,
    next: AtomicUsize,
    /// Protocol version to speak.
    pub protocol: Protocol,
    /// Longest time one connection attempt may take.
    pub connect_timeout: Duration,
}

impl Endpoint {
    /// Connect to `addr` speaking `protocol`, rotating over `sources` source addresses
    /// 127.0.0.2, 127.0.0.3, ...
    pub fn new(addr: SocketAddr, protocol: Protocol, sources: u8) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            addr,
            sources: (0..sources.max(1))
                .map(|i| Ipv4Addr::new(127, 0, 0, 2 + i.min(250)))
                .collect(),
            next: AtomicUsize::new(0),
            protocol,
            connect_timeout: Duration::from_secs(30),
        })
    }

    /// The same server and sources, another protocol version.
    pub fn with_protocol(&self, protocol: Protocol) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            addr: self.addr,
            sources: self.sources.clone(),
            next: AtomicUsize::new(self.next.load(Ordering::Relaxed)),
            protocol,
            connect_timeout: self.connect_timeout,
        })
    }

    /// A TCP connection (TCP_NODELAY on) from the next source address.
    pub async fn tcp(&self) -> Result<TcpStream, BenchError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.sources.len();
        let socket = TcpSocket::new_v4().map_err(BenchError::io("create a client socket"))?;
        socket
            .bind(SocketAddr::V4(SocketAddrV4::new(self.sources[i], 0)))
            .map_err(BenchError::io(format!("bind {}", self.sources[i])))?;
        let tcp = socket
            .connect(self.addr)
            .await
            .map_err(BenchError::io(format!("connect to {}", self.addr)))?;
        tcp.set_nodelay(true)
            .map_err(BenchError::io("set TCP_NODELAY"))?;
        Ok(tcp)
    }
}

/// An MQTT session over TLS, after a successful CONNACK.
pub struct Conn {
    /// The TLS stream.
    pub stream: TlsStream<TcpStream>,
    /// The packet codec.
    pub codec: Codec,
    /// Bytes read and not yet decoded.
    pub rbuf: BytesMut,
    /// Bytes encoded and not yet written.
    pub wbuf: BytesMut,
    /// The server's Receive Maximum (MQTT 5 CONNACK; 65535 for 3.1.1).
    pub receive_max: u16,
    /// Whether the TLS handshake resumed a session.
    pub resumed: bool,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("receive_max", &self.receive_max)
            .field("resumed", &self.resumed)
            .finish_non_exhaustive()
    }
}

/// Open a session for device `client_id` with TLS config `tls` (which holds its certificate).
pub async fn connect(
    ep: &Endpoint,
    tls: Arc<ClientConfig>,
    client_id: &str,
    keep_alive: u16,
) -> Result<Conn, BenchError> {
    tokio::time::timeout(
        ep.connect_timeout,
        connect_inner(ep, tls, client_id, keep_alive),
    )
    .await
    .map_err(|_| BenchError::Mqtt(format!("{client_id}: connect timed out")))?
}

async fn connect_inner(
    ep: &Endpoint,
    tls: Arc<ClientConfig>,
    client_id: &str,
    keep_alive: u16,
) -> Result<Conn, BenchError> {
    let tcp = ep.tcp().await?;
    let name = ServerName::try_from("localhost")
        .map_err(|e| BenchError::Tls(format!("server name: {e}")))?;
    let stream = TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| BenchError::Tls(format!("{client_id}: handshake: {e}")))?;
    let resumed = stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let mut conn = Conn {
        stream,
        codec: Codec::client(ep.protocol, MAX_PACKET),
        rbuf: BytesMut::with_capacity(4096),
        wbuf: BytesMut::with_capacity(4096),
        receive_max: u16::MAX,
        resumed,
    };
    conn.send(Packet::Connect(Box::new(Connect {
        protocol: ep.protocol,
        client_id: ByteString::from(client_id),
        keep_alive,
        clean_start: true,
        will: None,
        has_username: false,
        has_password: false,
        session_expiry_secs: 0,
        receive_max: None,
        max_packet_size: None,
        auth_method: None,
    })))
    .await?;
    match conn.next_packet().await? {
        Packet::ConnAck { code: 0, props, .. } => {
            if ep.protocol == Protocol::V5 {
                conn.receive_max = props.receive_max.max(1);
            }
            Ok(conn)
        }
        Packet::ConnAck { code, .. } => Err(BenchError::Mqtt(format!(
            "{client_id}: CONNECT refused with code 0x{code:02x}"
        ))),
        other => Err(BenchError::Mqtt(format!(
            "{client_id}: expected CONNACK, got {}",
            packet_name(&other)
        ))),
    }
}

/// A short name of a packet, for errors (never its payload).
pub fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck { .. } => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck { .. } => "PUBACK",
        Packet::Disconnect { .. } => "DISCONNECT",
        Packet::PingResp => "PINGRESP",
        _ => "another packet",
    }
}

impl Conn {
    /// The negotiated TLS version, cipher suite and key exchange group, as text.
    pub fn tls_summary(&self) -> String {
        let c = self.stream.get_ref().1;
        let version = c
            .protocol_version()
            .map(|v| format!("{v:?}"))
            .unwrap_or_else(|| "?".into());
        let suite = c
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_else(|| "?".into());
        let group = c
            .negotiated_key_exchange_group()
            .map(|g| format!("{:?}", g.name()))
            .unwrap_or_else(|| "?".into());
        format!("{version}, {suite}, key exchange {group}")
    }

    /// Encode `p`, write everything pending and flush.
    pub async fn send(&mut self, p: Packet) -> Result<(), BenchError> {
        self.codec
            .encode(p, &mut self.wbuf)
            .map_err(|e| BenchError::Mqtt(e.to_string()))?;
        self.flush().await
    }

    /// Write and flush the pending bytes.
    pub async fn flush(&mut self) -> Result<(), BenchError> {
        if !self.wbuf.is_empty() {
            self.stream
                .write_all(&self.wbuf)
                .await
                .map_err(BenchError::io("write to the server"))?;
            self.wbuf.clear();
        }
        self.stream
            .flush()
            .await
            .map_err(BenchError::io("flush to the server"))
    }

    /// Read more bytes into the read buffer; an error when the server closed.
    pub async fn fill(&mut self) -> Result<(), BenchError> {
        let n = self
            .stream
            .read_buf(&mut self.rbuf)
            .await
            .map_err(BenchError::io("read from the server"))?;
        if n == 0 {
            return Err(BenchError::Mqtt("the server closed the connection".into()));
        }
        Ok(())
    }

    /// The next decoded packet, if a whole one is buffered.
    pub fn decode(&mut self) -> Result<Option<Packet>, BenchError> {
        self.codec
            .decode(&mut self.rbuf)
            .map_err(|e| BenchError::Mqtt(e.to_string()))
    }

    /// Wait for the next packet.
    pub async fn next_packet(&mut self) -> Result<Packet, BenchError> {
        loop {
            if let Some(p) = self.decode()? {
                return Ok(p);
            }
            self.fill().await?;
        }
    }

    /// Append a QoS 1 PUBLISH to the write buffer.
    pub fn push_publish(
        &mut self,
        topic: &ByteString,
        payload: &bytes::Bytes,
        packet_id: NonZeroU16,
    ) -> Result<(), BenchError> {
        self.codec
            .encode(
                Packet::Publish(devid_mqtt::Publish {
                    topic: topic.clone(),
                    qos: 1,
                    packet_id: Some(packet_id),
                    payload: payload.clone(),
                    retain: false,
                    dup: false,
                    msg_id: None,
                    topic_alias: None,
                }),
                &mut self.wbuf,
            )
            .map_err(|e| BenchError::Mqtt(e.to_string()))
    }

    /// DISCONNECT (normal), TLS close_notify, TCP close.
    pub async fn disconnect(mut self) -> Result<(), BenchError> {
        self.send(Packet::Disconnect { reason: 0 }).await?;
        let _ = self.stream.shutdown().await;
        Ok(())
    }
}

/// The packet id after `id` (1..=65535, wrapping).
pub fn next_packet_id(id: NonZeroU16) -> NonZeroU16 {
    NonZeroU16::new(id.get().wrapping_add(1)).unwrap_or(NonZeroU16::MIN)
}

/// The topic device `id` publishes to (allowed by devid's policy and Mosquitto's ACL).
pub fn topic_of(id: &str) -> ByteString {
    ByteString::from(format!("devices/{id}/telemetry/bench"))
}
