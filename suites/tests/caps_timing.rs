//! Caps, routes and the client's deadline under paused time: exact timings,
//! the guard's own answers, slots given back however a stream ends, and the
//! counters agreeing with the events (a property test).

use std::{sync::atomic::Ordering, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use proptest::prelude::*;
use tokio::time::{Instant, sleep};
use tower::{Layer, Service, ServiceExt};

#[path = "../../tests/support/paused.rs"]
mod paused;
use paused::{App, SECOND, TICK, call, guard, next_event, request};
use tower_stream_guard::{
    ConnectionKey, EndReason, IdleDirection, RoutePolicy, StreamCap, StreamGuardLayer,
};

#[tokio::test(start_paused = true)]
async fn refused_plain_stream_gets_503_and_never_reaches_the_service() {
    let guard = guard(StreamGuardLayer::builder().max_streams_per_connection(1));
    let mut events = guard.subscribe();
    let (app, _feeders) = App::new();
    let mut svc = guard.layer(app.service());

    let first = call(&mut svc, request("/a", 1, false)).await;
    let refused = call(&mut svc, request("/a", 1, false)).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(refused.headers()["stream-guard-reason"], "rejected");
    assert!(refused.body().is_end_stream());
    assert_eq!(app.handled.load(Ordering::SeqCst), 1);
    // Another connection is not affected.
    let other = call(&mut svc, request("/a", 2, false)).await;
    assert_eq!(other.status(), StatusCode::OK);

    let event = next_event(&mut events).await;
    assert_eq!(
        event.reason(),
        EndReason::Rejected(StreamCap::PerConnection)
    );
    assert_eq!(event.cap_limit(), Some(1));
    assert_eq!(event.limit(), None);
    assert_eq!(event.connection(), Some(ConnectionKey::from_id(1)));
    assert!(
        event
            .to_json()
            .contains(r#""cap":"per_connection","cap_limit":1"#)
    );
    let mut counts = guard.connection_streams();
    counts.sort_by_key(|(key, _)| key.to_string());
    assert_eq!(
        counts,
        vec![
            (ConnectionKey::from_id(1), 1),
            (ConnectionKey::from_id(2), 1)
        ]
    );
    drop((first, other));
    assert_eq!(guard.active_streams(), 0);
    assert!(guard.connection_streams().is_empty());
    let stats = guard.stats();
    assert_eq!(stats.rejected(StreamCap::PerConnection), 1);
    assert_eq!(stats.ended(EndReason::Cancelled), 2);
}

#[tokio::test(start_paused = true)]
async fn refused_grpc_stream_gets_resource_exhausted_trailers_only() {
    let guard = guard(StreamGuardLayer::builder().max_streams(1));
    let mut events = guard.subscribe();
    let (app, _feeders) = App::new();
    let mut svc = guard.layer(app.service());

    let _held = call(&mut svc, request("/echo.Echo/Bidi", 1, true)).await;
    let refused = call(&mut svc, request("/echo.Echo/Bidi", 2, true)).await;
    assert_eq!(refused.status(), StatusCode::OK);
    assert_eq!(refused.headers()["content-type"], "application/grpc");
    assert_eq!(refused.headers()["grpc-status"], "8");
    assert_eq!(
        refused.headers()["grpc-message"],
        "stream refused: at most 1 concurrent streams in total (max_streams)"
    );
    let mut body = refused.into_body();
    assert!(body.frame().await.is_none());

    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Rejected(StreamCap::Total));
    assert_eq!(event.grpc_status(), Some(8));
    assert_eq!(event.duration(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn stalled_reader_gives_its_slot_back_when_the_idle_timer_fires() {
    let guard = guard(
        StreamGuardLayer::builder()
            .response_idle_timeout(SECOND)
            .max_streams_per_connection(1),
    );
    let mut events = guard.subscribe();
    let (app, _feeders) = App::new();
    let mut svc = guard.layer(app.service());

    let started = Instant::now();
    // Its body is never polled: a peer that stopped reading.
    let stalled = call(&mut svc, request("/watch", 1, true)).await;
    let refused = call(&mut svc, request("/watch", 1, true)).await;
    assert_eq!(refused.headers()["grpc-status"], "8");
    assert_eq!(
        next_event(&mut events).await.reason(),
        EndReason::Rejected(StreamCap::PerConnection)
    );

    let event = next_event(&mut events).await;
    assert_eq!(
        event.reason(),
        EndReason::IdleTimeout(IdleDirection::Response)
    );
    assert_eq!(started.elapsed(), SECOND);
    assert!(guard.connection_streams().is_empty(), "slot given back");
    let admitted = call(&mut svc, request("/watch", 1, true)).await;
    assert!(admitted.headers().get("grpc-status").is_none());
    assert_eq!(app.handled.load(Ordering::SeqCst), 2);
    drop((stalled, admitted));
    assert_eq!(guard.stats().active(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_stream_is_admitted_when_a_slot_frees_and_only_then_handled() {
    let guard = guard(
        StreamGuardLayer::builder()
            .max_streams_per_peer(1)
            .cap_wait(5 * SECOND),
    );
    let mut events = guard.subscribe();
    let (app, mut feeders) = App::new();
    let mut svc = guard.layer(app.service());
    let peer = |port| {
        let mut r = request("/a", port, false);
        r.extensions_mut().insert(tower_stream_guard::PeerAddr(
            ([10, 0, 0, 1], port as u16).into(),
        ));
        r
    };

    let first = call(&mut svc, peer(1)).await;
    let waiting = tokio::spawn(svc.ready().await.unwrap().call(peer(2)));
    sleep(2 * SECOND).await;
    assert!(!waiting.is_finished());
    assert_eq!(
        app.handled.load(Ordering::SeqCst),
        1,
        "not handled while waiting"
    );
    assert_eq!(guard.peer_streams(), vec![([10, 0, 0, 1].into(), 1)]);

    let feeder = feeders.recv().await.unwrap();
    drop(feeder);
    let mut body = first.into_body();
    assert!(body.frame().await.is_none(), "first stream completes");
    assert_eq!(next_event(&mut events).await.reason(), EndReason::Completed);

    let second = waiting.await.unwrap().unwrap();
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(app.handled.load(Ordering::SeqCst), 2);
    drop(second);
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Cancelled);
    assert_eq!(event.duration(), 2 * SECOND, "lived from its arrival");
    assert!(guard.peer_streams().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_stream_waits_for_a_slot_no_longer_than_cap_wait() {
    let guard = guard(
        StreamGuardLayer::builder()
            .max_streams(1)
            .cap_wait(3 * SECOND),
    );
    let mut events = guard.subscribe();
    let (app, _feeders) = App::new();
    let mut svc = guard.layer(app.service());

    let _held = call(&mut svc, request("/a", 1, true)).await;
    let started = Instant::now();
    let refused = call(&mut svc, request("/a", 1, true)).await;
    assert_eq!(started.elapsed(), 3 * SECOND);
    assert_eq!(refused.headers()["grpc-status"], "8");
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Rejected(StreamCap::Total));
    assert_eq!(event.duration(), 3 * SECOND);
    assert_eq!(app.handled.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn the_lifetime_runs_while_a_stream_waits_for_a_slot() {
    let guard = guard(
        StreamGuardLayer::builder()
            .max_lifetime(2 * SECOND)
            .route("/long", RoutePolicy::new().max_lifetime(100 * SECOND))
            .max_streams(1)
            .cap_wait(10 * SECOND),
    );
    let mut events = guard.subscribe();
    let (app, _feeders) = App::new();
    let mut svc = guard.layer(app.service());

    let held = call(&mut svc, request("/long", 1, true)).await;
    let started = Instant::now();
    let expired = call(&mut svc, request("/a", 1, true)).await;
    assert_eq!(started.elapsed(), 2 * SECOND);
    assert_eq!(expired.headers()["grpc-status"], "4");
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::LifetimeExceeded);
    assert_eq!(event.path(), "/a");
    assert_eq!(app.handled.load(Ordering::SeqCst), 1, "never handled");
    drop(held);
    assert_eq!(guard.stats().active(), 0);
    assert!(guard.connection_streams().is_empty());
}

/// Nested guards are independent: the inner guard's cap refuses the
/// stream (its own event says so), and the outer guard sees the refusal's
/// trailers-only answer as the stream's end.
#[tokio::test(start_paused = true)]
async fn an_inner_guards_cap_refuses_and_the_outer_guard_sees_the_answer() {
    let outer = guard(StreamGuardLayer::builder().max_lifetime(60 * SECOND));
    let inner = guard(StreamGuardLayer::builder().max_streams(1));
    let mut outer_events = outer.subscribe();
    let mut inner_events = inner.subscribe();
    let (app, _feeders) = App::new();
    let mut svc = outer.layer(inner.layer(app.service()));

    let held = call(&mut svc, request("/a", 1, true)).await;
    let refused = call(&mut svc, request("/a", 1, true)).await;
    assert_eq!(refused.headers()["grpc-status"], "8");
    let event = next_event(&mut inner_events).await;
    assert_eq!(event.reason(), EndReason::Rejected(StreamCap::Total));
    assert!(inner_events.try_recv().is_err(), "one event per stream");
    let event = next_event(&mut outer_events).await;
    assert_eq!(event.reason(), EndReason::Completed);
    assert_eq!(event.grpc_status(), Some(8));
    assert!(outer_events.try_recv().is_err(), "one event per stream");
    assert_eq!(outer.stats().rejected(StreamCap::Total), 0);
    assert_eq!(inner.stats().rejected(StreamCap::Total), 1);
    drop(held);
    assert_eq!(outer.active_streams() + inner.active_streams(), 0);
    let admitted = call(&mut svc, request("/a", 1, true)).await;
    assert!(admitted.headers().get("grpc-status").is_none());
}

#[tokio::test(start_paused = true)]
async fn an_honoured_grpc_timeout_shortens_the_lifetime_but_never_lengthens_it() {
    let guard = guard(
        StreamGuardLayer::builder()
            .max_lifetime(10 * SECOND)
            .honor_grpc_timeout(true),
    );
    let mut events = guard.subscribe();
    let (app, _feeders) = App::new();
    let mut svc = guard.layer(app.service());

    for (header, fires_after, names) in [
        ("2S", 2 * SECOND, "grpc-timeout"),
        ("20S", 10 * SECOND, "max_lifetime"),
        ("garbage", 10 * SECOND, "max_lifetime"),
    ] {
        let mut r = request("/echo.Echo/ServerStream", 1, true);
        r.headers_mut()
            .insert("grpc-timeout", HeaderValue::from_static(header));
        let started = Instant::now();
        let response = call(&mut svc, r).await;
        let mut body = response.into_body();
        let trailers = body
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_trailers()
            .unwrap();
        let elapsed = started.elapsed();
        assert!(
            elapsed >= fires_after && elapsed <= fires_after + TICK,
            "{header}: fired after {elapsed:?}"
        );
        let message = trailers["grpc-message"].to_str().unwrap();
        assert!(message.contains(names), "{header}: {message}");
        let event = next_event(&mut events).await;
        assert_eq!(event.reason(), EndReason::LifetimeExceeded);
        assert_eq!(event.limit(), Some(fires_after));
    }
}

#[tokio::test(start_paused = true)]
async fn grpc_timeout_is_ignored_unless_honoured() {
    let guard = guard(StreamGuardLayer::builder().max_lifetime(10 * SECOND));
    let mut events = guard.subscribe();
    let (app, _feeders) = App::new();
    let mut svc = guard.layer(app.service());
    let mut r = request("/echo.Echo/ServerStream", 1, true);
    r.headers_mut()
        .insert("grpc-timeout", HeaderValue::from_static("1S"));
    let started = Instant::now();
    let _response = call(&mut svc, r).await;
    let event = next_event(&mut events).await;
    assert_eq!(started.elapsed(), 10 * SECOND);
    assert_eq!(event.limit(), Some(10 * SECOND));
}

#[tokio::test(start_paused = true)]
async fn routes_pick_their_policy_by_path_prefix_and_predicate() {
    let guard = guard(
        StreamGuardLayer::builder()
            .max_lifetime(10 * SECOND)
            .route(
                "/svc.S/Watch",
                RoutePolicy::new().max_lifetime(100 * SECOND),
            )
            .route_when(
                |r| r.headers().contains_key("x-batch"),
                RoutePolicy::new().max_lifetime(5 * SECOND),
            )
            .route_prefix(
                "/svc.S/",
                RoutePolicy::new()
                    .max_lifetime(3 * SECOND)
                    .max_streams_per_connection(1),
            ),
    );
    let mut events = guard.subscribe();
    let (app, _feeders) = App::new();
    let mut svc = guard.layer(app.service());

    let mut batch = request("/other.O/Get", 1, true);
    batch
        .headers_mut()
        .insert("x-batch", HeaderValue::from_static("1"));
    let mut responses = Vec::new();
    for r in [
        request("/svc.S/Watch", 1, true),
        request("/svc.S/Get", 1, true),
        batch,
        request("/other.O/Get", 1, true),
    ] {
        responses.push(call(&mut svc, r).await);
    }
    // The prefix route's own cap counts only its streams.
    let refused = call(&mut svc, request("/svc.S/List", 1, true)).await;
    assert_eq!(refused.headers()["grpc-status"], "8");
    let event = next_event(&mut events).await;
    assert_eq!(event.path(), "/svc.S/List");
    assert_eq!(event.cap_limit(), Some(1));

    let started = Instant::now();
    let mut ended = Vec::new();
    for _ in 0..4 {
        let event = next_event(&mut events).await;
        ended.push((event.path().to_owned(), started.elapsed().as_secs()));
    }
    assert_eq!(
        ended,
        [
            ("/svc.S/Get".to_owned(), 3),
            ("/other.O/Get".to_owned(), 5),
            ("/other.O/Get".to_owned(), 10),
            ("/svc.S/Watch".to_owned(), 100),
        ]
    );
    drop(responses);
}

#[test]
fn bad_configuration_fails_at_build_time_with_the_setting_named() {
    let err = StreamGuardLayer::builder()
        .max_streams_per_peer(0)
        .build()
        .unwrap_err();
    assert!(
        err.to_string().contains("`max_streams_per_peer` is zero"),
        "{err}"
    );
    let err = StreamGuardLayer::builder()
        .cap_wait(Duration::ZERO)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("`cap_wait` is zero"), "{err}");
    // A route's idle timeout past the layer's lifetime is harmless (it can
    // never fire first): accepted.
    assert!(
        StreamGuardLayer::builder()
            .max_lifetime(SECOND)
            .route("/svc.S/Upload", RoutePolicy::new().idle_timeout(2 * SECOND))
            .build()
            .is_ok()
    );
    let err = StreamGuardLayer::builder()
        .route(
            "/svc.S/Upload",
            RoutePolicy::new().idle_timeout(Duration::ZERO),
        )
        .build()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "route `/svc.S/Upload`: `idle_timeout` is zero; every stream would end at once (leave it unset for no limit)"
    );
    let err = StreamGuardLayer::builder()
        .route_prefix("svc.S", RoutePolicy::new())
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("does not start with `/`"), "{err}");
}

/// What happens to one stream in the property test.
#[derive(Clone, Copy, Debug)]
enum Fate {
    Complete,
    Cancel,
    /// Never polled again: the response idle timeout releases it.
    Stall,
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![Just(Fate::Complete), Just(Fate::Cancel), Just(Fate::Stall)]
}

/// The property test's caps: the layer's, and those of the route under
/// [`ROUTE`], which count only its streams, on top of the layer's.
const PER_CONNECTION: usize = 2;
const PER_PEER: usize = 3;
const TOTAL: usize = 5;
const ROUTE: &str = "/r/";
const ROUTE_PER_CONNECTION: usize = 1;
const ROUTE_TOTAL: usize = 2;
/// Streams arrive on a 100 ms grid; a stalled one ends a tick or so after
/// this response idle timeout, between two grid points: whether it still
/// holds its slots when a stream arrives is never a matter of timing.
const STALL_IDLE: Duration = Duration::from_millis(1050);

/// One stream of the property test: its connection (the peer is
/// `connection / 2`: two connections per peer), arrival on the grid,
/// whether it takes the capped route, and its fate.
type Planned = (u64, u64, bool, Fate);

/// The caps as the guard must apply them: which streams hold slots, and
/// what refuses a stream arriving now (the layer's caps first, per
/// connection, per peer, total; then the route's).
#[derive(Default)]
struct CapModel {
    /// Admitted stalled streams: connection, route, when they end (ms).
    holding: Vec<(u64, bool, u64)>,
}

impl CapModel {
    /// Admits a stream arriving at `at` ms or says which cap refuses it and
    /// its limit; a stalled one it admits holds its slots until it ends.
    fn arrive(&mut self, (connection, at, routed, fate): Planned) -> Option<(StreamCap, usize)> {
        let at = at * 100;
        self.holding.retain(|&(_, _, ends)| ends > at);
        let on = |pick: &dyn Fn(u64, bool) -> bool| {
            self.holding.iter().filter(|&&(c, r, _)| pick(c, r)).count()
        };
        let refusal = if on(&|c, _| c == connection) >= PER_CONNECTION {
            Some((StreamCap::PerConnection, PER_CONNECTION))
        } else if on(&|c, _| c / 2 == connection / 2) >= PER_PEER {
            Some((StreamCap::PerPeer, PER_PEER))
        } else if on(&|_, _| true) >= TOTAL {
            Some((StreamCap::Total, TOTAL))
        } else if routed && on(&|c, r| r && c == connection) >= ROUTE_PER_CONNECTION {
            Some((StreamCap::PerConnection, ROUTE_PER_CONNECTION))
        } else if routed && on(&|_, r| r) >= ROUTE_TOTAL {
            Some((StreamCap::Total, ROUTE_TOTAL))
        } else {
            None
        };
        if refusal.is_none() && matches!(fate, Fate::Stall) {
            // Ends a tick or two after its idle timeout: never on the grid.
            let ends = at + STALL_IDLE.as_millis() as u64 + 25;
            self.holding.push((connection, routed, ends));
        }
        refusal
    }
}

/// The reason the model gives a stream's end event, with the refusing
/// cap's limit.
fn expected_end(fate: Fate, refusal: Option<(StreamCap, usize)>) -> (EndReason, Option<usize>) {
    match (refusal, fate) {
        (Some((cap, limit)), _) => (EndReason::Rejected(cap), Some(limit)),
        (None, Fate::Complete) => (EndReason::Completed, None),
        (None, Fate::Cancel) => (EndReason::Cancelled, None),
        (None, Fate::Stall) => (EndReason::IdleTimeout(IdleDirection::Response), None),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Streams on four connections of two peers, some on a route with caps
    /// of its own, against small caps, each with a random fate and arrival
    /// time: each stream is admitted or refused (by the cap, with the
    /// limit) as a model of the caps says; once all have ended, there was
    /// one event per stream with the model's reason, the counters equal
    /// the events per reason, and the guard holds nothing (no slot in any
    /// cap set, no table entry, no record, no timer filing).
    #[test]
    fn stats_agree_with_events_and_every_slot_comes_back(
        plan in prop::collection::vec((0u64..4, 0u64..20, any::<bool>(), fate()), 1..24),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(async move {
            let guard = guard(
                StreamGuardLayer::builder()
                    .response_idle_timeout(STALL_IDLE)
                    .max_lifetime(5 * SECOND)
                    .max_streams_per_connection(PER_CONNECTION)
                    .max_streams_per_peer(PER_PEER)
                    .max_streams(TOTAL)
                    .route_prefix(
                        ROUTE,
                        RoutePolicy::new()
                            .max_streams_per_connection(ROUTE_PER_CONNECTION)
                            .max_streams(ROUTE_TOTAL),
                    )
                    .event_capacity(1024),
            );
            let mut events = guard.subscribe();
            let (app, mut feeders) = App::new();
            let mut svc = guard.layer(app.service());
            let mut plan = plan;
            plan.sort_by_key(|&(_, at, _, _)| at);
            let mut model = CapModel::default();
            let origin = Instant::now();
            let mut stalled = Vec::new();
            let mut expected = Vec::new();
            for (i, &planned) in plan.iter().enumerate() {
                let (connection, at, routed, fate) = planned;
                tokio::time::sleep_until(origin + Duration::from_millis(at * 100)).await;
                let refusal = model.arrive(planned);
                let path = if routed { format!("{ROUTE}{i}") } else { format!("/p/{i}") };
                expected.push((path.clone(), expected_end(fate, refusal)));
                let mut request = request(&path, connection, true);
                request.extensions_mut().insert(tower_stream_guard::PeerAddr(
                    ([10, 0, 0, connection as u8 / 2], 1000 + connection as u16).into(),
                ));
                let response = call(&mut svc, request).await;
                let refused = response.headers().contains_key("grpc-status");
                assert_eq!(refused, refusal.is_some(), "{path} at {at}00 ms: refused?");
                if refused {
                    continue;
                }
                let feeder = feeders.recv().await.unwrap();
                match fate {
                    Fate::Complete => {
                        feeder.send(Bytes::from_static(b"x")).await.unwrap();
                        drop(feeder);
                        let mut body = response.into_body();
                        while body.frame().await.is_some() {}
                    }
                    Fate::Cancel => drop((response, feeder)),
                    Fate::Stall => stalled.push((response, feeder)),
                }
            }
            sleep(10 * SECOND).await;
            let stats = guard.stats();
            assert_eq!(stats.active(), 0);
            let mut seen = Vec::new();
            while let Ok(event) = events.try_recv() {
                seen.push((event.path().to_owned(), (event.reason(), event.cap_limit())));
            }
            assert_eq!(seen.len(), plan.len(), "one event per stream");
            seen.sort_by(|a, b| a.0.cmp(&b.0));
            expected.sort_by(|a, b| a.0.cmp(&b.0));
            assert_eq!(seen, expected, "each stream's end as the model says");
            assert_eq!(stats.ended_total(), plan.len() as u64);
            for reason in [
                EndReason::Completed,
                EndReason::Cancelled,
                EndReason::IdleTimeout(IdleDirection::Response),
                EndReason::LifetimeExceeded,
                EndReason::Rejected(StreamCap::PerConnection),
                EndReason::Rejected(StreamCap::PerPeer),
                EndReason::Rejected(StreamCap::Total),
            ] {
                let events = seen.iter().filter(|(_, (r, _))| *r == reason).count() as u64;
                assert_eq!(stats.ended(reason), events, "{reason:?}");
            }
            // Every end is done: what the stalled streams' bodies, the
            // service and its last handle still keep goes with them.
            drop((stalled, svc, app));
            let holdings = guard.holdings();
            assert!(holdings.is_empty(), "the guard still holds {holdings}");
            assert_eq!(guard.stats().ended_total(), plan.len() as u64, "no second end");
        });
    }
}

/// The test-only view counts what one stream holds: a slot and a table
/// entry in the layer's caps and in its route's, its record and its timer
/// filing; its end gives back all but the record, which lives on while a
/// handle names it.
#[tokio::test(start_paused = true)]
async fn holdings_count_a_streams_slots_record_and_filing_until_it_is_gone() {
    let guard = guard(
        StreamGuardLayer::builder()
            .idle_timeout(SECOND)
            .max_streams_per_connection(4)
            .route_prefix("/r/", RoutePolicy::new().max_streams(4)),
    );
    let (app, _feeders) = App::new();
    let mut svc = guard.layer(app.service());
    assert!(guard.holdings().is_empty());
    let response = call(&mut svc, request("/r/a", 1, true)).await;
    let holdings = guard.holdings();
    assert_eq!(
        (
            holdings.slots,
            holdings.cap_entries,
            holdings.records,
            holdings.timer_filings
        ),
        (2, 1, 1, 1),
        "{holdings}"
    );
    let handle = app.last_handle().expect("the handler's handle");
    drop(response);
    let holdings = guard.holdings();
    assert_eq!(
        (holdings.slots, holdings.cap_entries, holdings.timer_filings),
        (0, 0, 0),
        "{holdings}"
    );
    assert_eq!(holdings.records, 1, "the handles keep the record");
    drop((handle, svc, app));
    assert!(guard.holdings().is_empty(), "{}", guard.holdings());
}

/// The connection guard's side of the view: a table entry and a state per
/// wrapped connection, the state alive while a handle names it.
#[tokio::test]
async fn connection_holdings_count_entries_and_states_until_the_last_handle_goes() {
    let connections = tower_stream_guard::ConnectionGuard::builder()
        .build()
        .expect("valid configuration");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    assert!(connections.holdings().is_empty());
    let io = connections.wrap(tcp);
    let holdings = connections.holdings();
    assert_eq!((holdings.entries, holdings.live), (1, 1), "{holdings}");
    let handle = io.handle().clone();
    drop(io);
    let holdings = connections.holdings();
    assert_eq!((holdings.entries, holdings.live), (0, 1), "{holdings}");
    drop(handle);
    assert!(
        connections.holdings().is_empty(),
        "{}",
        connections.holdings()
    );
}

#[tokio::test(start_paused = true)]
async fn a_refusal_says_when_to_retry_as_configured() {
    let guard = guard(
        StreamGuardLayer::builder()
            .max_streams(1)
            .retry_after(std::time::Duration::from_millis(2500)),
    );
    let (app, _feeders) = App::new();
    let mut svc = guard.layer(app.service());
    let _first = call(&mut svc, request("/a", 1, false)).await;
    let refused = call(&mut svc, request("/a", 1, false)).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    // Whole seconds, rounded up: never sooner than asked.
    assert_eq!(refused.headers()["retry-after"], "3");
    // gRPC refusals carry their status, not an HTTP hint.
    let refused = call(&mut svc, request("/a", 1, true)).await;
    assert_eq!(refused.headers()["grpc-status"], "8");
    assert!(refused.headers().get("retry-after").is_none());
}

#[test]
fn retry_after_is_at_most_a_year() {
    let too_long = StreamGuardLayer::builder()
        .retry_after(std::time::Duration::from_secs(366 * 24 * 3600))
        .build();
    assert!(too_long.is_err());
}
