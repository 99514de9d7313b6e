//! `examples/make_before_break.rs` over loopback: the client hears of
//! instance A's drain through GOAWAY while its stream still runs, moves to
//! instance B, and loses no message of the feed.

#![cfg(feature = "tonic")]

#[allow(dead_code)]
#[path = "../examples/make_before_break.rs"]
mod example;

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_switches_before_the_cut_and_loses_nothing() {
    let report = tokio::time::timeout(Duration::from_secs(30), example::run())
        .await
        .expect("the scenario finishes")
        .expect("the scenario runs");
    eprintln!("{report:?}");
    assert_eq!(report.lost, 0, "{report:?}");
    assert!(report.received > 0);
    // Long before the old instance's 5 s grace would have cut the stream.
    assert!(report.switch < Duration::from_secs(2), "{report:?}");
    assert!(report.notice_latency < Duration::from_secs(2), "{report:?}");
}
