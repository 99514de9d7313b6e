//! The stream guard builder's metrics settings (feature `metrics`): whether
//! a layer records metrics, and how many gRPC paths its `route` label may
//! take. What is recorded is in `meter.rs`; the rest of the builder is in
//! `builder.rs`.

use super::builder::StreamGuardBuilder;

impl StreamGuardBuilder {
    /// Records metrics through the [`metrics`](https://docs.rs/metrics)
    /// facade, for whatever exporter the application installs (Prometheus,
    /// OpenTelemetry, ...): when a stream starts and when it ends, never per
    /// frame. Off by default; with no recorder installed the facade drops
    /// them.
    ///
    /// | Name | Kind | Labels |
    /// |------|------|--------|
    /// | `stream_guard_streams_active` | gauge | |
    /// | `stream_guard_streams_ended_total` | counter | `reason`, `direction`, `route`, `grpc_code` |
    /// | `stream_guard_streams_rejected_total` | counter | `cap` |
    /// | `stream_guard_stream_duration_seconds` | histogram | `reason`, `route` |
    ///
    /// - `reason`: [`EndReason::as_str`](crate::EndReason::as_str), e.g.
    ///   `completed`, `idle_timeout`, `rejected`.
    /// - `direction`: [`IdleDirection::as_str`](crate::IdleDirection::as_str)
    ///   for idle timeouts, `none` otherwise.
    /// - `cap`: [`StreamCap::as_str`](crate::StreamCap::as_str) of the cap
    ///   that refused the stream (refused streams are also counted as ended
    ///   with reason `rejected`).
    /// - `grpc_code`: the [end event's](crate::EndEvent::grpc_status) gRPC
    ///   status as a number (`"0"` to `"16"`), or `none`.
    /// - `route`: the [`name`](crate::RoutePolicy::name) of the route the
    ///   stream matched; else its path (`/package.Service/Method`) if that
    ///   is one of the layer's *path labels*; else `other`.
    ///
    /// # The bound on `route` values
    ///
    /// A path becomes a path label when a stream of it ends after the
    /// service accepted the call: it answered with a gRPC response
    /// (`content-type: application/grpc*`) whose head carried no
    /// `grpc-status` (a handler took the call) or `0` (`OK`). Made-up
    /// methods never qualify on a tonic server (answered `UNIMPLEMENTED`, or
    /// an interceptor's `UNAUTHENTICATED`, in the head) or an HTTP router
    /// (a `404` is not a gRPC response), whatever the request claims to be.
    /// The layer keeps the first [`max_path_labels`](Self::max_path_labels)
    /// such paths (default 256) for its life; from then on, new paths are
    /// `other`, even on a server that accepts every path (a catch-all).
    /// Once kept, a path labels every stream of it, however it ends.
    ///
    /// So, whatever peers send, a layer's `route` values are at most: its
    /// route names, plus `max_path_labels`, plus `other`. Name the routes
    /// you want to see for sure (a server with more methods than the bound,
    /// or streams that are seldom accepted, e.g. always refused by a cap).
    ///
    /// The durations are seconds (`f64`) from the stream's start to its end.
    /// The [`ConnectionGuard`](crate::ConnectionGuard) has connection
    /// metrics of its own
    /// ([`ConnectionGuardBuilder::metrics`](crate::ConnectionGuardBuilder::metrics)).
    ///
    /// ```
    /// use tower_stream_guard::{RoutePolicy, StreamGuardLayer};
    ///
    /// # fn main() -> Result<(), tower_stream_guard::ConfigError> {
    /// let guard = StreamGuardLayer::builder()
    ///     .route_prefix("/assets/", RoutePolicy::new().name("assets"))
    ///     .metrics(true)
    ///     .build()?;
    /// # drop(guard);
    /// # Ok(())
    /// # }
    /// ```
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metrics(mut self, enabled: bool) -> Self {
        self.metrics = enabled;
        self
    }

    /// How many gRPC method paths may become `route` label values of this
    /// layer's metrics (default 256, at most 4,096; 0: none, so the label
    /// is a route name or `other`). See [`metrics`](Self::metrics) for
    /// which paths qualify. The table that keeps them is allocated when
    /// the layer is built, only when metrics are on: 48 to 96 bytes per
    /// path of the bound, plus the paths it keeps.
    ///
    /// ```
    /// use tower_stream_guard::StreamGuardLayer;
    ///
    /// # fn main() -> Result<(), tower_stream_guard::ConfigError> {
    /// // A server with many methods: watch the first 1,000 it serves.
    /// let guard = StreamGuardLayer::builder()
    ///     .metrics(true)
    ///     .max_path_labels(1_000)
    ///     .build()?;
    /// # drop(guard);
    /// # Ok(())
    /// # }
    /// ```
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn max_path_labels(mut self, limit: usize) -> Self {
        self.path_labels = limit;
        self
    }
}
