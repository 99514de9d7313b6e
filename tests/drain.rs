//! Drains under paused time: the notice, refusals, the cut at the end of the
//! grace period (stalled readers included) and the report.

use bytes::Bytes;
use http::StatusCode;
use http_body::Body;
use http_body_util::BodyExt;
use tokio::time::{Instant, sleep};
use tower::Layer;
use tower_stream_guard::{Drain, EndReason, StreamGuardLayer, StreamHandle};

#[path = "support/paused.rs"]
mod paused;
use paused::{App, SECOND, TICK, call, guard, next_event, request};

#[tokio::test(start_paused = true)]
async fn new_streams_are_refused_once_the_drain_begins() {
    let drain = Drain::new();
    let guard = guard(StreamGuardLayer::builder().drain(&drain));
    let mut events = guard.subscribe();
    let (app, _feeders) = App::new();
    let mut svc = guard.layer(app.service());
    assert!(!drain.is_draining());

    let report = drain.start(5 * SECOND);
    assert!(drain.is_draining());
    let grpc = call(&mut svc, request("/echo.Echo/Bidi", 1, true)).await;
    assert_eq!(grpc.headers()["grpc-status"], "14");
    let message = grpc.headers()["grpc-message"].to_str().unwrap();
    assert!(message.contains("draining"), "{message}");
    let plain = call(&mut svc, request("/page", 1, false)).await;
    assert_eq!(plain.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(plain.headers()["retry-after"], "1");
    assert_eq!(plain.headers()["stream-guard-reason"], "drained");
    assert_eq!(grpc.headers()["stream-guard-reason"], "drained");
    assert_eq!(app.handled.load(std::sync::atomic::Ordering::SeqCst), 0);
    for _ in 0..2 {
        let event = next_event(&mut events).await;
        assert_eq!(event.reason(), EndReason::Drained);
    }

    let started = Instant::now();
    let report = report.await;
    assert!(started.elapsed() < TICK, "nothing open: done at once");
    assert_eq!(report.open_at_start(), 0);
    assert_eq!(report.refused(), 2);
    assert_eq!(report.cut(), 0);
    assert_eq!(guard.stats().ended(EndReason::Drained), 2);
}

#[tokio::test(start_paused = true)]
async fn a_guard_built_after_the_drain_began_refuses_its_streams() {
    let drain = Drain::new();
    let report = drain.start(5 * SECOND);
    let guard = guard(StreamGuardLayer::builder().drain(&drain));
    let (app, _feeders) = App::new();
    let mut svc = guard.layer(app.service());

    let grpc = call(&mut svc, request("/echo.Echo/Bidi", 1, true)).await;
    assert_eq!(grpc.headers()["grpc-status"], "14");
    assert_eq!(grpc.headers()["stream-guard-reason"], "drained");
    assert_eq!(app.handled.load(std::sync::atomic::Ordering::SeqCst), 0);
    let report = report.await;
    assert_eq!(report.open_at_start(), 0);
    assert_eq!(report.refused(), 1);
}

#[tokio::test(start_paused = true)]
async fn streams_open_when_the_grace_ends_are_cut_with_unavailable() {
    let drain = Drain::new();
    // No limit at all: the drain must reach streams the timer never filed.
    let guard = guard(StreamGuardLayer::builder().drain(&drain));
    let mut events = guard.subscribe();
    let (app, mut feeders) = App::new();
    let mut svc = guard.layer(app.service());

    let finishing = call(&mut svc, request("/echo.Echo/ServerStream", 1, true)).await;
    let finishing_feed = feeders.recv().await.unwrap();
    let polled = call(&mut svc, request("/echo.Echo/ServerStream", 1, true)).await;
    let _polled_feed = feeders.recv().await.unwrap();
    // Its body is never polled: a peer that stopped reading.
    let stalled = call(&mut svc, request("/echo.Echo/ServerStream", 1, true)).await;
    let _stalled_feed = feeders.recv().await.unwrap();
    let (mut finishing, mut polled) = (finishing.into_body(), polled.into_body());

    let started = Instant::now();
    let report = tokio::spawn(drain.start(3 * SECOND));
    sleep(SECOND).await;
    finishing_feed
        .send(Bytes::from_static(b"bye"))
        .await
        .unwrap();
    drop(finishing_feed);
    assert!(finishing.frame().await.unwrap().unwrap().is_data());
    assert!(finishing.frame().await.is_none());
    assert_eq!(next_event(&mut events).await.reason(), EndReason::Completed);

    let trailers = tokio::time::timeout(3600 * SECOND, polled.frame())
        .await
        .expect("cut within an hour of paused time")
        .unwrap()
        .unwrap()
        .into_trailers()
        .unwrap();
    let cut_after = started.elapsed();
    assert!(
        cut_after >= 3 * SECOND && cut_after <= 3 * SECOND + TICK,
        "cut after {cut_after:?}"
    );
    assert_eq!(trailers["grpc-status"], "14");
    assert!(
        trailers["grpc-message"]
            .to_str()
            .unwrap()
            .contains("grace period ended (drain)")
    );
    for _ in 0..2 {
        let event = next_event(&mut events).await;
        assert_eq!(event.reason(), EndReason::Drained);
        assert_eq!(event.limit(), Some(3 * SECOND));
        assert_eq!(event.grpc_status(), Some(14));
    }
    let report = report.await.unwrap();
    assert_eq!(report.open_at_start(), 3);
    assert_eq!(report.finished_within_grace(), 1);
    assert_eq!(report.cut(), 2);
    assert_eq!(report.refused(), 0);
    assert!(report.elapsed() <= 3 * SECOND + TICK, "{report:?}");
    assert!(report.to_json().contains(r#""cut":2"#));
    assert_eq!(guard.active_streams(), 0);
    drop(stalled);
    assert!(events.try_recv().is_err(), "one event per stream");
}

#[tokio::test(start_paused = true)]
async fn handlers_that_stop_on_draining_count_as_finished_within_grace() {
    let drain = Drain::new();
    let guard = guard(
        StreamGuardLayer::builder()
            .max_lifetime(3600 * SECOND)
            .drain(&drain),
    );
    let mut events = guard.subscribe();
    let (app, mut feeders) = App::new();
    let mut svc = guard.layer(app.service());

    let response = call(&mut svc, request("/echo.Echo/ServerStream", 1, true)).await;
    let feed = feeders.recv().await.unwrap();
    let handle: StreamHandle = app.last_handle().expect("the handler saw its handle");
    // The handler's producer: says goodbye when the drain begins.
    let producer = tokio::spawn(async move {
        handle.draining().await;
        feed.send(Bytes::from_static(b"reconnect elsewhere"))
            .await
            .unwrap();
    });

    let started = Instant::now();
    let report = drain.start(10 * SECOND);
    let mut body = response.into_body();
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        "reconnect elsewhere"
    );
    assert!(body.frame().await.is_none(), "producer done, body ends");
    producer.await.unwrap();
    let report = report.await;
    assert!(started.elapsed() < TICK, "{:?}", started.elapsed());
    assert_eq!(report.open_at_start(), 1);
    assert_eq!(report.finished_within_grace(), 1);
    assert_eq!(report.cut(), 0);
    assert_eq!(next_event(&mut events).await.reason(), EndReason::Completed);
    assert!(body.is_end_stream());
}

#[tokio::test(start_paused = true)]
async fn draining_resolves_for_every_open_stream_and_never_without_a_drain() {
    let drain = Drain::new();
    let with = guard(StreamGuardLayer::builder().drain(&drain));
    let without = guard(StreamGuardLayer::builder());
    let (app, _feeders) = App::new();
    let mut with_svc = with.layer(app.service());
    let mut without_svc = without.layer(app.service());

    let mut handles = Vec::new();
    let mut responses = Vec::new();
    for _ in 0..3 {
        responses.push(call(&mut with_svc, request("/a", 1, true)).await);
        handles.push(app.last_handle().unwrap());
    }
    let _other = call(&mut without_svc, request("/a", 1, true)).await;
    let lone = app.last_handle().unwrap();

    let waiters: Vec<_> = handles.iter().map(|h| tokio::spawn(h.draining())).collect();
    let lone_waiter = tokio::spawn(lone.draining());
    sleep(SECOND).await;
    assert!(waiters.iter().all(|w| !w.is_finished()));
    let _report = drain.start(60 * SECOND);
    for waiter in waiters {
        waiter.await.unwrap();
    }
    assert!(handles.iter().all(StreamHandle::is_draining));
    sleep(SECOND).await;
    assert!(!lone_waiter.is_finished());
    assert!(!lone.is_draining());
    drop(responses);
}

/// A drain on an inner guard nested in another guard (which has no drain,
/// nor any limit) cuts the inner guard's stream at the end of its grace;
/// the outer guard sees the cut's trailers as the end, and the drain's
/// report counts the stream once.
#[tokio::test(start_paused = true)]
async fn a_drain_on_an_inner_nested_guard_cuts_its_streams() {
    let drain = Drain::new();
    let outer = guard(StreamGuardLayer::builder());
    let inner = guard(StreamGuardLayer::builder().drain(&drain));
    let mut inner_events = inner.subscribe();
    let (app, mut feeders) = App::new();
    let mut svc = outer.layer(inner.layer(app.service()));

    let response = call(&mut svc, request("/echo.Echo/ServerStream", 1, true)).await;
    let _feed = feeders.recv().await.unwrap();
    let mut body = response.into_body();
    assert_eq!(inner.active_streams(), 1);

    let started = Instant::now();
    let report = tokio::spawn(drain.start(2 * SECOND));
    let trailers = tokio::time::timeout(3600 * SECOND, body.frame())
        .await
        .expect("cut within an hour of paused time")
        .expect("a frame")
        .expect("trailers, not an error")
        .into_trailers()
        .expect("trailers");
    assert_eq!(trailers["grpc-status"], "14");
    let message = trailers["grpc-message"].to_str().unwrap();
    assert!(message.contains("2s"), "names the grace: {message}");
    let cut_after = started.elapsed();
    assert!(
        cut_after >= 2 * SECOND && cut_after <= 2 * SECOND + 2 * TICK,
        "cut at the grace's end, not {cut_after:?}"
    );
    let event = next_event(&mut inner_events).await;
    assert_eq!(event.reason(), EndReason::Drained);
    drop(body);
    let report = report.await.unwrap();
    assert_eq!(report.cut(), 1);
    assert_eq!(outer.active_streams(), 0);
    assert_eq!(inner.active_streams(), 0);
}

/// Nested guards sharing one drain: each guard's stream counts, so one
/// request through both is two streams in the report (as `open_at_start`
/// documents).
#[tokio::test(start_paused = true)]
async fn nested_guards_sharing_a_drain_each_count_their_stream() {
    let drain = Drain::new();
    let outer = guard(StreamGuardLayer::builder().drain(&drain));
    let inner = guard(StreamGuardLayer::builder().drain(&drain));
    let (app, mut feeders) = App::new();
    let mut svc = outer.layer(inner.layer(app.service()));

    let response = call(&mut svc, request("/echo.Echo/ServerStream", 1, true)).await;
    let _feed = feeders.recv().await.unwrap();
    let body = response.into_body();
    let report = tokio::spawn(drain.start(2 * SECOND));
    tokio::time::sleep(3 * SECOND).await;
    drop(body);
    let report = report.await.unwrap();
    assert_eq!(report.open_at_start(), 2);
    assert_eq!(report.cut(), 2);
}

/// A drain files every stream again under its deadline, in batches. Streams
/// that moved meanwhile are filed later than they were, so a walk bounded by
/// the count it started with ran out before the end of the map, where the
/// streams without a deadline of their own sit: the drain never cut them.
#[tokio::test(start_paused = true)]
async fn a_drain_cuts_a_stream_without_deadline_behind_many_moving_streams() {
    const MOVING: usize = 300; // more than one batch of the timer
    let drain = Drain::new();
    let guard = guard(StreamGuardLayer::builder().drain(&drain).route(
        "/moving",
        tower_stream_guard::RoutePolicy::new().response_idle_timeout(2 * SECOND),
    ));
    let (app, mut feeders) = App::new();
    let mut svc = guard.layer(app.service());
    let mut moving = Vec::new();
    for _ in 0..MOVING {
        let body = call(&mut svc, request("/moving", 1, true))
            .await
            .into_body();
        moving.push((feeders.recv().await.unwrap(), body));
    }
    // No limit of its own: only the drain can end it.
    let quiet = call(&mut svc, request("/quiet", 2, true)).await;
    let _quiet_feed = feeders.recv().await.unwrap();

    // Every moving stream's deadline is now later than where it is filed.
    tokio::time::advance(SECOND * 3 / 2).await;
    for (feed, body) in &mut moving {
        feed.send(Bytes::from_static(b"x")).await.unwrap();
        assert!(body.frame().await.unwrap().unwrap().is_data());
    }

    let report = drain.start(5 * SECOND);
    let handle = app.last_handle().expect("the quiet stream's handle");
    assert_eq!(
        tokio::time::timeout(6 * SECOND, handle.cancelled()).await,
        Ok(EndReason::Drained),
        "the quiet stream is cut at the drain's deadline"
    );
    assert_eq!(report.await.cut(), 1);
    assert_eq!(guard.stats().ended(EndReason::Drained), 1);
    drop((moving, quiet));
}

/// A close delay shorter than the stream timer's resolution: the report
/// still waits for the timer to cut the streams left (it said `cut: 0` and
/// counted the cut stream as finished within the grace).
#[tokio::test(start_paused = true)]
async fn a_close_delay_below_the_resolution_still_reports_the_cut() {
    let drain = Drain::with_close_delay(std::time::Duration::ZERO);
    let guard = guard(StreamGuardLayer::builder().drain(&drain));
    let (app, mut feeders) = App::new();
    let mut svc = guard.layer(app.service());
    let response = call(&mut svc, request("/echo.Echo/ServerStream", 1, true)).await;
    let _feed = feeders.recv().await.unwrap();
    let started = Instant::now();
    let report = drain.start(3 * SECOND).await;
    assert_eq!(report.open_at_start(), 1);
    assert_eq!(report.cut(), 1, "{report:?}");
    assert_eq!(report.finished_within_grace(), 0);
    assert!(started.elapsed() <= 3 * SECOND + 2 * TICK, "{report:?}");
    assert_eq!(guard.active_streams(), 0);
    drop(response);
}

mod drain_order {
    //! Real threads and real time: the race needs a second thread.

    use std::{convert::Infallible, time::Duration};

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body::Frame;
    use http_body_util::{Empty, StreamBody};
    use tower::{Layer, ServiceExt};
    use tower_stream_guard::{Drain, StreamGuardLayer, StreamHandle, stream::RequestBody};

    /// A subscriber whose handling of the guard's log lines takes a while (a
    /// slow log sink).
    struct Slow;
    impl tracing::Subscriber for Slow {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            if event.metadata().target() == "tower_stream_guard" {
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    /// The drain is told a stream ended only once that stream no longer counts
    /// as active: otherwise the drain task, waking on another thread in between,
    /// sees it still active, waits again, and is not woken before the grace's
    /// end. A slow log sink on the ending thread widens the window (it failed
    /// with the drain told first: "still waits 3.3s after its last stream ended").
    ///
    /// The drain task runs on a current-thread runtime, so it is known to be
    /// waiting before the stream ends; the stream ends on a thread of its own.
    #[test]
    fn the_drain_finishes_when_the_last_stream_ends() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let drain = Drain::new();
            let guard = StreamGuardLayer::builder()
                .drain(&drain)
                .response_handle(true)
                .build()
                .unwrap();
            let svc = guard.layer(tower::service_fn(
                |_request: Request<RequestBody<Empty<Bytes>>>| async {
                    // A response body that never yields: the stream stays open.
                    let never = futures_util::stream::pending::<Result<Frame<Bytes>, Infallible>>();
                    Ok::<_, Infallible>(Response::new(StreamBody::new(never)))
                },
            ));
            let response = svc.oneshot(Request::new(Empty::new())).await.unwrap();
            let handle = response.extensions().get::<StreamHandle>().unwrap().clone();
            let report = drain.start(Duration::from_secs(10));
            // On a current-thread runtime a yield lets every task that is
            // ready run before this one resumes: the drain task has run up
            // to its wait (the stream is still active, so it waits).
            for _ in 0..8 {
                tokio::task::yield_now().await;
            }
            let runtime = tokio::runtime::Handle::current();
            let started = std::time::Instant::now();
            let ending = std::thread::spawn(move || {
                let _slow = tracing::subscriber::set_default(Slow);
                let _runtime = runtime.enter();
                handle.cancel()
            });
            let report = tokio::time::timeout(Duration::from_secs(3), report).await;
            assert!(ending.join().expect("the ending thread"));
            assert!(
                report.is_ok(),
                "the drain still waits {:?} after its last stream ended (active {})",
                started.elapsed(),
                drain.active_streams()
            );
            drop(response);
        });
    }
}

/// The runtime a drain's task runs on shuts down mid-drain: the report's
/// future, awaited on another runtime, still resolves (with the counts so
/// far), and so does a later `start`.
#[cfg(unix)]
#[test]
fn a_drain_whose_runtime_shut_down_still_reports() {
    use std::time::Duration;

    let drain = Drain::new();
    let connections = tower_stream_guard::ConnectionGuard::builder()
        .drain(&drain)
        .build()
        .unwrap();
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // An open connection keeps the drain waiting for its whole grace.
    let (report, io) = first.block_on(async {
        let (server, _client) = tokio::net::UnixStream::pair().unwrap();
        let io = connections.wrap(server);
        (drain.start(Duration::from_secs(600)), io)
    });
    drop(first);

    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    second.block_on(async {
        let report = tokio::time::timeout(Duration::from_secs(5), report)
            .await
            .expect("the report resolves after its runtime shut down");
        assert_eq!(report.connections_closed(), 0);
        let again = tokio::time::timeout(Duration::from_secs(5), drain.start(Duration::ZERO))
            .await
            .expect("a later start resolves");
        assert_eq!(again.connections_closed(), 0);
    });
    drop(io);
}

/// `start` called again, even with a shorter grace, neither restarts the
/// drain nor makes a second report: both futures resolve with the first
/// drain's report, the stream cut at the first grace's end.
#[tokio::test(start_paused = true)]
async fn a_second_start_resolves_with_the_first_drains_report() {
    let drain = Drain::new();
    let guard = guard(StreamGuardLayer::builder().drain(&drain));
    let mut events = guard.subscribe();
    let (app, mut feeders) = App::new();
    let mut svc = guard.layer(app.service());
    let mut open = call(&mut svc, request("/echo.Echo/ServerStream", 1, true)).await;
    let _feed = feeders.recv().await.unwrap();

    let started = Instant::now();
    let first = drain.start(5 * SECOND);
    sleep(SECOND).await;
    let second = drain.start(SECOND);
    // Nothing cut at the second call's grace.
    sleep(2 * SECOND).await;
    assert_eq!(drain.active_streams(), 1, "the second start cut nothing");
    let polled = open.body_mut().frame();
    let _ = tokio::time::timeout(5 * SECOND, polled).await;
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Drained);
    let (first, second) = (first.await, second.await);
    assert_eq!(first, second, "one drain, one report");
    assert_eq!(first.open_at_start(), 1);
    assert_eq!(first.cut(), 1);
    assert_eq!(first.refused(), 0);
    let elapsed = first.elapsed();
    assert!(
        elapsed >= 5 * SECOND && elapsed < 5 * SECOND + SECOND,
        "the first grace decides: {elapsed:?}"
    );
    assert!(started.elapsed() < 6 * SECOND + SECOND);
}

/// A drain with no stream, no refusal and no connection reports zeros and
/// resolves at once.
#[tokio::test(start_paused = true)]
async fn a_drain_with_nothing_open_reports_all_zeros_at_once() {
    let drain = Drain::new();
    let guard = guard(StreamGuardLayer::builder().drain(&drain));
    let connections = tower_stream_guard::ConnectionGuard::builder()
        .drain(&drain)
        .build()
        .expect("valid configuration");
    let started = Instant::now();
    let report = drain.start(5 * SECOND).await;
    assert!(started.elapsed() < TICK, "nothing open: done at once");
    assert_eq!(report.open_at_start(), 0);
    assert_eq!(report.finished_within_grace(), 0);
    assert_eq!(report.cut(), 0);
    assert_eq!(report.refused(), 0);
    assert_eq!(report.connections_closed(), 0);
    assert!(report.elapsed() < TICK, "{:?}", report.elapsed());
    assert_eq!(
        report.to_json(),
        format!(
            r#"{{"event":"drain","open_at_start":0,"finished_within_grace":0,"cut":0,"refused":0,"connections_closed":0,"elapsed_ms":{}}}"#,
            report.elapsed().as_millis()
        )
    );
    assert_eq!(
        drain.start(SECOND).await,
        report,
        "and so does a second start"
    );
    drop((guard, connections));
}

/// `start` outside a runtime panics (it has no runtime to spawn the drain's
/// task on), and before it begins anything: the drain has not begun, the
/// guards refuse nothing, and a `start` on a runtime later drains and
/// reports as if the first call had never been made.
#[test]
fn a_start_outside_a_runtime_panics_before_the_drain_begins() {
    let drain = Drain::new();
    let guard = guard(StreamGuardLayer::builder().drain(&drain));
    let (app, mut feeders) = App::new();
    let mut svc = guard.layer(app.service());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let first = runtime.block_on(async {
        let response = call(&mut svc, request("/echo.Echo/ServerStream", 1, true)).await;
        (response, feeders.recv().await.unwrap())
    });

    let outside = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drop(drain.start(5 * SECOND));
    }));
    assert!(outside.is_err(), "start outside a runtime panics");
    assert!(
        !drain.is_draining(),
        "a start that panicked began the drain"
    );
    let report = runtime.block_on(async {
        let response = call(&mut svc, request("/echo.Echo/ServerStream", 1, true)).await;
        assert!(
            !response.headers().contains_key("grpc-status"),
            "a stream after the failed start is refused"
        );
        let _feed = feeders.recv().await.unwrap();
        let started = Instant::now();
        let report = tokio::time::timeout(60 * SECOND, drain.start(5 * SECOND))
            .await
            .expect("a later start resolves");
        assert_eq!(report.open_at_start(), 2);
        assert_eq!(report.refused(), 0);
        assert_eq!(report.cut(), 2);
        assert!(started.elapsed() >= 5 * SECOND, "the grace was kept");
        drop(response);
        report
    });
    // Begun, the drain needs no runtime for a `start` any more.
    let again = drain.start(SECOND);
    assert_eq!(runtime.block_on(again), report);
    drop(first);
}
