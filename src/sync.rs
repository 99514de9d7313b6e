//! Small pieces of infrastructure every family uses, written once: a lock
//! that survives a poisoning panic, nanosecond time stamps, and the wait for
//! a condition that a [`Notify`] announces.

use std::{
    sync::{Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use tokio::sync::Notify;

/// "No deadline" in a nanosecond field: every real time stamp is below it.
pub(crate) const NEVER: u64 = u64::MAX;

/// Locks `mutex`, poisoned or not. Every lock of this crate guards data that
/// no panic can leave half-updated (the critical sections call no user code
/// and update with single inserts and removals), so a poisoned lock is still
/// consistent, and a panic elsewhere must not stop the guards.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
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
            Arc,
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
        *lock(&mutex) += 1;
        assert_eq!(*lock(&mutex), 2);
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
