//! Unit tests of the record's size and layout.

use std::mem::{offset_of, size_of};

use super::{Record, Side};

/// Every open stream costs one `Record`: a field added by accident
/// shows here first (see BENCHMARKS.md for the memory per stream).
#[test]
fn the_record_stays_small() {
    let size = size_of::<Record>();
    // 408 until the event's metadata and what only some streams need
    // went into boxes of their own (`ending::After`).
    assert!(size <= 264, "Record grew to {size} bytes");
}

/// Bytes `[a, a + len)` and `[b, ..)` with `b` after them share no
/// 64-byte cache line wherever the record is placed.
fn apart(a: usize, len: usize, b: usize) -> bool {
    b >= a + len - 1 + 64
}

#[test]
fn the_two_sides_and_what_both_read_sit_on_separate_cache_lines() {
    let request = offset_of!(Record, request);
    let response = offset_of!(Record, response);
    let shared = offset_of!(Record, shared);
    let phase = offset_of!(Record, phase);
    let side = size_of::<Side>();
    assert!(
        apart(request, side, shared),
        "request side {request}, shared {shared}"
    );
    assert!(shared < phase, "shared {shared}, phase {phase}");
    assert!(
        apart(phase, 1, response),
        "phase {phase}, response side {response}"
    );
}
