//! The request body wrapper: where request frames are counted and where a
//! fired guard becomes the handler's read error.
//!
//! Per data frame it does this and nothing more: one atomic load to see
//! whether the stream has ended, the inner poll, and three relaxed load/store
//! pairs (frame count, byte count, coarse activity time). No timer, no lock,
//! no allocation. A waker is registered only when the inner body is pending
//! with a waker not registered before, so that the timer can wake whoever
//! waits on this body.

use std::{
    fmt,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::record::Record;
use crate::error::BoxError;

pin_project! {
    /// A request body whose frames count as request-side activity, and which
    /// yields a [`GuardError`](crate::GuardError) once a guard ends its stream.
    ///
    /// The handler sees the error from its next read; with tonic, a
    /// `Streaming::message()` returns `Status::deadline_exceeded` naming the
    /// guard. After the error the body ends. Frames, `is_end_stream` and
    /// `size_hint` of the inner body pass through otherwise unchanged.
    /// Dropping it closes the stream's request side: from then on
    /// [`request_idle_timeout`](crate::StreamGuardBuilder::request_idle_timeout)
    /// no longer applies to the stream.
    ///
    /// A service behind a guard with the default [`PlainBody`](super::PlainBody)
    /// receives `Request<RequestBody<B>>` and reads it like any body:
    ///
    /// ```
    /// use std::convert::Infallible;
    ///
    /// use bytes::Bytes;
    /// use http::{Request, Response};
    /// use http_body_util::{BodyExt, Full};
    /// use tower::{Layer, ServiceExt};
    /// use tower_stream_guard::{BoxError, StreamGuardLayer, stream::RequestBody};
    ///
    /// # fn main() -> Result<(), BoxError> {
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let guard = StreamGuardLayer::builder().build()?;
    /// let echo = guard.layer(tower::service_fn(
    ///     |request: Request<RequestBody<Full<Bytes>>>| async move {
    ///         let body = request.into_body().collect().await?.to_bytes();
    ///         Ok::<_, BoxError>(Response::new(Full::new(body)))
    ///     },
    /// ));
    /// let response = echo.oneshot(Request::new(Full::new(Bytes::from("ping")))).await?;
    /// assert_eq!(response.into_body().collect().await?.to_bytes(), "ping");
    /// # Ok::<_, BoxError>(())
    /// # })
    /// # }
    /// ```
    pub struct RequestBody<B> {
        #[pin]
        inner: B,
        state: Arc<Record>,
        // The waker last handed to `state.request_waker` (see ResponseBody).
        registered: Option<Waker>,
        done: bool,
    }

    impl<B> PinnedDrop for RequestBody<B> {
        fn drop(this: Pin<&mut Self>) {
            // A body the handler let go of unread is no open request side:
            // nobody waits on the peer's next frame, so the request idle
            // timeout no longer applies (the response side's still does).
            this.state.mark_request_done();
        }
    }
}

impl<B: Body> RequestBody<B> {
    pub(crate) fn guarded(inner: B, state: Arc<Record>) -> Self {
        // A request that has no body (a GET, an SSE subscription) or whose
        // body is already at its end is never polled: its request side is
        // done from the start, or the request idle timeout would cut it.
        if inner.is_end_stream() {
            state.mark_request_done();
        }
        RequestBody {
            inner,
            state,
            registered: None,
            done: false,
        }
    }
}

impl<B> RequestBody<B> {
    /// The wrapped body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let state = &**this.state;
        if *this.done {
            return Poll::Ready(None);
        }
        if state.is_ended()
            && let Some(err) = state.guard_error()
        {
            *this.done = true;
            return Poll::Ready(Some(Err(err.into())));
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Pending => {
                if !this
                    .registered
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    state.request_waker.register(cx.waker());
                    *this.registered = Some(cx.waker().clone());
                }
                // The guard may have fired between the inner poll and the
                // registration; it would have woken nobody.
                if state.is_ended()
                    && let Some(err) = state.guard_error()
                {
                    *this.done = true;
                    return Poll::Ready(Some(Err(err.into())));
                }
                Poll::Pending
            }
            // Taken apart and rebuilt, not inspected through a reference:
            // see ResponseBody::poll_frame.
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    // An empty frame is only an end-of-stream marker (tonic
                    // clients close their side with one): not activity.
                    let len = bytes::Buf::remaining(&data);
                    if len > 0 {
                        state.note_request_frame(len);
                    }
                    if this.inner.is_end_stream() {
                        state.mark_request_done();
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => {
                    // Trailers are the request's last frame.
                    if frame.is_trailers() {
                        state.mark_request_done();
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
            },
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(err.into()))),
            Poll::Ready(None) => {
                *this.done = true;
                state.mark_request_done();
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
            || (self.inner.is_end_stream()
                && !self.state.end_reason().is_some_and(|r| r.is_guard()))
    }

    fn size_hint(&self) -> SizeHint {
        if self.done {
            SizeHint::with_exact(0)
        } else {
            self.inner.size_hint()
        }
    }
}

impl<B: fmt::Debug> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestBody")
            .field("inner", &self.inner)
            .field("stream", &self.state.id)
            .finish()
    }
}
