//! Small pieces of infrastructure every family uses, written once: a lock
//! that survives a poisoning panic, nanosecond time stamps, the wait for a
//! condition that a [`Notify`] announces, and the atomics, locks and waker
//! slots of the stream's end protocol.
//!
//! Those come from here rather than from `std` so that the loom models
//! (`stream/loom_tests.rs`, built with `RUSTFLAGS="--cfg stream_guard_loom"`) can swap in
//! loom's versions, which explore every interleaving of the threads that
//! touch them. The normal build re-exports `std`'s (and `atomic-waker`'s)
//! types unchanged. Only what the models reach is swapped: a stream's record
//! and its ending, the timer's locks (held while it touches the record), the
//! cap slots and the counts a drain reads; `Arc` stays `std`'s (the timer
//! holds `Weak`s, which loom does not have).

use std::{sync::PoisonError, time::Duration};

use tokio::sync::Notify;

#[cfg(not(stream_guard_loom))]
pub(crate) use atomic_waker::AtomicWaker;
#[cfg(stream_guard_loom)]
pub(crate) use loom::sync::{
    Mutex, MutexGuard,
    atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, fence},
};
#[cfg(not(stream_guard_loom))]
pub(crate) use std::sync::{
    Mutex, MutexGuard,
    atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, fence},
};

/// A waker slot with `atomic-waker`'s interface over loom's, whose
/// registrations and wake-ups loom sees.
#[cfg(stream_guard_loom)]
#[derive(Debug, Default)]
pub(crate) struct AtomicWaker(loom::future::AtomicWaker);

#[cfg(stream_guard_loom)]
impl AtomicWaker {
    pub(crate) fn new() -> Self {
        AtomicWaker(loom::future::AtomicWaker::new())
    }

    pub(crate) fn register(&self, waker: &std::task::Waker) {
        self.0.register_by_ref(waker);
    }

    pub(crate) fn wake(&self) {
        self.0.wake();
    }
}

/// A lock [`lock`] takes: `std`'s, and under loom also loom's (the crate's
/// other locks stay `std`'s).
pub(crate) trait Lock {
    type Guard<'a>
    where
        Self: 'a;

    fn lock_unpoisoned(&self) -> Self::Guard<'_>;
}

impl<T: ?Sized> Lock for std::sync::Mutex<T> {
    type Guard<'a>
        = std::sync::MutexGuard<'a, T>
    where
        Self: 'a;

    #[inline]
    fn lock_unpoisoned(&self) -> Self::Guard<'_> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(stream_guard_loom)]
impl<T> Lock for loom::sync::Mutex<T> {
    type Guard<'a>
        = loom::sync::MutexGuard<'a, T>
    where
        Self: 'a;

    fn lock_unpoisoned(&self) -> Self::Guard<'_> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// "No deadline" in a nanosecond field: every real time stamp is below it.
pub(crate) const NEVER: u64 = u64::MAX;

/// Locks `mutex`, poisoned or not. Every lock of this crate guards data that
/// no panic can leave half-updated (the critical sections call no user code
/// and update with single inserts and removals), so a poisoned lock is still
/// consistent, and a panic elsewhere must not stop the guards.
#[inline]
pub(crate) fn lock<L: Lock + ?Sized>(mutex: &L) -> L::Guard<'_> {
    mutex.lock_unpoisoned()
}

/// `duration` in nanoseconds; [`NEVER`] for `None` or a duration too long to
/// count (past 584 years).
pub(crate) fn nanos(duration: Option<Duration>) -> u64 {
    duration.map_or(NEVER, |d| u64::try_from(d.as_nanos()).unwrap_or(NEVER))
}

/// Waits until `done()` holds, re-checking each time `notify` wakes its
/// waiters. Registered before every check, so a `notify_waiters` that follows
/// the change `done` looks at is never missed.
pub(crate) async fn wait_until(notify: &Notify, done: impl Fn() -> bool) {
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if done() {
            return;
        }
        notified.await;
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc, Mutex,
            atomic::{AtomicBool, Ordering},
        },
        time::Duration,
    };

    use super::*;

    #[test]
    fn a_poisoned_lock_is_still_usable() {
        let mutex = Arc::new(Mutex::new(1));
        let poisoner = Arc::clone(&mutex);
        let _ = std::thread::spawn(move || {
            let _held = poisoner.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(mutex.is_poisoned());
        *lock(&*mutex) += 1;
        assert_eq!(*lock(&*mutex), 2);
    }

    #[test]
    fn durations_too_long_to_count_are_never() {
        assert_eq!(nanos(Some(Duration::from_millis(2))), 2_000_000);
        assert_eq!(nanos(None), NEVER);
        assert_eq!(nanos(Some(Duration::MAX)), NEVER);
    }

    #[tokio::test]
    async fn a_change_announced_after_the_check_is_not_missed() {
        let notify = Arc::new(Notify::new());
        let flag = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (notify, flag) = (Arc::clone(&notify), Arc::clone(&flag));
            tokio::spawn(async move {
                wait_until(&notify, || flag.load(Ordering::Acquire)).await;
            })
        };
        tokio::task::yield_now().await;
        flag.store(true, Ordering::Release);
        notify.notify_waiters();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
    }
}
