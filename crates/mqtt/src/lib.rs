//! devid's MQTT packet layer: a thin, stable API over the `rmqtt-codec` crate for MQTT 3.1.1
//! and MQTT 5, plus the topic rules of a devid fleet.
//!
//! * [`Codec`]: frame and decode packets from a byte buffer ([`Codec::decode`]) and encode
//!   them ([`Codec::encode`]). A server codec detects the protocol version from the CONNECT
//!   packet; a client codec is told it. Every frame is bounded by a maximum packet size that is
//!   checked on the fixed header, before the body is buffered.
//! * [`Packet`]: the packets devid uses, as plain structs with raw reason codes ([`reason`]),
//!   the same for both protocol versions (fields a version lacks are left empty).
//! * [`topic`]: MQTT topic name and filter syntax, and the per-device topic namespace
//!   (`devices/<id>/telemetry/...`, `devices/<id>/events/...`, `devices/<id>/commands/...`).
//!
//! Used by the server's ingest (and later by the device agent); the fuzz target
//! `fuzz/fuzz_targets/mqtt_packets.rs` and the mutation test `tests/mutation.rs` run this
//! parser on hostile input. Payloads are never formatted by `Debug` impls here.
#![forbid(unsafe_code)]

use std::fmt;
use std::num::{NonZeroU16, NonZeroU32};

pub use bytes::{Bytes, BytesMut};
pub use bytestring::ByteString;
use rmqtt_codec::types::QoS;
use rmqtt_codec::{v3, v5, version::ProtocolVersion, MqttCodec, MqttPacket};
use tokio_util::codec::{Decoder, Encoder};

pub mod topic;

/// Name of the MQTT 5 user property that carries a message's idempotency key.
pub const MSG_ID_PROPERTY: &str = "msg-id";

/// Longest idempotency key accepted, in bytes.
pub const MAX_MSG_ID_LEN: usize = 128;

/// MQTT protocol version of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// MQTT 3.1.1 (and 3.1).
    V311,
    /// MQTT 5.0.
    V5,
}

impl Protocol {
    /// `"3.1.1"` or `"5"`, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::V311 => "3.1.1",
            Protocol::V5 => "5",
        }
    }
}

/// Reason and return codes (MQTT 5 reason codes; `V3_*` are MQTT 3.1.1 CONNACK return codes).
pub mod reason {
    /// Success / granted QoS 0 / normal disconnection.
    pub const SUCCESS: u8 = 0x00;
    /// Granted QoS 1 (SUBACK).
    pub const GRANTED_QOS1: u8 = 0x01;
    /// Unspecified error.
    pub const UNSPECIFIED_ERROR: u8 = 0x80;
    /// Malformed packet.
    pub const MALFORMED_PACKET: u8 = 0x81;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u8 = 0x82;
    /// Implementation specific error (valid, but not accepted).
    pub const IMPLEMENTATION_SPECIFIC: u8 = 0x83;
    /// Client identifier not valid.
    pub const CLIENT_ID_NOT_VALID: u8 = 0x85;
    /// Bad user name or password (devid: credentials no longer valid).
    pub const BAD_CREDENTIALS: u8 = 0x86;
    /// Not authorized.
    pub const NOT_AUTHORIZED: u8 = 0x87;
    /// Server busy.
    pub const SERVER_BUSY: u8 = 0x89;
    /// Server shutting down.
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    /// Keep alive timeout.
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    /// Session taken over.
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    /// Topic filter invalid.
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    /// Topic name invalid.
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    /// Receive maximum exceeded.
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    /// Topic alias invalid.
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    /// Packet too large.
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    /// Quota exceeded.
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    /// Administrative action.
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    /// Retain not supported.
    pub const RETAIN_NOT_SUPPORTED: u8 = 0x9A;
    /// QoS not supported.
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
    /// Connection rate exceeded.
    pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
    /// MQTT 3.1.1 CONNACK: connection accepted.
    pub const V3_ACCEPTED: u8 = 0x00;
    /// MQTT 3.1.1 CONNACK: identifier rejected.
    pub const V3_IDENTIFIER_REJECTED: u8 = 0x02;
    /// MQTT 3.1.1 CONNACK: server unavailable.
    pub const V3_SERVER_UNAVAILABLE: u8 = 0x03;
    /// MQTT 3.1.1 CONNACK: not authorised.
    pub const V3_NOT_AUTHORIZED: u8 = 0x05;
    /// MQTT 3.1.1 SUBACK: failure.
    pub const V3_SUBACK_FAILURE: u8 = 0x80;
}

/// Errors of the packet layer. Messages never contain payload bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PacketError {
    /// The fixed header announces a packet larger than allowed.
    #[error("packet too large: {size} bytes announced, at most {max} accepted")]
    TooLarge {
        /// Announced remaining length.
        size: u32,
        /// The limit.
        max: u32,
    },
    /// The first packet is not a CONNECT of MQTT 3.1, 3.1.1 or 5.
    #[error("not an MQTT 3.1.1 or 5 CONNECT packet")]
    NotConnect,
    /// The bytes are not a valid packet.
    #[error("malformed MQTT packet: {0}")]
    Malformed(&'static str),
    /// A packet could not be encoded (a reason code the version cannot carry, or too large).
    #[error("cannot encode MQTT packet: {0}")]
    Encode(&'static str),
}

fn decode_error(e: rmqtt_codec::error::DecodeError) -> PacketError {
    use rmqtt_codec::error::DecodeError as D;
    match e {
        D::MaxSizeExceeded { size, max } => PacketError::TooLarge { size, max },
        D::InvalidProtocol | D::UnsupportedProtocolLevel => PacketError::NotConnect,
        D::InvalidLength => PacketError::Malformed("invalid length"),
        D::MalformedPacket => PacketError::Malformed("malformed packet"),
        D::ConnectReservedFlagSet => PacketError::Malformed("CONNECT reserved flag set"),
        D::InvalidConnectFlags => PacketError::Malformed("invalid CONNECT flags"),
        D::ConnAckReservedFlagSet => PacketError::Malformed("CONNACK reserved flag set"),
        D::InvalidClientId => PacketError::Malformed("invalid client id"),
        D::UnsupportedPacketType => PacketError::Malformed("unsupported packet type"),
        D::PacketIdRequired => PacketError::Malformed("packet id required"),
        D::InvalidTopicFilter => PacketError::Malformed("invalid topic filter"),
        D::InvalidTopicName => PacketError::Malformed("invalid topic name"),
        D::Utf8Error => PacketError::Malformed("invalid UTF-8"),
        D::Io(_) => PacketError::Malformed("i/o"),
    }
}

fn encode_error(e: rmqtt_codec::error::EncodeError) -> PacketError {
    use rmqtt_codec::error::EncodeError as E;
    PacketError::Encode(match e {
        E::OverMaxPacketSize { .. } => "larger than the peer's maximum packet size",
        E::InvalidLength => "invalid length",
        E::MalformedPacket => "malformed packet",
        E::PacketIdRequired => "packet id required",
        E::UnsupportedVersion => "unsupported version",
        E::Io(_) => "i/o",
    })
}

/// A last-will message announced in CONNECT.
#[derive(Clone, PartialEq, Eq)]
pub struct Will {
    /// Topic.
    pub topic: ByteString,
    /// Payload (never shown by `Debug`).
    pub payload: Bytes,
    /// QoS 0, 1 or 2.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
}

impl fmt::Debug for Will {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Will")
            .field("topic", &self.topic)
            .field("payload_len", &self.payload.len())
            .field("qos", &self.qos)
            .field("retain", &self.retain)
            .finish()
    }
}

/// CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Protocol version.
    pub protocol: Protocol,
    /// Client identifier.
    pub client_id: ByteString,
    /// Keep alive, seconds (0: none).
    pub keep_alive: u16,
    /// Clean session (3.1.1) / clean start (5).
    pub clean_start: bool,
    /// Last will.
    pub will: Option<Will>,
    /// Whether a user name was sent (devid ignores it: identity is the certificate).
    pub has_username: bool,
    /// Whether a password was sent (never kept).
    pub has_password: bool,
    /// MQTT 5 session expiry interval, seconds.
    pub session_expiry_secs: u32,
    /// MQTT 5 receive maximum of the client.
    pub receive_max: Option<u16>,
    /// MQTT 5 maximum packet size of the client.
    pub max_packet_size: Option<u32>,
    /// MQTT 5 authentication method (enhanced auth; devid refuses it).
    pub auth_method: Option<ByteString>,
}

/// Server capabilities announced in an MQTT 5 CONNACK (ignored for 3.1.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAckProps {
    /// Highest QoS the server accepts.
    pub max_qos: u8,
    /// Whether retained messages are supported.
    pub retain_available: bool,
    /// Most unacknowledged QoS 1 publishes the server accepts at once.
    pub receive_max: u16,
    /// Largest packet the server accepts.
    pub max_packet_size: Option<u32>,
    /// Keep alive the client must use, when the server overrides the client's.
    pub server_keep_alive: Option<u16>,
    /// Whether wildcard subscriptions are supported.
    pub wildcard_subscription_available: bool,
    /// A short, non-secret reason for refusals.
    pub reason_string: Option<&'static str>,
}

impl Default for ConnAckProps {
    fn default() -> Self {
        Self {
            max_qos: 1,
            retain_available: false,
            receive_max: 65_535,
            max_packet_size: None,
            server_keep_alive: None,
            wildcard_subscription_available: true,
            reason_string: None,
        }
    }
}

/// PUBLISH.
#[derive(Clone, PartialEq, Eq)]
pub struct Publish {
    /// Topic name (empty when an MQTT 5 topic alias stands for it).
    pub topic: ByteString,
    /// QoS 0, 1 or 2.
    pub qos: u8,
    /// Packet identifier (QoS > 0).
    pub packet_id: Option<NonZeroU16>,
    /// Payload (never shown by `Debug`).
    pub payload: Bytes,
    /// Retain flag.
    pub retain: bool,
    /// Duplicate delivery flag.
    pub dup: bool,
    /// MQTT 5 user property `msg-id`: the idempotency key (first one wins).
    pub msg_id: Option<ByteString>,
    /// MQTT 5 topic alias, if the client used one.
    pub topic_alias: Option<u16>,
}

impl fmt::Debug for Publish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publish")
            .field("topic", &self.topic)
            .field("qos", &self.qos)
            .field("packet_id", &self.packet_id)
            .field("payload_len", &self.payload.len())
            .field("retain", &self.retain)
            .field("dup", &self.dup)
            .field("msg_id", &self.msg_id)
            .field("topic_alias", &self.topic_alias)
            .finish()
    }
}

/// The packets devid handles. Reason codes are raw bytes (see [`reason`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Packet {
    /// CONNECT.
    Connect(Box<Connect>),
    /// CONNACK: `code` is a 3.1.1 return code or an MQTT 5 reason code.
    ConnAck {
        /// Return / reason code.
        code: u8,
        /// Session present flag.
        session_present: bool,
        /// MQTT 5 properties (encoding only; decoding leaves defaults except `max_qos`).
        props: ConnAckProps,
    },
    /// PUBLISH.
    Publish(Publish),
    /// PUBACK (reason is 0 for 3.1.1).
    PubAck {
        /// Packet identifier.
        packet_id: NonZeroU16,
        /// Reason code.
        reason: u8,
    },
    /// PUBREC.
    PubRec {
        /// Packet identifier.
        packet_id: NonZeroU16,
    },
    /// PUBREL.
    PubRel {
        /// Packet identifier.
        packet_id: NonZeroU16,
    },
    /// PUBCOMP.
    PubComp {
        /// Packet identifier.
        packet_id: NonZeroU16,
    },
    /// SUBSCRIBE: (filter, requested QoS).
    Subscribe {
        /// Packet identifier.
        packet_id: NonZeroU16,
        /// Filters with their requested QoS.
        filters: Vec<(ByteString, u8)>,
    },
    /// SUBACK: one code per filter (granted QoS, or a failure code).
    SubAck {
        /// Packet identifier.
        packet_id: NonZeroU16,
        /// Codes.
        codes: Vec<u8>,
    },
    /// UNSUBSCRIBE.
    Unsubscribe {
        /// Packet identifier.
        packet_id: NonZeroU16,
        /// Filters.
        filters: Vec<ByteString>,
    },
    /// UNSUBACK (`count` success codes in MQTT 5).
    UnsubAck {
        /// Packet identifier.
        packet_id: NonZeroU16,
        /// Number of filters acknowledged.
        count: usize,
    },
    /// PINGREQ.
    PingReq,
    /// PINGRESP.
    PingResp,
    /// DISCONNECT (reason 0 for 3.1.1).
    Disconnect {
        /// Reason code.
        reason: u8,
    },
    /// MQTT 5 AUTH (devid does not use enhanced authentication).
    Auth,
}

/// Frames, decodes and encodes MQTT packets for one connection.
#[derive(Debug)]
pub struct Codec {
    inner: MqttCodec,
    max_packet: u32,
    protocol: Option<Protocol>,
}

fn qos_of(q: QoS) -> u8 {
    q.value()
}

fn qos_from(q: u8) -> Result<QoS, PacketError> {
    match q {
        0 => Ok(QoS::AtMostOnce),
        1 => Ok(QoS::AtLeastOnce),
        2 => Ok(QoS::ExactlyOnce),
        _ => Err(PacketError::Encode("QoS above 2")),
    }
}

impl Codec {
    /// A server-side codec: detects MQTT 3.1.1 or 5 from the first packet, which must be a
    /// CONNECT. Packets whose remaining length exceeds `max_packet` are refused from the
    /// fixed header on.
    pub fn server(max_packet: u32) -> Self {
        Self {
            inner: MqttCodec::Version(rmqtt_codec::version::VersionCodec),
            max_packet: max_packet.max(16),
            protocol: None,
        }
    }

    /// A client-side codec for `protocol`.
    pub fn client(protocol: Protocol, max_packet: u32) -> Self {
        let max = max_packet.max(16);
        Self {
            inner: match protocol {
                Protocol::V311 => MqttCodec::V3(v3::Codec::new(max)),
                Protocol::V5 => MqttCodec::V5(v5::Codec::new(max, 0)),
            },
            max_packet: max,
            protocol: Some(protocol),
        }
    }

    /// The protocol, once known.
    pub fn protocol(&self) -> Option<Protocol> {
        self.protocol
    }

    /// Decode the next whole packet from `buf`, consuming its bytes. `Ok(None)`: more bytes
    /// are needed. After an error the connection must be closed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Packet>, PacketError> {
        loop {
            match self.inner.decode(buf).map_err(decode_error)? {
                None => return Ok(None),
                Some((MqttPacket::Version(v), _)) => {
                    let (codec, proto) = match v {
                        ProtocolVersion::MQTT3 => (
                            MqttCodec::V3(v3::Codec::new(self.max_packet)),
                            Protocol::V311,
                        ),
                        ProtocolVersion::MQTT5 => (
                            MqttCodec::V5(v5::Codec::new(self.max_packet, 0)),
                            Protocol::V5,
                        ),
                    };
                    self.inner = codec;
                    self.protocol = Some(proto);
                }
                Some((MqttPacket::V3(p), _)) => return from_v3(p).map(Some),
                Some((MqttPacket::V5(p), _)) => return from_v5(p).map(Some),
            }
        }
    }

    /// Append the encoding of `packet` to `dst`.
    pub fn encode(&mut self, packet: Packet, dst: &mut BytesMut) -> Result<(), PacketError> {
        match &mut self.inner {
            MqttCodec::V3(c) => c.encode(to_v3(packet)?, dst).map_err(encode_error),
            MqttCodec::V5(c) => c.encode(to_v5(packet)?, dst).map_err(encode_error),
            MqttCodec::Version(_) => Err(PacketError::Encode(
                "protocol version not known yet (no CONNECT decoded)",
            )),
        }
    }

    /// Append a PUBACK for `packet_id` with `reason` (ignored for 3.1.1, where a PUBACK
    /// always means success). The hot path: four bytes when the reason is success.
    pub fn encode_puback(
        &mut self,
        packet_id: NonZeroU16,
        reason: u8,
        dst: &mut BytesMut,
    ) -> Result<(), PacketError> {
        let id = packet_id.get().to_be_bytes();
        match self.protocol {
            Some(Protocol::V311) => {
                dst.extend_from_slice(&[0x40, 0x02, id[0], id[1]]);
                Ok(())
            }
            Some(Protocol::V5) if reason == reason::SUCCESS => {
                dst.extend_from_slice(&[0x40, 0x02, id[0], id[1]]);
                Ok(())
            }
            Some(Protocol::V5) => {
                dst.extend_from_slice(&[0x40, 0x03, id[0], id[1], reason]);
                Ok(())
            }
            None => Err(PacketError::Encode(
                "protocol version not known yet (no CONNECT decoded)",
            )),
        }
    }
}

fn from_v3(p: v3::Packet) -> Result<Packet, PacketError> {
    Ok(match p {
        v3::Packet::Connect(c) => {
            let c = *c;
            Packet::Connect(Box::new(Connect {
                protocol: Protocol::V311,
                client_id: c.client_id,
                keep_alive: c.keep_alive,
                clean_start: c.clean_session,
                will: c.last_will.map(|w| Will {
                    topic: w.topic,
                    payload: w.message,
                    qos: qos_of(w.qos),
                    retain: w.retain,
                }),
                has_username: c.username.is_some(),
                has_password: c.password.is_some(),
                session_expiry_secs: 0,
                receive_max: None,
                max_packet_size: None,
                auth_method: None,
            }))
        }
        v3::Packet::ConnectAck(a) => Packet::ConnAck {
            code: u8::from(a.return_code),
            session_present: a.session_present,
            props: ConnAckProps {
                max_qos: 2,
                ..ConnAckProps::default()
            },
        },
        v3::Packet::Publish(p) => {
            let p = *p;
            Packet::Publish(Publish {
                topic: p.topic,
                qos: qos_of(p.qos),
                packet_id: p.packet_id,
                payload: p.payload,
                retain: p.retain,
                dup: p.dup,
                msg_id: None,
                topic_alias: None,
            })
        }
        v3::Packet::PublishAck { packet_id } => Packet::PubAck {
            packet_id,
            reason: reason::SUCCESS,
        },
        v3::Packet::PublishReceived { packet_id } => Packet::PubRec { packet_id },
        v3::Packet::PublishRelease { packet_id } => Packet::PubRel { packet_id },
        v3::Packet::PublishComplete { packet_id } => Packet::PubComp { packet_id },
        v3::Packet::Subscribe {
            packet_id,
            topic_filters,
        } => Packet::Subscribe {
            packet_id,
            filters: topic_filters
                .into_iter()
                .map(|(f, q)| (f, qos_of(q)))
                .collect(),
        },
        v3::Packet::SubscribeAck { packet_id, status } => Packet::SubAck {
            packet_id,
            codes: status
                .into_iter()
                .map(|s| match s {
                    v3::SubscribeReturnCode::Success(q) => qos_of(q),
                    v3::SubscribeReturnCode::Failure => reason::V3_SUBACK_FAILURE,
                })
                .collect(),
        },
        v3::Packet::Unsubscribe {
            packet_id,
            topic_filters,
        } => Packet::Unsubscribe {
            packet_id,
            filters: topic_filters,
        },
        v3::Packet::UnsubscribeAck { packet_id } => Packet::UnsubAck {
            packet_id,
            count: 0,
        },
        v3::Packet::PingRequest => Packet::PingReq,
        v3::Packet::PingResponse => Packet::PingResp,
        v3::Packet::Disconnect => Packet::Disconnect {
            reason: reason::SUCCESS,
        },
    })
}

fn msg_id_of(props: &v5::UserProperties) -> Option<ByteString> {
    props
        .iter()
        .find(|(k, _)| &**k == MSG_ID_PROPERTY)
        .map(|(_, v)| v.clone())
}

fn from_v5(p: v5::Packet) -> Result<Packet, PacketError> {
    Ok(match p {
        v5::Packet::Connect(c) => {
            let c = *c;
            Packet::Connect(Box::new(Connect {
                protocol: Protocol::V5,
                client_id: c.client_id,
                keep_alive: c.keep_alive,
                clean_start: c.clean_start,
                will: c.last_will.map(|w| Will {
                    topic: w.topic,
                    payload: w.message,
                    qos: qos_of(w.qos),
                    retain: w.retain,
                }),
                has_username: c.username.is_some(),
                has_password: c.password.is_some(),
                session_expiry_secs: c.session_expiry_interval_secs,
                receive_max: c.receive_max.map(NonZeroU16::get),
                max_packet_size: c.max_packet_size.map(NonZeroU32::get),
                auth_method: c.auth_method,
            }))
        }
        v5::Packet::ConnectAck(a) => Packet::ConnAck {
            code: u8::from(a.reason_code),
            session_present: a.session_present,
            props: ConnAckProps {
                max_qos: qos_of(a.max_qos),
                retain_available: a.retain_available,
                receive_max: a.receive_max.get(),
                max_packet_size: a.max_packet_size,
                server_keep_alive: a.server_keepalive_sec,
                wildcard_subscription_available: a.wildcard_subscription_available,
                reason_string: None,
            },
        },
        v5::Packet::Publish(p) => {
            let p = *p;
            let (msg_id, topic_alias) = match &p.properties {
                Some(props) => (
                    msg_id_of(&props.user_properties),
                    props.topic_alias.map(NonZeroU16::get),
                ),
                None => (None, None),
            };
            Packet::Publish(Publish {
                topic: p.topic,
                qos: qos_of(p.qos),
                packet_id: p.packet_id,
                payload: p.payload,
                retain: p.retain,
                dup: p.dup,
                msg_id,
                topic_alias,
            })
        }
        v5::Packet::PublishAck(a) => Packet::PubAck {
            packet_id: a.packet_id,
            reason: u8::from(a.reason_code),
        },
        v5::Packet::PublishReceived(a) => Packet::PubRec {
            packet_id: a.packet_id,
        },
        v5::Packet::PublishRelease(a) => Packet::PubRel {
            packet_id: a.packet_id,
        },
        v5::Packet::PublishComplete(a) => Packet::PubComp {
            packet_id: a.packet_id,
        },
        v5::Packet::Subscribe(s) => Packet::Subscribe {
            packet_id: s.packet_id,
            filters: s
                .topic_filters
                .into_iter()
                .map(|(f, o)| (f, qos_of(o.qos)))
                .collect(),
        },
        v5::Packet::SubscribeAck(a) => Packet::SubAck {
            packet_id: a.packet_id,
            codes: a.status.into_iter().map(u8::from).collect(),
        },
        v5::Packet::Unsubscribe(u) => Packet::Unsubscribe {
            packet_id: u.packet_id,
            filters: u.topic_filters,
        },
        v5::Packet::UnsubscribeAck(a) => Packet::UnsubAck {
            packet_id: a.packet_id,
            count: a.status.len(),
        },
        v5::Packet::PingRequest => Packet::PingReq,
        v5::Packet::PingResponse => Packet::PingResp,
        v5::Packet::Disconnect(d) => Packet::Disconnect {
            reason: u8::from(d.reason_code),
        },
        v5::Packet::Auth(_) => Packet::Auth,
    })
}

fn to_v3(p: Packet) -> Result<v3::Packet, PacketError> {
    Ok(match p {
        Packet::Connect(c) => {
            let c = *c;
            v3::Packet::Connect(Box::new(v3::Connect {
                protocol: rmqtt_codec::types::Protocol(rmqtt_codec::types::MQTT_LEVEL_311),
                clean_session: c.clean_start,
                keep_alive: c.keep_alive,
                last_will: c
                    .will
                    .map(|w| {
                        Ok::<_, PacketError>(v3::LastWill {
                            qos: qos_from(w.qos)?,
                            retain: w.retain,
                            topic: w.topic,
                            message: w.payload,
                        })
                    })
                    .transpose()?,
                client_id: c.client_id,
                username: None,
                password: None,
                cert: None,
            }))
        }
        Packet::ConnAck {
            code,
            session_present,
            ..
        } => v3::Packet::ConnectAck(v3::ConnectAck {
            return_code: v3::ConnectAckReason::try_from(code)
                .map_err(|_| PacketError::Encode("not an MQTT 3.1.1 CONNACK return code"))?,
            session_present,
        }),
        Packet::Publish(p) => v3::Packet::Publish(Box::new(rmqtt_codec::types::Publish {
            dup: p.dup,
            retain: p.retain,
            qos: qos_from(p.qos)?,
            topic: p.topic,
            packet_id: p.packet_id,
            payload: p.payload,
            properties: None,
        })),
        Packet::PubAck { packet_id, .. } => v3::Packet::PublishAck { packet_id },
        Packet::PubRec { packet_id } => v3::Packet::PublishReceived { packet_id },
        Packet::PubRel { packet_id } => v3::Packet::PublishRelease { packet_id },
        Packet::PubComp { packet_id } => v3::Packet::PublishComplete { packet_id },
        Packet::Subscribe { packet_id, filters } => v3::Packet::Subscribe {
            packet_id,
            topic_filters: filters
                .into_iter()
                .map(|(f, q)| Ok((f, qos_from(q)?)))
                .collect::<Result<_, PacketError>>()?,
        },
        Packet::SubAck { packet_id, codes } => v3::Packet::SubscribeAck {
            packet_id,
            status: codes
                .into_iter()
                .map(|c| match c {
                    0..=2 => Ok(v3::SubscribeReturnCode::Success(qos_from(c)?)),
                    reason::V3_SUBACK_FAILURE.. => Ok(v3::SubscribeReturnCode::Failure),
                    _ => Err(PacketError::Encode("not an MQTT 3.1.1 SUBACK code")),
                })
                .collect::<Result<_, PacketError>>()?,
        },
        Packet::Unsubscribe { packet_id, filters } => v3::Packet::Unsubscribe {
            packet_id,
            topic_filters: filters,
        },
        Packet::UnsubAck { packet_id, .. } => v3::Packet::UnsubscribeAck { packet_id },
        Packet::PingReq => v3::Packet::PingRequest,
        Packet::PingResp => v3::Packet::PingResponse,
        Packet::Disconnect { .. } => v3::Packet::Disconnect,
        Packet::Auth => return Err(PacketError::Encode("AUTH does not exist in MQTT 3.1.1")),
    })
}

fn to_v5(p: Packet) -> Result<v5::Packet, PacketError> {
    Ok(match p {
        Packet::Connect(c) => {
            let c = *c;
            v5::Packet::Connect(Box::new(v5::Connect {
                clean_start: c.clean_start,
                keep_alive: c.keep_alive,
                session_expiry_interval_secs: c.session_expiry_secs,
                auth_method: None,
                auth_data: None,
                request_problem_info: true,
                request_response_info: false,
                receive_max: c.receive_max.and_then(NonZeroU16::new),
                topic_alias_max: 0,
                user_properties: Vec::new(),
                max_packet_size: c.max_packet_size.and_then(NonZeroU32::new),
                last_will: c
                    .will
                    .map(|w| {
                        Ok::<_, PacketError>(v5::LastWill {
                            qos: qos_from(w.qos)?,
                            retain: w.retain,
                            topic: w.topic,
                            message: w.payload,
                            will_delay_interval_sec: None,
                            correlation_data: None,
                            message_expiry_interval: None,
                            content_type: None,
                            user_properties: Vec::new(),
                            is_utf8_payload: None,
                            response_topic: None,
                        })
                    })
                    .transpose()?,
                client_id: c.client_id,
                username: None,
                password: None,
                cert: None,
            }))
        }
        Packet::ConnAck {
            code,
            session_present,
            props,
        } => v5::Packet::ConnectAck(Box::new(v5::ConnectAck {
            session_present,
            reason_code: v5::ConnectAckReason::try_from(code)
                .map_err(|_| PacketError::Encode("not an MQTT 5 CONNACK reason code"))?,
            max_qos: qos_from(props.max_qos)?,
            retain_available: props.retain_available,
            receive_max: NonZeroU16::new(props.receive_max).unwrap_or(NonZeroU16::MAX),
            max_packet_size: props.max_packet_size,
            server_keepalive_sec: props.server_keep_alive,
            wildcard_subscription_available: props.wildcard_subscription_available,
            subscription_identifiers_available: false,
            shared_subscription_available: false,
            topic_alias_max: 0,
            reason_string: props.reason_string.map(ByteString::from_static),
            ..v5::ConnectAck::default()
        })),
        Packet::Publish(p) => v5::Packet::Publish(Box::new(rmqtt_codec::types::Publish {
            dup: p.dup,
            retain: p.retain,
            qos: qos_from(p.qos)?,
            topic: p.topic,
            packet_id: p.packet_id,
            payload: p.payload,
            properties: Some(v5::PublishProperties {
                user_properties: p
                    .msg_id
                    .map(|m| vec![(ByteString::from_static(MSG_ID_PROPERTY), m)])
                    .unwrap_or_default(),
                topic_alias: p.topic_alias.and_then(NonZeroU16::new),
                ..v5::PublishProperties::default()
            }),
        })),
        Packet::PubAck { packet_id, reason } => v5::Packet::PublishAck(v5::PublishAck {
            packet_id,
            reason_code: v5::PublishAckReason::try_from(reason)
                .map_err(|_| PacketError::Encode("not an MQTT 5 PUBACK reason code"))?,
            properties: Vec::new(),
            reason_string: None,
        }),
        Packet::PubRec { packet_id } => v5::Packet::PublishReceived(v5::PublishAck {
            packet_id,
            reason_code: v5::PublishAckReason::Success,
            properties: Vec::new(),
            reason_string: None,
        }),
        Packet::PubRel { packet_id } => v5::Packet::PublishRelease(v5::PublishAck2 {
            packet_id,
            reason_code: v5::PublishAck2Reason::Success,
            properties: Vec::new(),
            reason_string: None,
        }),
        Packet::PubComp { packet_id } => v5::Packet::PublishComplete(v5::PublishAck2 {
            packet_id,
            reason_code: v5::PublishAck2Reason::Success,
            properties: Vec::new(),
            reason_string: None,
        }),
        Packet::Subscribe { packet_id, filters } => v5::Packet::Subscribe(v5::Subscribe {
            packet_id,
            id: None,
            user_properties: Vec::new(),
            topic_filters: filters
                .into_iter()
                .map(|(f, q)| {
                    Ok((
                        f,
                        v5::SubscriptionOptions {
                            qos: qos_from(q)?,
                            ..v5::SubscriptionOptions::default()
                        },
                    ))
                })
                .collect::<Result<_, PacketError>>()?,
        }),
        Packet::SubAck { packet_id, codes } => v5::Packet::SubscribeAck(v5::SubscribeAck {
            packet_id,
            properties: Vec::new(),
            reason_string: None,
            status: codes
                .into_iter()
                .map(|c| {
                    v5::SubscribeAckReason::try_from(c)
                        .map_err(|_| PacketError::Encode("not an MQTT 5 SUBACK reason code"))
                })
                .collect::<Result<_, PacketError>>()?,
        }),
        Packet::Unsubscribe { packet_id, filters } => v5::Packet::Unsubscribe(v5::Unsubscribe {
            packet_id,
            user_properties: Vec::new(),
            topic_filters: filters,
        }),
        Packet::UnsubAck { packet_id, count } => v5::Packet::UnsubscribeAck(v5::UnsubscribeAck {
            packet_id,
            properties: Vec::new(),
            reason_string: None,
            status: vec![v5::UnsubscribeAckReason::Success; count],
        }),
        Packet::PingReq => v5::Packet::PingRequest,
        Packet::PingResp => v5::Packet::PingResponse,
        Packet::Disconnect { reason } => v5::Packet::Disconnect(v5::Disconnect {
            reason_code: v5::DisconnectReasonCode::try_from(reason)
                .map_err(|_| PacketError::Encode("not an MQTT 5 DISCONNECT reason code"))?,
            session_expiry_interval_secs: None,
            server_reference: None,
            reason_string: None,
            user_properties: Vec::new(),
        }),
        Packet::Auth => return Err(PacketError::Encode("devid does not send AUTH")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u16) -> NonZeroU16 {
        NonZeroU16::new(n).unwrap()
    }

    fn connect(protocol: Protocol) -> Packet {
        Packet::Connect(Box::new(Connect {
            protocol,
            client_id: "dev-1".into(),
            keep_alive: 30,
            clean_start: true,
            will: None,
            has_username: false,
            has_password: false,
            session_expiry_secs: 0,
            receive_max: None,
            max_packet_size: None,
            auth_method: None,
        }))
    }

    #[test]
    fn server_detects_version_and_round_trips() {
        for proto in [Protocol::V311, Protocol::V5] {
            let mut client = Codec::client(proto, 1 << 20);
            let mut wire = BytesMut::new();
            client.encode(connect(proto), &mut wire).unwrap();
            client
                .encode(
                    Packet::Publish(Publish {
                        topic: "devices/dev-1/telemetry/t".into(),
                        qos: 1,
                        packet_id: Some(nz(7)),
                        payload: Bytes::from_static(b"hello"),
                        retain: false,
                        dup: false,
                        msg_id: Some("m-1".into()),
                        topic_alias: None,
                    }),
                    &mut wire,
                )
                .unwrap();
            // byte by byte: framing must cope with any split
            let mut server = Codec::server(1 << 20);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for b in wire.iter() {
                buf.extend_from_slice(&[*b]);
                while let Some(p) = server.decode(&mut buf).unwrap() {
                    got.push(p);
                }
            }
            assert_eq!(server.protocol(), Some(proto));
            assert_eq!(got.len(), 2);
            match &got[0] {
                Packet::Connect(c) => {
                    assert_eq!(&*c.client_id, "dev-1");
                    assert_eq!(c.protocol, proto);
                }
                other => panic!("{other:?}"),
            }
            match &got[1] {
                Packet::Publish(p) => {
                    assert_eq!(&*p.topic, "devices/dev-1/telemetry/t");
                    assert_eq!(&p.payload[..], b"hello");
                    assert_eq!(p.packet_id, Some(nz(7)));
                    let expect = (proto == Protocol::V5).then(|| ByteString::from("m-1"));
                    assert_eq!(p.msg_id, expect);
                }
                other => panic!("{other:?}"),
            }
            // server -> client acks
            let mut out = BytesMut::new();
            server.encode_puback(nz(7), 0, &mut out).unwrap();
            server
                .encode_puback(nz(8), reason::NOT_AUTHORIZED, &mut out)
                .unwrap();
            let a = client.decode(&mut out).unwrap().unwrap();
            assert_eq!(
                a,
                Packet::PubAck {
                    packet_id: nz(7),
                    reason: 0
                }
            );
            let b = client.decode(&mut out).unwrap().unwrap();
            let expect = if proto == Protocol::V5 { 0x87 } else { 0 };
            assert_eq!(
                b,
                Packet::PubAck {
                    packet_id: nz(8),
                    reason: expect
                }
            );
        }
    }

    #[test]
    fn too_large_is_refused_from_the_header() {
        let mut server = Codec::server(1024);
        let mut c = Codec::client(Protocol::V5, 1 << 20);
        let mut wire = BytesMut::new();
        c.encode(connect(Protocol::V5), &mut wire).unwrap();
        assert!(matches!(server.decode(&mut wire), Ok(Some(_))));
        // PUBLISH announcing 1 MiB; only the header has arrived
        let mut buf = BytesMut::from(&[0x32u8, 0x80, 0x80, 0x40][..]);
        assert!(matches!(
            server.decode(&mut buf),
            Err(PacketError::TooLarge { .. })
        ));
    }

    #[test]
    fn first_packet_must_be_connect() {
        let mut server = Codec::server(1024);
        let mut buf = BytesMut::from(&[0xC0u8, 0x00][..]);
        assert!(server.decode(&mut buf).is_err());
        let mut server = Codec::server(1024);
        let mut buf = BytesMut::from(&b"\x10\x0c\x00\x04MQTX\x04\x02\x00\x3c\x00\x00"[..]);
        assert_eq!(server.decode(&mut buf), Err(PacketError::NotConnect));
    }

    #[test]
    fn connack_and_suback_encode_per_version() {
        for proto in [Protocol::V311, Protocol::V5] {
            let mut server = Codec::client(proto, 1 << 16);
            let mut client = Codec::client(proto, 1 << 16);
            let mut out = BytesMut::new();
            let code = if proto == Protocol::V5 {
                reason::CLIENT_ID_NOT_VALID
            } else {
                reason::V3_IDENTIFIER_REJECTED
            };
            server
                .encode(
                    Packet::ConnAck {
                        code,
                        session_present: false,
                        props: ConnAckProps::default(),
                    },
                    &mut out,
                )
                .unwrap();
            let fail = if proto == Protocol::V5 {
                reason::NOT_AUTHORIZED
            } else {
                reason::V3_SUBACK_FAILURE
            };
            server
                .encode(
                    Packet::SubAck {
                        packet_id: nz(3),
                        codes: vec![1, fail],
                    },
                    &mut out,
                )
                .unwrap();
            match client.decode(&mut out).unwrap().unwrap() {
                Packet::ConnAck { code: c, props, .. } => {
                    assert_eq!(c, code);
                    if proto == Protocol::V5 {
                        assert_eq!(props.max_qos, 1);
                    }
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(
                client.decode(&mut out).unwrap().unwrap(),
                Packet::SubAck {
                    packet_id: nz(3),
                    codes: vec![1, fail]
                }
            );
        }
    }
}
