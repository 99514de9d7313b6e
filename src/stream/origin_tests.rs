//! Unit tests of how the guard reads a request's origin.

use std::net::SocketAddr;

use super::{Found, identify};
use crate::{ConnectionGuard, ConnectionKey, PeerAddr, connection::PeerOf};

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("a socket address")
}

fn found(extensions: &mut http::Extensions) -> Found {
    identify(extensions, None, None)
}

/// An IO whose only trait is its peer: enough to get a handle.
struct Peer(Option<SocketAddr>);

impl PeerOf for Peer {
    fn peer(&self) -> Option<SocketAddr> {
        self.0
    }
}

#[test]
fn nothing_identifies_an_empty_request() {
    let found = found(&mut http::Extensions::new());
    assert_eq!(found.connection, None);
    assert_eq!(found.peer, None);
    assert!(found.handle.is_none());
}

#[test]
fn explicit_key_and_peer_win() {
    let mut ext = http::Extensions::new();
    ext.insert(ConnectionKey::from_id(7));
    ext.insert(PeerAddr(addr("10.0.0.1:5")));
    let found = identify(&mut ext, Some(ConnectionKey::from_id(8)), None);
    assert_eq!(found.connection, Some(ConnectionKey::from_id(7)));
    assert_eq!(found.peer, Some(addr("10.0.0.1:5")));
}

#[test]
fn a_fixed_key_comes_before_the_extractor() {
    let mut ext = http::Extensions::new();
    let extractor = |_: &http::Extensions| Some(ConnectionKey::from_id(2));
    let fixed = ConnectionKey::from_remote(addr("10.0.0.3:9"));
    let found = identify(&mut ext, Some(fixed), Some(&extractor));
    assert_eq!(found.connection, Some(fixed));
    assert_eq!(found.peer, Some(addr("10.0.0.3:9")), "from the key");
    let found = identify(&mut ext, None, Some(&extractor));
    assert_eq!(found.connection, Some(ConnectionKey::from_id(2)));
}

#[tokio::test]
async fn a_connection_handle_extension_gives_key_and_peer() {
    let guard = ConnectionGuard::builder().build().expect("valid");
    let io = guard.wrap(Peer(Some(addr("10.0.0.4:1"))));
    let mut ext = http::Extensions::new();
    ext.insert(io.handle().clone());
    let found = found(&mut ext);
    assert_eq!(found.connection, Some(io.handle().key()));
    assert_eq!(found.peer, Some(addr("10.0.0.4:1")));
    assert_eq!(found.handle.map(|h| h.id()), Some(io.handle().id()));
}

#[cfg(feature = "tonic")]
mod tonic_infos {
    use tonic::transport::server::{Connected, TcpConnectInfo};

    use super::*;
    use crate::connection::GuardedConnectInfo;

    /// An IO whose connect info is whatever the test says.
    struct Info<T>(T);

    impl<T: Clone + Send + Sync + 'static> Connected for Info<T> {
        type ConnectInfo = T;
        fn connect_info(&self) -> T {
            self.0.clone()
        }
    }

    impl<T> PeerOf for Info<T> {
        fn peer(&self) -> Option<SocketAddr> {
            Some(addr("10.9.9.9:9"))
        }
    }

    fn tcp() -> TcpConnectInfo {
        TcpConnectInfo {
            local_addr: Some(addr("127.0.0.1:443")),
            remote_addr: Some(addr("10.0.0.5:40000")),
        }
    }

    /// `GuardedConnectInfo<T>` the way tonic makes it.
    fn guarded<T: Clone + Send + Sync + 'static>(
        guard: &ConnectionGuard,
        info: T,
    ) -> (GuardedConnectInfo<T>, crate::ConnectionHandle) {
        let io = guard.wrap(Info(info));
        (io.connect_info(), io.handle().clone())
    }

    #[test]
    fn tcp_connect_info_gives_both_addresses() {
        let mut ext = http::Extensions::new();
        ext.insert(tcp());
        let found = found(&mut ext);
        assert_eq!(
            found.connection,
            Some(ConnectionKey::from_addrs(
                addr("127.0.0.1:443"),
                addr("10.0.0.5:40000")
            ))
        );
        assert_eq!(found.peer, Some(addr("10.0.0.5:40000")));
    }

    #[tokio::test]
    async fn guarded_tcp_is_unpacked() {
        let guard = ConnectionGuard::builder().build().expect("valid");
        let (info, handle) = guarded(&guard, tcp());
        let mut ext = http::Extensions::new();
        ext.insert(info);
        let found = found(&mut ext);
        assert_eq!(found.connection, Some(handle.key()));
        assert_eq!(found.peer, Some(addr("10.0.0.5:40000")));
        assert!(ext.get::<TcpConnectInfo>().is_some(), "unpacked");
        assert!(ext.get::<crate::ConnectionHandle>().is_some(), "unpacked");
    }

    /// Behind a PROXY-protocol listener the connect info names the
    /// proxy; the key the user inserts names the real client, and the
    /// per-peer cap keys on it.
    #[test]
    fn an_explicit_key_s_remote_address_beats_the_connect_info() {
        let client = addr("203.0.113.7:5555");
        let mut ext = http::Extensions::new();
        ext.insert(tcp());
        ext.insert(ConnectionKey::from_remote(client));
        let found = found(&mut ext);
        assert_eq!(found.connection, Some(ConnectionKey::from_remote(client)));
        assert_eq!(found.peer, Some(client));
    }

    #[tokio::test]
    async fn an_explicit_key_s_remote_address_beats_a_guarded_connect_info() {
        let client = addr("203.0.113.7:5555");
        let guard = ConnectionGuard::builder().build().expect("valid");
        let (info, _) = guarded(&guard, tcp());
        let mut ext = http::Extensions::new();
        ext.insert(info);
        ext.insert(ConnectionKey::from_remote(client));
        assert_eq!(found(&mut ext).peer, Some(client));
    }

    #[test]
    fn peer_addr_beats_an_explicit_key_and_the_connect_info() {
        let mut ext = http::Extensions::new();
        ext.insert(tcp());
        ext.insert(ConnectionKey::from_remote(addr("203.0.113.7:5555")));
        ext.insert(PeerAddr(addr("198.51.100.1:1")));
        assert_eq!(found(&mut ext).peer, Some(addr("198.51.100.1:1")));
    }

    /// A key without an address says nothing about the peer: the
    /// connect info still does.
    #[test]
    fn an_explicit_key_without_an_address_leaves_the_connect_info_s_peer() {
        let mut ext = http::Extensions::new();
        ext.insert(tcp());
        ext.insert(ConnectionKey::from_id(3));
        assert_eq!(found(&mut ext).peer, Some(addr("10.0.0.5:40000")));
    }

    /// tonic's `UdsConnectInfo`, as its own Unix-socket serving makes it:
    /// once per accepted socket, cloned into each request.
    #[cfg(unix)]
    fn uds() -> tonic::transport::server::UdsConnectInfo {
        let (server_side, _client_side) = tokio::net::UnixStream::pair().expect("a pair");
        server_side.connect_info()
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn tonic_unix_sockets_are_told_apart_by_their_connect_info() {
        let (a, b) = (uds(), uds());
        let key_of = |info: &tonic::transport::server::UdsConnectInfo| {
            let mut ext = http::Extensions::new();
            ext.insert(info.clone());
            found(&mut ext)
        };
        let (a1, a2, b1) = (key_of(&a), key_of(&a), key_of(&b));
        assert!(a1.connection.is_some(), "identified");
        assert_eq!(a1.connection, a2.connection, "one connection, one key");
        assert_ne!(a1.connection, b1.connection, "two connections, two keys");
        assert_eq!((a1.peer, a1.handle.is_none()), (None, true), "no IP peer");
        assert!(a1.anchor.is_some(), "the key's source is kept");
        let key = a1.connection.expect("identified");
        assert_eq!(key.remote_addr(), None);
        assert!(key.to_string().starts_with("conn-"), "{key}");

        // Without a peer address tonic's info names nothing.
        let mut ext = http::Extensions::new();
        ext.insert(tonic::transport::server::UdsConnectInfo {
            peer_addr: None,
            peer_cred: None,
        });
        let alone = found(&mut ext);
        assert_eq!((alone.connection, alone.peer), (None, None));
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_connection_guard_around_a_unix_socket_gives_its_handle() {
        use tonic::transport::server::UdsConnectInfo;
        let uds = UdsConnectInfo {
            peer_addr: None,
            peer_cred: None,
        };
        let guard = ConnectionGuard::builder().build().expect("valid");
        let (info, handle) = guarded(&guard, uds);
        let mut ext = http::Extensions::new();
        ext.insert(info);
        let found = found(&mut ext);
        assert_eq!(found.connection, Some(handle.key()));
        assert_eq!(found.peer, Some(addr("10.9.9.9:9")), "the IO's own peer");
        assert!(ext.get::<UdsConnectInfo>().is_some(), "unpacked");
        assert!(found.anchor.is_none(), "the handle is the identity");
    }

    // TLS connect infos are checked in `suites/tests/origin_tls.rs` (they
    // need a crypto provider and certificates).
}

#[cfg(feature = "axum")]
#[test]
fn axums_connect_info_gives_the_remote_address() {
    let mut ext = http::Extensions::new();
    ext.insert(axum::extract::ConnectInfo(addr("10.0.0.6:6")));
    let found = found(&mut ext);
    assert_eq!(
        found.connection,
        Some(ConnectionKey::from_remote(addr("10.0.0.6:6")))
    );
    assert_eq!(found.peer, Some(addr("10.0.0.6:6")));
}

/// What `into_make_service_with_connect_info::<GuardedConnectInfo<SocketAddr>>()`
/// inserts under a `GuardedListener`: the handle wins, and the address is
/// handed on as axum's `ConnectInfo<SocketAddr>` for handlers.
#[cfg(feature = "axum")]
#[tokio::test]
async fn axums_guarded_connect_info_is_unpacked() {
    use axum::extract::ConnectInfo;

    use crate::connection::GuardedConnectInfo;

    let guard = ConnectionGuard::builder().build().expect("valid");
    let io = guard.wrap(Peer(Some(addr("10.0.0.7:7"))));
    let mut ext = http::Extensions::new();
    ext.insert(ConnectInfo(GuardedConnectInfo {
        inner: addr("10.0.0.8:8"),
        handle: io.handle().clone(),
    }));
    let found = found(&mut ext);
    assert_eq!(found.connection, Some(io.handle().key()));
    assert_eq!(
        found.peer,
        Some(addr("10.0.0.8:8")),
        "the listener's address"
    );
    assert_eq!(found.handle.map(|h| h.id()), Some(io.handle().id()));
    assert_eq!(
        ext.get::<ConnectInfo<SocketAddr>>().map(|info| info.0),
        Some(addr("10.0.0.8:8"))
    );
    assert_eq!(
        ext.get::<crate::ConnectionHandle>().map(|h| h.id()),
        Some(io.handle().id())
    );
}
