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
    fmt,
    hash::Hash,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;

/// Which cap refused a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamCap {
    /// [`max_streams_per_connection`](crate::StreamGuardBuilder::max_streams_per_connection).
    PerConnection,
    /// [`max_streams_per_peer`](crate::StreamGuardBuilder::max_streams_per_peer).
    PerPeer,
    /// [`max_streams`](crate::StreamGuardBuilder::max_streams).
    Total,
}

impl StreamCap {
    /// A short snake-case name, as used in JSON event lines:
    /// `per_connection`, `per_peer` or `total`.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamCap::PerConnection => "per_connection",
            StreamCap::PerPeer => "per_peer",
            StreamCap::Total => "total",
        }
    }

    /// The builder setting behind this cap, e.g. `max_streams_per_connection`.
    pub fn setting(self) -> &'static str {
        match self {
            StreamCap::PerConnection => "max_streams_per_connection",
            StreamCap::PerPeer => "max_streams_per_peer",
            StreamCap::Total => "max_streams",
        }
    }

    pub(crate) const ALL: [StreamCap; 3] = [
        StreamCap::PerConnection,
        StreamCap::PerPeer,
        StreamCap::Total,
    ];
}

impl fmt::Display for StreamCap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StreamCap::PerConnection => "per connection",
            StreamCap::PerPeer => "per peer",
            StreamCap::Total => "in total",
        })
    }
}

/// What identifies the connection a request arrived on, for
/// [`max_streams_per_connection`](crate::StreamGuardBuilder::max_streams_per_connection)
/// and [`StreamGuardLayer::connection_streams`](crate::StreamGuardLayer::connection_streams).
///
/// The guard looks for it, in this order:
///
/// 1. a `ConnectionKey` in the request extensions (insert one from your
///    accept loop);
/// 2. the [`ConnectionHandle`](crate::ConnectionHandle) of a
///    [`ConnectionGuard`](crate::ConnectionGuard) wrapping the connection:
///    tonic's `GuardedConnectInfo<T>` for TCP, TLS over TCP and Unix sockets,
///    and with feature `tls`, `TlsConnectInfo<GuardedConnectInfo<T>>` (the
///    guard under an application-managed TLS acceptor);
/// 3. the key a guard service was built for
///    ([`StreamGuard::for_connection`](crate::StreamGuard::for_connection):
///    hyper-util accept loops that build the service per connection);
/// 4. the [`connection_key`](crate::StreamGuardBuilder::connection_key)
///    function, if set (a custom `Connected` type);
/// 5. tonic's `TcpConnectInfo` (local and remote address: `serve`, and
///    `serve_with_incoming` over TCP streams), `TlsConnectInfo<TcpConnectInfo>`
///    (tonic's `tls_config`, or your own rustls acceptor; feature `tls`), and
///    axum's `ConnectInfo<SocketAddr>` (feature `axum`).
///
/// Unix sockets (`UdsConnectInfo`) and other IO carry no identity of their
/// own: wrap them with a `ConnectionGuard`. A request with no identity is
/// never pooled with others: under
/// [`max_streams_per_connection`](crate::StreamGuardBuilder::max_streams_per_connection)
/// it is refused, with a message naming what is missing and a one-time
/// warning in the log.
///
/// ```
/// use tower_stream_guard::ConnectionKey;
///
/// let key = ConnectionKey::from_remote("10.0.0.7:51234".parse().unwrap());
/// assert_eq!(key.remote_addr().map(|a| a.port()), Some(51234));
/// assert_eq!(ConnectionKey::from_id(7).to_string(), "#7");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionKey(KeyRepr);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum KeyRepr {
    Id(u64),
    Addrs {
        local: Option<SocketAddr>,
        remote: SocketAddr,
    },
}

impl ConnectionKey {
    /// A connection known by a number of your choosing (unique among open
    /// connections).
    pub fn from_id(id: u64) -> Self {
        ConnectionKey(KeyRepr::Id(id))
    }

    /// A connection known by its remote address (unique among the open
    /// connections of one listener). Inserted as a request extension, its
    /// address is the peer for the per-peer cap ahead of any connect info
    /// (a [`PeerAddr`](crate::PeerAddr) still comes first).
    pub fn from_remote(remote: SocketAddr) -> Self {
        ConnectionKey(KeyRepr::Addrs {
            local: None,
            remote,
        })
    }

    /// A connection known by both of its addresses (unique among the open
    /// connections of a process, whatever it listens on).
    pub fn from_addrs(local: SocketAddr, remote: SocketAddr) -> Self {
        ConnectionKey(KeyRepr::Addrs {
            local: Some(local),
            remote,
        })
    }

    /// The peer's address, when the key was made from one.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        match self.0 {
            KeyRepr::Addrs { remote, .. } => Some(remote),
            _ => None,
        }
    }
}

impl fmt::Display for ConnectionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            KeyRepr::Id(id) => write!(f, "#{id}"),
            KeyRepr::Addrs {
                local: Some(local),
                remote,
            } => write!(f, "{remote}->{local}"),
            KeyRepr::Addrs {
                local: None,
                remote,
            } => write!(f, "{remote}"),
        }
    }
}

/// A function that finds a request's connection in its extensions.
pub(crate) type KeyFn = Arc<dyn Fn(&http::Extensions) -> Option<ConnectionKey> + Send + Sync>;

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
        // SeqCst, with the waiter count: a waiter that counted itself before
        // it looked at the total, and a release that gave the total back
        // before it looked at the waiter count, cannot both miss each other.
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

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        // Nothing under this lock can leave the maps half-updated.
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Streams holding a slot here, per connection.
    pub(crate) fn connection_streams(&self) -> Vec<(ConnectionKey, usize)> {
        self.maps().connections.snapshot()
    }

    /// Streams holding a slot here, per peer (only with a per-peer cap).
    pub(crate) fn peer_streams(&self) -> Vec<(IpAddr, usize)> {
        self.maps().peers.snapshot()
    }

    /// Map entries held: connections plus peers (for leak checks).
    #[cfg(test)]
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
    let deadline = tokio::time::Instant::now() + patience;
    let _waiting = Waiting::new(&sets);
    // The queue a wake-up came from, until it is acted on.
    let mut woken: Option<(usize, WaitKey)> = None;
    loop {
        let refusal = match try_acquire_all(&sets, &origin) {
            Ok(permits) => return Ok(permits),
            Err(refusal) if origin.lacks_key_of(refusal.cap) => return Err(refusal),
            Err(refusal) => refusal,
        };
        let key = WaitKey::of(refusal.cap, &origin);
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
        match try_acquire_all(&sets, &origin) {
            Ok(permits) => return Ok(permits),
            Err(again) if (again.set, WaitKey::of(again.cap, &origin)) != (refusal.set, key) => {
                continue;
            }
            Err(_) => {}
        }
        if tokio::time::timeout_at(deadline, freed).await.is_err() {
            return Err(refusal);
        }
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
mod tests {
    use super::*;

    fn origin(port: u16, ip: [u8; 4]) -> Origin {
        let remote = SocketAddr::from((ip, port));
        Origin {
            connection: Some(ConnectionKey::from_remote(remote)),
            peer: Some(remote.ip()),
        }
    }

    fn caps(limits: CapLimits) -> Arc<CapSet> {
        Arc::new(CapSet::new(limits, false))
    }

    #[test]
    fn per_connection_cap_refuses_the_extra_stream_and_frees_on_release() {
        let set = caps(CapLimits {
            per_connection: Some(2),
            ..CapLimits::default()
        });
        let a = origin(1, [10, 0, 0, 1]);
        let first = set.try_acquire(&a).unwrap();
        let _second = set.try_acquire(&a).unwrap();
        assert_eq!(set.try_acquire(&a).err(), Some(StreamCap::PerConnection));
        // Another connection of the same peer is not affected.
        assert!(set.try_acquire(&origin(2, [10, 0, 0, 1])).is_ok());
        first.release();
        assert!(set.try_acquire(&a).is_ok());
    }

    #[test]
    fn a_refused_stream_leaves_no_slot_taken() {
        let set = caps(CapLimits {
            per_connection: Some(5),
            per_peer: Some(1),
            total: Some(10),
        });
        let held = set.try_acquire(&origin(1, [10, 0, 0, 1])).unwrap();
        assert_eq!(
            set.try_acquire(&origin(2, [10, 0, 0, 1])).err(),
            Some(StreamCap::PerPeer)
        );
        assert_eq!(set.total.load(Ordering::SeqCst), 1);
        assert_eq!(set.entries(), 2, "one connection, one peer");
        held.release();
        assert_eq!(set.total.load(Ordering::SeqCst), 0);
        assert_eq!(set.entries(), 0);
    }

    #[test]
    fn total_cap_counts_every_connection() {
        let set = caps(CapLimits {
            total: Some(2),
            ..CapLimits::default()
        });
        let _a = set.try_acquire(&origin(1, [10, 0, 0, 1])).unwrap();
        let _b = set.try_acquire(&origin(2, [10, 0, 0, 2])).unwrap();
        assert_eq!(
            set.try_acquire(&origin(3, [10, 0, 0, 3])).err(),
            Some(StreamCap::Total)
        );
    }

    #[test]
    fn an_unknown_peer_is_refused_by_the_peer_cap_not_pooled() {
        let set = caps(CapLimits {
            per_peer: Some(1),
            ..CapLimits::default()
        });
        let unknown = Origin {
            connection: Some(ConnectionKey::from_id(1)),
            peer: None,
        };
        assert_eq!(set.try_acquire(&unknown).err(), Some(StreamCap::PerPeer));
        assert_eq!(set.total.load(Ordering::SeqCst), 0);
        assert_eq!(set.entries(), 0);
    }

    #[test]
    fn an_unknown_connection_is_refused_by_the_connection_cap_not_pooled() {
        let set = caps(CapLimits {
            per_connection: Some(5),
            ..CapLimits::default()
        });
        let unknown = Origin {
            connection: None,
            peer: Some([10, 0, 0, 1].into()),
        };
        assert_eq!(
            set.try_acquire(&unknown).err(),
            Some(StreamCap::PerConnection)
        );
        assert_eq!(set.total.load(Ordering::SeqCst), 0);
        assert_eq!(set.entries(), 0);
    }

    #[test]
    fn an_unknown_connection_is_not_counted_without_a_connection_cap() {
        let set = Arc::new(CapSet::new(CapLimits::default(), true));
        let unknown = Origin {
            connection: None,
            peer: None,
        };
        let permit = set.try_acquire(&unknown).expect("no cap to refuse it");
        assert_eq!(set.entries(), 0);
        permit.release();
        assert_eq!(set.total.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_refusal_by_the_second_set_gives_back_the_first() {
        let layer = Arc::new(CapSet::new(CapLimits::default(), true));
        let route = caps(CapLimits {
            per_connection: Some(1),
            ..CapLimits::default()
        });
        let sets = [Arc::clone(&layer), Arc::clone(&route)];
        let a = origin(1, [10, 0, 0, 1]);
        let held = try_acquire_all(&sets, &a).unwrap();
        let refusal = try_acquire_all(&sets, &a).err().unwrap();
        assert_eq!((refusal.cap, refusal.limit), (StreamCap::PerConnection, 1));
        assert_eq!(layer.connection_streams(), vec![(a.connection.unwrap(), 1)]);
        held.into_iter().for_each(CapPermit::release);
        assert_eq!(layer.entries() + route.entries(), 0);
    }

    #[test]
    fn many_short_connections_leave_no_entries() {
        let set = Arc::new(CapSet::new(CapLimits::default(), true));
        for port in 0..10_000u16 {
            let permit = set.try_acquire(&origin(port, [10, 0, 0, 1])).unwrap();
            permit.release();
        }
        assert_eq!(set.entries(), 0);
    }

    /// A peer flooding past its own per-connection cap must not make
    /// transient total increments that refuse another peer's stream near
    /// the total limit.
    #[test]
    fn refused_keyed_attempts_never_occupy_a_total_slot() {
        let set = caps(CapLimits {
            per_connection: Some(1),
            total: Some(4),
            ..CapLimits::default()
        });
        let a = origin(1, [10, 0, 0, 1]);
        // A's connection is full; with two more streams, total holds N-1.
        let _a_held = set.try_acquire(&a).unwrap();
        let _others = [
            set.try_acquire(&origin(2, [10, 0, 0, 2])).unwrap(),
            set.try_acquire(&origin(3, [10, 0, 0, 3])).unwrap(),
        ];
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flood = {
            let (set, stop) = (Arc::clone(&set), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut refused = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Checked keyed caps first, A's own cap is what refuses it.
                    assert!(set.try_acquire(&a).is_err());
                    refused += 1;
                }
                refused
            })
        };
        let b = origin(9, [10, 0, 0, 9]);
        let mut total_refusals = 0;
        for _ in 0..200_000 {
            match set.try_acquire(&b) {
                Ok(permit) => permit.release(),
                Err(cap) => {
                    assert_eq!(cap, StreamCap::Total);
                    total_refusals += 1;
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        let refused = flood.join().unwrap();
        assert!(refused > 0);
        assert_eq!(total_refusals, 0, "B refused for the total cap");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_stream_gets_the_slot_given_back() {
        let set = caps(CapLimits {
            total: Some(1),
            ..CapLimits::default()
        });
        let held = set.try_acquire(&origin(1, [10, 0, 0, 1])).unwrap();
        let waiter = tokio::spawn(acquire_all_within(
            vec![Arc::clone(&set)],
            origin(2, [10, 0, 0, 1]),
            Duration::from_secs(5),
        ));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished());
        held.release();
        let permits = waiter.await.unwrap().expect("slot handed over");
        permits.into_iter().for_each(CapPermit::release);
        assert_eq!(set.total.load(Ordering::SeqCst), 0);
    }

    /// Lets every runnable task run (paused time: never advances the clock).
    async fn settle() {
        for _ in 0..64 {
            tokio::task::yield_now().await;
        }
    }

    /// Spawns a waiter whose polls are counted in `polls`.
    fn counted_waiter(
        set: &Arc<CapSet>,
        origin: Origin,
        patience: Duration,
        polls: &Arc<AtomicUsize>,
    ) -> tokio::task::JoinHandle<Result<Vec<CapPermit>, Refusal>> {
        let polls = Arc::clone(polls);
        let mut waiting = Box::pin(acquire_all_within(vec![Arc::clone(set)], origin, patience));
        tokio::spawn(std::future::poll_fn(move |cx| {
            polls.fetch_add(1, Ordering::SeqCst);
            waiting.as_mut().poll(cx)
        }))
    }

    /// A release frees one slot of one connection, one of one peer and one
    /// of the total: only a waiter that can now proceed is woken, not every
    /// waiter of the set.
    #[tokio::test(start_paused = true)]
    async fn a_release_wakes_only_the_waiter_that_can_proceed() {
        const CONNECTIONS: u16 = 100;
        let set = caps(CapLimits {
            per_connection: Some(1),
            ..CapLimits::default()
        });
        let patience = Duration::from_secs(60);
        let held: Vec<CapPermit> = (0..CONNECTIONS)
            .map(|port| set.try_acquire(&origin(port, [10, 0, 0, 1])).unwrap())
            .collect();
        let polls = Arc::new(AtomicUsize::new(0));
        let waiters: Vec<_> = (0..CONNECTIONS)
            .map(|port| counted_waiter(&set, origin(port, [10, 0, 0, 1]), patience, &polls))
            .collect();
        settle().await;
        let mut wakeups = Vec::new();
        for (port, permit) in held.into_iter().enumerate() {
            let before = polls.load(Ordering::SeqCst);
            permit.release();
            settle().await;
            wakeups.push(polls.load(Ordering::SeqCst) - before);
            assert!(waiters[port].is_finished(), "waiter {port} admitted");
        }
        // Figures for the report: polls per release.
        eprintln!("polls per release: {wakeups:?}");
        assert!(
            wakeups.iter().all(|&n| n == 1),
            "each release polls its one waiter: {wakeups:?}"
        );
        for waiter in waiters {
            let permits = waiter.await.unwrap().expect("admitted");
            permits.into_iter().for_each(CapPermit::release);
        }
        assert_eq!(set.total.load(Ordering::SeqCst), 0);
        assert_eq!(set.entries(), 0);
    }

    /// With the total cap full, a release hands its slot to one waiter, not
    /// to all of them.
    #[tokio::test(start_paused = true)]
    async fn a_total_release_wakes_one_waiter() {
        const WAITERS: u16 = 50;
        let set = caps(CapLimits {
            total: Some(1),
            ..CapLimits::default()
        });
        let mut held = set.try_acquire(&origin(0, [10, 0, 0, 1])).unwrap();
        let polls = Arc::new(AtomicUsize::new(0));
        let mut waiters: Vec<_> = (1..=WAITERS)
            .map(|port| {
                counted_waiter(
                    &set,
                    origin(port, [10, 0, 0, 1]),
                    Duration::from_secs(60),
                    &polls,
                )
            })
            .collect();
        settle().await;
        let mut wakeups = Vec::new();
        while !waiters.is_empty() {
            let before = polls.load(Ordering::SeqCst);
            held.release();
            settle().await;
            wakeups.push(polls.load(Ordering::SeqCst) - before);
            let done = waiters
                .iter()
                .position(|w| w.is_finished())
                .expect("one admitted");
            let mut permits = waiters.remove(done).await.unwrap().expect("admitted");
            assert_eq!(permits.len(), 1);
            held = permits.remove(0);
        }
        held.release();
        eprintln!("polls per release: {wakeups:?}");
        assert!(wakeups.iter().all(|&n| n == 1), "{wakeups:?}");
    }

    #[derive(Clone, Debug)]
    enum Step {
        /// A stream arrives on connection `conn` of peer `peer` and waits up
        /// to `patience` seconds.
        Arrive { conn: u16, peer: u8, patience: u64 },
        /// The `n`th held stream (modulo) ends.
        Release(usize),
        /// Time passes.
        Advance(u64),
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            (0u16..4, 0u8..3, 1u64..4).prop_map(|(conn, peer, patience)| Step::Arrive {
                conn,
                peer,
                patience
            }),
            (0usize..8).prop_map(Step::Release),
            (1u64..1500).prop_map(Step::Advance),
        ]
    }

    fn origin_of(conn: u16, peer: u8) -> Origin {
        // Connection numbers are per peer: (peer, conn) names one.
        origin(u16::from(peer) * 100 + conn, [10, 0, 0, peer])
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Waiters queued by what refused them are all admitted or refused
        /// exactly once, never left asleep while they could proceed, and
        /// slots are conserved.
        #[test]
        fn waiters_are_admitted_or_refused_once_and_slots_are_conserved(
            limits in (1usize..3, 1usize..4, 1usize..5),
            steps in proptest::collection::vec(step(), 1..60),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async move {
                let set = caps(CapLimits {
                    per_connection: Some(limits.0),
                    per_peer: Some(limits.1),
                    total: Some(limits.2),
                });
                let mut held: Vec<CapPermit> = Vec::new();
                let mut pending = Vec::new();
                let (mut admitted, mut refused) = (0usize, 0usize);
                for step in steps {
                    match step {
                        Step::Arrive { conn, peer, patience } => {
                            let origin = origin_of(conn, peer);
                            pending.push((
                                origin,
                                tokio::spawn(acquire_all_within(
                                    vec![Arc::clone(&set)],
                                    origin,
                                    Duration::from_secs(patience),
                                )),
                            ));
                        }
                        Step::Release(n) if !held.is_empty() => {
                            let n = n % held.len();
                            held.swap_remove(n).release();
                        }
                        Step::Release(_) => {}
                        Step::Advance(ms) => tokio::time::advance(Duration::from_millis(ms)).await,
                    }
                    settle().await;
                    let mut still = Vec::new();
                    for (origin, task) in pending {
                        if task.is_finished() {
                            match task.await.unwrap() {
                                Ok(permits) => {
                                    admitted += 1;
                                    held.extend(permits);
                                }
                                Err(_) => refused += 1,
                            }
                        } else {
                            still.push((origin, task));
                        }
                    }
                    pending = still;
                    // Conserved: the counts are exactly the slots held.
                    assert_eq!(set.total.load(Ordering::SeqCst), held.len());
                    assert!(held.len() <= limits.2);
                    // No lost wake-up: no waiter sleeps while it could proceed.
                    for (origin, _) in &pending {
                        if let Ok(permit) = set.try_acquire(origin) {
                            permit.release();
                            panic!("a waiter on {:?} sleeps with a slot free", origin.connection);
                        }
                    }
                }
                let arrived = admitted + refused + pending.len();
                // Everything ends: every waiter resolves exactly once.
                held.drain(..).for_each(CapPermit::release);
                tokio::time::advance(Duration::from_secs(10)).await;
                settle().await;
                for (_, task) in pending {
                    match task.await.unwrap() {
                        Ok(permits) => {
                            admitted += 1;
                            permits.into_iter().for_each(CapPermit::release);
                        }
                        Err(_) => refused += 1,
                    }
                }
                assert_eq!(admitted + refused, arrived);
                assert_eq!(set.total.load(Ordering::SeqCst), 0);
                assert_eq!(set.entries(), 0, "no counts or queues left");
                assert_eq!(set.waiters.load(Ordering::SeqCst), 0);
            });
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_gives_up_at_its_deadline() {
        let set = caps(CapLimits {
            total: Some(1),
            ..CapLimits::default()
        });
        let _held = set.try_acquire(&origin(1, [10, 0, 0, 1])).unwrap();
        let started = tokio::time::Instant::now();
        let result = acquire_all_within(
            vec![Arc::clone(&set)],
            origin(2, [10, 0, 0, 1]),
            Duration::from_secs(2),
        )
        .await;
        assert_eq!(
            result.err().map(|r| (r.cap, r.limit)),
            Some((StreamCap::Total, 1))
        );
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(set.waiters.load(Ordering::SeqCst), 0);
    }
}
