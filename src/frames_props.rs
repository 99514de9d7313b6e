//! Property tests of the frame reader: random well-formed frame sequences,
//! and arbitrary bytes against an independent whole-buffer reading, fed
//! split at random points. The encoding helpers are the unit tests'.

use super::*;

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
