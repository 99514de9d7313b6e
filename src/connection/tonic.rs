//! The connect info of guarded connections, for tonic (and for axum's
//! guarded listener).

use super::ConnectionHandle;
#[cfg(feature = "tonic")]
use super::GuardedIo;

/// What tonic puts in the request extensions for a
/// [`GuardedIo`](crate::connection::GuardedIo) (its `Connected` connect
/// info, feature `tonic`): the inner IO's connect info and the connection's
/// handle. The [`StreamGuardLayer`](crate::StreamGuardLayer) also inserts
/// both separately, the handle as a
/// [`ConnectionHandle`](crate::ConnectionHandle) and the inner info as
/// itself (e.g. `TcpConnectInfo`, so `tonic::Request::remote_addr` keeps
/// working); under TLS it reads `TlsConnectInfo<GuardedConnectInfo<_>>` as
/// well. Handlers rarely need this type: ask for the `ConnectionHandle`.
///
/// With feature `axum`, it is also the connect info to serve a router with
/// under a [`GuardedListener`](crate::connection::GuardedListener):
/// `into_make_service_with_connect_info::<GuardedConnectInfo<SocketAddr>>()`.
/// The stream guard then inserts the handle, and axum's
/// `ConnectInfo<SocketAddr>` for handlers that extract it.
///
/// ```
/// # #[cfg(feature = "tonic")]
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tonic::transport::server::{Connected, TcpConnectInfo};
/// use tower_stream_guard::{ConnectionGuard, connection::GuardedConnectInfo};
///
/// let connections = ConnectionGuard::builder().build()?;
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let client = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
/// let (tcp, _) = listener.accept().await?;
/// let io = connections.wrap(tcp);
///
/// let info: GuardedConnectInfo<TcpConnectInfo> = io.connect_info();
/// assert_eq!(info.get_ref().remote_addr(), Some(client.local_addr()?));
/// assert_eq!(info.handle().id(), io.handle().id());
/// # Ok(())
/// # }
/// # #[cfg(not(feature = "tonic"))]
/// # fn main() {}
/// ```
#[derive(Clone, Debug)]
pub struct GuardedConnectInfo<T> {
    pub(crate) inner: T,
    pub(crate) handle: ConnectionHandle,
}

impl<T> GuardedConnectInfo<T> {
    /// The inner IO's connect info.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The connection's handle.
    pub fn handle(&self) -> &ConnectionHandle {
        &self.handle
    }
}

#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected
    for GuardedIo<IO>
{
    type ConnectInfo = GuardedConnectInfo<IO::ConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        GuardedConnectInfo {
            inner: self.inner.connect_info(),
            handle: self.handle.clone(),
        }
    }
}
