//! Every connection of one connection guard, its per-connection record and
//! the timer that checks them.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use atomic_waker::AtomicWaker;
use tokio::{
    sync::{Notify, broadcast},
    time::Instant,
};

use super::{ConnectionEnd, ConnectionEvent, takeover::Takeover};
use crate::{
    drain::{DrainShared, Drained},
    sync::{NEVER, lock, nanos},
    ticker::{Job, Lease, Ticker},
};

/// The settings of a connection guard.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnPolicy {
    pub(crate) idle: Option<Duration>,
    pub(crate) stalled_grace: Option<Duration>,
    pub(crate) max_age: Option<Duration>,
    pub(crate) max_age_grace: Duration,
    /// How far each connection's maximum age is moved from `max_age`, up or
    /// down, in percent of it (below 100).
    pub(crate) max_age_jitter_percent: u8,
    pub(crate) resolution: Duration,
    /// The bound on an unreachable peer, set on each wrapped TCP socket.
    pub(crate) dead_peer: Option<Duration>,
}

/// Every connection of one connection guard.
pub(crate) struct Connections {
    pub(crate) policy: ConnPolicy,
    pub(crate) base: Instant,
    pub(crate) table: Mutex<Table>,
    pub(crate) events: broadcast::Sender<ConnectionEvent>,
    pub(crate) drain: Option<Arc<DrainShared>>,
    /// The runtimes the timer task may run on: it moves when its runtime
    /// shuts down while connections of other runtimes are open.
    pub(crate) ticker: Ticker,
    /// Records metrics (`ConnectionGuardBuilder::metrics`).
    pub(crate) metrics: bool,
    /// The per-guard random key each connection's id is hashed with to draw
    /// its maximum age: std's hasher keys come from the operating system, so
    /// servers of a fleet draw differently for the same ids.
    pub(crate) age_key: RandomState,
    /// Connection states alive, for the test-only view.
    #[cfg(feature = "test-view")]
    pub(crate) live: crate::view::Alive,
}

#[derive(Default)]
pub(crate) struct Table {
    pub(crate) open: HashMap<u64, Weak<ConnState>>,
    pub(crate) running: bool,
}

/// One connection's shared record.
pub(crate) struct ConnState {
    pub(crate) id: u64,
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) opened: Instant,
    pub(crate) opened_ns: u64,
    /// This connection's maximum age, jittered when it was wrapped, in ns;
    /// `NEVER` without a `max_age`.
    pub(crate) max_age_ns: u64,
    pub(crate) connections: Arc<Connections>,
    /// 0 while open, else the `ConnectionEnd` code.
    pub(crate) end: AtomicU8,
    pub(crate) read_waker: AtomicWaker,
    pub(crate) write_waker: AtomicWaker,
    pub(crate) streams_open: AtomicUsize,
    pub(crate) streams_total: AtomicU64,
    /// When the last stream ended (or the connection opened), ns since base.
    pub(crate) quiet_since: AtomicU64,
    pub(crate) stalled: AtomicUsize,
    pub(crate) stalled_since: AtomicU64,
    /// Why a graceful close (GOAWAY) was asked for first: 0 until then,
    /// else the `ConnectionEnd` code (max age, idle, drained).
    pub(crate) goaway_for: AtomicU8,
    /// The code driving the connection acted on the GOAWAY request
    /// (`serve_connection` does): a graceful close then went for the
    /// reason it was asked for.
    pub(crate) goaway_sent: AtomicBool,
    pub(crate) goaway: Notify,
    pub(crate) reported: AtomicBool,
    /// An IO error was seen (a reset, a broken pipe): the connection did not
    /// close cleanly. Written on errors only.
    pub(crate) failed: AtomicBool,
    /// The stream that took the connection over, if one did (see
    /// `takeover.rs`).
    pub(crate) takeover: Mutex<Takeover>,
    /// `takeover` holds a stream: the IO's reads and writes count for it.
    pub(crate) taken_over: AtomicBool,
}

impl ConnState {
    pub(crate) fn close(&self, end: ConnectionEnd) -> bool {
        if self
            .end
            .compare_exchange(0, end.code(), Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        tracing::debug!(
            target: "tower_stream_guard",
            connection = self.id,
            reason = end.as_str(),
            "closing connection"
        );
        self.read_waker.wake();
        self.write_waker.wake();
        true
    }

    pub(crate) fn closed_error(&self) -> Option<io::Error> {
        let end = self.end()?;
        let message = match end {
            ConnectionEnd::PeerUnreachable => {
                "connection lost: the peer is unreachable (dead_peer_timeout)".to_owned()
            }
            end => format!("connection closed by tower-stream-guard ({end})"),
        };
        Some(io::Error::new(io::ErrorKind::ConnectionAborted, message))
    }

    /// Asks for a graceful close (see `ConnectionHandle::goaway`) for
    /// `end`; whether this call asked (only the first does).
    pub(crate) fn ask_goaway(&self, end: ConnectionEnd) -> bool {
        let asked = self
            .goaway_for
            .compare_exchange(0, end.code(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if asked {
            self.goaway.notify_waiters();
        }
        asked
    }

    /// Why a graceful close was asked for, if it was.
    pub(crate) fn goaway_reason(&self) -> Option<ConnectionEnd> {
        ConnectionEnd::from_code(self.goaway_for.load(Ordering::Acquire))
    }

    /// Why the guard closed the connection (or found its peer gone), if it did.
    pub(crate) fn end(&self) -> Option<ConnectionEnd> {
        ConnectionEnd::from_code(self.end.load(Ordering::Acquire))
    }

    /// Reads an error of the connection's IO (it did not close cleanly):
    /// one that says the peer is unreachable (the kernel gave up on it: see `socket.rs`) marks the
    /// connection [`ConnectionEnd::PeerUnreachable`], before hyper drops its
    /// streams, so that they and the close event say so. Reached only on
    /// an IO error, never per read or write.
    #[cold]
    pub(crate) fn note_error(&self, error: &io::Error) {
        self.failed.store(true, Ordering::Release);
        if crate::socket::is_unreachable(error) {
            self.close(ConnectionEnd::PeerUnreachable);
        }
    }

    /// Emits the close event once, and forgets the connection.
    pub(crate) fn report_closed(&self) {
        if self.reported.swap(true, Ordering::AcqRel) {
            return;
        }
        // A stream that took the connection over ends with it, before the
        // connection's event.
        self.end_takeover();
        // A connection that went away gracefully after the GOAWAY its
        // server sent (for its age, idleness or a drain) went for that
        // reason all the same: recycling stays countable. (Under tonic or
        // axum nothing sends it: `closed`.)
        let graceful = match self.goaway_sent.load(Ordering::Acquire) {
            true => self.goaway_reason(),
            false => None,
        };
        let end = self.end().or(graceful).unwrap_or(ConnectionEnd::Closed);
        let duration = self.opened.elapsed();
        let event = ConnectionEvent {
            id: self.id,
            peer: self.peer,
            end: Some(end),
            duration,
            streams: self.streams_total.load(Ordering::Relaxed),
            at: SystemTime::now(),
        };
        self.connections.lock().open.remove(&self.id);
        if self.connections.metrics {
            crate::meter::connection_closed(end.as_str());
        }
        if self.connections.events.receiver_count() > 0 {
            let _ = self.connections.events.send(event);
        }
        if let Some(drain) = &self.connections.drain {
            drain.ended_one();
        }
    }

    /// What the timer decides for this connection at `now`.
    pub(crate) fn check(&self, policy: &ConnPolicy, now: u64) {
        let ns = |d: Duration| nanos(Some(d));
        if let Some(grace) = policy.stalled_grace
            // The count decides; `stalled_since` only says since when. The
            // two are updated one after the other, so a stall and an unstall
            // racing can leave a time with no stalled stream (ignored here,
            // and overwritten by the next stall) or a stalled stream with no
            // time (its grace starts now).
            && self.stalled.load(Ordering::Acquire) > 0
        {
            let since = match self.stalled_since.load(Ordering::Acquire) {
                NEVER => {
                    let _ = self.stalled_since.compare_exchange(
                        NEVER,
                        now,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                    now
                }
                since => since,
            };
            if now.saturating_sub(since) >= ns(grace) {
                self.close(ConnectionEnd::Stalled);
                return;
            }
        }
        // A stalled stream's end left no stream counted, but hyper still
        // holds it: the connection is not idle, its reader gets its grace.
        // (A stall is counted before the stream's end is.)
        // Without a `stalled_grace`, a stalled stream never closes the
        // connection by itself: the idle timeout does, as before.
        if let Some(idle) = policy.idle
            && self.streams_open.load(Ordering::Acquire) == 0
            && (policy.stalled_grace.is_none() || self.stalled.load(Ordering::Acquire) == 0)
            && now.saturating_sub(self.quiet_since.load(Ordering::Relaxed)) >= ns(idle)
        {
            // A GOAWAY first (gRFC A9's MAX_CONNECTION_IDLE): the client
            // learns not to start a stream here. The hard close comes at a
            // later tick if the connection is idle still (a stream that
            // raced the GOAWAY is served, and the idle clock starts over).
            if !self.ask_goaway(ConnectionEnd::Idle) {
                self.close(ConnectionEnd::Idle);
            }
            return;
        }
        if self.max_age_ns != NEVER {
            let age = self.max_age_ns;
            let lived = now.saturating_sub(self.opened_ns);
            // A late tick may find the age and the grace both passed: the
            // tick that asks for the GOAWAY never closes.
            if lived >= age && self.ask_goaway(ConnectionEnd::MaxAge) {
                return;
            }
            // The hard close never comes in the tick that asks for the
            // GOAWAY: closing fails every write, and the GOAWAY hyper
            // queued would never be flushed. So at least one resolution
            // between them, even with a zero grace.
            let grace = ns(policy.max_age_grace).max(ns(policy.resolution));
            if lived >= age.saturating_add(grace) {
                self.close(ConnectionEnd::MaxAge);
            }
        }
    }
}

impl ConnPolicy {
    /// A connection's maximum age in ns for a uniformly random `draw`:
    /// spread evenly over `max_age` × (1 ± jitter), from `draw == 0` at the
    /// bottom to `draw == u64::MAX` at the top, and at least the resolution.
    /// `NEVER` without a `max_age`.
    pub(crate) fn connection_max_age(&self, draw: u64) -> u64 {
        let Some(age) = self.max_age else {
            return NEVER;
        };
        // At most 365 days (checked at build): ~3.2e16 ns, so neither the
        // percentage nor the spread overflows.
        let age = u128::from(nanos(Some(age)));
        let jitter = age * u128::from(self.max_age_jitter_percent) / 100;
        // `draw` scaled onto 0..=2 × jitter, keeping its high bits.
        let offset = (u128::from(draw) * (2 * jitter + 1)) >> 64;
        // Never below the resolution, as `max_age` itself (checked at build).
        let drawn = (age - jitter + offset).max(u128::from(nanos(Some(self.resolution))));
        u64::try_from(drawn).unwrap_or(NEVER - 1)
    }
}

impl Connections {
    /// This connection's maximum age in ns (see `ConnPolicy::connection_max_age`),
    /// drawn from a keyed hash of its id: one hash per connection, no lock.
    pub(crate) fn draw_max_age(&self, id: u64) -> u64 {
        self.policy.connection_max_age(self.age_key.hash_one(id))
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        lock(&self.table)
    }

    pub(crate) fn now_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(NEVER - 1)
    }

    /// Connections open now.
    pub(crate) fn open(&self) -> usize {
        self.lock().open.len()
    }

    /// Closes every open connection (a drain's end); how many it closed.
    pub(crate) fn close_all(&self) -> u64 {
        let open: Vec<_> = self
            .lock()
            .open
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        open.iter()
            .filter(|state| state.close(ConnectionEnd::Drained))
            .count() as u64
    }

    pub(crate) fn needs_timer(&self) -> bool {
        self.policy.idle.is_some()
            || self.policy.stalled_grace.is_some()
            || self.policy.max_age.is_some()
    }
}

impl Drained for Connections {
    fn begin(&self, _deadline: Instant) -> u64 {
        // Connections are told through `Drain::started` (GOAWAY) and new
        // ones are closed as they are wrapped; nothing to do at the start,
        // and no stream to count.
        0
    }

    fn open(&self) -> usize {
        Connections::open(self)
    }

    fn close_rest(&self) -> u64 {
        self.close_all()
    }
}

impl Job for Connections {
    const NO_RUNTIME: &'static str = "no tokio runtime when a connection was wrapped: idle timeouts and maximum ages of connections are not enforced";

    fn ticker(&self) -> &Ticker {
        &self.ticker
    }

    fn run(lease: Lease<Self>) -> impl Future<Output = ()> + Send + 'static {
        run_timer(lease)
    }

    fn still_needed(&self) -> bool {
        let mut table = self.lock();
        table.running = !table.open.is_empty();
        table.running
    }

    fn stopped(&self) {
        self.lock().running = false;
    }
}

async fn run_timer(mut lease: Lease<Connections>) {
    let connections = Arc::clone(lease.job());
    let mut ticks = tokio::time::interval(connections.policy.resolution);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let open: Vec<_> = {
            let mut table = connections.lock();
            if table.open.is_empty() {
                // Stopped under the lock: a connection wrapped after this
                // starts a new task.
                table.running = false;
                lease.finish();
                return;
            }
            table.open.values().filter_map(Weak::upgrade).collect()
        };
        let now = connections.now_ns();
        for state in open {
            state.check(&connections.policy, now);
        }
    }
}

#[cfg(test)]
#[path = "registry_tests.rs"]
mod tests;
