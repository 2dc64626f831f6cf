//! PROXY protocol version 2 (haproxy.org proxy-protocol.txt, section 2.2),
//! both ways: FluxBalancer writes a header at the start of every connection
//! it relays ([`encode_proxy`], [`encode_local`] for its own health checks),
//! and a node running with `proxy_protocol = true` reads it ([`parse`]), so
//! that the node knows the client's address. Sans-IO: addresses in, bytes
//! out; bytes in, the header's meaning and length out.
//!
//! Version 1 (the text form) is not accepted: FluxBalancer sends v2, and
//! one format means one parser to fuzz.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12-byte signature every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Version 2, command LOCAL: the balancer's own connection (health checks).
const CMD_LOCAL: u8 = 0x20;
/// Version 2, command PROXY: the connection is relayed for a client.
const CMD_PROXY: u8 = 0x21;
/// TCP over IPv4.
const FAMILY_TCP4: u8 = 0x11;
/// TCP over IPv6.
const FAMILY_TCP6: u8 = 0x21;

/// Largest header accepted, bytes: the 16-byte preamble plus addresses
/// (36 bytes for IPv6) and room for TLVs a balancer might add.
pub const HEADER_BYTES_MAX: usize = 16 + 496;

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The balancer's own connection (a health check), or an address family
    /// the node does not use: keep the socket's peer address.
    Local,
    /// A relayed connection from this client.
    Proxy { client: SocketAddr },
}

/// Why the start of a connection is not an acceptable header; the node
/// answers 400 and closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The bytes do not start with the v2 signature.
    #[error("a PROXY protocol v2 header is required")]
    Missing,
    /// Not version 2, or a command other than LOCAL or PROXY.
    #[error("unsupported PROXY protocol version or command")]
    Unsupported,
    /// The declared length is above `HEADER_BYTES_MAX` or too short for
    /// the declared addresses.
    #[error("PROXY protocol header length out of bounds")]
    BadLength,
}

/// The header for a relayed connection from `client` that arrived at
/// `local` (the balancer's listening address as the client saw it). A
/// mixed IPv4/IPv6 pair is sent as IPv6 with the IPv4 side mapped.
pub fn encode_proxy(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&SIGNATURE);
    out.push(CMD_PROXY);
    match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V4(l)) => {
            out.push(FAMILY_TCP4);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&c.ip().octets());
            out.extend_from_slice(&l.ip().octets());
            out.extend_from_slice(&c.port().to_be_bytes());
            out.extend_from_slice(&l.port().to_be_bytes());
        }
        (c, l) => {
            let v6 = |a: SocketAddr| match a {
                SocketAddr::V4(a) => a.ip().to_ipv6_mapped().octets(),
                SocketAddr::V6(a) => a.ip().octets(),
            };
            out.push(FAMILY_TCP6);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(c));
            out.extend_from_slice(&v6(l));
            out.extend_from_slice(&c.port().to_be_bytes());
            out.extend_from_slice(&l.port().to_be_bytes());
        }
    }
    out
}

/// The header for the balancer's own connections (health checks): the node
/// keeps the real peer address.
pub fn encode_local() -> Vec<u8> {
    let mut out = SIGNATURE.to_vec();
    out.extend_from_slice(&[CMD_LOCAL, 0x00, 0x00, 0x00]);
    out
}

/// Parses the header at the start of `received`. `Ok(None)`: incomplete,
/// read more. `Ok(Some((header, length)))`: the first `length` bytes were
/// the header; what follows is the client's own data.
pub fn parse(received: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let seen = received.len().min(SIGNATURE.len());
    if received[..seen] != SIGNATURE[..seen] {
        return Err(ProxyError::Missing);
    }
    if received.len() < 16 {
        return Ok(None);
    }
    let (version_command, family) = (received[12], received[13]);
    let length = 16 + u16::from_be_bytes([received[14], received[15]]) as usize;
    if version_command >> 4 != 2 || version_command & 0x0f > 1 {
        return Err(ProxyError::Unsupported);
    }
    if length > HEADER_BYTES_MAX {
        return Err(ProxyError::BadLength);
    }
    if received.len() < length {
        return Ok(None);
    }
    let body = &received[16..length];
    if version_command == CMD_LOCAL {
        return Ok(Some((ProxyHeader::Local, length)));
    }
    let client = match family {
        FAMILY_TCP4 if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([body[8], body[9]]))
        }
        FAMILY_TCP6 if body.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            let ip = Ipv6Addr::from(octets);
            let ip = ip.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(ip));
            SocketAddr::new(ip, u16::from_be_bytes([body[32], body[33]]))
        }
        FAMILY_TCP4 | FAMILY_TCP6 => return Err(ProxyError::BadLength),
        // UNSPEC, UDP and UNIX families carry no TCP client address.
        _ => return Ok(Some((ProxyHeader::Local, length))),
    };
    Ok(Some((ProxyHeader::Proxy { client }, length)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_header() -> Vec<u8> {
        let mut h = SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0, 12, 192, 0, 2, 7, 127, 0, 0, 1]);
        h.extend_from_slice(&40000u16.to_be_bytes());
        h.extend_from_slice(&9080u16.to_be_bytes());
        h
    }

    #[test]
    fn ipv4_at_every_split_then_data() {
        let mut bytes = v4_header();
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
        for cut in 0..28 {
            assert_eq!(parse(&bytes[..cut]), Ok(None), "cut {cut}");
        }
        let client = "192.0.2.7:40000".parse().unwrap();
        assert_eq!(parse(&bytes), Ok(Some((ProxyHeader::Proxy { client }, 28))));
    }

    #[test]
    fn ipv6_mapped_local_and_unspec() {
        let mut h = SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x21, 0, 36]);
        h.extend_from_slice(&Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped().octets());
        h.extend_from_slice(&[0; 16]);
        h.extend_from_slice(&[0x1f, 0x90, 0, 80]);
        assert_eq!(parse(&h), Ok(Some((ProxyHeader::Proxy { client: "10.0.0.1:8080".parse().unwrap() }, 52))));
        let mut local = SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0, 0, 0]);
        assert_eq!(parse(&local), Ok(Some((ProxyHeader::Local, 16))));
        let mut unspec = SIGNATURE.to_vec();
        unspec.extend_from_slice(&[0x21, 0x00, 0, 2, 9, 9]);
        assert_eq!(parse(&unspec), Ok(Some((ProxyHeader::Local, 18))));
    }

    #[test]
    fn refusals() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n\r\n"), Err(ProxyError::Missing));
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"), Err(ProxyError::Missing), "v1 is not accepted");
        let mut h = v4_header();
        h[12] = 0x11;
        assert_eq!(parse(&h), Err(ProxyError::Unsupported));
        let mut h = v4_header();
        h[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(parse(&h), Err(ProxyError::BadLength));
        let mut h = v4_header();
        h[15] = 4;
        assert_eq!(parse(&h[..20]), Err(ProxyError::BadLength), "too short for IPv4 addresses");
    }

    #[test]
    fn encoded_ipv4_layout() {
        let h = encode_proxy("192.0.2.7:40000".parse().unwrap(), "198.51.100.1:9080".parse().unwrap());
        assert_eq!(h.len(), 28);
        assert_eq!(&h[..12], &SIGNATURE);
        assert_eq!(&h[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&h[16..20], &[192, 0, 2, 7]);
        assert_eq!(&h[20..24], &[198, 51, 100, 1]);
        assert_eq!(&h[24..26], &40000u16.to_be_bytes());
        assert_eq!(&h[26..28], &9080u16.to_be_bytes());
    }

    #[test]
    fn what_is_encoded_parses_back() {
        for (client, local) in [
            ("192.0.2.7:40000", "198.51.100.1:9080"),
            ("[2001:db8::1]:5", "127.0.0.1:6"),
            ("10.0.0.1:8080", "[::1]:80"),
        ] {
            let client: SocketAddr = client.parse().unwrap();
            let h = encode_proxy(client, local.parse().unwrap());
            assert_eq!(parse(&h), Ok(Some((ProxyHeader::Proxy { client }, h.len()))), "{client}");
        }
        let local = encode_local();
        assert_eq!((local.len(), local[12]), (16, 0x20));
        assert_eq!(parse(&local), Ok(Some((ProxyHeader::Local, 16))));
    }
}
