//! PROXY protocol version 2 (haproxy.org proxy-protocol.txt, section 2.2),
//! read at the start of every connection when the node runs behind
//! FluxBalancer with `proxy_protocol = true`, so that the node knows the
//! client's address. Sans-IO: bytes in, the header's meaning and length out.
//!
//! Version 1 (the text form) is not accepted: FluxBalancer sends v2, and
//! one format means one parser to fuzz.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12-byte signature every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

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
    if version_command & 0x0f == 0 {
        return Ok(Some((ProxyHeader::Local, length)));
    }
    let client = match family {
        0x11 if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([body[8], body[9]]))
        }
        0x21 if body.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            let ip = Ipv6Addr::from(octets);
            let ip = ip.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(ip));
            SocketAddr::new(ip, u16::from_be_bytes([body[32], body[33]]))
        }
        0x11 | 0x21 => return Err(ProxyError::BadLength),
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
}
