//! Streams that take their connection over: an HTTP/1.1 upgrade (a
//! WebSocket, any `101 Switching Protocols`) or an HTTP/1.1 `CONNECT`
//! tunnel.
//!
//! Their response head is not their end: after it, hyper hands the
//! connection's IO to the application, and the stream lives as long as
//! that connection. So the stream's [`Ticket`] is not put in the response
//! body (which hyper drops with the head) but handed to the connection
//! guard's record of the connection, which ends the stream when the
//! connection closes: `Completed` when it closed cleanly, `Cancelled` (or
//! `PeerUnreachable`) when an IO error ended it or the connection guard
//! closed it. Until then the handle is alive, the cap slots held and the
//! timer filing kept; what the connection's IO reads and writes is the
//! stream's request and response activity; and a guard that ends the stream
//! (a limit, a drain, the handle's cancel) closes the connection
//! (`ending.rs`).
//!
//! Without a connection guard nothing can tell when the upgraded
//! connection closes, nor see its traffic: the stream ends at its head as
//! before, `Completed`, and a warning says so once per process.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use http::{Response, StatusCode, Version};

use super::{
    ending::BODY_TAKEN_OVER, future::ForResponse, handle::StreamHandle, record::Record,
    response_body::ResponseBody, ticket::Ticket,
};
use crate::{connection::TakenOver, end::Ending, sync::lock};

/// The service's answer when it hands the connection to the stream: its
/// head, the body passed through (the connection holds the ticket). Else
/// the answer and the ticket back, for the usual way: not an upgrade, no
/// connection guard, or the stream has ended already.
#[allow(clippy::result_large_err)]
pub(crate) fn answer<B>(
    mut response: Response<B>,
    ticket: Ticket,
    for_response: &ForResponse,
) -> Result<Response<ResponseBody<B>>, (Response<B>, Ticket)> {
    // A client's guard sees the server's 101: the connection is the
    // client's, no connection guard's.
    let connect = ticket.after.is_connect();
    if for_response.client || !takes_over(for_response.version, connect, response.status()) {
        return Err((response, ticket));
    }
    let handle = ticket
        .shared
        .admission
        .handle_in_response
        .then(|| StreamHandle {
            record: Arc::clone(ticket.record()),
            goaways_seen: for_response.goaways_seen,
        });
    if let Err(ticket) = hand_over(ticket) {
        return Err((response, ticket));
    }
    if let Some(handle) = handle {
        response.extensions_mut().insert(handle);
    }
    Ok(response.map(ResponseBody::taken_over))
}

/// Whether an answer with `status` to a request of `version` hands the
/// connection to the stream (`connect`: the request's method is
/// `CONNECT`). hyper's HTTP/1 server switches protocols after a `101` and
/// after a `2xx` to `CONNECT`, and serves no other request on that
/// connection. Over HTTP/2 an extended `CONNECT` tunnel is an HTTP/2 stream
/// that hyper hands the application directly: its end cannot be seen.
pub(crate) fn takes_over(version: Version, connect: bool, status: StatusCode) -> bool {
    version <= Version::HTTP_11
        && (status == StatusCode::SWITCHING_PROTOCOLS || (connect && status.is_success()))
}

/// A stream its connection holds: the connection's traffic is its
/// activity, the connection's close its end.
struct Upgraded(Ticket);

impl TakenOver for Upgraded {
    // The request side is what the peer sends, the response side what it
    // is sent: the same notes as the bodies' frames (no wait on the reader
    // is measured here).
    fn read(&self, bytes: usize) {
        self.0.request.note(bytes, self.0.shared.timer.stamp());
    }

    fn wrote(&self, bytes: usize) {
        self.0.response.note(bytes, self.0.shared.timer.stamp());
    }

    fn closed(&self, clean: bool) {
        // Dropped by an unwinding panic: the ticket's own drop, right after,
        // ends the stream without running code that is not ours.
        if std::thread::panicking() {
            return;
        }
        self.0.end(if clean {
            Ending::Completed
        } else {
            self.0.abandoned()
        });
    }
}

/// Hands the stream `ticket` owns to its connection, whose close will end
/// it. Gives the ticket back when the stream has ended already (the guard
/// answers) or no connection guard watches its connection (its head ends
/// it, as any other). A connection that closed meanwhile ends it at once
/// (`Cancelled`): the head never reached the peer.
fn hand_over(ticket: Ticket) -> Result<(), Ticket> {
    let Some(conn) = ticket.after.connection().cloned() else {
        warn_unguarded();
        return Err(ticket);
    };
    if !ticket.mark_taken_over() {
        return Err(ticket);
    }
    // A connection gone already gives the stream back, dropped here.
    drop(conn.take_over(Arc::new(Upgraded(ticket))));
    Ok(())
}

impl Record {
    /// Marks the stream as its connection's (`BODY_TAKEN_OVER`), unless it
    /// has ended. Under the lock `finish` takes before it reads the mark:
    /// either the end sees the mark (and closes the connection), or this
    /// sees the end.
    fn mark_taken_over(&self) -> bool {
        let _late = lock(&self.after.late);
        if self.is_ended() {
            return false;
        }
        self.body.store(BODY_TAKEN_OVER, Ordering::Release);
        true
    }

    /// Whether the stream has taken its connection over: its request side
    /// is the connection's reads, open again after the request's (empty)
    /// body.
    pub(super) fn is_taken_over(&self) -> bool {
        self.body.load(Ordering::Relaxed) == BODY_TAKEN_OVER
    }
}

/// Warns, once per process, that an upgrade went out on a connection no
/// connection guard watches.
#[cold]
fn warn_unguarded() {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            target: "tower_stream_guard",
            "an upgraded connection (101 Switching Protocols or a CONNECT tunnel) is not \
             guarded: no ConnectionGuard wraps its connection, so its stream ends at the \
             response head (its handle reports ended, no limit applies to it); serve through \
             ConnectionGuard::wrap_listener or ConnectionGuard::serve_connection"
        );
    }
}
