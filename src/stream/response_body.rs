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
    framing::Follows,
    heartbeat::Heartbeat,
    last_word::Word,
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
    /// soon as its trailers are sent. A client's guard
    /// ([`for_client`](crate::StreamGuardLayer::for_client)) finishes the
    /// end as the trailers are read: the application may keep a finished
    /// `tonic::Streaming` for ever. `is_end_stream` and `size_hint` are
    /// forwarded.
    ///
    /// The peer reads what the end event says. A body's last part (its last
    /// data frame, its trailers, its end or error) goes out only if it is
    /// the stream's end: when a guard ended the stream while the inner body
    /// produced it, the part is dropped and the guard's ending goes out in
    /// its place. A body whose length the head's `content-length` or its
    /// exact size hint declares completes when its last declared byte is
    /// handed on: hyper's HTTP/1 stops polling there, and drops the body
    /// unpolled.
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
        // (see `Record::decide_deferred`).
        finishing: bool,
        // Bytes the response head or the body's exact size hint declared and
        // that have not been handed on yet: hyper's HTTP/1 stops polling
        // after the last one, so that byte is the body's last word.
        remaining: Option<u64>,
        // The trailers leave the rest of the end to the next poll or the
        // drop: hyper's server drops the body right after writing them. A
        // client's application may hold a finished body for ever.
        defer_trailers: bool,
    }

    impl<B> PinnedDrop for ResponseBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // Before the ticket (dropped with the body) ends the stream: a
            // body gone is no stalled reader.
            if let Some(ticket) = this.ticket.as_ref() {
                ticket.response_closed();
                // The inner body's `Drop` is the service's code.
                let mut inner = this.inner;
                EndOnUnwind::run(ticket, || inner.set(None));
            }
        }
    }
}

/// What the response future learnt from the service's answer, for its body.
pub(crate) struct Opened {
    pub(crate) grpc: bool,
    pub(crate) heartbeat: Option<Heartbeat>,
    /// The guard is a client's (see `StreamGuardLayer::for_client`).
    pub(crate) client: bool,
    /// What follows the head (see `framing`): with nothing, the response
    /// future has decided the end (see `last_word`), and the body is never
    /// polled.
    pub(crate) follows: Follows,
}

impl<B: Body> ResponseBody<B> {
    /// The body of the service's answer. Unless `opened.last`, the stream is
    /// open: the body's parts will claim the end.
    pub(crate) fn guarded(inner: B, ticket: Ticket, opened: Opened) -> Self {
        // A body that no byte of follows its head is closed: hyper sends the
        // head with END_STREAM (HTTP/2 included, which would poll it) and
        // drops it. The answer to a HEAD request stays as it is: hyper drops
        // it unread, and its size hint still goes out as the
        // `content-length` (a poll would find the stream ended and yield
        // nothing).
        let closed = match opened.follows {
            Follows::Nothing | Follows::Interim => true,
            Follows::HeadOnly => EndOnUnwind::run(&ticket, || inner.is_end_stream()),
            Follows::Bytes(_) | Follows::Body => {
                ticket.response_opened();
                false
            }
        };
        ResponseBody {
            inner: Some(inner),
            ticket: Some(ticket),
            registered: None,
            grpc: opened.grpc,
            closed,
            waiting: false,
            heartbeat: opened.heartbeat,
            finishing: false,
            remaining: opened.follows.declared(),
            defer_trailers: !opened.client,
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
            remaining: None,
            defer_trailers: false,
        }
    }

    /// The body of a head that handed its connection to the stream (an
    /// upgrade, see `takeover.rs`): the connection holds the ticket, and
    /// this body passes through.
    pub(crate) fn taken_over(inner: B) -> Self {
        ResponseBody {
            inner: Some(inner),
            ticket: None,
            registered: None,
            grpc: false,
            closed: false,
            waiting: false,
            heartbeat: None,
            finishing: false,
            remaining: None,
            defer_trailers: false,
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

/// The body's last part is about to go out (its last data frame or
/// declared byte, its trailers, its end or error): claims the end for it as
/// `ending` (see `last_word`). `false` when the stream had ended first: the
/// caller drops the part and ends the body the guard's way.
///
/// Trailers leave the rest of the end to the next poll or the drop
/// (`defer`): nothing should run between hyper sending the last DATA frame
/// and the trailers (see `Record::decide_deferred`). Other parts finish it
/// at once: the event is out when the body yields its last frame. Out of
/// line: once per stream.
#[cold]
#[inline(never)]
fn claim(
    state: &Record,
    closed: &mut bool,
    finishing: &mut bool,
    ending: Ending,
    defer: bool,
) -> bool {
    if state.last_word(ending) == Word::Guard {
        return false;
    }
    *closed = true;
    state.response_closed();
    if defer {
        *finishing = true;
    } else {
        state.finish_deferred();
    }
    true
}

/// Records what the service's trailers say, once they won the end.
#[cold]
#[inline(never)]
fn note_trailers(state: &Record, trailers: &http::HeaderMap) {
    if let Some(code) = grpc::status_of(trailers) {
        state.set_grpc_status(code);
    }
    if let Some(reason) = grpc::guard_reason_of(trailers) {
        state.set_server_guard_reason(reason);
    }
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
    // An end another part decided without finishing it (see `last_word`).
    state.finish_deferred();
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
        // Everything from here may run code the guard does not own: the
        // inner body's poll, its `is_end_stream`, its data's `Buf`, the
        // heartbeat's predicate, its `Drop` (in `end_fired`). An unwinding
        // through any of it ends the stream as panicked.
        let unwinding = EndOnUnwind::arm(state);
        let polled = 'polled: {
            // The stream ended while this body was open: a guard fired.
            if state.is_ended() {
                break 'polled end_fired(this.closed, this.inner, state, *this.grpc);
            }
            let Some(mut inner) = this.inner.as_mut().as_pin_mut() else {
                break 'polled end_fired(this.closed, this.inner, state, *this.grpc);
            };
            // hyper is back for more: the wait on the reader ended. Only
            // recorded when a timer tick passed meanwhile.
            if *this.waiting && state.response_polled() {
                *this.waiting = false;
            }
            let polled = inner.as_mut().poll_frame(cx);
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
                        break 'polled Poll::Pending;
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
                        // The last data the peer reads: the body says it is
                        // at its end (hyper stops polling it then). It goes
                        // out only if it wins the end.
                        // (Counted either way: a guard's end that won has
                        // been reported already.)
                        let declared_end = match this.remaining {
                            Some(left) => {
                                *left = left.saturating_sub(len as u64);
                                *left == 0
                            }
                            None => false,
                        };
                        // The last declared byte does not claim the end:
                        // over HTTP/2 trailers may follow (hyper polls on
                        // while the inner body is not at its end). It marks
                        // the body delivered, so that HTTP/1's drop of it
                        // completes the stream (`Record::abandoned`).
                        if declared_end {
                            state.response_sent_declared();
                        }
                        if inner.is_end_stream()
                            && !claim(state, this.closed, this.finishing, Ending::Completed, false)
                        {
                            break 'polled end_fired(this.closed, this.inner, state, *this.grpc);
                        }
                        break 'polled Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Err(frame) => {
                        if let Some(trailers) = frame.trailers_ref() {
                            // A guard can end the stream between this body's
                            // "still open?" check and its inner body's
                            // trailers, and the inner body often ends
                            // *because* of it (the handler's producer stops
                            // on `cancelled()`, and tonic closes the body
                            // with `grpc-status: 0`): the peer must read the
                            // guard's status then, not OK.
                            if !claim(state, this.closed, this.finishing, Ending::Completed, true) {
                                break 'polled end_fired(
                                    this.closed,
                                    this.inner,
                                    state,
                                    *this.grpc,
                                );
                            }
                            note_trailers(state, trailers);
                            if !*this.defer_trailers {
                                *this.finishing = false;
                                state.finish_deferred();
                            }
                        }
                        break 'polled Poll::Ready(Some(Ok(frame)));
                    }
                },
                Poll::Ready(Some(Err(err))) => {
                    if !claim(state, this.closed, this.finishing, Ending::Error, false) {
                        break 'polled end_fired(this.closed, this.inner, state, *this.grpc);
                    }
                    break 'polled Poll::Ready(Some(Err(err.into())));
                }
                Poll::Ready(None) => {
                    if !claim(state, this.closed, this.finishing, Ending::Completed, false) {
                        break 'polled end_fired(this.closed, this.inner, state, *this.grpc);
                    }
                    break 'polled Poll::Ready(None);
                }
            }
            // Nothing came and the stream ended meanwhile: a guard fired.
            end_fired(this.closed, this.inner, state, *this.grpc)
        };
        unwinding.disarm();
        polled
    }

    /// `true` once nothing more will come. An inner body at its end is
    /// only reported so if that end wins the stream's (see `last_word`):
    /// otherwise hyper polls again and gets the guard's ending.
    fn is_end_stream(&self) -> bool {
        if self.closed {
            return true;
        }
        match (&self.inner, &self.ticket) {
            (None, _) => true,
            // Ended: hyper polls again for the guard's ending, unless this
            // very body's end won (asked twice). The answer to a HEAD
            // request says `false`, so that hyper sends its size hint.
            (Some(inner), Some(state)) if state.is_ended() => {
                state.ending() == Some(Ending::Completed)
                    && EndOnUnwind::run(state, || inner.is_end_stream())
            }
            (Some(inner), Some(state)) => {
                EndOnUnwind::run(state, || inner.is_end_stream())
                    && state.last_word(Ending::Completed) == Word::Service
            }
            (Some(inner), None) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.inner, &self.ticket) {
            (Some(inner), Some(state)) if !self.closed => {
                EndOnUnwind::run(state, || inner.size_hint())
            }
            (Some(inner), None) if !self.closed => inner.size_hint(),
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
