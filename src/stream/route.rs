//! Per-route policies: different limits for different methods or paths.
//!
//! A guard checks its routes in the order they were added and applies the
//! first that matches; a request no route matches gets the layer's own
//! limits. A route's durations replace the layer's where the route sets
//! them and inherit them where it does not (its heartbeat likewise). A route's caps count only the
//! streams of that route and apply on top of the layer's caps, which count
//! every stream.

use std::{fmt, sync::Arc, time::Duration};

use http::{Extensions, HeaderMap, Method, Uri};

use crate::{
    end::{IdleDirection, StreamCap},
    error::ConfigError,
};

use super::{
    cap::{CapLimits, CapSet},
    heartbeat::Heartbeat,
    policy::Policy,
};

/// The limits for the streams of one route, given to
/// [`StreamGuardBuilder::route`](crate::StreamGuardBuilder::route) and its
/// siblings. Every setting is optional; unset durations are inherited from
/// the layer, and so is the [`heartbeat`](Self::heartbeat).
///
/// ```
/// use std::time::Duration;
/// use tower_stream_guard::{RoutePolicy, StreamGuardLayer};
///
/// # fn main() -> Result<(), tower_stream_guard::ConfigError> {
/// let guard = StreamGuardLayer::builder()
///     .idle_timeout(Duration::from_secs(30))
///     .max_lifetime(Duration::from_secs(600))
///     // Watches may live for a day, at most 4 per client address.
///     .route(
///         "/inventory.Inventory/Watch",
///         RoutePolicy::new()
///             .max_lifetime(Duration::from_secs(24 * 3600))
///             .max_streams_per_peer(4),
///     )
///     // Uploads must keep sending.
///     .route_prefix(
///         "/upload.",
///         RoutePolicy::new().request_idle_timeout(Duration::from_secs(5)),
///     )
///     .build()?;
/// # drop(guard);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutePolicy {
    durations: Policy,
    caps: CapLimits,
    name: Option<&'static str>,
    heartbeat: Option<Heartbeat>,
}

impl RoutePolicy {
    /// A route policy that sets nothing (inherits every duration, adds no cap).
    pub fn new() -> Self {
        RoutePolicy::default()
    }

    /// See [`StreamGuardBuilder::min_response_rate`](crate::StreamGuardBuilder::min_response_rate):
    /// this route's minimum rate, in place of the layer's.
    pub fn min_response_rate(mut self, bytes: u64, window: Duration) -> Self {
        self.durations.min_rate = Some(super::policy::MinRate { bytes, window });
        self
    }

    /// See [`StreamGuardBuilder::idle_timeout`](crate::StreamGuardBuilder::idle_timeout).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.durations.set_idle(IdleDirection::Both, timeout);
        self
    }

    /// See [`StreamGuardBuilder::request_idle_timeout`](crate::StreamGuardBuilder::request_idle_timeout).
    pub fn request_idle_timeout(mut self, timeout: Duration) -> Self {
        self.durations.set_idle(IdleDirection::Request, timeout);
        self
    }

    /// See [`StreamGuardBuilder::response_idle_timeout`](crate::StreamGuardBuilder::response_idle_timeout).
    pub fn response_idle_timeout(mut self, timeout: Duration) -> Self {
        self.durations.set_idle(IdleDirection::Response, timeout);
        self
    }

    /// See [`StreamGuardBuilder::max_lifetime`](crate::StreamGuardBuilder::max_lifetime).
    pub fn max_lifetime(mut self, lifetime: Duration) -> Self {
        self.durations.max_lifetime = Some(lifetime);
        self
    }

    /// Which of this route's response data frames are heartbeats, which do
    /// not reset the idle clock; replaces the layer's
    /// [`heartbeat`](crate::StreamGuardBuilder::heartbeat) for this route.
    /// See [`Heartbeat`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_guard::{Heartbeat, RoutePolicy, StreamGuardLayer};
    ///
    /// # fn main() -> Result<(), tower_stream_guard::ConfigError> {
    /// let guard = StreamGuardLayer::builder()
    ///     .response_idle_timeout(Duration::from_secs(60))
    ///     // axum's `Sse::keep_alive` comments keep no event stream open.
    ///     .route_prefix("/events/", RoutePolicy::new().heartbeat(Heartbeat::sse_comment()))
    ///     .build()?;
    /// # drop(guard);
    /// # Ok(())
    /// # }
    /// ```
    pub fn heartbeat(mut self, heartbeat: Heartbeat) -> Self {
        self.heartbeat = Some(heartbeat);
        self
    }

    /// At most `limit` open streams of this route per connection.
    pub fn max_streams_per_connection(mut self, limit: usize) -> Self {
        self.caps.set(StreamCap::PerConnection, limit);
        self
    }

    /// At most `limit` open streams of this route per peer IP address.
    pub fn max_streams_per_peer(mut self, limit: usize) -> Self {
        self.caps.set(StreamCap::PerPeer, limit);
        self
    }

    /// At most `limit` open streams of this route in total.
    pub fn max_streams(mut self, limit: usize) -> Self {
        self.caps.set(StreamCap::Total, limit);
        self
    }

    /// Names this route in metrics: the `route` label of the streams it
    /// matches (see `StreamGuardBuilder::metrics`, feature `metrics`). A `&'static str`, so that a label value is
    /// always one the server chose, never one a peer sent. Without a name,
    /// a route's streams are labelled as if no route matched; so are those
    /// of named routes past the 127th.
    ///
    /// ```
    /// use tower_stream_guard::{RoutePolicy, StreamGuardLayer};
    ///
    /// # fn main() -> Result<(), tower_stream_guard::ConfigError> {
    /// let guard = StreamGuardLayer::builder()
    ///     .route_prefix("/assets/", RoutePolicy::new().max_streams(64).name("assets"))
    ///     .build()?;
    /// # drop(guard);
    /// # Ok(())
    /// # }
    /// ```
    pub fn name(mut self, name: &'static str) -> Self {
        self.name = Some(name);
        self
    }

    /// This route's durations laid over the layer's.
    fn over(&self, base: Policy) -> Policy {
        let d = self.durations;
        Policy {
            idle_both: d.idle_both.or(base.idle_both),
            idle_request: d.idle_request.or(base.idle_request),
            idle_response: d.idle_response.or(base.idle_response),
            max_lifetime: d.max_lifetime.or(base.max_lifetime),
            min_rate: d.min_rate.or(base.min_rate),
        }
    }
}

/// What a [`route_when`](crate::StreamGuardBuilder::route_when) predicate
/// sees of a request.
///
/// ```
/// use std::time::Duration;
/// use tower_stream_guard::{RoutePolicy, RouteRequest, StreamGuardLayer};
///
/// /// Server-sent events: asked for with `accept: text/event-stream`.
/// fn is_event_stream(request: &RouteRequest<'_>) -> bool {
///     request.method() == http::Method::GET
///         && request
///             .headers()
///             .get(http::header::ACCEPT)
///             .is_some_and(|accept| accept.as_bytes().starts_with(b"text/event-stream"))
/// }
///
/// # fn main() -> Result<(), tower_stream_guard::ConfigError> {
/// let guard = StreamGuardLayer::builder()
///     .idle_timeout(Duration::from_secs(30))
///     .max_lifetime(Duration::from_secs(60))
///     .route_when(
///         is_event_stream,
///         RoutePolicy::new().max_lifetime(Duration::from_secs(3600)),
///     )
///     .build()?;
/// # drop(guard);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct RouteRequest<'a> {
    pub(crate) method: &'a Method,
    pub(crate) uri: &'a Uri,
    pub(crate) headers: &'a HeaderMap,
    pub(crate) extensions: &'a Extensions,
}

impl RouteRequest<'_> {
    /// The request method.
    pub fn method(&self) -> &Method {
        self.method
    }

    /// The request URI.
    pub fn uri(&self) -> &Uri {
        self.uri
    }

    /// The request path; for gRPC `/package.Service/Method`.
    pub fn path(&self) -> &str {
        self.uri.path()
    }

    /// The request headers (gRPC metadata included).
    pub fn headers(&self) -> &HeaderMap {
        self.headers
    }

    /// The request extensions.
    pub fn extensions(&self) -> &Extensions {
        self.extensions
    }
}

pub(crate) type Predicate = Arc<dyn Fn(&RouteRequest<'_>) -> bool + Send + Sync>;

#[derive(Clone)]
pub(crate) enum Matcher {
    Exact(String),
    Prefix(String),
    When(Predicate),
}

impl Matcher {
    fn matches(&self, request: &RouteRequest<'_>) -> bool {
        match self {
            Matcher::Exact(path) => request.path() == path,
            Matcher::Prefix(prefix) => request.path().starts_with(prefix.as_str()),
            Matcher::When(predicate) => predicate(request),
        }
    }

    fn name(&self, index: usize) -> String {
        match self {
            Matcher::Exact(path) => path.clone(),
            Matcher::Prefix(prefix) => format!("{prefix}*"),
            Matcher::When(_) => format!("route_when #{index}"),
        }
    }
}

impl fmt::Debug for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Matcher::Exact(path) => f.debug_tuple("Exact").field(path).finish(),
            Matcher::Prefix(prefix) => f.debug_tuple("Prefix").field(prefix).finish(),
            Matcher::When(_) => f.write_str("When(..)"),
        }
    }
}

/// A route as configured on the builder.
#[derive(Clone, Debug)]
pub(crate) struct RouteSpec {
    pub(crate) matcher: Matcher,
    pub(crate) policy: RoutePolicy,
}

/// A route ready for requests: merged durations and its own caps.
pub(crate) struct Route {
    matcher: Matcher,
    pub(crate) policy: Policy,
    pub(crate) caps: Option<Arc<CapSet>>,
    /// Its heartbeat, or else the layer's.
    pub(crate) heartbeat: Option<Heartbeat>,
    /// Its [`RoutePolicy::name`], for metrics.
    pub(crate) name: Option<&'static str>,
    /// What a stream of this route keeps to find `name` at its end: one
    /// more than `name`'s index in `Admission::route_names`, 0 for none
    /// ([`name_routes`]). Seven bits in a byte of the stream's record rather
    /// than a 16-byte `&str`.
    pub(crate) tag: u8,
}

/// At most this many routes carry their name into metrics: a stream keeps
/// its route's tag in seven bits.
pub(crate) const MAX_NAMED_ROUTES: usize = 127;

/// Tags the named routes (the first [`MAX_NAMED_ROUTES`]) and returns their
/// names, by tag minus one.
pub(crate) fn name_routes(routes: &mut [Route]) -> Vec<&'static str> {
    let mut names = Vec::new();
    for route in routes {
        if let Some(name) = route.name
            && names.len() < MAX_NAMED_ROUTES
        {
            names.push(name);
            route.tag = names.len() as u8;
        }
    }
    names
}

/// Checks a cap set's limits.
pub(crate) fn validate_caps(caps: &CapLimits) -> Result<(), ConfigError> {
    for cap in StreamCap::ALL {
        if caps.get(cap) == Some(0) {
            return Err(ConfigError::ZeroCap {
                setting: cap.setting(),
            });
        }
    }
    Ok(())
}

impl RouteSpec {
    /// Validates this route against the layer's settings and readies it;
    /// `heartbeat` is the layer's.
    pub(crate) fn compile(
        self,
        index: usize,
        base: Policy,
        heartbeat: Option<&Heartbeat>,
        resolution: Duration,
    ) -> Result<Route, ConfigError> {
        let name = self.matcher.name(index);
        let in_route = |error| ConfigError::Route {
            route: name.clone(),
            error: Box::new(error),
        };
        match &self.matcher {
            Matcher::Exact(path) | Matcher::Prefix(path) if !path.starts_with('/') => {
                return Err(ConfigError::InvalidRoute {
                    route: name.clone(),
                });
            }
            _ => {}
        }
        let policy = self.policy.over(base);
        policy.validate(resolution).map_err(in_route)?;
        validate_caps(&self.policy.caps).map_err(in_route)?;
        let caps =
            (!self.policy.caps.is_empty()).then(|| Arc::new(CapSet::new(self.policy.caps, false)));
        Ok(Route {
            matcher: self.matcher,
            policy,
            caps,
            heartbeat: self.policy.heartbeat.or_else(|| heartbeat.cloned()),
            name: self.policy.name,
            tag: 0,
        })
    }
}

/// The first route matching `request`, if any.
pub(crate) fn select<'r>(routes: &'r [Route], request: &RouteRequest<'_>) -> Option<&'r Route> {
    routes.iter().find(|route| route.matcher.matches(request))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(matcher: Matcher, policy: RoutePolicy) -> RouteSpec {
        RouteSpec { matcher, policy }
    }

    fn request_for(path: &'static str, f: impl FnOnce(&RouteRequest<'_>)) {
        let uri = Uri::from_static(path);
        let headers = HeaderMap::new();
        let extensions = Extensions::new();
        f(&RouteRequest {
            method: &Method::POST,
            uri: &uri,
            headers: &headers,
            extensions: &extensions,
        });
    }

    #[test]
    fn first_matching_route_wins_and_unset_durations_are_inherited() {
        let base = Policy {
            idle_both: Some(Duration::from_secs(30)),
            max_lifetime: Some(Duration::from_secs(600)),
            ..Policy::default()
        };
        let resolution = Duration::from_millis(10);
        let routes = vec![
            spec(
                Matcher::Exact("/svc.S/Watch".into()),
                RoutePolicy::new().max_lifetime(Duration::from_secs(86_400)),
            )
            .compile(0, base, None, resolution)
            .unwrap(),
            spec(
                Matcher::Prefix("/svc.S/".into()),
                RoutePolicy::new().idle_timeout(Duration::from_secs(5)),
            )
            .compile(1, base, None, resolution)
            .unwrap(),
        ];
        request_for("/svc.S/Watch", |r| {
            let p = select(&routes, r).unwrap().policy;
            assert_eq!(p.max_lifetime, Some(Duration::from_secs(86_400)));
            assert_eq!(p.idle_both, Some(Duration::from_secs(30)));
        });
        request_for("/svc.S/Get", |r| {
            let p = select(&routes, r).unwrap().policy;
            assert_eq!(p.idle_both, Some(Duration::from_secs(5)));
            assert_eq!(p.max_lifetime, Some(Duration::from_secs(600)));
        });
        request_for("/other.O/Get", |r| assert!(select(&routes, r).is_none()));
    }

    #[test]
    fn a_route_heartbeat_replaces_the_layers_and_is_inherited_otherwise() {
        let layer = Heartbeat::new(|_| true);
        let own = Heartbeat::sse_comment();
        let resolution = Duration::from_millis(10);
        let compile = |policy: RoutePolicy, base: Option<&Heartbeat>| {
            spec(Matcher::Exact("/svc.S/Watch".into()), policy)
                .compile(0, Policy::default(), base, resolution)
                .unwrap()
                .heartbeat
        };
        let with_own = RoutePolicy::new().heartbeat(own.clone());
        assert_eq!(compile(with_own.clone(), Some(&layer)), Some(own.clone()));
        assert_eq!(compile(with_own, None), Some(own));
        assert_eq!(compile(RoutePolicy::new(), Some(&layer)), Some(layer));
        assert_eq!(compile(RoutePolicy::new(), None), None);
    }

    #[test]
    fn a_route_that_breaks_the_rules_names_itself() {
        let base = Policy {
            max_lifetime: Some(Duration::from_secs(60)),
            ..Policy::default()
        };
        let err = spec(
            Matcher::Exact("/svc.S/Upload".into()),
            RoutePolicy::new().request_idle_timeout(Duration::from_millis(5)),
        )
        .compile(0, base, None, Duration::from_millis(10))
        .err()
        .unwrap();
        assert!(
            err.to_string().starts_with("route `/svc.S/Upload`: "),
            "{err}"
        );
        let err = spec(Matcher::Prefix("svc.S/".into()), RoutePolicy::new())
            .compile(0, base, None, Duration::from_millis(10))
            .err()
            .unwrap();
        assert!(matches!(err, ConfigError::InvalidRoute { .. }), "{err}");
        let err = spec(
            Matcher::When(Arc::new(|_: &RouteRequest<'_>| true)),
            RoutePolicy::new().max_streams(0),
        )
        .compile(3, base, None, Duration::from_millis(10))
        .err()
        .unwrap();
        assert_eq!(
            err.to_string(),
            "route `route_when #3`: `max_streams` is zero; no stream could ever be admitted (leave it unset for no cap)"
        );
    }
}
