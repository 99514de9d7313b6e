//! Chaos: rounds of hundreds of streams over many loopback connections, each
//! stream given a random fate, in front of real tonic servers on three tokio
//! runtimes, over TCP, TLS and Unix sockets. After every round: nothing
//! active, exactly one end event per stream with the reason (and refusing
//! cap's limit) its fate implies, checked per connection, and the guard's
//! counters per reason as the plan says; each connection closed once by the
//! connection guard having carried exactly its streams; nothing held (the
//! `test-view` holdings: no cap slot or count-table entry in any cap set,
//! the routes' included, no stream record, no timer filing, no connection
//! entry or state); no task left on any runtime; and memory not growing
//! from round to round.
//!
//! The caps really fill, every round, and refuse exactly the streams the
//! plan says (`plan.rs`): the layer's per-connection cap (a connection of
//! [`MAX_PER_CONNECTION`] silent holders, then more), a route's per-peer cap
//! (two connections' holders), a route's total (holders spread over two
//! connections, then more on a later one), and a route's per-connection cap
//! (the capped groups). The layer's total is set, so every stream takes a
//! slot of it, but never filled: how many streams are open at once depends
//! on timing.
//!
//! Every connection goes through a small proxy (`transport.rs`), which can
//! forward, freeze (a half-open peer: nothing moves, nothing closes) or
//! vanish (both sockets dropped, as when a client process dies). Over TCP
//! and TLS the proxy's outbound address is what the server sees as the
//! peer, which ties each end event to its connection; a Unix socket has no
//! peer address, and its events are tied by the connection guard's id for
//! the connection (the guard layer's connection key), read from the
//! guard's opened event when the proxy dials (connections are set up one
//! at a time).
//!
//! The transports, drawn per connection whatever its fates: TCP; TLS end to
//! end between the client (tonic, or hyper for bodyless requests) and the
//! application's own tokio-rustls acceptor in front of the server, with the
//! connection guard wrapping the TCP stream under the TLS (drawn only with
//! the crate's `tls` feature, without which the guard cannot identify those
//! connections); a Unix socket from the client (tonic through
//! `connect_with_connector`) to the proxy and from the proxy to the
//! server's `UnixListener`, with the connection guard giving the identity.
//! Unix-socket streams stay off the route with a per-peer cap, which
//! refuses streams with no peer address.
//!
//! The fates: completes; client cancels; silent (nobody sends a thing);
//! outlives its lifetime; stalled reader (alone on its connection: unread
//! data blocks the connection's flow-control window; the connection guard
//! must close the connection as stalled); half-open peer; vanished peer;
//! refused by a cap (a per-connection cap, so each connection, TLS or Unix,
//! must be counted apart; a per-peer cap; a total); holds a cap's slot
//! until the drain; cut by a drain started mid-run; the handler
//! panics before answering; the response body panics mid-stream; a bodyless
//! request (an HTTP/2 `GET` with END_STREAM on its headers, from a hyper
//! client) on a route with a request idle timeout, answered by a stream that
//! moves for longer than that timeout and then completes; and dies with its
//! runtime (below).
//!
//! The panics come from [`ChaosLayer`], a test-only layer between the guard
//! and the tonic routes, on requests tagged `x-chaos`; the bodyless requests
//! go to [`Ticker`], a plain tower service served under a gRPC-style path.
//!
//! About a third of the connections, whatever their fates, go to a second
//! tonic server on a second runtime (its own thread, one worker) behind a
//! clone of the same guard layer; that runtime is shut down at the end of
//! each round once it has no task left.
//!
//! A third runtime is doomed: its server gets the round's first connection
//! and first streams (busy ones), so the guard's stream sweeper and the
//! connection guard's ticker start there. Once every stream is open it is
//! shut down with its tasks alive, while streams that only those timers
//! can end (silent, half-open, stalled, past their lifetime) are open on
//! the other runtimes: they must still end on time with their reasons, and
//! the stalled readers' connections must still close as stalled. The doomed
//! streams end as their tasks are dropped: cancelled.
//!
//! Servers listen through [`Listener`] and the proxy reaches them through
//! [`Target`]; an end event is tied to its connection through [`Tie`].
//!
//! ```text
//! cargo test --all-features --test chaos                                   # 3 rounds, seed from the clock
//! CHAOS_SEED=42 cargo test --all-features --test chaos                     # replay a seed
//! CHAOS_SOAK_SECS=600 cargo test --all-features --test chaos -- --ignored  # the 10-minute soak
//! ```
//!
//! The seed is printed when a round fails.

// Some connections are Unix sockets.
#![cfg(unix)]

#[path = "../../../examples/common/mod.rs"]
mod common;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::EchoService;
use tokio::{
    sync::broadcast,
    task::JoinSet,
    time::{Instant, timeout},
};
use tower_stream_guard::{ConnectionGuard, Drain, EndEvent, RoutePolicy, StreamGuardLayer};

#[allow(dead_code)]
#[path = "../../../tests/support/mod.rs"]
mod support;
use support::{PATIENCE, wait_for_no_tasks, wait_until};

const IDLE: Duration = Duration::from_millis(500);
const LIFETIME: Duration = Duration::from_secs(1);
const GRACE: Duration = Duration::from_millis(300);
/// Replies of the streams that must look busy to the idle timeout.
const BUSY_INTERVAL_MS: u32 = 100;
/// The per-connection cap of streams marked `capped`.
const CAP: usize = 4;
/// The layer's per-connection cap: one connection per round has this many
/// streams that hold until the drain, and then some it refuses; no other
/// has as many streams.
const MAX_PER_CONNECTION: usize = 64;
/// The per-peer cap of streams marked `held-peer`: two connections (over
/// TCP or TLS: a Unix socket has no peer address) fill it.
const MAX_PER_PEER: usize = 8;
/// The idle timeout of the routes whose streams hold slots until the drain
/// (`held`, `held-peer`, `scarce`): longer than any round, so that holding
/// costs no traffic.
const HELD_IDLE: Duration = Duration::from_secs(600);
/// The layer's total cap: counted (every stream takes a slot), never
/// filled: how many streams are open at once across a round depends on
/// timing, so a refusal could not be predicted. The scarce route's total
/// fills instead.
const MAX_TOTAL: usize = 100_000;
/// The total cap of streams marked `scarce`: the round's scarce holders
/// fill it and the streams after them are refused.
const SCARCE: usize = 6;
/// The request idle timeout of the [`Ticker`] route: its bodyless requests
/// must outlive it several times over.
const REQUEST_IDLE: Duration = Duration::from_millis(200);
/// The [`Ticker`]'s response: `TICKS` frames, one every `TICK`: 700 ms of
/// moving response, 3.5 request idle timeouts.
const TICKS: u32 = 7;
const TICK: Duration = Duration::from_millis(100);
/// Data frames a `body-panic` response forwards before its body panics.
const FRAMES_BEFORE_BODY_PANIC: u32 = 2;
/// Every panic this file causes starts with this, and only these are kept
/// quiet.
const CHAOS_PANIC: &str = "chaos:";
/// How long the connection guard lets a stalled reader's connection stay
/// after its stream's guard fired. Short enough that the connection closes
/// as stalled before the drain would close it (the drain starts after the
/// stalled reader's stream ended, and closes connections its grace plus a
/// second later); long enough that a connection whose streams the drain
/// cuts by the dozen, each stalled until hyper polls its body for the
/// trailers, is not closed as stalled when a loaded machine leaves hyper's
/// task waiting (at 100 ms, clients of the floods' streams read `Unknown`
/// instead of the drain's `UNAVAILABLE` now and then on a 2-core machine at
/// load 6).
const STALLED_GRACE: Duration = Duration::from_millis(500);

mod checks;
mod fates;
mod plan;
mod server;
mod soak;
mod transport;

use checks::{
    RoundReport, check_clients, check_connection_events, check_events, check_nothing_held,
    check_stats, print, quiet_chaos_panics, rss_bytes,
};
use fates::{Client, Connection, Fate, Rng, open};
use plan::{Planned, plan};
use server::{SecondRuntime, Server, serve};
use transport::{Listener, ProxyMode, SocketDir, Tie, Transport, proxy};

/// Runs one round; panics (naming the seed) on any broken invariant.
pub(crate) async fn round(seed: u64, scale: usize) -> RoundReport {
    quiet_chaos_panics();
    let mut rng = Rng(seed);
    let events: Arc<Mutex<Vec<EndEvent>>> = Arc::default();
    let fail = |what: &str| format!("CHAOS_SEED={seed}: {what}");
    // The connections left after the cut close a second later: enough for a
    // client on a loaded machine (CI beside other builds) to read the cut's
    // UNAVAILABLE trailers before its connection goes (at 200 ms, a drained
    // client once read `Unknown`: the close came first).
    let drain = Drain::with_close_delay(Duration::from_secs(1));
    // Closes the connections of stalled readers soon after their streams'
    // guards fire, and what hyper would keep open past the drain: the
    // connections of frozen peers. Its events name each connection's id
    // (the tie of every stream to its connection) and count its streams.
    let connection_guard = ConnectionGuard::builder()
        .stalled_grace(STALLED_GRACE)
        .event_capacity(1 << 14)
        .drain(&drain)
        .build()
        .expect("valid configuration");
    let mut connection_events = connection_guard.subscribe();
    let mut seen_connection_events = Vec::new();
    let guard = {
        let events = Arc::clone(&events);
        StreamGuardLayer::builder()
            .idle_timeout(IDLE)
            .max_streams_per_connection(MAX_PER_CONNECTION)
            .max_streams(MAX_TOTAL)
            .route_when(
                |r| r.headers().get("x-fate").is_some_and(|v| v == "plain"),
                RoutePolicy::new().max_streams_per_peer(100_000),
            )
            // The floods' holders: silent until the drain cuts them.
            .route_when(
                |r| r.headers().get("x-fate").is_some_and(|v| v == "held"),
                RoutePolicy::new().idle_timeout(HELD_IDLE),
            )
            .route_when(
                |r| r.headers().get("x-fate").is_some_and(|v| v == "held-peer"),
                RoutePolicy::new()
                    .idle_timeout(HELD_IDLE)
                    .max_streams_per_peer(MAX_PER_PEER),
            )
            .route_when(
                |r| r.headers().get("x-fate").is_some_and(|v| v == "scarce"),
                RoutePolicy::new()
                    .idle_timeout(HELD_IDLE)
                    .max_streams(SCARCE),
            )
            .route_when(
                |r| r.headers().get("x-fate").is_some_and(|v| v == "lifetime"),
                RoutePolicy::new().max_lifetime(LIFETIME),
            )
            .route_when(
                |r| r.headers().get("x-fate").is_some_and(|v| v == "capped"),
                RoutePolicy::new().max_streams_per_connection(CAP),
            )
            .route_prefix(
                "/chaos.Ticker/",
                RoutePolicy::new().request_idle_timeout(REQUEST_IDLE),
            )
            .drain(&drain)
            .on_end(move |event| events.lock().unwrap().push(event.clone()))
            .build()
            .expect("valid configuration")
    };
    let service = EchoService::new();
    let dir = SocketDir::new(seed);
    // Servers behind clones of the one guard, one per transport: on this
    // runtime, on a second runtime, and (TCP only) on the doomed runtime.
    let second_runtime = SecondRuntime::start("chaos-second-runtime");
    let doomed_runtime = SecondRuntime::start("chaos-doomed-runtime");
    let all_transports = [Transport::Tcp, Transport::Tls, Transport::Uds];
    let mut targets = BTreeMap::new();
    let mut servers = Vec::new();
    for (server, runtime, transports) in [
        (
            Server::First,
            tokio::runtime::Handle::current(),
            &all_transports[..],
        ),
        (
            Server::Second,
            second_runtime.handle.clone(),
            &all_transports[..],
        ),
        (
            Server::Doomed,
            doomed_runtime.handle.clone(),
            &[Transport::Tcp][..],
        ),
    ] {
        for &transport in transports {
            let listener = Listener::bind(transport, &dir).await;
            targets.insert((server, transport), listener.target());
            let serving = runtime.spawn(serve(
                listener,
                guard.clone(),
                service.clone(),
                connection_guard.clone(),
                drain.clone(),
            ));
            // The doomed server's task dies with its runtime.
            if server != Server::Doomed {
                servers.push(serving);
            }
        }
    }

    // Connections are set up one after another: the connection guard's
    // next opened event with the proxy's outbound address (none for a Unix
    // socket) is the connection just dialled.
    let mut proxies = JoinSet::new();
    let mut connections = Vec::new();
    for Planned {
        fates,
        server,
        transport,
    } in plan(&mut rng, scale)
    {
        let (addr, mode, peer) = proxy(
            targets[&(server, transport)].clone(),
            transport,
            &dir,
            &mut proxies,
        )
        .await;
        let client = Client::connect(&addr, transport, &fates, &mut proxies).await;
        // Waits for the connection guard to wrap the connection: that
        // names the connection (its id), and makes the doomed
        // runtime's connection the first wrapped.
        let peer = peer.await.expect("the proxy connected");
        let opened = timeout(PATIENCE, async {
            loop {
                let event = connection_events
                    .recv()
                    .await
                    .unwrap_or_else(|e| panic!("{}", fail(&format!("{e}"))));
                seen_connection_events.push(event.clone());
                if event.end().is_none() && event.peer() == peer {
                    return event.id();
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{}", fail("a connection was not wrapped")));
        let tie = Tie(opened);
        connections.push(Connection {
            client,
            mode,
            tie,
            fates,
            server,
            transport,
        });
    }

    // Open every stream (holders of a capped group before their rejected
    // followers), then play the fates that need the test's hand.
    // Client tasks: those that end before the drain, those the drain ends,
    // and those that never end by themselves (half-open, stalled).
    let (mut early, mut late_clients, mut hanging) =
        (JoinSet::new(), JoinSet::new(), JoinSet::new());
    for connection in &connections {
        for &fate in &connection.fates {
            let tasks = match fate {
                Fate::HalfOpen | Fate::StalledReader => &mut hanging,
                fate if fate.ends_early() => &mut early,
                _ => &mut late_clients,
            };
            open(&connection.client, connection.transport, fate, tasks).await;
        }
    }
    for connection in &connections {
        match connection.fates.first() {
            Some(Fate::HalfOpen) => connection.mode.send_replace(ProxyMode::Freeze),
            Some(Fate::Vanishes) => connection.mode.send_replace(ProxyMode::Vanish),
            _ => ProxyMode::Forward,
        };
    }

    let connection_count = connections.len();
    let all: Vec<Fate> = connections.iter().flat_map(|c| c.fates.clone()).collect();
    let late = all.iter().filter(|f| !f.ends_early()).count();
    let doomed = all.iter().filter(|f| **f == Fate::RuntimeDies).count();
    // The doomed runtime files the round's first stream and wraps its first
    // connection, so the stream sweeper and the connection guard's ticker
    // run there. It dies while streams of the other runtimes, which only
    // those timers end (idle, half-open, stalled, past their lifetime), are
    // still open: the timers must move.
    assert!(
        guard.active_streams() > late + doomed,
        "{}",
        fail("nothing for a timer to end when the doomed runtime dies")
    );
    let doomed_tasks = doomed_runtime.stop(&fail).await;
    assert!(
        doomed_tasks > doomed,
        "{}",
        fail("the doomed runtime had no streams when it died")
    );
    // Every fate but the drain's plays out by itself within the lifetime
    // plus the timer's slack.
    let deadline = Instant::now() + LIFETIME + PATIENCE;
    while guard.active_streams() > late {
        assert!(
            Instant::now() < deadline,
            "{}",
            fail(&format!(
                "{} streams still open before the drain, {late} expected",
                guard.active_streams()
            ))
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every client whose stream ended before the drain saw its code (read
    // now: the drain closes connections soon after its grace).
    check_clients(&mut early, &fail).await;
    let report = timeout(GRACE + PATIENCE, drain.start(GRACE))
        .await
        .unwrap_or_else(|_| panic!("{}", fail("the drain did not finish")));
    for server in servers {
        timeout(PATIENCE, server)
            .await
            .unwrap_or_else(|_| panic!("{}", fail("a server did not stop after the drain")))
            .expect("server task")
            .expect("server");
    }
    assert_eq!(report.cut() as usize, late, "{}", fail("drain cut count"));

    check_clients(&mut late_clients, &fail).await;
    hanging.shutdown().await;
    for connection in &connections {
        connection.mode.send_replace(ProxyMode::Vanish);
    }

    // The server's view: one event per stream, with its fate's reason and
    // cap limit, per connection; the counters as the plan says.
    assert_eq!(
        guard.active_streams(),
        0,
        "{}",
        fail("active after the round")
    );
    let events = std::mem::take(&mut *events.lock().unwrap());
    check_events(&connections, &events, &all, &fail);
    check_stats(&guard.stats(), &all, &fail);

    // The connection guard's view: each connection closed once, having
    // carried every stream of its own (refused ones too, whatever the
    // transport); stalled readers' connections closed as stalled.
    wait_until("every connection closed", || {
        connection_guard.open_connections() == 0
    })
    .await;
    loop {
        match connection_events.try_recv() {
            Ok(event) => seen_connection_events.push(event),
            Err(broadcast::error::TryRecvError::Empty) => break,
            Err(e) => panic!("{}", fail(&format!("connection events: {e}"))),
        }
    }
    check_connection_events(&connections, &seen_connection_events, &fail);

    let mut report = RoundReport {
        streams: all.len(),
        connections: connection_count,
        doomed_tasks,
        ..RoundReport::default()
    };
    for connection in &connections {
        let entry = report
            .by_transport
            .entry(format!("{:?}", connection.transport))
            .or_default();
        entry.0 += connection.fates.len();
        entry.1 += 1;
    }
    for fate in &all {
        *report.by_fate.entry(format!("{fate:?}")).or_default() += 1;
    }
    for connection in connections.iter().filter(|c| c.server == Server::Second) {
        report.second_runtime.0 += connection.fates.len();
        report.second_runtime.1 += 1;
    }

    drop(connections);
    proxies.shutdown().await;
    wait_until("every handler and producer has stopped", || {
        service.live_producers() == 0 && service.live_handlers() == 0
    })
    .await;
    second_runtime.shut_down(&fail).await;
    wait_for_no_tasks().await;
    // Nothing of the round is left: no cap slot in any set, no table
    // entry, no stream record, no timer filing, no connection state.
    check_nothing_held(&guard, &connection_guard, &fail).await;
    drop(dir);
    report
}

pub(crate) fn seed() -> u64 {
    std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stream_is_accounted_for_exactly_once() {
    let seed = seed();
    eprintln!("chaos: CHAOS_SEED={seed}");
    let mut rss = Vec::new();
    for i in 0..3 {
        let report = round(seed.wrapping_add(i), 2).await;
        print(&format!("round {i}"), &report, seed.wrapping_add(i));
        rss.push(rss_bytes());
    }
    // After the first round has warmed up the allocator, later rounds reuse
    // its memory.
    let growth = rss[2].saturating_sub(rss[1]);
    assert!(
        growth < 16 << 20,
        "CHAOS_SEED={seed}: memory grew by {} KiB between rounds 2 and 3",
        growth >> 10
    );
}
