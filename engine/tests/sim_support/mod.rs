//! What the seeded simulations share: the random source, and the seeds
//! and steps they run (`SIM_SEED`, `SIM_SEEDS`, `SIM_STEPS`).

/// SplitMix64: small, seeded, reproducible.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    /// A number below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// An environment variable's number, or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Runs `run(seed, steps)` for `SIM_SEED` alone, or for seeds 0 to
/// `SIM_SEEDS` (default `seeds`), each of `SIM_STEPS` steps (default
/// `steps`).
pub fn run_seeds(seeds: u64, steps: u64, run: impl Fn(u64, u64)) {
    let steps = env_or("SIM_STEPS", steps);
    if let Ok(seed) = std::env::var("SIM_SEED") {
        return run(seed.parse().expect("SIM_SEED is a number"), steps);
    }
    for seed in 0..env_or("SIM_SEEDS", seeds) {
        run(seed, steps);
    }
}
