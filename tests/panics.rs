//! Whatever unwinds through the guard ends the stream, exactly once: a
//! handler that panics before answering (in `call` or in its future), a
//! response body that panics mid-stream, a service whose future fails.
//!
//! Each scenario holds the only slot of `max_streams(1)` and has a producer
//! waiting on the stream's `cancelled()` (as the README shows): it keeps the
//! stream's record alive, so only the guard's own structure can end the
//! stream. Paused time; tokio catches each panic in the task that polled it.

#[path = "support/paused.rs"]
mod paused;

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty};
use paused::{SECOND, guard, next_event, request};
use tokio::sync::oneshot;
use tower::{Layer, Service, ServiceExt};
use tower_stream_guard::{EndReason, Heartbeat, StreamGuardLayer, StreamHandle};

/// A response body that yields one frame and panics on the next poll.
struct PanicsOnSecondFrame(bool);

impl Body for PanicsOnSecondFrame {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.0 {
            panic!("response body panics mid-stream");
        }
        self.0 = true;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"first")))))
    }
}

/// A response body whose frames are fine but which panics when asked
/// whether it is at its end, as the guard's wrapper does after each frame
/// and hyper does between polls.
struct PanicsOnIsEndStream;

impl Body for PanicsOnIsEndStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"frame")))))
    }

    fn is_end_stream(&self) -> bool {
        panic!("is_end_stream panics");
    }
}

/// What the producer of the stream under test was told when its stream
/// ended: a handler spawns it on the stream's `cancelled()`.
#[derive(Clone, Default)]
struct Producer(Arc<Mutex<Option<oneshot::Receiver<EndReason>>>>);

impl Producer {
    fn spawn<B>(&self, request: &Request<B>) {
        let handle = request
            .extensions()
            .get::<StreamHandle>()
            .cloned()
            .expect("the guard's handle");
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let _ = tx.send(handle.cancelled().await);
        });
        *self.0.lock().unwrap() = Some(rx);
    }

    fn told(&self) -> oneshot::Receiver<EndReason> {
        self.0
            .lock()
            .unwrap()
            .take()
            .expect("a producer was spawned")
    }
}

fn one_slot() -> StreamGuardLayer {
    guard(StreamGuardLayer::builder().max_streams(1))
}

/// After the stream that failed: its one event, its producer told, its slot
/// back (a new stream is admitted), nothing active.
async fn assert_ended_and_slot_back(
    guard: &StreamGuardLayer,
    events: &mut tokio::sync::broadcast::Receiver<tower_stream_guard::EndEvent>,
    producer: oneshot::Receiver<EndReason>,
    expected: EndReason,
) {
    let event = next_event(events).await;
    assert_eq!(event.reason(), expected);
    assert_eq!(
        tokio::time::timeout(SECOND, producer).await,
        Ok(Ok(expected)),
        "the producer waiting on cancelled() is told"
    );
    assert_eq!(guard.stats().active(), 0);
    assert_eq!(guard.stats().ended(expected), 1);

    // The slot is back: the next stream is admitted.
    let mut next = guard.layer(tower::service_fn(|_: Request<_>| async {
        Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
    }));
    let response = next
        .ready()
        .await
        .unwrap()
        .call(request("/next", 1, false))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(events.try_recv().is_ok(), "the next stream's own event");
    assert!(
        events.try_recv().is_err(),
        "one event for the failed stream"
    );
}

#[tokio::test(start_paused = true)]
async fn a_handler_future_that_panics_ends_its_stream_and_frees_its_slot() {
    let guard = one_slot();
    let mut events = guard.subscribe();
    let producer = Producer::default();
    let spawned = producer.clone();
    let mut svc = guard.layer(tower::service_fn(move |request: Request<_>| {
        spawned.spawn(&request);
        async move {
            panic!("handler panics before answering");
            #[allow(unreachable_code)]
            Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
        }
    }));
    let future = svc
        .ready()
        .await
        .unwrap()
        .call(request("/panics", 1, false));
    let outcome = tokio::spawn(future).await;
    assert!(outcome.unwrap_err().is_panic());
    assert_ended_and_slot_back(&guard, &mut events, producer.told(), EndReason::Panicked).await;
}

#[tokio::test(start_paused = true)]
async fn a_service_whose_call_panics_ends_its_stream_and_frees_its_slot() {
    let guard = one_slot();
    let mut events = guard.subscribe();
    let producer = Producer::default();
    let spawned = producer.clone();
    let svc = guard.layer(tower::service_fn(move |request: Request<_>| {
        spawned.spawn(&request);
        panic!("call panics");
        #[allow(unreachable_code)]
        async {
            Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
        }
    }));
    let outcome = tokio::spawn(async move {
        let mut svc = svc;
        drop(svc.call(request("/panics", 1, false)));
    })
    .await;
    assert!(outcome.unwrap_err().is_panic());
    assert_ended_and_slot_back(&guard, &mut events, producer.told(), EndReason::Panicked).await;
}

#[tokio::test(start_paused = true)]
async fn a_response_body_that_panics_mid_stream_ends_its_stream_and_frees_its_slot() {
    let guard = one_slot();
    let mut events = guard.subscribe();
    let producer = Producer::default();
    let spawned = producer.clone();
    let mut svc = guard.layer(tower::service_fn(move |request: Request<_>| {
        spawned.spawn(&request);
        async { Ok::<_, Infallible>(Response::new(PanicsOnSecondFrame(false))) }
    }));
    let response = svc
        .ready()
        .await
        .unwrap()
        .call(request("/body-panics", 1, false))
        .await
        .unwrap();
    let outcome = tokio::spawn(async move {
        let mut body = response.into_body();
        while body.frame().await.is_some() {}
    })
    .await;
    assert!(outcome.unwrap_err().is_panic());
    assert_ended_and_slot_back(&guard, &mut events, producer.told(), EndReason::Panicked).await;
}

#[tokio::test(start_paused = true)]
async fn a_service_future_that_fails_ends_its_stream_as_error_and_frees_its_slot() {
    let guard = one_slot();
    let mut events = guard.subscribe();
    let producer = Producer::default();
    let spawned = producer.clone();
    let mut svc = guard.layer(tower::service_fn(move |request: Request<_>| {
        spawned.spawn(&request);
        async { Err::<Response<Empty<Bytes>>, _>("the service failed") }
    }));
    let outcome = svc
        .ready()
        .await
        .unwrap()
        .call(request("/fails", 1, false))
        .await;
    assert!(outcome.is_err());
    assert_ended_and_slot_back(&guard, &mut events, producer.told(), EndReason::Error).await;
}

/// A request whose body is already at its end (a GET, an SSE subscription)
/// has no request side to wait for: the request idle timeout never cuts it
/// while its response keeps moving.
#[tokio::test(start_paused = true)]
async fn a_bodyless_request_is_never_cut_by_the_request_idle_timeout() {
    let guard = guard(StreamGuardLayer::builder().request_idle_timeout(SECOND));
    let mut events = guard.subscribe();
    let (app, mut feeders) = paused::App::new();
    let mut svc = guard.layer(app.service());
    let response = paused::call(&mut svc, request("/sse", 1, false)).await;
    let feeder = feeders.recv().await.unwrap();
    let mut body = response.into_body();
    for _ in 0..30 {
        tokio::time::advance(SECOND / 10).await;
        feeder.send(Bytes::from_static(b"tick")).await.unwrap();
        let frame = body.frame().await.expect("a frame").expect("not cut");
        assert!(frame.is_data());
    }
    assert!(events.try_recv().is_err(), "not cut after 3 s of streaming");
    drop(feeder);
    assert!(body.frame().await.is_none());
    assert_eq!(next_event(&mut events).await.reason(), EndReason::Completed);
}

/// `call` panics on a runtime that has shut down: the task that would finish
/// the end (it is not finished during the unwinding) is dropped unrun, and
/// the end is finished all the same: one event, the slot back.
#[test]
fn a_call_that_panics_on_a_runtime_that_shut_down_still_ends_its_stream() {
    let guard = StreamGuardLayer::builder().max_streams(1).build().unwrap();
    let mut events = guard.subscribe();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let handle = runtime.handle().clone();
    runtime.shutdown_background();
    let svc = guard.layer(tower::service_fn(|_: Request<_>| {
        panic!("call panics");
        #[allow(unreachable_code)]
        async {
            Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
        }
    }));
    let outcome = std::thread::spawn(move || {
        let _entered = handle.enter();
        let mut svc = svc;
        drop(svc.call(request("/panics", 1, false)));
    })
    .join();
    assert!(outcome.is_err(), "call panicked");
    let event = events.try_recv().expect("the end event, already emitted");
    assert_eq!(event.reason(), EndReason::Panicked);
    assert_eq!(guard.stats().active(), 0);
    assert!(events.try_recv().is_err(), "one event");
}

/// Opens a stream on `guard` whose response body is `body`, with a producer
/// waiting on its `cancelled()`, and reads the body to its end, as hyper's
/// connection task does: on a task of its own, which must panic.
async fn read_on_a_task_that_panics<B>(guard: &StreamGuardLayer, path: &str, body: B) -> Producer
where
    B: Body<Data = Bytes, Error = Infallible> + Send + Unpin + 'static,
{
    let producer = Producer::default();
    let spawned = producer.clone();
    let body = Arc::new(Mutex::new(Some(body)));
    let mut svc = guard.layer(tower::service_fn(move |request: Request<_>| {
        spawned.spawn(&request);
        let body = body.lock().unwrap().take().expect("one stream");
        async { Ok::<_, Infallible>(Response::new(body)) }
    }));
    let request = request(path, 1, false);
    let outcome = tokio::spawn(async move {
        let response = svc.ready().await.unwrap().call(request).await.unwrap();
        let mut body = response.into_body();
        while body.frame().await.is_some() {}
    })
    .await;
    assert!(outcome.unwrap_err().is_panic());
    producer
}

/// The heartbeat's predicate is the user's code, run on each response data
/// frame: its panic ends the stream as `panicked`, as the body's would.
#[tokio::test(start_paused = true)]
async fn a_heartbeat_predicate_that_panics_ends_its_stream_as_panicked() {
    let guard = guard(
        StreamGuardLayer::builder()
            .max_streams(1)
            .heartbeat(Heartbeat::new(|_| panic!("the heartbeat predicate panics"))),
    );
    let mut events = guard.subscribe();
    let producer = read_on_a_task_that_panics(&guard, "/beats", PanicsOnSecondFrame(false)).await;
    assert_ended_and_slot_back(&guard, &mut events, producer.told(), EndReason::Panicked).await;
}

/// The response body's `is_end_stream`, which the guard asks after each
/// frame, is the body's code too.
#[tokio::test(start_paused = true)]
async fn a_response_body_whose_is_end_stream_panics_ends_its_stream_as_panicked() {
    let guard = one_slot();
    let mut events = guard.subscribe();
    let producer = read_on_a_task_that_panics(&guard, "/end-panics", PanicsOnIsEndStream).await;
    assert_ended_and_slot_back(&guard, &mut events, producer.told(), EndReason::Panicked).await;
}
