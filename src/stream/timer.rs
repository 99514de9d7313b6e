//! Deadlines without timer work on the data path.
//!
//! Each guard layer owns one [`Sweeper`]: a single tokio task that wakes every
//! *resolution* (10 ms by default) while the guard has streams, and otherwise
//! does not exist. Streams sit in ordered maps (shards, picked by stream
//! id) keyed by their earliest possible expiry. Per frame a body does no timer work at all: it copies the
//! sweeper's coarse clock into the stream state (two relaxed atomic operations).
//! When an entry comes due, the sweeper asks the stream for its real deadline
//! (the stream may have moved meanwhile) and either ends it or files it again.
//!
//! Costs: one map insertion and one removal per stream, under the lock of
//! one of the timer's shards (picked by stream id, several per core, so
//! that streams starting and ending on different cores seldom wait for each
//! other), one more per idle period of an active stream, and one wake-up per
//! resolution per guard, however many streams there are (each locks every
//! shard once, at most 64). Streams due in one tick end shard by shard, in
//! deadline order within a shard. Precision: a deadline
//! fires on the first tick at or after it, so at most one resolution late;
//! because frames are stamped with the next tick's time, an idle timeout
//! fires at most two resolutions late, and never early while ticks run on
//! time (see below for late ticks).
//!
//! A tick can run late (a runtime too busy to poll the timer task on time).
//! Frames stamped meanwhile carry the time the late tick was due, though they
//! may have moved right up to when it ran; judged by their stamp, a stream
//! that kept moving through the delay would look idle for all of it. So each
//! late tick (by over a quarter resolution plus 1 ms) is remembered: stamp published →
//! when it was replaced, and the frames with that stamp count as that recent.
//! Only late ticks are kept, for as long as the guard's longest idle timeout
//! could need them, at most [`LATE_TICKS_KEPT`](super::late::LATE_TICKS_KEPT).

use std::{
    collections::BTreeMap,
    panic::AssertUnwindSafe,
    sync::{
        Arc, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use tokio::time::{Instant, MissedTickBehavior};

use crate::{
    end::Ending,
    sync::{AtomicBool, Mutex, MutexGuard, NEVER, lock, nanos},
    ticker::{Job, Lease, Ticker},
};

use super::{
    late::LateTicks,
    policy::Policy,
    record::{Record, Verdict},
};

/// How often, at most, a guard reads the wall clock for its end events'
/// start times (see `Sweeper::wall_of`): 1 s.
const WALL_EVERY_NS: u64 = 1_000_000_000;

/// How many due entries the sweeper takes per hold of a shard's lock (about
/// 0.1 ms of work): the longest a stream start or end waits for a sweep.
const SWEEP_BATCH: usize = 256;

pub(crate) struct Sweeper {
    /// Origin of every nanosecond timestamp of this guard.
    base: Instant,
    /// The wall clock at `base`, ns since the Unix epoch, so that an end
    /// event's start time costs no clock read of its own. Taken when the
    /// guard is built and again by the first end a second or more after the
    /// last taking (see [`wall_of`](Self::wall_of)).
    wall_at_base: AtomicU64,
    /// When `wall_at_base` was last taken, ns on this guard's clock.
    wall_taken: AtomicU64,
    resolution: Duration,
    /// An upper bound on "now" in nanoseconds since `base`: the time of the
    /// next tick. Bodies copy it on every frame.
    coarse: AtomicU64,
    /// Whether the task runs, and the late ticks. Lock order: `control`
    /// before a shard, never the other way.
    control: Mutex<Control>,
    /// The filed streams, spread over shards by stream id: a stream's start
    /// and end lock only its shard, so that streams starting and ending on
    /// different cores seldom meet on one lock (see [`shard_count`]).
    shards: Box<[Padded<Mutex<Shard>>]>,
    /// `Control::running`, readable without the lock (written under it).
    running: AtomicBool,
    /// The runtimes the task may run on: it moves when its runtime shuts
    /// down while streams of other runtimes are filed.
    ticker: Ticker,
    /// File streams without a deadline too (under `NEVER`), so that a drain
    /// can reach every stream.
    file_all: bool,
    /// The longest idle timeout among this guard's streams, in ns: how long
    /// a late tick is remembered.
    max_idle: AtomicU64,
}

#[derive(Default)]
struct Control {
    running: bool,
    late: LateTicks,
}

/// (deadline ns, stream id) -> stream.
type Shard = BTreeMap<(u64, u64), Weak<Record>>;

/// A shard on a cache line of its own: two cores locking neighbouring
/// shards do not take the line from each other.
#[repr(align(64))]
struct Padded<T>(T);

/// How many shards a guard's timer has: two per core the process may use,
/// a power of two, at most 64 (each tick locks every shard once).
fn shard_count() -> usize {
    // Under loom, one: stream ids come from a process-wide counter, so a
    // stream's shard would change from one explored interleaving to the
    // next, which loom takes for a model that is not deterministic.
    if cfg!(stream_guard_loom) {
        return 1;
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    (2 * cores).next_power_of_two().min(64)
}

impl Sweeper {
    pub(crate) fn new(resolution: Duration, file_all: bool) -> Self {
        Sweeper {
            base: Instant::now(),
            wall_at_base: AtomicU64::new(wall_ns()),
            wall_taken: AtomicU64::new(0),
            resolution,
            coarse: AtomicU64::new(0),
            control: Mutex::new(Control::default()),
            shards: (0..shard_count())
                .map(|_| Padded(Mutex::new(Shard::new())))
                .collect(),
            running: AtomicBool::new(false),
            ticker: Ticker::default(),
            file_all,
            max_idle: AtomicU64::new(0),
        }
    }

    /// A stream of this guard has `policy`'s idle timeouts (and minimum
    /// rate window): late ticks are remembered for the longest of them.
    pub(crate) fn note_idle(&self, policy: &Policy) {
        let window = policy.min_rate.map(|rate| rate.window);
        let longest = [
            policy.idle_both,
            policy.idle_request,
            policy.idle_response,
            window,
        ]
        .into_iter()
        .flatten()
        .max()
        .map_or(0, |d| nanos(Some(d)));
        // A load first: nearly always the same, and a plain load keeps the
        // cache line shared between cores.
        if longest > self.max_idle.load(Ordering::Relaxed) {
            self.max_idle.fetch_max(longest, Ordering::Relaxed);
        }
    }

    /// Files again every stream filed later than `deadline` (ns), which a
    /// drain just made the latest any stream may end.
    ///
    /// Streams filed at or before it need nothing: when their entry comes
    /// due, the check sees the drain's deadline. Each one filed again lands
    /// at or before the deadline, behind the walk, so the walk meets every
    /// stream once and ends. In batches in key order, the lock released in
    /// between (see `SWEEP_BATCH`).
    pub(crate) fn refile_after(self: &Arc<Self>, deadline: u64) {
        let mut batch: Vec<Arc<Record>> = Vec::new();
        for shard in 0..self.shards.len() {
            let mut after = (deadline, u64::MAX);
            loop {
                let mut last = None;
                {
                    let entries = self.shard_at(shard);
                    let rest = entries
                        .range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded));
                    for (key, weak) in rest.take(SWEEP_BATCH) {
                        last = Some(*key);
                        if let Some(state) = weak.upgrade() {
                            batch.push(state);
                        }
                    }
                }
                for state in batch.drain(..) {
                    self.arm(&state);
                }
                match last {
                    // The key only grows: an entry that stayed past the
                    // deadline (none should) is passed, not met again.
                    Some(key) => after = key,
                    None => break,
                }
            }
        }
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        lock(&self.control)
    }

    fn shard_at(&self, index: usize) -> MutexGuard<'_, Shard> {
        lock(&self.shards[index].0)
    }

    /// The shard of the stream `id`.
    fn shard(&self, id: u64) -> MutexGuard<'_, Shard> {
        // The count is a power of two: the low bits pick the shard.
        self.shard_at(id as usize & (self.shards.len() - 1))
    }

    /// Streams filed, over every shard (for leak checks).
    #[cfg(feature = "test-view")]
    pub(crate) fn filed(&self) -> usize {
        (0..self.shards.len()).map(|i| self.shard_at(i).len()).sum()
    }

    /// The exact time in nanoseconds since this guard's origin.
    pub(crate) fn now_ns(&self) -> u64 {
        self.ns_of(Instant::now())
    }

    pub(crate) fn ns_of(&self, t: Instant) -> u64 {
        let ns = t.saturating_duration_since(self.base).as_nanos();
        u64::try_from(ns).unwrap_or(NEVER - 1)
    }

    pub(crate) fn instant_of(&self, ns: u64) -> Instant {
        self.base + Duration::from_nanos(ns)
    }

    /// The wall-clock time of `ns` on this guard's clock, `now` being the
    /// current time on it. The wall clock is read again when the last
    /// reading is a second old or more (at most about once a second per
    /// guard, by whichever stream ends then): a step of the wall clock, or
    /// time the machine spent suspended (which the monotonic clock does not
    /// count), shows in the events within a second.
    pub(crate) fn wall_of(&self, ns: u64, now: u64) -> SystemTime {
        if now.saturating_sub(self.wall_taken.load(Ordering::Relaxed)) >= WALL_EVERY_NS {
            self.wall_taken.store(now, Ordering::Relaxed);
            self.wall_at_base
                .store(wall_ns().saturating_sub(now), Ordering::Relaxed);
        }
        let wall = self.wall_at_base.load(Ordering::Relaxed).saturating_add(ns);
        SystemTime::UNIX_EPOCH + Duration::from_nanos(wall)
    }

    /// The coarse clock frames are stamped with: never behind real time while
    /// the sweeper runs on schedule.
    #[inline]
    pub(crate) fn stamp(&self) -> u64 {
        self.coarse.load(Ordering::Relaxed)
    }

    /// How often the timer ticks.
    pub(crate) fn resolution(&self) -> Duration {
        self.resolution
    }

    fn resolution_ns(&self) -> u64 {
        nanos(Some(self.resolution))
    }

    /// Files a stream that just started, and remembers the runtime it
    /// started on as one the sweeper may run on. Locks the stream's shard
    /// only (and, if the sweeper is not running, the control to start it).
    pub(crate) fn arm_new(self: &Arc<Self>, state: &Arc<Record>) {
        self.ticker.note_current();
        if self.file_new(state) {
            self.start();
        }
    }

    /// [`arm_new`](Self::arm_new) without the spawn: files a new stream, and
    /// says whether the caller must start the task (marked running here).
    pub(crate) fn file_new(&self, state: &Arc<Record>) -> bool {
        // Without the late ticks: a new stream's frames, if any, carry the
        // current stamp, and were one a late tick's, the stream would only be
        // filed earlier than it could expire (and filed again then).
        let filed = self.file(&mut self.shard(state.id.get()), state, &LateTicks::NONE);
        // Streams filed under `NEVER` need no timer.
        if filed.is_none_or(|deadline| deadline == NEVER) {
            return false;
        }
        // Read after the shard's lock is released: a sweeper about to stop
        // marks itself stopped before it looks at the shards (under their
        // locks), so it sees this filing or this sees the mark.
        if self.running.load(Ordering::Relaxed) {
            return false;
        }
        let mut control = self.control();
        if control.running {
            return false;
        }
        self.start_locked(&mut control);
        true
    }

    /// For the loom models: marks the task running, as a started one is.
    #[cfg(all(test, stream_guard_loom))]
    pub(crate) fn mark_running(&self) {
        let mut control = self.control();
        self.start_locked(&mut control);
    }

    /// For the loom models: what a tick does last; whether the task stopped.
    #[cfg(all(test, stream_guard_loom))]
    pub(crate) fn try_stop(&self) -> bool {
        let mut control = self.control();
        self.stop_if_idle(&mut control)
    }

    /// Files `state` under its current earliest deadline, replacing any earlier
    /// filing. Starts the sweeper task when it is not running.
    pub(crate) fn arm(self: &Arc<Self>, state: &Arc<Record>) {
        let mut control = self.control();
        let filed = self.file(&mut self.shard(state.id.get()), state, &control.late);
        if filed.is_none_or(|deadline| deadline == NEVER) || control.running {
            return;
        }
        self.start_locked(&mut control);
        // Spawned without the lock: a runtime that is shutting down drops the
        // task on the spot, and its `Lease` takes the lock.
        drop(control);
        self.start();
    }

    /// Files `state` in its `shard` under its current earliest deadline
    /// (`late` as in [`Record::next_deadline`]), replacing any earlier
    /// filing; the deadline it is filed under, `None` if it is not filed.
    fn file(&self, shard: &mut Shard, state: &Arc<Record>, late: &LateTicks) -> Option<u64> {
        // Read under the shard's lock: a drain stores its deadline before it
        // takes the shards' locks to file every stream again, so either this
        // filing sees the drain's deadline or the drain's refiling sees this
        // filing.
        let deadline = state.next_deadline(late).0;
        let old = state.timer_key.swap(deadline, Ordering::Relaxed);
        // With `file_all`, `NEVER` is a filing too, not only "not filed".
        if old != NEVER || self.file_all {
            shard.remove(&(old, state.id.get()));
        }
        // An end takes this lock to remove the filing after it decided: if
        // it came first, it is seen here.
        if (deadline == NEVER && !self.file_all) || state.is_ended() {
            state.timer_key.store(NEVER, Ordering::Relaxed);
            return None;
        }
        shard.insert((deadline, state.id.get()), Arc::downgrade(state));
        Some(deadline)
    }

    /// Marks the task running (the caller starts it once the lock is
    /// released).
    fn start_locked(&self, control: &mut Control) {
        control.running = true;
        self.running.store(true, Ordering::Relaxed);
        self.coarse
            .store(self.now_ns() + self.resolution_ns(), Ordering::Relaxed);
    }

    /// Marks the task stopped if nothing filed needs it; whether it did.
    /// Marked first, then the shards are looked at: a stream filed after
    /// its shard was looked at sees the mark (see `arm_new`).
    fn stop_if_idle(&self, control: &mut Control) -> bool {
        control.running = false;
        self.running.store(false, Ordering::Relaxed);
        if self.idle() {
            return true;
        }
        control.running = true;
        self.running.store(true, Ordering::Relaxed);
        false
    }

    /// Removes `state`'s filing, if any.
    pub(crate) fn disarm(&self, state: &Record) {
        // Always under the lock: a lock-free "not filed" check could miss a
        // concurrent re-filing by the sweeper on weakly ordered CPUs.
        let mut shard = self.shard(state.id.get());
        let old = state.timer_key.swap(NEVER, Ordering::Relaxed);
        if old != NEVER || self.file_all {
            shard.remove(&(old, state.id.get()));
        }
    }

    /// Spawns the sweeper task; `running` is already set.
    fn start(self: &Arc<Self>) {
        Ticker::start(self);
    }

    /// Nothing filed, or only streams without a deadline: no task needed.
    fn idle(&self) -> bool {
        (0..self.shards.len()).all(|shard| {
            self.shard_at(shard)
                .first_key_value()
                .is_none_or(|(key, _)| key.0 == NEVER)
        })
    }
}

impl Job for Sweeper {
    const NO_RUNTIME: &'static str =
        "no tokio runtime when a stream started: idle timeouts and lifetimes are not enforced";

    fn ticker(&self) -> &Ticker {
        &self.ticker
    }

    fn run(lease: Lease<Self>) -> impl Future<Output = ()> + Send + 'static {
        run(lease)
    }

    fn still_needed(&self) -> bool {
        !self.stop_if_idle(&mut self.control())
    }

    fn stopped(&self) {
        let mut control = self.control();
        control.running = false;
        self.running.store(false, Ordering::Relaxed);
        // As in `stop_if_idle`: the shards' locks taken after the mark, so
        // that a stream filed in a shard after this sees it (and starts the
        // task again) rather than an old `running`.
        self.idle();
    }
}

async fn run(mut lease: Lease<Sweeper>) {
    let sweeper = Arc::clone(lease.job());
    let mut ticks = tokio::time::interval(sweeper.resolution);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut expired: Vec<(Arc<Record>, Ending)> = Vec::new();
    let mut later: Vec<Arc<Record>> = Vec::new();
    let resolution = sweeper.resolution_ns();
    loop {
        ticks.tick().await;
        let now = sweeper.now_ns();
        let published = sweeper
            .coarse
            .swap(now.saturating_add(resolution), Ordering::Relaxed);
        // Late by more than a quarter tick plus tokio's timer granularity
        // (1 ms), which every tick may be.
        if now.saturating_sub(published) > resolution / 4 + 1_000_000 {
            let keep_for = sweeper
                .max_idle
                .load(Ordering::Relaxed)
                .saturating_add(resolution);
            sweeper.control().late.record(published, now, keep_for);
        }
        // Shard by shard, due entries are taken in batches, the locks
        // released in between: at a deadline shared by many streams, stream
        // starts and ends on other threads wait for one batch at most, not
        // for all of them. Streams to file again wait until every batch is
        // taken, and the batches of a shard stop at the entry count seen
        // first: however entries come and go meanwhile, a tick ends.
        for shard in 0..sweeper.shards.len() {
            let mut budget = usize::MAX;
            loop {
                let control = sweeper.control();
                let mut entries = sweeper.shard_at(shard);
                if budget == usize::MAX {
                    budget = entries.len();
                }
                let mut taken = 0;
                while taken < SWEEP_BATCH.min(budget) {
                    let Some(entry) = entries.first_entry() else {
                        break;
                    };
                    if entry.key().0 > now {
                        break;
                    }
                    taken += 1;
                    let weak = entry.remove();
                    if let Some(state) = weak.upgrade() {
                        state.timer_key.store(NEVER, Ordering::Relaxed);
                        match state.check(now, &control.late) {
                            Verdict::Expired(ending) => expired.push((state, ending)),
                            Verdict::Later => later.push(state),
                        }
                    }
                }
                drop(entries);
                drop(control);
                budget -= taken;
                // Ending a stream wakes tasks and emits its event: never
                // under a lock. Subscribers' panics are caught where they
                // are called; this catches what else runs there (a tracing
                // layer), so that one panic cannot drop every stream this
                // task holds unfiled in `expired` and `later`, never to be
                // checked again.
                for (state, ending) in expired.drain(..) {
                    let ended = std::panic::catch_unwind(AssertUnwindSafe(|| state.end(ending)));
                    if ended.is_err() {
                        tracing::error!(
                            target: "tower_stream_guard",
                            stream_id = state.id.get(),
                            "ending a stream panicked; the timer goes on"
                        );
                    }
                }
                if taken < SWEEP_BATCH || budget == 0 {
                    break;
                }
            }
        }
        for state in later.drain(..) {
            sweeper.arm(&state);
        }
        // Marked stopped before the shards are looked at (under their
        // locks): a stream filed after its shard's look sees the mark and
        // starts a new task rather than relying on this one.
        let mut control = sweeper.control();
        if sweeper.stop_if_idle(&mut control) {
            lease.finish();
            return;
        }
    }
}

/// The wall clock, ns since the Unix epoch (0 before it).
fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| u64::try_from(since.as_nanos()).unwrap_or(NEVER))
}
