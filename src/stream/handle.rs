//! The handle a handler finds in its request extensions.
//!
//! This is the disconnect callback that tonic does not have: a spawned
//! producer run under [`StreamHandle::run_until_cancelled`] stops the moment
//! its stream ends, whether the client went away, a guard fired or the call
//! simply finished, instead of running on until its next `send` fails, or
//! waiting in a `send` that a stalled reader never lets complete.

use std::{
    fmt,
    future::{Future, poll_fn},
    pin::pin,
    sync::Arc,
    task::{Poll, Waker},
    time::Duration,
};

use crate::{end::EndReason, events::StreamId};

use super::record::Record;

/// A handle on one guarded stream, found in the request extensions.
///
/// The guard inserts it before calling the inner service, so a tonic handler
/// reaches it with `request.extensions().get::<StreamHandle>()` and a hyper or
/// axum handler through the `http::Request`'s extensions. Clones are cheap and
/// may move into spawned tasks; a handle keeps the stream's small shared
/// record alive, not the stream. Under nested guards, each inserts its own
/// handle: a handler finds the innermost guard's.
///
/// ```
/// use tower_stream_guard::StreamHandle;
///
/// # async fn produce(_: u32) {}
/// # fn handler(extensions: &http::Extensions) {
/// let handle = extensions.get::<StreamHandle>().cloned();
/// tokio::spawn(async move {
///     let Some(handle) = handle else { return };
///     // The whole loop: it stops whatever it is waiting on.
///     let work = async {
///         for n in 0.. {
///             produce(n).await;
///         }
///     };
///     if handle.run_until_cancelled(work).await.is_none() {
///         println!("stream {} ended: {:?}", handle.id(), handle.end_reason());
///     }
/// });
/// # }
/// ```
///
/// Observing and ending a stream (here a client's, through
/// [`response_handle`](crate::StreamGuardBuilder::response_handle)):
///
/// ```
/// use std::{convert::Infallible, time::Duration};
///
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body::Frame;
/// use http_body_util::{BodyExt, StreamBody};
/// use tower::{Layer, ServiceExt};
/// use tower_stream_guard::{
///     BoxError, EndReason, GuardError, StreamGuardLayer, StreamHandle, stream::RequestBody,
/// };
///
/// # fn main() -> Result<(), BoxError> {
/// # tokio::runtime::Runtime::new()?.block_on(async {
/// let guard = StreamGuardLayer::builder()
///     .max_lifetime(Duration::from_secs(60))
///     .response_handle(true)
///     .build()?;
/// let service = guard.layer(tower::service_fn(|_: Request<RequestBody<String>>| async {
///     let frames = futures_util::stream::pending::<Result<Frame<Bytes>, Infallible>>();
///     Ok::<_, Infallible>(Response::new(StreamBody::new(frames)))
/// }));
/// let response = service.oneshot(Request::new(String::new())).await?;
/// let handle = response.extensions().get::<StreamHandle>().cloned().unwrap();
///
/// assert!(!handle.is_ended());
/// assert!(handle.remaining_lifetime().is_some_and(|left| left <= Duration::from_secs(60)));
/// let ended = handle.cancelled(); // owns what it needs: could move into a task
///
/// assert!(handle.cancel());
/// assert!(!handle.cancel(), "only the first end counts");
/// assert!(handle.is_ended());
/// assert_eq!(handle.end_reason(), Some(EndReason::Cancelled));
/// assert_eq!(ended.await, EndReason::Cancelled);
///
/// // A plain HTTP response body ends with the guard's error.
/// let err = response.into_body().frame().await.unwrap().unwrap_err();
/// assert_eq!(err.downcast_ref::<GuardError>().unwrap().grpc_code(), 1);
/// # Ok::<_, BoxError>(())
/// # })
/// # }
/// ```
#[derive(Clone)]
pub struct StreamHandle {
    pub(crate) record: Arc<Record>,
    /// The GOAWAYs the layer's notice had seen when the stream started
    /// (`StreamGuardBuilder::goaway_notice`; 0 without one).
    pub(crate) goaways_seen: u64,
}

impl StreamHandle {
    /// The stream's id, the same as in its [`EndEvent`](crate::EndEvent).
    pub fn id(&self) -> StreamId {
        self.record.id
    }

    /// Resolves when the stream has ended, for any reason, with that reason.
    ///
    /// Resolves at once if the stream has already ended. The future owns what
    /// it needs (`'static`), so it can move into a spawned task; dropping it
    /// cancels nothing. For a stalled reader (a peer that stopped reading) it
    /// resolves when a guard fires, even though the server never polls the
    /// response body again.
    ///
    /// To stop a producer, prefer [`run_until_cancelled`](Self::run_until_cancelled)
    /// around its whole loop: a `select!` on this future that covers only the
    /// wait for the next item leaves the producer in its `send`.
    pub fn cancelled(&self) -> impl Future<Output = EndReason> + Send + use<> {
        let record = Arc::clone(&self.record);
        async move { record.ended().await }
    }

    /// Runs `future` until the stream ends: `Some` with its output if it
    /// finishes first, `None` as soon as the stream has ended (a guard fired,
    /// the client went away, the call finished, or [`cancel`](Self::cancel)
    /// was called), then or already.
    ///
    /// The way to run a producer: wrap its whole loop, the wait for the next
    /// item *and* the `send`, so that it stops even while it waits in `send`
    /// on a full channel. A peer that stopped reading fills the channel and
    /// hyper stops polling the body; racing [`cancelled`](Self::cancelled)
    /// against the next item alone would leave the producer in `send` until
    /// the client closes its connection.
    ///
    /// The end is checked first: once the stream has ended `future` is not
    /// polled again, even if it would be ready, and it has been dropped by the
    /// time `None` is returned. Like [`cancelled`](Self::cancelled), the
    /// returned future owns what it needs rather than borrowing the handle:
    /// it is `'static` when `future` is, and `Send` when `future` is, so it
    /// can move into a spawned task.
    ///
    /// # Cancel safety
    ///
    /// Dropping the returned future drops `future` and cancels nothing else;
    /// it is as cancel-safe as `future`. When it resolves to `None`, whatever
    /// `future` was doing is abandoned: an item it had taken and not yet sent
    /// is lost.
    ///
    /// # Cost
    ///
    /// One `Arc` clone per call and one registration with the stream's end
    /// notification on the first poll (a short lock, and for the stream's
    /// first waiter two small allocations). Later polls, each time
    /// `future` is woken, cost an atomic load; the registration is renewed only
    /// if the task's waker changed. Wrap the whole loop rather than each
    /// item to pay the registration once.
    ///
    /// # Example
    ///
    /// ```
    /// use tower_stream_guard::StreamHandle;
    /// use tokio::sync::mpsc;
    ///
    /// # async fn next_item() -> u64 { 0 }
    /// fn spawn_producer(handle: StreamHandle, tx: mpsc::Sender<u64>) {
    ///     tokio::spawn(async move {
    ///         let produce = async move {
    ///             loop {
    ///                 let item = next_item().await;
    ///                 if tx.send(item).await.is_err() {
    ///                     return; // the response stream was dropped
    ///                 }
    ///             }
    ///         };
    ///         if handle.run_until_cancelled(produce).await.is_none() {
    ///             // Client gone, guard fired, or call finished: stopped at
    ///             // once, even in the middle of a `send`.
    ///             println!("stream {} ended: {:?}", handle.id(), handle.end_reason());
    ///         }
    ///     });
    /// }
    /// ```
    pub fn run_until_cancelled<F>(
        &self,
        future: F,
    ) -> impl Future<Output = Option<F::Output>> + use<F>
    where
        F: Future,
    {
        let record = Arc::clone(&self.record);
        async move {
            let mut ended = pin!(record.ended());
            let mut future = pin!(future);
            // The waker `ended` last registered. The stream's end notification
            // is sent only after the end is recorded, and wakes whatever waker
            // was registered: while the waker is the same, an atomic load
            // tells whether the end came, with no lock.
            let mut registered: Option<Waker> = None;
            poll_fn(|cx| {
                if record.is_ended() {
                    return Poll::Ready(None);
                }
                if !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    if ended.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(None);
                    }
                    registered = Some(cx.waker().clone());
                }
                future.as_mut().poll(cx).map(Some)
            })
            .await
        }
    }

    /// Resolves when the server begins to drain, at once if it has: time to
    /// tell the client to reconnect elsewhere (or, for a client, to open the
    /// replacement stream) and finish up before the grace period ends. On a
    /// server's guard that is its [`Drain`](crate::Drain) beginning; on a
    /// client's guard with a
    /// [`goaway_notice`](crate::StreamGuardBuilder::goaway_notice), also a
    /// GOAWAY from the server on the stream's connection (see
    /// [`GoawayNotice`](crate::connection::GoawayNotice) for which streams
    /// are told). Never resolves when the guard has neither. `'static`, like
    /// [`cancelled`](Self::cancelled); dropping it cancels nothing.
    ///
    /// ```
    /// use std::{convert::Infallible, time::Duration};
    ///
    /// use http::{Request, Response};
    /// use tower::{Layer, ServiceExt};
    /// use tower_stream_guard::{BoxError, Drain, StreamGuardLayer, StreamHandle, stream::RequestBody};
    ///
    /// # fn main() -> Result<(), BoxError> {
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let drain = Drain::new();
    /// let guard = StreamGuardLayer::builder()
    ///     .drain(&drain)
    ///     .response_handle(true)
    ///     .build()?;
    /// let service = guard.layer(tower::service_fn(|_: Request<RequestBody<String>>| async {
    ///     Ok::<_, Infallible>(Response::new("a long answer".to_owned()))
    /// }));
    /// let response = service.oneshot(Request::new(String::new())).await?;
    /// let handle = response.extensions().get::<StreamHandle>().cloned().unwrap();
    ///
    /// let notice = handle.draining();
    /// assert!(!handle.is_draining());
    /// let _report = drain.start(Duration::from_secs(5));
    /// notice.await; // time to tell the client to reconnect elsewhere
    /// assert!(handle.is_draining());
    /// # Ok::<_, BoxError>(())
    /// # })
    /// # }
    /// ```
    pub fn draining(&self) -> impl Future<Output = ()> + Send + use<> {
        let drain = self.record.shared.drain().cloned();
        let notice = self.record.shared.notice().cloned();
        let seen = self.goaways_seen;
        async move {
            let drain = async {
                match drain {
                    Some(drain) => drain.began().await,
                    None => std::future::pending().await,
                }
            };
            let goaway = async {
                match notice {
                    Some(notice) => notice.goaway_after(seen).await,
                    None => std::future::pending().await,
                }
            };
            let (mut drain, mut goaway) = (std::pin::pin!(drain), std::pin::pin!(goaway));
            std::future::poll_fn(|cx| {
                if drain.as_mut().poll(cx).is_ready() || goaway.as_mut().poll(cx).is_ready() {
                    std::task::Poll::Ready(())
                } else {
                    std::task::Poll::Pending
                }
            })
            .await
        }
    }

    /// Whether the server has begun to drain: the guard's
    /// [`Drain`](crate::Drain) began, or (a client's guard with a
    /// [`goaway_notice`](crate::StreamGuardBuilder::goaway_notice)) a GOAWAY
    /// arrived since the stream started.
    pub fn is_draining(&self) -> bool {
        self.record.shared.is_draining() || self.record.shared.goaways_seen() > self.goaways_seen
    }

    /// The connection the stream came on, when a
    /// [`ConnectionGuard`](crate::ConnectionGuard) wraps it.
    pub fn connection(&self) -> Option<&crate::ConnectionHandle> {
        self.record.after.connection()
    }

    /// Ends the stream now, as [`EndReason::Cancelled`], the way a guard
    /// would: a gRPC response ends with `grpc-status: 1` (`CANCELLED`), a
    /// plain one with a body error (before the response headers: a
    /// trailers-only `CANCELLED` response, or `504`), and reads of the
    /// request body fail with `CANCELLED`. On a client ([`response_handle`](crate::StreamGuardBuilder::response_handle)),
    /// the pending `message().await` returns `Code::Cancelled` and the HTTP/2
    /// stream is reset, so the server sees the client go. Returns whether this
    /// call ended the stream (`false` if it had ended already).
    pub fn cancel(&self) -> bool {
        self.record.cancel_by_handle()
    }

    /// Whether the stream has ended, for any reason (not only
    /// [`EndReason::Cancelled`]): the non-blocking form of
    /// [`cancelled`](Self::cancelled).
    pub fn is_ended(&self) -> bool {
        self.record.is_ended()
    }

    /// Why the stream ended, once it has.
    pub fn end_reason(&self) -> Option<EndReason> {
        self.record.end_reason()
    }

    /// Time left before the maximum lifetime ends the stream, or `None` when no
    /// lifetime applies. Zero once it has passed.
    pub fn remaining_lifetime(&self) -> Option<Duration> {
        self.record.remaining_lifetime()
    }
}

impl fmt::Debug for StreamHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamHandle")
            .field("id", &self.record.id)
            .field("end_reason", &self.record.end_reason())
            .finish()
    }
}
