//! Who has the last word on a stream: the one decision that every part able
//! to end a response reads, so that what the peer reads last and the reason
//! its end event gives always agree.
//!
//! A response ends either with the service's last part (a head with nothing
//! after it, the body's last data frame, its trailers,
//! its end or its error) or with the guard's ending (a trailers-only answer
//! or `504`/`503` instead of the head; gRPC trailers or a body error after
//! it). A part that nothing follows claims the end with the record's one
//! compare-and-swap ([`Record::decide`]) *before* it is handed on; when the
//! claim loses, the part is dropped and the ending that won goes out in its
//! place. A guard that fires after a won claim finds the end decided and
//! does nothing. A part that more parts follow (a head before its body, a
//! data frame before the next) only asks whether the stream is still open:
//! if an end comes after that, it reaches the peer through the next part.
//!
//! Also how a stream ends when its holder drops it or its service fails
//! ([`Record::abandoned`], [`Record::failed`]): delivered, its peer
//! unreachable, or cancelled / an error.

use super::record::Record;
use crate::end::Ending;

/// Whose part the peer reads next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub(crate) enum Word {
    /// The service's part goes out.
    Service,
    /// The stream has ended (a guard fired, the handle cancelled it): the
    /// service's part is dropped and the stream's ending goes out instead.
    Guard,
}

impl Record {
    /// How this stream ends when it is dropped before it completed:
    /// [`Ending::PeerUnreachable`] when its connection guard found the
    /// connection's peer unreachable (hyper drops the streams of a
    /// connection after its IO failed, and the IO wrapper marks the
    /// connection on that failure), else [`Ending::Cancelled`].
    pub(crate) fn abandoned(&self) -> Ending {
        // Dropped after its last declared byte went out: delivered (hyper's
        // HTTP/1 drops such a body unpolled).
        if self.delivered() {
            return Ending::Completed;
        }
        if self.peer_unreachable() {
            Ending::PeerUnreachable
        } else {
            Ending::Cancelled
        }
    }

    /// How this stream ends when its service fails: [`Ending::Error`], or
    /// [`Ending::PeerUnreachable`] when the failure is its lost connection's.
    pub(crate) fn failed(&self) -> Ending {
        if self.peer_unreachable() {
            Ending::PeerUnreachable
        } else {
            Ending::Error
        }
    }

    /// Whether this stream's connection guard found the connection's peer
    /// unreachable. One load, read only as the stream ends.
    pub(crate) fn peer_unreachable(&self) -> bool {
        self.after
            .connection()
            .is_some_and(|conn| conn.is_peer_unreachable())
    }

    /// For a part that nothing follows: decides the end as `ending` (the
    /// service's `Completed` or `Error`), unless the stream has already
    /// ended. One compare-and-swap; the rest of the end is left to
    /// [`finish_deferred`](Record::finish_deferred) (the caller's, or the
    /// body's next poll or drop: see `Record::decide_deferred` for why).
    pub(crate) fn last_word(&self, ending: Ending) -> Word {
        // A service that answers because its connection died (its request
        // body failed with the IO error) was not heard: its peer is gone.
        let ending = match ending {
            Ending::Completed | Ending::Error if self.peer_unreachable() => Ending::PeerUnreachable,
            ending => ending,
        };
        if self.decide_deferred(ending) {
            Word::Service
        } else {
            Word::Guard
        }
    }

    /// For a part that more parts follow: the service's, unless the stream
    /// has already ended.
    pub(crate) fn next_word(&self) -> Word {
        if self.is_ended() {
            Word::Guard
        } else {
            Word::Service
        }
    }
}
