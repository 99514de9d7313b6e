//! The guard service's response future.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::Response;
use http_body::Body;
use pin_project_lite::pin_project;

use super::{
    cap::Admission,
    framing::Follows,
    handle::StreamHandle,
    heartbeat::Heartbeat,
    last_word::Word,
    response_body::{Opened, ResponseBody},
    takeover,
    ticket::{EndOnUnwind, Ticket},
};
use crate::{end::Ending, grpc};

/// Whether the service's future may be polled yet.
pub(crate) enum Gate {
    Open,
    /// The stream waits for cap slots (only with `cap_wait`); the service's
    /// future waits with it. Boxed: most streams never wait.
    Waiting(Box<Admission>),
}

pin_project! {
    /// The response future of [`StreamGuard`](super::StreamGuard).
    ///
    /// If the stream ends before the service has answered (a limit fired, a
    /// drain cut it, [`StreamHandle::cancel`](crate::StreamHandle::cancel)),
    /// it resolves at once with a response of the guard's own and drops the
    /// service's future, which cancels a handler still running: for gRPC a
    /// trailers-only response with the guard's status (`4` for a limit, `14`
    /// for a drain, `1` for a cancel), otherwise `408 Request Timeout` when
    /// the request body went silent
    /// ([`request_idle_timeout`](crate::StreamGuardBuilder::request_idle_timeout)),
    /// `503 Service Unavailable` for a drain, `504 Gateway Timeout` for the
    /// other limits and a cancel. The same when the stream ends while the
    /// service's future is being polled to an answer that nothing follows
    /// (a body already at its end, such as a trailers-only gRPC status or an
    /// empty `200`; a `204` or `304`, whatever its body; the answer to a
    /// `HEAD` request): that answer is dropped
    /// and the peer reads the guard's, whose reason the end event gives. An
    /// answer whose body follows goes out, and its body ends the guard's
    /// way. A stream a cap refuses, or that arrives
    /// while a drain is in progress, gets `grpc-status: 8`
    /// (`RESOURCE_EXHAUSTED`) or `14` (`UNAVAILABLE`), or `503` with a
    /// `Retry-After` ([`retry_after`](crate::StreamGuardBuilder::retry_after)),
    /// the same way. Each of these answers names its reason in
    /// `stream-guard-reason` ([`EndReason::as_str`](crate::EndReason::as_str)).
    /// The plain-HTTP statuses are defaults:
    /// [`early_status`](crate::StreamGuardBuilder::early_status) chooses
    /// another per reason (a refusal keeps its `Retry-After`).
    ///
    /// # Cancel safety
    ///
    /// Dropping it before it resolves ends the stream as
    /// [`EndReason::Cancelled`](crate::EndReason::Cancelled) (cap slots back,
    /// handle woken, one end event) and drops the service's future.
    ///
    /// ```
    /// use std::{convert::Infallible, time::Duration};
    ///
    /// use http::{Request, Response};
    /// use tower::{Layer, Service, ServiceExt};
    /// use tower_stream_guard::{BoxError, EndReason, StreamGuardLayer, stream::RequestBody};
    ///
    /// # fn main() -> Result<(), BoxError> {
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let guard = StreamGuardLayer::builder().build()?;
    /// let mut events = guard.subscribe();
    /// let mut service = guard.layer(tower::service_fn(|_: Request<RequestBody<String>>| async {
    ///     tokio::time::sleep(Duration::from_secs(3600)).await; // a slow handler
    ///     Ok::<_, Infallible>(Response::new(String::new()))
    /// }));
    /// let future = service.ready().await?.call(Request::new(String::new()));
    /// assert_eq!(guard.active_streams(), 1);
    /// drop(future);
    /// assert_eq!(guard.active_streams(), 0);
    /// assert_eq!(events.recv().await?.reason(), EndReason::Cancelled);
    /// # Ok::<_, BoxError>(())
    /// # })
    /// # }
    /// ```
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    #[project_replace = StateTaken]
    enum State<F> {
        /// The service is answering (or waits behind the gate).
        Calling {
            #[pin]
            future: F,
            gate: Gate,
            ticket: Ticket,
            response: ForResponse,
        },
        /// The guard answers without the service: the stream has ended.
        Answered { ticket: Ticket },
        /// Resolved.
        Done,
    }
}

/// What a stream's start leaves for its response: set once per stream in
/// `call`, used when the service answers.
#[derive(Default)]
pub(crate) struct ForResponse {
    /// For the handle in the response (see `StreamHandle`).
    pub(crate) goaways_seen: u64,
    /// For the response body; `None` unless a heartbeat is set.
    pub(crate) heartbeat: Option<Heartbeat>,
    /// The guard is a client's: the body's trailers finish the end at once.
    pub(crate) client: bool,
    /// The request's HTTP version: an HTTP/1 upgrade's head hands the
    /// connection to the stream (see `takeover.rs`).
    pub(crate) version: http::Version,
}

impl<F> ResponseFuture<F> {
    /// The service was called for the stream `ticket` owns.
    pub(crate) fn calling(future: F, gate: Gate, ticket: Ticket, response: ForResponse) -> Self {
        ResponseFuture {
            state: State::Calling {
                future,
                gate,
                ticket,
                response,
            },
        }
    }

    /// A future that answers for the guard: the stream has already ended.
    pub(crate) fn answered(ticket: Ticket) -> Self {
        ResponseFuture {
            state: State::Answered { ticket },
        }
    }

    /// Moves to `Done`, handing over the ticket (dropping the service's
    /// future, if any).
    fn take_ticket(self: Pin<&mut Self>) -> Option<Ticket> {
        self.take_state().map(|(ticket, _)| ticket)
    }

    /// Moves to `Done`, handing over the ticket and what the response takes
    /// (dropping the service's future, if any).
    fn take_state(self: Pin<&mut Self>) -> Option<(Ticket, ForResponse)> {
        match self.project().state.project_replace(State::Done) {
            StateTaken::Calling {
                ticket, response, ..
            } => Some((ticket, response)),
            StateTaken::Answered { ticket } => {
                let goaways_seen = ticket.shared.goaways_seen();
                Some((
                    ticket,
                    ForResponse {
                        goaways_seen,
                        ..ForResponse::default()
                    },
                ))
            }
            StateTaken::Done => None,
        }
    }

    /// Resolves with the guard's own answer, moving the ticket into its body.
    fn answer<B, E>(self: Pin<&mut Self>) -> Poll<Result<Response<ResponseBody<B>>, E>> {
        match self.take_state() {
            Some((ticket, for_response)) => {
                Poll::Ready(Ok(guard_answer(ticket, for_response.goaways_seen)))
            }
            None => Poll::Pending,
        }
    }
}

/// The guard's own answer for the stream `ticket` owns, which has ended;
/// with its handle when the layer puts one in responses (a client that
/// reads the handle finds it on every answer).
fn guard_answer<B>(ticket: Ticket, goaways_seen: u64) -> Response<ResponseBody<B>> {
    let ending = ticket.ending().unwrap_or(Ending::Cancelled);
    let admission = &ticket.shared.admission;
    let mut response = grpc::early_response(
        ticket.grpc,
        ending,
        &ticket.message(ending),
        admission.early_status(ending),
        admission.retry_after_secs,
        (),
    );
    insert_handle(&mut response, &ticket, goaways_seen);
    response.map(|()| ResponseBody::answered(ticket))
}

/// Puts the stream's handle into `response`'s extensions, when the layer
/// puts one in responses (see `StreamGuardBuilder::response_handle`).
fn insert_handle<T>(response: &mut Response<T>, ticket: &Ticket, goaways_seen: u64) {
    if ticket.shared.admission.handle_in_response {
        response.extensions_mut().insert(StreamHandle {
            record: std::sync::Arc::clone(ticket.record()),
            goaways_seen,
        });
    }
}

/// The service's answer, its body wrapped; or, when the stream ended before
/// the answer could go out, the guard's own (the service's is dropped).
fn service_answer<B: Body>(
    response: Response<B>,
    ticket: Ticket,
    for_response: ForResponse,
) -> Response<ResponseBody<B>> {
    // The body's size hint and `is_end_stream` are the service's code.
    let follows = EndOnUnwind::run(&ticket, || Follows::of(&response, ticket.after.is_head()));
    // An upgrade's head is not the stream's end: the connection, which the
    // stream takes over, ends it (without a connection guard, the head does).
    let (mut response, ticket) = match takeover::answer(response, ticket, &for_response) {
        Ok(taken_over) => return taken_over,
        Err(not_taken) => not_taken,
    };
    // A head that nothing follows is the last word: hyper sends it alone and
    // never polls the body (see `framing`).
    let last = follows.nothing();
    let word = if last {
        ticket.last_word(follows.ending())
    } else {
        ticket.next_word()
    };
    if word == Word::Guard {
        drop(response);
        return guard_answer(ticket, for_response.goaways_seen);
    }
    insert_handle(&mut response, &ticket, for_response.goaways_seen);
    let grpc = grpc::is_grpc(response.headers());
    let status = grpc::status_of(response.headers());
    if let Some(code) = status {
        ticket.set_grpc_status(code);
    }
    if let Some(reason) = grpc::guard_reason_of(response.headers()) {
        ticket.set_server_guard_reason(reason);
    }
    ticket.set_answered(grpc, status);
    if last {
        ticket.finish_deferred();
    }
    let heartbeat = for_response.heartbeat;
    let opened = Opened {
        grpc,
        heartbeat,
        client: for_response.client,
        follows,
    };
    response.map(|body| ResponseBody::guarded(body, ticket, opened))
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (future, gate, ticket) = match self.as_mut().project().state.project() {
            StateProj::Calling {
                future,
                gate,
                ticket,
                ..
            } => (future, gate, ticket),
            StateProj::Answered { .. } => return self.answer(),
            // Polled again after it resolved.
            StateProj::Done => return Poll::Pending,
        };
        if ticket.is_ended() {
            return self.answer();
        }
        if let Gate::Waiting(admission) = gate {
            match Pin::new(&mut **admission).poll(cx) {
                Poll::Pending => {
                    ticket.response_waker.register(cx.waker());
                    if ticket.is_ended() {
                        return self.answer();
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Ok(permits)) => {
                    *gate = Gate::Open;
                    ticket.hold(permits);
                    ticket.record().admitted();
                }
                Poll::Ready(Err(refusal)) => {
                    ticket.reject(refusal.cap, refusal.limit);
                    return self.answer();
                }
            }
        }
        let unwinding = EndOnUnwind::arm(ticket);
        let polled = future.poll(cx);
        unwinding.disarm();
        match polled {
            Poll::Pending => {
                ticket.response_waker.register(cx.waker());
                if ticket.is_ended() {
                    return self.answer();
                }
                Poll::Pending
            }
            Poll::Ready(Ok(response)) => match self.take_state() {
                Some((ticket, for_response)) => {
                    Poll::Ready(Ok(service_answer(response, ticket, for_response)))
                }
                None => Poll::Pending,
            },
            Poll::Ready(Err(err)) => {
                // The error is the service's last word only if it wins the
                // end: a guard that ended the stream meanwhile answers.
                if !ticket.end(ticket.failed()) {
                    return self.answer();
                }
                drop(self.take_ticket());
                Poll::Ready(Err(err))
            }
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stream = match &self.state {
            State::Calling { ticket, .. } | State::Answered { ticket } => Some(ticket.id),
            State::Done => None,
        };
        f.debug_struct("ResponseFuture")
            .field("stream", &stream)
            .finish_non_exhaustive()
    }
}
