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
//! With `cap_wait`, a stream over a cap queues on what refused it (its
//! connection, its peer or the total of the refusing set), in arrival order
//! (its service's `call`). A release hands the slots it frees over, under the
//! lock it gives them back under, to the earliest waiter that can use them:
//! a freed slot is never raced for, and a stream that arrives later queues
//! behind the waiters whose queues it would jump. A release looks only at
//! the queues of its own connection, its peer and the total: O(1) per
//! release, however many streams wait on other keys. The waiting stream's
//! side is in `cap_wait.rs`.

use std::{
    collections::HashMap,
    hash::Hash,
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
};

pub(crate) use super::cap_wait::{Admission, Wait};
use super::cap_wait::{Entry, Grant, Queued, Queues, WaitKey};
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

/// Both keyed counts of a cap set and its queues, under one lock: a stream
/// takes it once on the way in and once on the way out.
struct Maps {
    connections: Counts<ConnectionKey>,
    peers: Counts<IpAddr>,
    /// Streams waiting for a slot, by what refused them.
    queues: Queues,
}

/// One set of caps with its counters: a guard layer's own, or a route's.
pub(crate) struct CapSet {
    limits: CapLimits,
    /// Count connections even without a per-connection cap (the layer's own
    /// set does, for `connection_streams`).
    track_connections: bool,
    total: AtomicUsize,
    maps: Mutex<Maps>,
    /// Streams queued here, or about to look under the lock whether they
    /// must queue: while there are none, a set without keyed caps takes and
    /// gives back slots without the lock.
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

/// The arrival number of a stream that has not queued: it comes after
/// every waiter.
const NEWCOMER: u64 = u64::MAX;

/// What [`CapSet::acquire_or_queue`] did.
pub(crate) enum Queueing {
    Admitted(CapPermit),
    Queued(Queued),
    /// Refused for want of the key a cap needs: no waiting helps.
    Refused(StreamCap),
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
                queues: Queues::default(),
            }),
            waiters: AtomicUsize::new(0),
        }
    }

    /// The connection and peer a permit of this set counts `origin` under.
    fn keys_of(&self, origin: &Origin) -> (Option<ConnectionKey>, Option<IpAddr>) {
        (
            origin.connection.filter(|_| self.track_connections),
            origin.peer.filter(|_| self.limits.per_peer.is_some()),
        )
    }

    /// The keyed cap that refuses `origin` for want of its key, if any.
    fn missing_key(&self, origin: &Origin) -> Option<StreamCap> {
        if self.limits.per_connection.is_some() && origin.connection.is_none() {
            return Some(StreamCap::PerConnection);
        }
        if self.limits.per_peer.is_some() && origin.peer.is_none() {
            return Some(StreamCap::PerPeer);
        }
        None
    }

    /// Takes a slot in every cap of this set, or none and says which cap is
    /// full. A keyed cap refuses a stream whose key (connection or peer) is
    /// unknown: a cap per connection or per peer never becomes one shared by
    /// every unidentified stream. Without that cap, an unknown connection is
    /// only left out of the connection counts. A stream that arrives while
    /// others wait for what it would take queues behind them: it is refused
    /// by that cap.
    ///
    /// The keyed caps are checked first and the total is taken last, under
    /// the same lock as the keyed slots: a stream refused by any cap never
    /// holds a slot, not even for an instant.
    pub(crate) fn try_acquire(self: &Arc<Self>, origin: &Origin) -> Result<CapPermit, StreamCap> {
        if let Some(cap) = self.missing_key(origin) {
            return Err(cap);
        }
        let (connection, peer) = self.keys_of(origin);
        if connection.is_some() || peer.is_some() || self.waiters.load(Ordering::SeqCst) > 0 {
            self.take_locked(&mut self.maps(), origin, NEWCOMER)?;
        } else {
            self.take_total()?;
        }
        Ok(self.permit(origin))
    }

    /// Takes this set's slots for `origin` (the caller checked its keys), or
    /// says which cap refuses them: a full cap, or one with a stream queued
    /// on it that arrived before `arrival`.
    fn take_locked(&self, maps: &mut Maps, origin: &Origin, arrival: u64) -> Result<(), StreamCap> {
        let (connection, peer) = self.keys_of(origin);
        let ahead = |key: WaitKey| maps.queues.first(key).is_some_and(|first| first < arrival);
        if let Some(key) = connection
            && (maps.connections.full(key, self.limits.per_connection)
                || ahead(WaitKey::Connection(key)))
        {
            return Err(StreamCap::PerConnection);
        }
        if let Some(ip) = peer
            && (maps.peers.full(ip, self.limits.per_peer) || ahead(WaitKey::Peer(ip)))
        {
            return Err(StreamCap::PerPeer);
        }
        if ahead(WaitKey::Total) {
            return Err(StreamCap::Total);
        }
        self.take_total()?;
        if let Some(key) = connection {
            maps.connections.take(key);
        }
        if let Some(ip) = peer {
            maps.peers.take(ip);
        }
        Ok(())
    }

    /// The permit of slots taken for `origin`.
    fn permit(self: &Arc<Self>, origin: &Origin) -> CapPermit {
        let (connection, peer) = self.keys_of(origin);
        CapPermit {
            caps: Arc::clone(self),
            connection,
            peer,
        }
    }

    /// Takes a total slot unless the total is at its limit. Never counts
    /// past the limit, even transiently.
    fn take_total(&self) -> Result<(), StreamCap> {
        // SeqCst, with the waiter count and the fences between each side's
        // write and read (see `acquire_or_queue` and `CapPermit::release`):
        // a stream that counted itself a waiter before it looked at the
        // total, and a release that gave the total back before it looked at
        // the waiter count, cannot both miss each other.
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

    /// Takes this set's slots for a stream that arrived as `arrival`, or
    /// queues it, in arrival order, on what refuses it.
    pub(crate) fn acquire_or_queue(self: &Arc<Self>, origin: &Origin, arrival: u64) -> Queueing {
        if let Some(cap) = self.missing_key(origin) {
            return Queueing::Refused(cap);
        }
        self.waiters.fetch_add(1, Ordering::SeqCst);
        // Counted before the look at the slots: pairs with the fence in
        // `CapPermit::release` (see `take_total`).
        fence(Ordering::SeqCst);
        let mut maps = self.maps();
        let cap = match self.take_locked(&mut maps, origin, arrival) {
            Ok(()) => {
                drop(maps);
                self.waiters.fetch_sub(1, Ordering::SeqCst);
                return Queueing::Admitted(self.permit(origin));
            }
            Err(cap) => cap,
        };
        // Keys were checked: every refusal names a queue.
        let key = WaitKey::of(cap, origin).unwrap_or(WaitKey::Total);
        let grant = Arc::new(Grant::default());
        maps.queues.insert(
            key,
            Entry {
                arrival,
                origin: *origin,
                grant: Arc::clone(&grant),
            },
        );
        Queueing::Queued(Queued {
            caps: Arc::clone(self),
            arrival,
            origin: *origin,
            grant,
            cap,
        })
    }

    /// Takes the queued stream `arrival` out of its queue; whether it was
    /// still there (not handed its slots).
    pub(crate) fn leave(&self, arrival: u64) -> bool {
        let mut maps = self.maps();
        let left = maps.queues.remove(arrival).is_some();
        drop(maps);
        if left {
            self.waiters.fetch_sub(1, Ordering::SeqCst);
        }
        left
    }

    /// The permit of the slots a queued stream from `origin` was handed.
    pub(crate) fn handed(self: &Arc<Self>, origin: &Origin) -> CapPermit {
        self.permit(origin)
    }

    /// Slots of `keys` came free: hands them, in arrival order, to the
    /// waiters of those queues that can now take every slot they need. A
    /// waiter that another of its caps (or an earlier waiter there) still
    /// refuses moves to that cap's queue, keeping its arrival number.
    fn hand_over(&self, maps: &mut Maps, keys: [Option<WaitKey>; 3]) {
        let mut open = keys;
        loop {
            let first = open
                .iter()
                .flatten()
                .filter_map(|key| Some((*key, maps.queues.first(*key)?)))
                .min_by_key(|&(_, arrival)| arrival);
            let Some((key, arrival)) = first else { return };
            let Some(entry) = maps.queues.remove(arrival) else {
                return;
            };
            match self.take_locked(maps, &entry.origin, entry.arrival) {
                Ok(()) => {
                    self.waiters.fetch_sub(1, Ordering::SeqCst);
                    entry.grant.give();
                }
                Err(cap) => {
                    let refusing = WaitKey::of(cap, &entry.origin).unwrap_or(WaitKey::Total);
                    if refusing == key {
                        // Still full for its first waiter: for all of them.
                        open.iter_mut()
                            .filter(|open| **open == Some(key))
                            .for_each(|open| *open = None);
                    }
                    maps.queues.insert(refusing, entry);
                }
            }
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

    /// Map entries held: connections, peers, wait queues and queued streams
    /// (for leak checks).
    #[cfg(any(test, feature = "test-view"))]
    pub(crate) fn entries(&self) -> usize {
        let maps = self.maps();
        maps.connections.0.len() + maps.peers.0.len() + maps.queues.entries()
    }
}

/// Why a stream was not admitted: which cap of which set, and its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) cap: StreamCap,
    pub(crate) limit: usize,
    pub(crate) set: usize,
}

impl Refusal {
    pub(crate) fn new(sets: &[Arc<CapSet>], set: usize, cap: StreamCap) -> Self {
        Refusal {
            cap,
            limit: sets[set].limits.get(cap).unwrap_or(0),
            set,
        }
    }
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
                return Err(Refusal::new(sets, set, cap));
            }
        }
    }
    Ok(permits)
}

impl CapPermit {
    /// Gives the slots back and hands them over to the streams waiting for
    /// one of them: the first that can use them in the queues of its
    /// connection, its peer and the total.
    pub(crate) fn release(self) {
        let caps = &self.caps;
        if self.connection.is_none() && self.peer.is_none() {
            caps.total.fetch_sub(1, Ordering::SeqCst);
            // Given back before the look at the waiters: pairs with the
            // fence in `CapSet::acquire_or_queue` (found by the loom model
            // `loom_slot_released_vs_waiter`, which treats SeqCst accesses
            // alone as acquire-release).
            fence(Ordering::SeqCst);
            if caps.waiters.load(Ordering::SeqCst) > 0 {
                caps.hand_over(&mut caps.maps(), [None, None, Some(WaitKey::Total)]);
            }
            return;
        }
        let mut maps = caps.maps();
        if let Some(key) = self.connection {
            maps.connections.give_back(key);
        }
        if let Some(ip) = self.peer {
            maps.peers.give_back(ip);
        }
        // After the keyed slots: a stream that finds the total free finds
        // them free too.
        caps.total.fetch_sub(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if caps.waiters.load(Ordering::SeqCst) > 0 {
            let keys = [
                self.connection.map(WaitKey::Connection),
                self.peer.map(WaitKey::Peer),
                Some(WaitKey::Total),
            ];
            caps.hand_over(&mut maps, keys);
        }
    }
}

#[cfg(test)]
#[path = "cap_tests.rs"]
mod tests;
