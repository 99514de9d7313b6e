//! Graceful shutdown with a deadline: the [`Drain`] (its documentation is
//! on the type, this module is private), its [`DrainReport`], and the
//! [`Drained`] trait through which a drain reaches stream and connection
//! guards.

mod report;

pub use report::DrainReport;

use std::{
    fmt,
    future::Future,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{Notify, watch},
    time::Instant,
};

use crate::{
    error::MAX_DURATION,
    sync::{AtomicBool, lock, nanos, wait_until},
};

/// What a drain reaches: a stream guard layer's streams, or a connection
/// guard's connections. The drain sees them through this trait only, so that
/// neither family's registry is known here.
pub(crate) trait Drained: Send + Sync {
    /// The drain began: what is still open must be over by `deadline`, and
    /// streams that start from now on are refused. Says how many streams
    /// are open (each admitted before the drain began).
    fn begin(&self, deadline: Instant) -> u64;

    /// How many streams or connections are still open.
    fn open(&self) -> usize;

    /// The grace period and the delay after it are over: closes what is
    /// still open and says how many it closed.
    fn close_rest(&self) -> u64;

    /// How long after the grace period what is still open may take to be
    /// cut (a stream guard's timer resolution): nothing is closed, and the
    /// report is not made, before that.
    fn cut_within(&self) -> Duration {
        Duration::ZERO
    }
}

/// The default delay between the end of the grace period and the closing of
/// connections still open: 500 ms.
pub(crate) const DEFAULT_CLOSE_CONNECTIONS_AFTER: Duration = Duration::from_millis(500);

/// Graceful shutdown with a deadline, and a notice to handlers that it
/// began.
///
/// tonic's `serve_with_shutdown` (like grpc-go's `GracefulStop`) waits for
/// every open stream to finish, so one endless stream keeps a server alive
/// forever. A `Drain`, given to stream guards
/// ([`StreamGuardBuilder::drain`](crate::StreamGuardBuilder::drain)) and
/// connection guards
/// ([`ConnectionGuardBuilder::drain`](crate::ConnectionGuardBuilder::drain)),
/// bounds that wait:
///
/// 1. [`start`](Self::start) begins the drain: every stream's
///    [`StreamHandle::draining`](crate::StreamHandle::draining) resolves, so
///    a handler can tell its client to reconnect elsewhere and finish;
///    [`started`](Self::started) resolves, so the server stops accepting and
///    sends GOAWAY (tonic's `serve_with_shutdown` or
///    [`serve_connection`](crate::ConnectionGuard::serve_connection));
///    new streams are refused with gRPC `UNAVAILABLE` (HTTP `503`), and
///    connections wrapped from now on are closed at once.
/// 2. When the grace period ends, every stream still open is cut: it ends
///    with `UNAVAILABLE` trailers (a body error for plain HTTP) and an end
///    event saying [`EndReason::Drained`](crate::EndReason::Drained),
///    within one timer resolution of its stream guard.
/// 3. The close delay later ([`with_close_delay`](Self::with_close_delay),
///    500 ms by default), the guarded connections still open are closed
///    (their close events say
///    [`Drained`](crate::ConnectionEnd::Drained)): those of peers that
///    stopped reading, whose streams hyper would otherwise keep until the
///    peer reads.
/// 4. The [`DrainReport`] says what happened: as soon as no stream and no
///    guarded connection is left, at the latest at step 3.
///
/// Clones share the drain; one drain may serve several guards.
///
/// ```no_run
/// use std::time::Duration;
/// use tonic::transport::server::TcpIncoming;
/// use tower_stream_guard::{ConnectionGuard, Drain, StreamGuardLayer};
///
/// # async fn run(routes: tonic::service::Routes) -> Result<(), Box<dyn std::error::Error>> {
/// let drain = Drain::new();
/// let guard = StreamGuardLayer::builder()
///     .idle_timeout(Duration::from_secs(30))
///     .drain(&drain)
///     .build()?;
/// let connections = ConnectionGuard::builder().drain(&drain).build()?;
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:50051").await?;
///
/// let on_signal = drain.clone();
/// tokio::spawn(async move {
///     let _ = tokio::signal::ctrl_c().await;
///     let report = on_signal.start(Duration::from_secs(5)).await;
///     println!("{}", report.to_json());
/// });
/// tonic::transport::Server::builder()
///     .layer(guard)
///     .add_routes(routes)
///     // Stops accepting and sends GOAWAY as soon as the drain begins; returns
///     // within the grace period plus the close delay.
///     .serve_with_incoming_shutdown(
///         // TCP_NODELAY, as tonic's `serve(addr)` sets it.
///         connections.wrap_incoming(TcpIncoming::from(listener).with_nodelay(Some(true))),
///         drain.started(),
///     )
///     .await?;
/// # Ok(())
/// # }
/// ```
///
/// Without a [`ConnectionGuard`](crate::ConnectionGuard), step 3 does
/// nothing: a peer that stopped reading keeps its connection, and tonic's
/// graceful shutdown waits for it.
///
/// # Cancel safety
///
/// The drain runs on a task of its own, spawned by [`start`](Self::start):
/// it proceeds whether or not the future `start` returns is awaited, and
/// dropping that future does not stop it (a later `start` returns a future
/// of the same report). The futures of [`start`](Self::start) and
/// [`started`](Self::started) own what they need (`'static`); dropping them
/// cancels nothing.
///
/// # Costs
///
/// Until the drain starts: nothing per new stream (a stream guard's open
/// count carries the drain's mark, read by the addition that counts the
/// stream). At the start,
/// in the caller of `start`: the open streams whose next deadline lies
/// after the drain's are filed again, once each, in batches. While
/// draining: each stream or guarded connection that ends wakes the drain
/// task, which counts what is still open (a short lock per guard). One
/// task per started drain, gone when it has reported.
#[derive(Clone)]
pub struct Drain {
    shared: Arc<DrainShared>,
}

pub(crate) struct DrainShared {
    draining: AtomicBool,
    /// Wakes `draining()` and `started()` waiters when the drain begins.
    began: Notify,
    /// Wakes the drain task when a stream or guarded connection ends while
    /// draining.
    idle: Notify,
    /// The stream guard layers given this drain.
    streams: Mutex<Vec<Weak<dyn Drained>>>,
    /// The connection guards given this drain.
    connections: Mutex<Vec<Weak<dyn Drained>>>,
    grace_ns: AtomicU64,
    close_after_ns: AtomicU64,
    open_at_start: AtomicU64,
    refused: AtomicU64,
    cut: AtomicU64,
    report: watch::Sender<Option<DrainReport>>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain::new()
    }
}

impl fmt::Debug for Drain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Drain")
            .field("draining", &self.is_draining())
            .field("active_streams", &self.shared.active())
            .finish()
    }
}

/// Nanoseconds of `d`, at most [`MAX_DURATION`]'s.
fn ns(d: Duration) -> u64 {
    nanos(Some(d.min(MAX_DURATION)))
}

impl Drain {
    /// A drain not yet started. Give it to
    /// [`StreamGuardBuilder::drain`](crate::StreamGuardBuilder::drain) and
    /// [`ConnectionGuardBuilder::drain`](crate::ConnectionGuardBuilder::drain).
    pub fn new() -> Self {
        Drain::with_close_delay(DEFAULT_CLOSE_CONNECTIONS_AFTER)
    }

    /// A drain not yet started that closes the guarded connections still
    /// open `delay` after its grace period (default 500 ms): time for the
    /// `UNAVAILABLE` trailers of cut streams to reach their peers. A delay
    /// longer than 365 days counts as 365 days. A delay shorter than the
    /// stream guards' timer resolution (10 ms by default) is stretched to
    /// it: the timers cut the streams left up to one resolution after the
    /// grace, and connections are closed, and the report made, after that.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_guard::Drain;
    ///
    /// let drain = Drain::with_close_delay(Duration::from_millis(200));
    /// assert!(!drain.is_draining());
    /// ```
    pub fn with_close_delay(delay: Duration) -> Self {
        Drain {
            shared: Arc::new(DrainShared {
                draining: AtomicBool::new(false),
                began: Notify::new(),
                idle: Notify::new(),
                streams: Mutex::new(Vec::new()),
                connections: Mutex::new(Vec::new()),
                grace_ns: AtomicU64::new(0),
                close_after_ns: AtomicU64::new(ns(delay)),
                open_at_start: AtomicU64::new(0),
                refused: AtomicU64::new(0),
                cut: AtomicU64::new(0),
                report: watch::channel(None).0,
            }),
        }
    }

    /// Whether the drain has begun.
    pub fn is_draining(&self) -> bool {
        self.shared.is_draining()
    }

    /// Resolves when the drain begins (at once if it has). Hand it to tonic's
    /// `serve_with_shutdown` / `serve_with_incoming_shutdown`, so that the
    /// server stops accepting and sends GOAWAY when the drain begins (see
    /// the example on [`Drain`]). The future owns what it needs; dropping
    /// it cancels nothing.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_guard::Drain;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let drain = Drain::new();
    /// let stop_accepting = tokio::spawn(drain.started());
    /// drain.start(Duration::from_secs(5)).await;
    /// stop_accepting.await.unwrap();
    /// assert!(drain.is_draining());
    /// # }
    /// ```
    pub fn started(&self) -> impl Future<Output = ()> + Send + 'static {
        let shared = Arc::clone(&self.shared);
        async move { shared.began().await }
    }

    /// Streams of the guard layers given this drain that have not ended.
    pub fn active_streams(&self) -> usize {
        self.shared.active()
    }

    /// Begins the drain now, with `grace` for open streams to finish (see
    /// [`Drain`] for the sequence), and returns a future of its report. It
    /// resolves as soon as no stream of the guards given this drain and no
    /// connection of its connection guards is open; otherwise `grace` plus
    /// [the close delay](Self::with_close_delay) (at least one stream-timer
    /// resolution) from now, once the connections still open have been
    /// closed.
    ///
    /// The drain runs on a task of its own, so it proceeds whether or not
    /// the future is awaited, and dropping the future does not stop it.
    /// Calling `start` again does not restart it; the future resolves with
    /// the first drain's report. If the runtime the drain's task runs on
    /// shuts down before the drain finishes, every such future resolves (on
    /// whatever runtime awaits it) with the counts made so far and no
    /// connection closed, and so does a later `start`. A grace
    /// longer than 365 days counts as 365 days.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (the drain task is spawned on the current
    /// one), unless the drain has begun already. It panics before it begins
    /// anything: the drain is as it was, and a `start` on a runtime later
    /// begins it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_stream_guard::Drain;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let drain = Drain::new();
    /// let report = drain.start(Duration::from_secs(30));
    /// assert!(drain.is_draining());
    /// println!("{}", report.await.to_json());
    /// # }
    /// ```
    pub fn start(&self, grace: Duration) -> impl Future<Output = DrainReport> + Send + 'static {
        let shared = &self.shared;
        let mut report = shared.report.subscribe();
        // The runtime first: a drain begun and then left without its task
        // would refuse every stream and report at once.
        let runtime = tokio::runtime::Handle::try_current();
        if runtime.is_err() && !shared.is_draining() {
            panic!(
                "Drain::start called outside a tokio runtime: the drain needs one for its task \
                 (the drain was not begun)"
            );
        }
        if let (Some(deadline), Ok(runtime)) = (shared.begin(grace), runtime) {
            // The report's sender goes into the task's future as it is
            // made: dropped with it, run or not, it still reports.
            let reporting = Reporting {
                shared: Arc::clone(shared),
                started: Instant::now(),
            };
            runtime.spawn(run(reporting, deadline));
        }
        async move {
            loop {
                if let Some(done) = *report.borrow_and_update() {
                    return done;
                }
                if report.changed().await.is_err() {
                    // The sender lives as long as the drain: unreachable
                    // while this future holds a clone of it.
                    return DrainReport {
                        open_at_start: 0,
                        cut: 0,
                        refused: 0,
                        connections_closed: 0,
                        elapsed: Duration::ZERO,
                    };
                }
            }
        }
    }

    pub(crate) fn shared(&self) -> &Arc<DrainShared> {
        &self.shared
    }
}

impl DrainShared {
    /// The part of [`Drain::start`] that runs in its caller: begins the
    /// drain, unless it had begun, and says by when the streams must be
    /// over (`None` if it had begun).
    pub(crate) fn begin(&self, grace: Duration) -> Option<Instant> {
        if self.draining.swap(true, Ordering::AcqRel) {
            return None;
        }
        let grace = grace.min(MAX_DURATION);
        let deadline = Instant::now() + grace;
        self.grace_ns.store(ns(grace), Ordering::Relaxed);
        self.began.notify_waiters();
        let open: u64 = self
            .streams()
            .iter()
            .map(|streams| streams.begin(deadline))
            .sum();
        self.open_at_start.store(open, Ordering::Relaxed);
        Some(deadline)
    }

    /// What the drain has counted so far: streams open at its start, and
    /// refused since.
    #[cfg(all(test, stream_guard_loom))]
    pub(crate) fn counted(&self) -> (u64, u64) {
        (
            self.open_at_start.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub(crate) async fn began(&self) {
        wait_until(&self.began, || self.is_draining()).await;
    }

    /// A stream guard layer's streams, to reach when the drain begins.
    pub(crate) fn register_streams(&self, streams: Weak<dyn Drained>) {
        lock(&self.streams).push(streams);
    }

    /// A connection guard's connections, to close when the drain ends.
    pub(crate) fn register_connections(&self, connections: Weak<dyn Drained>) {
        lock(&self.connections).push(connections);
    }

    fn streams(&self) -> Vec<Arc<dyn Drained>> {
        lock(&self.streams)
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    fn connections(&self) -> Vec<Arc<dyn Drained>> {
        lock(&self.connections)
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    fn active(&self) -> usize {
        self.streams().iter().map(|streams| streams.open()).sum()
    }

    fn open_connections(&self) -> usize {
        self.connections().iter().map(|c| c.open()).sum()
    }

    pub(crate) fn grace(&self) -> Duration {
        Duration::from_nanos(self.grace_ns.load(Ordering::Relaxed))
    }

    pub(crate) fn count_refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_cut(&self) {
        self.cut.fetch_add(1, Ordering::Relaxed);
    }

    /// A stream or connection ended: the drain task may be done.
    pub(crate) fn ended_one(&self) {
        if self.is_draining() {
            self.idle.notify_waiters();
        }
    }

    /// Waits until `done` holds or `deadline` passes; whether it held.
    async fn wait_until(&self, deadline: Instant, done: impl Fn(&Self) -> bool) -> bool {
        let held = wait_until(&self.idle, || done(self));
        tokio::time::timeout_at(deadline, held).await.is_ok() || done(self)
    }
}

/// Makes a started drain's report. If the drain's task is dropped before it
/// reports (its runtime shut down mid-drain), its `Drop` reports what was
/// counted so far, with no connection closed: every `start` future then
/// resolves, and a later `start` resolves at once with that report.
struct Reporting {
    shared: Arc<DrainShared>,
    started: Instant,
}

impl Reporting {
    fn report(&self, connections_closed: u64) -> DrainReport {
        let shared = &self.shared;
        DrainReport {
            open_at_start: shared.open_at_start.load(Ordering::Relaxed),
            cut: shared.cut.load(Ordering::Relaxed),
            refused: shared.refused.load(Ordering::Relaxed),
            connections_closed,
            elapsed: self.started.elapsed(),
        }
    }
}

impl Drop for Reporting {
    fn drop(&mut self) {
        if self.shared.report.borrow().is_none() {
            let report = self.report(0);
            self.shared.report.send_replace(Some(report));
        }
    }
}

async fn run(reporting: Reporting, deadline: Instant) {
    let shared = &reporting.shared;
    // Streams end by themselves until the deadline; then the guards' timers
    // cut the rest (within one resolution).
    // Connections are closed, and the report made, no sooner than the
    // timers can have cut the streams left, whatever the close delay.
    let cut_within = shared
        .streams()
        .iter()
        .map(|streams| streams.cut_within())
        .max()
        .unwrap_or_default();
    let close_after =
        Duration::from_nanos(shared.close_after_ns.load(Ordering::Relaxed)).max(cut_within);
    let all_gone = |s: &DrainShared| s.active() == 0 && s.open_connections() == 0;
    if !shared.wait_until(deadline, all_gone).await {
        shared.wait_until(deadline + close_after, all_gone).await;
    }
    let mut connections_closed = 0;
    for connections in shared.connections() {
        connections_closed += connections.close_rest();
    }
    let report = reporting.report(connections_closed);
    // Sent before it is logged: a tracing layer that panics here must not
    // leave the report to `Reporting`'s drop (which knows of no closed
    // connection).
    shared.report.send_replace(Some(report));
    tracing::info!(
        target: "tower_stream_guard",
        open_at_start = report.open_at_start,
        cut = report.cut,
        refused = report.refused,
        connections_closed = report.connections_closed,
        elapsed_ms = report.elapsed.as_millis() as u64,
        "drain finished"
    );
}
