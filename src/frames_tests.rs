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

/// The size of the next read: mostly a few bytes, sometimes a page,
/// sometimes up to a mebibyte (at most `ZEROS`), and now and then none.
fn read_size(draw: &mut Draw) -> usize {
    match draw.within(0, 10) {
        0..=4 => draw.within(0, 17) as usize,
        5..=7 => draw.within(17, 4097) as usize,
        _ => draw.within(4097, ZEROS as u64 + 1) as usize,
    }
}

/// The largest read of zeros fed at once, so that long payloads are fed
/// without being built.
const ZEROS: usize = 1 << 20;

/// A byte stream of literal bytes and runs of zeros (long payloads).
#[derive(Default)]
struct Wire {
    pieces: Vec<(usize, Piece)>,
    len: usize,
}

enum Piece {
    Bytes(Vec<u8>),
    Zeros(usize),
}

impl Piece {
    fn len(&self) -> usize {
        match self {
            Piece::Bytes(bytes) => bytes.len(),
            Piece::Zeros(len) => *len,
        }
    }
}

impl Wire {
    fn push(&mut self, piece: Piece) {
        let len = piece.len();
        self.pieces.push((self.len, piece));
        self.len += len;
    }

    fn push_bytes(&mut self, bytes: &[u8]) {
        self.push(Piece::Bytes(bytes.to_vec()));
    }

    /// A payload of `len` bytes starting with `prefix` and random bytes,
    /// the part past 300 bytes as zeros.
    fn push_payload(&mut self, draw: &mut Draw, prefix: &[u8], len: usize) {
        let literal = len.min(300).max(prefix.len());
        let mut bytes = prefix.to_vec();
        bytes.extend(draw.bytes(literal - prefix.len()));
        self.push(Piece::Bytes(bytes));
        if len > literal {
            self.push(Piece::Zeros(len - literal));
        }
    }

    /// The bytes `start..end` (at most `ZEROS` of them), borrowed when they
    /// lie in one piece, else copied into `scratch`.
    fn slice<'a>(
        &'a self,
        start: usize,
        end: usize,
        zeros: &'a [u8],
        scratch: &'a mut Vec<u8>,
    ) -> &'a [u8] {
        let first = self.pieces.partition_point(|(at, _)| *at <= start) - 1;
        let (at, piece) = &self.pieces[first];
        if end <= at + piece.len() {
            return match piece {
                Piece::Bytes(bytes) => &bytes[start - at..end - at],
                Piece::Zeros(_) => &zeros[..end - start],
            };
        }
        scratch.clear();
        for (at, piece) in &self.pieces[first..] {
            if *at >= end {
                break;
            }
            let (from, to) = (start.max(*at) - at, end.min(at + piece.len()) - at);
            match piece {
                Piece::Bytes(bytes) => scratch.extend_from_slice(&bytes[from..to]),
                Piece::Zeros(_) => scratch.extend_from_slice(&zeros[..to - from]),
            }
        }
        scratch
    }

    /// Feeds the whole wire split at random points; returns the GOAWAYs
    /// reported and how many reads it took.
    fn feed_split(
        &self,
        reader: &mut FrameReader,
        draw: &mut Draw,
        zeros: &[u8],
    ) -> (Vec<Goaway>, usize) {
        let (mut seen, mut reads, mut at, mut scratch) = (Vec::new(), 0, 0, Vec::new());
        while at < self.len {
            let end = (at + read_size(draw)).min(self.len);
            reader.feed(self.slice(at, end, zeros, &mut scratch), |goaway| {
                seen.push(goaway)
            });
            reads += 1;
            at = end;
        }
        (seen, reads)
    }
}

/// Random well-formed frame sequences (random types, flags, stream ids and
/// payload lengths up to 16 MiB, GOAWAYs with random debug data), fed split
/// at random points, report exactly the GOAWAYs encoded, in order, with
/// their debug data cut at the limit; and the reader takes a step per read
/// and per header and payload, never per byte: 300 random cases.
#[test]
fn well_formed_frames_split_anywhere_report_exactly_their_goaways() {
    let zeros = vec![0; ZEROS];
    for_seeds(300, |seed| {
        let mut draw = Draw(seed);
        let (mut wire, mut want) = (Wire::default(), Vec::new());
        let server = draw.one_in(4);
        if server {
            wire.push_bytes(PREFACE);
        }
        let settings_len = draw.within(0, 4) as usize * 6;
        let flags = draw.next() as u8 & !ACK;
        wire.push_bytes(&header(settings_len as u32, SETTINGS, flags, 0));
        wire.push_payload(&mut draw, &[], settings_len);
        let frames = draw.within(0, 30) as usize;
        for _ in 0..frames {
            let len = match draw.within(0, 10) {
                0..=6 => draw.within(0, 40),
                7..=8 => draw.within(40, 20_000),
                _ => draw.within(20_000, u64::from(MAX_LEN) + 1),
            } as usize;
            let flags = draw.next() as u8;
            if draw.one_in(4) {
                let len = len.max(GOAWAY_FIXED);
                let reserved = if draw.one_in(2) { 0x8000_0000 } else { 0 };
                let (last, code) = (draw.next() as u32, draw.within(0, 14) as u32);
                let code = if draw.one_in(5) {
                    draw.next() as u32
                } else {
                    code
                };
                let fixed = goaway_payload(last, code, b"");
                wire.push_bytes(&header(len as u32, GOAWAY, flags, reserved));
                let start = wire.pieces.len();
                wire.push_payload(&mut draw, &fixed, len);
                let Piece::Bytes(literal) = &wire.pieces[start].1 else {
                    unreachable!("a payload starts with its literal bytes")
                };
                want.push(expected(last, code, &literal[GOAWAY_FIXED..]));
            } else {
                let kind = match draw.next() as u8 {
                    GOAWAY => DATA,
                    kind => kind,
                };
                wire.push_bytes(&header(len as u32, kind, flags, draw.next() as u32));
                wire.push_payload(&mut draw, &[], len);
            }
        }
        let mut reader = if server {
            FrameReader::server()
        } else {
            FrameReader::client()
        };
        let (seen, reads) = wire.feed_split(&mut reader, &mut draw, &zeros);
        assert_eq!(seen, want);
        assert!(!reader.is_off());
        // Each step ends a read, the preface, a header or a payload.
        let ends = usize::from(server) + 2 * (frames + 1);
        assert!(
            reader.steps <= reads + ends,
            "{} steps for {reads} reads and {ends} ends",
            reader.steps
        );
    });
}

/// A whole-buffer reading of the same rules, written independently of the
/// reader: the GOAWAYs a stream holds and whether the reader must be off.
fn reference(bytes: &[u8], preface: bool) -> (Vec<Goaway>, bool) {
    let mut at = 0;
    if preface {
        let n = bytes.len().min(PREFACE.len());
        if bytes[..n] != PREFACE[..n] {
            return (Vec::new(), true);
        }
        at = n;
    }
    let (mut seen, mut first) = (Vec::new(), true);
    while at + HEADER_LEN <= bytes.len() {
        let h = &bytes[at..at + HEADER_LEN];
        let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
        let stream = u32::from_be_bytes([h[5] & 0x7f, h[6], h[7], h[8]]);
        if first && (h[3] != SETTINGS || stream != 0 || h[4] & ACK != 0 || len % 6 != 0) {
            return (seen, true);
        }
        first = false;
        at += HEADER_LEN;
        if h[3] == GOAWAY && stream == 0 && len >= 8 && at + len <= bytes.len() {
            let p = &bytes[at..at + len];
            seen.push(Goaway {
                last_stream_id: u32::from_be_bytes([p[0] & 0x7f, p[1], p[2], p[3]]),
                error_code: u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
                debug_data: Bytes::copy_from_slice(&p[8..len.min(8 + DEBUG_DATA_LIMIT)]),
            });
        }
        at += len;
    }
    (seen, false)
}

/// Arbitrary bytes, made of random bytes, random frame headers (GOAWAYs and
/// SETTINGS among them, lengths that lie about what follows), prefaces
/// right and wrong: fed split at random points, they never panic and report
/// what the same bytes report fed at once, which is what an independent
/// whole-buffer reading finds: 2,000 random cases.
#[test]
fn any_bytes_split_anywhere_report_what_they_report_at_once() {
    for_seeds(2000, |seed| {
        let mut draw = Draw(seed);
        let server = draw.one_in(3);
        let mut bytes = Vec::new();
        if server && !draw.one_in(8) {
            bytes.extend_from_slice(PREFACE);
            if draw.one_in(8) {
                let at = draw.within(0, 24) as usize;
                bytes[at] ^= 1 << draw.within(0, 8);
            }
        }
        if !draw.one_in(8) {
            let len = if draw.one_in(8) {
                draw.within(0, 20)
            } else {
                draw.within(0, 4) * 6
            };
            bytes.extend_from_slice(&header(len as u32, SETTINGS, draw.next() as u8 & !ACK, 0));
        }
        for _ in 0..draw.within(0, 40) {
            match draw.within(0, 4) {
                0 => {
                    let len = draw.within(0, 30) as usize;
                    bytes.extend(draw.bytes(len));
                }
                _ => {
                    let kind = match draw.within(0, 4) {
                        0 | 1 => GOAWAY,
                        2 => SETTINGS,
                        _ => draw.next() as u8,
                    };
                    let len = match draw.within(0, 8) {
                        0 => draw.within(0, u64::from(MAX_LEN) + 1),
                        _ => draw.within(0, 300),
                    } as u32;
                    let stream = match draw.within(0, 4) {
                        0 => draw.next() as u32,
                        1 => 0x8000_0000,
                        _ => 0,
                    };
                    bytes.extend_from_slice(&header(len, kind, draw.next() as u8, stream));
                    // What follows is often shorter or longer than said.
                    let follows = if draw.one_in(2) {
                        len.min(300)
                    } else {
                        draw.within(0, 300) as u32
                    };
                    bytes.extend(draw.bytes(follows as usize));
                }
            }
        }
        let reader = || {
            if server {
                FrameReader::server()
            } else {
                FrameReader::client()
            }
        };
        let mut whole = reader();
        let at_once = read(&mut whole, &bytes);
        assert_eq!((at_once.clone(), whole.is_off()), reference(&bytes, server));
        for _ in 0..3 {
            let mut split = reader();
            let mut chunks = Vec::new();
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let n = (draw.within(0, 40) as usize).min(rest.len());
                chunks.push(&rest[..n]);
                rest = &rest[n..];
            }
            assert_eq!(read_chunks(&mut split, chunks), at_once);
            assert_eq!(split.is_off(), whole.is_off());
        }
    });
}
