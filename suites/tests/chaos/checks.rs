//! What a round checks and reports once its streams have ended.

use std::{collections::BTreeMap, sync::Once};

use tokio::{task::JoinSet, time::timeout};
use tonic::Code;

use crate::{CHAOS_PANIC, fates::Fate, support::PATIENCE};

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
