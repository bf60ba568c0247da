//! The PROXY protocol, version 2 (HAProxy's binary header), as a load balancer in TCP mode
//! sends it before the client's bytes: who the client really is. Only peers the operator
//! trusts (`proxy_protocol.trusted`) may send it; from anyone else it is never parsed.
//!
//! [`parse`] is the strict parser (fuzzed: `fuzz/fuzz_targets/proxy_header.rs`); [`Trusted`]
//! is the configured list of address ranges.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12-byte signature every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The fixed part: signature, version/command, family/protocol, length.
pub const FIXED_LEN: usize = 16;
/// Longest address-and-TLV part accepted (HAProxy sends well under this).
pub const MAX_BODY_LEN: usize = 512;

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The bytes do not start with the v2 signature.
    #[error("no PROXY protocol v2 header from a trusted proxy")]
    NoHeader,
    /// Version other than 2, or a command other than LOCAL/PROXY.
    #[error("unsupported PROXY protocol version or command")]
    Unsupported,
    /// The length field is larger than [`MAX_BODY_LEN`] or smaller than the addresses.
    #[error("PROXY protocol header has a bad length")]
    BadLength,
}

/// What the header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A connection the proxy made itself (health checks): use the real peer address.
    Local,
    /// A relayed client: its address and port.
    Proxied(SocketAddr),
    /// A relayed connection of a family we do not use (UNIX, UNSPEC): the real peer address.
    Unknown,
}

/// The length of the whole header given its 16 fixed bytes.
pub fn header_len(fixed: &[u8; FIXED_LEN]) -> Result<usize, ProxyError> {
    if fixed[..12] != SIGNATURE {
        return Err(ProxyError::NoHeader);
    }
    let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if len > MAX_BODY_LEN {
        return Err(ProxyError::BadLength);
    }
    Ok(FIXED_LEN + len)
}

/// Parse a whole header (exactly [`header_len`] bytes).
pub fn parse(bytes: &[u8]) -> Result<Header, ProxyError> {
    let fixed: &[u8; FIXED_LEN] = bytes
        .get(..FIXED_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or(ProxyError::NoHeader)?;
    let total = header_len(fixed)?;
    if bytes.len() != total {
        return Err(ProxyError::BadLength);
    }
    let body = &bytes[FIXED_LEN..];
    let (version, command) = (fixed[12] >> 4, fixed[12] & 0x0f);
    if version != 2 {
        return Err(ProxyError::Unsupported);
    }
    match command {
        0 => return Ok(Header::Local),
        1 => {}
        _ => return Err(ProxyError::Unsupported),
    }
    let (family, protocol) = (fixed[13] >> 4, fixed[13] & 0x0f);
    if protocol != 1 {
        // only TCP (STREAM) is relayed here
        return Ok(Header::Unknown);
    }
    match family {
        1 => {
            let a = body.get(..12).ok_or(ProxyError::BadLength)?;
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            let port = u16::from_be_bytes([a[8], a[9]]);
            Ok(Header::Proxied(SocketAddr::new(IpAddr::V4(ip), port)))
        }
        2 => {
            let a = body.get(..36).ok_or(ProxyError::BadLength)?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&a[..16]);
            let port = u16::from_be_bytes([a[32], a[33]]);
            Ok(Header::Proxied(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(octets)),
                port,
            )))
        }
        _ => Ok(Header::Unknown),
    }
}

/// A v2 PROXY header for a TCP connection from `src` to `dst` (what HAProxy's
/// `send-proxy-v2` writes; for tests and tools).
pub fn encode(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = SIGNATURE.to_vec();
    out.push(0x21);
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
    }
    out
}

/// Address ranges whose connections carry a PROXY header (`proxy_protocol.trusted`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trusted(Vec<(IpAddr, u8)>);

impl Trusted {
    /// Parse `a.b.c.d/n` and `v6/n` ranges (a bare address is a /32 or /128).
    pub fn parse(ranges: &[String]) -> Result<Self, String> {
        let mut out = Vec::new();
        for r in ranges {
            let (ip, bits) = match r.split_once('/') {
                Some((ip, bits)) => (ip, Some(bits)),
                None => (r.as_str(), None),
            };
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| format!("{r}: not an IP address range"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let bits = match bits {
                Some(b) => b
                    .parse::<u8>()
                    .ok()
                    .filter(|b| *b <= max)
                    .ok_or_else(|| format!("{r}: the prefix length must be 0 to {max}"))?,
                None => max,
            };
            out.push((ip, bits));
        }
        Ok(Self(out))
    }

    /// Whether no range is configured (PROXY headers are then never read).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` is in a trusted range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        self.0.iter().any(|(net, bits)| match (net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(&n.octets(), &a.octets(), *bits),
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(&n.octets(), &a.octets(), *bits),
            _ => false,
        })
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let full = usize::from(bits / 8);
    let rest = bits % 8;
    if a[..full] != b[..full] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    (a[full] & mask) == (b[full] & mask)
}

/// Read exactly one v2 header from `r` (never a byte more: the client's TLS follows).
pub async fn read_from<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Result<Header, ProxyError> {
    use tokio::io::AsyncReadExt;
    let mut fixed = [0u8; FIXED_LEN];
    r.read_exact(&mut fixed)
        .await
        .map_err(|_| ProxyError::NoHeader)?;
    let total = header_len(&fixed)?;
    let mut all = fixed.to_vec();
    all.resize(total, 0);
    r.read_exact(&mut all[FIXED_LEN..])
        .await
        .map_err(|_| ProxyError::BadLength)?;
    parse(&all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_v4_and_v6() {
        let src: SocketAddr = "127.0.0.77:40000".parse().unwrap_or_else(|e| panic!("{e}"));
        let dst: SocketAddr = "127.0.0.1:8443".parse().unwrap_or_else(|e| panic!("{e}"));
        let h = encode(src, dst);
        let fixed: [u8; 16] = h[..16].try_into().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(header_len(&fixed), Ok(h.len()));
        assert_eq!(parse(&h), Ok(Header::Proxied(src)));
        let src6: SocketAddr = "[2001:db8::7]:5".parse().unwrap_or_else(|e| panic!("{e}"));
        let dst6: SocketAddr = "[2001:db8::1]:8883"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parse(&encode(src6, dst6)), Ok(Header::Proxied(src6)));
    }

    #[test]
    fn junk_is_refused_and_local_uses_the_peer() {
        assert_eq!(parse(b"\x16\x03\x01hello tls"), Err(ProxyError::NoHeader));
        let mut local = SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local), Ok(Header::Local));
        let mut v1 = SIGNATURE.to_vec();
        v1.extend_from_slice(&[0x11, 0x11, 0, 0]);
        assert_eq!(parse(&v1), Err(ProxyError::Unsupported));
        let mut short = SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert_eq!(parse(&short), Err(ProxyError::BadLength));
        let mut huge = SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        let fixed: [u8; 16] = huge[..16].try_into().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(header_len(&fixed), Err(ProxyError::BadLength));
    }

    #[test]
    fn trusted_ranges() {
        let t = Trusted::parse(&["127.0.0.1/32".into(), "10.1.0.0/16".into(), "::1".into()])
            .unwrap_or_else(|e| panic!("{e}"));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap_or_else(|e| panic!("{e}"));
        assert!(t.contains(ip("127.0.0.1")));
        assert!(!t.contains(ip("127.0.0.2")));
        assert!(t.contains(ip("10.1.200.3")));
        assert!(!t.contains(ip("10.2.0.1")));
        assert!(t.contains(ip("::1")));
        assert!(t.contains(ip("::ffff:127.0.0.1")));
        assert!(Trusted::parse(&["127.0.0.1/33".into()]).is_err());
        assert!(Trusted::parse(&["nope".into()]).is_err());
        assert!(Trusted::default().is_empty());
    }
}
