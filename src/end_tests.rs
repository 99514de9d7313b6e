//! The table of endings: order, codes, one row per reason, messages.

use super::*;

#[test]
fn the_table_is_in_ending_order_and_codes_round_trip() {
    for (index, row) in ROWS.iter().enumerate() {
        assert_eq!(usize::from(row.ending.code()), index + 1, "{row:?}");
        assert_eq!(Ending::from_code(row.ending.code()), Some(row.ending));
    }
    assert_eq!(Ending::from_code(0), None);
    assert_eq!(Ending::from_code(ROWS.len() as u8 + 1), None);
}

#[test]
fn every_reason_has_a_row_of_its_own() {
    for reason in EndReason::ALL {
        assert_eq!(Ending::of(reason).reason(), reason);
    }
    for row in &ROWS {
        assert!(EndReason::ALL.contains(&row.reason), "{row:?}");
        assert!(row.status.is_some() || row.log == Log::Quiet, "{row:?}");
    }
}

#[test]
fn messages_name_their_limit_and_setting() {
    assert_eq!(
        Ending::IdleRequest.message(Duration::from_secs(2), 0),
        "stream idle: no request frame for 2s (request_idle_timeout)"
    );
    assert_eq!(
        Ending::RejectedTotal.message(Duration::ZERO, 8),
        "stream refused: at most 8 concurrent streams in total (max_streams)"
    );
    assert_eq!(
        Ending::SlowReader.message(Duration::from_secs(10), 4096),
        "stream too slow: the client read fewer than 4096 bytes in 10s while data waited \
         for it (min_response_rate)"
    );
    assert!(
        Ending::RejectedNoPeer
            .message(Duration::ZERO, 1)
            .contains("PeerAddr")
    );
}
