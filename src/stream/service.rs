//! The guard service: where a stream starts.

use std::{
    fmt,
    marker::PhantomData,
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use http_body::Body;
use tokio::time::Instant;
use tower_service::Service;

use crate::{
    connection::ConnectionHandle,
    error::BoxError,
    grpc,
    peer::{self, ConnectionKey},
};

use super::{
    cap::{self, Admission, CapPermit, CapSet, Origin, Wait},
    ending::After,
    future::{ForResponse, Gate, ResponseFuture},
    handle::StreamHandle,
    origin::{self, Anchor},
    policy::Policy,
    request_body::RequestBody,
    response_body::ResponseBody,
    route::{self, RouteRequest},
    shared::Shared,
    ticket::{EndOnUnwind, Ticket},
};

/// How a guard hands the wrapped request body to the service it wraps.
///
/// Most services accept any body type, tonic's server routes and axum's
/// router included: [`PlainBody`], the default, hands them a
/// [`RequestBody<B>`]. A service that takes exactly one body type needs the
/// wrapper boxed into that type: [`TonicBody`] does it for a tonic client
/// `Channel` (see
/// [`for_tonic_channel`](crate::StreamGuardLayer::for_tonic_channel)); for
/// another, implement this trait for a marker type of your own and pick it
/// with [`wrap_request_body`](crate::StreamGuardLayer::wrap_request_body):
///
/// ```
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body::Body;
/// use http_body_util::{BodyExt, Empty, combinators::UnsyncBoxBody};
/// use tower::{Layer, ServiceExt};
/// use tower_stream_guard::{
///     BoxError, StreamGuardLayer,
///     stream::{RequestBody, WrapRequestBody},
/// };
///
/// type Boxed = UnsyncBoxBody<Bytes, BoxError>;
///
/// /// Boxes request bodies, for a service that takes only `Boxed`.
/// struct BoxIt;
///
/// impl<B> WrapRequestBody<B> for BoxIt
/// where
///     B: Body<Data = Bytes> + Send + 'static,
///     B::Error: Into<BoxError>,
/// {
///     type Body = Boxed;
///
///     fn wrap(body: RequestBody<B>) -> Boxed {
///         body.boxed_unsync()
///     }
/// }
///
/// # fn main() -> Result<(), BoxError> {
/// # tokio::runtime::Runtime::new()?.block_on(async {
/// let guard = StreamGuardLayer::builder().build()?.wrap_request_body::<BoxIt>();
/// let service = guard.layer(tower::service_fn(|_: Request<Boxed>| async {
///     Ok::<_, BoxError>(Response::new(Empty::<Bytes>::new()))
/// }));
/// let response = service.oneshot(Request::new(Empty::<Bytes>::new())).await?;
/// assert!(response.into_body().collect().await?.to_bytes().is_empty());
/// # Ok::<_, BoxError>(())
/// # })
/// # }
/// ```
pub trait WrapRequestBody<B> {
    /// The request body type the inner service receives.
    type Body;

    /// Wraps a body this guard watches.
    fn wrap(body: RequestBody<B>) -> Self::Body;
}

/// Hands the inner service a [`RequestBody<B>`]: the default, for services
/// that take any body type (tonic's server routes, axum's router, hyper and
/// tower `service_fn`s generic over the body).
///
/// ```
/// use tower_stream_guard::{StreamGuardLayer, stream::PlainBody};
///
/// # fn main() -> Result<(), tower_stream_guard::ConfigError> {
/// let guard: StreamGuardLayer<PlainBody> = StreamGuardLayer::builder().build()?;
/// # drop(guard);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct PlainBody;

impl<B> WrapRequestBody<B> for PlainBody {
    type Body = RequestBody<B>;

    fn wrap(body: RequestBody<B>) -> Self::Body {
        body
    }
}

/// Hands the inner service a `tonic::body::Body`, the one body type a tonic
/// client `Channel` takes: the guarded body is boxed once per stream. Picked
/// by [`for_tonic_channel`](crate::StreamGuardLayer::for_tonic_channel);
/// servers do not need it.
///
/// ```
/// use tower_stream_guard::{StreamGuardLayer, stream::TonicBody};
///
/// # fn main() -> Result<(), tower_stream_guard::ConfigError> {
/// let guard: StreamGuardLayer<TonicBody> =
///     StreamGuardLayer::builder().response_handle(true).build()?.for_tonic_channel();
/// # drop(guard);
/// # Ok(())
/// # }
/// ```
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

/// The guard service: what [`StreamGuardLayer`](crate::StreamGuardLayer)
/// wraps around a service. Each `call` starts one guarded stream (see the
/// [module docs](crate::stream)); clones share the layer's timer, caps and
/// events.
///
/// ```
/// use std::convert::Infallible;
///
/// use http::{Request, Response};
/// use tower::Layer;
/// use tower_stream_guard::{StreamGuardLayer, stream::{RequestBody, StreamGuard}};
///
/// # fn main() -> Result<(), tower_stream_guard::ConfigError> {
/// let guard = StreamGuardLayer::builder().build()?;
/// let service: StreamGuard<_> = guard.layer(tower::service_fn(
///     |_: Request<RequestBody<String>>| async {
///         Ok::<_, Infallible>(Response::new(String::new()))
///     },
/// ));
/// let _inner = service.into_inner(); // the service_fn again
/// # Ok(())
/// # }
/// ```
pub struct StreamGuard<S, W = PlainBody> {
    inner: S,
    policy: Policy,
    shared: Arc<Shared>,
    /// The connection this service serves, when it was built for one
    /// ([`for_connection`](Self::for_connection)); clones share it.
    connection: Option<ConnectionKey>,
    // Guards a client's calls (see `StreamGuardLayer::for_client`).
    client: bool,
    _wrap: PhantomData<fn() -> W>,
}

impl<S, W> StreamGuard<S, W> {
    pub(crate) fn new(inner: S, policy: Policy, shared: Arc<Shared>, client: bool) -> Self {
        StreamGuard {
            inner,
            policy,
            shared,
            connection: None,
            client,
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
    /// use tower_stream_guard::{ConnectionKey, StreamGuardLayer, stream::RequestBody};
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
    /// extensions tell (`origin::identify` knows how).
    fn origin<B>(
        &self,
        request: &mut Request<B>,
    ) -> (
        Origin,
        Option<SocketAddr>,
        Option<ConnectionHandle>,
        Option<Anchor>,
    ) {
        let found = origin::identify(
            request.extensions_mut(),
            self.connection,
            self.shared.admission.connection_key.as_deref(),
        );
        let origin = Origin {
            connection: found.connection,
            peer: found
                .peer
                .map(|p| peer::cap_key(p.ip(), self.shared.admission.peer_ipv6_prefix)),
        };
        (origin, found.peer, found.handle, found.anchor)
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
            shared: Arc::clone(&self.shared),
            connection: self.connection,
            client: self.client,
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
        let shared = &self.shared;
        // Before the routes: a `route_when` predicate sees what the origin
        // unpacks (a guarded connect info's `ConnectionHandle` and inner
        // connect info).
        let (origin, peer, connection, anchor) = self.origin(&mut request);
        let route = if shared.admission.routes.is_empty() {
            None
        } else {
            route::select(
                &shared.admission.routes,
                &RouteRequest {
                    method: request.method(),
                    uri: request.uri(),
                    headers: request.headers(),
                    extensions: request.extensions(),
                },
            )
        };
        let policy = route.map_or(self.policy, |route| route.policy);
        let client_deadline = shared
            .admission
            .honor_grpc_timeout
            .then(|| grpc::timeout_of(request.headers()))
            .flatten();
        // Empty (no allocation) unless some cap applies.
        let caps: Vec<Arc<CapSet>> = shared
            .admission
            .caps
            .iter()
            .chain(route.and_then(|route| route.caps.as_ref()))
            .cloned()
            .collect();

        // Tried before the stream is counted: a stream over a cap is
        // counted as waiting (or refused) from its start, never as active.
        let first_try = cap::try_acquire_all(&caps, &origin);
        let after = After::new(&request, origin.connection, peer, connection);
        let grpc = grpc::is_grpc(request.headers());
        let version = request.version();
        let ticket = match Ticket::start(
            shared,
            &policy,
            grpc,
            after,
            route.map_or(0, |route| route.tag),
            first_try.is_err(),
        ) {
            Ok(ticket) => ticket,
            Err(refused) => {
                // Refused by the drain: the slots go back at once.
                first_try.into_iter().flatten().for_each(CapPermit::release);
                return ResponseFuture::answered(refused);
            }
        };
        if let Some(anchor) = anchor {
            ticket.keep_anchor(anchor);
        }
        ticket.limit_lifetime(client_deadline, true);
        let gate = match first_try {
            Ok(permits) => {
                ticket.hold(permits);
                Gate::Open
            }
            Err(refusal) => match shared.admission.cap_wait {
                // The service is called now, but its future is polled only
                // once the slots are ours. The stream arrives now: it takes
                // its place in the queue, and its patience starts.
                Some(patience) if !origin.lacks_key_of(refusal.cap) => {
                    let deadline = Instant::now() + patience;
                    let wait = Wait::start(caps, origin, refusal);
                    Gate::Waiting(Box::new(Admission::new(wait, deadline)))
                }
                _ => {
                    ticket.reject(refusal.cap, refusal.limit);
                    return ResponseFuture::answered(ticket);
                }
            },
        };
        let record = ticket.record();
        let goaways_seen = shared.goaways_seen();
        request.extensions_mut().insert(StreamHandle {
            record: Arc::clone(record),
            goaways_seen,
        });
        // If `call` (or the request body's `is_end_stream`) panics, the
        // ticket is dropped by the unwinding: the stream ends as panicked
        // (see `Ticket`'s `Drop`).
        let unwinding = EndOnUnwind::arm(&ticket);
        let request = request.map(|body| W::wrap(RequestBody::guarded(body, Arc::clone(record))));
        let future = self.inner.call(request);
        unwinding.disarm();
        shared.timer.arm_new(ticket.record());
        // Once per stream; `None` (nothing to clone) unless a heartbeat is set.
        let heartbeat = route
            .map_or(&shared.admission.heartbeat, |route| &route.heartbeat)
            .clone();
        let response = ForResponse {
            goaways_seen,
            heartbeat,
            client: self.client,
            version,
        };
        ResponseFuture::calling(future, gate, ticket, response)
    }
}
