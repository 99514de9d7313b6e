//! What a drain reports when it is done.

use std::time::Duration;

use crate::json::JsonLine;

/// What a drain did, from [`Drain::start`](crate::Drain::start); also logged (`tracing`, level
/// `info`) when the drain finishes.
///
/// ```
/// use std::time::Duration;
/// use tower_stream_guard::Drain;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let drain = Drain::new();
/// // Nothing open: the report comes at once.
/// let report = drain.start(Duration::from_secs(5)).await;
/// assert_eq!(report.open_at_start(), 0);
/// assert_eq!(report.cut(), 0);
/// assert!(report.to_json().starts_with(r#"{"event":"drain","open_at_start":0,"#));
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainReport {
    pub(super) open_at_start: u64,
    pub(super) cut: u64,
    pub(super) refused: u64,
    pub(super) connections_closed: u64,
    pub(super) elapsed: Duration,
}

impl DrainReport {
    /// Streams open when the drain began.
    ///
    /// Counted per guard layer: a request that passes through two nested
    /// [`StreamGuardLayer`](crate::StreamGuardLayer)s sharing this drain is
    /// two streams here, and in [`cut`](Self::cut) and
    /// [`refused`](Self::refused).
    pub fn open_at_start(&self) -> u64 {
        self.open_at_start
    }

    /// Of those, the streams that ended by themselves within the grace
    /// period (handlers that finished early on
    /// [`draining`](crate::StreamHandle::draining) count here).
    pub fn finished_within_grace(&self) -> u64 {
        self.open_at_start.saturating_sub(self.cut)
    }

    /// Streams still open when the grace period ended, ended by the drain.
    pub fn cut(&self) -> u64 {
        self.cut
    }

    /// Streams that arrived during the drain and were refused.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Guarded connections still open after the grace period (plus
    /// [`Drain::with_close_delay`](crate::Drain::with_close_delay)), closed by the drain.
    pub fn connections_closed(&self) -> u64 {
        self.connections_closed
    }

    /// From the start of the drain until every stream had ended and the
    /// connections left were closed.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// The report as one line of JSON: `event` (`"drain"`),
    /// `open_at_start`, `finished_within_grace`, `cut`, `refused`,
    /// `connections_closed` and `elapsed_ms`, e.g.
    /// `{"event":"drain","open_at_start":12,"finished_within_grace":11,"cut":1,"refused":3,"connections_closed":1,"elapsed_ms":5502}`.
    pub fn to_json(&self) -> String {
        JsonLine::new()
            .str("event", "drain")
            .num("open_at_start", self.open_at_start)
            .num("finished_within_grace", self.finished_within_grace())
            .num("cut", self.cut)
            .num("refused", self.refused)
            .num("connections_closed", self.connections_closed)
            .num("elapsed_ms", self.elapsed.as_millis())
            .finish()
    }
}
