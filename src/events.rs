//! End events: exactly one per stream, whatever ended it.
//!
//! A guard layer keeps a [`tokio::sync::broadcast`] channel of [`EndEvent`]s;
//! [`StreamGuardLayer::subscribe`](crate::StreamGuardLayer::subscribe) hands out
//! receivers, and [`StreamGuardBuilder::on_end`](crate::StreamGuardBuilder::on_end)
//! registers callbacks. Emitting never waits: with no receiver nothing is
//! cloned; a receiver that falls more than the channel's capacity behind gets
//! [`RecvError::Lagged`](tokio::sync::broadcast::error::RecvError::Lagged)
//! with the number of events it missed, and the streams never notice.
//!
//! Every end is also a `tracing` event under the target `tower_stream_guard`:
//! `INFO` when a limit or a drain ended the stream, `DEBUG` otherwise. A
//! stream a cap refused is `DEBUG` too, so that a cap flood is not a log
//! flood: each guard sums its refusals up in at most one `WARN` line a second
//! ("N streams refused by max_streams_per_connection in the last 1.0s", with
//! `refused`, `per_connection`, `per_peer` and `total` fields). The first
//! refusal is reported at once; the last second of a burst is reported when
//! the next stream of that guard ends (the counters in
//! [`StreamGuardLayer::stats`](crate::StreamGuardLayer::stats) are exact).

use std::{
    fmt,
    net::SocketAddr,
    panic::{AssertUnwindSafe, catch_unwind},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use http::{Method, uri::PathAndQuery};
use tokio::sync::broadcast;

use crate::{end::EndReason, json::JsonLine, peer::ConnectionKey};

/// The default capacity of an event channel (end events, connection
/// events): 1024 events.
pub(crate) const DEFAULT_EVENT_CAPACITY: usize = 1024;

/// A process-wide unique number for a stream: the same in its
/// [`StreamHandle`](crate::StreamHandle), its [`EndEvent`] and its log lines
/// (`stream_id`).
///
/// ```
/// use std::convert::Infallible;
///
/// use http::{Request, Response};
/// use tower::{Layer, ServiceExt};
/// use tower_stream_guard::{BoxError, StreamGuardLayer, StreamHandle, stream::RequestBody};
///
/// # fn main() -> Result<(), BoxError> {
/// # tokio::runtime::Runtime::new()?.block_on(async {
/// let guard = StreamGuardLayer::builder().response_handle(true).build()?;
/// let mut events = guard.subscribe();
/// let service = guard.layer(tower::service_fn(|_: Request<RequestBody<String>>| async {
///     Ok::<_, Infallible>(Response::new(String::new()))
/// }));
/// let response = service.oneshot(Request::new(String::new())).await?;
/// let id = response.extensions().get::<StreamHandle>().unwrap().id();
/// assert_eq!(events.recv().await?.id(), id);
/// assert_eq!(id.to_string(), id.get().to_string());
/// # Ok::<_, BoxError>(())
/// # })
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(u64);

impl StreamId {
    pub(crate) fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        StreamId(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    #[cfg(test)]
    pub(crate) fn for_tests(id: u64) -> Self {
        StreamId(id)
    }

    /// The number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Frames and bytes that moved in one direction of a stream, as an
/// [`EndEvent`] reports them ([`request`](EndEvent::request),
/// [`response`](EndEvent::response)).
///
/// ```
/// use std::convert::Infallible;
///
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body_util::{BodyExt, Full};
/// use tower::{Layer, ServiceExt};
/// use tower_stream_guard::{BoxError, StreamGuardLayer, Traffic, stream::RequestBody};
///
/// # fn main() -> Result<(), BoxError> {
/// # tokio::runtime::Runtime::new()?.block_on(async {
/// let guard = StreamGuardLayer::builder().build()?;
/// let mut events = guard.subscribe();
/// let service = guard.layer(tower::service_fn(|_: Request<RequestBody<Full<Bytes>>>| async {
///     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("hello"))))
/// }));
/// let response = service.oneshot(Request::new(Full::new(Bytes::new()))).await?;
/// response.into_body().collect().await?;
///
/// let event = events.recv().await?;
/// assert_eq!(event.request(), Traffic::default());
/// assert_eq!(event.response(), Traffic { frames: 1, bytes: 5 });
/// # Ok::<_, BoxError>(())
/// # })
/// # }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Data frames that carried data (empty end-of-stream frames are not
    /// counted).
    pub frames: u64,
    /// Bytes of data in those frames.
    pub bytes: u64,
}

/// What one stream did, emitted once when it ends: to every
/// [`subscribe`](crate::StreamGuardLayer::subscribe)r and every
/// [`on_end`](crate::StreamGuardBuilder::on_end) callback.
///
/// ```
/// use std::{
///     convert::Infallible,
///     sync::{Arc, Mutex},
/// };
///
/// use http::{Request, Response};
/// use tower::{Layer, ServiceExt};
/// use tower_stream_guard::{BoxError, StreamGuardLayer, stream::RequestBody};
///
/// # fn main() -> Result<(), BoxError> {
/// # tokio::runtime::Runtime::new()?.block_on(async {
/// let lines = Arc::new(Mutex::new(Vec::new()));
/// let sink = Arc::clone(&lines);
/// let guard = StreamGuardLayer::builder()
///     .on_end(move |event| sink.lock().unwrap().push(event.to_json()))
///     .build()?;
/// let service = guard.layer(tower::service_fn(|_: Request<RequestBody<String>>| async {
///     Ok::<_, Infallible>(Response::new(String::new()))
/// }));
/// let request = Request::post("/echo.Echo/Say").body(String::new())?;
/// drop(service.oneshot(request).await?);
///
/// let lines = lines.lock().unwrap();
/// assert_eq!(lines.len(), 1);
/// assert!(lines[0].contains(r#""route":"/echo.Echo/Say""#), "{}", lines[0]);
/// assert!(lines[0].contains(r#""reason":"completed""#), "{}", lines[0]);
/// # Ok::<_, BoxError>(())
/// # })
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct EndEvent {
    pub(crate) id: StreamId,
    pub(crate) method: Method,
    pub(crate) path: Option<PathAndQuery>,
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) connection: Option<ConnectionKey>,
    pub(crate) started_at: SystemTime,
    pub(crate) duration: Duration,
    pub(crate) reason: EndReason,
    pub(crate) limit: Option<Duration>,
    pub(crate) cap_limit: Option<usize>,
    pub(crate) request: Traffic,
    pub(crate) response: Traffic,
    pub(crate) grpc_status: Option<u32>,
    pub(crate) server_guard_reason: Option<&'static str>,
    pub(crate) blocked_on_reader: Option<Duration>,
}

impl EndEvent {
    /// The stream's id, the same as its [`StreamHandle::id`](crate::StreamHandle::id).
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// The request method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The request path (for gRPC, `/package.Service/Method`), without query.
    pub fn path(&self) -> &str {
        self.path.as_ref().map_or("", PathAndQuery::path)
    }

    /// The peer's address, when the request told it: a
    /// [`PeerAddr`](crate::PeerAddr), tonic's `TcpConnectInfo` or
    /// `TlsConnectInfo<TcpConnectInfo>`, axum's `ConnectInfo`, an
    /// address-based [`ConnectionKey`], or a
    /// [`ConnectionGuard`](crate::ConnectionGuard) over an IO that knows it.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// The connection the stream came on, as the caps saw it (see
    /// [`ConnectionKey`]); `None` when nothing identified it.
    pub fn connection(&self) -> Option<ConnectionKey> {
        self.connection
    }

    /// Wall-clock time at which the request reached the guard.
    pub fn started_at(&self) -> SystemTime {
        self.started_at
    }

    /// How long the stream lived.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// Why the stream ended.
    pub fn reason(&self) -> EndReason {
        self.reason
    }

    /// The configured limit that fired, when an idle timeout or the lifetime
    /// ended the stream (for a lifetime cut short by the client's
    /// `grpc-timeout`, that timeout), or the drain's grace period when a
    /// drain ended it.
    pub fn limit(&self) -> Option<Duration> {
        self.limit
    }

    /// The cap's limit, when a cap refused the stream
    /// ([`EndReason::Rejected`]).
    pub fn cap_limit(&self) -> Option<usize> {
        self.cap_limit
    }

    /// Data the peer sent (the request body).
    pub fn request(&self) -> Traffic {
        self.request
    }

    /// Data the service sent (the response body).
    pub fn response(&self) -> Traffic {
        self.response
    }

    /// The gRPC status the stream ended with: from the response trailers (or
    /// headers, for a trailers-only response), or the status a guard ends it
    /// with. For a stalled reader the guard's trailers go out only if the peer
    /// reads again; the status is reported all the same.
    pub fn grpc_status(&self) -> Option<u32> {
        self.grpc_status
    }

    /// The reason a guard on the other end of the call named in its
    /// `stream-guard-reason` header or trailer ([`EndReason::as_str`]:
    /// `idle_timeout`, `lifetime_exceeded`, `rejected`, `drained`,
    /// `cancelled`), when this guard wraps a client and the server's guard
    /// ended the call; `None` when the response carried none, or a value no
    /// guard writes. It tells the server guard's `DEADLINE_EXCEEDED` from
    /// the server's own.
    ///
    /// [`reason`](Self::reason) is this guard's own view: usually
    /// [`Completed`](EndReason::Completed), since the server ended the call
    /// with a status.
    pub fn server_guard_reason(&self) -> Option<&'static str> {
        self.server_guard_reason
    }

    /// How long the response waited on the peer: the time during which the
    /// response body had handed hyper a frame and hyper did not come back
    /// for the next one, because the peer's flow-control window was shut
    /// (the client did not read) or the connection could not write. A
    /// producer with nothing to send is not counted; a stream that a guard
    /// ended while the peer was not reading counts up to its end.
    ///
    /// Measured on the guard's coarse clock, without a clock read per frame:
    /// within one [`timer_resolution`](crate::StreamGuardBuilder::timer_resolution)
    /// of the truth per wait (a wait shorter than a tick may count as
    /// nothing or as a tick). That clock runs while the stream has a time
    /// limit (an idle timeout, a lifetime, the client's `grpc-timeout`,
    /// [`min_response_rate`](crate::StreamGuardBuilder::min_response_rate));
    /// for a stream with none this is `None`. The wait after a
    /// [`Heartbeat`](crate::Heartbeat) frame is not counted.
    ///
    /// ```
    /// use std::{convert::Infallible, time::Duration};
    ///
    /// use bytes::Bytes;
    /// use http::{Request, Response};
    /// use http_body_util::{BodyExt, Full};
    /// use tower::{Layer, ServiceExt};
    /// use tower_stream_guard::{BoxError, StreamGuardLayer, stream::RequestBody};
    ///
    /// # fn main() -> Result<(), BoxError> {
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let guard = StreamGuardLayer::builder()
    ///     .max_lifetime(Duration::from_secs(60))
    ///     .build()?;
    /// let mut events = guard.subscribe();
    /// let service = guard.layer(tower::service_fn(|_: Request<RequestBody<String>>| async {
    ///     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("hello"))))
    /// }));
    /// let response = service.oneshot(Request::new(String::new())).await?;
    /// response.into_body().collect().await?;
    /// let blocked = events.recv().await?.blocked_on_reader();
    /// assert!(blocked.is_some_and(|blocked| blocked < Duration::from_secs(1)));
    /// # Ok::<_, BoxError>(())
    /// # })
    /// # }
    /// ```
    pub fn blocked_on_reader(&self) -> Option<Duration> {
        self.blocked_on_reader
    }

    /// The event as one line of JSON (no trailing newline), with the keys
    /// `id`, `method`, `route`, `peer`, `connection`, `reason`, `direction`
    /// (idle timeouts only), `limit_ms` (idle timeouts, lifetimes and drains
    /// only),
    /// `cap` and `cap_limit` (rejections only), `started_at_ms` (Unix time),
    /// `duration_ms`, `request_frames`, `request_bytes`, `response_frames`,
    /// `response_bytes`, `grpc_status` (`null` when none),
    /// `server_guard_reason` (only when the response named one) and
    /// `blocked_ms` ([`blocked_on_reader`](Self::blocked_on_reader) in whole
    /// milliseconds, only when measured).
    pub fn to_json(&self) -> String {
        let started = self
            .started_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let mut line = JsonLine::new();
        line.num("id", self.id.get())
            .str("method", self.method.as_str())
            .str("route", self.path())
            .opt_str("peer", self.peer)
            .opt_str("connection", self.connection)
            .str("reason", self.reason.as_str());
        if let Some(direction) = self.reason.direction() {
            line.str("direction", direction.as_str());
        }
        if let Some(limit) = self.limit {
            line.num("limit_ms", limit.as_millis());
        }
        if let Some(cap) = self.reason.cap() {
            line.str("cap", cap.as_str());
        }
        if let Some(cap_limit) = self.cap_limit {
            line.num("cap_limit", cap_limit);
        }
        line.num("started_at_ms", started.as_millis())
            .num("duration_ms", self.duration.as_millis())
            .num("request_frames", self.request.frames)
            .num("request_bytes", self.request.bytes)
            .num("response_frames", self.response.frames)
            .num("response_bytes", self.response.bytes)
            .opt_num("grpc_status", self.grpc_status);
        if let Some(reason) = self.server_guard_reason {
            line.str("server_guard_reason", reason);
        }
        if let Some(blocked) = self.blocked_on_reader {
            line.num("blocked_ms", blocked.as_millis());
        }
        line.finish()
    }
}

/// A callback run for every end event.
pub(crate) type EndCallback = Arc<dyn Fn(&EndEvent) + Send + Sync>;

/// Where one guard layer sends its end events.
pub(crate) struct EventHub {
    sender: broadcast::Sender<EndEvent>,
    callbacks: Vec<EndCallback>,
    /// Someone subscribed once: until then, an end does not take the
    /// channel's lock to count receivers (most servers never subscribe).
    subscribed: AtomicBool,
}

impl EventHub {
    pub(crate) fn new(capacity: usize, callbacks: Vec<EndCallback>) -> Self {
        EventHub {
            sender: broadcast::channel(capacity).0,
            callbacks,
            subscribed: AtomicBool::new(false),
        }
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<EndEvent> {
        // Set before the receiver exists: an end that starts after
        // `subscribe` returns sees it (the receiver is handed over through
        // whatever orders the subscriber's later actions).
        self.subscribed.store(true, Ordering::Release);
        self.sender.subscribe()
    }

    /// Hands `event` to every callback and receiver without waiting. A
    /// callback that panics is reported and otherwise ignored: the stream that
    /// ended may be inside `Drop`.
    pub(crate) fn emit(&self, event: &EndEvent) {
        for callback in &self.callbacks {
            if catch_unwind(AssertUnwindSafe(|| callback(event))).is_err() {
                tracing::error!(
                    target: "tower_stream_guard",
                    stream_id = event.id.get(),
                    "an end-event callback panicked; the panic was caught"
                );
            }
        }
        if self.subscribed.load(Ordering::Acquire) && self.sender.receiver_count() > 0 {
            // Fails only when every receiver went away meanwhile.
            let _ = self.sender.send(event.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::end::IdleDirection;

    fn event() -> EndEvent {
        EndEvent {
            id: StreamId::for_tests(7),
            method: Method::POST,
            path: Some(PathAndQuery::from_static("/echo.Echo/Bidi?x=1")),
            peer: Some("127.0.0.1:4000".parse().unwrap()),
            connection: Some(ConnectionKey::from_id(3)),
            started_at: SystemTime::UNIX_EPOCH + Duration::from_millis(1500),
            duration: Duration::from_millis(2500),
            reason: EndReason::IdleTimeout(IdleDirection::Request),
            limit: Some(Duration::from_secs(2)),
            cap_limit: None,
            request: Traffic {
                frames: 3,
                bytes: 30,
            },
            response: Traffic::default(),
            grpc_status: Some(4),
            server_guard_reason: None,
            blocked_on_reader: None,
        }
    }

    #[test]
    fn json_line_has_every_field() {
        assert_eq!(
            event().to_json(),
            r##"{"id":7,"method":"POST","route":"/echo.Echo/Bidi","peer":"127.0.0.1:4000","connection":"#3","reason":"idle_timeout","direction":"request","limit_ms":2000,"started_at_ms":1500,"duration_ms":2500,"request_frames":3,"request_bytes":30,"response_frames":0,"response_bytes":0,"grpc_status":4}"##
        );
    }

    #[test]
    fn json_line_names_the_servers_guard_reason_when_there_is_one() {
        let mut event = event();
        event.server_guard_reason = Some("idle_timeout");
        assert!(
            event
                .to_json()
                .ends_with(r#""grpc_status":4,"server_guard_reason":"idle_timeout"}"#),
            "{}",
            event.to_json()
        );
    }

    #[test]
    fn json_line_ends_with_the_time_blocked_on_the_reader_when_measured() {
        let mut event = event();
        event.blocked_on_reader = Some(Duration::from_millis(3010));
        let line = event.to_json();
        assert!(
            line.ends_with(r#""grpc_status":4,"blocked_ms":3010}"#),
            "{line}"
        );
    }

    #[test]
    fn panicking_callback_does_not_stop_the_others() {
        let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&seen);
        let hub = EventHub::new(
            4,
            vec![
                Arc::new(|_: &EndEvent| panic!("subscriber bug")),
                Arc::new(move |_: &EndEvent| {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }),
            ],
        );
        let mut rx = hub.subscribe();
        hub.emit(&event());
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(rx.try_recv().unwrap().id(), StreamId::for_tests(7));
    }
}
