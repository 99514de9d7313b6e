//! The connection guard: an id per accepted connection, and closing the
//! connections hyper would otherwise keep forever.
//!
//! A [`ConnectionGuard`] wraps each accepted IO object (a `TcpStream`, a TLS
//! stream) in a [`GuardedIo`]. The guard can then close a connection by
//! failing its reads and writes, which makes hyper drop it at once:
//!
//! - **stalled**: a stream's guard fired but its peer never read the ending
//!   (hyper no longer polls a body without flow-control window, so the
//!   HTTP/2 stream stays open until the peer reads or the connection
//!   closes): the connection is closed after
//!   [`stalled_grace`](ConnectionGuardBuilder::stalled_grace);
//! - **idle**: no stream open for
//!   [`idle_timeout`](ConnectionGuardBuilder::idle_timeout);
//! - **max age**: older than [`max_age`](ConnectionGuardBuilder::max_age),
//!   closed [`max_age_grace`](ConnectionGuardBuilder::max_age_grace) later
//!   (GOAWAY first, where the code that drives the connection asks for it
//!   through [`ConnectionHandle::goaway`]);
//! - **drained**: still open after a [`Drain`]'s grace period.
//!
//! Each connection gets an id, visible to guards and handlers as a
//! [`ConnectionHandle`] in the request extensions (tonic inserts the
//! [`GuardedConnectInfo`] of [`GuardedIo`]'s `Connected` implementation, or
//! `TlsConnectInfo<GuardedConnectInfo<_>>` when the guard wraps the TCP
//! stream under the application's TLS acceptor; the guard layer hands on the
//! inner `TcpConnectInfo`, `TlsConnectInfo` or `UdsConnectInfo`, so
//! `tonic::Request::remote_addr` keeps working). Opening and closing are
//! [`ConnectionEvent`]s.
//!
//! Costs: per read or write of the connection, one atomic load; a waker is
//! registered only when the IO is pending with a different waker than last
//! time. One timer task per connection guard, ticking every
//! [`resolution`](ConnectionGuardBuilder::resolution) (100 ms by default)
//! while it has connections, scans them.

pub(crate) mod event;
pub(crate) mod guard;
pub(crate) mod handle;
mod io;
mod registry;
#[cfg(feature = "hyper")]
mod serve;
mod tonic;

pub use io::{GuardedIncoming, GuardedIo, PeerOf};
pub use tonic::GuardedConnectInfo;

pub(crate) use event::{ConnectionEnd, ConnectionEvent};
pub(crate) use guard::ConnectionGuard;
pub(crate) use handle::ConnectionHandle;
