//! The guard service and its response future.

use std::{
    fmt,
    future::Future,
    marker::PhantomData,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::{
    body::{RequestBody, ResponseBody},
    error::{BoxError, describe},
    event::EndReason,
    grpc,
    handle::StreamHandle,
    policy::Policy,
    state::{Core, StreamState},
};

/// How a guard hands the wrapped request body to the service it wraps.
///
/// Most services accept any body type: [`PlainBody`] hands them a
/// [`RequestBody<B>`]. Routers that accept exactly one body type (tonic's
/// routes take `tonic::body::Body`, axum's take `axum::body::Body`) need the
/// wrapper boxed back into that type: [`TonicBody`] does it for tonic, and
/// other routers can implement this trait for a marker type of their own.
pub trait WrapRequestBody<B> {
    /// The request body type the inner service receives.
    type Body;

    /// Wraps a body this guard watches.
    fn wrap(body: RequestBody<B>) -> Self::Body;

    /// Passes on a body an outer guard layer already watches, without
    /// watching it twice.
    fn pass_through(body: B) -> Self::Body;
}

/// Hands the inner service a [`RequestBody<B>`]; for services generic over
/// their body type (hyper `service_fn`, most tower stacks).
#[derive(Clone, Copy, Debug, Default)]
pub struct PlainBody;

impl<B> WrapRequestBody<B> for PlainBody {
    type Body = RequestBody<B>;

    fn wrap(body: RequestBody<B>) -> Self::Body {
        body
    }

    fn pass_through(body: B) -> Self::Body {
        RequestBody::pass_through(body)
    }
}

/// Hands the inner service a `tonic::body::Body`, as tonic's
/// `Server::layer` requires: the guarded body is boxed once per stream.
#[cfg(feature = "tonic")]
#[derive(Clone, Copy, Debug, Default)]
pub struct TonicBody;

#[cfg(feature = "tonic")]
impl WrapRequestBody<tonic::body::Body> for TonicBody {
    type Body = tonic::body::Body;

    fn wrap(body: RequestBody<tonic::body::Body>) -> Self::Body {
        tonic::body::Body::new(body)
    }

    fn pass_through(body: tonic::body::Body) -> Self::Body {
        body
    }
}

/// The guard service: see [`StreamGuardLayer`](crate::StreamGuardLayer).
pub struct StreamGuard<S, W = PlainBody> {
    inner: S,
    policy: Policy,
    core: Arc<Core>,
    _wrap: PhantomData<fn() -> W>,
}

impl<S, W> StreamGuard<S, W> {
    pub(crate) fn new(inner: S, policy: Policy, core: Arc<Core>) -> Self {
        StreamGuard {
            inner,
            policy,
            core,
            _wrap: PhantomData,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, W> Clone for StreamGuard<S, W> {
    fn clone(&self) -> Self {
        StreamGuard {
            inner: self.inner.clone(),
            policy: self.policy,
            core: Arc::clone(&self.core),
            _wrap: PhantomData,
        }
    }
}

impl<S: fmt::Debug, W> fmt::Debug for StreamGuard<S, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamGuard")
            .field("inner", &self.inner)
            .field("policy", &self.policy)
            .finish()
    }
}

impl<S, W, ReqB, ResB> Service<Request<ReqB>> for StreamGuard<S, W>
where
    W: WrapRequestBody<ReqB>,
    S: Service<Request<W::Body>, Response = Response<ResB>>,
    ResB: Body,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqB>) -> Self::Future {
        // An outer guard layer already owns this stream: add our limits and
        // subscribers to it instead of wrapping the bodies a second time.
        if let Some(handle) = request.extensions().get::<StreamHandle>() {
            handle.state.attach(&self.core, &self.policy);
            let future = self.inner.call(request.map(W::pass_through));
            return ResponseFuture {
                inner: future,
                state: None,
            };
        }
        let state = StreamState::new(&self.core, &self.policy, &request);
        request.extensions_mut().insert(StreamHandle {
            state: Arc::clone(&state),
        });
        let request = request.map(|body| W::wrap(RequestBody::guarded(body, Arc::clone(&state))));
        let future = self.inner.call(request);
        // Filed after the inner call so that limits of stacked inner guard
        // layers are already merged in.
        state.arm();
        ResponseFuture {
            inner: future,
            state: Some(state),
        }
    }
}

pin_project! {
    /// The response future of [`StreamGuard`].
    ///
    /// If a guard fires before the service has answered, it resolves at once
    /// with a response of the guard's own (trailers-only `grpc-status: 4` for
    /// gRPC, `504` otherwise) and drops the service's future, which cancels a
    /// handler still running. Dropping it before it resolves ends the stream
    /// as [`EndReason::Cancelled`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        state: Option<Arc<StreamState>>,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(state) = this.project().state.take() {
                state.end(EndReason::Cancelled);
            }
        }
    }
}

fn early_response<B>(state: &StreamState) -> Option<Response<ResponseBody<B>>> {
    let reason = state.end_reason()?;
    let message = describe(reason, state.limit(reason));
    Some(grpc::early_response(
        state.grpc,
        grpc::DEADLINE_EXCEEDED,
        &message,
        ResponseBody::empty(),
    ))
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(state) = this.state.take() else {
            return this
                .inner
                .poll(cx)
                .map_ok(|response| response.map(ResponseBody::pass_through));
        };
        if let Some(response) = early_response(&state) {
            return Poll::Ready(Ok(response));
        }
        match this.inner.poll(cx) {
            Poll::Pending => {
                state.future_waker.register(cx.waker());
                if let Some(response) = early_response(&state) {
                    return Poll::Ready(Ok(response));
                }
                *this.state = Some(state);
                Poll::Pending
            }
            Poll::Ready(Ok(response)) => {
                let grpc = grpc::is_grpc(response.headers());
                if let Some(code) = grpc::status_of(response.headers()) {
                    state.set_grpc_status(code);
                }
                Poll::Ready(Ok(
                    response.map(|body| ResponseBody::guarded(body, state, grpc))
                ))
            }
            Poll::Ready(Err(err)) => {
                state.end(EndReason::Error);
                Poll::Ready(Err(err))
            }
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("stream", &self.state.as_ref().map(|s| s.id))
            .finish_non_exhaustive()
    }
}
