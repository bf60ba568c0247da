//! Fuzz devid's MQTT packet layer (devid-mqtt over rmqtt-codec) as the server runs it: the
//! input is a byte stream from a client, fed in chunks whose sizes come from the first byte.
//! Decoding must never panic; every decoded PUBLISH / SUBSCRIBE is run through the topic
//! rules, and what they allow must really be inside the device's own namespace. Whatever the
//! server would answer (PUBACK, SUBACK, DISCONNECT) must encode.
#![no_main]

use devid_mqtt::topic;
use devid_mqtt::{reason, BytesMut, Codec, Packet};
use libfuzzer_sys::fuzz_target;

const MAX: u32 = 64 * 1024;

/// A valid MQTT 3.1.1 CONNECT for client `dev-1`.
const CONNECT_V311: &[u8] = b"\x10\x11\x00\x04MQTT\x04\x02\x00\x3c\x00\x05dev-1";
/// A valid MQTT 5 CONNECT for client `dev-1`.
const CONNECT_V5: &[u8] = b"\x10\x12\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x05dev-1";

fuzz_target!(|data: &[u8]| {
    // First byte: low 6 bits = chunk size of the reads; high 2 bits = start with a valid
    // 3.1.1 CONNECT (1), a valid 5 CONNECT (2), or nothing (0, 3), so the fuzzer reaches the
    // post-CONNECT packets without a seed corpus.
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first & 0x3f).max(1);
    let prefix: &[u8] = match first >> 6 {
        1 => CONNECT_V311,
        2 => CONNECT_V5,
        _ => b"",
    };
    let stream = [prefix, rest].concat();
    let mut codec = Codec::server(MAX);
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let p = match codec.decode(&mut buf) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(_) => return,
            };
            match p {
                Packet::Publish(pb) => {
                    assert!(pb.payload.len() <= MAX as usize);
                    let t: &str = &pb.topic;
                    if topic::may_publish("dev-1", t) {
                        assert!(
                            t.starts_with("devices/dev-1/telemetry")
                                || t.starts_with("devices/dev-1/events")
                        );
                        assert!(!t.contains(['+', '#', '\0']));
                    }
                    if let Some(pid) = pb.packet_id {
                        codec
                            .encode_puback(pid, reason::NOT_AUTHORIZED, &mut out)
                            .unwrap();
                    }
                }
                Packet::Subscribe { packet_id, filters } => {
                    let codes: Vec<u8> = filters
                        .iter()
                        .map(|(f, q)| {
                            if topic::may_subscribe("dev-1", f) {
                                assert!(f.starts_with("devices/dev-1/commands"));
                                (*q).min(1)
                            } else {
                                reason::NOT_AUTHORIZED
                            }
                        })
                        .collect();
                    let _ = codec.encode(Packet::SubAck { packet_id, codes }, &mut out);
                }
                Packet::Connect(_) => {
                    let _ = codec.encode(Packet::PingResp, &mut out);
                }
                _ => {}
            }
        }
    }
    let _ = codec.encode(
        Packet::Disconnect {
            reason: reason::PROTOCOL_ERROR,
        },
        &mut out,
    );
});
