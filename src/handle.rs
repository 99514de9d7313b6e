//! The handle a handler finds in its request extensions.
//!
//! This is the disconnect callback that tonic does not have: a spawned
//! producer that selects on [`StreamHandle::cancelled`] stops the moment its
//! stream ends, whether the client went away, a guard fired or the call simply
//! finished, instead of running on until its next `send` fails.

use std::{
    fmt,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::{event::EndReason, state::StreamState};

/// A process-wide unique number for a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(u64);

impl StreamId {
    pub(crate) fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        StreamId(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    #[cfg(test)]
    pub(crate) fn for_tests(id: u64) -> Self {
        StreamId(id)
    }

    /// The number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The peer's address, for servers that know it but are not tonic.
///
/// Insert it into the request extensions before the guard (tonic's
/// `TcpConnectInfo` and `TlsConnectInfo` are read without help) and end
/// events and the per-peer cap use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerAddr(pub SocketAddr);

/// A handle on one guarded stream, found in the request extensions.
///
/// The guard inserts it before calling the inner service, so a tonic handler
/// reaches it with `request.extensions().get::<StreamHandle>()` and a hyper or
/// axum handler through the `http::Request`'s extensions. Clones are cheap and
/// may move into spawned tasks; a handle keeps the stream's small shared
/// record alive, not the stream.
///
/// ```
/// use tower_stream_guard::StreamHandle;
///
/// # async fn produce(_: u32) {}
/// # fn handler(extensions: &http::Extensions) {
/// let handle = extensions.get::<StreamHandle>().cloned();
/// tokio::spawn(async move {
///     let Some(handle) = handle else { return };
///     let mut n = 0;
///     loop {
///         tokio::select! {
///             reason = handle.cancelled() => {
///                 println!("stream {} ended: {reason}", handle.id());
///                 return;
///             }
///             () = produce(n) => n += 1,
///         }
///     }
/// });
/// # }
/// ```
#[derive(Clone)]
pub struct StreamHandle {
    pub(crate) state: Arc<StreamState>,
}

impl StreamHandle {
    /// The stream's id, the same as in its [`EndEvent`](crate::EndEvent).
    pub fn id(&self) -> StreamId {
        self.state.id
    }

    /// Resolves when the stream has ended, for any reason, with that reason.
    ///
    /// Resolves at once if the stream has already ended. The future owns what
    /// it needs (`'static`), so it can move into a spawned task; dropping it
    /// cancels nothing. For a stalled reader (a peer that stopped reading) it
    /// resolves when a guard fires, even though the server never polls the
    /// response body again.
    pub fn cancelled(&self) -> impl Future<Output = EndReason> + Send + use<> {
        let state = Arc::clone(&self.state);
        async move { state.ended().await }
    }

    /// Resolves when the server begins to drain (see [`Drain`](crate::Drain)),
    /// at once if it has: time to tell the client to reconnect elsewhere and
    /// finish up before the grace period ends. Never resolves when the
    /// guard was built without a drain. `'static`, like
    /// [`cancelled`](Self::cancelled).
    pub fn draining(&self) -> impl Future<Output = ()> + Send + use<> {
        let drain = self.state.core().drain.clone();
        async move {
            match drain {
                Some(drain) => drain.began().await,
                None => std::future::pending().await,
            }
        }
    }

    /// Whether the server has begun to drain.
    pub fn is_draining(&self) -> bool {
        self.state.core().is_draining()
    }

    /// The connection the stream came on, when a
    /// [`ConnectionGuard`](crate::ConnectionGuard) wraps it.
    pub fn connection(&self) -> Option<&crate::ConnectionHandle> {
        self.state.connection()
    }

    /// Ends the stream now, as [`EndReason::Cancelled`], the way a guard
    /// would: a gRPC response ends with `grpc-status: 1` (`CANCELLED`), a
    /// plain one with a body error, and reads of the request body fail with
    /// `CANCELLED`. On a client ([`response_handle`](crate::StreamGuardBuilder::response_handle)),
    /// the pending `message().await` returns `Code::Cancelled` and the HTTP/2
    /// stream is reset, so the server sees the client go. Returns whether this
    /// call ended the stream (`false` if it had ended already).
    pub fn cancel(&self) -> bool {
        self.state.cancel_by_handle()
    }

    /// Whether the stream has ended (for any reason).
    pub fn is_cancelled(&self) -> bool {
        self.state.is_ended()
    }

    /// Why the stream ended, once it has.
    pub fn end_reason(&self) -> Option<EndReason> {
        self.state.end_reason()
    }

    /// Time left before the maximum lifetime ends the stream, or `None` when no
    /// lifetime applies. Zero once it has passed.
    pub fn remaining_lifetime(&self) -> Option<Duration> {
        self.state.remaining_lifetime()
    }
}

impl fmt::Debug for StreamHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamHandle")
            .field("id", &self.state.id)
            .field("end_reason", &self.state.end_reason())
            .finish()
    }
}
