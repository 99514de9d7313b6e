//! The handle a guarded connection's streams find in their request
//! extensions.

use std::{
    fmt,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use super::{ConnectionEnd, registry::ConnState};
use crate::{
    peer::ConnectionKey,
    sync::{NEVER, wait_until},
};

/// A handle on a guarded connection, in the request extensions of its
/// streams (see the [module docs](crate::connection)). Clones are cheap.
#[derive(Clone)]
pub struct ConnectionHandle {
    pub(crate) state: Arc<ConnState>,
}

impl fmt::Debug for ConnectionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionHandle")
            .field("id", &self.state.id)
            .field("peer", &self.state.peer)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl ConnectionHandle {
    /// The connection's id, unique within the process.
    pub fn id(&self) -> u64 {
        self.state.id
    }

    /// The key stream caps count this connection under:
    /// [`ConnectionKey::from_id`] of its id.
    pub fn key(&self) -> ConnectionKey {
        ConnectionKey::from_id(self.state.id)
    }

    /// The peer's address, if the IO told it.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.state.peer
    }

    /// Guarded streams open on this connection.
    pub fn open_streams(&self) -> usize {
        self.state.streams_open.load(Ordering::Relaxed)
    }

    /// Closes the connection now: its next read or write fails and hyper
    /// drops it (the peer sees the TCP connection close). Streams still open
    /// on it are cancelled.
    pub fn close(&self) {
        self.state.close(ConnectionEnd::Manual);
    }

    /// Whether the guard closed the connection.
    pub fn is_closed(&self) -> bool {
        self.state.end.load(Ordering::Acquire) != 0
    }

    /// Resolves when the guard asks for a graceful close of this connection
    /// (its maximum age was reached): the code driving the connection should
    /// call hyper's `graceful_shutdown` (HTTP/2 GOAWAY). The guard closes it
    /// hard [`max_age_grace`](ConnectionGuardBuilder::max_age_grace) later.
    pub fn goaway(&self) -> impl Future<Output = ()> + Send + 'static {
        let state = Arc::clone(&self.state);
        async move {
            wait_until(&state.goaway, || state.goaway_asked.load(Ordering::Acquire)).await;
        }
    }

    pub(crate) fn stream_started(&self) {
        self.state.streams_open.fetch_add(1, Ordering::Relaxed);
        self.state.streams_total.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stream_ended(&self) {
        let state = &self.state;
        // The time first, then the count (released): a timer that sees no
        // stream open also sees when the last one ended, never an older time
        // that would close the connection as idle at once.
        state
            .quiet_since
            .store(state.connections.now_ns(), Ordering::Relaxed);
        state.streams_open.fetch_sub(1, Ordering::Release);
    }

    /// A guard ended a stream whose response body hyper is not reading.
    pub(crate) fn stream_stalled(&self) {
        let state = &self.state;
        // The time first, then the count, as in `stream_ended`: a timer that
        // sees a stalled stream never sees an older stall's time with it.
        if state.stalled.load(Ordering::Acquire) == 0 {
            state
                .stalled_since
                .store(state.connections.now_ns(), Ordering::Release);
        }
        state.stalled.fetch_add(1, Ordering::AcqRel);
    }

    /// That body was read (or dropped) after all.
    pub(crate) fn stream_unstalled(&self) {
        let state = &self.state;
        if state.stalled.fetch_sub(1, Ordering::AcqRel) == 1 {
            state.stalled_since.store(NEVER, Ordering::Release);
        }
    }
}
