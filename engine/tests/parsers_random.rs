//! The fuzz targets' invariants, run in CI on the seed corpus split at every
//! byte and on seeded random mutations of it (libFuzzer itself runs from
//! `fuzz/`, outside CI). No parser may panic on any input.

use bytes::{Bytes, BytesMut};
use proto::{http, native, proxy_protocol, ws};

const MUTATIONS_PER_SEED: usize = 20_000;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = format!("{}/../fuzz/corpus/{target}", env!("CARGO_MANIFEST_DIR"));
    let mut seeds: Vec<Vec<u8>> =
        std::fs::read_dir(&dir).unwrap().map(|e| std::fs::read(e.unwrap().path()).unwrap()).collect();
    assert!(!seeds.is_empty(), "no seeds in {dir}");
    seeds.sort();
    seeds
}

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(5) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 => v.truncate(rng.below(v.len() + 1)),
            3 => {
                let i = rng.below(v.len() + 1);
                v.insert(i, rng.next() as u8);
            }
            _ => {
                let copy = v.clone();
                v.extend_from_slice(&copy[..rng.below(copy.len() + 1)]);
            }
        }
    }
    v
}

fn ws_decode(input: &[u8], split: usize) {
    let split = split.min(input.len());
    let mut decoder = ws::Decoder::new(4096);
    let mut buf = BytesMut::new();
    for piece in [&input[..split], &input[split..]] {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match decoder.decode(&mut buf) {
                Ok(Some(_)) => assert!(buf.len() < before, "an event must consume bytes"),
                Ok(None) => break,
                Err(e) => {
                    assert!(matches!(e.close_code(), 1002 | 1007 | 1009));
                    return;
                }
            }
        }
    }
}

#[test]
fn ws_decoder_survives_splits_and_mutations() {
    let mut rng = Rng(0x5eed_0001);
    for seed in corpus("ws_decoder") {
        let frames = &seed[1..];
        for split in 0..=frames.len() {
            ws_decode(frames, split);
        }
        for _ in 0..MUTATIONS_PER_SEED {
            let m = mutate(&mut rng, frames);
            let split = rng.below(m.len() + 1);
            ws_decode(&m, split);
        }
    }
}

#[test]
fn http_head_survives_mutations() {
    let mut rng = Rng(0x5eed_0002);
    for seed in corpus("http_head") {
        for cut in 0..=seed.len() {
            let _ = http::parse_head(&seed[..cut]);
        }
        for _ in 0..MUTATIONS_PER_SEED {
            let m = mutate(&mut rng, &seed);
            if let Ok(Some((head, len))) = http::parse_head(&m) {
                assert!(len <= m.len());
                let _ = http::route(&head.method, &head.path);
            }
        }
    }
}

#[test]
fn native_requests_survive_mutations() {
    let mut rng = Rng(0x5eed_0003);
    for seed in corpus("native_request") {
        for _ in 0..MUTATIONS_PER_SEED {
            let m = mutate(&mut rng, &seed);
            let _ = native::parse_text(&m);
            let _ = native::parse_binary(&Bytes::from(m));
        }
    }
}

#[test]
fn proxy_headers_survive_splits_and_mutations() {
    let mut rng = Rng(0x5eed_0004);
    for seed in corpus("proxy_header") {
        let (_, len) = proxy_protocol::parse(&seed).expect("seeds are valid").expect("seeds are complete");
        for cut in 0..len {
            assert_eq!(proxy_protocol::parse(&seed[..cut]), Ok(None), "cut {cut}");
        }
        for _ in 0..MUTATIONS_PER_SEED {
            let m = mutate(&mut rng, &seed);
            if let Ok(Some((_, len))) = proxy_protocol::parse(&m) {
                assert!(len <= m.len());
            }
        }
    }
}
