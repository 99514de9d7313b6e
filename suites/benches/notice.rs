//! What `GoawayNotice`'s IO wrapper costs a client's reads: loopback TCP
//! throughput of an HTTP/2-shaped byte stream (SETTINGS, then 16 KiB DATA
//! frames, as a server streaming a response sends), read in 16 KiB reads
//! straight from the socket and through `NoticedIo`, in one run.
//!
//! ```text
//! cargo bench -p stream-guard-suites --bench notice
//! ```

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    runtime::Runtime,
};
use tower_stream_guard::connection::GoawayNotice;

/// Bytes read per iteration.
const PER_ITER: usize = 8 << 20;
/// One read's buffer.
const READ: usize = 16 << 10;
/// DATA payload per frame.
const PAYLOAD: usize = 16 << 10;

/// A connection whose server writes SETTINGS once, then DATA frames
/// forever (as fast as the client reads).
async fn feeding_connection() -> TcpStream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut server, _) = listener.accept().await.unwrap();
        server.set_nodelay(true).unwrap();
        server
            .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
            .await
            .unwrap();
        let mut frames = Vec::new();
        for _ in 0..16 {
            let len = PAYLOAD as u32;
            frames.extend_from_slice(&[
                (len >> 16) as u8,
                (len >> 8) as u8,
                len as u8,
                0,
                0,
                0,
                0,
                0,
                1,
            ]);
            frames.resize(frames.len() + PAYLOAD, 0xab);
        }
        while server.write_all(&frames).await.is_ok() {}
    });
    let client = TcpStream::connect(addr).await.unwrap();
    client.set_nodelay(true).unwrap();
    client
}

async fn read_some<IO: AsyncRead + Unpin>(io: &mut IO, buffer: &mut [u8]) -> usize {
    let mut total = 0;
    while total < PER_ITER {
        let n = io.read(buffer).await.unwrap();
        assert!(n > 0, "the feed does not end");
        total += n;
    }
    black_box(total)
}

fn reads(c: &mut Criterion) {
    let runtime = Runtime::new().unwrap();
    let mut group = c.benchmark_group("loopback-read");
    group.throughput(Throughput::Bytes(PER_ITER as u64));
    let mut buffer = vec![0u8; READ];

    // Both connections first, then raw, wrapped, raw again, wrapped again:
    // what differs between two connections or with the order shows as a
    // difference between the two runs of the same contestant.
    let notice = GoawayNotice::new();
    let mut raw = runtime.block_on(feeding_connection());
    let mut noticed = notice.wrap(runtime.block_on(feeding_connection()));
    for round in ["", "-again"] {
        group.bench_function(format!("raw{round}"), |b| {
            b.iter(|| runtime.block_on(read_some(&mut raw, &mut buffer)));
        });
        group.bench_function(format!("noticed{round}"), |b| {
            b.iter(|| runtime.block_on(read_some(&mut noticed, &mut buffer)));
        });
    }
    assert_eq!(notice.goaways(), 0);
    group.finish();
}

criterion_group!(notice, reads);
criterion_main!(notice);
