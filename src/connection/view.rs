//! The connection side of the test-only view (cargo feature `test-view`):
//! what a connection guard holds, and the count of its connection states
//! alive.

use super::{ConnectionGuard, registry::ConnState};
use crate::ConnectionHoldings;

impl ConnectionGuard {
    /// What this guard holds now: entries of its table of open connections
    /// and connection states alive. All zero once every connection it
    /// wrapped has been dropped, with the handles and stream records that
    /// name them. For the leak checks of this crate's suites (cargo feature
    /// `test-view`, off by default: it counts connection states, an atomic
    /// increment and decrement per connection); not part of the supported
    /// API. Takes the lock of the table.
    #[doc(hidden)]
    pub fn holdings(&self) -> ConnectionHoldings {
        ConnectionHoldings {
            entries: self.connections.open(),
            live: self.connections.live.get(),
        }
    }
}

/// Counts the state out of its guard's connections alive. Built only with
/// the feature: without it a connection state has no `Drop` of its own.
impl Drop for ConnState {
    fn drop(&mut self) {
        self.connections.live.died();
    }
}
