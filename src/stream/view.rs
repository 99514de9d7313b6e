//! The stream side of the test-only view (cargo feature `test-view`):
//! what a layer holds, and the count of its records alive.

use super::{record::Record, shared::Shared};
use crate::Holdings;

impl Shared {
    /// What this layer holds now (see [`Holdings`]).
    pub(crate) fn holdings(&self) -> Holdings {
        let sets = self.admission.caps.iter().chain(
            self.admission
                .routes
                .iter()
                .filter_map(|route| route.caps.as_ref()),
        );
        let (mut slots, mut cap_entries) = (0, 0);
        for set in sets {
            slots += set.slots();
            cap_entries += set.entries();
        }
        Holdings {
            slots,
            cap_entries,
            records: self.records.get(),
            timer_filings: self.timer.filed(),
        }
    }
}

/// Counts the record out of its layer's records alive. Built only with the
/// feature: without it a record has no `Drop` of its own.
impl Drop for Record {
    fn drop(&mut self) {
        self.shared.records.died();
    }
}
