//! A test-only view of what a guard holds (cargo feature `test-view`), for
//! suites that must see a leak: cap slots and count-table entries, live
//! stream records and timer filings of a
//! [`StreamGuardLayer`](crate::StreamGuardLayer), live connection entries of
//! a [`ConnectionGuard`](crate::ConnectionGuard). Once every stream and
//! connection has ended and been dropped, each is zero.
//!
//! Never on by default. Slots, table entries and filings are read from
//! state the guards keep anyway (under the locks they already have); only
//! the records and connections alive need counting, one atomic increment
//! and decrement per stream and per connection, and only in builds with
//! the feature. Nothing per frame either way.

use std::{
    fmt,
    sync::atomic::{AtomicUsize, Ordering},
};

/// What a [`StreamGuardLayer`](crate::StreamGuardLayer) holds now (see
/// [`StreamGuardLayer::holdings`](crate::StreamGuardLayer::holdings)):
/// all zero once every stream through it has ended and every part of
/// those streams (bodies, handles, futures) has been dropped.
///
/// For leak checks in this crate's suites; built only with the cargo
/// feature `test-view`, and not part of the supported API.
#[doc(hidden)]
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Holdings {
    /// Cap slots held, summed over the layer's own cap set and every
    /// route's: each admitted stream holds one per set until it ends.
    pub slots: usize,
    /// Entries of the cap sets' count tables (per connection, per peer)
    /// and wait queues, over every set: an entry lives while a stream
    /// holds a slot under its key or waits on it.
    pub cap_entries: usize,
    /// Stream records alive: a record lives until the last of its ticket,
    /// bodies, response future and [`StreamHandle`](crate::StreamHandle)s
    /// is dropped.
    pub records: usize,
    /// Streams filed in the layer's timer: a filing lives until its stream
    /// ends.
    pub timer_filings: usize,
}

impl Holdings {
    /// Whether the layer holds nothing.
    pub fn is_empty(&self) -> bool {
        *self == Holdings::default()
    }
}

impl fmt::Display for Holdings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} cap slots, {} cap table entries, {} stream records, {} timer filings",
            self.slots, self.cap_entries, self.records, self.timer_filings
        )
    }
}

/// What a [`ConnectionGuard`](crate::ConnectionGuard) holds now (see
/// [`ConnectionGuard::holdings`](crate::ConnectionGuard::holdings)): all
/// zero once every connection it wrapped has been dropped and nothing
/// (a stream's record, a handle) keeps its state.
///
/// For leak checks in this crate's suites; built only with the cargo
/// feature `test-view`, and not part of the supported API.
#[doc(hidden)]
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionHoldings {
    /// Entries of the guard's table of open connections (what
    /// [`open_connections`](crate::ConnectionGuard::open_connections)
    /// counts).
    pub entries: usize,
    /// Connection states alive: one per wrapped connection until its
    /// `GuardedIo`, its [`ConnectionHandle`](crate::ConnectionHandle)s and
    /// the records of its streams are dropped.
    pub live: usize,
}

impl ConnectionHoldings {
    /// Whether the guard holds nothing.
    pub fn is_empty(&self) -> bool {
        *self == ConnectionHoldings::default()
    }
}

impl fmt::Display for ConnectionHoldings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} connection table entries, {} connection states alive",
            self.entries, self.live
        )
    }
}

/// How many of something are alive: counted up when one is made and down
/// when it is dropped. `std`'s atomic even under loom: a count for tests,
/// not part of the end protocol the models explore.
#[derive(Default)]
pub(crate) struct Alive(AtomicUsize);

impl Alive {
    pub(crate) fn born(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn died(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}
