//! Guards shared by several tokio runtimes: limits hold on every runtime that
//! uses a guard, whatever happens to the others (issue 14, "a timer whose
//! runtime died"). Every runtime is an explicit current-thread runtime with
//! paused time, so no test waits on the wall clock; where a multi-thread
//! runtime takes part, the tests look only at where the timer task runs.

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
    ConnectionGuard, EndReason, StreamGuardLayer, StreamHandle, connection::PeerOf,
};

fn runtime() -> Runtime {
    Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

/// A multi-thread runtime (real time: tests only count its tasks).
fn multi_thread_runtime() -> Runtime {
    Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
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

/// C opened and closed a stream last and is alive, kept for a later
/// `block_on` but driven by nobody; B is a multi-thread runtime, which runs
/// tasks on its own. When A dies, the timer moves to B, not to the newer C.
#[test]
fn the_timer_moves_to_a_runtime_that_runs_tasks_on_its_own_before_an_idle_one() {
    let guard = guard();
    let a = runtime();
    let b = multi_thread_runtime();
    let c = runtime();
    let (first, _) = open(&a, &guard);
    let on_b = b.metrics().num_alive_tasks();
    let on_c = c.metrics().num_alive_tasks();
    let (kept_b, _) = open(&b, &guard);
    let (done_c, _) = open(&c, &guard);
    drop(done_c);
    drop(first);
    drop(a);
    assert_eq!(
        b.metrics().num_alive_tasks(),
        on_b + 1,
        "the timer runs on B"
    );
    assert_eq!(c.metrics().num_alive_tasks(), on_c, "nothing on C");
    drop(kept_b);
    drop(b);
    drop(c);
}

/// Among runtimes of one kind, the timer moves to the one that filed work
/// most recently: B was remembered before C, but filed again after C went
/// idle.
#[test]
fn the_timer_moves_to_the_runtime_that_filed_most_recently() {
    let guard = guard();
    let a = runtime();
    let b = runtime();
    let c = runtime();
    let (first, _) = open(&a, &guard);
    let (early_b, _) = open(&b, &guard);
    let (done_c, _) = open(&c, &guard);
    drop(done_c);
    drop(early_b);
    let (kept_b, on_b) = open(&b, &guard);
    drop(first);
    drop(a);
    run_for(&b, Duration::from_secs(30));
    assert_eq!(
        on_b.end_reason(),
        Some(EndReason::LifetimeExceeded),
        "B's stream cut at its 2 s lifetime"
    );
    drop((kept_b, c));
}
