//! Where a request came from: the connection it arrived on, the peer's
//! socket address, and the [`ConnectionHandle`] of a
//! [`ConnectionGuard`](crate::ConnectionGuard) watching that connection, all
//! read from the request extensions the server filled in.
//!
//! Recognised, in this order (the first that answers wins; for the peer
//! address, see the order below the table):
//!
//! | extension | connection key | peer address | handle |
//! |---|---|---|---|
//! | [`PeerAddr`] (yours) | | itself | |
//! | [`ConnectionKey`] (yours) | itself | its remote address | |
//! | [`ConnectionHandle`] | its id | its peer | itself |
//! | `GuardedConnectInfo<T>`, `T` any of the connect infos below | the handle's id | from `T` | yes |
//! | `TlsConnectInfo<GuardedConnectInfo<T>>` (feature `tls`) | the handle's id | from `T` | yes |
//! | axum's `ConnectInfo<GuardedConnectInfo<SocketAddr>>` (feature `axum`, from a [`GuardedListener`](crate::connection::GuardedListener)) | the handle's id | from the `SocketAddr` | yes |
//! | [`StreamGuard::for_connection`](crate::stream::StreamGuard::for_connection) | that key | its remote address | |
//! | [`connection_key`](crate::StreamGuardBuilder::connection_key) (yours) | what it returns | its remote address | |
//! | tonic's `TcpConnectInfo` | both addresses | remote | |
//! | `TlsConnectInfo<TcpConnectInfo>` (feature `tls`) | both addresses | remote | |
//! | axum's `ConnectInfo<SocketAddr>` (feature `axum`) | remote address | remote | |
//! | tonic's `UdsConnectInfo` | the one value tonic builds per connection | none | |
//!
//! The peer address is the first of: your [`PeerAddr`]; the remote address
//! of your [`ConnectionKey`] extension (so a key that a PROXY-protocol layer
//! inserts for the real client beats the connect info, which names the
//! proxy); the remote address of a connect info (tonic's, plain, under TLS
//! or guarded, or axum's); the remote address of the connection key chosen
//! above (from `for_connection` or your `connection_key`); the peer of the
//! connection guard's IO.
//!
//! A guarded connect info is also unpacked into the request extensions:
//! what it wraps is inserted as itself (so `tonic::Request::remote_addr`
//! keeps working; under TLS, the inner `TcpConnectInfo` is inserted too;
//! under axum, as `ConnectInfo<SocketAddr>`, so handlers' `ConnectInfo`
//! extractor keeps working, and likewise for a Unix socket's address), and
//! the handle as a [`ConnectionHandle`].
//!
//! tonic builds a Unix socket's `UdsConnectInfo` once per connection and
//! clones it into every request: the connection is keyed on its peer
//! address' `Arc` (see `ConnectionKey::from_shared`), and each stream keeps
//! a clone of that `Arc` until its record goes, so the key cannot be
//! reused by another connection while a stream still counts under it.
//!
//! Costs: a few type-keyed map lookups per request, nothing per frame; over
//! tonic's Unix sockets, one reference count more per stream.

use std::{any::Any, net::SocketAddr, sync::Arc};

#[cfg(any(feature = "tonic", feature = "axum"))]
use crate::connection::GuardedConnectInfo;
use crate::{
    connection::ConnectionHandle,
    peer::{ConnectionKey, PeerAddr},
};

/// A user's way to find the connection key in request extensions.
pub(crate) type KeyExtractor<'a> =
    &'a (dyn Fn(&http::Extensions) -> Option<ConnectionKey> + Send + Sync);

/// What the extensions told about a request's origin.
#[derive(Debug, Default)]
pub(crate) struct Found {
    /// The connection, for the per-connection cap and events; `None` when
    /// nothing identifies it.
    pub(crate) connection: Option<ConnectionKey>,
    /// The peer, for the per-peer cap and events.
    pub(crate) peer: Option<SocketAddr>,
    /// The connection guard's handle, when one wraps the connection.
    pub(crate) handle: Option<ConnectionHandle>,
    /// What the connection key is made from, to be kept while the stream
    /// counts under it (see the module docs); `None` unless the key came from
    /// a connect info shared by the connection's requests.
    pub(crate) anchor: Option<Anchor>,
}

/// A value whose address identifies a connection while it lives.
pub(crate) type Anchor = Arc<dyn Any + Send + Sync>;

/// Works out where the request with `extensions` came from. `fixed` is the
/// key a guard service was built with for one connection; `extractor` the
/// builder's [`connection_key`](crate::StreamGuardBuilder::connection_key).
pub(crate) fn identify(
    extensions: &mut http::Extensions,
    fixed: Option<ConnectionKey>,
    extractor: Option<KeyExtractor<'_>>,
) -> Found {
    let handle = handle_of(extensions);
    let extensions = &*extensions;
    let info = connect_info(extensions);
    let explicit = extensions.get::<ConnectionKey>().copied();
    let mut anchor = None;
    let connection = explicit
        .or_else(|| handle.as_ref().map(ConnectionHandle::key))
        .or(fixed)
        .or_else(|| extractor?(extensions))
        .or_else(|| info.map(|(key, _)| key))
        .or_else(|| {
            let (key, shared) = shared_connect_info(extensions)?;
            anchor = Some(shared);
            Some(key)
        });
    let peer = extensions
        .get::<PeerAddr>()
        .map(|PeerAddr(addr)| *addr)
        // Yours before the server's: behind a proxy, the connect info names
        // the proxy and your key the client.
        .or_else(|| explicit?.remote_addr())
        .or_else(|| info.map(|(_, remote)| remote))
        .or_else(|| connection?.remote_addr())
        .or_else(|| handle.as_ref()?.peer());
    Found {
        connection,
        peer,
        handle,
        anchor,
    }
}

/// The connection key of a connect info the server builds once per
/// connection and shares among its requests, with what it is made from:
/// tonic's `UdsConnectInfo` (its peer address, an `Arc` made once per
/// accepted Unix socket).
fn shared_connect_info(extensions: &http::Extensions) -> Option<(ConnectionKey, Anchor)> {
    #[cfg(all(feature = "tonic", unix))]
    if let Some(info) = extensions.get::<tonic::transport::server::UdsConnectInfo>() {
        let shared = info.peer_addr.as_ref()?;
        let key = ConnectionKey::from_shared(shared);
        return Some((key, Arc::clone(shared) as Anchor));
    }
    #[cfg(all(feature = "tls", unix))]
    if let Some(info) = extensions
        .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::UdsConnectInfo>>()
    {
        let shared = info.get_ref().peer_addr.as_ref()?;
        let key = ConnectionKey::from_shared(shared);
        return Some((key, Arc::clone(shared) as Anchor));
    }
    let _ = extensions;
    None
}

/// The connection guard's handle, from a [`ConnectionHandle`] extension or
/// a guarded connect info in any nesting; unpacks the latter (see the
/// module docs).
pub(crate) fn handle_of(extensions: &mut http::Extensions) -> Option<ConnectionHandle> {
    if let Some(handle) = extensions.get::<ConnectionHandle>() {
        return Some(handle.clone());
    }
    #[cfg(feature = "tonic")]
    {
        use tonic::transport::server::TcpConnectInfo;
        if let Some(handle) = unpack_guarded::<TcpConnectInfo>(extensions) {
            return Some(handle);
        }
        #[cfg(unix)]
        if let Some(handle) = unpack_guarded::<tonic::transport::server::UdsConnectInfo>(extensions)
        {
            return Some(handle);
        }
        #[cfg(feature = "tls")]
        {
            use tonic::transport::server::TlsConnectInfo;
            if let Some(handle) = unpack_guarded::<TlsConnectInfo<TcpConnectInfo>>(extensions) {
                return Some(handle);
            }
            if let Some(handle) = unpack_under_tls::<TcpConnectInfo>(extensions) {
                return Some(handle);
            }
            #[cfg(unix)]
            if let Some(handle) =
                unpack_under_tls::<tonic::transport::server::UdsConnectInfo>(extensions)
            {
                return Some(handle);
            }
        }
    }
    #[cfg(feature = "axum")]
    {
        if let Some(handle) = unpack_axum::<SocketAddr>(extensions) {
            return Some(handle);
        }
        #[cfg(unix)]
        if let Some(handle) = unpack_axum::<tokio::net::unix::SocketAddr>(extensions) {
            return Some(handle);
        }
    }
    None
}

/// axum's `ConnectInfo<GuardedConnectInfo<T>>`, from a
/// [`GuardedListener`](crate::connection::GuardedListener): the address is
/// inserted as `ConnectInfo<T>`, where axum's extractor and
/// [`connect_info`] look for it.
#[cfg(feature = "axum")]
fn unpack_axum<T: Clone + Send + Sync + 'static>(
    extensions: &mut http::Extensions,
) -> Option<ConnectionHandle> {
    use axum::extract::ConnectInfo;
    let ConnectInfo(info) = extensions.get::<ConnectInfo<GuardedConnectInfo<T>>>()?;
    let (inner, handle) = (info.get_ref().clone(), info.handle().clone());
    extensions.insert(ConnectInfo(inner));
    extensions.insert(handle.clone());
    Some(handle)
}

/// `GuardedConnectInfo<T>`: the guard wraps the IO tonic sees.
#[cfg(feature = "tonic")]
fn unpack_guarded<T: Clone + Send + Sync + 'static>(
    extensions: &mut http::Extensions,
) -> Option<ConnectionHandle> {
    let info = extensions.get::<GuardedConnectInfo<T>>()?;
    let (inner, handle) = (info.get_ref().clone(), info.handle().clone());
    extensions.insert(inner);
    extensions.insert(handle.clone());
    Some(handle)
}

/// `TlsConnectInfo<GuardedConnectInfo<T>>`: the guard wraps the stream
/// under the application's TLS. `T` is inserted as itself, so that the
/// peer's address is found where tonic looks for it.
#[cfg(feature = "tls")]
fn unpack_under_tls<T: Clone + Send + Sync + 'static>(
    extensions: &mut http::Extensions,
) -> Option<ConnectionHandle> {
    let info =
        extensions.get::<tonic::transport::server::TlsConnectInfo<GuardedConnectInfo<T>>>()?;
    let guarded = info.get_ref();
    let (inner, handle) = (guarded.get_ref().clone(), guarded.handle().clone());
    extensions.insert(inner);
    extensions.insert(handle.clone());
    Some(handle)
}

/// The connection key and peer a server's connect info describes: tonic
/// over TCP, with or without TLS, or axum's `ConnectInfo`.
fn connect_info(extensions: &http::Extensions) -> Option<(ConnectionKey, SocketAddr)> {
    #[cfg(feature = "tonic")]
    {
        use tonic::transport::server::TcpConnectInfo;
        let tcp = |info: &TcpConnectInfo| {
            let remote = info.remote_addr()?;
            let key = match info.local_addr() {
                Some(local) => ConnectionKey::from_addrs(local, remote),
                None => ConnectionKey::from_remote(remote),
            };
            Some((key, remote))
        };
        if let Some(info) = extensions.get::<TcpConnectInfo>() {
            return tcp(info);
        }
        #[cfg(feature = "tls")]
        if let Some(info) =
            extensions.get::<tonic::transport::server::TlsConnectInfo<TcpConnectInfo>>()
        {
            return tcp(info.get_ref());
        }
    }
    #[cfg(feature = "axum")]
    if let Some(axum::extract::ConnectInfo(remote)) =
        extensions.get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return Some((ConnectionKey::from_remote(*remote), *remote));
    }
    let _ = extensions;
    None
}

#[cfg(test)]
#[path = "origin_tests.rs"]
mod tests;
