//! `NoticedIo`, the notice's IO wrapper, end to end: whatever a server
//! writes, split into writes of any size and read through reads of any
//! size, the wrapper passes every byte through unchanged and reports exactly
//! the GOAWAY frames in it (property tests); bytes that are not HTTP/2 are
//! passed through and report nothing.

use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower_stream_guard::connection::{GoawayNotice, NoticeEvent};

/// A GOAWAY's last stream id, error code and (kept) debug data.
type Fields = (u32, u32, Vec<u8>);

/// One frame: type, stream id, payload.
#[derive(Clone, Debug)]
struct Frame {
    kind: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    fn encode(&self, out: &mut Vec<u8>) {
        let len = self.payload.len() as u32;
        out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, self.kind, 0]);
        out.extend_from_slice(&self.stream.to_be_bytes());
        out.extend_from_slice(&self.payload);
    }

    /// `(last stream id, error code, debug data)` if this is a well-formed
    /// GOAWAY.
    fn goaway(&self) -> Option<Fields> {
        (self.kind == 7 && self.stream == 0 && self.payload.len() >= 8).then(|| {
            let p = &self.payload;
            (
                u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff,
                u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
                p[8..p.len().min(8 + 256)].to_vec(),
            )
        })
    }
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        // DATA, HEADERS, PING, WINDOW_UPDATE, ... with any payload.
        (
            0u8..10,
            0u32..8,
            proptest::collection::vec(any::<u8>(), 0..3000)
        )
            .prop_map(|(kind, stream, payload)| Frame {
                kind,
                stream,
                payload
            }),
        // GOAWAYs, some with long debug data, some malformed.
        (
            any::<u32>(),
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..400),
            0u32..2
        )
            .prop_map(|(last, code, debug, stream)| {
                let mut payload = last.to_be_bytes().to_vec();
                payload.extend_from_slice(&code.to_be_bytes());
                payload.extend_from_slice(&debug);
                Frame {
                    kind: 7,
                    stream,
                    payload,
                }
            }),
        proptest::collection::vec(any::<u8>(), 0..8).prop_map(|payload| Frame {
            kind: 7,
            stream: 0,
            payload
        }),
    ]
}

/// Writes `bytes` in chunks of `writes` sizes (cycled) to a duplex pipe and
/// reads it through a `NoticedIo` with reads of `reads` sizes (cycled):
/// what was read, and the GOAWAYs reported.
fn run(bytes: Vec<u8>, writes: Vec<usize>, reads: Vec<usize>) -> (Vec<u8>, Vec<Fields>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let notice = GoawayNotice::new();
        let mut events = notice.subscribe();
        let (client, mut server) = tokio::io::duplex(4096);
        let mut io = notice.wrap(client);
        let writer = tokio::spawn(async move {
            let mut at = 0;
            for size in writes.iter().cycle() {
                if at == bytes.len() {
                    break;
                }
                let end = (at + size.max(&1)).min(bytes.len());
                server.write_all(&bytes[at..end]).await.unwrap();
                at = end;
            }
        });
        let mut read = Vec::new();
        let mut buffer = vec![0u8; 70_000];
        for size in reads.iter().cycle() {
            let n = io.read(&mut buffer[..(*size).max(1)]).await.unwrap();
            if n == 0 {
                break;
            }
            read.extend_from_slice(&buffer[..n]);
        }
        writer.await.unwrap();
        let mut goaways = Vec::new();
        while let Ok(event) = events.try_recv() {
            if let NoticeEvent::Goaway { goaway, .. } = event {
                goaways.push((
                    goaway.last_stream_id(),
                    goaway.error_code(),
                    goaway.debug_data().to_vec(),
                ));
            }
        }
        (read, goaways)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// An HTTP/2 server's frames, split anywhere: every byte through, every
    /// well-formed GOAWAY reported once, in order, nothing else.
    #[test]
    fn frames_split_anywhere_report_exactly_their_goaways(
        frames in proptest::collection::vec(frame(), 0..40),
        writes in proptest::collection::vec(1usize..5000, 1..8),
        reads in proptest::collection::vec(1usize..70_000, 1..8),
    ) {
        // The server's preface: a SETTINGS frame on stream 0.
        let mut bytes = vec![0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100];
        for frame in &frames {
            frame.encode(&mut bytes);
        }
        let expected: Vec<_> = frames.iter().filter_map(Frame::goaway).collect();
        let (read, goaways) = run(bytes.clone(), writes, reads);
        prop_assert_eq!(read, bytes);
        prop_assert_eq!(goaways, expected);
    }

    /// Anything else (HTTP/1.1, TLS records, noise), split anywhere: every
    /// byte through, no panic, no GOAWAY made up.
    #[test]
    fn arbitrary_bytes_pass_through_and_report_nothing_made_up(
        bytes in proptest::collection::vec(any::<u8>(), 0..20_000),
        writes in proptest::collection::vec(1usize..5000, 1..8),
        reads in proptest::collection::vec(1usize..70_000, 1..8),
    ) {
        // Unless the noise happens to open with a SETTINGS frame header on
        // stream 0, the reader switches off at once.
        let settings_first = bytes.len() >= 9 && bytes[3] == 4 && bytes[5..9] == [0, 0, 0, 0];
        let (read, goaways) = run(bytes.clone(), writes, reads);
        prop_assert_eq!(read, bytes);
        if !settings_first {
            prop_assert!(goaways.is_empty());
        }
    }
}
