//! Where a request came from, as users name it: a [`ConnectionKey`] for the
//! connection and a [`PeerAddr`] for the peer. (How the guard finds them in
//! request extensions is `stream::origin`.)

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

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
///    (`stream::StreamGuard::for_connection`:
///    hyper-util accept loops that build the service per connection);
/// 4. the [`connection_key`](crate::StreamGuardBuilder::connection_key)
///    function, if set (a custom `Connected` type);
/// 5. tonic's `TcpConnectInfo` (local and remote address: `serve`, and
///    `serve_with_incoming` over TCP streams), `TlsConnectInfo<TcpConnectInfo>`
///    (tonic's `tls_config`, or your own rustls acceptor; feature `tls`), and
///    axum's `ConnectInfo<SocketAddr>` (feature `axum`);
/// 6. tonic's `UdsConnectInfo` (`serve_with_incoming` over
///    `UnixListenerStream`).
///
/// tonic's `UdsConnectInfo` (its own Unix-socket serving) is built once per
/// connection: the guard keys the connection on that one value (see
/// [`remote_addr`](Self::remote_addr): there is no IP peer). Other IO
/// that carries no identity of its own (a custom `Connected` type whose
/// connect info is `()`) needs a `ConnectionGuard`, a `connection_key`
/// function or a key you insert. A request with no identity is
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
    /// A value the server builds once per connection and shares among its
    /// requests (tonic's `UdsConnectInfo`): its address, hashed with a
    /// per-process key so that logs show no heap address.
    #[cfg_attr(not(all(feature = "tonic", unix)), allow(dead_code))]
    Shared(u64),
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

    /// The connection the shared value `anchor` stands for: a value the
    /// server builds once per connection and clones into each of its
    /// requests. Unique while `anchor` lives (the caller keeps a clone for as
    /// long as a stream counts under the key).
    #[cfg_attr(not(all(feature = "tonic", unix)), allow(dead_code))]
    pub(crate) fn from_shared<T: ?Sized>(anchor: &Arc<T>) -> Self {
        use std::hash::BuildHasher;
        static SALT: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
        let address = Arc::as_ptr(anchor).cast::<()>() as usize;
        ConnectionKey(KeyRepr::Shared(
            SALT.get_or_init(std::hash::RandomState::new)
                .hash_one(address),
        ))
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
            KeyRepr::Shared(hash) => write!(f, "conn-{hash:016x}"),
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

/// The peer's address, for servers that know it but are not tonic.
///
/// Insert it into the request extensions before the guard (in your accept
/// loop, or a layer outside the guard; tonic's `TcpConnectInfo` and
/// `TlsConnectInfo` are read without help) and end events and the per-peer
/// cap use it. It comes before every other source of the peer's address,
/// so a proxy-aware layer can name the real client.
///
/// ```
/// use std::{convert::Infallible, net::SocketAddr};
///
/// use http::{Request, Response};
/// use tower::{Layer, ServiceExt};
/// use tower_stream_guard::{BoxError, PeerAddr, StreamGuardLayer, stream::RequestBody};
///
/// # fn main() -> Result<(), BoxError> {
/// # tokio::runtime::Runtime::new()?.block_on(async {
/// let guard = StreamGuardLayer::builder().max_streams_per_peer(8).build()?;
/// let mut events = guard.subscribe();
/// let service = guard.layer(tower::service_fn(|_: Request<RequestBody<String>>| async {
///     Ok::<_, Infallible>(Response::new(String::new()))
/// }));
///
/// let peer: SocketAddr = "192.0.2.7:40000".parse()?;
/// let mut request = Request::new(String::new());
/// request.extensions_mut().insert(PeerAddr(peer));
/// let response = service.oneshot(request).await?;
/// assert!(response.status().is_success()); // without a peer: refused
/// assert_eq!(events.recv().await?.peer(), Some(peer));
/// # Ok::<_, BoxError>(())
/// # })
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerAddr(pub SocketAddr);

/// The address the per-peer caps count `ip` under: an IPv6 address cut to
/// its first `ipv6_prefix` bits (1..=128), an IPv4 one (also shown as
/// IPv4-mapped IPv6) whole. With 128, `ip` as it is.
pub(crate) fn cap_key(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V6(v6) if ipv6_prefix < 128 => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mask = u128::MAX << (128 - u32::from(ipv6_prefix.max(1)));
                IpAddr::V6(Ipv6Addr::from(v6.to_bits() & mask))
            }
        },
        ip => ip,
    }
}
