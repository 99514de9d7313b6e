//! Unit and property tests of the frame reader.

use super::*;
use crate::draw::{Draw, for_seeds};

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PING: u8 = 0x6;
const MAX_LEN: u32 = (1 << 24) - 1;

// === encoding helpers ===

fn header(len: u32, kind: u8, flags: u8, stream: u32) -> [u8; HEADER_LEN] {
    let [_, l0, l1, l2] = len.to_be_bytes();
    let [s0, s1, s2, s3] = stream.to_be_bytes();
    [l0, l1, l2, kind, flags, s0, s1, s2, s3]
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = header(payload.len() as u32, kind, flags, stream).to_vec();
    bytes.extend_from_slice(payload);
    bytes
}

/// A server's first frame: SETTINGS with one setting.
fn settings() -> Vec<u8> {
    frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100])
}

fn goaway_payload(last_stream_id: u32, error_code: u32, debug: &[u8]) -> Vec<u8> {
    let mut payload = last_stream_id.to_be_bytes().to_vec();
    payload.extend_from_slice(&error_code.to_be_bytes());
    payload.extend_from_slice(debug);
    payload
}

fn goaway_frame(last_stream_id: u32, error_code: u32, debug: &[u8]) -> Vec<u8> {
    frame(
        GOAWAY,
        0,
        0,
        &goaway_payload(last_stream_id, error_code, debug),
    )
}

/// The `Goaway` a reader must report for a frame with these fields.
fn expected(last_stream_id: u32, error_code: u32, debug: &[u8]) -> Goaway {
    Goaway {
        last_stream_id: last_stream_id & STREAM_ID_MASK,
        error_code,
        debug_data: Bytes::copy_from_slice(&debug[..debug.len().min(DEBUG_DATA_LIMIT)]),
    }
}

fn read(reader: &mut FrameReader, bytes: &[u8]) -> Vec<Goaway> {
    let mut seen = Vec::new();
    reader.feed(bytes, |goaway| seen.push(goaway));
    seen
}

fn read_chunks<'a>(
    reader: &mut FrameReader,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> Vec<Goaway> {
    let mut seen = Vec::new();
    for chunk in chunks {
        reader.feed(chunk, |goaway| seen.push(goaway));
    }
    seen
}

fn concat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

// === hand-written cases ===

#[test]
fn goaway_fields_are_read_and_the_reserved_bit_cleared() {
    let bytes = concat(&[&settings(), &goaway_frame(0x8000_0005, 0xb, b"calm down")]);
    let seen = read(&mut FrameReader::client(), &bytes);
    assert_eq!(seen.len(), 1);
    let goaway = &seen[0];
    assert_eq!(goaway.last_stream_id(), 5);
    assert_eq!(goaway.error_code(), 0xb);
    assert_eq!(goaway.debug_data(), b"calm down");
    assert!(!goaway.is_graceful());
    let graceful = read(
        &mut FrameReader::client(),
        &concat(&[&settings(), &goaway_frame(7, 0, b"")]),
    );
    assert!(graceful[0].is_graceful());
    assert_eq!(graceful[0].debug_data(), b"");
}

#[test]
fn a_goaway_split_at_any_two_points_is_reported_once() {
    let bytes = concat(&[
        &settings(),
        &frame(HEADERS, 0x4, 1, b"headers"),
        &goaway_frame(1, 0, b"bye"),
        &frame(PING, 0, 0, &[1; 8]),
    ]);
    let want = vec![expected(1, 0, b"bye")];
    for i in 0..=bytes.len() {
        for j in i..=bytes.len() {
            let mut reader = FrameReader::client();
            let seen = read_chunks(&mut reader, [&bytes[..i], &bytes[i..j], &bytes[j..]]);
            assert_eq!(seen, want, "split at {i} and {j}");
            assert!(!reader.is_off());
        }
    }
    let mut reader = FrameReader::client();
    assert_eq!(
        read_chunks(&mut reader, bytes.chunks(1)),
        want,
        "byte by byte"
    );
}

#[test]
fn a_16_mib_data_payload_is_skipped_by_counting() {
    let mut reader = FrameReader::client();
    let head = concat(&[&settings(), &header(MAX_LEN, DATA, 0, 1)]);
    assert!(read(&mut reader, &head).is_empty());
    // The payload holds a GOAWAY frame's bytes: they are data, not a frame.
    let mut payload = vec![0; MAX_LEN as usize];
    let fake = goaway_frame(0, 2, b"not a frame");
    payload[..fake.len()].copy_from_slice(&fake);
    let before = reader.steps;
    let chunks: Vec<&[u8]> = payload.chunks(1 << 20).collect();
    assert_eq!(chunks.len(), 16);
    assert!(read_chunks(&mut reader, chunks).is_empty());
    assert_eq!(reader.steps - before, 16, "one step per read, not per byte");
    let seen = read(&mut reader, &goaway_frame(3, 0, b"after"));
    assert_eq!(seen, vec![expected(3, 0, b"after")]);

    // In one read with the frames around it: one step per header and payload.
    let mut reader = FrameReader::client();
    let bytes = concat(&[&head, &payload, &goaway_frame(3, 0, b"after")]);
    assert_eq!(read(&mut reader, &bytes), vec![expected(3, 0, b"after")]);
    assert_eq!(reader.steps, 6);
}

#[test]
fn a_graceful_then_a_final_goaway_are_both_reported_in_order() {
    let bytes = concat(&[
        &settings(),
        &goaway_frame(STREAM_ID_MASK, 0, b"draining"),
        &frame(PING, 0, 0, &[7; 8]),
        &frame(DATA, 0x1, 3, b"last answer"),
        &goaway_frame(3, 0, b""),
    ]);
    let seen = read(&mut FrameReader::client(), &bytes);
    assert_eq!(
        seen,
        vec![
            expected(STREAM_ID_MASK, 0, b"draining"),
            expected(3, 0, b"")
        ]
    );
}

#[test]
fn short_goaways_and_goaways_on_a_stream_are_skipped_and_following_goes_on() {
    let bytes = concat(&[
        &settings(),
        &frame(GOAWAY, 0, 0, b""),
        &frame(GOAWAY, 0, 0, &[0, 0, 0, 1, 0, 0, 0]),
        &goaway_frame(1, 1, b"on a stream")[..5],
        &[0, 0, 0, 1],
        &goaway_frame(1, 1, b"on a stream")[9..],
        &frame(PING, 0, 0, &[1; 8]),
        &goaway_frame(9, 0, b"valid"),
    ]);
    let mut reader = FrameReader::client();
    assert_eq!(read(&mut reader, &bytes), vec![expected(9, 0, b"valid")]);
    assert!(!reader.is_off());
}

#[test]
fn the_reserved_bit_of_the_frame_stream_id_is_ignored() {
    let mut bytes = settings();
    bytes.extend_from_slice(&frame(GOAWAY, 0, 0x8000_0000, &goaway_payload(1, 0, b"")));
    let seen = read(&mut FrameReader::client(), &bytes);
    assert_eq!(seen, vec![expected(1, 0, b"")]);
}

#[test]
fn long_debug_data_is_cut_at_the_limit_and_the_rest_skipped() {
    let long: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
    for len in [
        0,
        1,
        DEBUG_DATA_LIMIT - 1,
        DEBUG_DATA_LIMIT,
        DEBUG_DATA_LIMIT + 1,
        1000,
    ] {
        let bytes = concat(&[
            &settings(),
            &goaway_frame(1, 0, &long[..len]),
            &goaway_frame(2, 0, b"next"),
        ]);
        for size in [1, 7, 100, bytes.len()] {
            let seen = read_chunks(&mut FrameReader::client(), bytes.chunks(size));
            assert_eq!(
                seen,
                vec![expected(1, 0, &long[..len]), expected(2, 0, b"next")],
                "debug data of {len} bytes read in chunks of {size}"
            );
            assert_eq!(seen[0].debug_data().len(), len.min(DEBUG_DATA_LIMIT));
        }
    }
}

#[test]
fn a_largest_goaway_is_followed_to_its_end() {
    let mut reader = FrameReader::client();
    let mut bytes = concat(&[&settings(), &header(MAX_LEN, GOAWAY, 0, 0)]);
    bytes.extend_from_slice(&goaway_payload(5, 2, &[b'x'; 300]));
    bytes.resize(bytes.len() + MAX_LEN as usize - 308, 0);
    bytes.extend_from_slice(&goaway_frame(5, 0, b""));
    let seen = read(&mut reader, &bytes);
    assert_eq!(
        seen,
        vec![expected(5, 2, &[b'x'; 300]), expected(5, 0, b"")]
    );
    assert_eq!(reader.steps, 6);
}

#[test]
fn bytes_that_are_not_http2_switch_the_reader_off() {
    let goaway = goaway_frame(1, 0, b"");
    let tls_server_hello = [
        0x16, 0x03, 0x03, 0x04, 0x20, 0x02, 0x00, 0x00, 0x46, 0x03, 0x03,
    ];
    let cases: [(&str, Vec<u8>); 8] = [
        (
            "an HTTP/1.1 response",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec(),
        ),
        ("TLS records", tls_server_hello.to_vec()),
        ("a client preface", PREFACE.to_vec()),
        ("a DATA frame first", frame(DATA, 0, 1, b"data")),
        ("a GOAWAY first", goaway.clone()),
        ("a SETTINGS ACK first", frame(SETTINGS, ACK, 0, b"")),
        ("SETTINGS on a stream", frame(SETTINGS, 0, 1, b"")),
        ("SETTINGS of a bad length", frame(SETTINGS, 0, 0, &[0; 7])),
    ];
    for (what, bytes) in cases {
        let mut reader = FrameReader::client();
        assert!(read(&mut reader, &bytes).is_empty(), "{what}");
        assert!(reader.is_off(), "{what}");
        // Nothing after it is read as frames, and it costs one step a read.
        let steps = reader.steps;
        let later = concat(&[&settings(), &goaway, &vec![0; 1 << 20]]);
        assert!(read(&mut reader, &later).is_empty(), "{what}");
        assert_eq!(reader.steps, steps + 1, "{what}");
    }
}

#[test]
fn a_settings_frame_first_keeps_the_reader_on() {
    for bytes in [
        frame(SETTINGS, 0, 0, b""),
        frame(SETTINGS, 0xfe, 0, &[0; 18]),
    ] {
        let mut reader = FrameReader::client();
        let bytes = concat(&[&bytes, &goaway_frame(0, 0, b"")]);
        assert_eq!(read(&mut reader, &bytes), vec![expected(0, 0, b"")]);
        assert!(!reader.is_off());
    }
}

#[test]
fn the_server_reader_checks_the_preface_split_across_reads() {
    let bytes = concat(&[PREFACE, &settings(), &goaway_frame(0, 0, b"client leaves")]);
    for i in 0..=bytes.len() {
        for j in i..=bytes.len() {
            let mut reader = FrameReader::server();
            let seen = read_chunks(&mut reader, [&bytes[..i], &bytes[i..j], &bytes[j..]]);
            assert_eq!(
                seen,
                vec![expected(0, 0, b"client leaves")],
                "split at {i} and {j}"
            );
            assert!(!reader.is_off());
        }
    }
}

#[test]
fn the_server_reader_switches_off_at_a_wrong_preface() {
    let mut wrong_end = PREFACE.to_vec();
    wrong_end[23] = b'X';
    let cases: [(&str, Vec<u8>); 3] = [
        (
            "an HTTP/1.1 request",
            b"GET / HTTP/1.1\r\nhost: a\r\n\r\n".to_vec(),
        ),
        ("a preface wrong in its last byte", wrong_end),
        ("frames without a preface", settings()),
    ];
    for (what, head) in cases {
        let bytes = concat(&[&head, &settings(), &goaway_frame(0, 0, b"")]);
        for size in [1, 5, bytes.len()] {
            let mut reader = FrameReader::server();
            assert!(
                read_chunks(&mut reader, bytes.chunks(size)).is_empty(),
                "{what}"
            );
            assert!(reader.is_off(), "{what} in chunks of {size}");
        }
    }
    // A preface prefix so far is not wrong yet.
    let mut reader = FrameReader::server();
    read(&mut reader, &PREFACE[..10]);
    assert!(!reader.is_off());
    // The server's first frame must be SETTINGS too.
    let mut reader = FrameReader::server();
    read(
        &mut reader,
        &concat(&[PREFACE, &frame(HEADERS, 0x4, 1, b"")]),
    );
    assert!(reader.is_off());
}

#[test]
fn empty_reads_change_nothing() {
    let mut reader = FrameReader::client();
    assert!(read(&mut reader, &[]).is_empty());
    assert_eq!(reader.steps, 0);
    let bytes = concat(&[&settings(), &goaway_frame(4, 0, b"")]);
    let seen = read_chunks(&mut reader, [&[][..], &bytes[..12], &[], &bytes[12..], &[]]);
    assert_eq!(seen, vec![expected(4, 0, b"")]);
}

#[test]
fn the_reader_is_a_few_dozen_bytes() {
    // Test builds add the 8-byte step counter.
    assert!(
        size_of::<FrameReader>() <= 64 + 8,
        "{}",
        size_of::<FrameReader>()
    );
}

// === property tests ===

#[path = "frames_props.rs"]
mod props;
