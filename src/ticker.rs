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
//! When the task must move, it goes to a runtime that runs tasks on its own
//! (multi-thread) before one that runs them only while some thread blocks on
//! it (current-thread), and among those to the one that filed work most
//! recently. Which current-thread runtime is still being driven cannot be
//! told: one kept alive but idle may still get the task when it filed last.
//!
//! Remembering costs, on the filing path only: the current runtime's handle
//! and a scan of a few atomics, without a lock, for a runtime already
//! remembered (whatever task or connection files); a short lock the first
//! time a runtime files. With more runtimes than [`RUNTIMES_KEPT`], the one
//! that filed least recently is forgotten, and only that one. A spawn on a runtime that has shut down
//! drops the future on the spot: [`Ticker::start`] notices (without
//! recursing), forgets that runtime and tries the next. No lock is held while
//! spawning or while a task is dropped.
//!
//! This module imports nothing from the rest of the crate but its lock
//! helper: the timers plug in through [`Job`].

use std::{
    array,
    hash::{Hash, Hasher},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
};

use tokio::runtime::{Handle, Id, RuntimeFlavor};

/// How many runtimes a ticker remembers at most: the one that filed work
/// least recently is forgotten first.
pub(crate) const RUNTIMES_KEPT: usize = 16;

/// A slot's key while it remembers no runtime.
const EMPTY: u64 = 0;

/// One remembered runtime, readable without the lock.
struct Slot {
    /// [`key_of`] the runtime's id, or [`EMPTY`]. Written only under the
    /// ticker's lock, read without it.
    key: AtomicU64,
    /// When the runtime last filed work, on the ticker's [`Ticker::clock`]:
    /// the timer moves to the runtime that filed most recently.
    filed: AtomicU64,
}

/// A runtime id as a `u64` that an atomic can hold: tokio's `Id` is a
/// `NonZeroU64` that hashes as that one integer, so the key is exact and
/// never [`EMPTY`].
fn key_of(id: Id) -> u64 {
    /// Keeps what `Id` hashes as; any other shape is folded in, still
    /// deterministic, should tokio ever hash more than one integer.
    struct Capture(u64);
    impl Hasher for Capture {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for byte in bytes {
                self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        fn write_u64(&mut self, n: u64) {
            self.0 = if self.0 == 0 {
                n
            } else {
                (self.0 ^ n).wrapping_mul(0x0100_0000_01b3)
            };
        }
    }
    let mut capture = Capture(0);
    id.hash(&mut capture);
    match capture.0 {
        EMPTY => 1,
        key => key,
    }
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
    /// The remembered runtimes' keys and filing times, checked without the
    /// lock by [`note_current`](Self::note_current).
    slots: [Slot; RUNTIMES_KEPT],
    /// The handles, at the index of their slot.
    runtimes: Mutex<[Option<(Id, Handle)>; RUNTIMES_KEPT]>,
    /// The key of the runtime that filed last: while the same runtime files
    /// again, nothing shared is written.
    latest: AtomicU64,
    /// Orders filings from different runtimes ([`Slot::filed`]); it moves
    /// only when filings switch runtime.
    clock: AtomicU64,
    warned_no_runtime: AtomicBool,
    /// Entries into the locked path of `note_current`, for tests.
    #[cfg(test)]
    slow_notes: std::sync::atomic::AtomicUsize,
}

impl Default for Ticker {
    fn default() -> Self {
        Ticker {
            slots: array::from_fn(|_| Slot {
                key: AtomicU64::new(EMPTY),
                filed: AtomicU64::new(0),
            }),
            runtimes: Mutex::new(array::from_fn(|_| None)),
            latest: AtomicU64::new(EMPTY),
            clock: AtomicU64::new(0),
            warned_no_runtime: AtomicBool::new(false),
            #[cfg(test)]
            slow_notes: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

/// The remembered runtimes, by slot.
type Runtimes = [Option<(Id, Handle)>; RUNTIMES_KEPT];

impl Ticker {
    fn lock(&self) -> MutexGuard<'_, Runtimes> {
        crate::sync::lock(&self.runtimes)
    }

    /// Remembers the current runtime, if any, as one the timer may run on,
    /// and that it filed work now. Call it where work is filed from outside
    /// the timer.
    ///
    /// A runtime already remembered costs no lock: the current handle, a
    /// scan of [`RUNTIMES_KEPT`] atomics and, only when the last filing came
    /// from another runtime, two shared stores.
    #[inline]
    pub(crate) fn note_current(&self) {
        let Ok(runtime) = Handle::try_current() else {
            return;
        };
        let key = key_of(runtime.id());
        if self.latest.load(Ordering::Relaxed) == key {
            return;
        }
        match self
            .slots
            .iter()
            .find(|slot| slot.key.load(Ordering::Relaxed) == key)
        {
            Some(slot) => self.filed(slot, key),
            None => self.note_slow(runtime, key),
        }
    }

    /// `slot`'s runtime (`key`) filed work now.
    fn filed(&self, slot: &Slot, key: u64) {
        let now = self.clock.fetch_add(1, Ordering::Relaxed) + 1;
        slot.filed.store(now, Ordering::Relaxed);
        self.latest.store(key, Ordering::Relaxed);
    }

    #[cold]
    fn note_slow(&self, runtime: Handle, key: u64) {
        #[cfg(test)]
        self.slow_notes.fetch_add(1, Ordering::Relaxed);
        let id = runtime.id();
        let evicted = {
            let mut runtimes = self.lock();
            if let Some(at) = self
                .slots
                .iter()
                .position(|slot| slot.key.load(Ordering::Relaxed) == key)
            {
                // Remembered by another thread meanwhile.
                self.filed(&self.slots[at], key);
                return;
            }
            // An empty slot, else the runtime that filed least recently.
            let at = (0..RUNTIMES_KEPT)
                .min_by_key(|at| match runtimes[*at] {
                    None => (false, 0),
                    Some(_) => (true, self.slots[*at].filed.load(Ordering::Relaxed)),
                })
                .unwrap_or(0);
            let evicted = runtimes[at].replace((id, runtime));
            if let Some((gone, _)) = &evicted {
                let _ = self.latest.compare_exchange(
                    key_of(*gone),
                    EMPTY,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            self.slots[at].key.store(key, Ordering::Relaxed);
            self.filed(&self.slots[at], key);
            evicted
        };
        // The handle is dropped here, without the lock.
        drop(evicted);
    }

    fn forget(&self, id: Id) {
        let key = key_of(id);
        let forgotten = {
            let mut runtimes = self.lock();
            let at = runtimes
                .iter()
                .position(|known| matches!(known, Some((known, _)) if *known == id));
            at.and_then(|at| {
                self.slots[at].key.store(EMPTY, Ordering::Relaxed);
                runtimes[at].take()
            })
        };
        let _ = self
            .latest
            .compare_exchange(key, EMPTY, Ordering::Relaxed, Ordering::Relaxed);
        // The handle is dropped here, without the lock.
        drop(forgotten);
    }

    /// The runtime the timer should move to, skipping `except`: one that
    /// runs tasks on its own (multi-thread) before one that runs them only
    /// while a thread blocks on it, then the one that filed most recently.
    fn choose(&self, except: Option<Id>) -> Option<Handle> {
        let runtimes = self.lock();
        runtimes
            .iter()
            .zip(&self.slots)
            .filter_map(|(known, slot)| match known {
                Some((id, runtime)) if Some(*id) != except => Some((runtime, slot)),
                _ => None,
            })
            .max_by_key(|(runtime, slot)| {
                (
                    runtime.runtime_flavor() == RuntimeFlavor::MultiThread,
                    slot.filed.load(Ordering::Relaxed),
                )
            })
            .map(|(runtime, _)| runtime.clone())
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

    /// Tries `first`, then the remembered runtimes (best first, see
    /// [`choose`](Self::choose)), skipping
    /// `except`; forgets each that refuses the task. Whether one took it;
    /// if none did, the job is marked stopped.
    fn start_on<J: Job>(job: &Arc<J>, mut first: Option<Handle>, except: Option<Id>) -> bool {
        let ticker = job.ticker();
        loop {
            let runtime = match first.take() {
                Some(runtime) => runtime,
                None => {
                    let found = ticker.choose(except);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    fn slow(ticker: &Ticker) -> usize {
        ticker.slow_notes.load(Ordering::Relaxed)
    }

    /// One task serving several connections of two guards, as hyper's
    /// connection tasks call each stream's `call`: after the first filing
    /// per guard, none takes the lock.
    #[test]
    fn a_remembered_runtime_is_noted_without_the_lock() {
        let one = Arc::new(Ticker::default());
        let two = Arc::new(Ticker::default());
        let runtime = current_thread();
        runtime.block_on(async {
            let tasks: Vec<_> = (0..4)
                .map(|_| {
                    let (one, two) = (Arc::clone(&one), Arc::clone(&two));
                    tokio::spawn(async move {
                        for _ in 0..8 {
                            one.note_current();
                            two.note_current();
                            tokio::task::yield_now().await;
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
            // Outside any task, in the runtime's context.
            one.note_current();
        });
        assert_eq!(slow(&one), 1);
        assert_eq!(slow(&two), 1);
    }

    /// Runtimes filing in turn stay remembered without the lock.
    #[test]
    fn runtimes_filing_in_turn_take_no_lock() {
        let ticker = Ticker::default();
        let runtimes: Vec<_> = (0..3).map(|_| current_thread()).collect();
        for _ in 0..5 {
            for runtime in &runtimes {
                let _entered = runtime.enter();
                ticker.note_current();
            }
        }
        assert_eq!(slow(&ticker), 3);
    }

    /// Past [`RUNTIMES_KEPT`], the runtime that filed least recently is
    /// forgotten, and the others stay remembered.
    #[test]
    fn the_runtime_that_filed_least_recently_is_forgotten() {
        let ticker = Ticker::default();
        let runtimes: Vec<_> = (0..=RUNTIMES_KEPT).map(|_| current_thread()).collect();
        let note = |at: usize| {
            let _entered = runtimes[at].enter();
            ticker.note_current();
        };
        for at in 0..RUNTIMES_KEPT {
            note(at);
        }
        // The first filed again: the second is now the least recent.
        note(0);
        assert_eq!(slow(&ticker), RUNTIMES_KEPT);
        note(RUNTIMES_KEPT);
        assert_eq!(slow(&ticker), RUNTIMES_KEPT + 1);
        for at in (0..=RUNTIMES_KEPT).filter(|at| *at != 1) {
            note(at);
        }
        assert_eq!(slow(&ticker), RUNTIMES_KEPT + 1, "no churn");
        note(1);
        assert_eq!(slow(&ticker), RUNTIMES_KEPT + 2, "the second was forgotten");
    }

    /// A forgotten runtime is remembered again by its next filing.
    #[test]
    fn a_forgotten_runtime_is_remembered_again() {
        let ticker = Ticker::default();
        let runtime = current_thread();
        let _entered = runtime.enter();
        ticker.note_current();
        ticker.forget(runtime.handle().id());
        ticker.note_current();
        ticker.note_current();
        assert_eq!(slow(&ticker), 2);
        assert!(ticker.choose(None).is_some());
    }
}
