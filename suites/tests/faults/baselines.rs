//! Baselines for issue 26's closing note, run by hand (ignored: two minutes):
//! scenario 1 (a 50 KB/s server stream, its client blackholed) with the
//! dead-peer timeout at 2 s, at its default (20 s), off, and with tonic alone
//! (no crate: the end is when the producer task stops). Each is bounded at
//! [`LIMIT`]; the table goes to stderr.

use std::time::{Duration, Instant};

use super::{
    lab::Netns,
    setup::{ServerKind, client, flowing, is_end_from, server},
};

/// How long a baseline waits for the stream to end.
const LIMIT: Duration = Duration::from_secs(120);

/// One row of the table.
struct Row {
    setting: &'static str,
    found_after: Option<Duration>,
    reason: String,
    established_at_end: bool,
}

fn measure(setting: &'static str, server_config: &'static str) -> Option<Row> {
    let ns = Netns::for_scenario(&format!("baseline ({setting})"))?;
    let (mut server, server_port) = server(&ns, ServerKind::Tonic, server_config);
    let (mut client, ports) = client(
        &ns,
        ServerKind::Tonic,
        server_port,
        1,
        "call=server_stream size=5000 interval_ms=100",
    );
    flowing(&mut client, 1, 15_000);
    let bare = server_config.contains("guard=bare");
    let blackholed = ns.blackhole(&ports);
    let found = server.wait_until(blackholed + LIMIT, |line| match bare {
        true => line.kind == "producers" && line.num("live") == 0,
        false => is_end_from(line, ports[0]),
    });
    Some(Row {
        setting,
        found_after: found.as_ref().map(|line| line.at - blackholed),
        reason: found.map_or_else(
            || "-".into(),
            |line| match bare {
                true => "producer stopped".into(),
                false => line.str("reason").to_string(),
            },
        ),
        established_at_end: ns.established(server_port, ports[0]),
    })
}

#[test]
#[ignore = "a baseline for the closing note: about two minutes; run with --ignored --nocapture"]
fn baseline_blackholed_50kbps_stream() {
    let settings = [
        ("dead_peer_timeout 2 s", "dead_peer=2000"),
        ("dead_peer_timeout default (20 s)", "dead_peer=default"),
        ("dead_peer_timeout(None)", "dead_peer=off"),
        ("tonic alone (no crate)", "guard=bare"),
    ];
    let started = Instant::now();
    let rows: Vec<Option<Row>> = std::thread::scope(|scope| {
        let running: Vec<_> = settings
            .iter()
            .map(|&(setting, config)| scope.spawn(move || measure(setting, config)))
            .collect();
        running
            .into_iter()
            .map(|run| run.join().expect("a baseline panicked"))
            .collect()
    });
    eprintln!("\nscenario 1 (50 KB/s server stream, client blackholed), idle timeout 30 s:");
    eprintln!("| setting | stream end seen after | reason | server socket ESTABLISHED then |");
    eprintln!("|---|---|---|---|");
    for row in rows.into_iter().flatten() {
        let after = row.found_after.map_or_else(
            || format!("> {} s (not seen)", LIMIT.as_secs()),
            |d| format!("{:.2} s", d.as_secs_f64()),
        );
        eprintln!(
            "| {} | {after} | {} | {} |",
            row.setting, row.reason, row.established_at_end
        );
    }
    eprintln!("(measured in {:.0} s)", started.elapsed().as_secs_f64());
}
