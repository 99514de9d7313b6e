//! Following a peer's HTTP/2 frames on the read side, to see its GOAWAYs.
//!
//! A client application is not told when its server sends a GOAWAY (RFC 9113
//! §6.8): hyper and h2 act on it inside the connection (no new streams go
//! out on it) but show it to the application at best as the error of a later
//! request. To learn of it, the connection's decrypted IO (the TLS stream,
//! not the TCP stream under it) is wrapped and every byte read from the server goes
//! through a [`FrameReader`], which follows the frame headers and reports
//! each GOAWAY as a [`Goaway`].
//!
//! What is followed: the 9-byte frame headers (24-bit payload length, type,
//! flags, 31-bit stream id), in order, whatever sizes the reads come in.
//! Payloads are skipped by counting, never copied, so a read costs in
//! proportion to the frame headers it holds, not to its bytes; only a GOAWAY
//! payload is kept (its last stream id, error code and the first
//! [`DEBUG_DATA_LIMIT`] bytes of its debug data). The state is a few dozen
//! bytes; nothing is allocated but a reported GOAWAY's debug data.
//!
//! What is checked, so that bytes that are not HTTP/2 are never misread as
//! frames: the first frame a peer sends must be a SETTINGS frame (type 0x4)
//! on stream 0, without ACK, its length a multiple of 6 (RFC 9113 §3.4 and
//! §6.5); a reader of a client's bytes ([`FrameReader::server`]) first
//! checks the 24-byte client connection preface. When a check fails (an
//! HTTP/1.1 response, TLS records because the wrapper is under the TLS) the
//! reader switches off for good ([`FrameReader::is_off`]) and feeding it
//! costs nothing from then on. Later frames are not validated beyond their
//! headers: a GOAWAY shorter than 8 bytes or on a stream other than 0 is a
//! protocol error the peer's own HTTP/2 stack deals with; it is skipped
//! without a report, and the frames after it are followed as usual.

use std::mem;

use bytes::Bytes;

/// How many bytes of a GOAWAY's debug data are kept; the rest is skipped.
pub(crate) const DEBUG_DATA_LIMIT: usize = 256;

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADER_LEN: usize = 9;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
/// A GOAWAY payload's fixed part: last stream id and error code.
const GOAWAY_FIXED: usize = 8;
const STREAM_ID_MASK: u32 = 0x7fff_ffff;

// === impl Goaway ===

/// A GOAWAY frame the server sent (RFC 9113 §6.8): it starts no new stream
/// on this connection and tells which of the client's streams it may still
/// answer.
///
/// A server that shuts down gracefully usually sends two: first one with
/// [`last_stream_id`](Goaway::last_stream_id) `2^31 - 1` and
/// [`NO_ERROR`](Goaway::is_graceful) (stop opening streams here), then,
/// once the streams in flight have reached it, one with the last stream id
/// it really processed. Streams with a higher id were not processed and can
/// be retried on another connection; streams up to it may still complete.
/// A non-zero [`error_code`](Goaway::error_code) means the server closes the
/// connection because of an error.
///
/// ```
/// use tower_stream_guard::connection::Goaway;
///
/// fn describe(goaway: &Goaway) -> String {
///     if goaway.is_graceful() {
///         format!("draining; streams up to {} may finish", goaway.last_stream_id())
///     } else {
///         format!(
///             "closed with error {:#x}: {}",
///             goaway.error_code(),
///             String::from_utf8_lossy(goaway.debug_data()),
///         )
///     }
/// }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Goaway {
    last_stream_id: u32,
    error_code: u32,
    debug_data: Bytes,
}

impl Goaway {
    /// The highest id of a stream the client opened that the server may
    /// have processed or may still process (31 bits: the reserved bit is
    /// cleared). `0` when it processed none; `2^31 - 1` in the first
    /// GOAWAY of a graceful shutdown.
    pub fn last_stream_id(&self) -> u32 {
        self.last_stream_id
    }

    /// The HTTP/2 error code (RFC 9113 §7): `0` (`NO_ERROR`) for a graceful
    /// shutdown, e.g. `0x1` `PROTOCOL_ERROR`, `0x2` `INTERNAL_ERROR`, `0xb`
    /// `ENHANCE_YOUR_CALM` otherwise. Codes unknown to the RFC are passed
    /// on as they came.
    pub fn error_code(&self) -> u32 {
        self.error_code
    }

    /// The opaque debug data the server attached (often a short reason in
    /// text, often empty). Only its first 256 bytes are kept: longer data is
    /// cut there.
    pub fn debug_data(&self) -> &[u8] {
        &self.debug_data
    }

    /// Whether the error code is `NO_ERROR`: the server is draining the
    /// connection rather than failing it.
    pub fn is_graceful(&self) -> bool {
        self.error_code == 0
    }
}

// === impl FrameReader ===

/// Follows the HTTP/2 frames one peer sends and reports its GOAWAYs; see
/// the module docs.
#[derive(Debug)]
pub(crate) struct FrameReader {
    /// The frame header being read, `header_len` bytes of it so far.
    header: [u8; HEADER_LEN],
    header_len: u8,
    /// Whether the first frame (which must be SETTINGS) was seen.
    started: bool,
    state: State,
    /// How many steps `feed` took: the tests check it counts frames, not bytes.
    #[cfg(test)]
    steps: usize,
}

#[derive(Debug)]
enum State {
    /// Checking the client connection preface, `matched` bytes of it so far.
    // Only `FrameReader::server` starts here.
    #[cfg_attr(not(test), allow(dead_code))]
    Preface { matched: u8 },
    /// Reading a frame header.
    Header,
    /// Skipping the rest of a payload.
    Skip { left: u32 },
    /// Reading a GOAWAY payload.
    Goaway(Pending),
    /// Not HTTP/2 (or not what was expected): no longer following.
    Off,
}

/// A GOAWAY payload being read.
#[derive(Debug)]
struct Pending {
    /// The payload's length and how much of it was read.
    len: u32,
    read: u32,
    fixed: [u8; GOAWAY_FIXED],
    debug: Vec<u8>,
}

impl FrameReader {
    /// Follows the frames a server sends (what a client reads): no preface.
    pub(crate) fn client() -> Self {
        Self::starting_in(State::Header)
    }

    /// Follows the frames a client sends (what a server reads): first skips
    /// and checks the 24-byte client connection preface
    /// `"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"`. Nothing follows a client's
    /// frames yet (a server hearing a client's GOAWAY would); the tests keep
    /// this side checked for then.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn server() -> Self {
        Self::starting_in(State::Preface { matched: 0 })
    }

    fn starting_in(state: State) -> Self {
        Self {
            header: [0; HEADER_LEN],
            header_len: 0,
            started: false,
            state,
            #[cfg(test)]
            steps: 0,
        }
    }

    /// Feeds the next bytes read from the peer, in order, split anywhere;
    /// calls `on_goaway` for every GOAWAY frame completed within them.
    pub(crate) fn feed(&mut self, mut bytes: &[u8], mut on_goaway: impl FnMut(Goaway)) {
        while !bytes.is_empty() {
            let used = self.step(bytes, &mut on_goaway);
            bytes = &bytes[used..];
        }
    }

    /// Whether it stopped following (the stream is not HTTP/2). Feeding an
    /// off reader costs nothing.
    pub(crate) fn is_off(&self) -> bool {
        matches!(self.state, State::Off)
    }

    /// Takes what the current state wants from the front of `bytes` (not
    /// empty) and returns how many bytes it took: at least one, so that
    /// every step but the last of a `feed` ends a preface, a header or a
    /// payload.
    fn step(&mut self, bytes: &[u8], on_goaway: &mut impl FnMut(Goaway)) -> usize {
        #[cfg(test)]
        {
            self.steps += 1;
        }
        match &mut self.state {
            State::Off => bytes.len(),
            State::Preface { matched } => {
                let at = usize::from(*matched);
                let n = (PREFACE.len() - at).min(bytes.len());
                if bytes[..n] != PREFACE[at..at + n] {
                    self.state = State::Off;
                    return bytes.len();
                }
                // `at + n <= 24`.
                *matched += n as u8;
                if usize::from(*matched) == PREFACE.len() {
                    self.state = State::Header;
                }
                n
            }
            State::Header => {
                let at = usize::from(self.header_len);
                let n = (HEADER_LEN - at).min(bytes.len());
                self.header[at..at + n].copy_from_slice(&bytes[..n]);
                // `at + n <= 9`.
                self.header_len += n as u8;
                if usize::from(self.header_len) == HEADER_LEN {
                    self.header_len = 0;
                    self.state = self.begin_frame();
                }
                n
            }
            State::Skip { left } => {
                let n = usize::try_from(*left).map_or(bytes.len(), |left| left.min(bytes.len()));
                // `n <= left`, a `u32`.
                *left -= n as u32;
                if *left == 0 {
                    self.state = State::Header;
                }
                n
            }
            State::Goaway(pending) => {
                let n = pending.take(bytes);
                if pending.read == pending.len
                    && let State::Goaway(done) = mem::replace(&mut self.state, State::Header)
                {
                    on_goaway(done.finish());
                }
                n
            }
        }
    }

    /// The state after the frame header in `self.header`.
    fn begin_frame(&mut self) -> State {
        let [l0, l1, l2, kind, flags, s0, s1, s2, s3] = self.header;
        let len = u32::from_be_bytes([0, l0, l1, l2]);
        let stream = u32::from_be_bytes([s0, s1, s2, s3]) & STREAM_ID_MASK;
        if !self.started {
            if kind != SETTINGS || stream != 0 || flags & ACK != 0 || !len.is_multiple_of(6) {
                return State::Off;
            }
            self.started = true;
        }
        if kind == GOAWAY && stream == 0 && len as usize >= GOAWAY_FIXED {
            State::Goaway(Pending::new(len))
        } else if len == 0 {
            State::Header
        } else {
            State::Skip { left: len }
        }
    }
}

// === impl Pending ===

impl Pending {
    fn new(len: u32) -> Self {
        let debug_len = (len as usize - GOAWAY_FIXED).min(DEBUG_DATA_LIMIT);
        Self {
            len,
            read: 0,
            fixed: [0; GOAWAY_FIXED],
            debug: Vec::with_capacity(debug_len),
        }
    }

    /// Takes the payload's bytes from the front of `bytes`, keeping the
    /// fixed part and the debug data up to the limit; returns how many it
    /// took.
    fn take(&mut self, bytes: &[u8]) -> usize {
        let at = self.read as usize;
        let n = (self.len as usize - at).min(bytes.len());
        let end = at + n;
        if at < GOAWAY_FIXED {
            let fixed_end = end.min(GOAWAY_FIXED);
            self.fixed[at..fixed_end].copy_from_slice(&bytes[..fixed_end - at]);
        }
        let (debug_start, debug_end) = (
            at.max(GOAWAY_FIXED),
            end.min(GOAWAY_FIXED + DEBUG_DATA_LIMIT),
        );
        if debug_start < debug_end {
            self.debug
                .extend_from_slice(&bytes[debug_start - at..debug_end - at]);
        }
        // `n <= len - read`.
        self.read += n as u32;
        n
    }

    fn finish(self) -> Goaway {
        let [i0, i1, i2, i3, e0, e1, e2, e3] = self.fixed;
        Goaway {
            last_stream_id: u32::from_be_bytes([i0, i1, i2, i3]) & STREAM_ID_MASK,
            error_code: u32::from_be_bytes([e0, e1, e2, e3]),
            debug_data: Bytes::from(self.debug),
        }
    }
}

#[cfg(test)]
#[path = "frames_tests.rs"]
mod tests;
