//! The error a guarded body yields when a guard ends its stream
//! ([`GuardError`]), the error a builder reports for a configuration that
//! cannot work ([`ConfigError`]), and the checks behind it.

use std::{error::Error, fmt, time::Duration};

use http::StatusCode;

use crate::end::EndReason;

/// The longest duration any guard setting accepts: 365 days.
///
/// Longer values are almost always a unit mistake (milliseconds passed as
/// seconds); use no limit at all instead.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// The largest end-event (and connection-event) channel capacity accepted:
/// 65,536 events.
///
/// The channel allocates its slots up front; a lagging receiver skips the
/// events it missed rather than holding up streams, so more room buys
/// little.
pub(crate) const MAX_EVENT_CAPACITY: usize = 1 << 16;

/// The default timer resolution: deadlines are checked every 10 ms.
pub(crate) const DEFAULT_TIMER_RESOLUTION: Duration = Duration::from_millis(10);

/// The finest timer resolution accepted: 1 ms.
pub(crate) const MIN_TIMER_RESOLUTION: Duration = Duration::from_millis(1);

/// The coarsest timer resolution accepted: 1 s.
pub(crate) const MAX_TIMER_RESOLUTION: Duration = Duration::from_secs(1);

/// A boxed error, as bodies of this crate return.
pub type BoxError = Box<dyn Error + Send + Sync>;

/// A guard ended the stream.
///
/// Yielded by a guarded request body (the handler sees it from its next read)
/// and by a guarded plain-HTTP response body (hyper then resets the stream).
/// Find it with `downcast_ref::<GuardError>()` on a body error. With the
/// `tonic` feature its [`source`](Error::source) is a `tonic::Status` with
/// the reason's code ([`EndReason::grpc_code`]: `DEADLINE_EXCEEDED` for a
/// limit), so tonic's `Streaming::message()` returns exactly that status to
/// the handler.
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
///     BoxError, EndReason, GuardError, IdleDirection, StreamGuardLayer, stream::RequestBody,
/// };
///
/// # fn main() -> Result<(), BoxError> {
/// // Paused time: the second below passes at once.
/// let runtime = tokio::runtime::Builder::new_current_thread()
///     .enable_all()
///     .start_paused(true)
///     .build()?;
/// runtime.block_on(async {
///     let guard = StreamGuardLayer::builder()
///         .response_idle_timeout(Duration::from_secs(1))
///         .build()?;
///     let service = guard.layer(tower::service_fn(|_: Request<RequestBody<String>>| async {
///         // A producer that went quiet.
///         let frames = futures_util::stream::pending::<Result<Frame<Bytes>, Infallible>>();
///         Ok::<_, Infallible>(Response::new(StreamBody::new(frames)))
///     }));
///     let response = service.oneshot(Request::new(String::new())).await?;
///
///     let err = response.into_body().frame().await.unwrap().unwrap_err();
///     let err = err.downcast_ref::<GuardError>().unwrap();
///     assert_eq!(err.reason(), EndReason::IdleTimeout(IdleDirection::Response));
///     assert_eq!(err.limit(), Duration::from_secs(1));
///     assert_eq!(err.grpc_code(), 4);
///     assert_eq!(
///         err.to_string(),
///         "stream idle: no response frame for 1s (response_idle_timeout)"
///     );
///     Ok::<_, BoxError>(())
/// })
/// # }
/// ```
#[derive(Debug)]
pub struct GuardError {
    reason: EndReason,
    limit: Duration,
    message: String,
    code: u32,
    /// The status tonic reads from the chain; its source is `reset`.
    #[cfg(feature = "tonic")]
    status: tonic::Status,
    /// `RST_STREAM(CANCEL)`: hyper resets a stream whose body failed with
    /// the h2 reason it finds in the error's source chain, else with
    /// `INTERNAL_ERROR`, which a gRPC peer reads as `Internal "h2 protocol
    /// error"`. A guard's end is the HTTP/2 form of a cancel or a deadline
    /// (gRPC maps both to `CANCEL`).
    #[cfg(all(feature = "hyper", not(feature = "tonic")))]
    reset: h2::Error,
}

impl GuardError {
    pub(crate) fn new(reason: EndReason, limit: Duration, message: String, code: u32) -> Self {
        GuardError {
            reason,
            limit,
            #[cfg(feature = "tonic")]
            status: {
                let mut status =
                    tonic::Status::new(tonic::Code::from_i32(code as i32), message.clone());
                status.set_source(std::sync::Arc::new(h2::Error::from(h2::Reason::CANCEL)));
                status
            },
            #[cfg(all(feature = "hyper", not(feature = "tonic")))]
            reset: h2::Error::from(h2::Reason::CANCEL),
            message,
            code,
        }
    }

    /// The gRPC status code the stream ends with: `4` (`DEADLINE_EXCEEDED`)
    /// for a limit, `8` for a cap, `14` for a drain, `1` (`CANCELLED`) for
    /// [`StreamHandle::cancel`](crate::StreamHandle::cancel).
    pub fn grpc_code(&self) -> u32 {
        self.code
    }

    /// Which guard ended the stream ([`EndReason::Cancelled`] when its
    /// handle did).
    pub fn reason(&self) -> EndReason {
        self.reason
    }

    /// The configured limit that was reached: the idle timeout or lifetime,
    /// a drain's grace period, zero for a rejection or a cancel.
    pub fn limit(&self) -> Duration {
        self.limit
    }
}

impl fmt::Display for GuardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl Error for GuardError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        #[cfg(feature = "tonic")]
        return Some(&self.status);
        #[cfg(all(feature = "hyper", not(feature = "tonic")))]
        return Some(&self.reset);
        #[cfg(not(any(feature = "tonic", feature = "hyper")))]
        None
    }
}

#[cfg(feature = "tonic")]
impl From<GuardError> for tonic::Status {
    fn from(err: GuardError) -> Self {
        err.status
    }
}

/// Checks a timer resolution given to `setting`.
pub(crate) fn check_resolution(setting: &'static str, value: Duration) -> Result<(), ConfigError> {
    if (MIN_TIMER_RESOLUTION..=MAX_TIMER_RESOLUTION).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::ResolutionOutOfRange { setting, value })
    }
}

/// Checks a duration given to `setting`: not zero, at most [`MAX_DURATION`],
/// and not below `resolution` when the setting is enforced by a timer of
/// that resolution.
pub(crate) fn check_duration(
    setting: &'static str,
    value: Duration,
    resolution: Option<Duration>,
) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(ConfigError::Zero { setting });
    }
    if value > MAX_DURATION {
        return Err(ConfigError::TooLong { setting, value });
    }
    match resolution {
        Some(resolution) if value < resolution => Err(ConfigError::BelowResolution {
            setting,
            value,
            resolution,
        }),
        _ => Ok(()),
    }
}

/// Checks an event channel capacity.
pub(crate) fn validate_event_capacity(capacity: usize) -> Result<(), ConfigError> {
    match capacity {
        0 => Err(ConfigError::ZeroEventCapacity),
        value if value > MAX_EVENT_CAPACITY => Err(ConfigError::EventCapacityTooLarge { value }),
        _ => Ok(()),
    }
}

/// Checks the bound on the gRPC paths that become `route` label values.
pub(crate) fn validate_path_labels(limit: usize) -> Result<(), ConfigError> {
    if limit > crate::meter::MAX_PATH_LABELS {
        return Err(ConfigError::PathLabelsTooMany { value: limit });
    }
    Ok(())
}

/// A guard configuration that cannot work, reported when the layer is built.
///
/// ```
/// use std::time::Duration;
/// use tower_stream_guard::{ConfigError, RoutePolicy, StreamGuardLayer};
///
/// let err = StreamGuardLayer::builder()
///     .idle_timeout(Duration::ZERO)
///     .build()
///     .unwrap_err();
/// assert_eq!(err, ConfigError::Zero { setting: "idle_timeout" });
///
/// let err = StreamGuardLayer::builder()
///     .route("/chat.Chat/Subscribe", RoutePolicy::new().max_streams(0))
///     .build()
///     .unwrap_err();
/// match err {
///     ConfigError::Route { route, error } => {
///         assert_eq!(route, "/chat.Chat/Subscribe");
///         assert_eq!(*error, ConfigError::ZeroCap { setting: "max_streams" });
///     }
///     other => panic!("unexpected: {other}"),
/// }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A duration setting is zero: every stream would end at once; or
    /// [`min_response_rate`](crate::StreamGuardBuilder::min_response_rate)
    /// has zero bytes (nothing could be too slow) or a zero window.
    Zero {
        /// The builder method that was given zero.
        setting: &'static str,
    },
    /// A duration setting is longer than 365 days: almost always a unit
    /// mistake (milliseconds passed as seconds); leave the setting unset for
    /// no limit.
    TooLong {
        /// The builder method that was given the value.
        setting: &'static str,
        /// The value given.
        value: Duration,
    },
    /// An idle timeout is not shorter than the maximum lifetime. No longer
    /// returned: such an idle timeout can never fire first, which is
    /// harmless, so it is accepted.
    #[deprecated(note = "never returned: an idle timeout not below the lifetime is accepted")]
    IdleNotBelowLifetime {
        /// The idle setting at fault.
        setting: &'static str,
        /// Its value.
        idle: Duration,
        /// The maximum lifetime it must stay below.
        lifetime: Duration,
    },
    /// A timer resolution is outside 1 ms..=1 s.
    ResolutionOutOfRange {
        /// The builder method that was given the value:
        /// `timer_resolution` (stream guard) or `resolution` (connection
        /// guard).
        setting: &'static str,
        /// The value given.
        value: Duration,
    },
    /// A duration setting is shorter than the timer resolution, so it could not
    /// be enforced with any precision.
    BelowResolution {
        /// The builder method that was given the value.
        setting: &'static str,
        /// The value given.
        value: Duration,
        /// The timer resolution in force.
        resolution: Duration,
    },
    /// The end-event channel was given a capacity of zero.
    ZeroEventCapacity,
    /// The end-event channel was given a capacity above
    /// 65,536 (the channel allocates its slots up front).
    EventCapacityTooLarge {
        /// The value given.
        value: usize,
    },
    /// `StreamGuardBuilder::max_path_labels` (feature `metrics`) is above
    /// 4,096 (the table of paths is allocated up front).
    PathLabelsTooMany {
        /// The value given.
        value: usize,
    },
    /// [`peer_ipv6_prefix`](crate::StreamGuardBuilder::peer_ipv6_prefix)
    /// is 0 (every IPv6 peer would be one) or above 128.
    PeerIpv6PrefixOutOfRange {
        /// The value given.
        bits: u8,
    },
    /// A stream cap is zero: no stream could ever be admitted.
    ZeroCap {
        /// The setting that was given zero.
        setting: &'static str,
    },
    /// A route path or prefix does not start with `/`, so it could never
    /// match a request path.
    InvalidRoute {
        /// The route as given.
        route: String,
    },
    /// A connection guard's `max_age_grace` is set without `max_age`.
    GraceWithoutMaxAge,
    /// A connection guard's
    /// [`max_age_jitter_percent`](crate::ConnectionGuardBuilder::max_age_jitter_percent)
    /// is 100 or more: a connection's age could be drawn as zero (or
    /// below), so it would be asked to go away as it opens.
    JitterTooLarge {
        /// The percentage given.
        percent: u8,
    },
    /// A connection guard's
    /// [`dead_peer_timeout`](crate::ConnectionGuardBuilder::dead_peer_timeout)
    /// (or a `GoawayNotice`'s) is outside
    /// 1 s..=1 h: the kernel's keepalive counts whole seconds, and a dead
    /// peer found hours late is not found.
    DeadPeerTimeoutOutOfRange {
        /// The value given.
        value: Duration,
    },
    /// A route's settings, laid over the layer's, cannot work.
    Route {
        /// The route: its path, its prefix followed by `*`, or
        /// `route_when #N` for the N-th route (counting from 0).
        route: String,
        /// What is wrong with it.
        error: Box<ConfigError>,
    },
    /// [`early_status`](crate::StreamGuardBuilder::early_status) was given a
    /// status that is not an error (`4xx` or `5xx`): a stream the guard ended
    /// before the service answered cannot be reported as a success or a
    /// redirect.
    EarlyStatusNotError {
        /// The reason the status was given for.
        reason: EndReason,
        /// The status given.
        status: StatusCode,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Zero {
                setting: "min_response_rate",
            } => f.write_str(
                "`min_response_rate` has a zero window or zero bytes (leave it unset for no minimum)",
            ),
            ConfigError::Zero { setting } => write!(
                f,
                "`{setting}` is zero; every stream would end at once (leave it unset for no limit)"
            ),
            ConfigError::TooLong { setting, value } => write!(
                f,
                "`{setting}` is {value:?}, longer than the {MAX_DURATION:?} maximum (leave it unset for no limit)"
            ),
            #[allow(deprecated)]
            ConfigError::IdleNotBelowLifetime {
                setting,
                idle,
                lifetime,
            } => write!(
                f,
                "`{setting}` ({idle:?}) is not shorter than `max_lifetime` ({lifetime:?}), so it could never fire"
            ),
            ConfigError::ResolutionOutOfRange { setting, value } => write!(
                f,
                "`{setting}` is {value:?}; it must lie between {MIN_TIMER_RESOLUTION:?} and {MAX_TIMER_RESOLUTION:?}"
            ),
            ConfigError::BelowResolution {
                setting,
                value,
                resolution,
            } => write!(
                f,
                "`{setting}` ({value:?}) is shorter than the timer resolution ({resolution:?})"
            ),
            ConfigError::ZeroEventCapacity => f.write_str(
                "`event_capacity` is zero; the end-event channel needs room for at least one event",
            ),
            ConfigError::EventCapacityTooLarge { value } => write!(
                f,
                "`event_capacity` is {value}, more than the {MAX_EVENT_CAPACITY} maximum (the channel allocates its slots up front)"
            ),
            ConfigError::PathLabelsTooMany { value } => write!(
                f,
                "`max_path_labels` is {value}, more than the {} maximum (the table of paths is allocated up front); name the routes to watch beyond it",
                crate::meter::MAX_PATH_LABELS
            ),
            ConfigError::PeerIpv6PrefixOutOfRange { bits } => write!(
                f,
                "`peer_ipv6_prefix` is {bits}; an IPv6 prefix length is 1..=128 (64 for one host's /64)"
            ),
            ConfigError::ZeroCap { setting } => write!(
                f,
                "`{setting}` is zero; no stream could ever be admitted (leave it unset for no cap)"
            ),
            ConfigError::InvalidRoute { route } => write!(
                f,
                "route `{route}` does not start with `/`, so it could never match a request path"
            ),
            ConfigError::Route { route, error } => write!(f, "route `{route}`: {error}"),
            ConfigError::GraceWithoutMaxAge => f.write_str(
                "`max_age_grace` is set without `max_age`; the grace follows the maximum age",
            ),
            ConfigError::JitterTooLarge { percent } => write!(
                f,
                "`max_age_jitter_percent` is {percent}; it must be below 100, or a connection's age could be drawn as zero (gRFC A9 uses 10; 0 turns jitter off)"
            ),
            ConfigError::DeadPeerTimeoutOutOfRange { value } => write!(
                f,
                "`dead_peer_timeout` is {value:?}; it must be between 1s and 1h (the kernel's keepalive counts whole seconds; `None` keeps the kernel's defaults)"
            ),
            ConfigError::EarlyStatusNotError { reason, status } => write!(
                f,
                "`early_status` for {reason} is {status}; the guard's own answer to a stream it ended must be a 4xx or 5xx status"
            ),
        }
    }
}

impl Error for ConfigError {}

#[cfg(all(test, feature = "tonic"))]
mod tests {
    use super::*;
    use crate::end::IdleDirection;

    #[test]
    fn tonic_finds_deadline_exceeded_in_the_source_chain() {
        let reason = EndReason::IdleTimeout(IdleDirection::Request);
        let limit = Duration::from_secs(2);
        let message = crate::end::Ending::IdleRequest.message(limit, 0);
        let err: BoxError = Box::new(GuardError::new(reason, limit, message, 4));
        let status = tonic::Status::from_error(err);
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(
            status.message(),
            "stream idle: no request frame for 2s (request_idle_timeout)"
        );
    }
}
