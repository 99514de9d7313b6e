//! The status of the plain-HTTP answer the guard makes itself before the
//! service answered: the defaults (`408`, `504`) and `early_status`, under
//! paused time. The handler never answers: the guard does.

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{Empty, StreamBody};
use tokio::{sync::mpsc, task::JoinHandle, time::Instant};
use tower::{Layer, ServiceExt};
use tower_stream_guard::{
    ConfigError, EndReason, IdleDirection, StreamGuardBuilder, StreamGuardLayer, StreamHandle,
    stream::{RequestBody, ResponseBody},
};

#[path = "support/paused.rs"]
mod paused;
use paused::{SECOND, guard, next_event};

/// A request body that stays open and never sends a frame.
type Silent = StreamBody<futures_util::stream::Pending<Result<Frame<Bytes>, Infallible>>>;

/// A call the handler never answers.
struct Call {
    response: JoinHandle<Result<Response<ResponseBody<Empty<Bytes>>>, Infallible>>,
    /// Kept so that the request body stays open.
    request: Request<RequestBody<Silent>>,
    started: Instant,
}

impl Call {
    fn handle(&self) -> StreamHandle {
        self.request
            .extensions()
            .get::<StreamHandle>()
            .cloned()
            .expect("the guard puts a handle in the extensions")
    }

    /// The guard's answer.
    async fn answer(self) -> Response<ResponseBody<Empty<Bytes>>> {
        let response = self.response.await.unwrap().unwrap();
        drop(self.request);
        response
    }
}

/// Calls a guarded service whose handler hands its request to the test and
/// waits until its future is dropped.
async fn call(guard: &StreamGuardLayer, grpc: bool) -> Call {
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let service = guard.layer(tower::service_fn(
        move |request: Request<RequestBody<Silent>>| {
            let _ = seen_tx.send(request);
            std::future::pending::<Result<Response<Empty<Bytes>>, Infallible>>()
        },
    ));
    let mut request = Request::post("/work")
        .body(StreamBody::new(futures_util::stream::pending()))
        .unwrap();
    if grpc {
        request
            .headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
    }
    let started = Instant::now();
    let response = tokio::spawn(service.oneshot(request));
    let request = seen.recv().await.expect("service called");
    Call {
        response,
        request,
        started,
    }
}

#[tokio::test(start_paused = true)]
async fn a_handle_cancel_before_headers_answers_504_or_the_chosen_status() {
    for (builder, expected) in [
        (StreamGuardLayer::builder(), StatusCode::GATEWAY_TIMEOUT),
        (
            StreamGuardLayer::builder()
                .early_status(EndReason::Cancelled, StatusCode::SERVICE_UNAVAILABLE),
            StatusCode::SERVICE_UNAVAILABLE,
        ),
    ] {
        let guard = guard(builder);
        let mut events = guard.subscribe();
        let call = call(&guard, false).await;
        let started = call.started;
        assert!(call.handle().cancel());
        let response = call.answer().await;
        assert_eq!(started.elapsed(), std::time::Duration::ZERO);
        assert_eq!(response.status(), expected);
        assert_eq!(response.headers()["stream-guard-reason"], "cancelled");
        assert!(response.headers().get("retry-after").is_none());
        assert!(response.headers().get("grpc-status").is_none());
        assert_eq!(next_event(&mut events).await.reason(), EndReason::Cancelled);
    }
}

#[tokio::test(start_paused = true)]
async fn a_lifetime_before_headers_answers_the_chosen_status_last_one_set() {
    let guard = guard(
        StreamGuardLayer::builder()
            .max_lifetime(2 * SECOND)
            .early_status(
                EndReason::LifetimeExceeded,
                StatusCode::INTERNAL_SERVER_ERROR,
            )
            .early_status(EndReason::LifetimeExceeded, StatusCode::SERVICE_UNAVAILABLE),
    );
    let mut events = guard.subscribe();
    let call = call(&guard, false).await;
    let started = call.started;
    let response = call.answer().await;
    assert_eq!(started.elapsed(), 2 * SECOND);
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        response.headers()["stream-guard-reason"],
        "lifetime_exceeded"
    );
    // Not a refusal: no Retry-After, whatever the status.
    assert!(response.headers().get("retry-after").is_none());
    assert_eq!(
        next_event(&mut events).await.reason(),
        EndReason::LifetimeExceeded
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_stall_before_headers_answers_408_unless_another_status_is_chosen() {
    let request_idle = EndReason::IdleTimeout(IdleDirection::Request);
    for (builder, expected) in [
        (StreamGuardLayer::builder(), StatusCode::REQUEST_TIMEOUT),
        // Another direction's status leaves the request side alone.
        (
            StreamGuardLayer::builder().early_status(
                EndReason::IdleTimeout(IdleDirection::Response),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            StatusCode::REQUEST_TIMEOUT,
        ),
        (
            StreamGuardLayer::builder().early_status(request_idle, StatusCode::BAD_REQUEST),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let guard = guard(builder.request_idle_timeout(SECOND));
        let mut events = guard.subscribe();
        let call = call(&guard, false).await;
        let started = call.started;
        let response = call.answer().await;
        assert_eq!(started.elapsed(), SECOND);
        assert_eq!(response.status(), expected);
        assert_eq!(response.headers()["stream-guard-reason"], "idle_timeout");
        assert_eq!(next_event(&mut events).await.reason(), request_idle);
    }
}

#[tokio::test(start_paused = true)]
async fn grpc_streams_keep_their_trailers_only_answer() {
    let guard = guard(
        StreamGuardLayer::builder()
            .max_lifetime(SECOND)
            .early_status(EndReason::LifetimeExceeded, StatusCode::SERVICE_UNAVAILABLE)
            .early_status(EndReason::Cancelled, StatusCode::SERVICE_UNAVAILABLE),
    );
    let lifetime = call(&guard, true).await.answer().await;
    let cancel = call(&guard, true).await;
    assert!(cancel.handle().cancel());
    let cancel = cancel.answer().await;
    for (response, code) in [(lifetime, "4"), (cancel, "1")] {
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "application/grpc");
        assert_eq!(response.headers()["grpc-status"], code);
    }
}

#[test]
fn build_refuses_an_early_status_that_is_not_an_error() {
    let build = |status| {
        StreamGuardLayer::builder()
            .early_status(EndReason::Cancelled, status)
            .build()
    };
    for status in [StatusCode::OK, StatusCode::FOUND, StatusCode::CONTINUE] {
        let err = build(status).unwrap_err();
        assert_eq!(
            err,
            ConfigError::EarlyStatusNotError {
                reason: EndReason::Cancelled,
                status
            }
        );
        let text = err.to_string();
        assert!(text.contains("early_status"), "{text}");
        assert!(text.contains("4xx or 5xx"), "{text}");
    }
    for status in [StatusCode::TOO_MANY_REQUESTS, StatusCode::GATEWAY_TIMEOUT] {
        assert!(build(status).is_ok(), "{status}");
    }
    // The last status set for a reason is the one checked.
    let builder: StreamGuardBuilder = StreamGuardLayer::builder()
        .early_status(EndReason::Drained, StatusCode::OK)
        .early_status(EndReason::Drained, StatusCode::SERVICE_UNAVAILABLE);
    assert!(builder.build().is_ok());
}

// === the handle in the guard's own answers ===

/// The handle a response carries; the guard's own answers included.
fn handle_in(response: &Response<ResponseBody<Empty<Bytes>>>) -> StreamHandle {
    response
        .extensions()
        .get::<StreamHandle>()
        .cloned()
        .expect("response_handle(true) puts a handle in every response")
}

/// With `response_handle(true)`, the answers the guard makes itself carry
/// the handle too, already ended: a limit before headers (`504`), a cap's
/// refusal (`503`), in plain HTTP and gRPC.
#[tokio::test(start_paused = true)]
async fn the_guards_own_answers_carry_the_handle_when_asked() {
    for grpc in [false, true] {
        let guard = guard(
            StreamGuardLayer::builder()
                .response_handle(true)
                .max_lifetime(SECOND)
                .max_streams(1),
        );
        let mut events = guard.subscribe();
        let first = call(&guard, grpc).await;

        // The second stream is refused at once by the cap.
        let service = guard.layer(tower::service_fn(
            |_: Request<RequestBody<Empty<Bytes>>>| {
                std::future::ready(Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new())))
            },
        ));
        let mut request = Request::new(Empty::<Bytes>::new());
        if grpc {
            request
                .headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
        }
        let refused = service.oneshot(request).await.unwrap();
        let refused_handle = handle_in(&refused);
        let reason = EndReason::Rejected(tower_stream_guard::StreamCap::Total);
        assert_eq!(refused_handle.end_reason(), Some(reason), "grpc {grpc}");
        assert_eq!(refused_handle.cancelled().await, reason);
        assert_eq!(next_event(&mut events).await.reason(), reason);

        // The first reaches its lifetime before its handler answers.
        let expired = first.answer().await;
        let expired_handle = handle_in(&expired);
        assert!(expired_handle.is_ended());
        assert_eq!(
            expired_handle.cancelled().await,
            EndReason::LifetimeExceeded
        );
        assert_eq!(
            next_event(&mut events).await.reason(),
            EndReason::LifetimeExceeded
        );
    }
}

/// The control: without `response_handle`, no answer carries one.
#[tokio::test(start_paused = true)]
async fn without_response_handle_the_guards_answers_carry_none() {
    let guard = guard(StreamGuardLayer::builder().max_lifetime(SECOND));
    let expired = call(&guard, false).await.answer().await;
    assert_eq!(expired.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(expired.extensions().get::<StreamHandle>().is_none());
}
