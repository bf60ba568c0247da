//! Deterministic mutation test of the packet and topic parsers (the stand-in for the
//! coverage-guided `fuzz/fuzz_targets/mqtt_packets.rs` in the normal test suite): valid
//! MQTT 3.1.1 and 5 streams are mutated (bit flips, byte changes, truncation, insertion,
//! duplication, length-field damage) and fed to the server codec in random chunks. The parser
//! must never panic, never hand out a packet larger than its limit, and every PUBLISH it
//! accepts must obey the topic rules exactly as the policy reads them.
#![allow(clippy::unwrap_used)]

use std::num::NonZeroU16;

use devid_mqtt::topic::{self, Kind};
use devid_mqtt::{Bytes, BytesMut, Codec, Connect, Packet, Protocol, Publish, Will};

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % (n.max(1) as u64)) as usize
    }
}

const MAX: u32 = 4096;

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for proto in [Protocol::V311, Protocol::V5] {
        let mut c = Codec::client(proto, 1 << 20);
        let mut b = BytesMut::new();
        c.encode(
            Packet::Connect(Box::new(Connect {
                protocol: proto,
                client_id: "dev-1".into(),
                keep_alive: 30,
                clean_start: true,
                will: Some(Will {
                    topic: "devices/dev-1/events/offline".into(),
                    payload: Bytes::from_static(b"gone"),
                    qos: 1,
                    retain: false,
                }),
                has_username: false,
                has_password: false,
                session_expiry_secs: 0,
                receive_max: Some(10),
                max_packet_size: Some(4096),
                auth_method: None,
            })),
            &mut b,
        )
        .unwrap();
        for (i, t) in [
            "devices/dev-1/telemetry/temp",
            "devices/dev-2/telemetry/temp",
            "devices/dev-1/commands/x",
            "devices/dev-1/events/a/b",
        ]
        .iter()
        .enumerate()
        {
            c.encode(
                Packet::Publish(Publish {
                    topic: (*t).into(),
                    qos: u8::try_from(i % 2).unwrap(),
                    packet_id: NonZeroU16::new(u16::try_from(i % 2).unwrap() * 7),
                    payload: Bytes::from(vec![b'p'; 10 + i]),
                    retain: false,
                    dup: false,
                    msg_id: Some(format!("m-{i}").into()),
                    topic_alias: None,
                }),
                &mut b,
            )
            .unwrap();
        }
        c.encode(
            Packet::Subscribe {
                packet_id: NonZeroU16::new(3).unwrap(),
                filters: vec![
                    ("devices/dev-1/commands/#".into(), 1),
                    ("devices/+/commands/#".into(), 0),
                ],
            },
            &mut b,
        )
        .unwrap();
        c.encode(
            Packet::Unsubscribe {
                packet_id: NonZeroU16::new(4).unwrap(),
                filters: vec!["devices/dev-1/commands/#".into()],
            },
            &mut b,
        )
        .unwrap();
        c.encode(Packet::PingReq, &mut b).unwrap();
        c.encode(Packet::Disconnect { reason: 0 }, &mut b).unwrap();
        out.push(b.to_vec());
    }
    out
}

fn mutate(rng: &mut Rng, data: &mut Vec<u8>) {
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        if data.is_empty() {
            data.push(rng.next() as u8);
            continue;
        }
        let i = rng.below(data.len());
        match rng.below(8) {
            0 => data[i] ^= 1 << rng.below(8),
            1 => data[i] = rng.next() as u8,
            2 => data.truncate(i),
            3 => data.insert(i, rng.next() as u8),
            4 => {
                let end = (i + 1 + rng.below(16)).min(data.len());
                let chunk = data[i..end].to_vec();
                let at = rng.below(data.len());
                data.splice(at..at, chunk);
            }
            5 => data[i] = [0x00, 0x7f, 0x80, 0xff, b'+', b'#', b'/'][rng.below(7)],
            6 => {
                // damage a varint length: continuation bits everywhere
                for b in data.iter_mut().skip(i).take(4) {
                    *b |= 0x80;
                }
            }
            _ => {
                let end = (i + rng.below(8)).min(data.len());
                data.drain(i..end);
            }
        }
    }
}

/// Feed `data` in random chunks; returns the packets decoded before the first error.
fn decode_all(rng: &mut Rng, data: &[u8]) -> Vec<Packet> {
    let mut codec = Codec::server(MAX);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let n = 1 + rng.below(64);
        let end = (pos + n).min(data.len());
        buf.extend_from_slice(&data[pos..end]);
        pos = end;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(p)) => out.push(p),
                Ok(None) => break,
                Err(_) => return out,
            }
        }
    }
    out
}

fn check(p: &Packet) {
    match p {
        Packet::Publish(pb) => {
            assert!(pb.payload.len() <= MAX as usize);
            assert!(pb.qos <= 2);
            let t: &str = &pb.topic;
            if topic::may_publish("dev-1", t) {
                // exactly what the policy means: the own telemetry or events subtree
                let parsed = topic::parse_device_topic(t).unwrap();
                assert_eq!(parsed.device, "dev-1");
                assert!(matches!(parsed.kind, Kind::Telemetry | Kind::Events));
                assert!(
                    t.starts_with("devices/dev-1/telemetry")
                        || t.starts_with("devices/dev-1/events")
                );
                assert!(!t.contains(['+', '#', '\0']));
                assert!(t.len() <= topic::MAX_TOPIC_LEN);
            }
        }
        Packet::Subscribe { filters, .. } => {
            for (f, q) in filters {
                assert!(*q <= 2);
                if topic::may_subscribe("dev-1", f) {
                    assert!(f.starts_with("devices/dev-1/commands"), "{f:?}");
                    let rest = &f["devices/dev-1/commands".len()..];
                    assert!(rest.is_empty() || rest.starts_with('/'), "{f:?}");
                }
            }
        }
        _ => {}
    }
}

#[test]
fn mutated_streams_never_panic_and_never_widen_access() {
    let seeds = seeds();
    let mut rng = Rng(0x00de_71d0_0000_0001);
    // the unmutated seeds decode completely
    for s in &seeds {
        let got = decode_all(&mut rng, s);
        assert_eq!(got.len(), 9, "{got:?}");
        got.iter().for_each(check);
    }
    let mut accepted = 0usize;
    for i in 0..30_000 {
        let mut data = seeds[i % seeds.len()].clone();
        mutate(&mut rng, &mut data);
        let got = decode_all(&mut rng, &data);
        accepted += got.len();
        got.iter().for_each(check);
    }
    assert!(
        accepted > 10_000,
        "mutations too destructive to test anything: {accepted}"
    );
}

#[test]
fn random_topics_never_escape_the_namespace() {
    let mut rng = Rng(42);
    let alphabet: &[u8] = b"devices/dev-1dev-2telemetryeventscommands+#\0/a-";
    for _ in 0..200_000 {
        let len = rng.below(48);
        let bytes: Vec<u8> = (0..len)
            .map(|_| alphabet[rng.below(alphabet.len())])
            .collect();
        let Ok(t) = std::str::from_utf8(&bytes) else {
            continue;
        };
        if topic::may_publish("dev-1", t) {
            assert!(
                t == "devices/dev-1/telemetry"
                    || t == "devices/dev-1/events"
                    || t.starts_with("devices/dev-1/telemetry/")
                    || t.starts_with("devices/dev-1/events/"),
                "{t:?}"
            );
            assert!(!t.contains(['+', '#', '\0']), "{t:?}");
        }
        if topic::may_subscribe("dev-1", t) {
            assert!(
                t == "devices/dev-1/commands" || t.starts_with("devices/dev-1/commands/"),
                "{t:?}"
            );
        }
    }
}
