//! Metrics through the `metrics` facade (feature `metrics`), recorded where
//! a stream or connection starts and ends: nothing per frame. Without the
//! feature every function here does nothing.

#[cfg(feature = "metrics")]
use crate::end::EndReason;
use crate::events::EndEvent;

/// What a stream's end tells of its route, for the `route` metric label.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) struct RouteOf {
    /// The name of the route it matched, if the route has one.
    pub(crate) name: Option<&'static str>,
    /// A gRPC stream the service answered with a response head that did not
    /// say `UNIMPLEMENTED`.
    pub(crate) served: bool,
}

/// Gauge: streams started and not yet ended.
#[cfg(feature = "metrics")]
pub(crate) const STREAMS_ACTIVE: &str = "stream_guard_streams_active";
/// Counter: streams ended; labels `reason`, `direction`, `route`, `grpc_code`.
#[cfg(feature = "metrics")]
pub(crate) const STREAMS_ENDED: &str = "stream_guard_streams_ended_total";
/// Counter: streams a cap refused; label `cap`.
#[cfg(feature = "metrics")]
pub(crate) const STREAMS_REJECTED: &str = "stream_guard_streams_rejected_total";
/// Histogram: stream durations in seconds; labels `reason`, `route`.
#[cfg(feature = "metrics")]
pub(crate) const STREAM_DURATION: &str = "stream_guard_stream_duration_seconds";
/// Gauge: connections wrapped and not yet closed.
#[cfg(feature = "metrics")]
pub(crate) const CONNECTIONS_ACTIVE: &str = "stream_guard_connections_active";
/// Counter: connections closed; label `reason`.
#[cfg(feature = "metrics")]
pub(crate) const CONNECTIONS_CLOSED: &str = "stream_guard_connections_closed_total";

/// The `route` label of a stream no named route matched and whose path is
/// not known to be served.
#[cfg(feature = "metrics")]
const OTHER: &str = "other";

pub(crate) fn stream_started() {
    #[cfg(feature = "metrics")]
    ::metrics::gauge!(STREAMS_ACTIVE).increment(1.0);
}

pub(crate) fn stream_ended(event: &EndEvent, route: RouteOf) {
    #[cfg(feature = "metrics")]
    {
        let reason = event.reason();
        let route = route_label(event, route);
        let direction = reason.direction().map_or("none", |d| d.as_str());
        let grpc_code = event.grpc_status().map_or("none", code_label);
        ::metrics::gauge!(STREAMS_ACTIVE).decrement(1.0);
        ::metrics::counter!(
            STREAMS_ENDED,
            "reason" => reason.as_str(),
            "direction" => direction,
            "route" => route.clone(),
            "grpc_code" => grpc_code,
        )
        .increment(1);
        if let EndReason::Rejected(cap) = reason {
            ::metrics::counter!(STREAMS_REJECTED, "cap" => cap.as_str()).increment(1);
        }
        ::metrics::histogram!(
            STREAM_DURATION,
            "reason" => reason.as_str(),
            "route" => route,
        )
        .record(event.duration().as_secs_f64());
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (event, route);
}

pub(crate) fn connection_opened() {
    #[cfg(feature = "metrics")]
    ::metrics::gauge!(CONNECTIONS_ACTIVE).increment(1.0);
}

/// A connection closed; `reason` is its `ConnectionEnd::as_str`.
pub(crate) fn connection_closed(reason: &'static str) {
    #[cfg(feature = "metrics")]
    {
        ::metrics::gauge!(CONNECTIONS_ACTIVE).decrement(1.0);
        ::metrics::counter!(CONNECTIONS_CLOSED, "reason" => reason).increment(1);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = reason;
}

/// The `route` label: the matched route's name; else the path of a gRPC
/// stream the service answered without `UNIMPLEMENTED` (so a method it
/// serves: tonic answers made-up methods with `UNIMPLEMENTED`) and that did
/// not end with it either; else [`OTHER`]. A peer cannot make up a value.
#[cfg(feature = "metrics")]
fn route_label(event: &EndEvent, route: RouteOf) -> ::metrics::SharedString {
    if let Some(name) = route.name {
        return name.into();
    }
    if route.served
        && event.grpc_status() != Some(crate::grpc::UNIMPLEMENTED)
        && is_grpc_method(event.path())
    {
        let path = event.path();
        return ::metrics::SharedString::from_shared(std::sync::Arc::from(path));
    }
    OTHER.into()
}

/// Whether `path` looks like `/package.Service/Method` (the package is
/// optional): two non-empty segments of identifier characters and dots.
#[cfg(feature = "metrics")]
fn is_grpc_method(path: &str) -> bool {
    let segment = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
    };
    path.strip_prefix('/')
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(service, method)| segment(service) && segment(method))
}

/// gRPC status codes as label values, without formatting one per stream.
#[cfg(feature = "metrics")]
fn code_label(code: u32) -> &'static str {
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    CODES.get(code as usize).copied().unwrap_or("unknown")
}

#[cfg(all(test, feature = "metrics"))]
mod tests {
    use super::*;

    #[test]
    fn only_method_shaped_paths_pass() {
        assert!(is_grpc_method("/pkg.Service/Method"));
        assert!(is_grpc_method("/Service/Method"));
        assert!(!is_grpc_method("/pkg.Service/Method/extra"));
        assert!(!is_grpc_method("/pkg.Service/"));
        assert!(!is_grpc_method("//Method"));
        assert!(!is_grpc_method("/pkg.Service/Me thod"));
        assert!(!is_grpc_method("/pkg.Service/Method?x=1"));
        assert!(!is_grpc_method("pkg.Service/Method"));
    }

    #[test]
    fn codes_are_their_numbers() {
        assert_eq!(code_label(0), "0");
        assert_eq!(code_label(16), "16");
        assert_eq!(code_label(17), "unknown");
    }
}
