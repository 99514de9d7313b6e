//! The value that owns a stream's life: dropping it ends the stream.
//!
//! Every stream is born inside a [`Ticket`], which moves from the service's
//! `call` into the response future and from there into the response body.
//! Whatever becomes of the last holder (finished, dropped with its task,
//! unwound by a panic), the ticket's `Drop` ends the stream: no path that
//! drops it can lose a stream's end event, cap slots or handle wake-up. (A
//! holder leaked with `mem::forget` never drops it; nothing can help that.)

use std::{ops::Deref, sync::Arc};

use super::{ending::After, policy::Policy, record::Record, shared::Shared};
use crate::end::Ending;

/// Owns one stream: its `Drop` ends it as abandoned ([`Ending::Cancelled`],
/// or [`Ending::PeerUnreachable`] on a connection whose peer was lost)
/// unless it has ended, and finishes an end that was only decided.
pub(crate) struct Ticket(Arc<Record>);

impl Ticket {
    /// Starts a stream of the layer `shared` (see [`Record::new`]), `waiting`
    /// for cap slots or not: its ticket, or `Err` with the ticket of a
    /// stream already ended as refused because the layer's drain had begun.
    pub(crate) fn start(
        shared: &Arc<Shared>,
        policy: &Policy,
        grpc: bool,
        after: After,
        route: u8,
        waiting: bool,
    ) -> Result<Self, Self> {
        let (record, draining) = Record::new(shared, policy, grpc, after, route, waiting);
        let ticket = Ticket(record);
        if draining {
            ticket.refuse_draining();
            return Err(ticket);
        }
        Ok(ticket)
    }

    /// The shared record, for the parts that only watch the stream (the
    /// handle, the request body, the timer).
    pub(crate) fn record(&self) -> &Arc<Record> {
        &self.0
    }
}

impl Deref for Ticket {
    type Target = Record;

    fn deref(&self) -> &Record {
        &self.0
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Dropped by an unwinding panic: only decide here. The rest of an
            // end runs code that is not ours (subscribers, `tracing` layers),
            // and a panic there, inside someone else's unwinding, would abort
            // the process. So it is finished on a task of its own (inline
            // when there is no runtime).
            self.decide_deferred(Ending::Cancelled);
            let finish = FinishOnDrop(Arc::clone(&self.0));
            match tokio::runtime::Handle::try_current() {
                // A runtime that is shutting down drops the task unrun: the
                // end is finished then, inline, rather than never.
                Ok(runtime) => drop(runtime.spawn(async move { drop(finish) })),
                Err(_) => drop(finish),
            }
            return;
        }
        // An end decided while a body or the service panicked, or on the
        // body's last frame, else: abandoned.
        self.finish_deferred();
        self.end(self.abandoned());
    }
}

/// Finishes a decided end when dropped: carried by the task that finishes
/// an end decided during an unwinding, so that the end is finished whether
/// the task runs or is dropped unrun.
struct FinishOnDrop(Arc<Record>);

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        self.0.finish_deferred();
    }
}

/// Decides a stream's end as [`Ending::Panicked`] if the code it brackets
/// unwinds.
///
/// Armed around every call into code the guard does not own (the service's
/// `call` and future; the bodies' `is_end_stream`, `size_hint`, frames,
/// data and `Drop`; the heartbeat's predicate); disarmed, at no cost, when
/// that code returns. It only decides (one compare-and-swap and a store): the
/// [`Ticket`] finishes the end when it is dropped, which is what tokio and
/// hyper do right after they catch the panic; a ticket unwound itself (the
/// service's `call` panicked) hands the finish to a task of its own.
#[must_use = "dropping it at once decides the end"]
pub(crate) struct EndOnUnwind<'a>(&'a Record);

impl<'a> EndOnUnwind<'a> {
    #[inline(always)]
    pub(crate) fn arm(record: &'a Record) -> Self {
        EndOnUnwind(record)
    }

    /// The bracketed code returned: nothing to do.
    #[inline(always)]
    pub(crate) fn disarm(self) {
        std::mem::forget(self);
    }

    /// Runs `code`, bracketed.
    #[inline(always)]
    pub(crate) fn run<T>(record: &'a Record, code: impl FnOnce() -> T) -> T {
        let unwinding = Self::arm(record);
        let out = code();
        unwinding.disarm();
        out
    }
}

impl Drop for EndOnUnwind<'_> {
    fn drop(&mut self) {
        // Reached only by unwinding: `disarm` forgets the guard otherwise.
        self.0.decide_deferred(Ending::Panicked);
    }
}
