//! The layer a user adds to a service stack.

use std::{fmt, marker::PhantomData, sync::Arc};

use tokio::sync::broadcast;
use tower_layer::Layer;

use crate::{events::EndEvent, peer::ConnectionKey, stats::GuardStats};

use super::{
    builder::StreamGuardBuilder,
    policy::Policy,
    service::{PlainBody, StreamGuard},
    shared::Shared,
};

/// A layer that guards every stream passing through it: idle timeouts, a
/// maximum lifetime, a [`StreamHandle`](crate::StreamHandle) in the request
/// extensions and one [`EndEvent`] per stream.
///
/// Built with [`StreamGuardLayer::builder`]; configuration errors surface
/// there, not at the first request. Clones share everything: the timer, the
/// event channel and the active-stream count. `W` says how the request body
/// reaches the inner service ([`PlainBody`], or
/// [`TonicBody`](super::TonicBody) via
/// [`for_tonic_channel`](Self::for_tonic_channel), for a tonic client).
///
/// ```
/// use std::time::Duration;
/// use tower_stream_guard::{IdleDirection, StreamGuardLayer};
///
/// # fn main() -> Result<(), tower_stream_guard::ConfigError> {
/// let guard = StreamGuardLayer::builder()
///     .idle_timeout(Duration::from_secs(30))
///     .request_idle_timeout(Duration::from_secs(10))
///     .max_lifetime(Duration::from_secs(3600))
///     .build()?;
/// let mut events = guard.subscribe();
/// # drop(events);
/// # Ok(())
/// # }
/// ```
///
/// # With gRPC-Web
///
/// With gRPC-Web (`tonic_web::GrpcWebLayer`), the guard must sit *inside*
/// the grpc-web translation. tonic's `Server::builder().layer(A).layer(B)`
/// makes `A` the outer layer, so add `GrpcWebLayer` first:
///
/// ```no_run
/// # use tower_stream_guard::StreamGuardLayer;
/// # async fn run(routes: tonic::service::Routes, guard: StreamGuardLayer) -> Result<(), Box<dyn std::error::Error>> {
/// tonic::transport::Server::builder()
///     .accept_http1(true)
///     .layer(tonic_web::GrpcWebLayer::new()) // outer
///     .layer(guard)                          // inner: sees plain gRPC
///     .add_routes(routes)
///     .serve("127.0.0.1:50051".parse()?)
///     .await?;
/// # Ok(())
/// # }
/// ```
///
/// Then a guard-ended call ends with the grpc-web trailer frame in the
/// body (`grpc-status: 4`, what a browser reads over HTTP/1.1) and a cap
/// refusal is a grpc-web trailers-only response with `grpc-status: 8`.
/// The other way round, the guard's gRPC trailers are dropped on
/// HTTP/1.1 (the browser sees a body end without a status) and its
/// refusals carry `content-type: application/grpc`, which grpc-web
/// clients reject.
pub struct StreamGuardLayer<W = PlainBody> {
    policy: Policy,
    shared: Arc<Shared>,
    // Guards a client's calls (see `for_client`).
    client: bool,
    _wrap: PhantomData<fn() -> W>,
}

impl StreamGuardLayer {
    /// Starts building a guard. With nothing set it enforces no limit but
    /// still gives every stream a handle and an end event.
    pub fn builder() -> StreamGuardBuilder {
        StreamGuardBuilder::default()
    }
}

impl StreamGuardLayer {
    pub(crate) fn new(policy: Policy, shared: Arc<Shared>) -> Self {
        StreamGuardLayer {
            policy,
            shared,
            client: false,
            _wrap: PhantomData,
        }
    }
}

impl<W> StreamGuardLayer<W> {
    /// The layer's shared state, for the loom models.
    #[cfg(all(test, stream_guard_loom))]
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// A receiver of this guard's end events: one per stream, never blocking
    /// a stream. A receiver that falls more than the channel's capacity
    /// ([`event_capacity`](StreamGuardBuilder::event_capacity), 1024 by
    /// default) behind is told how many it missed
    /// ([`RecvError::Lagged`](broadcast::error::RecvError::Lagged)).
    pub fn subscribe(&self) -> broadcast::Receiver<EndEvent> {
        self.shared.report.subscribe()
    }

    /// Streams this guard watches that have not ended yet; a stream waiting
    /// for a cap slot ([`cap_wait`](StreamGuardBuilder::cap_wait)) counts
    /// once it is admitted.
    pub fn active_streams(&self) -> usize {
        self.shared.report.active()
    }

    /// A snapshot of this guard's counters: active streams and ended
    /// streams per reason (rejections per cap). A few atomic loads; the
    /// counters agree with the end events.
    pub fn stats(&self) -> GuardStats {
        self.shared.report.stats()
    }

    /// Open streams per connection, for every connection with at least one
    /// (connections are keyed as [`ConnectionKey`] describes). Counted only
    /// with a [`max_streams_per_connection`](StreamGuardBuilder::max_streams_per_connection)
    /// cap or [`track_connections`](StreamGuardBuilder::track_connections)
    /// (empty otherwise). Takes a lock that streams take when they start and
    /// end: for dashboards and tests, not for every request.
    pub fn connection_streams(&self) -> Vec<(ConnectionKey, usize)> {
        self.shared
            .admission
            .caps
            .as_ref()
            .map(|caps| caps.connection_streams())
            .unwrap_or_default()
    }

    /// Open streams per peer IP address, for every peer with at least one;
    /// counted only when [`max_streams_per_peer`](StreamGuardBuilder::max_streams_per_peer)
    /// is set (empty otherwise). Takes a lock, like
    /// [`connection_streams`](Self::connection_streams).
    pub fn peer_streams(&self) -> Vec<(std::net::IpAddr, usize)> {
        self.shared
            .admission
            .caps
            .as_ref()
            .map(|caps| caps.peer_streams())
            .unwrap_or_default()
    }

    /// What this guard holds now: cap slots and count-table entries over
    /// its own caps and every route's, stream records alive, timer
    /// filings. All zero once every stream through it has ended and been
    /// dropped. For the leak checks of this crate's suites (cargo feature
    /// `test-view`, off by default: it counts records, an atomic increment
    /// and decrement per stream); not part of the supported API. Takes
    /// each cap set's lock and each timer shard's.
    #[cfg(feature = "test-view")]
    #[doc(hidden)]
    pub fn holdings(&self) -> crate::Holdings {
        self.shared.holdings()
    }

    /// The limits this guard enforces on streams no route matches.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The same guard, handing the inner service a `tonic::body::Body`: for
    /// a tonic client `Channel`, whose `Service` implementation takes exactly
    /// that body type. Servers do not need it: tonic's routes and axum's
    /// router take any request body, so a plain `.layer(guard)` works there.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tower_stream_guard::StreamGuardLayer;
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let guard = StreamGuardLayer::builder()
    ///     .idle_timeout(Duration::from_secs(30))
    ///     .response_handle(true)
    ///     .build()?;
    /// let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:50051")
    ///     .connect()
    ///     .await?;
    /// let guarded = tower::ServiceBuilder::new()
    ///     .layer(guard.for_tonic_channel())
    ///     .service(channel);
    /// // EchoClient::new(guarded): every call is guarded like a server's stream.
    /// # drop(guarded);
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "tonic")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
    pub fn for_tonic_channel(self) -> StreamGuardLayer<super::TonicBody> {
        self.for_client().wrap_request_body()
    }

    /// The same guard, for a client's calls (a hyper-util client, any tower
    /// HTTP client; [`for_tonic_channel`](Self::for_tonic_channel) includes
    /// it). A response body read by the application ends its stream as it
    /// yields the server's trailers: a waiting
    /// [`cancelled()`](crate::StreamHandle::cancelled) resolves, the end
    /// event goes out and the stream stops counting as active then, while
    /// the application may keep the finished response (tonic's `Streaming`
    /// never reads its body again after the trailers). A server's guard
    /// leaves that part of the end to hyper's drop of the body, right after
    /// it wrote the trailers, so that nothing runs between the last DATA
    /// frame and the trailers (see [`ResponseBody`](super::ResponseBody)).
    ///
    /// When a client's guard fires, the handle and the event say so at
    /// once; the HTTP/2 stream is reset when hyper lets go of it: at once
    /// while the application waits on the response or hyper still sends
    /// the request body, else at the application's next read of the
    /// response or its drop (the guard cannot reach a response body the
    /// application holds without reading it).
    ///
    /// ```
    /// # fn main() -> Result<(), tower_stream_guard::ConfigError> {
    /// use tower_stream_guard::StreamGuardLayer;
    ///
    /// let guard = StreamGuardLayer::builder().build()?.for_client();
    /// // tower::ServiceBuilder::new().layer(guard).service(hyper_util_client)
    /// # drop(guard);
    /// # Ok(())
    /// # }
    /// ```
    pub fn for_client(mut self) -> Self {
        self.client = true;
        self
    }

    /// The same guard, handing request bodies to the inner service as `W2`
    /// says (see [`WrapRequestBody`](super::WrapRequestBody)): for an inner
    /// service that takes exactly one body type, other than a tonic
    /// `Channel` ([`for_tonic_channel`](Self::for_tonic_channel)).
    pub fn wrap_request_body<W2>(self) -> StreamGuardLayer<W2> {
        StreamGuardLayer {
            policy: self.policy,
            shared: self.shared,
            client: self.client,
            _wrap: PhantomData,
        }
    }
}

impl<W> Clone for StreamGuardLayer<W> {
    fn clone(&self) -> Self {
        StreamGuardLayer {
            policy: self.policy,
            shared: Arc::clone(&self.shared),
            client: self.client,
            _wrap: PhantomData,
        }
    }
}

impl<W> fmt::Debug for StreamGuardLayer<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamGuardLayer")
            .field("policy", &self.policy)
            .field("active_streams", &self.active_streams())
            .finish()
    }
}

impl<S, W> Layer<S> for StreamGuardLayer<W> {
    type Service = StreamGuard<S, W>;

    fn layer(&self, inner: S) -> Self::Service {
        StreamGuard::new(inner, self.policy, Arc::clone(&self.shared), self.client)
    }
}
