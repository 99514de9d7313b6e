//! What one guard layer shares with all of its streams: its timer, its
//! reporting, how it admits requests, and the drain it answers to.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use http::StatusCode;
use tokio::time::Instant;

use super::{cap::CapSet, heartbeat::Heartbeat, report::Report, route::Route, timer::Sweeper};
use crate::{
    connection::NoticeShared,
    drain::{DrainShared, Drained},
    end::{EndReason, Ending},
    peer::KeyFn,
    sync::NEVER,
};

/// One guard layer's state, behind an `Arc` every stream of it holds.
pub(crate) struct Shared {
    pub(crate) timer: Arc<Sweeper>,
    pub(crate) report: Report,
    pub(crate) admission: Admission,
    drain: Option<DrainLink>,
    /// The client connections whose GOAWAY this layer's streams hear of.
    notice: Option<Arc<NoticeShared>>,
    /// The layer's stream records alive, for the test-only view.
    #[cfg(feature = "test-view")]
    pub(crate) records: crate::view::Alive,
}

/// How a guard layer admits a request: its routes, caps and where it finds
/// connections. Read once per request, before the service is called.
pub(crate) struct Admission {
    pub(crate) routes: Vec<Route>,
    /// The names of the named routes, by `Route::tag` minus one.
    pub(crate) route_names: Vec<&'static str>,
    /// The layer's own caps (and connection counts), if it has any.
    pub(crate) caps: Option<Arc<CapSet>>,
    pub(crate) connection_key: Option<KeyFn>,
    /// How many leading bits of an IPv6 peer's address key the per-peer
    /// caps (128: all).
    pub(crate) peer_ipv6_prefix: u8,
    pub(crate) honor_grpc_timeout: bool,
    pub(crate) cap_wait: Option<Duration>,
    /// Put the handle into response extensions too (clients).
    pub(crate) handle_in_response: bool,
    /// `Retry-After` of a plain-HTTP refusal, in whole seconds.
    pub(crate) retry_after_secs: u64,
    /// The plain-HTTP statuses of the guard's own answers that differ from
    /// the table's, if any were chosen: read only when the guard answers.
    pub(crate) early_statuses: Option<Box<[(EndReason, StatusCode)]>>,
    /// The layer's heartbeat, for streams no route matches (a route's
    /// `Route::heartbeat` already falls back to it).
    pub(crate) heartbeat: Option<Heartbeat>,
}

impl Admission {
    /// The status of a plain-HTTP answer the guard makes for a stream that
    /// ended as `ending` before the service answered.
    pub(crate) fn early_status(&self, ending: Ending) -> StatusCode {
        let reason = ending.reason();
        self.early_statuses
            .iter()
            .flat_map(|chosen| chosen.iter())
            .find(|(chosen, _)| *chosen == reason)
            .map_or_else(|| ending.http_status(), |&(_, status)| status)
    }
}

/// A drain this layer answers to, and when it cuts the streams still open.
struct DrainLink {
    drain: Arc<DrainShared>,
    /// ns on the layer's clock; [`NEVER`] until the drain begins.
    deadline: AtomicU64,
}

impl Shared {
    /// The layer's state; registered with `drain`, if any, so that the drain
    /// reaches its streams.
    pub(crate) fn new(
        timer: Sweeper,
        report: Report,
        admission: Admission,
        drain: Option<Arc<DrainShared>>,
        notice: Option<Arc<NoticeShared>>,
    ) -> Arc<Self> {
        let shared = Arc::new(Shared {
            timer: Arc::new(timer),
            report,
            admission,
            drain: drain.map(|drain| DrainLink {
                drain,
                deadline: AtomicU64::new(NEVER),
            }),
            notice,
            #[cfg(feature = "test-view")]
            records: crate::view::Alive::default(),
        });
        if let Some(link) = &shared.drain {
            let streams: std::sync::Weak<dyn Drained> = Arc::downgrade(&shared) as _;
            link.drain.register_streams(streams);
            // Built after the drain began (the drain did not see the layer,
            // or this sees that it began: registering takes the lock the
            // drain's start takes after it begins): every stream is refused.
            if link.drain.is_draining() {
                shared.report.begin_drain();
            }
        }
        shared
    }

    /// The drain this layer answers to.
    pub(crate) fn drain(&self) -> Option<&Arc<DrainShared>> {
        self.drain.as_ref().map(|link| &link.drain)
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.drain().is_some_and(|drain| drain.is_draining())
    }

    /// The client connections whose GOAWAY this layer's streams hear of.
    pub(crate) fn notice(&self) -> Option<&Arc<NoticeShared>> {
        self.notice.as_ref()
    }

    /// What a stream starting now records of the notice: the GOAWAYs seen
    /// so far (0 without a notice).
    pub(crate) fn goaways_seen(&self) -> u64 {
        self.notice.as_ref().map_or(0, |notice| notice.goaways())
    }

    /// When the drain cuts this layer's streams, ns on its clock; [`NEVER`]
    /// while it is not draining.
    pub(crate) fn drain_deadline(&self) -> u64 {
        self.drain
            .as_ref()
            .map_or(NEVER, |link| link.deadline.load(Ordering::Acquire))
    }
}

impl Drained for Shared {
    fn begin(&self, deadline: Instant) -> u64 {
        let open = self.report.begin_drain() as u64;
        if let Some(link) = &self.drain {
            let deadline = self.timer.ns_of(deadline);
            link.deadline.store(deadline, Ordering::Release);
            self.timer.refile_after(deadline);
        }
        open
    }

    fn open(&self) -> usize {
        // Waiting streams too: the drain cuts them at its deadline.
        self.report.open()
    }

    fn close_rest(&self) -> u64 {
        // The timer already cut every stream at the deadline.
        0
    }

    fn cut_within(&self) -> Duration {
        // A tick at most one resolution after the deadline, plus 1 ms of
        // tokio's timer granularity.
        self.timer.resolution() + Duration::from_millis(1)
    }
}
