//! A stream waiting for cap slots (`cap_wait`): the queues of a cap set,
//! a stream's place in one, the hand-over it waits for, and its patience.
//!
//! A stream arrives when the guard service's `call` runs: that is when it
//! takes its arrival number and its place in the queue of what refused it,
//! and when its patience starts, however late its response future is
//! first polled. A release hands its slots to the first waiter that can use
//! them (see `cap.rs`); the waiter only learns of it (one flag, one waker).
//!
//! A stream capped by several sets (the layer's and its route's) waits in
//! one at a time, holding nothing: handed the slots of one, it takes the
//! others' on the spot or, refused by one, gives back what it took and
//! queues there, under the arrival number it came with. So it keeps its
//! place in every queue it moves to.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64 as Counter, Ordering},
    },
    task::{Context, Poll, ready},
};

use tokio::time::{Instant, Sleep};

use super::cap::{CapPermit, CapSet, Origin, Queueing, Refusal};
use crate::{
    end::StreamCap,
    peer::ConnectionKey,
    sync::{AtomicBool, AtomicWaker},
};

/// A stream in a queue.
pub(super) struct Entry {
    /// Its arrival number: queues are ordered by it.
    pub(super) arrival: u64,
    pub(super) origin: Origin,
    /// Where the slots it is handed are announced.
    pub(super) grant: Arc<Grant>,
}

/// What a waiting stream waits for: a slot of its connection, of its peer or
/// of the total.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum WaitKey {
    Connection(ConnectionKey),
    Peer(IpAddr),
    Total,
}

impl WaitKey {
    /// The queue of `cap` for a stream from `origin`; `None` when the
    /// stream lacks the key (it is refused, it never waits).
    pub(super) fn of(cap: StreamCap, origin: &Origin) -> Option<Self> {
        match cap {
            StreamCap::PerConnection => origin.connection.map(WaitKey::Connection),
            StreamCap::PerPeer => origin.peer.map(WaitKey::Peer),
            StreamCap::Total => Some(WaitKey::Total),
        }
    }
}

/// The streams waiting in one cap set, by what refused them, each queue in
/// arrival order; a queue lives while some stream waits in it.
#[derive(Default)]
pub(super) struct Queues {
    by_key: HashMap<WaitKey, VecDeque<Entry>>,
    /// Which queue each waiting stream is in, by its arrival number.
    places: HashMap<u64, WaitKey>,
}

impl Queues {
    /// Puts `entry` in the queue of `key`, in arrival order.
    pub(super) fn insert(&mut self, key: WaitKey, entry: Entry) {
        self.places.insert(entry.arrival, key);
        let queue = self.by_key.entry(key).or_default();
        let at = queue.partition_point(|queued| queued.arrival < entry.arrival);
        queue.insert(at, entry);
    }

    /// Takes the stream `arrival` out of its queue.
    pub(super) fn remove(&mut self, arrival: u64) -> Option<Entry> {
        let key = self.places.remove(&arrival)?;
        let queue = self.by_key.get_mut(&key)?;
        let at = queue
            .binary_search_by_key(&arrival, |queued| queued.arrival)
            .ok()?;
        let entry = queue.remove(at);
        if queue.is_empty() {
            self.by_key.remove(&key);
        }
        entry
    }

    /// The arrival number of the first stream in the queue of `key`.
    pub(super) fn first(&self, key: WaitKey) -> Option<u64> {
        Some(self.by_key.get(&key)?.front()?.arrival)
    }

    /// Map entries held (for leak checks).
    #[cfg(any(test, feature = "test-view"))]
    pub(super) fn entries(&self) -> usize {
        self.by_key.len() + self.places.len()
    }
}

/// Where a queued stream learns that slots were handed to it.
pub(crate) struct Grant {
    given: AtomicBool,
    waker: AtomicWaker,
}

impl Default for Grant {
    fn default() -> Self {
        Grant {
            given: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        }
    }
}

impl Grant {
    /// The slots were taken for the stream (under its set's lock): tells it.
    pub(super) fn give(&self) {
        self.given.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn poll_given(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.given.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // Registered before the second look: a `give` in between wakes it.
        if self.given.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// A place in one set's queue. Dropped, it leaves the queue, or gives back
/// the slots it was handed and not taken.
pub(crate) struct Queued {
    pub(super) caps: Arc<CapSet>,
    pub(super) arrival: u64,
    pub(super) origin: Origin,
    pub(super) grant: Arc<Grant>,
    /// The cap that refused the stream when it queued.
    pub(super) cap: StreamCap,
}

impl Queued {
    /// The slots handed over (the grant was given).
    fn into_permit(self) -> CapPermit {
        let permit = self.caps.handed(&self.origin);
        // Not dropped: the place was left by the hand-over.
        std::mem::forget(self);
        permit
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        if !self.caps.leave(self.arrival) {
            // Handed its slots meanwhile: they go to the next in line.
            self.caps.handed(&self.origin).release();
        }
    }
}

/// Arrival numbers: the order of `call`s that had to wait, process-wide, so
/// that queues of different sets agree on it.
static ARRIVALS: Counter = Counter::new(0);

/// A stream's wait for a slot in every one of its sets. Cancel-safe:
/// dropping it takes nothing (and gives back whatever it was handed).
pub(crate) struct Wait {
    sets: Vec<Arc<CapSet>>,
    origin: Origin,
    arrival: u64,
    /// The latest refusal: what the stream is refused with if it gives up.
    refusal: Refusal,
    queued: Option<(usize, Queued)>,
    /// Decided when it started (a slot came free before it could queue, or
    /// a set lacks its key).
    done: Option<Result<Vec<CapPermit>, Refusal>>,
}

impl Wait {
    /// A stream whose first try `refusal` refused arrives: it queues now.
    pub(crate) fn start(sets: Vec<Arc<CapSet>>, origin: Origin, refusal: Refusal) -> Self {
        let mut wait = Wait {
            sets,
            origin,
            arrival: ARRIVALS.fetch_add(1, Ordering::Relaxed),
            refusal,
            queued: None,
            done: None,
        };
        wait.done = wait.advance(None);
        wait
    }

    /// Takes a slot in every set but `held`'s (whose slot it holds), in set
    /// order; refused by one, gives back what it took and queues there.
    /// `None` while queued.
    fn advance(
        &mut self,
        mut held: Option<(usize, CapPermit)>,
    ) -> Option<Result<Vec<CapPermit>, Refusal>> {
        let mut permits = Vec::with_capacity(self.sets.len());
        for (set, caps) in self.sets.iter().enumerate() {
            if held.as_ref().is_some_and(|(index, _)| *index == set) {
                permits.extend(held.take().map(|(_, permit)| permit));
                continue;
            }
            let outcome = match caps.acquire_or_queue(&self.origin, self.arrival) {
                Queueing::Admitted(permit) => {
                    permits.push(permit);
                    continue;
                }
                Queueing::Queued(queued) => {
                    self.refusal = Refusal::new(&self.sets, set, queued.cap);
                    self.queued = Some((set, queued));
                    None
                }
                Queueing::Refused(cap) => Some(Err(Refusal::new(&self.sets, set, cap))),
            };
            permits.into_iter().for_each(CapPermit::release);
            if let Some((_, permit)) = held {
                permit.release();
            }
            return outcome;
        }
        Some(Ok(permits))
    }

    /// The refusal a stream that stops waiting now gets.
    pub(crate) fn refusal(&self) -> Refusal {
        self.refusal
    }
}

impl Future for Wait {
    type Output = Result<Vec<CapPermit>, Refusal>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Some(done) = this.done.take() {
            return Poll::Ready(done);
        }
        loop {
            let Some((_, queued)) = &this.queued else {
                // Resolved already: polled again, it only refuses.
                return Poll::Ready(Err(this.refusal));
            };
            ready!(queued.grant.poll_given(cx));
            let held = this
                .queued
                .take()
                .map(|(set, queued)| (set, queued.into_permit()));
            if let Some(done) = this.advance(held) {
                return Poll::Ready(done);
            }
        }
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        if let Some(Ok(permits)) = self.done.take() {
            permits.into_iter().for_each(CapPermit::release);
        }
    }
}

/// A [`Wait`] with its patience: refused with the latest refusal when its
/// deadline passes first.
pub(crate) struct Admission {
    wait: Wait,
    deadline: Instant,
    /// Made at the first poll: `call` may run outside a runtime.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Admission {
    /// Waits until `deadline` (set from the stream's arrival).
    pub(crate) fn new(wait: Wait, deadline: Instant) -> Self {
        Admission {
            wait,
            deadline,
            sleep: None,
        }
    }

    /// Tries at once, then waits up to `patience` from now.
    #[cfg(test)]
    pub(crate) fn within(
        sets: Vec<Arc<CapSet>>,
        origin: Origin,
        patience: std::time::Duration,
    ) -> Self {
        let deadline = Instant::now() + patience;
        let wait = match super::cap::try_acquire_all(&sets, &origin) {
            Ok(permits) => Wait {
                sets,
                origin,
                arrival: ARRIVALS.fetch_add(1, Ordering::Relaxed),
                refusal: Refusal {
                    cap: StreamCap::Total,
                    limit: 0,
                    set: 0,
                },
                queued: None,
                done: Some(Ok(permits)),
            },
            Err(refusal) => Wait::start(sets, origin, refusal),
        };
        Admission::new(wait, deadline)
    }
}

impl Future for Admission {
    type Output = Result<Vec<CapPermit>, Refusal>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Poll::Ready(admitted) = Pin::new(&mut this.wait).poll(cx) {
            return Poll::Ready(admitted);
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        ready!(sleep.as_mut().poll(cx));
        // Out of patience: out of the queue now, not when dropped.
        this.wait.queued = None;
        Poll::Ready(Err(this.wait.refusal()))
    }
}
