//! The stream guard builder's admission settings: the stream caps, how a
//! stream over one waits or is refused, and how connections are told apart.
//! The time limits, routes and the build are in `builder.rs`.

use std::{sync::Arc, time::Duration};

use http::StatusCode;

use super::builder::StreamGuardBuilder;
use crate::{
    end::{EndReason, StreamCap},
    peer::ConnectionKey,
};

impl StreamGuardBuilder {
    /// How long a plain-HTTP client refused by a stream cap or a drain in
    /// progress is told to wait before it retries: the `Retry-After` of the
    /// `503` answer, in whole seconds rounded up (default 1 second, at most
    /// 365 days). gRPC refusals carry their status only.
    ///
    /// ```
    /// use std::{convert::Infallible, time::Duration};
    ///
    /// use http::{Request, Response, StatusCode};
    /// use tower::{Layer, ServiceExt};
    /// use tower_stream_guard::{BoxError, StreamGuardLayer, stream::RequestBody};
    ///
    /// # fn main() -> Result<(), BoxError> {
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let guard = StreamGuardLayer::builder()
    ///     .max_streams(1)
    ///     .retry_after(Duration::from_secs(5))
    ///     .build()?;
    /// let service = guard.layer(tower::service_fn(|_: Request<RequestBody<String>>| async {
    ///     Ok::<_, Infallible>(Response::new("hello".to_owned()))
    /// }));
    /// let first = service.clone().oneshot(Request::new(String::new())).await?;
    /// let refused = service.oneshot(Request::new(String::new())).await?;
    /// assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    /// assert_eq!(refused.headers()["retry-after"], "5");
    /// assert_eq!(refused.headers()["stream-guard-reason"], "rejected");
    /// # drop(first);
    /// # Ok::<_, BoxError>(())
    /// # })
    /// # }
    /// ```
    pub fn retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = wait;
        self
    }

    /// The status of the plain-HTTP answer the guard makes itself when a
    /// stream ends with `reason` before the service answered (see
    /// [`ResponseFuture`](crate::stream::ResponseFuture)). Matched by
    /// equality with the stream's [`EndReason`], so
    /// `EndReason::IdleTimeout(IdleDirection::Request)` covers the request
    /// side only and [`EndReason::Cancelled`] covers
    /// [`StreamHandle::cancel`](crate::StreamHandle::cancel). Set twice for
    /// one reason, the last status wins. It must be a `4xx` or `5xx` status
    /// ([`ConfigError::EarlyStatusNotError`](crate::ConfigError::EarlyStatusNotError) otherwise).
    ///
    /// | Reason | Default status |
    /// |--------|----------------|
    /// | `IdleTimeout(Request)` | `408 Request Timeout` |
    /// | `IdleTimeout(Response)`, `IdleTimeout(Both)` | `504 Gateway Timeout` |
    /// | `LifetimeExceeded` | `504 Gateway Timeout` |
    /// | `Cancelled` (a handle's `cancel`) | `504 Gateway Timeout` |
    /// | `Rejected(_)` | `503 Service Unavailable`, with `Retry-After` |
    /// | `Drained` | `503 Service Unavailable`, with `Retry-After` when refused on arrival |
    ///
    /// A refusal keeps its `Retry-After` ([`retry_after`](Self::retry_after))
    /// whatever its status, and every answer its `stream-guard-reason`. The
    /// guard never answers for the other reasons (`Completed`, `Error`,
    /// `Panicked`, and `SlowReader`, which needs a response body), so a
    /// status set for them has no effect; nor for gRPC streams, which get a trailers-only response
    /// with the gRPC status; once the service has answered, a plain-HTTP
    /// stream the guard ends is reset instead. Costs nothing per stream: the
    /// statuses are read only when the guard answers.
    ///
    /// ```
    /// use std::convert::Infallible;
    ///
    /// use http::{Request, Response, StatusCode};
    /// use tower::{Layer, ServiceExt};
    /// use tower_stream_guard::{BoxError, EndReason, StreamCap, StreamGuardLayer, stream::RequestBody};
    ///
    /// # fn main() -> Result<(), BoxError> {
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let guard = StreamGuardLayer::builder()
    ///     .max_streams(1)
    ///     .early_status(EndReason::Rejected(StreamCap::Total), StatusCode::TOO_MANY_REQUESTS)
    ///     .early_status(EndReason::LifetimeExceeded, StatusCode::SERVICE_UNAVAILABLE)
    ///     .build()?;
    /// let service = guard.layer(tower::service_fn(|_: Request<RequestBody<String>>| async {
    ///     Ok::<_, Infallible>(Response::new("hello".to_owned()))
    /// }));
    /// let first = service.clone().oneshot(Request::new(String::new())).await?;
    /// let refused = service.oneshot(Request::new(String::new())).await?;
    /// assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    /// assert_eq!(refused.headers()["retry-after"], "1");
    /// assert_eq!(refused.headers()["stream-guard-reason"], "rejected");
    /// # drop(first);
    /// # Ok::<_, BoxError>(())
    /// # })
    /// # }
    /// ```
    pub fn early_status(mut self, reason: EndReason, status: StatusCode) -> Self {
        self.early_statuses.retain(|(chosen, _)| *chosen != reason);
        self.early_statuses.push((reason, status));
        self
    }

    /// At most `limit` open streams per connection. A stream holds its slot
    /// from the moment its request reaches the guard until it ends (body
    /// finished or dropped, guard fired, stalled reader released), unlike
    /// tonic's `concurrency_limit_per_connection`, which frees its slot when
    /// the response headers are ready.
    ///
    /// A stream over the cap is refused at once (see
    /// [`cap_wait`](Self::cap_wait)): gRPC clients get `RESOURCE_EXHAUSTED`
    /// with a message naming the cap, plain HTTP clients `503`, and its end
    /// event says [`EndReason::Rejected`](crate::EndReason::Rejected).
    /// Connections are told apart as [`ConnectionKey`] describes; a request
    /// on a connection nothing identifies is refused the same way, with a
    /// message naming what is missing, and a warning is logged once.
    ///
    /// Counts every request through the layer: see [caps](Self#caps).
    pub fn max_streams_per_connection(mut self, limit: usize) -> Self {
        self.caps.set(StreamCap::PerConnection, limit);
        self
    }

    /// At most `limit` open streams per peer IP address, over all of its
    /// connections. The peer is found as [`ConnectionKey`] describes for
    /// connections (tonic's `TcpConnectInfo` or `TlsConnectInfo`, axum's
    /// `ConnectInfo`, a [`PeerAddr`](crate::PeerAddr), an address-based
    /// [`ConnectionKey`], a [`ConnectionGuard`](crate::ConnectionGuard) over
    /// an IO that knows its peer). A request whose peer address is unknown
    /// is refused, naming what is missing (and a warning is logged once),
    /// rather than let through uncounted.
    ///
    /// Counts every request through the layer: see [caps](Self#caps).
    pub fn max_streams_per_peer(mut self, limit: usize) -> Self {
        self.caps.set(StreamCap::PerPeer, limit);
        self
    }

    /// Counts IPv6 peers by their first `bits` bits for the per-peer caps
    /// (the layer's and its routes'), instead of by their full address: a
    /// host holds a whole prefix (usually a /64) and can take a fresh
    /// address in it for every connection, so keyed by address it gets the
    /// cap once per address. `64` suits most networks, `56` or `48` a
    /// provider that hands each customer one of those. IPv4 peers keep
    /// their address, also when a dual-stack listener shows them as
    /// IPv4-mapped IPv6 addresses. End events keep the peer's full address;
    /// [`peer_streams`](crate::StreamGuardLayer::peer_streams) lists the
    /// prefixes. Default: 128 (the full address); [`build`](Self::build)
    /// refuses a value outside 1..=128. A few bit operations per request.
    pub fn peer_ipv6_prefix(mut self, bits: u8) -> Self {
        self.peer_ipv6_prefix = bits;
        self
    }

    /// At most `limit` open streams through this guard in total.
    ///
    /// Counts every request through the layer: see [caps](Self#caps).
    pub fn max_streams(mut self, limit: usize) -> Self {
        self.caps.set(StreamCap::Total, limit);
        self
    }

    /// Counts open streams per connection for
    /// [`StreamGuardLayer::connection_streams`](crate::StreamGuardLayer::connection_streams) even without a per-connection
    /// cap: a short lock on a hash map when each stream starts and ends.
    pub fn track_connections(mut self, track: bool) -> Self {
        self.track_connections = track;
        self
    }

    /// A stream over a cap waits up to `patience` for a slot instead of being
    /// refused at once; it is refused if none comes free in time, the same
    /// way as without a wait (`RESOURCE_EXHAUSTED`, or `503` with
    /// `Retry-After`; its end event says
    /// [`EndReason::Rejected`](crate::EndReason::Rejected)).
    ///
    /// - **First come, first served.** A stream arrives when the guard
    ///   service's `call` runs (however late its response future is first
    ///   polled): then it queues on what refused it (its connection, its
    ///   peer or the total), and its patience starts. A stream that ends
    ///   hands its slots over to the first waiter that can use them; they are
    ///   never free for a newcomer to take first, and a newcomer that needs
    ///   what others wait for queues behind them. A stream capped both by the
    ///   layer and by its route waits in one set at a time, keeping its
    ///   arrival order in each.
    /// - **Not admitted yet.** A waiting stream is not counted in
    ///   [`active_streams`](crate::StreamGuardLayer::active_streams) or
    ///   [`GuardStats::active`](crate::GuardStats::active), and its idle
    ///   timeouts and minimum response rate (about the peer's reading and
    ///   sending) start when it is admitted. Its lifetime
    ///   ([`max_lifetime`](Self::max_lifetime), an honoured `grpc-timeout`)
    ///   runs from its arrival, and a drain cuts it like any open stream.
    /// - The service is called at once, but its future is polled only once
    ///   the stream is admitted.
    ///
    /// Costs, only for streams that wait: one allocation (the place in the
    /// queue, the timer of its patience); while any stream waits, arrivals
    /// and ends take the cap set's lock, also for a total-only cap.
    ///
    /// ```
    /// use std::{convert::Infallible, time::Duration};
    ///
    /// use http::{Request, Response};
    /// use tower::{Layer, Service, ServiceExt};
    /// use tower_stream_guard::{BoxError, StreamGuardLayer, stream::RequestBody};
    ///
    /// # fn main() -> Result<(), BoxError> {
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let guard = StreamGuardLayer::builder()
    ///     .max_streams(1)
    ///     .cap_wait(Duration::from_secs(5))
    ///     .build()?;
    /// let mut service = guard.layer(tower::service_fn(|_: Request<RequestBody<String>>| async {
    ///     Ok::<_, Infallible>(Response::new("hello".to_owned()))
    /// }));
    /// let first = service.ready().await?.call(Request::new(String::new())).await?;
    /// // Arrives now: it waits, first in line, and is not active yet.
    /// let second = service.ready().await?.call(Request::new(String::new()));
    /// assert_eq!(guard.active_streams(), 1);
    /// drop(first); // its slot goes to the waiting stream
    /// let second = second.await?;
    /// assert_eq!(second.status(), http::StatusCode::OK);
    /// # Ok::<_, BoxError>(())
    /// # })
    /// # }
    /// ```
    pub fn cap_wait(mut self, patience: Duration) -> Self {
        self.cap_wait = Some(patience);
        self
    }

    /// How to tell a request's connection from its extensions, for servers
    /// whose connect info the guard does not read itself (see
    /// [`ConnectionKey`]); e.g. axum's `ConnectInfo` without the `axum`
    /// feature, or your own `Connected` type:
    ///
    /// ```
    /// use std::net::SocketAddr;
    /// use tower_stream_guard::{ConnectionKey, StreamGuardLayer};
    ///
    /// # #[derive(Clone)] struct ConnectInfo<T>(T);
    /// # fn main() -> Result<(), tower_stream_guard::ConfigError> {
    /// let guard = StreamGuardLayer::builder()
    ///     .max_streams_per_connection(16)
    ///     .connection_key(|extensions| {
    ///         let ConnectInfo(remote) = extensions.get::<ConnectInfo<SocketAddr>>()?;
    ///         Some(ConnectionKey::from_remote(*remote))
    ///     })
    ///     .build()?;
    /// # drop(guard);
    /// # Ok(())
    /// # }
    /// ```
    pub fn connection_key<F>(mut self, key: F) -> Self
    where
        F: Fn(&http::Extensions) -> Option<ConnectionKey> + Send + Sync + 'static,
    {
        self.connection_key = Some(Arc::new(key));
        self
    }
}
