//! The guard service and its response future.

use std::{
    fmt,
    future::Future,
    marker::PhantomData,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::{
    connection::ConnectionHandle, end::EndReason, error::BoxError, grpc, peer::ConnectionKey,
};

use super::{
    body::{RequestBody, ResponseBody},
    cap::{self, CapPermit, CapSet, Origin, Refusal},
    handle::StreamHandle,
    origin,
    policy::Policy,
    record::{Core, EndOnUnwind, StreamState},
    route::{self, RouteRequest},
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
}

/// Hands the inner service a `tonic::body::Body`, as tonic's
/// `Server::layer` requires: the guarded body is boxed once per stream.
#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
#[derive(Clone, Copy, Debug, Default)]
pub struct TonicBody;

#[cfg(feature = "tonic")]
impl WrapRequestBody<tonic::body::Body> for TonicBody {
    type Body = tonic::body::Body;

    fn wrap(body: RequestBody<tonic::body::Body>) -> Self::Body {
        tonic::body::Body::new(body)
    }
}

/// The guard service: see [`StreamGuardLayer`](crate::StreamGuardLayer).
pub struct StreamGuard<S, W = PlainBody> {
    inner: S,
    policy: Policy,
    core: Arc<Core>,
    /// The connection this service serves, when it was built for one
    /// ([`for_connection`](Self::for_connection)); clones share it.
    connection: Option<ConnectionKey>,
    _wrap: PhantomData<fn() -> W>,
}

impl<S, W> StreamGuard<S, W> {
    pub(crate) fn new(inner: S, policy: Policy, core: Arc<Core>) -> Self {
        StreamGuard {
            inner,
            policy,
            core,
            connection: None,
            _wrap: PhantomData,
        }
    }

    /// Says that every request through this service (and its clones) comes
    /// on the connection `key`: for accept loops that build the service once
    /// per accepted connection (hyper-util) and do not wrap it with a
    /// [`ConnectionGuard`](crate::ConnectionGuard). A [`ConnectionKey`] or
    /// [`ConnectionHandle`] in the request extensions still wins.
    ///
    /// Without it such a server has no connection identity, and
    /// [`max_streams_per_connection`](crate::StreamGuardBuilder::max_streams_per_connection)
    /// refuses its streams (a cap per connection never becomes one per
    /// server). A key made [`from_remote`](ConnectionKey::from_remote) also
    /// gives the per-peer cap and end events the peer's address.
    ///
    /// ```
    /// # async fn accept_loop(listener: tokio::net::TcpListener) -> Result<(), Box<dyn std::error::Error>> {
    /// use std::convert::Infallible;
    ///
    /// use http::Request;
    /// use hyper::body::Incoming;
    /// use tower::Layer;
    /// use tower_stream_guard::{ConnectionKey, RequestBody, StreamGuardLayer};
    ///
    /// let guard = StreamGuardLayer::builder()
    ///     .max_streams_per_connection(16)
    ///     .build()?;
    /// loop {
    ///     let (io, remote) = listener.accept().await?;
    ///     let service = guard
    ///         .layer(tower::service_fn(|_request: Request<RequestBody<Incoming>>| async {
    ///             Ok::<_, Infallible>(http::Response::new(String::new()))
    ///         }))
    ///         .for_connection(ConnectionKey::from_remote(remote));
    ///     // ... serve `io` with `service` (hyper-util's `TowerToHyperService`)
    ///     # drop((io, service));
    /// }
    /// # }
    /// ```
    pub fn for_connection(mut self, key: ConnectionKey) -> Self {
        self.connection = Some(key);
        self
    }

    /// Where `request` came from: its connection and peer, as far as the
    /// extensions tell (`peer::identify` knows how).
    fn origin<B>(
        &self,
        request: &mut Request<B>,
    ) -> (Origin, Option<SocketAddr>, Option<ConnectionHandle>) {
        let found = origin::identify(
            request.extensions_mut(),
            self.connection,
            self.core.connection_key.as_deref(),
        );
        let origin = Origin {
            connection: found.connection,
            peer: found.peer.map(|p| p.ip()),
        };
        (origin, found.peer, found.handle)
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
            connection: self.connection,
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
    ReqB: Body,
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
        let core = &self.core;
        let route = if core.routes.is_empty() {
            None
        } else {
            route::select(
                &core.routes,
                &RouteRequest {
                    method: request.method(),
                    uri: request.uri(),
                    headers: request.headers(),
                    extensions: request.extensions(),
                },
            )
        };
        let policy = route.map_or(self.policy, |route| route.policy);
        let client_deadline = core
            .honor_grpc_timeout
            .then(|| grpc::timeout_of(request.headers()))
            .flatten();
        let (origin, peer, connection) = self.origin(&mut request);
        // Empty (no allocation) unless some cap applies.
        let caps: Vec<Arc<CapSet>> = core
            .caps
            .iter()
            .chain(route.and_then(|route| route.caps.as_ref()))
            .cloned()
            .collect();

        let state = StreamState::new(core, &policy, &request, &origin, peer, connection);
        if core.is_draining() {
            state.refuse_draining();
            return ResponseFuture::answered(state);
        }
        state.limit_lifetime(client_deadline, true);
        let admission = match cap::try_acquire_all(&caps, &origin) {
            Ok(permits) => {
                state.hold(permits);
                None
            }
            Err(refusal) => match core.cap_wait {
                None => {
                    state.reject(refusal.cap, refusal.limit);
                    return ResponseFuture::answered(state);
                }
                // The service is called now, but its future is polled only
                // once the slots are ours.
                Some(patience) => {
                    Some(Box::pin(cap::acquire_all_within(caps, origin, patience)) as Admission)
                }
            },
        };
        request.extensions_mut().insert(StreamHandle {
            state: Arc::clone(&state),
        });
        let request = request.map(|body| W::wrap(RequestBody::guarded(body, Arc::clone(&state))));
        // The request, with the handle and the body, now belongs to the
        // service: if its `call` panics, nothing of ours is left to end the
        // stream later.
        let unwinding = EndOnUnwind::arm_finishing(&state);
        let future = self.inner.call(request);
        unwinding.disarm();
        state.arm_new();
        ResponseFuture {
            inner: Some(future),
            state: Some(state),
            admission,
        }
    }
}

/// Waiting for cap slots (only with `cap_wait`, only while caps are full).
type Admission = Pin<Box<dyn Future<Output = Result<Vec<CapPermit>, Refusal>> + Send>>;

pin_project! {
    /// The response future of [`StreamGuard`].
    ///
    /// If a guard fires before the service has answered, it resolves at once
    /// with a response of the guard's own (trailers-only `grpc-status: 4` for
    /// gRPC, `504` otherwise) and drops the service's future, which cancels a
    /// handler still running. A stream a cap refuses gets `grpc-status: 8`
    /// (`RESOURCE_EXHAUSTED`) or `503` the same way. Dropping it before it
    /// resolves ends the stream as [`EndReason::Cancelled`].
    pub struct ResponseFuture<F> {
        // `None` when the guard answers without the service (a refusal).
        #[pin]
        inner: Option<F>,
        state: Option<Arc<StreamState>>,
        admission: Option<Admission>,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(state) = this.project().state.take() {
                // An end decided while the service panicked, else: abandoned.
                state.finish_deferred();
                state.end(EndReason::Cancelled);
            }
        }
    }
}

impl<F> ResponseFuture<F> {
    /// A future that answers for the guard: `state` has already ended.
    fn answered(state: Arc<StreamState>) -> Self {
        ResponseFuture {
            inner: None,
            state: Some(state),
            admission: None,
        }
    }
}

fn early_response<B>(state: &StreamState) -> Option<Response<ResponseBody<B>>> {
    let reason = state.end_reason()?;
    Some(grpc::early_response(
        state.grpc,
        state.end_code(reason).unwrap_or(grpc::DEADLINE_EXCEEDED),
        &state.describe(reason),
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
        // The record stays in the future until the body takes it over, so
        // that whatever happens to the future (dropped, panicking) ends the
        // stream through its `Drop`.
        let Some(state) = this.state.as_ref() else {
            // Polled again after it resolved.
            return Poll::Pending;
        };
        if let Some(response) = early_response(state) {
            return Poll::Ready(Ok(response));
        }
        if let Some(admission) = this.admission.as_mut() {
            match admission.as_mut().poll(cx) {
                Poll::Pending => {
                    state.response_waker.register(cx.waker());
                    return match early_response(state) {
                        Some(response) => Poll::Ready(Ok(response)),
                        None => Poll::Pending,
                    };
                }
                Poll::Ready(Ok(permits)) => {
                    *this.admission = None;
                    state.hold(permits);
                }
                Poll::Ready(Err(refusal)) => {
                    *this.admission = None;
                    state.reject(refusal.cap, refusal.limit);
                    return match early_response(state) {
                        Some(response) => Poll::Ready(Ok(response)),
                        None => Poll::Pending,
                    };
                }
            }
        }
        let Some(inner) = this.inner.as_pin_mut() else {
            // Only answered futures have no service future, and their
            // stream has ended: early_response answered above.
            return Poll::Pending;
        };
        let unwinding = EndOnUnwind::arm(state);
        let polled = inner.poll(cx);
        unwinding.disarm();
        match polled {
            Poll::Pending => {
                state.response_waker.register(cx.waker());
                match early_response(state) {
                    Some(response) => Poll::Ready(Ok(response)),
                    None => Poll::Pending,
                }
            }
            Poll::Ready(Ok(mut response)) => {
                let Some(state) = this.state.take() else {
                    // Checked above.
                    return Poll::Pending;
                };
                if state.core().handle_in_response {
                    response.extensions_mut().insert(StreamHandle {
                        state: Arc::clone(&state),
                    });
                }
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
