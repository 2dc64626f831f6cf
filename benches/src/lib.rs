//! Criterion micro-benchmarks of FluxNode's hot paths live in
//! `benches/hot_paths.rs`; run them with `cargo bench -p fluxnode-benches`.
//! CI runs them in quick mode (`cargo bench -- --test`): compiled and run
//! once each, never timed as a pass/fail check.
//!
//! `benches/cluster_scale.rs` is a model, not a criterion benchmark: the
//! cluster's ownership and hand-off code at 1,000 members
//! (`cargo bench -p fluxnode-benches --bench cluster_scale`).
//!
//! # Layout
//! - `benches/hot_paths.rs`: frame and envelope encoding, frame decoding,
//!   request parsing, history append and replay, topic hashing, fan-out
//!   enqueue into subscriber queues.
