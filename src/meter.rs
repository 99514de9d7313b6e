//! Metrics through the `metrics` facade (feature `metrics`), recorded where
//! a stream or connection starts and ends: nothing per frame. Without the
//! feature every function here does nothing.
//!
//! The `route` label's values are bounded by construction, whatever peers
//! send: a route's name (chosen by the application), one of the at most
//! `limit` gRPC paths a layer's [`PathLabels`] keeps, or `other`.

use std::{
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
};

#[cfg(feature = "metrics")]
use crate::end::EndReason;
use crate::events::EndEvent;

/// How many gRPC paths a layer labels its streams with unless told
/// otherwise (`StreamGuardBuilder::max_path_labels`).
pub(crate) const DEFAULT_PATH_LABELS: usize = 256;

/// The most gRPC paths a layer may label its streams with: its table of
/// paths is allocated up front.
pub(crate) const MAX_PATH_LABELS: usize = 4096;

/// What a stream's end tells of its route, for the `route` metric label.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) struct RouteOf {
    /// The name of the route it matched, if the route has one.
    pub(crate) name: Option<&'static str>,
    /// The service accepted the call: it answered with a gRPC response
    /// (`content-type: application/grpc*`) whose head carried no status or
    /// `OK`. Made-up methods are refused in the head (tonic's
    /// `UNIMPLEMENTED`, an interceptor's `UNAUTHENTICATED`) or answered
    /// without gRPC (an HTTP router's `404`).
    pub(crate) accepted: bool,
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
/// not one [`PathLabels`] keeps.
#[cfg(feature = "metrics")]
const OTHER: &str = "other";

pub(crate) fn stream_started() {
    #[cfg(feature = "metrics")]
    ::metrics::gauge!(STREAMS_ACTIVE).increment(1.0);
}

pub(crate) fn stream_ended(event: &EndEvent, route: RouteOf, paths: &PathLabels) {
    #[cfg(feature = "metrics")]
    {
        let reason = event.reason();
        let route = route_label(event, route, paths);
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
    let _ = (event, route, paths);
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

/// The `route` label: the matched route's name; else the stream's path if
/// it is a gRPC method path that `paths` keeps, or takes in now because the
/// service accepted this call ([`RouteOf::accepted`]) and the table has
/// room; else [`OTHER`]. However peers make up paths and whatever the
/// service answers them, there are at most as many values as route names,
/// plus the table's limit, plus one.
#[cfg(feature = "metrics")]
fn route_label(event: &EndEvent, route: RouteOf, paths: &PathLabels) -> ::metrics::SharedString {
    if let Some(name) = route.name {
        return name.into();
    }
    let path = event.path();
    if is_grpc_method(path)
        && let Some(kept) = paths.label(path, route.accepted)
    {
        return ::metrics::SharedString::from_shared(kept);
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

// === impl PathLabels ===

/// The gRPC method paths one guard layer labels its streams with: the first
/// `limit` paths whose calls its service accepted, kept for the layer's
/// life (a table of fixed capacity: once full, new paths are `other`).
///
/// Open addressing over at least twice `limit` slots, each filled once and
/// never emptied, so a probe always meets an empty slot. Finding a path
/// takes atomic loads only; the first end that adds a path initialises one
/// slot (a `OnceLock`, which blocks only an end adding to that same slot).
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) struct PathLabels {
    slots: Box<[OnceLock<Arc<str>>]>,
    /// Paths kept, plus those an end is adding: never above `limit`.
    taken: AtomicUsize,
    limit: usize,
    /// Keyed per layer, so that no peer can pick paths that share a probe.
    keys: RandomState,
}

#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
impl PathLabels {
    /// A table for at most `limit` paths (capped at [`MAX_PATH_LABELS`]).
    pub(crate) fn new(limit: usize) -> Self {
        let limit = limit.min(MAX_PATH_LABELS);
        let len = if limit == 0 {
            0
        } else {
            (limit * 2).next_power_of_two()
        };
        PathLabels {
            slots: (0..len).map(|_| OnceLock::new()).collect(),
            taken: AtomicUsize::new(0),
            limit,
            keys: RandomState::new(),
        }
    }

    /// `path`'s label if the table keeps it; else, when `accepted` and the
    /// table has room, keeps it and returns it; else `None`.
    pub(crate) fn label(&self, path: &str, accepted: bool) -> Option<Arc<str>> {
        let mask = self.slots.len().checked_sub(1)?;
        let start = self.keys.hash_one(path) as usize;
        let probe = (0..self.slots.len()).map(|i| &self.slots[start.wrapping_add(i) & mask]);
        for slot in probe.clone() {
            match slot.get() {
                Some(kept) if **kept == *path => return Some(Arc::clone(kept)),
                Some(_) => {}
                None => break,
            }
        }
        if !accepted
            || self
                .taken
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < self.limit).then_some(n + 1)
                })
                .is_err()
        {
            return None;
        }
        // A place is ours: the first slot of the probe that is empty or
        // holds `path` (another end may be adding it too) ends the search.
        let ours: Arc<str> = Arc::from(path);
        for slot in probe {
            let kept = slot.get_or_init(|| Arc::clone(&ours));
            if **kept == *path {
                if !Arc::ptr_eq(kept, &ours) {
                    self.taken.fetch_sub(1, Ordering::Relaxed);
                }
                return Some(Arc::clone(kept));
            }
        }
        // Not reached: at most `limit` of the slots are ever filled.
        self.taken.fetch_sub(1, Ordering::Relaxed);
        None
    }
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
    fn the_table_keeps_the_first_accepted_paths_up_to_its_limit() {
        let paths = PathLabels::new(3);
        assert_eq!(paths.label("/a.A/Refused", false), None);
        let a = paths.label("/a.A/One", true).unwrap();
        assert_eq!(&*a, "/a.A/One");
        // Kept: found again, whether or not this call was accepted, and
        // the same allocation (no new label value, nothing allocated).
        assert!(Arc::ptr_eq(&paths.label("/a.A/One", false).unwrap(), &a));
        assert!(Arc::ptr_eq(&paths.label("/a.A/One", true).unwrap(), &a));
        assert!(paths.label("/a.A/Two", true).is_some());
        assert!(paths.label("/a.A/Three", true).is_some());
        // Full: new paths are refused, kept ones still found.
        assert_eq!(paths.label("/a.A/Four", true), None);
        assert_eq!(paths.label("/a.A/Refused", false), None);
        assert!(paths.label("/a.A/Two", false).is_some());
        assert_eq!(paths.taken.load(Ordering::Relaxed), 3);

        let none = PathLabels::new(0);
        assert_eq!(none.label("/a.A/One", true), None);
        assert_eq!(PathLabels::new(usize::MAX).limit, MAX_PATH_LABELS);
    }

    #[test]
    fn racing_ends_keep_each_path_once_and_never_more_than_the_limit() {
        let paths = Arc::new(PathLabels::new(64));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let paths = Arc::clone(&paths);
                std::thread::spawn(move || {
                    // Every thread adds the same 100 paths, in its own order.
                    (0..100)
                        .map(|i| (i * (t * 2 + 1) + t) % 100)
                        .filter_map(|n| paths.label(&format!("/p.P/M{n}"), true))
                        .map(|kept| kept.to_string())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut labels: Vec<String> = threads
            .into_iter()
            .flat_map(|thread| thread.join().unwrap())
            .collect();
        labels.sort();
        labels.dedup();
        let kept = paths
            .slots
            .iter()
            .filter(|slot| slot.get().is_some())
            .count();
        assert_eq!(kept, 64);
        assert_eq!(labels.len(), 64);
        assert_eq!(paths.taken.load(Ordering::Relaxed), 64);
    }

    #[test]
    fn codes_are_their_numbers() {
        assert_eq!(code_label(0), "0");
        assert_eq!(code_label(16), "16");
        assert_eq!(code_label(17), "unknown");
    }
}
