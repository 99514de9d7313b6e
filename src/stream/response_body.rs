//! The response body wrapper: where response frames are counted and where a
//! fired guard becomes gRPC trailers or a body error.
//!
//! Per data frame it does what the request body does (see
//! `request_body.rs`); the once-per-stream work is out of line.
//!
//! Guard layers nested in each other are independent: each wraps the bodies
//! it sees, counts its own frames and enforces its own limits.

use std::{
    fmt,
    pin::Pin,
    task::{Context, Poll, Waker},
};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::{end::Ending, error::BoxError, grpc};

use super::{
    heartbeat::Heartbeat,
    record::Record,
    ticket::{EndOnUnwind, Ticket},
};

pin_project! {
    /// A response body whose frames count as response-side activity, and which
    /// ends the way a peer can read once a guard ends its stream: with
    /// `grpc-status: 4` trailers for gRPC responses, with a [`GuardError`](crate::GuardError)
    /// (an HTTP/2 reset) otherwise.
    ///
    /// Its end ends the stream: the end event is emitted when it yields its
    /// last frame, and a body dropped before that counts as
    /// [`EndReason::Cancelled`](crate::EndReason::Cancelled). A body that ends
    /// with trailers is decided [`Completed`](crate::EndReason::Completed) as
    /// the trailers go out (no guard
    /// fires after them; the handle reports the end at once), and its event,
    /// wake-ups and cap slots follow when it is dropped or polled again:
    /// nothing runs between hyper sending the last DATA frame and the
    /// trailers, which with Nagle's algorithm on would otherwise often leave
    /// the trailers waiting 40 ms for a delayed ACK. hyper drops a body as
    /// soon as its trailers are sent; a client that keeps a finished
    /// `tonic::Streaming` keeps that part of the end pending until it drops
    /// it. `is_end_stream` and `size_hint` are forwarded.
    ///
    /// ```
    /// use std::{convert::Infallible, time::Duration};
    ///
    /// use bytes::Bytes;
    /// use http::{Request, Response};
    /// use http_body::Frame;
    /// use http_body_util::{BodyExt, StreamBody};
    /// use tower::{Layer, ServiceExt};
    /// use tower_stream_guard::{BoxError, EndReason, StreamGuardLayer, stream::RequestBody};
    ///
    /// # fn main() -> Result<(), BoxError> {
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let guard = StreamGuardLayer::builder().build()?;
    /// let mut events = guard.subscribe();
    /// let service = guard.layer(tower::service_fn(|_: Request<RequestBody<String>>| async {
    ///     // A response stream that never ends on its own.
    ///     let frames = futures_util::stream::pending::<Result<Frame<Bytes>, Infallible>>();
    ///     Ok::<_, Infallible>(Response::new(StreamBody::new(frames)))
    /// }));
    /// let response = service.oneshot(Request::new(String::new())).await?;
    /// let mut body = response.into_body();
    /// // Nothing to read yet:
    /// assert!(tokio::time::timeout(Duration::from_millis(10), body.frame()).await.is_err());
    /// drop(body); // the peer went away
    /// assert_eq!(events.recv().await?.reason(), EndReason::Cancelled);
    /// # Ok::<_, BoxError>(())
    /// # })
    /// # }
    /// ```
    pub struct ResponseBody<B> {
        #[pin]
        inner: Option<B>,
        ticket: Option<Ticket>,
        // The waker last handed to `response_waker`: only an end takes
        // it out again, so registering the same waker twice is wasted work.
        registered: Option<Waker>,
        grpc: bool,
        closed: bool,
        // The last frame went to hyper with the record's `WAITING` bit set:
        // until hyper polls again, the body waits on the reader.
        waiting: bool,
        // The stream's route's or layer's heartbeat, copied at the start:
        // with none, the data path checks this `None` and nothing else.
        heartbeat: Option<Heartbeat>,
        // The body handed over its last frame and the stream's end is
        // decided; the rest of the end waits for the next poll or the drop
        // (see `Record::complete_deferred`).
        finishing: bool,
    }

    impl<B> PinnedDrop for ResponseBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // Before the ticket (dropped with the body) ends the stream: a
            // body gone is no stalled reader.
            if let Some(ticket) = this.ticket.as_ref() {
                ticket.response_closed();
            }
        }
    }
}

impl<B: Body> ResponseBody<B> {
    pub(crate) fn guarded(
        inner: B,
        ticket: Ticket,
        grpc: bool,
        heartbeat: Option<Heartbeat>,
    ) -> Self {
        // hyper never polls a body that is already at its end: it sends the
        // headers with END_STREAM and drops it. That is a normal end. The
        // same for the answer to a HEAD request, whose body hyper drops
        // unread whatever it holds; its size hint still goes out as the
        // `content-length`, so that body stays as it is (a poll would find
        // the stream ended and yield nothing).
        let closed = inner.is_end_stream();
        if closed || ticket.after.is_head() {
            ticket.end(Ending::Completed);
        } else {
            ticket.response_opened();
        }
        ResponseBody {
            inner: Some(inner),
            ticket: Some(ticket),
            registered: None,
            grpc,
            closed,
            waiting: false,
            heartbeat,
            finishing: false,
        }
    }
}

impl<B> ResponseBody<B> {
    /// The empty body of a response the guard made itself, for the stream
    /// `ticket` owns (it has ended).
    pub(crate) fn answered(ticket: Ticket) -> Self {
        ResponseBody {
            inner: None,
            ticket: Some(ticket),
            registered: None,
            grpc: false,
            closed: true,
            waiting: false,
            heartbeat: None,
            finishing: false,
        }
    }

    /// The wrapped body; `None` for a response the guard made itself.
    pub fn get_ref(&self) -> Option<&B> {
        self.inner.as_ref()
    }
}

/// Records a waker the sweeper can wake this body through. Out of line:
/// about once per stream (see `registered`).
#[cold]
#[inline(never)]
fn register_waker(state: &Record, registered: &mut Option<Waker>, waker: &Waker) {
    state.response_waker.register(waker);
    *registered = Some(waker.clone());
}

/// Ends the stream from its response body. Returns `false` when a guard
/// ended the stream first: the caller then ends the body the guard's way.
/// Out of line: once per stream.
#[cold]
#[inline(never)]
fn end_from_body(state: &Record, closed: &mut bool, ending: Ending) -> bool {
    if state.end(ending) || state.guard_error().is_none() {
        *closed = true;
        state.response_closed();
        return true;
    }
    false
}

/// Ends the stream on its trailers. Returns `false` when a guard ended the
/// stream first: the caller then sends the guard's trailers instead of
/// these. Out of line: once per stream.
#[cold]
#[inline(never)]
fn end_on_trailers(
    state: &Record,
    closed: &mut bool,
    finishing: &mut bool,
    trailers: &http::HeaderMap,
) -> bool {
    // A guard can end the stream on another thread between this body's
    // "still open?" check and its inner body's last frame, and the inner
    // body often ends *because* of it (the handler's producer stops on
    // `cancelled()`, and tonic closes the body with `grpc-status: 0`). The
    // end was the guard's: the peer must read the guard's status, not OK.
    let decided = state.complete_deferred();
    if !decided && state.guard_error().is_some() {
        return false;
    }
    if decided {
        if let Some(code) = grpc::status_of(trailers) {
            state.set_grpc_status(code);
        }
        if let Some(reason) = grpc::guard_reason_of(trailers) {
            state.set_server_guard_reason(reason);
        }
    }
    *closed = true;
    state.response_closed();
    *finishing = decided;
    true
}

/// A guard-ended stream's body: let go of the inner body (and whatever the
/// handler feeds it) at once and end the way a peer can read. Out of line:
/// once per stream.
#[cold]
#[inline(never)]
fn end_fired<B: Body>(
    closed: &mut bool,
    mut inner: Pin<&mut Option<B>>,
    state: &Record,
    grpc: bool,
) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
    *closed = true;
    state.response_closed();
    inner.set(None);
    let Some(err) = state.guard_error() else {
        return Poll::Ready(None);
    };
    if grpc {
        let trailers = grpc::trailers(err.grpc_code(), &err.to_string(), err.reason().as_str());
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    } else {
        Poll::Ready(Some(Err(err.into())))
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    // Small enough to inline into the caller's poll loop: the once-per-stream
    // work is out of line.
    #[inline(always)]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        if *this.closed {
            if *this.finishing
                && let Some(state) = this.ticket.as_deref()
            {
                *this.finishing = false;
                state.finish_deferred();
            }
            return Poll::Ready(None);
        }
        let Some(state) = this.ticket.as_deref() else {
            return match this.inner.as_pin_mut() {
                Some(inner) => inner.poll_frame(cx).map_err(Into::into),
                None => Poll::Ready(None),
            };
        };
        if !state.is_ended()
            && let Some(mut inner) = this.inner.as_mut().as_pin_mut()
        {
            // hyper is back for more: the wait on the reader ended. Only
            // recorded when a timer tick passed meanwhile.
            if *this.waiting && state.response_polled() {
                *this.waiting = false;
            }
            let unwinding = EndOnUnwind::arm(state);
            let polled = inner.as_mut().poll_frame(cx);
            unwinding.disarm();
            match polled {
                Poll::Pending => {
                    // Nothing for the reader: the producer is slow now.
                    if *this.waiting {
                        *this.waiting = false;
                        state.response_not_waiting();
                    }
                    if !this
                        .registered
                        .as_ref()
                        .is_some_and(|w| w.will_wake(cx.waker()))
                    {
                        register_waker(state, this.registered, cx.waker());
                    }
                    if !state.is_ended() {
                        return Poll::Pending;
                    }
                }
                // Taken apart and rebuilt rather than inspected through a
                // reference: the data (a few words) stays in registers and
                // the frame is written once, into the caller's slot.
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let len = bytes::Buf::remaining(&data);
                        if len > 0 {
                            // A heartbeat moves but leaves the idle clock.
                            if let Some(heartbeat) = this.heartbeat.as_ref()
                                && heartbeat.beats(&data, len)
                            {
                                state.note_response_heartbeat(len);
                                *this.waiting = false;
                            } else {
                                state.note_response_frame(len);
                                *this.waiting = true;
                            }
                        }
                        // hyper stops polling once the body says it is at
                        // its end, so this is where such a body completes.
                        // (The data goes out either way: it was produced
                        // before the end, and an END_STREAM frame leaves no
                        // room for the guard's trailers.)
                        if inner.is_end_stream()
                            && !end_from_body(state, this.closed, Ending::Completed)
                        {
                            *this.closed = true;
                            state.response_closed();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Err(frame) => {
                        if let Some(trailers) = frame.trailers_ref()
                            && !end_on_trailers(state, this.closed, this.finishing, trailers)
                        {
                            return end_fired(this.closed, this.inner, state, *this.grpc);
                        }
                        return Poll::Ready(Some(Ok(frame)));
                    }
                },
                Poll::Ready(Some(Err(err))) => {
                    if !end_from_body(state, this.closed, Ending::Error) {
                        return end_fired(this.closed, this.inner, state, *this.grpc);
                    }
                    return Poll::Ready(Some(Err(err.into())));
                }
                Poll::Ready(None) => {
                    if !end_from_body(state, this.closed, Ending::Completed) {
                        return end_fired(this.closed, this.inner, state, *this.grpc);
                    }
                    return Poll::Ready(None);
                }
            }
        }
        // The stream ended while this body was open: a guard fired.
        end_fired(this.closed, this.inner, state, *this.grpc)
    }

    fn is_end_stream(&self) -> bool {
        if self.closed {
            return true;
        }
        match (&self.inner, &self.ticket) {
            (None, _) => true,
            (Some(_), Some(state)) if state.is_ended() => false,
            (Some(inner), _) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(inner) if !self.closed => inner.size_hint(),
            _ => SizeHint::with_exact(0),
        }
    }
}

impl<B: fmt::Debug> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("inner", &self.inner)
            .field("stream", &self.ticket.as_ref().map(|t| t.id))
            .field("closed", &self.closed)
            .finish()
    }
}
