//! The guard service and its response future.

use std::{
    fmt,
    future::Future,
    marker::PhantomData,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::{
    body::{RequestBody, ResponseBody},
    cap::{self, CapPermit, CapSet, ConnectionKey, Origin, Refusal},
    conn::{self, ConnectionHandle},
    error::BoxError,
    event::EndReason,
    grpc,
    handle::StreamHandle,
    policy::Policy,
    route::{self, RouteRequest},
    state::{Core, StreamState, peer_addr},
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
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
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
    /// Which `Layer::layer` call made this service (clones share it): the
    /// connection key of last resort.
    instance: u64,
    _wrap: PhantomData<fn() -> W>,
}

impl<S, W> StreamGuard<S, W> {
    pub(crate) fn new(inner: S, policy: Policy, core: Arc<Core>) -> Self {
        static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);
        StreamGuard {
            inner,
            policy,
            core,
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
            _wrap: PhantomData,
        }
    }

    /// Where `request` came from: its connection and peer, as far as the
    /// extensions tell.
    fn origin<B>(
        &self,
        request: &mut Request<B>,
    ) -> (Origin, Option<SocketAddr>, Option<ConnectionHandle>) {
        let handle = conn::handle_of(request.extensions_mut());
        let extensions = request.extensions();
        let connection = extensions
            .get::<ConnectionKey>()
            .copied()
            .or_else(|| handle.as_ref().map(ConnectionHandle::key))
            .or_else(|| self.core.connection_key.as_ref()?(extensions))
            .or_else(|| tonic_connection(extensions))
            .unwrap_or_else(|| ConnectionKey::instance(self.instance));
        let peer = peer_addr(extensions)
            .or_else(|| connection.remote_addr())
            .or_else(|| handle.as_ref()?.peer());
        let origin = Origin {
            connection,
            peer: peer.map(|p| p.ip()),
        };
        (origin, peer, handle)
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
            instance: self.instance,
            _wrap: PhantomData,
        }
    }
}

/// The connection tonic's `TcpConnectInfo` describes.
fn tonic_connection(extensions: &http::Extensions) -> Option<ConnectionKey> {
    #[cfg(feature = "tonic")]
    if let Some(info) = extensions.get::<tonic::transport::server::TcpConnectInfo>() {
        let remote = info.remote_addr()?;
        return Some(match info.local_addr() {
            Some(local) => ConnectionKey::from_addrs(local, remote),
            None => ConnectionKey::from_remote(remote),
        });
    }
    #[cfg(not(feature = "tonic"))]
    let _ = extensions;
    None
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

        // An outer guard layer already owns this stream: add our limits,
        // caps and subscribers to it instead of wrapping the bodies a second
        // time. An inner layer's caps refuse at once, without waiting.
        if let Some(handle) = request.extensions().get::<StreamHandle>() {
            let state = Arc::clone(&handle.state);
            // Before `attach` files the stream under the merged limits.
            state.limit_lifetime(client_deadline, true);
            state.attach(core, &policy);
            if core.is_draining() {
                state.refuse_draining();
                return ResponseFuture::answered(state);
            }
            match cap::try_acquire_all(&caps, &origin) {
                Ok(permits) => state.hold(permits),
                Err(refusal) => {
                    state.reject(refusal.cap, refusal.limit);
                    return ResponseFuture::answered(state);
                }
            }
            let future = self.inner.call(request.map(W::pass_through));
            return ResponseFuture {
                inner: Some(future),
                state: None,
                admission: None,
            };
        }

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
        let future = self.inner.call(request);
        // Filed after the inner call so that limits of stacked inner guard
        // layers are already merged in.
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
        let Some(state) = this.state.take() else {
            return match this.inner.as_pin_mut() {
                Some(inner) => inner
                    .poll(cx)
                    .map_ok(|response| response.map(ResponseBody::pass_through)),
                // Never built this way; and polled again after completion.
                None => Poll::Pending,
            };
        };
        if let Some(response) = early_response(&state) {
            return Poll::Ready(Ok(response));
        }
        if let Some(admission) = this.admission.as_mut() {
            match admission.as_mut().poll(cx) {
                Poll::Pending => {
                    state.response_waker.register(cx.waker());
                    if let Some(response) = early_response(&state) {
                        return Poll::Ready(Ok(response));
                    }
                    *this.state = Some(state);
                    return Poll::Pending;
                }
                Poll::Ready(Ok(permits)) => {
                    *this.admission = None;
                    state.hold(permits);
                }
                Poll::Ready(Err(refusal)) => {
                    *this.admission = None;
                    state.reject(refusal.cap, refusal.limit);
                    return match early_response(&state) {
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
        match inner.poll(cx) {
            Poll::Pending => {
                state.response_waker.register(cx.waker());
                if let Some(response) = early_response(&state) {
                    return Poll::Ready(Ok(response));
                }
                *this.state = Some(state);
                Poll::Pending
            }
            Poll::Ready(Ok(mut response)) => {
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
