//! The soak: chaos rounds back to back, with memory watched.

use std::time::Duration;

use tokio::time::Instant;

use crate::{
    checks::{print, rss_bytes},
    round, seed,
};

/// How much resident memory the soak may gain after its warm-up: in a
/// minute's soak the allocator still climbs (9.5 MiB over three rounds
/// once, at load 8 on 2 cores), the 10-minute soak is flat after about 30
/// rounds (0 KiB), so past [`SOAK_SETTLED_ROUNDS`] the bound is tight.
/// Stream leaks are the holdings' to catch, every round; this catches
/// what no holding counts.
const SOAK_RSS_GROWTH: u64 = 32 << 20;
const SOAK_RSS_GROWTH_SETTLED: u64 = 8 << 20;
const SOAK_SETTLED_ROUNDS: u64 = 120;

/// The soak: rounds back to back for `CHAOS_SOAK_SECS` seconds (default
/// 600), with half as many streams again per round. Every round checks
/// that nothing is held once it is over (the `test-view` holdings); and
/// resident memory, once the first quarter of the soak (and two rounds at
/// least) has warmed the allocator up, may grow by at most
/// [`SOAK_RSS_GROWTH`]. CI runs a minute of it (`.ci/run`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a soak: CHAOS_SOAK_SECS=600 cargo test --all-features --test chaos -- --ignored"]
async fn soak() {
    let seconds: u64 = std::env::var("CHAOS_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let seed = seed();
    eprintln!("soak: CHAOS_SEED={seed}, {seconds} s");
    let started = Instant::now();
    let end = started + Duration::from_secs(seconds);
    let mut rounds = 0u64;
    let mut streams = 0;
    // Resident memory once the allocator has warmed up, and the most since.
    let mut warm_rss = None;
    let mut peak_rss = 0;
    while Instant::now() < end {
        let report = round(seed.wrapping_add(rounds), 3).await;
        streams += report.streams;
        rounds += 1;
        let rss = rss_bytes();
        match warm_rss {
            None if rounds >= 2 && started.elapsed() * 4 >= Duration::from_secs(seconds) => {
                warm_rss = Some(rss);
            }
            Some(_) => peak_rss = peak_rss.max(rss),
            None => {}
        }
        // Every round of a short soak, every tenth of a long one.
        if seconds < 300 || rounds.is_multiple_of(10) {
            print(
                &format!("soak round {}", rounds - 1),
                &report,
                seed.wrapping_add(rounds - 1),
            );
        }
    }
    let warm = warm_rss.unwrap_or_else(rss_bytes);
    let growth = peak_rss.saturating_sub(warm);
    eprintln!(
        "soak: {rounds} rounds, {streams} streams; rss {} MiB after warm-up, grew {} KiB since",
        warm >> 20,
        growth >> 10
    );
    let bound = if rounds >= SOAK_SETTLED_ROUNDS {
        SOAK_RSS_GROWTH_SETTLED
    } else {
        SOAK_RSS_GROWTH
    };
    assert!(
        growth < bound,
        "CHAOS_SEED={seed}: memory grew by {} KiB after warm-up ({rounds} rounds)",
        growth >> 10
    );
}
