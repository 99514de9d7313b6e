//! The scenarios of issue 26, each in a network namespace of its own, with a
//! dead-peer timeout of 2 s and a stream idle timeout of 30 s (so that it
//! cannot mask a dead peer) unless the scenario is about idle.

use std::{
    collections::{BTreeMap, HashSet},
    time::{Duration, Instant},
};

use super::{
    lab::Netns,
    setup::{
        BOUND, DEAD_PEER, STARTUP, ServerKind, client, count_at, flowing, is_close_from,
        is_end_from, ms_after, server,
    },
};

/// The dead-peer setting the scenarios give the guards, as the roles read
/// it: 2 s, or `FAULTS_DEAD_PEER` (`off`, `default` or milliseconds), which
/// shows which assertions fail without the setting.
fn dead_peer_setting() -> String {
    std::env::var("FAULTS_DEAD_PEER").unwrap_or_else(|_| DEAD_PEER.as_millis().to_string())
}

fn dead_peer() -> String {
    format!("dead_peer={}", dead_peer_setting())
}

/// Scenario 1 and its variants: one server stream of `size` bytes every
/// `interval_ms`, its client blackholed. The stream must end with
/// `peer_unreachable` within the bound, the connection close with the same
/// reason, and the server's socket of that connection be gone by then.
fn blackholed_stream_ends_within_bound(
    scenario: &str,
    kind: ServerKind,
    size: u64,
    interval_ms: u64,
) {
    let Some(ns) = Netns::for_scenario(scenario) else {
        return;
    };
    let (mut server, server_port) = server(
        &ns,
        kind,
        &format!("{} chunk={size} interval_ms={interval_ms}", dead_peer()),
    );
    let config = format!("call=server_stream size={size} interval_ms={interval_ms}");
    let (mut client, ports) = client(&ns, kind, server_port, 1, &config);
    let client_port = ports[0];
    flowing(&mut client, 1, 3 * size);
    assert!(
        ns.established(server_port, client_port),
        "ss sees the server's socket before the fault"
    );

    let blackholed = ns.blackhole(&[client_port]);
    let Some(end) = server.wait_until(blackholed + BOUND, |line| is_end_from(line, client_port))
    else {
        panic!(
            "{scenario}: the stream did not end within {BOUND:?} of the blackhole (socket still established: {}); the server said:\n{}",
            ns.established(server_port, client_port),
            server.said()
        );
    };
    let gone = !ns.established(server_port, client_port);
    eprintln!(
        "MEASURED {scenario}: stream ended `{}` {} ms after the blackhole; server socket gone: {gone}",
        end.str("reason"),
        ms_after(&end, blackholed)
    );
    assert_eq!(end.str("reason"), "peer_unreachable", "{}", end.json);
    assert!(
        gone,
        "the server's socket to :{client_port} is still ESTABLISHED when its stream ended"
    );
    let close = server.expect(BOUND, "connection close", |line| {
        is_close_from(line, client_port)
    });
    assert_eq!(close.str("reason"), "peer_unreachable", "{}", close.json);
    assert!(
        close.at <= blackholed + BOUND,
        "the connection closed {} ms after the blackhole",
        ms_after(&close, blackholed)
    );
}

/// Issue 26's first measurement: 50 KB/s, found after 86.7 s before the fix.
#[test]
fn blackholed_client_of_a_50kbps_stream_is_found_within_the_bound() {
    blackholed_stream_ends_within_bound("blackhole_50kbps", ServerKind::Tonic, 5_000, 100);
}

/// A trickle (a price feed, a log tail) fills the buffers slowest of all.
#[test]
fn blackholed_client_of_a_1kbps_stream_is_found_within_the_bound() {
    blackholed_stream_ends_within_bound("blackhole_1kbps", ServerKind::Tonic, 100, 100);
}

/// The same under axum: a streaming body behind the stream guard, each
/// connection served by the connection guard.
#[test]
fn blackholed_client_of_an_axum_stream_is_found_within_the_bound() {
    blackholed_stream_ends_within_bound("axum_blackhole", ServerKind::Axum, 5_000, 100);
}

/// 50 streams on 10 connections, all blackholed by one rule: each stream
/// ends exactly once, with `peer_unreachable`, within the bound.
#[test]
fn fifty_streams_on_ten_blackholed_connections_each_end_once_within_the_bound() {
    let Some(ns) = Netns::for_scenario("blackhole_50_streams") else {
        return;
    };
    let (mut server, server_port) = server(&ns, ServerKind::Tonic, &dead_peer());
    let config = "streams=5 call=server_stream size=5000 interval_ms=100";
    let (mut client, ports) = client(&ns, ServerKind::Tonic, server_port, 10, config);
    flowing(&mut client, 50, 15_000);

    let blackholed = ns.blackhole(&ports);
    let ports: HashSet<u16> = ports.into_iter().collect();
    let lines = server.collect_until(blackholed + BOUND);
    let mut ends: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for line in lines
        .iter()
        .filter(|line| line.kind == "end" && ports.contains(&line.peer_port()))
    {
        ends.entry(line.num("id"))
            .or_default()
            .push(line.str("reason").to_string());
    }
    let latest = lines
        .iter()
        .filter(|line| line.kind == "end" && ports.contains(&line.peer_port()))
        .map(|line| ms_after(line, blackholed))
        .max()
        .unwrap_or(0);
    eprintln!(
        "MEASURED blackhole_50_streams: {} streams ended, the last {latest} ms after the blackhole",
        ends.len()
    );
    assert_eq!(
        ends.len(),
        50,
        "streams that ended within {BOUND:?}: {ends:?}"
    );
    for (id, reasons) in &ends {
        assert_eq!(reasons, &["peer_unreachable"], "stream {id}");
    }
    let closes = lines
        .iter()
        .filter(|line| line.kind == "conn" && line.str("event") == "connection_closed");
    let closes: Vec<&str> = closes
        .filter(|line| ports.contains(&line.peer_port()))
        .map(|line| line.str("reason"))
        .collect();
    assert_eq!(
        closes, ["peer_unreachable"; 10],
        "connection closes within {BOUND:?}"
    );
}

/// A quiet bidi stream (nothing in flight either way) under a blackhole,
/// with a 2 s idle timeout as well: it ends by whichever comes first, the
/// idle timeout or the keepalive probes, within 2 s + 1 s.
#[test]
fn quiet_blackholed_stream_still_ends_at_its_idle_timeout() {
    let Some(ns) = Netns::for_scenario("blackhole_quiet_bidi") else {
        return;
    };
    let (mut server, server_port) = server(
        &ns,
        ServerKind::Tonic,
        &format!("{} idle_ms=2000", dead_peer()),
    );
    let (mut client, ports) = client(&ns, ServerKind::Tonic, server_port, 1, "call=bidi_quiet");
    client.expect(STARTUP, "the echo", |line| line.kind == "quiet");

    let blackholed = ns.blackhole(&ports);
    let Some(end) = server.wait_until(blackholed + BOUND, |line| is_end_from(line, ports[0]))
    else {
        panic!(
            "the quiet stream did not end within {BOUND:?}; the server said:\n{}",
            server.said()
        );
    };
    eprintln!(
        "MEASURED blackhole_quiet_bidi: stream ended `{}` {} ms after the blackhole",
        end.str("reason"),
        ms_after(&end, blackholed)
    );
    assert!(
        ["idle_timeout", "peer_unreachable"].contains(&end.str("reason")),
        "{}",
        end.json
    );
}

/// A healthy client on another connection goes on streaming while its
/// neighbour is blackholed and found dead: no error, no end, data flowing
/// after the neighbour's connection was aborted.
#[test]
fn healthy_client_streams_on_while_its_neighbour_is_blackholed() {
    let Some(ns) = Netns::for_scenario("blackhole_neighbour") else {
        return;
    };
    let (mut server, server_port) = server(&ns, ServerKind::Tonic, &dead_peer());
    let config = "call=server_stream size=5000 interval_ms=100";
    let (mut doomed, doomed_ports) = client(&ns, ServerKind::Tonic, server_port, 1, config);
    let (mut healthy, healthy_ports) = client(&ns, ServerKind::Tonic, server_port, 1, config);
    flowing(&mut doomed, 1, 15_000);
    flowing(&mut healthy, 1, 15_000);

    let blackholed = ns.blackhole(&doomed_ports);
    let after = blackholed + BOUND + Duration::from_secs(1);
    healthy.collect_until(after);
    doomed.collect_until(after);
    let lines = server.collect_until(after);

    // The fault was real: the blackholed client stopped receiving.
    let (doomed_then, doomed_now) = (
        count_at(&mut doomed, 0, blackholed + Duration::from_millis(500)),
        count_at(&mut doomed, 0, after),
    );
    assert_eq!(
        doomed_then, doomed_now,
        "the blackholed client still received data"
    );
    let errors: Vec<String> = healthy
        .seen()
        .iter()
        .filter(|l| l.kind == "stream_end")
        .map(|l| l.json.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "the healthy client's stream ended: {errors:?}"
    );
    let ended: Vec<String> = lines
        .iter()
        .filter(|l| is_end_from(l, healthy_ports[0]))
        .map(|l| l.json.to_string())
        .collect();
    assert!(
        ended.is_empty(),
        "the server ended the healthy client's stream: {ended:?}"
    );
    // Still flowing after the neighbour's connection was aborted (about
    // 2 s in): at least half its 50 KB/s over the last second.
    let (before, last) = (
        count_at(&mut healthy, 0, blackholed + BOUND),
        count_at(&mut healthy, 0, after),
    );
    eprintln!(
        "MEASURED blackhole_neighbour: the healthy client received {} bytes in the last second",
        last - before
    );
    assert!(
        last - before >= 25_000,
        "the healthy client received {} bytes in the last second",
        last - before
    );
}

/// A RST from the path (a middlebox that lost the connection's state): the
/// peer is gone for sure, and said so: `cancelled`, within a second, not
/// `peer_unreachable`.
#[test]
fn reset_from_the_path_ends_the_stream_fast_as_cancelled() {
    let Some(ns) = Netns::for_scenario("reset_from_path") else {
        return;
    };
    let (mut server, server_port) = server(&ns, ServerKind::Tonic, &dead_peer());
    let (mut client, ports) = client(
        &ns,
        ServerKind::Tonic,
        server_port,
        1,
        "call=server_stream size=5000 interval_ms=100",
    );
    flowing(&mut client, 1, 15_000);
    let reset = ns.reset(&ports);
    assert_ends_fast_as_cancelled("reset_from_path", &mut server, ports[0], reset);
}

/// A client process killed with SIGKILL: its kernel closes the connection,
/// and the stream ends `cancelled` within a second.
#[test]
fn killed_client_ends_the_stream_fast_as_cancelled() {
    let Some(ns) = Netns::for_scenario("killed_client") else {
        return;
    };
    let (mut server, server_port) = server(&ns, ServerKind::Tonic, &dead_peer());
    let (mut client, ports) = client(
        &ns,
        ServerKind::Tonic,
        server_port,
        1,
        "call=server_stream size=5000 interval_ms=100",
    );
    flowing(&mut client, 1, 15_000);
    let killed = client.kill();
    assert_ends_fast_as_cancelled("killed_client", &mut server, ports[0], killed);
}

fn assert_ends_fast_as_cancelled(
    scenario: &str,
    server: &mut super::lab::Proc,
    client_port: u16,
    fault: Instant,
) {
    let fast = Duration::from_secs(1);
    let Some(end) = server.wait_until(fault + fast, |line| is_end_from(line, client_port)) else {
        panic!(
            "{scenario}: the stream did not end within {fast:?}; the server said:\n{}",
            server.said()
        );
    };
    eprintln!(
        "MEASURED {scenario}: stream ended `{}` {} ms after the fault",
        end.str("reason"),
        ms_after(&end, fault)
    );
    assert_eq!(end.str("reason"), "cancelled", "{}", end.json);
    let close = server.expect(fast, "connection close", |line| {
        is_close_from(line, client_port)
    });
    assert_ne!(close.str("reason"), "peer_unreachable", "{}", close.json);
}

/// A slow link (tbf at 20 KB/s both ways, the server producing 50 KB/s, so
/// the link is saturated and the send buffer full) but a live client: its
/// data is acknowledged, slowly, so nothing may call it dead over three
/// dead-peer timeouts.
#[test]
fn slow_but_alive_client_is_not_taken_for_dead() {
    let Some(ns) = Netns::for_scenario("slow_link") else {
        return;
    };
    ns.rate_limit("160kbit");
    let (mut server, server_port) = server(&ns, ServerKind::Tonic, &dead_peer());
    let (mut client, ports) = client(
        &ns,
        ServerKind::Tonic,
        server_port,
        1,
        "call=server_stream size=5000 interval_ms=100",
    );
    let start = flowing(&mut client, 1, 5_000).at;

    let watched = start + 3 * DEAD_PEER;
    let lines = server.collect_until(watched);
    let ended: Vec<String> = lines
        .iter()
        .filter(|l| is_end_from(l, ports[0]))
        .map(|l| l.json.to_string())
        .collect();
    assert!(
        ended.is_empty(),
        "the slow client's stream ended: {ended:?}"
    );
    let errors: Vec<String> = client
        .seen()
        .iter()
        .filter(|l| l.kind == "stream_end")
        .map(|l| l.json.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "the slow client saw its stream end: {errors:?}"
    );
    assert!(
        ns.established(server_port, ports[0]),
        "the slow client's connection is gone"
    );
    // Alive (data in the last two seconds) and slow (the link really held
    // it well under the 50 KB/s the server produces).
    let (first, before, last) = (
        count_at(&mut client, 0, start),
        count_at(&mut client, 0, watched - DEAD_PEER),
        count_at(&mut client, 0, watched),
    );
    let rate = (last - first) as f64 / (watched - start).as_secs_f64();
    eprintln!(
        "MEASURED slow_link: the client received {rate:.0} B/s over {:?}, not cut",
        watched - start
    );
    assert!(
        last > before,
        "the slow client received nothing in the last {DEAD_PEER:?}"
    );
    assert!(rate < 30_000.0, "the link was not slow: {rate:.0} B/s");
}

/// The client side: a tonic client uploading through
/// `GoawayNotice::connector` with a 2 s dead-peer timeout, its server
/// blackholed: the call fails within the bound.
#[test]
fn blackholed_server_ends_a_guarded_clients_upload_within_the_bound() {
    let Some(ns) = Netns::for_scenario("client_upload_blackhole") else {
        return;
    };
    // The server keeps the kernel's defaults: only the client can find out.
    let (_server, server_port) = server(&ns, ServerKind::Tonic, "dead_peer=off");
    let config = format!(
        "call=upload size=5000 interval_ms=100 notice={}",
        dead_peer_setting()
    );
    let (mut client, ports) = client(&ns, ServerKind::Tonic, server_port, 1, &config);
    flowing(&mut client, 1, 15_000);

    let blackholed = ns.blackhole(&ports);
    let Some(end) = client.wait_until(blackholed + BOUND, |line| line.kind == "stream_end") else {
        panic!(
            "the upload did not end within {BOUND:?} of the blackhole; the client said:\n{}",
            client.said()
        );
    };
    eprintln!(
        "MEASURED client_upload_blackhole: the call failed {} ms after the blackhole: {}",
        ms_after(&end, blackholed),
        end.str("error")
    );
    assert_eq!(end.json["ok"], false, "{}", end.json);
}
