//! `cap_wait` under paused time: who gets a freed slot (first come, first
//! served, newcomers behind the waiters), when patience starts (at the
//! service's `call`, however late the response future is first polled),
//! and what a waiting stream is (not active, not cut by idle timeouts, a
//! refusal when its patience runs out).

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use tokio::{
    sync::mpsc,
    task::JoinHandle,
    time::{Instant, advance},
};
use tower::{Layer, Service, ServiceExt};
use tower_stream_guard::{
    EndReason, IdleDirection, StreamCap, StreamGuardLayer,
    stream::{RequestBody, ResponseBody},
};

#[path = "support/paused.rs"]
mod paused;
use paused::{Feed, SECOND, guard, next_event, request};

/// The handlers that ran, by path, in the order they ran.
#[derive(Clone, Default)]
struct Handled(Arc<Mutex<Vec<String>>>);

impl Handled {
    fn paths(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

type Guarded = Response<ResponseBody<Feed>>;

/// A service that records each handler that runs and answers with an
/// endless body (its feeder is leaked into the record so the body stays
/// open until the response is dropped).
fn service(
    handled: &Handled,
    guard: &StreamGuardLayer,
) -> impl Service<
    Request<Empty<Bytes>>,
    Response = Guarded,
    Error = Infallible,
    Future = impl Future<Output = Result<Guarded, Infallible>> + Send + 'static,
> + Clone
+ 'static {
    let handled = handled.clone();
    guard.layer(tower::service_fn(
        move |request: Request<RequestBody<Empty<Bytes>>>| {
            let handled = handled.clone();
            async move {
                handled
                    .0
                    .lock()
                    .unwrap()
                    .push(request.uri().path().to_owned());
                let (tx, rx) = mpsc::channel::<Bytes>(1);
                // Kept open: the body ends when the response is dropped.
                std::mem::forget(tx);
                Ok::<_, Infallible>(Response::new(Feed(rx)))
            }
        },
    ))
}

/// Lets every runnable task run, without moving the paused clock.
async fn settle() {
    for _ in 0..64 {
        tokio::task::yield_now().await;
    }
}

fn spawn<F>(future: F) -> JoinHandle<Guarded>
where
    F: Future<Output = Result<Guarded, Infallible>> + Send + 'static,
{
    tokio::spawn(async move { future.await.unwrap() })
}

/// `max_streams(1)`: w1 then w2 wait; the holder ends, and a newcomer
/// arrives right after, before any waiter has run. The slot goes to w1;
/// the newcomer queues behind w2.
#[tokio::test(start_paused = true)]
async fn a_freed_slot_goes_to_the_first_waiter_and_newcomers_queue_behind() {
    let guard = guard(
        StreamGuardLayer::builder()
            .max_streams(1)
            .cap_wait(60 * SECOND),
    );
    let handled = Handled::default();
    let mut svc = service(&handled, &guard);

    let holder = svc
        .ready()
        .await
        .unwrap()
        .call(request("/holder", 1, false))
        .await
        .unwrap();
    let w1 = spawn(svc.ready().await.unwrap().call(request("/w1", 2, false)));
    settle().await;
    let w2 = spawn(svc.ready().await.unwrap().call(request("/w2", 3, false)));
    settle().await;
    assert_eq!(handled.paths(), ["/holder"], "both wait");

    // The slot comes free, and a newcomer is called before any task runs.
    drop(holder);
    let newcomer = spawn(
        svc.ready()
            .await
            .unwrap()
            .call(request("/newcomer", 4, false)),
    );
    settle().await;
    assert_eq!(handled.paths(), ["/holder", "/w1"], "w1 first");
    assert!(w1.is_finished() && !w2.is_finished() && !newcomer.is_finished());

    drop(w1.await.unwrap());
    settle().await;
    assert_eq!(handled.paths(), ["/holder", "/w1", "/w2"], "then w2");
    assert!(!newcomer.is_finished(), "the newcomer still waits");

    drop(w2.await.unwrap());
    settle().await;
    assert_eq!(
        handled.paths(),
        ["/holder", "/w1", "/w2", "/newcomer"],
        "the newcomer last"
    );
    drop(newcomer.await.unwrap());
    assert_eq!(guard.stats().active(), 0);
}

/// Arrival is the service's `call`: a response future first polled late
/// keeps its place in the queue.
#[tokio::test(start_paused = true)]
async fn a_waiter_polled_late_keeps_its_place_in_the_queue() {
    let guard = guard(
        StreamGuardLayer::builder()
            .max_streams(1)
            .cap_wait(60 * SECOND),
    );
    let handled = Handled::default();
    let mut svc = service(&handled, &guard);

    let holder = svc
        .ready()
        .await
        .unwrap()
        .call(request("/holder", 1, false))
        .await
        .unwrap();
    // Called first, polled only later.
    let early = svc.ready().await.unwrap().call(request("/early", 2, false));
    let later = spawn(svc.ready().await.unwrap().call(request("/later", 3, false)));
    advance(SECOND).await;
    let early = spawn(early);
    settle().await;
    drop(holder);
    settle().await;
    assert_eq!(
        handled.paths(),
        ["/holder", "/early"],
        "the first call first"
    );
    drop(early.await.unwrap());
    settle().await;
    assert_eq!(handled.paths(), ["/holder", "/early", "/later"]);
    drop(later.await.unwrap());
    assert_eq!(guard.stats().active(), 0);
}

/// Patience runs from the service's `call`, not from the response
/// future's first poll.
#[tokio::test(start_paused = true)]
async fn patience_runs_from_the_call_not_from_the_first_poll() {
    let guard = guard(
        StreamGuardLayer::builder()
            .max_streams(1)
            .cap_wait(3 * SECOND),
    );
    let mut events = guard.subscribe();
    let handled = Handled::default();
    let mut svc = service(&handled, &guard);
    let holder = svc
        .ready()
        .await
        .unwrap()
        .call(request("/holder", 1, false))
        .await
        .unwrap();
    let late = svc.ready().await.unwrap().call(request("/late", 2, false));
    let called = Instant::now();
    advance(2 * SECOND).await;
    let refused = late.await.unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(called.elapsed(), 3 * SECOND, "3 s after the call");
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Rejected(StreamCap::Total));
    assert_eq!(event.duration(), 3 * SECOND);
    assert_eq!(event.path(), "/late");
    drop(holder);
}

fn is_idle(reason: EndReason) -> bool {
    matches!(
        reason,
        EndReason::IdleTimeout(IdleDirection::Request | IdleDirection::Response)
    )
}

/// A waiting stream is not yet admitted: it does not count as active, and
/// an idle timeout (about the peer's reading and sending) does not run
/// while it waits; waiting past its patience, it is refused.
#[tokio::test(start_paused = true)]
async fn a_waiting_stream_is_not_active_and_no_idle_timeout_cuts_it() {
    let guard = guard(
        StreamGuardLayer::builder()
            .max_streams(1)
            .response_idle_timeout(SECOND)
            .request_idle_timeout(SECOND)
            .cap_wait(5 * SECOND),
    );
    let mut events = guard.subscribe();
    let handled = Handled::default();
    let mut svc = service(&handled, &guard);

    let holder = svc
        .ready()
        .await
        .unwrap()
        .call(request("/holder", 1, false))
        .await
        .unwrap();
    let started = Instant::now();
    let waiter = spawn(
        svc.ready()
            .await
            .unwrap()
            .call(request("/waiter", 2, false)),
    );
    settle().await;
    assert_eq!(guard.active_streams(), 1, "the waiter is not active");
    assert_eq!(guard.stats().active(), 1);
    // The holder's own idle timeout ends it at 1 s and hands the slot on;
    // the waiter's, which would have come due at the same time, did not run.
    let event = next_event(&mut events).await;
    assert_eq!(event.path(), "/holder");
    assert!(is_idle(event.reason()), "{event:?}");
    drop(holder);
    settle().await;
    assert_eq!(handled.paths(), ["/holder", "/waiter"], "admitted");
    let admitted_at = started.elapsed();
    assert!(admitted_at >= SECOND, "{admitted_at:?}");
    assert_eq!(guard.active_streams(), 1);
    // Its idle clocks start at its admission, not at its call.
    let event = next_event(&mut events).await;
    assert_eq!(event.path(), "/waiter");
    assert!(is_idle(event.reason()), "{event:?}");
    let lived = event.duration();
    assert!(
        lived >= admitted_at + SECOND,
        "idle from admission at {admitted_at:?}: ended after {lived:?}"
    );
    drop(waiter.await.unwrap());
}

/// With a short idle timeout and a holder that stays busy, the waiter ends
/// as refused when its patience runs out: `503`, `rejected`, not a `504`.
#[tokio::test(start_paused = true)]
async fn a_waiter_past_its_patience_is_refused_not_timed_out_as_idle() {
    let guard = guard(
        StreamGuardLayer::builder()
            .max_streams(1)
            .response_idle_timeout(SECOND)
            .cap_wait(3 * SECOND)
            .route(
                "/holder",
                tower_stream_guard::RoutePolicy::new().response_idle_timeout(3600 * SECOND),
            ),
    );
    let mut events = guard.subscribe();
    let handled = Handled::default();
    let mut svc = service(&handled, &guard);
    let holder = svc
        .ready()
        .await
        .unwrap()
        .call(request("/holder", 1, false))
        .await
        .unwrap();
    let started = Instant::now();
    let refused = svc
        .ready()
        .await
        .unwrap()
        .call(request("/waiter", 2, false))
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()["stream-guard-reason"], "rejected");
    assert_eq!(started.elapsed(), 3 * SECOND);
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Rejected(StreamCap::Total));
    assert_eq!(handled.paths(), ["/holder"]);
    assert!(refused.into_body().collect().await.is_ok());
    drop(holder);
}
