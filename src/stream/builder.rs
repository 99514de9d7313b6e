//! The builder of [`StreamGuardLayer`]: every setting, checked when the
//! layer is built.

use std::{fmt, sync::Arc, time::Duration};

use http::StatusCode;

use super::{
    cap::{CapLimits, CapSet},
    heartbeat::Heartbeat,
    layer::StreamGuardLayer,
    policy::Policy,
    report::Report,
    route::{self, Matcher, RoutePolicy, RouteRequest, RouteSpec, validate_caps},
    shared::{Admission, Shared},
    timer::Sweeper,
};
use crate::{
    connection::GoawayNotice,
    drain::Drain,
    end::{EndReason, IdleDirection},
    error::{
        ConfigError, DEFAULT_TIMER_RESOLUTION, check_duration, validate_event_capacity,
        validate_path_labels,
    },
    events::{DEFAULT_EVENT_CAPACITY, EndCallback, EndEvent},
    peer::KeyFn,
};

/// `Retry-After` of a plain-HTTP refusal unless set.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Configures a [`StreamGuardLayer`]; every setting is optional, and
/// [`build`](Self::build) checks them all at once.
///
/// ```
/// use std::time::Duration;
/// use tower_stream_guard::{Drain, RoutePolicy, StreamGuardLayer};
///
/// # fn main() -> Result<(), tower_stream_guard::ConfigError> {
/// let drain = Drain::new();
/// let guard = StreamGuardLayer::builder()
///     // Limits for every stream...
///     .idle_timeout(Duration::from_secs(30))
///     .max_lifetime(Duration::from_secs(30 * 60))
///     .honor_grpc_timeout(true)
///     // ...caps that hold until a stream really ends...
///     .max_streams_per_connection(100)
///     .max_streams_per_peer(200)
///     .max_streams(10_000)
///     .cap_wait(Duration::from_millis(100))
///     // ...other limits for one method...
///     .route(
///         "/chat.Chat/Subscribe",
///         RoutePolicy::new()
///             .max_lifetime(Duration::from_secs(4 * 3600))
///             .max_streams_per_peer(4),
///     )
///     // ...and shutdown and reporting.
///     .drain(&drain)
///     .on_end(|event| println!("{}", event.to_json()))
///     .build()?;
/// assert_eq!(guard.policy().max_lifetime(), Some(Duration::from_secs(30 * 60)));
/// # Ok(())
/// # }
/// ```
///
/// # Caps
///
/// A layer's caps ([`max_streams_per_connection`](Self::max_streams_per_connection),
/// [`max_streams_per_peer`](Self::max_streams_per_peer),
/// [`max_streams`](Self::max_streams)) count every request through the
/// layer, a health check or a plain `GET` as much as a long stream. To cap
/// only the streams of some routes, set the cap on a [`RoutePolicy`]
/// instead (`.route_prefix("/events", RoutePolicy::new().max_streams_per_peer(4))`):
/// a route's caps count only that route's streams, on top of the layer's.
#[derive(Clone)]
pub struct StreamGuardBuilder {
    pub(super) policy: Policy,
    pub(super) caps: CapLimits,
    pub(super) cap_wait: Option<Duration>,
    pub(super) retry_after: Duration,
    pub(super) early_statuses: Vec<(EndReason, StatusCode)>,
    pub(super) heartbeat: Option<Heartbeat>,
    pub(super) routes: Vec<RouteSpec>,
    pub(super) connection_key: Option<KeyFn>,
    pub(super) peer_ipv6_prefix: u8,
    pub(super) honor_grpc_timeout: bool,
    pub(super) track_connections: bool,
    pub(super) response_handle: bool,
    pub(super) metrics: bool,
    pub(super) path_labels: usize,
    pub(super) drain: Option<Drain>,
    pub(super) notice: Option<GoawayNotice>,
    pub(super) resolution: Duration,
    pub(super) capacity: usize,
    pub(super) callbacks: Vec<EndCallback>,
}

impl Default for StreamGuardBuilder {
    fn default() -> Self {
        StreamGuardBuilder {
            policy: Policy::default(),
            caps: CapLimits::default(),
            cap_wait: None,
            retry_after: DEFAULT_RETRY_AFTER,
            early_statuses: Vec::new(),
            heartbeat: None,
            routes: Vec::new(),
            connection_key: None,
            peer_ipv6_prefix: 128,
            honor_grpc_timeout: false,
            track_connections: false,
            response_handle: false,
            metrics: false,
            path_labels: crate::meter::DEFAULT_PATH_LABELS,
            drain: None,
            notice: None,
            resolution: DEFAULT_TIMER_RESOLUTION,
            capacity: DEFAULT_EVENT_CAPACITY,
            callbacks: Vec::new(),
        }
    }
}

impl fmt::Debug for StreamGuardBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamGuardBuilder")
            .field("policy", &self.policy)
            .field("caps", &self.caps)
            .field("cap_wait", &self.cap_wait)
            .field("retry_after", &self.retry_after)
            .field("early_statuses", &self.early_statuses)
            .field("heartbeat", &self.heartbeat)
            .field("routes", &self.routes)
            .field("connection_key", &self.connection_key.is_some())
            .field("peer_ipv6_prefix", &self.peer_ipv6_prefix)
            .field("honor_grpc_timeout", &self.honor_grpc_timeout)
            .field("track_connections", &self.track_connections)
            .field("response_handle", &self.response_handle)
            .field("metrics", &self.metrics)
            .field("path_labels", &self.path_labels)
            .field("drain", &self.drain)
            .field("notice", &self.notice)
            .field("resolution", &self.resolution)
            .field("capacity", &self.capacity)
            .field("callbacks", &self.callbacks.len())
            .finish()
    }
}

impl StreamGuardBuilder {
    /// Ends a stream when no frame moved in *either* direction for `timeout`:
    /// the safe choice for bidirectional calls where one side is quiet for a
    /// while. Ends gRPC responses with `DEADLINE_EXCEEDED`.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.policy.set_idle(IdleDirection::Both, timeout);
        self
    }

    /// Ends a stream when the peer sent no request frame for `timeout` while
    /// its request body is still open (not at its end, and not dropped by the
    /// handler): the client-streaming call whose client went silent. The
    /// handler's next read fails with `DEADLINE_EXCEEDED`.
    pub fn request_idle_timeout(mut self, timeout: Duration) -> Self {
        self.policy.set_idle(IdleDirection::Request, timeout);
        self
    }

    /// Ends a stream whose reader is too slow: when, over a `window` of time
    /// during which the response had data waiting for the peer, the peer
    /// took fewer than `bytes` bytes. Ends gRPC responses with
    /// `RESOURCE_EXHAUSTED` and reports [`EndReason::SlowReader`]. Off by
    /// default.
    ///
    /// A trickling reader keeps the response moving, so no idle timeout
    /// fires, while the server holds the stream (and what its producer
    /// buffered) for as long as the reader likes. This setting is about
    /// such readers only: the window's clock runs while the response body
    /// has handed hyper a frame and hyper does not come back for the next
    /// (the peer's flow-control window is shut), the time
    /// [`EndEvent::blocked_on_reader`](crate::EndEvent::blocked_on_reader)
    /// reports. A producer with nothing to send stops that clock: ending
    /// such a stream is the idle timeouts' job. A peer that stops reading
    /// altogether is a slow reader too (its window fills, and it ends the
    /// way a stalled reader's idle timeout does).
    ///
    /// Checked by the timer, about once per window and stream, comparing
    /// the byte counter with the count at the window's start: nothing per
    /// frame. Each window starts where the last one that met the rate
    /// ended, so a reader is ended at most one window (and a timer tick)
    /// after its bytes fell behind. A route can set its own
    /// ([`RoutePolicy::min_response_rate`](crate::RoutePolicy::min_response_rate)).
    ///
    /// # Large frames
    ///
    /// Bytes count when the body hands them to hyper, and hyper's HTTP/2
    /// sender takes a data frame whole: it holds it until the stream has
    /// send capacity, hands it to h2, which buffers all of it, and polls
    /// the body for the next frame only then. A body of 2 MiB frames is
    /// thus polled once per 2 MiB the reader drains and waits on the reader
    /// in between. So that a fast reader of large frames is not taken for
    /// a slow one, the bytes a window did not need count towards the next
    /// windows (`bytes` per window), up to two frames' worth (hyper's and
    /// h2's; a frame taken as large as the window's average): a reader
    /// below the rate is ended once that credit is spent, at most two
    /// frames' time at the minimum rate later (2 x 2 MiB at 128 KiB/s:
    /// 32 s).
    ///
    /// The guard watches a response until its body hands hyper its last
    /// part: the stream then ends (`completed`, its cap slots free, its
    /// event out) while hyper and h2 may still hold that frame and the one
    /// before it for the reader, and nothing tells the guard when h2 has
    /// sent them. A response of one 2 MiB frame completes as hyper takes
    /// it, before the reader has read a byte. Where the rate check or the
    /// cap must cover a response to its end, keep frames small: gRPC
    /// messages of tens of KiB, or a body that splits its data.
    ///
    /// [`build`](Self::build) fails with [`ConfigError::Zero`] for zero
    /// `bytes` or a zero `window`, and with
    /// [`ConfigError::BelowResolution`] for a window shorter than the timer
    /// resolution.
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
    /// # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build()?.block_on(async {
    /// // At least 64 KiB every 10 s that the response waits on the client.
    /// let guard = StreamGuardLayer::builder()
    ///     .min_response_rate(64 * 1024, Duration::from_secs(10))
    ///     .build()?;
    /// let mut events = guard.subscribe();
    /// let service = guard.layer(tower::service_fn(|_: Request<RequestBody<String>>| async {
    ///     // A producer that always has a 1 KiB frame ready.
    ///     let frames = futures_util::stream::repeat_with(|| {
    ///         Ok::<_, Infallible>(Frame::data(Bytes::from(vec![0; 1024])))
    ///     });
    ///     Ok::<_, Infallible>(Response::new(StreamBody::new(frames)))
    /// }));
    /// let response = service.oneshot(Request::new(String::new())).await?;
    /// let mut body = response.into_body();
    /// // A client that takes a frame a second: 10 KiB per window.
    /// while let Some(Ok(_)) = body.frame().await {
    ///     tokio::time::sleep(Duration::from_secs(1)).await;
    /// }
    /// let event = events.recv().await?;
    /// assert_eq!(event.reason(), EndReason::SlowReader);
    /// assert_eq!(event.limit(), Some(Duration::from_secs(10)));
    /// # Ok::<_, BoxError>(())
    /// # })
    /// # }
    /// ```
    pub fn min_response_rate(mut self, bytes: u64, window: Duration) -> Self {
        self.policy.min_rate = Some(super::policy::MinRate { bytes, window });
        self
    }

    /// Ends a stream when the service sent no response frame for `timeout`,
    /// counted from the request's arrival: a silent producer, or a peer that
    /// stopped reading (hyper then no longer polls the body; the guard fires
    /// anyway).
    pub fn response_idle_timeout(mut self, timeout: Duration) -> Self {
        self.policy.set_idle(IdleDirection::Response, timeout);
        self
    }

    /// Which response data frames are heartbeats: frames that go to the
    /// peer and count in the end event's traffic, but do not reset the idle
    /// clock of [`response_idle_timeout`](Self::response_idle_timeout) and
    /// [`idle_timeout`](Self::idle_timeout). Without it, axum's
    /// `Sse::keep_alive` comments or a gRPC service's ping messages keep a
    /// stream whose producer died open for ever. Response frames only;
    /// routes may set their own ([`RoutePolicy::heartbeat`]). Costs one call
    /// of the predicate per response data frame, nothing when unset; see
    /// [`Heartbeat`].
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
    ///     BoxError, EndReason, Heartbeat, IdleDirection, StreamGuardLayer, stream::RequestBody,
    /// };
    ///
    /// # fn main() -> Result<(), BoxError> {
    /// # tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build()?.block_on(async {
    /// let guard = StreamGuardLayer::builder()
    ///     .response_idle_timeout(Duration::from_secs(5))
    ///     .heartbeat(Heartbeat::sse_comment())
    ///     .build()?;
    /// let mut events = guard.subscribe();
    /// let service = guard.layer(tower::service_fn(|_: Request<RequestBody<String>>| async {
    ///     // An event stream whose producer died: only keep-alive comments, every 2 s.
    ///     let beats = futures_util::stream::unfold((), |()| async {
    ///         tokio::time::sleep(Duration::from_secs(2)).await;
    ///         Some((Ok::<_, Infallible>(Frame::data(Bytes::from_static(b":\n\n"))), ()))
    ///     });
    ///     Ok::<_, Infallible>(Response::new(StreamBody::new(Box::pin(beats))))
    /// }));
    /// let mut body = service.oneshot(Request::new(String::new())).await?.into_body();
    /// while let Some(Ok(frame)) = body.frame().await {
    ///     assert_eq!(frame.into_data().unwrap(), ":\n\n"); // the heartbeats still go out
    /// }
    /// let event = events.recv().await?;
    /// assert_eq!(event.reason(), EndReason::IdleTimeout(IdleDirection::Response));
    /// assert_eq!(event.response().frames, 2); // and are counted (at 2 s and 4 s)
    /// # Ok::<_, BoxError>(())
    /// # })
    /// # }
    /// ```
    pub fn heartbeat(mut self, heartbeat: Heartbeat) -> Self {
        self.heartbeat = Some(heartbeat);
        self
    }

    /// Ends a stream `lifetime` after its request reached the guard, whatever
    /// it is doing. An idle timeout not shorter than it is accepted but can
    /// never fire first: the lifetime ends the stream.
    pub fn max_lifetime(mut self, lifetime: Duration) -> Self {
        self.policy.max_lifetime = Some(lifetime);
        self
    }

    /// Lets a client's `grpc-timeout` header shorten the lifetime of its
    /// stream: the stream ends at whichever comes first, the lifetime this
    /// guard sets or the client's deadline (a client cannot lengthen it).
    /// The end is reported as [`EndReason::LifetimeExceeded`](crate::EndReason::LifetimeExceeded)
    /// and the `grpc-message` names `grpc-timeout`. Malformed headers are
    /// ignored.
    ///
    /// tonic's own `Server::timeout` also reads `grpc-timeout`, but bounds only
    /// the time until the handler returns its response (for a streaming call,
    /// until the stream *starts*); this bounds the whole stream, messages
    /// included.
    pub fn honor_grpc_timeout(mut self, honor: bool) -> Self {
        self.honor_grpc_timeout = honor;
        self
    }

    /// Also puts the [`StreamHandle`](crate::StreamHandle) into the
    /// *response* extensions: for clients, whose requests are built before
    /// the guard sees them. A tonic client finds it with
    /// `response.extensions().get::<StreamHandle>()` and can observe the call
    /// or [`cancel`](crate::StreamHandle::cancel) it. Every response carries
    /// it, the guard's own answers too (a cap's refusal, a limit that fired
    /// before the service answered): there it has already ended, and
    /// [`end_reason`](crate::StreamHandle::end_reason) says why. Costs an
    /// extension insertion per stream, so it is off by default.
    pub fn response_handle(mut self, enabled: bool) -> Self {
        self.response_handle = enabled;
        self
    }

    /// Applies `policy` to requests whose path is exactly `path` (for gRPC,
    /// `/package.Service/Method`). Routes are tried in the order they were
    /// added; the first match wins. See [`RoutePolicy`].
    pub fn route(self, path: impl Into<String>, policy: RoutePolicy) -> Self {
        self.push_route(Matcher::Exact(path.into()), policy)
    }

    /// Applies `policy` to requests whose path starts with `prefix` (for a
    /// whole gRPC service, `/package.Service/`).
    pub fn route_prefix(self, prefix: impl Into<String>, policy: RoutePolicy) -> Self {
        self.push_route(Matcher::Prefix(prefix.into()), policy)
    }

    /// Applies `policy` to requests for which `predicate` returns `true`; it
    /// runs once per request, before the service is called and after the
    /// guard has read where the request came from: behind a
    /// [`ConnectionGuard`](crate::ConnectionGuard) its extensions hold the
    /// [`ConnectionHandle`](crate::ConnectionHandle) (and the connect info a
    /// guarded one wrapped), as the service's will.
    pub fn route_when<F>(self, predicate: F, policy: RoutePolicy) -> Self
    where
        F: Fn(&RouteRequest<'_>) -> bool + Send + Sync + 'static,
    {
        self.push_route(Matcher::When(Arc::new(predicate)), policy)
    }

    fn push_route(mut self, matcher: Matcher, policy: RoutePolicy) -> Self {
        self.routes.push(RouteSpec { matcher, policy });
        self
    }

    /// Lets `drain` shut this guard's streams down: when it starts, handles'
    /// [`draining`](crate::StreamHandle::draining) resolves and new streams
    /// are refused with `UNAVAILABLE` (`503`); when its grace period ends,
    /// streams still open end with `UNAVAILABLE` and reason
    /// [`Drained`](crate::EndReason::Drained). See [`Drain`].
    ///
    /// With a drain, streams that have no deadline of their own are filed in
    /// the guard's timer map too (one map insertion and removal per stream),
    /// so that the drain can reach them.
    pub fn drain(mut self, drain: &Drain) -> Self {
        self.drain = Some(drain.clone());
        self
    }

    /// Ties this guard's streams to the client connections `notice` watches
    /// (a guard around a client: a tonic `Channel` built with
    /// [`GoawayNotice::connector`], a hyper-util client): a stream's
    /// [`draining`](crate::StreamHandle::draining) resolves, and
    /// [`is_draining`](crate::StreamHandle::is_draining) turns true, when a
    /// connection of the notice receives GOAWAY after the stream started
    /// (see [`GoawayNotice`] for which streams that tells). Costs an atomic
    /// load per stream. The handle is in the response's extensions with
    /// [`response_handle`](Self::response_handle).
    pub fn goaway_notice(mut self, notice: &GoawayNotice) -> Self {
        self.notice = Some(notice.clone());
        self
    }

    /// How often deadlines are checked (default 10 ms, between 1 ms and 1 s).
    /// A guard fires at most one resolution after its deadline (an idle
    /// timeout at most two) once the timer task gets to run, and never
    /// before it, except that an idle timeout may fire up to a quarter
    /// resolution plus 1 ms early when the runtime runs the timer task late.
    /// Each guard with streams that have a deadline wakes once per
    /// resolution, however many streams it has.
    pub fn timer_resolution(mut self, resolution: Duration) -> Self {
        self.resolution = resolution;
        self
    }

    /// How many end events a lagging receiver may fall behind before it
    /// misses some (default 1024, at most 65,536).
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Runs `callback` for every end event, on whichever task ended the stream
    /// (the server's connection task, or the guard's timer task). Keep it
    /// short and non-blocking; a panic in it is caught and logged.
    pub fn on_end<F>(mut self, callback: F) -> Self
    where
        F: Fn(&EndEvent) + Send + Sync + 'static,
    {
        self.callbacks.push(Arc::new(callback));
        self
    }

    /// Checks the configuration and builds the layer.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] when a duration is zero, longer than 365 days or
    /// shorter than the timer resolution, when the resolution is out of
    /// range, when the event
    /// capacity or a cap is zero, or when a route's path does not start with
    /// `/` or its settings laid over the layer's break one of these rules
    /// ([`ConfigError::Route`] names the route), when an
    /// [`early_status`](Self::early_status) is not a `4xx` or `5xx` status,
    /// or when [`peer_ipv6_prefix`](Self::peer_ipv6_prefix) is outside
    /// 1..=128.
    pub fn build(self) -> Result<StreamGuardLayer, ConfigError> {
        self.policy.validate(self.resolution)?;
        validate_event_capacity(self.capacity)?;
        validate_path_labels(self.path_labels)?;
        validate_caps(&self.caps)?;
        if !(1..=128).contains(&self.peer_ipv6_prefix) {
            return Err(ConfigError::PeerIpv6PrefixOutOfRange {
                bits: self.peer_ipv6_prefix,
            });
        }
        if let Some(patience) = self.cap_wait {
            check_duration("cap_wait", patience, None)?;
        }
        check_duration("retry_after", self.retry_after, None)?;
        for &(reason, status) in &self.early_statuses {
            if !(status.is_client_error() || status.is_server_error()) {
                return Err(ConfigError::EarlyStatusNotError { reason, status });
            }
        }
        // Rounded up: a client never retries sooner than asked.
        let retry_after_secs =
            self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0);
        let mut routes = self
            .routes
            .into_iter()
            .enumerate()
            .map(|(index, spec)| {
                spec.compile(index, self.policy, self.heartbeat.as_ref(), self.resolution)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let drain = self.drain.map(|drain| Arc::clone(drain.shared()));
        let route_names = route::name_routes(&mut routes);
        let admission = Admission {
            routes,
            route_names,
            caps: (!self.caps.is_empty() || self.track_connections)
                .then(|| Arc::new(CapSet::new(self.caps, self.track_connections))),
            connection_key: self.connection_key,
            peer_ipv6_prefix: self.peer_ipv6_prefix,
            honor_grpc_timeout: self.honor_grpc_timeout,
            cap_wait: self.cap_wait,
            handle_in_response: self.response_handle,
            retry_after_secs,
            early_statuses: (!self.early_statuses.is_empty())
                .then(|| self.early_statuses.into_boxed_slice()),
            heartbeat: self.heartbeat,
        };
        let shared = Shared::new(
            Sweeper::new(self.resolution, drain.is_some()),
            Report::new(
                self.capacity,
                self.callbacks,
                self.metrics.then_some(self.path_labels),
            ),
            admission,
            drain,
            self.notice.map(|notice| Arc::clone(notice.shared())),
        );
        Ok(StreamGuardLayer::new(self.policy, shared))
    }
}
