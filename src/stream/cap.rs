//! Stream caps that hold for a stream's whole life: per connection, per peer
//! IP and in total.
//!
//! A slot is taken when the request reaches the guard and given back when the
//! stream *ends*: its response body finished, errored or was dropped, a guard
//! fired (a stalled reader included: the timer releases it), or the response
//! future went away. tower's `ConcurrencyLimit` (tonic's
//! `concurrency_limit_per_connection`) gives its permit back when the
//! response headers are ready, so it never bounds open streams; this does.
//!
//! Keyed caps (per connection, per peer) are checked before the total is
//! taken, and the total is taken with a compare-and-swap that never goes past
//! its limit: a stream a cap refuses never holds, even for an instant, a slot
//! another stream could have had.
//!
//! Costs, per stream and only when caps are set: one atomic compare-and-swap
//! for the total, one short lock of a hash map for the keyed caps on the way in
//! and again on the way out. Nothing per frame. Map entries are removed when
//! their last stream ends, so closed connections and departed peers leave
//! nothing behind.
//!
//! With `cap_wait`, waiting streams queue (FIFO) on what refused them: their
//! connection, their peer or the total. A release frees one slot of each of
//! its connection, its peer and the total, so it wakes at most the first
//! waiter of each of those three queues: O(1) per release, however many
//! streams wait on other keys.

use std::{
    collections::HashMap,
    hash::Hash,
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::sync::Notify;

use crate::{
    end::StreamCap,
    peer::ConnectionKey,
    sync::{AtomicUsize, Mutex, MutexGuard, fence, lock},
};

/// The limits of one cap set; `None` is "no cap".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CapLimits {
    pub(crate) per_connection: Option<usize>,
    pub(crate) per_peer: Option<usize>,
    pub(crate) total: Option<usize>,
}

impl CapLimits {
    pub(crate) fn is_empty(&self) -> bool {
        *self == CapLimits::default()
    }

    pub(crate) fn get(&self, cap: StreamCap) -> Option<usize> {
        match cap {
            StreamCap::PerConnection => self.per_connection,
            StreamCap::PerPeer => self.per_peer,
            StreamCap::Total => self.total,
        }
    }

    pub(crate) fn set(&mut self, cap: StreamCap, limit: usize) {
        let slot = match cap {
            StreamCap::PerConnection => &mut self.per_connection,
            StreamCap::PerPeer => &mut self.per_peer,
            StreamCap::Total => &mut self.total,
        };
        *slot = Some(limit);
    }
}

/// Counts keyed by connection or peer; an entry lives while its count is not
/// zero.
struct Counts<K>(HashMap<K, usize>);

impl<K: Hash + Eq + Copy> Counts<K> {
    /// Whether `key` already holds `limit` slots.
    fn full(&self, key: K, limit: Option<usize>) -> bool {
        limit.is_some_and(|limit| self.0.get(&key).copied().unwrap_or(0) >= limit)
    }

    fn take(&mut self, key: K) {
        *self.0.entry(key).or_insert(0) += 1;
    }

    fn give_back(&mut self, key: K) {
        if let Some(count) = self.0.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                self.0.remove(&key);
            }
        }
    }

    fn snapshot(&self) -> Vec<(K, usize)> {
        self.0.iter().map(|(k, v)| (*k, *v)).collect()
    }
}

/// Both keyed counts of a cap set, under one lock: a stream takes it once
/// on the way in and once on the way out.
struct Maps {
    connections: Counts<ConnectionKey>,
    peers: Counts<IpAddr>,
    /// Streams waiting for a slot, by what refused them; an entry lives while
    /// some stream waits on it.
    queues: HashMap<WaitKey, WaitQueue>,
}

/// What a waiting stream waits for: a slot of its connection, of its peer or
/// of the total.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum WaitKey {
    Connection(ConnectionKey),
    Peer(IpAddr),
    Total,
}

impl WaitKey {
    fn of(cap: StreamCap, origin: &Origin) -> Self {
        match (cap, origin.connection, origin.peer) {
            (StreamCap::PerConnection, Some(key), _) => WaitKey::Connection(key),
            (StreamCap::PerPeer, _, Some(ip)) => WaitKey::Peer(ip),
            // A stream without the key a keyed cap needs is refused at once
            // and never waits; the total is the safe fallback (any release
            // wakes its first waiter).
            (StreamCap::PerConnection, None, _)
            | (StreamCap::PerPeer, _, None)
            | (StreamCap::Total, _, _) => WaitKey::Total,
        }
    }
}

/// The streams waiting on one [`WaitKey`]: a FIFO (`Notify::notify_one`
/// wakes the longest waiting; a woken waiter dropped before it ran passes
/// the wake on to the next).
struct WaitQueue {
    notify: Arc<Notify>,
    waiting: usize,
}

/// One set of caps with its counters: a guard layer's own, or a route's.
pub(crate) struct CapSet {
    limits: CapLimits,
    /// Count connections even without a per-connection cap (the layer's own
    /// set does, for `connection_streams`).
    track_connections: bool,
    total: AtomicUsize,
    maps: Mutex<Maps>,
    /// Streams waiting for a slot; releases look at the queues only when
    /// there are some.
    waiters: AtomicUsize,
}

/// Where a stream came from, as the caps see it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Origin {
    /// `None` when nothing identifies the connection: the per-connection
    /// cap refuses such a stream rather than pool it with others.
    pub(crate) connection: Option<ConnectionKey>,
    pub(crate) peer: Option<IpAddr>,
}

impl Origin {
    /// Whether `cap` refuses this stream for want of a key (no waiting
    /// helps).
    pub(crate) fn lacks_key_of(&self, cap: StreamCap) -> bool {
        match cap {
            StreamCap::PerConnection => self.connection.is_none(),
            StreamCap::PerPeer => self.peer.is_none(),
            StreamCap::Total => false,
        }
    }
}

/// A slot held in one [`CapSet`], given back by [`CapPermit::release`].
pub(crate) struct CapPermit {
    caps: Arc<CapSet>,
    connection: Option<ConnectionKey>,
    peer: Option<IpAddr>,
}

impl CapSet {
    pub(crate) fn new(limits: CapLimits, track_connections: bool) -> Self {
        CapSet {
            limits,
            track_connections: track_connections || limits.per_connection.is_some(),
            total: AtomicUsize::new(0),
            maps: Mutex::new(Maps {
                connections: Counts(HashMap::new()),
                peers: Counts(HashMap::new()),
                queues: HashMap::new(),
            }),
            waiters: AtomicUsize::new(0),
        }
    }

    /// Takes a slot in every cap of this set, or none and says which cap is
    /// full. A keyed cap refuses a stream whose key (connection or peer) is
    /// unknown: a cap per connection or per peer never becomes one shared by
    /// every unidentified stream. Without that cap, an unknown connection is
    /// only left out of the connection counts.
    ///
    /// The keyed caps are checked first and the total is taken last, under
    /// the same lock as the keyed slots: a stream refused by any cap never
    /// holds a slot, not even for an instant.
    pub(crate) fn try_acquire(self: &Arc<Self>, origin: &Origin) -> Result<CapPermit, StreamCap> {
        if self.limits.per_connection.is_some() && origin.connection.is_none() {
            return Err(StreamCap::PerConnection);
        }
        if self.limits.per_peer.is_some() && origin.peer.is_none() {
            return Err(StreamCap::PerPeer);
        }
        let peer = origin.peer.filter(|_| self.limits.per_peer.is_some());
        let connection = origin.connection.filter(|_| self.track_connections);
        if connection.is_some() || peer.is_some() {
            let mut maps = self.maps();
            if let Some(key) = connection
                && maps.connections.full(key, self.limits.per_connection)
            {
                return Err(StreamCap::PerConnection);
            }
            if let Some(ip) = peer
                && maps.peers.full(ip, self.limits.per_peer)
            {
                return Err(StreamCap::PerPeer);
            }
            self.take_total()?;
            if let Some(key) = connection {
                maps.connections.take(key);
            }
            if let Some(ip) = peer {
                maps.peers.take(ip);
            }
        } else {
            self.take_total()?;
        }
        Ok(CapPermit {
            caps: Arc::clone(self),
            connection,
            peer,
        })
    }

    /// Takes a total slot unless the total is at its limit. Never counts
    /// past the limit, even transiently.
    fn take_total(&self) -> Result<(), StreamCap> {
        // SeqCst, with the waiter count and the fences between each side's
        // write and read (see `Waiting::new` and `CapPermit::release`): a
        // waiter that counted itself before it looked at the total, and a
        // release that gave the total back before it looked at the waiter
        // count, cannot both miss each other.
        match self.limits.total {
            None => {
                self.total.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            Some(limit) => self
                .total
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n < limit).then_some(n + 1)
                })
                .map(drop)
                .map_err(|_| StreamCap::Total),
        }
    }

    /// Whether `key` has a free slot now.
    fn has_room(&self, key: WaitKey) -> bool {
        match key {
            WaitKey::Total => self
                .limits
                .total
                .is_none_or(|limit| self.total.load(Ordering::SeqCst) < limit),
            WaitKey::Connection(key) => !self
                .maps()
                .connections
                .full(key, self.limits.per_connection),
            WaitKey::Peer(ip) => !self.maps().peers.full(ip, self.limits.per_peer),
        }
    }

    /// Wakes the first stream waiting on `key`, if any.
    fn wake_one(&self, key: WaitKey) {
        if let Some(queue) = self.maps().queues.get(&key) {
            queue.notify.notify_one();
        }
    }

    /// Joins the queue of `key`; leaving it is dropping the result.
    fn enqueue(self: &Arc<Self>, key: WaitKey) -> Queued {
        let notify = {
            let mut maps = self.maps();
            let queue = maps.queues.entry(key).or_insert_with(|| WaitQueue {
                notify: Arc::new(Notify::new()),
                waiting: 0,
            });
            queue.waiting += 1;
            Arc::clone(&queue.notify)
        };
        Queued {
            caps: Arc::clone(self),
            key,
            notify,
        }
    }

    fn maps(&self) -> MutexGuard<'_, Maps> {
        lock(&self.maps)
    }

    /// Streams holding a slot here, per connection.
    pub(crate) fn connection_streams(&self) -> Vec<(ConnectionKey, usize)> {
        self.maps().connections.snapshot()
    }

    /// Streams holding a slot here, per peer (only with a per-peer cap).
    pub(crate) fn peer_streams(&self) -> Vec<(IpAddr, usize)> {
        self.maps().peers.snapshot()
    }

    /// Slots held: one per admitted stream that has not ended (for leak
    /// checks; every permit counts in the total, limited or not).
    #[cfg(feature = "test-view")]
    pub(crate) fn slots(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    /// Map entries held: connections, peers and wait queues (for leak
    /// checks).
    #[cfg(any(test, feature = "test-view"))]
    pub(crate) fn entries(&self) -> usize {
        let maps = self.maps();
        maps.connections.0.len() + maps.peers.0.len() + maps.queues.len()
    }
}

/// Why a stream was not admitted: which cap of which set, and its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) cap: StreamCap,
    pub(crate) limit: usize,
    set: usize,
}

/// Takes a slot in every set, or none and says which cap refused.
pub(crate) fn try_acquire_all(
    sets: &[Arc<CapSet>],
    origin: &Origin,
) -> Result<Vec<CapPermit>, Refusal> {
    if sets.is_empty() {
        return Ok(Vec::new());
    }
    let mut permits = Vec::with_capacity(sets.len());
    for (set, caps) in sets.iter().enumerate() {
        match caps.try_acquire(origin) {
            Ok(permit) => permits.push(permit),
            Err(cap) => {
                permits.into_iter().for_each(CapPermit::release);
                return Err(Refusal {
                    cap,
                    limit: caps.limits.get(cap).unwrap_or(0),
                    set,
                });
            }
        }
    }
    Ok(permits)
}

/// Like [`try_acquire_all`], but waits up to `patience` for slots to come
/// free. Cancel-safe: dropping it takes nothing.
///
/// A waiting stream queues on what refused it (its connection, its peer or
/// the total, in the refusing set) and is woken only by a release that frees
/// that: see the module docs.
pub(crate) async fn acquire_all_within(
    sets: Vec<Arc<CapSet>>,
    origin: Origin,
    patience: Duration,
) -> Result<Vec<CapPermit>, Refusal> {
    let mut refused = None;
    let waited = tokio::time::timeout(patience, acquire_all(&sets, &origin, &mut refused)).await;
    match (waited, refused) {
        (Ok(admitted), _) => admitted,
        (Err(_), Some(refusal)) => Err(refusal),
        // A wait begins with a refusal: only a zero patience can run out
        // before the first try.
        (Err(_), None) => try_acquire_all(&sets, &origin),
    }
}

/// Waits, however long it takes, until every set has room, then takes the
/// slots; refuses only a stream that lacks the key a cap needs. `refused`
/// is the latest refusal, for the caller that gives up waiting. Without a
/// timer of its own: the loom models drive it as it is.
pub(crate) async fn acquire_all(
    sets: &[Arc<CapSet>],
    origin: &Origin,
    refused: &mut Option<Refusal>,
) -> Result<Vec<CapPermit>, Refusal> {
    let _waiting = Waiting::new(sets);
    // The queue a wake-up came from, until it is acted on.
    let mut woken: Option<(usize, WaitKey)> = None;
    loop {
        let refusal = match try_acquire_all(sets, origin) {
            Ok(permits) => return Ok(permits),
            Err(refusal) if origin.lacks_key_of(refusal.cap) => return Err(refusal),
            Err(refusal) => refusal,
        };
        *refused = Some(refusal);
        let key = WaitKey::of(refusal.cap, origin);
        if let Some((set, woken_key)) = woken.take()
            && (set, woken_key) != (refusal.set, key)
            && sets[set].has_room(woken_key)
        {
            // Woken for a slot this stream cannot use after all (another cap
            // refuses it now): the next waiter in that queue may.
            sets[set].wake_one(woken_key);
        }
        let queued = sets[refusal.set].enqueue(key);
        let freed = queued.notify.notified();
        tokio::pin!(freed);
        // Queued, then tried again: a slot given back between the first try
        // and the queueing is not missed. Dropping a `Notified` that a
        // release chose passes the wake on to the next in the queue.
        freed.as_mut().enable();
        match try_acquire_all(sets, origin) {
            Ok(permits) => return Ok(permits),
            Err(again) if (again.set, WaitKey::of(again.cap, origin)) != (refusal.set, key) => {
                continue;
            }
            Err(_) => {}
        }
        freed.await;
        woken = Some((refusal.set, key));
    }
}

/// A place in the queue of one [`WaitKey`], left when dropped.
struct Queued {
    caps: Arc<CapSet>,
    key: WaitKey,
    notify: Arc<Notify>,
}

impl Drop for Queued {
    fn drop(&mut self) {
        let mut maps = self.caps.maps();
        if let Some(queue) = maps.queues.get_mut(&self.key) {
            queue.waiting -= 1;
            if queue.waiting == 0 {
                maps.queues.remove(&self.key);
            }
        }
    }
}

/// Counts a waiting stream in every set it waits on, while it waits.
struct Waiting<'a>(&'a [Arc<CapSet>]);

impl<'a> Waiting<'a> {
    fn new(sets: &'a [Arc<CapSet>]) -> Self {
        for set in sets {
            set.waiters.fetch_add(1, Ordering::SeqCst);
        }
        // Counted before the first look at the slots: pairs with the fence
        // in `CapPermit::release` (see `CapSet::take_total`).
        fence(Ordering::SeqCst);
        Waiting(sets)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        for set in self.0 {
            set.waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl CapPermit {
    /// Gives the slots back and wakes the streams waiting for one of them:
    /// at most the first waiter on its connection, on its peer and on the
    /// total.
    pub(crate) fn release(self) {
        if self.connection.is_none() && self.peer.is_none() {
            self.caps.total.fetch_sub(1, Ordering::SeqCst);
            // Given back before the look at the waiters: pairs with the
            // fence in `Waiting::new` (found by the loom model
            // `loom_slot_released_vs_waiter`, which treats SeqCst accesses
            // alone as acquire-release).
            fence(Ordering::SeqCst);
            if self.caps.waiters.load(Ordering::SeqCst) > 0 {
                self.caps.maps().wake(None, None);
            }
            return;
        }
        let mut maps = self.caps.maps();
        if let Some(key) = self.connection {
            maps.connections.give_back(key);
        }
        if let Some(ip) = self.peer {
            maps.peers.give_back(ip);
        }
        // After the keyed slots: a stream that finds the total free finds
        // them free too.
        self.caps.total.fetch_sub(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.caps.waiters.load(Ordering::SeqCst) > 0 {
            maps.wake(self.connection, self.peer);
        }
    }
}

impl Maps {
    /// One slot of `connection`, of `peer` and of the total came free: the
    /// first waiter on each may now proceed. A waiter on any other key could
    /// not, so it sleeps on.
    fn wake(&self, connection: Option<ConnectionKey>, peer: Option<IpAddr>) {
        let keys = [
            connection.map(WaitKey::Connection),
            peer.map(WaitKey::Peer),
            Some(WaitKey::Total),
        ];
        for key in keys.into_iter().flatten() {
            if let Some(queue) = self.queues.get(&key) {
                queue.notify.notify_one();
            }
        }
    }
}

#[cfg(test)]
#[path = "cap_tests.rs"]
mod tests;
