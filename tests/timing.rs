//! Every trigger under paused time: exact firing times, exactly one event per
//! stream, the handle, and what each kind of body sees.
//!
//! Time is paused (`start_paused = true`): the runtime jumps to the next timer
//! whenever every task waits, so these tests take no wall-clock time and their
//! timings are exact. The guard's timer ticks every 10 ms from the moment its
//! first stream starts, so a deadline lands exactly on a tick.

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::{
    sync::{broadcast, mpsc, oneshot},
    time::{Instant, sleep},
};
use tower::{Layer, Service, ServiceExt};
use tower_stream_guard::{
    EndEvent, EndReason, GuardError, IdleDirection, StreamGuardLayer, StreamHandle,
    stream::{RequestBody, ResponseBody},
};

const SECOND: Duration = Duration::from_secs(1);
const TICK: Duration = Duration::from_millis(10);

/// A body fed through a channel; `tx` dropped = end of stream.
struct ChanBody {
    rx: mpsc::Receiver<Bytes>,
    size_hint: SizeHint,
}

fn channel_body() -> (mpsc::Sender<Bytes>, ChanBody) {
    let (tx, rx) = mpsc::channel(16);
    (
        tx,
        ChanBody {
            rx,
            size_hint: SizeHint::default(),
        },
    )
}

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|d| d.map(|d| Ok(Frame::data(d))))
    }

    fn size_hint(&self) -> SizeHint {
        self.size_hint
    }
}

type Seen = (
    Request<RequestBody<ChanBody>>,
    oneshot::Sender<Response<ChanBody>>,
);

/// A service that hands each request to the test and answers with whatever
/// the test sends back (never, if the test never does).
fn app(
    seen: mpsc::UnboundedSender<Seen>,
) -> impl Service<
    Request<RequestBody<ChanBody>>,
    Response = Response<ChanBody>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<Response<ChanBody>, Infallible>> + Send,
> + Clone {
    tower::service_fn(move |request: Request<RequestBody<ChanBody>>| {
        let seen = seen.clone();
        async move {
            let (respond, response) = oneshot::channel();
            let _ = seen.send((request, respond));
            Ok::<_, Infallible>(response.await.unwrap_or_else(|_| {
                let (_, body) = channel_body();
                Response::new(body)
            }))
        }
    })
}

struct Stream {
    response: tokio::task::JoinHandle<Result<Response<ResponseBody<ChanBody>>, Infallible>>,
    request: Request<RequestBody<ChanBody>>,
    respond: oneshot::Sender<Response<ChanBody>>,
    /// Feeds the request body.
    request_tx: mpsc::Sender<Bytes>,
    started: Instant,
}

impl Stream {
    fn handle(&self) -> StreamHandle {
        self.request
            .extensions()
            .get::<StreamHandle>()
            .cloned()
            .expect("the guard puts a handle in the extensions")
    }

    /// Answers with a channel-fed body; returns the response and its feeder.
    async fn answer(
        self,
    ) -> (
        Response<ResponseBody<ChanBody>>,
        mpsc::Sender<Bytes>,
        Request<RequestBody<ChanBody>>,
        mpsc::Sender<Bytes>,
    ) {
        let (tx, body) = channel_body();
        let mut response = Response::new(body);
        if self.request.headers().contains_key("content-type") {
            response.headers_mut().insert(
                "content-type",
                http::HeaderValue::from_static("application/grpc"),
            );
        }
        self.respond.send(response).ok().expect("service waits");
        let response = self.response.await.unwrap().unwrap();
        (response, tx, self.request, self.request_tx)
    }
}

async fn open(guard: &StreamGuardLayer, grpc: bool) -> Stream {
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let mut svc = guard.layer(app(seen_tx));
    let (request_tx, body) = channel_body();
    let mut request = Request::post("/echo.Echo/Bidi").body(body).unwrap();
    if grpc {
        request.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/grpc"),
        );
    }
    let started = Instant::now();
    let future = svc.ready().await.unwrap().call(request);
    let response = tokio::spawn(future);
    let (request, respond) = seen.recv().await.expect("service called");
    Stream {
        response,
        request,
        respond,
        request_tx,
        started,
    }
}

async fn next_event(events: &mut broadcast::Receiver<EndEvent>) -> EndEvent {
    tokio::time::timeout(Duration::from_secs(3600), events.recv())
        .await
        .expect("an end event within an hour of paused time")
        .expect("no events missed")
}

/// Lets spawned tasks run without moving the clock.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

fn assert_no_more_events(events: &mut broadcast::Receiver<EndEvent>) {
    match events.try_recv() {
        Err(broadcast::error::TryRecvError::Empty) => {}
        other => panic!("expected exactly one event per stream, got {other:?}"),
    }
}

fn guard(builder: tower_stream_guard::StreamGuardBuilder) -> StreamGuardLayer {
    builder.build().expect("valid configuration")
}

#[tokio::test(start_paused = true)]
async fn response_idle_fires_exactly_on_time_and_ends_with_deadline_exceeded_trailers() {
    let guard = guard(StreamGuardLayer::builder().response_idle_timeout(SECOND));
    let mut events = guard.subscribe();
    let stream = open(&guard, true).await;
    let started = stream.started;
    let handle = stream.handle();
    let (response, _tx, _request, _request_tx) = stream.answer().await;

    let event = next_event(&mut events).await;
    assert_eq!(started.elapsed(), SECOND);
    assert_eq!(event.duration(), SECOND);
    assert_eq!(
        event.reason(),
        EndReason::IdleTimeout(IdleDirection::Response)
    );
    assert_eq!(event.grpc_status(), Some(4));
    assert_eq!(event.limit(), Some(SECOND));
    assert_eq!(handle.end_reason(), event.reason().into());
    assert!(handle.is_ended());

    let mut body = response.into_body();
    let frame = body.frame().await.unwrap().unwrap();
    let trailers = frame.into_trailers().expect("trailers, not an error");
    assert_eq!(trailers["grpc-status"], "4");
    let message = trailers["grpc-message"].to_str().unwrap();
    assert!(message.contains("response_idle_timeout"), "{message}");
    assert_eq!(trailers["stream-guard-reason"], "idle_timeout");
    assert!(body.frame().await.is_none());
    assert!(body.is_end_stream());
    assert_eq!(guard.active_streams(), 0);
    assert_no_more_events(&mut events);
}

#[tokio::test(start_paused = true)]
async fn frames_push_the_idle_deadline_back() {
    let guard = guard(StreamGuardLayer::builder().response_idle_timeout(SECOND));
    let mut events = guard.subscribe();
    let stream = open(&guard, true).await;
    let started = stream.started;
    let (response, tx, _request, _request_tx) = stream.answer().await;
    let mut body = response.into_body();

    for _ in 0..3 {
        sleep(Duration::from_millis(700)).await;
        tx.send(Bytes::from_static(b"hello")).await.unwrap();
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "hello"
        );
    }
    let last_frame = started.elapsed();
    assert_eq!(last_frame, Duration::from_millis(2100));
    assert!(events.try_recv().is_err(), "active stream must not expire");

    let event = next_event(&mut events).await;
    let idle_for = started.elapsed() - last_frame;
    assert!(
        idle_for >= SECOND && idle_for <= SECOND + 2 * TICK,
        "fired {idle_for:?} after the last frame"
    );
    assert_eq!(event.response().frames, 3);
    assert_eq!(event.response().bytes, 15);
    assert_no_more_events(&mut events);
}

#[tokio::test(start_paused = true)]
async fn request_idle_fails_the_handlers_read_with_deadline_exceeded() {
    let guard = guard(StreamGuardLayer::builder().request_idle_timeout(SECOND));
    let mut events = guard.subscribe();
    let mut stream = open(&guard, true).await;
    let started = stream.started;

    stream
        .request_tx
        .send(Bytes::from_static(b"one"))
        .await
        .unwrap();
    let body = stream.request.body_mut();
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        "one"
    );
    // The client goes silent without half-closing: the read blocks until the
    // guard fires.
    let err = body.frame().await.unwrap().unwrap_err();
    // The frame at 0 s was stamped with the next tick's time: the guard never
    // fires early and at most two ticks late.
    assert_eq!(started.elapsed(), SECOND + TICK);
    let guard_error = err.downcast_ref::<GuardError>().expect("a GuardError");
    assert_eq!(
        guard_error.reason(),
        EndReason::IdleTimeout(IdleDirection::Request)
    );
    let status = tonic::Status::from_error(err);
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    assert!(status.message().contains("request_idle_timeout"));
    assert!(
        body.frame().await.is_none(),
        "the body ends after the error"
    );

    // The handler had not answered: the client gets a trailers-only response.
    let response = stream.response.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["grpc-status"], "4");
    assert!(response.body().is_end_stream());

    let event = next_event(&mut events).await;
    assert_eq!(event.request().frames, 1);
    assert_eq!(event.request().bytes, 3);
    assert_no_more_events(&mut events);
}

#[tokio::test(start_paused = true)]
async fn request_idle_stops_applying_once_the_request_body_ended() {
    let guard = guard(StreamGuardLayer::builder().request_idle_timeout(SECOND));
    let mut events = guard.subscribe();
    let mut stream = open(&guard, true).await;
    let request_tx = std::mem::replace(&mut stream.request_tx, mpsc::channel(1).0);
    drop(request_tx);
    assert!(stream.request.body_mut().frame().await.is_none());

    let started = stream.started;
    let (response, tx, _request, _) = stream.answer().await;
    sleep(5 * SECOND).await;
    assert!(
        events.try_recv().is_err(),
        "a finished request cannot be idle"
    );
    drop(tx);
    let mut body = response.into_body();
    assert!(body.frame().await.is_none());
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Completed);
    assert_eq!(started.elapsed(), 5 * SECOND);
}

#[tokio::test(start_paused = true)]
async fn idle_in_both_directions_needs_both_sides_quiet() {
    let guard = guard(StreamGuardLayer::builder().idle_timeout(SECOND));
    let mut events = guard.subscribe();
    let stream = open(&guard, true).await;
    let (response, tx, _request, _request_tx) = stream.answer().await;
    let mut body = response.into_body();

    // Only the response side moves, every 600 ms, for 3 s: never idle.
    for _ in 0..5 {
        sleep(Duration::from_millis(600)).await;
        tx.send(Bytes::from_static(b"x")).await.unwrap();
        body.frame().await.unwrap().unwrap();
    }
    assert!(events.try_recv().is_err());
    let quiet_from = Instant::now();
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::IdleTimeout(IdleDirection::Both));
    let quiet = quiet_from.elapsed();
    assert!(quiet >= SECOND && quiet <= SECOND + 2 * TICK, "{quiet:?}");
}

#[tokio::test(start_paused = true)]
async fn lifetime_before_headers_answers_trailers_only_for_grpc() {
    let guard = guard(StreamGuardLayer::builder().max_lifetime(2 * SECOND));
    let mut events = guard.subscribe();
    let stream = open(&guard, true).await;
    let response = stream.response.await.unwrap().unwrap();
    assert_eq!(stream.started.elapsed(), 2 * SECOND);
    assert_eq!(response.headers()["grpc-status"], "4");
    let message = response.headers()["grpc-message"].to_str().unwrap();
    assert!(message.contains("max_lifetime"), "{message}");
    assert_eq!(
        response.headers()["stream-guard-reason"],
        "lifetime_exceeded"
    );
    assert!(
        stream.respond.is_closed(),
        "the handler's future was dropped"
    );
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::LifetimeExceeded);
    assert_eq!(event.grpc_status(), Some(4));
}

#[tokio::test(start_paused = true)]
async fn lifetime_before_headers_answers_504_for_plain_http() {
    let guard = guard(StreamGuardLayer::builder().max_lifetime(2 * SECOND));
    let stream = open(&guard, false).await;
    let response = stream.response.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(response.headers().get("grpc-status").is_none());
    assert_eq!(
        response.headers()["stream-guard-reason"],
        "lifetime_exceeded"
    );
    assert!(response.headers().get("retry-after").is_none());
}

#[tokio::test(start_paused = true)]
async fn a_request_body_silent_before_headers_answers_408_for_plain_http() {
    let guard = guard(StreamGuardLayer::builder().request_idle_timeout(SECOND));
    let mut events = guard.subscribe();
    let stream = open(&guard, false).await;
    let response = stream.response.await.unwrap().unwrap();
    assert_eq!(stream.started.elapsed(), SECOND);
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
    assert_eq!(response.headers()["stream-guard-reason"], "idle_timeout");
    assert!(response.headers().get("retry-after").is_none());
    let event = next_event(&mut events).await;
    assert_eq!(
        event.reason(),
        EndReason::IdleTimeout(IdleDirection::Request)
    );
    drop(stream.request_tx);
}

#[tokio::test(start_paused = true)]
async fn a_response_side_idle_before_headers_still_answers_504_for_plain_http() {
    for builder in [
        StreamGuardLayer::builder().response_idle_timeout(SECOND),
        StreamGuardLayer::builder().idle_timeout(SECOND),
    ] {
        let layer = guard(builder);
        let stream = open(&layer, false).await;
        let response = stream.response.await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        drop(stream.request_tx);
    }
}

#[tokio::test(start_paused = true)]
async fn lifetime_cuts_a_busy_stream_at_exactly_its_lifetime() {
    let guard = guard(
        StreamGuardLayer::builder()
            .idle_timeout(SECOND)
            .max_lifetime(3 * SECOND),
    );
    let mut events = guard.subscribe();
    let stream = open(&guard, true).await;
    let started = stream.started;
    let (response, tx, _request, _request_tx) = stream.answer().await;
    let mut body = response.into_body();
    let producer = tokio::spawn(async move {
        loop {
            sleep(Duration::from_millis(100)).await;
            if tx.send(Bytes::from_static(b"tick")).await.is_err() {
                return;
            }
        }
    });
    let mut frames = 0;
    let trailers = loop {
        let frame = body.frame().await.unwrap().unwrap();
        match frame.into_data() {
            Ok(_) => frames += 1,
            Err(frame) => break frame.into_trailers().unwrap(),
        }
    };
    assert_eq!(trailers["grpc-status"], "4");
    assert_eq!(started.elapsed(), 3 * SECOND);
    assert!(frames >= 29, "{frames} frames before the cut");
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::LifetimeExceeded);
    assert_eq!(event.response().frames, frames);
    // The guard let go of the inner body, so the producer's next send fails.
    tokio::time::timeout(SECOND, producer)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn plain_http_body_errors_when_the_guard_fires() {
    let guard = guard(StreamGuardLayer::builder().response_idle_timeout(SECOND));
    let stream = open(&guard, false).await;
    let (response, _tx, _request, _request_tx) = stream.answer().await;
    let err = response.into_body().frame().await.unwrap().unwrap_err();
    let err = err.downcast_ref::<GuardError>().expect("a GuardError");
    assert_eq!(err.limit(), SECOND);
}

#[tokio::test(start_paused = true)]
async fn stalled_reader_is_released_without_the_body_being_polled() {
    let guard = guard(StreamGuardLayer::builder().response_idle_timeout(SECOND));
    let mut events = guard.subscribe();
    let stream = open(&guard, true).await;
    let handle = stream.handle();
    let started = stream.started;
    // The body is held, as hyper holds it, and never polled.
    let (response, _tx, _request, _request_tx) = stream.answer().await;
    let reason = handle.cancelled().await;
    assert_eq!(reason, EndReason::IdleTimeout(IdleDirection::Response));
    assert_eq!(started.elapsed(), SECOND);
    assert_eq!(guard.active_streams(), 0);
    assert_eq!(next_event(&mut events).await.reason(), reason);
    drop(response);
    settle().await;
    assert_no_more_events(&mut events);
}

#[tokio::test(start_paused = true)]
async fn completed_stream_emits_one_event_and_resolves_the_handle() {
    let guard = guard(
        StreamGuardLayer::builder()
            .idle_timeout(SECOND)
            .max_lifetime(10 * SECOND),
    );
    let mut events = guard.subscribe();
    let stream = open(&guard, true).await;
    let handle = stream.handle();
    sleep(Duration::from_millis(250)).await;
    let remaining = handle.remaining_lifetime().unwrap();
    assert_eq!(remaining, Duration::from_millis(9750));
    let (response, tx, request, _request_tx) = stream.answer().await;
    tx.send(Bytes::from_static(b"a")).await.unwrap();
    drop(tx);
    let mut body = response.into_body();
    assert!(body.frame().await.unwrap().unwrap().is_data());
    assert!(body.frame().await.is_none());
    assert_eq!(handle.cancelled().await, EndReason::Completed);
    drop(body);
    drop(request);
    settle().await;
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Completed);
    assert_eq!(event.method(), http::Method::POST);
    assert_eq!(event.path(), "/echo.Echo/Bidi");
    assert_eq!(event.id(), handle.id());
    assert_no_more_events(&mut events);
    assert_eq!(guard.active_streams(), 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_body_early_is_a_cancellation() {
    let guard = guard(StreamGuardLayer::builder().idle_timeout(SECOND));
    let mut events = guard.subscribe();
    let stream = open(&guard, true).await;
    let (response, tx, _request, _request_tx) = stream.answer().await;
    tx.send(Bytes::from_static(b"a")).await.unwrap();
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Cancelled);
    sleep(5 * SECOND).await;
    assert_no_more_events(&mut events);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_response_future_is_a_cancellation() {
    let guard = guard(StreamGuardLayer::builder().idle_timeout(SECOND));
    let mut events = guard.subscribe();
    let stream = open(&guard, true).await;
    stream.response.abort();
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Cancelled);
    assert!(event.duration() < TICK);
    assert_eq!(guard.active_streams(), 0);
}

#[tokio::test(start_paused = true)]
async fn service_error_is_reported_as_error() {
    let guard = guard(StreamGuardLayer::builder().idle_timeout(SECOND));
    let mut events = guard.subscribe();
    let svc = guard.layer(tower::service_fn(|_: Request<RequestBody<String>>| async {
        Err::<Response<String>, _>("boom")
    }));
    let result = svc.oneshot(Request::new(String::new())).await;
    assert_eq!(result.unwrap_err(), "boom");
    assert_eq!(next_event(&mut events).await.reason(), EndReason::Error);
}

#[tokio::test(start_paused = true)]
async fn end_of_stream_and_size_hint_are_forwarded() {
    let guard = guard(StreamGuardLayer::builder().idle_timeout(SECOND));
    let mut events = guard.subscribe();
    let svc = guard.layer(tower::service_fn(|_: Request<RequestBody<String>>| async {
        Ok::<_, Infallible>(Response::new(http_body_util::Full::new(
            Bytes::from_static(b"12345"),
        )))
    }));
    let response = svc.oneshot(Request::new(String::new())).await.unwrap();
    let mut body = response.into_body();
    assert_eq!(body.size_hint().exact(), Some(5));
    assert!(!body.is_end_stream());
    body.frame().await.unwrap().unwrap();
    assert!(body.is_end_stream());
    // hyper stops here, without polling for the end: the stream completed.
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Completed);
    assert_eq!(event.response().bytes, 5);
    drop(body);
    settle().await;
    assert_no_more_events(&mut events);
}

#[tokio::test(start_paused = true)]
async fn empty_response_body_completes_at_once() {
    let guard = guard(StreamGuardLayer::builder().idle_timeout(SECOND));
    let mut events = guard.subscribe();
    let svc = guard.layer(tower::service_fn(|_: Request<RequestBody<String>>| async {
        Ok::<_, Infallible>(Response::new(http_body_util::Empty::<Bytes>::new()))
    }));
    let response = svc.oneshot(Request::new(String::new())).await.unwrap();
    assert!(response.body().is_end_stream());
    assert_eq!(next_event(&mut events).await.reason(), EndReason::Completed);
    drop(response);
    settle().await;
    assert_no_more_events(&mut events);
}

#[tokio::test(start_paused = true)]
async fn request_size_hint_is_forwarded() {
    let guard = guard(StreamGuardLayer::builder().idle_timeout(SECOND));
    let mut stream = open(&guard, false).await;
    assert_eq!(stream.request.body().size_hint().lower(), 0);
    assert!(!stream.request.body().is_end_stream());
    drop(std::mem::replace(
        &mut stream.request_tx,
        mpsc::channel(1).0,
    ));
    assert!(stream.request.body_mut().frame().await.is_none());
    assert!(stream.request.body().is_end_stream());
}

/// Nested guards are independent: the inner one fires its own limit and
/// emits its own event; the outer one sees the inner body's error as the
/// stream's end. The handler's handle is the innermost guard's.
#[tokio::test(start_paused = true)]
async fn nested_guards_each_enforce_their_own_limit_and_emit_their_own_event() {
    let outer = guard(StreamGuardLayer::builder().max_lifetime(10 * SECOND));
    let inner = guard(StreamGuardLayer::builder().response_idle_timeout(SECOND));
    let mut outer_events = outer.subscribe();
    let mut inner_events = inner.subscribe();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen_in_app = seen.clone();
    let svc = tower::ServiceBuilder::new()
        .layer(outer.clone())
        .layer(inner.clone())
        .service(tower::service_fn(
            move |request: Request<RequestBody<RequestBody<String>>>| {
                let handle = request.extensions().get::<StreamHandle>().cloned();
                let (tx, body) = channel_body();
                // Keep the sender: the body stays open and silent.
                seen_in_app.lock().unwrap().push((handle, tx));
                async { Ok::<_, Infallible>(Response::new(body)) }
            },
        ));
    let started = Instant::now();
    let response = svc.oneshot(Request::new(String::new())).await.unwrap();
    // The inner guard fired (1 s), not the outer one (10 s).
    let err = response.into_body().frame().await.unwrap().unwrap_err();
    assert_eq!(started.elapsed(), SECOND);
    let inner_end = next_event(&mut inner_events).await;
    assert_eq!(
        inner_end.reason(),
        EndReason::IdleTimeout(IdleDirection::Response)
    );
    let outer_end = next_event(&mut outer_events).await;
    assert_eq!(outer_end.reason(), EndReason::Error, "{err}");
    assert_ne!(outer_end.id(), inner_end.id());
    let handle = seen.lock().unwrap()[0].0.clone().expect("a handle");
    assert_eq!(handle.id(), inner_end.id(), "the innermost guard's handle");
    assert_eq!(outer.active_streams() + inner.active_streams(), 0);
    settle().await;
    assert_no_more_events(&mut outer_events);
    assert_no_more_events(&mut inner_events);
}

#[tokio::test(start_paused = true)]
async fn timer_task_exits_when_the_guard_has_no_streams() {
    let baseline = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let guard = guard(StreamGuardLayer::builder().idle_timeout(SECOND));
    let mut events = guard.subscribe();
    let stream = open(&guard, true).await;
    let (response, _tx, _request, _request_tx) = stream.answer().await;
    next_event(&mut events).await;
    drop(response);
    sleep(5 * TICK).await;
    settle().await;
    assert_eq!(
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks(),
        baseline
    );
    // A new stream starts the timer again.
    let stream = open(&guard, true).await;
    let started = stream.started;
    let (_response, _tx, _request, _request_tx) = stream.answer().await;
    next_event(&mut events).await;
    assert_eq!(started.elapsed(), SECOND);
}

#[test]
fn bad_configuration_fails_when_the_layer_is_built() {
    let err = StreamGuardLayer::builder()
        .idle_timeout(Duration::ZERO)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("idle_timeout"), "{err}");
    // Harmless (the idle timeout can never fire first): accepted.
    assert!(
        StreamGuardLayer::builder()
            .request_idle_timeout(Duration::from_secs(60))
            .max_lifetime(Duration::from_secs(10))
            .build()
            .is_ok()
    );
    assert!(
        StreamGuardLayer::builder()
            .max_lifetime(Duration::from_secs(400 * 24 * 3600))
            .build()
            .is_err()
    );
    assert!(
        StreamGuardLayer::builder()
            .event_capacity(0)
            .build()
            .is_err()
    );
}

#[tokio::test(start_paused = true)]
async fn lagging_subscriber_is_told_how_many_events_it_missed() {
    let guard = guard(
        StreamGuardLayer::builder()
            .response_idle_timeout(SECOND)
            .event_capacity(2),
    );
    let mut slow = guard.subscribe();
    let mut streams = Vec::new();
    for _ in 0..5 {
        streams.push(open(&guard, true).await.answer().await);
    }
    // Nobody reads `slow` while all five streams expire together.
    sleep(2 * SECOND).await;
    assert_eq!(guard.active_streams(), 0);
    assert_eq!(
        slow.recv().await.unwrap_err(),
        broadcast::error::RecvError::Lagged(3)
    );
    assert!(slow.recv().await.is_ok());
    assert!(slow.recv().await.is_ok());
    assert_no_more_events(&mut slow);
}

/// A service that never answers, for whatever request body.
fn never_answers<B>() -> impl Service<
    Request<B>,
    Response = Response<String>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<Response<String>, Infallible>> + Send,
> + Clone {
    tower::service_fn(|_: Request<B>| std::future::pending())
}

#[test]
fn a_layer_outlives_the_runtime_that_started_its_timer() {
    let guard = guard(StreamGuardLayer::builder().max_lifetime(2 * SECOND));
    let mut svc = guard.layer(never_answers());
    // Runtime A files a stream (spawning the timer task) and shuts down
    // before that task ever runs.
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pending = {
        let _entered = first.enter();
        svc.call(Request::new(String::new()))
    };
    drop(first);
    drop(pending);
    // Runtime B must get a working timer of its own.
    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    second.block_on(async {
        let started = Instant::now();
        let response = tokio::time::timeout(3600 * SECOND, svc.call(Request::new(String::new())))
            .await
            .expect("the lifetime fires on the second runtime")
            .unwrap();
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(started.elapsed(), 2 * SECOND);
    });
}

#[tokio::test(start_paused = true)]
async fn an_inner_layer_called_later_still_gets_its_limit_enforced() {
    // The outer layer has no limit of its own, and something between the
    // layers calls the inner one only after the outer call returned.
    let outer = guard(StreamGuardLayer::builder());
    let lifetime = guard(StreamGuardLayer::builder().max_lifetime(SECOND));
    let inner = lifetime.layer(never_answers());
    let deferring = tower::service_fn(move |request| {
        let mut inner = inner.clone();
        async move {
            tokio::task::yield_now().await;
            inner.call(request).await
        }
    });
    let started = Instant::now();
    let response = tokio::time::timeout(
        3600 * SECOND,
        outer.layer(deferring).oneshot(Request::new(String::new())),
    )
    .await
    .expect("the inner layer's lifetime fires")
    .unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(started.elapsed(), SECOND);
}

type Frames = futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>;

/// A gRPC response: one message, then trailers.
fn grpc_reply() -> http_body_util::StreamBody<Frames> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    http_body_util::StreamBody::new(futures_util::stream::iter(vec![
        Ok(Frame::data(Bytes::from_static(b"reply"))),
        Ok(Frame::trailers(trailers)),
    ]))
}

/// Ends with trailers: the end is decided when the trailers go out (no
/// guard can fire after them, the handle says `Completed`), and recorded
/// (event, wake-ups) once the body is dropped or polled again, so nothing
/// runs between hyper sending the last DATA frame and the trailers.
#[tokio::test(start_paused = true)]
async fn a_body_ending_with_trailers_completes_when_dropped_or_polled_again() {
    let guard = guard(StreamGuardLayer::builder().idle_timeout(SECOND));
    let mut events = guard.subscribe();
    let service = guard.layer(tower::service_fn(
        |request: Request<RequestBody<ChanBody>>| {
            let handle = request.extensions().get::<StreamHandle>().cloned();
            async move {
                let response = Response::builder()
                    .header("content-type", "application/grpc")
                    .extension(handle)
                    .body(grpc_reply())
                    .unwrap();
                Ok::<_, Infallible>(response)
            }
        },
    ));
    for poll_again in [false, true] {
        let (_tx, body) = channel_body();
        let request = Request::builder()
            .header("content-type", "application/grpc")
            .body(body)
            .unwrap();
        let response = service.clone().oneshot(request).await.unwrap();
        let handle = response
            .extensions()
            .get::<Option<StreamHandle>>()
            .cloned()
            .flatten()
            .expect("the handler's handle");
        let mut body = response.into_body();
        assert!(body.frame().await.unwrap().unwrap().is_data());
        assert!(body.frame().await.unwrap().unwrap().is_trailers());
        assert_eq!(handle.end_reason(), Some(EndReason::Completed));
        // Kept well past the idle timeout: nothing fires, nothing is emitted.
        sleep(3 * SECOND).await;
        assert!(events.try_recv().is_err(), "no event before the drop");
        if poll_again {
            assert!(body.frame().await.is_none());
            assert!(body.is_end_stream());
        } else {
            drop(body);
        }
        let event = next_event(&mut events).await;
        assert_eq!(event.reason(), EndReason::Completed);
        assert_eq!(event.grpc_status(), Some(0));
        assert_eq!(event.response().frames, 1);
        assert_eq!(event.duration(), 3 * SECOND);
        assert_eq!(handle.cancelled().await, EndReason::Completed);
        assert_no_more_events(&mut events);
        assert_eq!(guard.active_streams(), 0);
    }
}

/// A response body that, on its first poll, lets the stream be ended under it
/// (as the guard's timer can on another thread, between the guard body's
/// "still open?" check and this poll) and then ends the way a tonic body
/// does once its producer stopped on `cancelled()`: OK trailers, or plainly.
struct EndsUnderTheGuard {
    handle: Option<StreamHandle>,
    trailers: bool,
}

impl Body for EndsUnderTheGuard {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let Some(handle) = self.handle.take() else {
            return Poll::Ready(None);
        };
        assert!(handle.cancel(), "the stream was still open");
        if !self.trailers {
            return Poll::Ready(None);
        }
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }
}

/// The end is whoever decided it first: a body that finishes normally just
/// after a guard ended its stream still ends the guard's way, so the peer
/// reads the same status as the end event reports (found by the chaos soak:
/// a stream cut at its lifetime reached its client as OK).
#[tokio::test(start_paused = true)]
async fn a_body_finishing_after_the_guard_ended_its_stream_ends_the_guards_way() {
    let guard = guard(StreamGuardLayer::builder().idle_timeout(SECOND));
    let mut events = guard.subscribe();
    for (grpc, trailers) in [(true, true), (true, false), (false, false)] {
        let service = guard.layer(tower::service_fn(
            move |request: Request<RequestBody<ChanBody>>| {
                let handle = request.extensions().get::<StreamHandle>().cloned();
                async move {
                    let mut response = Response::new(EndsUnderTheGuard { handle, trailers });
                    if grpc {
                        response.headers_mut().insert(
                            "content-type",
                            http::HeaderValue::from_static("application/grpc"),
                        );
                    }
                    Ok::<_, Infallible>(response)
                }
            },
        ));
        let (_tx, body) = channel_body();
        let mut request = Request::new(body);
        if grpc {
            request.headers_mut().insert(
                "content-type",
                http::HeaderValue::from_static("application/grpc"),
            );
        }
        let mut body = service.oneshot(request).await.unwrap().into_body();
        let case = format!("grpc {grpc}, inner trailers {trailers}");
        match body.frame().await {
            Some(Ok(frame)) if grpc => {
                let trailers = frame.into_trailers().expect("the guard's trailers");
                assert_eq!(trailers["grpc-status"], "1", "{case}");
            }
            Some(Err(err)) if !grpc => {
                let err = err.downcast_ref::<GuardError>().expect("a GuardError");
                assert_eq!(err.reason(), EndReason::Cancelled, "{case}");
            }
            other => panic!("{case}: the guard's ending expected, got {other:?}"),
        }
        assert!(body.frame().await.is_none(), "{case}");
        let event = next_event(&mut events).await;
        assert_eq!(event.reason(), EndReason::Cancelled, "{case}");
        assert_eq!(event.grpc_status(), grpc.then_some(1), "{case}");
        drop(body);
        assert_no_more_events(&mut events);
        assert_eq!(guard.active_streams(), 0, "{case}");
    }
}

/// A runtime so busy that the guard's timer ticks late (here: its only
/// thread blocked between frames, 800 ms in all) must not make a stream
/// that kept moving look idle: frames stamped while the tick was late count
/// as recent as the late tick itself. Real time, one thread: the blocking
/// is the overload, not a wait for the guard.
#[tokio::test(flavor = "current_thread")]
async fn a_late_timer_tick_does_not_end_a_stream_that_kept_moving() {
    let guard =
        guard(StreamGuardLayer::builder().response_idle_timeout(Duration::from_millis(300)));
    let stream = open(&guard, false).await;
    let handle = stream.handle();
    let (response, tx, _request, _request_tx) = stream.answer().await;
    let mut body = response.into_body();
    // Let the timer task start and tick once on time.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    for _ in 0..8 {
        tx.try_send(Bytes::from_static(b"frame")).unwrap();
        assert!(body.frame().await.unwrap().unwrap().is_data());
        // Blocks the runtime's only thread: the timer cannot tick.
        std::thread::sleep(Duration::from_millis(100));
    }
    // The timer's late tick runs now.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        handle.end_reason(),
        None,
        "a moving stream was ended as idle"
    );
    drop(body);
    assert_eq!(handle.cancelled().await, EndReason::Cancelled);
}
