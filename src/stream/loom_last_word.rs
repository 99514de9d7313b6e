//! loom models of the races in which the service's last part (its answer
//! with nothing after the head, its body's last data frame) meets a guard's
//! end: whichever part the peer reads last, the end event gives its reason
//! (see `last_word.rs`). The helpers are `loom_tests.rs`'s.

use std::{
    convert::Infallible,
    future::Future,
    pin::{Pin, pin},
    sync::Arc,
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use http_body::{Body, Frame};
use loom::thread;

use super::{
    future::{ForResponse, Gate, ResponseFuture},
    layer::StreamGuardLayer,
    loom_tests::{Script, ended, ok_trailers, opened, start},
    response_body::ResponseBody,
};
use crate::{
    end::{EndReason, Ending},
    error::BoxError,
    grpc,
};

/// A service future that answers at once with a trailers-only gRPC OK: a
/// head with `grpc-status: 0` and a body already at its end.
struct AnswersOk;

impl Future for AnswersOk {
    type Output = Result<http::Response<Script>, Infallible>;

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        let mut response = http::Response::new(Script::frames([]));
        let headers = response.headers_mut();
        headers.insert("content-type", "application/grpc".parse().unwrap());
        headers.extend(ok_trailers());
        Poll::Ready(Ok(response))
    }
}

/// The service's answer, with nothing after its head (a trailers-only gRPC
/// OK), against the sweeper firing a limit while the service is polled:
/// the peer reads the handler's `0` and the stream completed, or the
/// guard's `4` and the limit ended it; never the handler's answer with the
/// limit's event.
#[test]
fn loom_answer_vs_limit() {
    loom::model(|| {
        let layer = StreamGuardLayer::builder().build().unwrap();
        let mut events = layer.subscribe();
        let ticket = start(&layer, true);
        let sweeper = Arc::clone(ticket.record());
        let mut future = pin!(ResponseFuture::calling(
            AnswersOk,
            Gate::Open,
            ticket,
            ForResponse::default(),
        ));

        let sweeper = thread::spawn(move || sweeper.end(Ending::Lifetime));
        let mut cx = Context::from_waker(Waker::noop());
        let Poll::Ready(Ok(response)) = future.as_mut().poll(&mut cx) else {
            panic!("the answer is ready at once");
        };
        let fired = sweeper.join().unwrap();

        let status = grpc::status_of(response.headers());
        assert!(response.body().is_end_stream(), "nothing after the head");
        drop(response);
        let ends = ended(&mut events);
        assert_eq!(ends.len(), 1, "one end event: {ends:?}");
        match ends[0] {
            EndReason::Completed => {
                assert!(!fired, "the limit counted too");
                assert_eq!(status, Some(0));
            }
            EndReason::LifetimeExceeded => {
                assert!(fired);
                assert_eq!(status, Some(4), "the peer read the handler's answer");
            }
            other => panic!("ended as {other:?}"),
        }
        assert_eq!(layer.shared().report.active(), 0);
    });
}

/// What a peer reads of a plain-HTTP response body, polled the way hyper
/// polls it (it stops once the body says it is at its end): `Ok` with the
/// bytes if it read a complete body, `Err` if the body failed.
fn read_plain(body: ResponseBody<Script>) -> Result<Vec<u8>, BoxError> {
    let mut body = pin!(body);
    let mut cx = Context::from_waker(Waker::noop());
    let mut read = Vec::new();
    if body.is_end_stream() {
        return Ok(read);
    }
    loop {
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    read.extend_from_slice(&data);
                }
                if body.is_end_stream() {
                    return Ok(read);
                }
            }
            Poll::Ready(Some(Err(err))) => return Err(err),
            Poll::Ready(None) => return Ok(read),
            Poll::Pending => panic!("the script never waits"),
        }
    }
}

/// The response body's last data frame (after which the inner body says it
/// is at its end, as `Full` does: no trailers, no `None` follow) against
/// the sweeper firing a limit: the peer reads the complete body and the
/// stream completed, or the guard's error and the limit ended it; never a
/// complete body with the limit's event.
#[test]
fn loom_last_data_frame_vs_limit() {
    loom::model(|| {
        let layer = StreamGuardLayer::builder().build().unwrap();
        let mut events = layer.subscribe();
        let ticket = start(&layer, false);
        let record = Arc::clone(ticket.record());
        let frames = [Frame::data(Bytes::from_static(b"last"))];
        let body = ResponseBody::guarded(Script::frames(frames), ticket, opened(false));
        let reader = thread::spawn(move || read_plain(body).map_err(|err| err.to_string()));

        let fired = record.end(Ending::Lifetime);

        let read = reader.join().unwrap();
        let ends = ended(&mut events);
        assert_eq!(ends.len(), 1, "one end event: {ends:?}");
        match ends[0] {
            EndReason::Completed => {
                assert!(!fired, "the limit counted too");
                assert_eq!(read.as_deref(), Ok(&b"last"[..]));
            }
            EndReason::LifetimeExceeded => {
                assert!(fired);
                assert!(read.is_err(), "the peer read a complete body: {read:?}");
            }
            other => panic!("ended as {other:?}"),
        }
        assert_eq!(layer.shared().report.active(), 0);
    });
}
