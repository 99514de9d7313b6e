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
//! Costs, per stream and only when caps are set: one relaxed atomic for the
//! total, one short lock of a hash map per keyed cap on the way in and again on
//! the way out. Nothing per frame. Map entries are removed when their last
//! stream ends, so closed connections and departed peers leave nothing behind.

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
    /// connections of one listener).
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
    /// Takes a slot for `key` unless it already holds `limit`.
    fn take(&mut self, key: K, limit: Option<usize>) -> bool {
        let count = self.0.entry(key).or_insert(0);
        if limit.is_some_and(|limit| *count >= limit) {
            if *count == 0 {
                self.0.remove(&key);
            }
            return false;
        }
        *count += 1;
        true
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
}

/// One set of caps with its counters: a guard layer's own, or a route's.
pub(crate) struct CapSet {
    limits: CapLimits,
    /// Count connections even without a per-connection cap (the layer's own
    /// set does, for `connection_streams`).
    track_connections: bool,
    total: AtomicUsize,
    maps: Mutex<Maps>,
    /// Streams waiting for a slot; releases notify only when there are some.
    waiters: AtomicUsize,
    freed: Notify,
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
            }),
            waiters: AtomicUsize::new(0),
            freed: Notify::new(),
        }
    }

    /// Takes a slot in every cap of this set, or none and says which cap is
    /// full. A keyed cap refuses a stream whose key (connection or peer) is
    /// unknown: a cap per connection or per peer never becomes one shared by
    /// every unidentified stream. Without that cap, an unknown connection is
    /// only left out of the connection counts.
    pub(crate) fn try_acquire(self: &Arc<Self>, origin: &Origin) -> Result<CapPermit, StreamCap> {
        let total = self.total.fetch_add(1, Ordering::AcqRel);
        if self.limits.total.is_some_and(|limit| total >= limit) {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(StreamCap::Total);
        }
        let mut permit = CapPermit {
            caps: Arc::clone(self),
            connection: None,
            peer: None,
        };
        if self.limits.per_connection.is_some() && origin.connection.is_none() {
            permit.release_quietly();
            return Err(StreamCap::PerConnection);
        }
        if self.limits.per_peer.is_some() && origin.peer.is_none() {
            permit.release_quietly();
            return Err(StreamCap::PerPeer);
        }
        let connection = origin.connection.filter(|_| self.track_connections);
        let peer = origin.peer.filter(|_| self.limits.per_peer.is_some());
        if connection.is_some() || peer.is_some() {
            let mut maps = self.maps();
            if let Some(key) = connection {
                if !maps.connections.take(key, self.limits.per_connection) {
                    drop(maps);
                    permit.release_quietly();
                    return Err(StreamCap::PerConnection);
                }
                permit.connection = Some(key);
            }
            if let Some(ip) = peer {
                if !maps.peers.take(ip, self.limits.per_peer) {
                    drop(maps);
                    permit.release_quietly();
                    return Err(StreamCap::PerPeer);
                }
                permit.peer = Some(ip);
            }
        }
        Ok(permit)
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
        maps.connections.0.len() + maps.peers.0.len()
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
pub(crate) async fn acquire_all_within(
    sets: Vec<Arc<CapSet>>,
    origin: Origin,
    patience: Duration,
) -> Result<Vec<CapPermit>, Refusal> {
    let deadline = tokio::time::Instant::now() + patience;
    let _waiting = Waiting::new(&sets);
    loop {
        let refusal = match try_acquire_all(&sets, &origin) {
            Ok(permits) => return Ok(permits),
            Err(refusal) if origin.lacks_key_of(refusal.cap) => return Err(refusal),
            Err(refusal) => refusal,
        };
        let freed = sets[refusal.set].freed.notified();
        tokio::pin!(freed);
        // Registered, then tried again: a slot given back between the first
        // try and the registration is not missed.
        freed.as_mut().enable();
        match try_acquire_all(&sets, &origin) {
            Ok(permits) => return Ok(permits),
            Err(again) if again.set != refusal.set => continue,
            Err(_) => {}
        }
        if tokio::time::timeout_at(deadline, freed).await.is_err() {
            return Err(refusal);
        }
    }
}

/// Counts a waiting stream in every set it waits on, while it waits.
struct Waiting<'a>(&'a [Arc<CapSet>]);

impl<'a> Waiting<'a> {
    fn new(sets: &'a [Arc<CapSet>]) -> Self {
        for set in sets {
            set.waiters.fetch_add(1, Ordering::AcqRel);
        }
        Waiting(sets)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        for set in self.0 {
            set.waiters.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl CapPermit {
    /// Gives the slots back and wakes streams waiting for one.
    pub(crate) fn release(self) {
        let caps = Arc::clone(&self.caps);
        self.release_quietly();
        if caps.waiters.load(Ordering::Acquire) > 0 {
            caps.freed.notify_waiters();
        }
    }

    fn release_quietly(self) {
        if self.connection.is_some() || self.peer.is_some() {
            let mut maps = self.caps.maps();
            if let Some(key) = self.connection {
                maps.connections.give_back(key);
            }
            if let Some(ip) = self.peer {
                maps.peers.give_back(ip);
            }
        }
        self.caps.total.fetch_sub(1, Ordering::AcqRel);
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
