//! tonic's connect info for guarded connections.

use super::ConnectionHandle;
#[cfg(feature = "tonic")]
use super::GuardedIo;

/// What tonic puts in the request extensions for a [`GuardedIo`](super::GuardedIo): the inner
/// IO's connect info and the connection's handle. The stream guard layer
/// also inserts both separately (the inner info as itself, e.g.
/// `TcpConnectInfo`, so `tonic::Request::remote_addr` keeps working).
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
