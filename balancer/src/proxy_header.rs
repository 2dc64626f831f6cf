//! PROXY protocol version 2 headers towards nodes (haproxy.org
//! proxy-protocol.txt, section 2.2), so that a node sees the client's
//! address instead of the balancer's. Sans-IO: addresses in, bytes out.

use std::net::SocketAddr;

/// The 12-byte signature every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Version 2, command PROXY: the connection is relayed for a client.
const CMD_PROXY: u8 = 0x21;
/// Version 2, command LOCAL: the balancer's own connection (health checks).
const CMD_LOCAL: u8 = 0x20;
/// TCP over IPv4.
const FAMILY_TCP4: u8 = 0x11;
/// TCP over IPv6.
const FAMILY_TCP6: u8 = 0x21;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_layout() {
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
    fn ipv6_and_mixed_and_local() {
        let h = encode_proxy("[2001:db8::1]:5".parse().unwrap(), "127.0.0.1:6".parse().unwrap());
        assert_eq!(h.len(), 52);
        assert_eq!(&h[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(&h[32..48], &"127.0.0.1".parse::<std::net::Ipv4Addr>().unwrap().to_ipv6_mapped().octets());
        assert_eq!(encode_local().len(), 16);
        assert_eq!(encode_local()[12], 0x20);
    }
}
