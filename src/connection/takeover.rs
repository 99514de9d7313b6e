//! A stream that takes its connection over: an HTTP/1.1 upgrade (a
//! WebSocket, any `101 Switching Protocols`) or an HTTP/1.1 `CONNECT`
//! tunnel. From the answer on, the connection's bytes are the stream's and
//! the connection's close is the stream's end: the stream guard hands the
//! stream to the connection's record here, the [`GuardedIo`](super::GuardedIo)
//! tells it what moves, and the connection's close report ends it.

use std::sync::{Arc, atomic::Ordering};

use super::registry::ConnState;
use crate::sync::lock;

/// The stream side of a takeover, as the connection sees it. Implemented by
/// the stream guard (which this family does not know).
pub(crate) trait TakenOver: Send + Sync {
    /// `bytes` came from the peer.
    fn read(&self, bytes: usize);

    /// `bytes` went to the peer.
    fn wrote(&self, bytes: usize);

    /// The connection closed, `clean` when no IO failed and no guard closed
    /// it: ends the stream, once (a stream a guard ended stays as it ended).
    fn closed(&self, clean: bool);
}

/// Who holds a connection's takeover.
pub(crate) enum Takeover {
    /// No stream took the connection over (yet).
    None,
    Taken(Arc<dyn TakenOver>),
    /// The connection reported its close: nothing can take it over now.
    Closed,
}

impl ConnState {
    /// Hands the connection to `stream`; gives it back when the connection
    /// has already closed or another stream took it over.
    pub(crate) fn take_over(&self, stream: Arc<dyn TakenOver>) -> Result<(), Arc<dyn TakenOver>> {
        // Under the lock the close report takes the stream out under: the
        // stream is either seen by the report or told the connection closed.
        let mut takeover = lock(&self.takeover);
        if !matches!(*takeover, Takeover::None) {
            return Err(stream);
        }
        *takeover = Takeover::Taken(stream);
        self.taken_over.store(true, Ordering::Release);
        Ok(())
    }

    /// The stream that took the connection over, for the IO to keep: asked
    /// once per connection, after `taken_over` says there is one.
    #[cold]
    pub(crate) fn taker(&self) -> Option<Arc<dyn TakenOver>> {
        match &*lock(&self.takeover) {
            Takeover::Taken(stream) => Some(Arc::clone(stream)),
            Takeover::None | Takeover::Closed => None,
        }
    }

    /// The connection closed (its IO was dropped): ends the stream that took
    /// it over, if any. Clean unless an IO error was seen or the guard closed
    /// the connection.
    pub(crate) fn end_takeover(&self) {
        let takeover = std::mem::replace(&mut *lock(&self.takeover), Takeover::Closed);
        if let Takeover::Taken(stream) = takeover {
            let clean = self.end().is_none() && !self.failed.load(Ordering::Acquire);
            stream.closed(clean);
        }
    }
}

/// Tells the stream that took the connection over what moved: `taker` is the
/// IO's own copy, fetched the first time the connection says there is one.
/// For other connections one atomic load per read or write, no lock.
#[inline]
pub(crate) fn note(
    taker: &mut Option<Arc<dyn TakenOver>>,
    state: &ConnState,
    moved: impl FnOnce(&dyn TakenOver),
) {
    if taker.is_none() {
        if !state.taken_over.load(Ordering::Acquire) {
            return;
        }
        *taker = state.taker();
    }
    if let Some(stream) = taker {
        moved(&**stream);
    }
}
