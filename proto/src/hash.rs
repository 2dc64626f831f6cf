//! The hash functions the node and the balancer agree on: stable across
//! processes, versions and machines (topic placement and Maglev tables must
//! come out the same everywhere), so no seeded hasher here.

/// 64-bit FNV-1a: a topic's owner shard is `fnv1a(name) % shards`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// SplitMix64's finaliser: every input bit moves about half the output
/// bits, so nearby inputs (node addresses that differ in one digit,
/// consecutive counters) spread evenly.
pub fn avalanche(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// FNV-1a followed by [`avalanche`]: for keys that differ little (the
/// balancer's Maglev table over node addresses and routing keys).
pub fn spread(bytes: &[u8]) -> u64 {
    avalanche(fnv1a(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(avalanche(0), 0);
        assert_ne!(spread(b"10.0.0.1:8080") >> 60, spread(b"10.0.0.2:8080") >> 60);
    }
}
