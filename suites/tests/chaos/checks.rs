//! What a round checks and reports once its streams have ended.

use std::{collections::BTreeMap, sync::Once, time::Duration};

use tokio::{
    task::JoinSet,
    time::{Instant, timeout},
};
use tonic::Code;
use tower_stream_guard::{
    ConnectionEnd, ConnectionEvent, ConnectionGuard, EndEvent, EndReason, GuardStats,
    StreamGuardLayer,
};

use crate::{
    CHAOS_PANIC,
    fates::{Connection, Fate, end_of},
    support::PATIENCE,
};

/// What one round measured.
#[derive(Debug, Default)]
pub(crate) struct RoundReport {
    pub(crate) streams: usize,
    pub(crate) connections: usize,
    pub(crate) by_fate: BTreeMap<String, usize>,
    /// Streams and connections served by the second runtime.
    pub(crate) second_runtime: (usize, usize),
    /// Streams and connections per transport.
    pub(crate) by_transport: BTreeMap<String, (usize, usize)>,
    /// Tasks alive on the doomed runtime when it was shut down.
    pub(crate) doomed_tasks: usize,
}

/// Keeps the panics this file causes out of the test output (hundreds a
/// round); every other panic still reports.
pub(crate) fn quiet_chaos_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied());
            if !message.is_some_and(|m| m.starts_with(CHAOS_PANIC)) {
                report(info);
            }
        }));
    });
}

/// Waits for every client task of `tasks`; each that read its stream to the
/// end must have seen what its fate implies.
pub(crate) async fn check_clients(
    tasks: &mut JoinSet<(Fate, Option<Code>)>,
    fail: &impl Fn(&str) -> String,
) {
    let outcomes = timeout(PATIENCE, async {
        let mut outcomes = Vec::new();
        while let Some(done) = tasks.join_next().await {
            outcomes.push(done.expect("client task"));
        }
        outcomes
    })
    .await
    .unwrap_or_else(|_| panic!("{}", fail("client tasks did not finish")));
    for (fate, code) in outcomes {
        if let Some(code) = code {
            assert!(
                fate.client_sees(code),
                "{}",
                fail(&format!("client code of {fate:?}: {code:?}"))
            );
        }
    }
}

/// Resident memory of this process, Linux only (0 elsewhere).
pub(crate) fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

pub(crate) fn print(label: &str, report: &RoundReport, seed: u64) {
    eprintln!(
        "{label} seed {seed}: {} streams on {} connections ({} streams on {} connections on the second runtime; (streams, connections) per transport {:?}; {} tasks dropped with the doomed runtime); {:?}; rss {} MiB",
        report.streams,
        report.connections,
        report.second_runtime.0,
        report.second_runtime.1,
        report.by_transport,
        report.doomed_tasks,
        report.by_fate,
        rss_bytes() >> 20
    );
}

/// The server's end events: one per stream, none twice, and on each
/// connection the reasons (and refusing caps' limits) its fates imply.
pub(crate) fn check_events(
    connections: &[Connection],
    events: &[EndEvent],
    all: &[Fate],
    fail: &impl Fn(&str) -> String,
) {
    assert_eq!(events.len(), all.len(), "{}", fail("one event per stream"));
    let mut ids: Vec<u64> = events.iter().map(|e| e.id().get()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), events.len(), "{}", fail("an event twice"));
    for connection in connections {
        let mut expected: Vec<String> = connection.fates.iter().map(|f| f.end()).collect();
        let mut got: Vec<String> = events
            .iter()
            .filter(|e| connection.tie.owns(e))
            .map(|e| end_of(e.reason(), e.cap_limit()))
            .collect();
        expected.sort();
        got.sort();
        assert_eq!(
            got,
            expected,
            "{}",
            fail(&format!("ends on {}", connection.describe()))
        );
    }
}

/// The guard's counters against the plan: ended streams per reason (each
/// cap's refusals included) as the fates imply.
pub(crate) fn check_stats(stats: &GuardStats, all: &[Fate], fail: &impl Fn(&str) -> String) {
    assert_eq!(stats.active(), 0, "{}", fail("stats active"));
    assert_eq!(
        stats.ended_total(),
        all.len() as u64,
        "{}",
        fail("stats total")
    );
    let mut by_reason: BTreeMap<String, (EndReason, u64)> = BTreeMap::new();
    for fate in all {
        by_reason
            .entry(fate.reason().to_string())
            .or_insert((fate.reason(), 0))
            .1 += 1;
    }
    for (name, (reason, expected)) in by_reason {
        assert_eq!(
            stats.ended(reason),
            expected,
            "{}",
            fail(&format!("streams ended as {name}"))
        );
    }
}

/// The connection guard's events: each connection closed once, having
/// carried every stream of its own (refused ones too, whatever the
/// transport); stalled readers' connections closed as stalled.
pub(crate) fn check_connection_events(
    connections: &[Connection],
    seen: &[ConnectionEvent],
    fail: &impl Fn(&str) -> String,
) {
    for connection in connections {
        let closed: Vec<&ConnectionEvent> = seen
            .iter()
            .filter(|e| e.end().is_some() && connection.tie.owns_connection(e))
            .collect();
        let what = connection.describe();
        assert_eq!(
            closed.len(),
            1,
            "{}",
            fail(&format!("closes of {what}: {closed:?}"))
        );
        assert_eq!(
            closed[0].streams(),
            connection.fates.len() as u64,
            "{}",
            fail(&format!("streams of {what}"))
        );
        if connection.fates[0] == Fate::StalledReader {
            assert_eq!(
                closed[0].end(),
                Some(ConnectionEnd::Stalled),
                "{}",
                fail(&format!("end of {what}"))
            );
        }
    }
}

/// Waits, at most [`PATIENCE`], until neither guard holds anything: no cap
/// slot or count-table entry in any cap set, no stream record, no timer
/// filing, no connection entry or state. The last drops of a round (a
/// connection task's, a runtime's) may still be under way when its tasks
/// are gone; a leak never ends.
pub(crate) async fn check_nothing_held(
    guard: &StreamGuardLayer,
    connections: &ConnectionGuard,
    fail: &impl Fn(&str) -> String,
) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (streams, conns) = (guard.holdings(), connections.holdings());
        if streams.is_empty() && conns.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            fail(&format!(
                "held after the round, {PATIENCE:?} after its last task: {streams}; {conns}"
            ))
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
