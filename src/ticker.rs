//! Keeping a guard's timer task alive while any runtime that uses the guard
//! is alive.
//!
//! A guard's timer (the stream sweeper, the connection guard's ticker) is one
//! tokio task, spawned on whichever runtime first filed work. A guard can be
//! shared by several runtimes (a runtime per core, a runtime per test); when
//! the runtime running the task shuts down, tokio drops the task, and work
//! filed from the other runtimes would never come due. So a [`Ticker`]
//! remembers the runtimes that filed work, and when its task is dropped with
//! work still filed, restarts it on another remembered runtime.
//!
//! Remembering costs, on the filing path only: a thread-local lookup and, in
//! a task the ticker has seen already, nothing more; otherwise the current
//! runtime's handle and a short lock. A spawn on a runtime that has shut down
//! drops the future on the spot: [`Ticker::start`] notices (without
//! recursing), forgets that runtime and tries the next. No lock is held while
//! spawning or while a task is dropped.
//!
//! This module imports nothing from the rest of the crate: the timers plug in
//! through [`Job`].

use std::{
    cell::Cell,
    future::Future,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
};

use tokio::runtime::{Handle, Id};

/// How many runtimes a ticker remembers at most: the one remembered longest
/// ago is forgotten first.
pub(crate) const RUNTIMES_KEPT: usize = 16;

/// Source of [`Ticker::epoch`] values: unique in the process.
static EPOCHS: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// (ticker epoch, task) the current runtime was last noted for on this
    /// thread: a task never changes runtime, so the same task needs no new
    /// look-up while the ticker forgot nothing.
    static NOTED: Cell<(u64, Option<tokio::task::Id>)> = const { Cell::new((0, None)) };
}

/// A timer that a [`Ticker`] keeps running.
pub(crate) trait Job: Send + Sync + Sized + 'static {
    /// Warned once when work is filed outside any runtime and no remembered
    /// runtime can run the timer.
    const NO_RUNTIME: &'static str;

    /// The ticker of this job.
    fn ticker(&self) -> &Ticker;

    /// The task's body. It runs until nothing is filed; then, under the
    /// job's own lock, it marks the job stopped and calls
    /// [`Lease::finish`].
    fn run(lease: Lease<Self>) -> impl Future<Output = ()> + Send + 'static;

    /// The task went away before finishing (its runtime shut down). Under
    /// the job's lock: with work still filed, leave the job marked running
    /// and say `true` (it is restarted); otherwise mark it stopped.
    fn still_needed(&self) -> bool;

    /// No runtime could take the task: mark the job stopped, so that the next
    /// filing starts it again.
    fn stopped(&self);
}

/// The runtimes one guard's timer may run on.
pub(crate) struct Ticker {
    /// Changes (to a fresh process-unique value) whenever a runtime is
    /// forgotten, which invalidates the thread-local [`NOTED`] caches.
    epoch: AtomicU64,
    runtimes: Mutex<Vec<(Id, Handle)>>,
    warned_no_runtime: AtomicBool,
}

impl Default for Ticker {
    fn default() -> Self {
        Ticker {
            epoch: AtomicU64::new(EPOCHS.fetch_add(1, Ordering::Relaxed)),
            runtimes: Mutex::new(Vec::new()),
            warned_no_runtime: AtomicBool::new(false),
        }
    }
}

impl Ticker {
    fn lock(&self) -> MutexGuard<'_, Vec<(Id, Handle)>> {
        // Every update is a single push or removal: never half-done.
        self.runtimes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers the current runtime, if any, as one the timer may run on.
    /// Call it where work is filed from outside the timer.
    #[inline]
    pub(crate) fn note_current(&self) {
        let task = tokio::task::try_id();
        let epoch = self.epoch.load(Ordering::Relaxed);
        if task.is_some() && NOTED.get() == (epoch, task) {
            return;
        }
        self.note_slow(epoch, task);
    }

    #[cold]
    fn note_slow(&self, epoch: u64, task: Option<tokio::task::Id>) {
        let Ok(runtime) = Handle::try_current() else {
            return;
        };
        let id = runtime.id();
        {
            let mut runtimes = self.lock();
            if !runtimes.iter().any(|(known, _)| *known == id) {
                if runtimes.len() >= RUNTIMES_KEPT {
                    runtimes.remove(0);
                    self.forgot();
                }
                runtimes.push((id, runtime));
            }
        }
        NOTED.set((epoch, task));
    }

    fn forgot(&self) {
        self.epoch
            .store(EPOCHS.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
    }

    fn forget(&self, id: Id) {
        let forgotten = {
            let mut runtimes = self.lock();
            let at = runtimes.iter().position(|(known, _)| *known == id);
            at.map(|at| runtimes.remove(at))
        };
        if forgotten.is_some() {
            self.forgot();
        }
        // The handle is dropped here, without the lock.
        drop(forgotten);
    }

    /// Spawns `job`'s task (the job is already marked running): on the
    /// current runtime if there is one, else on a remembered one that is
    /// still alive. With no runtime at all, marks the job stopped and warns
    /// once.
    pub(crate) fn start<J: Job>(job: &Arc<J>) {
        let current = Handle::try_current().ok();
        let had_current = current.is_some();
        if !Self::start_on(job, current, None)
            && !had_current
            && !job.ticker().warned_no_runtime.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(target: "tower_stream_guard", "{}", J::NO_RUNTIME);
        }
    }

    /// Tries `first`, then the remembered runtimes (newest first), skipping
    /// `except`; forgets each that refuses the task. Whether one took it;
    /// if none did, the job is marked stopped.
    fn start_on<J: Job>(job: &Arc<J>, mut first: Option<Handle>, except: Option<Id>) -> bool {
        let ticker = job.ticker();
        loop {
            let runtime = match first.take() {
                Some(runtime) => runtime,
                None => {
                    let runtimes = ticker.lock();
                    let found = runtimes
                        .iter()
                        .rev()
                        .find(|(id, _)| Some(*id) != except)
                        .map(|(_, runtime)| runtime.clone());
                    drop(runtimes);
                    match found {
                        Some(runtime) => runtime,
                        None => {
                            job.stopped();
                            return false;
                        }
                    }
                }
            };
            let id = runtime.id();
            if Some(id) == except {
                continue;
            }
            let spawn = Arc::new(AtomicU8::new(SPAWNING));
            let lease = Lease {
                job: Arc::clone(job),
                runtime: id,
                spawn: Arc::clone(&spawn),
                live: true,
            };
            // No lock held: a runtime that has shut down drops the future
            // (and its lease) inside this call.
            drop(runtime.spawn(J::run(lease)));
            drop(runtime);
            if spawn
                .compare_exchange(SPAWNING, SPAWNED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return true;
            }
            // Refused: that runtime is gone (or going).
            ticker.forget(id);
        }
    }
}

/// The lease is inside `Runtime::spawn`: a drop now means the runtime
/// refused the task, and `start_on` deals with it.
const SPAWNING: u8 = 0;
/// The spawn returned with the task alive: a drop is the lease's to handle.
const SPAWNED: u8 = 1;
/// Dropped inside the spawn.
const REFUSED: u8 = 2;

/// Held by a running timer task: if the task is dropped before it finishes
/// (its runtime shutting down), the job moves to another runtime or is
/// marked stopped, so that the next filing starts it again.
pub(crate) struct Lease<J: Job> {
    job: Arc<J>,
    runtime: Id,
    spawn: Arc<AtomicU8>,
    live: bool,
}

impl<J: Job> Lease<J> {
    /// The job this task runs.
    pub(crate) fn job(&self) -> &Arc<J> {
        &self.job
    }

    /// The task is finishing of its own accord; call under the job's lock,
    /// right where the job is marked stopped.
    pub(crate) fn finish(&mut self) {
        self.live = false;
    }
}

impl<J: Job> Drop for Lease<J> {
    fn drop(&mut self) {
        if !self.live {
            return;
        }
        if self
            .spawn
            .compare_exchange(SPAWNING, REFUSED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            // Refused inside `start_on`, which tries the next runtime.
            return;
        }
        if std::thread::panicking() {
            // It would panic again wherever it went: the next filing starts
            // it afresh.
            self.job.stopped();
            return;
        }
        if !self.job.still_needed() {
            return;
        }
        // The runtime that ran the task is shutting down: anywhere else.
        self.job.ticker().forget(self.runtime);
        Ticker::start_on(&self.job, None, Some(self.runtime));
    }
}
