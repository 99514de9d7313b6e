//! Guards shared by several tokio runtimes: limits hold on every runtime that
//! uses a guard, whatever happens to the others (issue 14, "a timer whose
//! runtime died"). Every runtime is an explicit current-thread runtime with
//! paused time, so no test waits on the wall clock.

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::Empty;
use tokio::runtime::{Builder, Runtime};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_stream_guard::{
    ConnectionGuard, EndReason, StreamGuardLayer, StreamHandle, conn::PeerOf,
};

fn runtime() -> Runtime {
    Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

/// A response body that never yields: the stream stays open until a guard
/// ends it or the response is dropped.
struct Idle;

impl Body for Idle {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Pending
    }
}

async fn respond<B>(_: Request<B>) -> Result<Response<Idle>, Infallible> {
    Ok(Response::new(Idle))
}

fn guard() -> StreamGuardLayer {
    StreamGuardLayer::builder()
        .max_lifetime(Duration::from_secs(2))
        .response_handle(true)
        .build()
        .unwrap()
}

/// Opens one stream through `guard` on `runtime`; the response (kept by the
/// caller) holds the stream open.
fn open(
    runtime: &Runtime,
    guard: &StreamGuardLayer,
) -> (Response<impl Sized + use<>>, StreamHandle) {
    runtime.block_on(async {
        let mut service = guard.layer(service_fn(respond));
        let response = service
            .ready()
            .await
            .unwrap()
            .call(Request::new(Empty::<Bytes>::new()))
            .await
            .unwrap();
        let handle = response.extensions().get::<StreamHandle>().unwrap().clone();
        (response, handle)
    })
}

/// Lets `runtime`'s paused clock run `by` (its timers fire on the way).
fn run_for(runtime: &Runtime, by: Duration) {
    runtime.block_on(async move { tokio::time::sleep(by).await });
}

#[test]
fn a_stream_is_cut_on_its_runtime_after_the_timers_runtime_died() {
    let guard = guard();
    let mut events = guard.subscribe();
    let a = runtime();
    let b = runtime();
    // A files first: the sweeper task runs on A.
    let (first, _) = open(&a, &guard);
    let (kept, handle) = open(&b, &guard);
    drop(first);
    drop(a);
    run_for(&b, Duration::from_secs(3));
    assert_eq!(handle.end_reason(), Some(EndReason::LifetimeExceeded));
    let mine: Vec<_> = std::iter::from_fn(|| events.try_recv().ok())
        .filter(|event| event.id() == handle.id())
        .collect();
    assert_eq!(mine.len(), 1, "one end event");
    assert_eq!(mine[0].reason(), EndReason::LifetimeExceeded);
    assert_eq!(guard.active_streams(), 0);
    drop(kept);
}

#[test]
fn the_moved_timer_stops_when_nothing_is_filed_and_restarts_for_the_next_stream() {
    let guard = guard();
    let a = runtime();
    let b = runtime();
    let baseline = b.metrics().num_alive_tasks();
    let (first, _) = open(&a, &guard);
    let (kept, handle) = open(&b, &guard);
    assert_eq!(
        b.metrics().num_alive_tasks(),
        baseline,
        "the timer runs on A"
    );
    drop(first);
    drop(a);
    assert_eq!(
        b.metrics().num_alive_tasks(),
        baseline + 1,
        "the timer moved to B"
    );
    run_for(&b, Duration::from_secs(3));
    assert_eq!(handle.end_reason(), Some(EndReason::LifetimeExceeded));
    drop(kept);
    run_for(&b, Duration::from_millis(50));
    assert_eq!(
        b.metrics().num_alive_tasks(),
        baseline,
        "nothing filed: the timer is gone"
    );
    // The next stream starts it again.
    let (kept, handle) = open(&b, &guard);
    run_for(&b, Duration::from_secs(3));
    assert_eq!(handle.end_reason(), Some(EndReason::LifetimeExceeded));
    drop(kept);
    run_for(&b, Duration::from_millis(50));
    assert_eq!(b.metrics().num_alive_tasks(), baseline);
}

#[test]
fn a_dead_remembered_runtime_is_skipped_when_the_timer_moves() {
    let guard = guard();
    let a = runtime();
    let b = runtime();
    let c = runtime();
    let (first, _) = open(&a, &guard);
    let (kept_b, on_b) = open(&b, &guard);
    let (kept_c, on_c) = open(&c, &guard);
    // C is remembered but dead by the time A dies.
    drop(c);
    drop(first);
    drop(a);
    run_for(&b, Duration::from_secs(3));
    assert_eq!(on_b.end_reason(), Some(EndReason::LifetimeExceeded));
    assert_eq!(on_c.end_reason(), Some(EndReason::LifetimeExceeded));
    drop((kept_b, kept_c));
}

#[test]
fn dropping_every_runtime_leaves_the_guard_usable() {
    let guard = guard();
    for _ in 0..3 {
        let a = runtime();
        let (kept, _) = open(&a, &guard);
        drop(a);
        drop(kept);
    }
    let b = runtime();
    let (kept, handle) = open(&b, &guard);
    run_for(&b, Duration::from_secs(3));
    assert_eq!(handle.end_reason(), Some(EndReason::LifetimeExceeded));
    drop(kept);
}

/// An IO that is never read: only its guard's timer can close it.
struct Quiet;

impl PeerOf for Quiet {
    fn peer(&self) -> Option<std::net::SocketAddr> {
        None
    }
}

#[test]
fn a_connection_is_closed_on_its_runtime_after_the_timers_runtime_died() {
    let connections = ConnectionGuard::builder()
        .idle_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let a = runtime();
    let b = runtime();
    let baseline = b.metrics().num_alive_tasks();
    // A wraps first: the ticker runs on A.
    let first = a.block_on(async { connections.wrap(Quiet) });
    let kept = b.block_on(async { connections.wrap(Quiet) });
    drop(first);
    drop(a);
    run_for(&b, Duration::from_secs(3));
    assert!(kept.handle().is_closed(), "idle past its timeout");
    drop(kept);
    run_for(&b, Duration::from_secs(1));
    assert_eq!(
        b.metrics().num_alive_tasks(),
        baseline,
        "the ticker stopped"
    );
}
