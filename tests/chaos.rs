//! Chaos: rounds of hundreds of streams over many loopback connections, each
//! stream given a random fate, in front of a real tonic server. After every
//! round: nothing active, exactly one end event per stream with the reason
//! its fate implies (checked per connection), every cap slot back, no task
//! left, and memory not growing from round to round.
//!
//! Every connection goes through a small TCP proxy in this file, which can
//! forward, freeze (a half-open peer: nothing moves, nothing closes) or
//! vanish (both sockets dropped, as when a client process dies). The proxy's
//! outbound address is what the server sees as the peer, which ties each end
//! event to its connection.
//!
//! The fates: completes; client cancels; silent (nobody sends a thing);
//! outlives its lifetime; stalled reader (alone on its connection: unread
//! data blocks the connection's flow-control window); half-open peer; vanished
//! peer; refused by a cap; cut by a drain started mid-run.
//!
//! ```text
//! cargo test --test chaos                                   # 3 rounds, seed from the clock
//! CHAOS_SEED=42 cargo test --test chaos                     # replay a seed
//! CHAOS_SOAK_SECS=600 cargo test --test chaos -- --ignored  # the 10-minute soak
//! ```
//!
//! The seed is printed when a round fails.

#[path = "../examples/common/mod.rs"]
mod common;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{
    EchoService,
    echo::{EchoRequest, StreamRequest, echo_client::EchoClient, echo_server::EchoServer},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::JoinSet,
    time::{Instant, timeout},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, transport::Channel};
use tower_stream_guard::{
    ConnectionGuard, Drain, EndEvent, EndReason, IdleDirection, RoutePolicy, StreamCap,
    StreamGuardLayer,
};

#[allow(dead_code)]
mod support;
use support::{PATIENCE, wait_for_no_tasks, wait_until};

const IDLE: Duration = Duration::from_millis(500);
const LIFETIME: Duration = Duration::from_secs(1);
const GRACE: Duration = Duration::from_millis(300);
/// Replies of the streams that must look busy to the idle timeout.
const BUSY_INTERVAL_MS: u32 = 100;
/// The per-connection cap of streams marked `capped`.
const CAP: usize = 4;

/// What happens to one stream, and so why it must end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fate {
    Completes,
    Cancels,
    Silent,
    OutlivesLifetime,
    StalledReader,
    HalfOpen,
    Vanishes,
    /// Holds a slot of the capped route until the drain cuts it.
    CapHolder,
    Rejected,
    Drained,
}

impl Fate {
    fn reason(self) -> EndReason {
        match self {
            Fate::Completes => EndReason::Completed,
            Fate::Cancels | Fate::Vanishes => EndReason::Cancelled,
            Fate::Silent | Fate::StalledReader | Fate::HalfOpen => {
                EndReason::IdleTimeout(IdleDirection::Both)
            }
            Fate::OutlivesLifetime => EndReason::LifetimeExceeded,
            Fate::CapHolder | Fate::Drained => EndReason::Drained,
            Fate::Rejected => EndReason::Rejected(StreamCap::PerConnection),
        }
    }

    /// The code the client must see, where it reads to the end.
    fn client_code(self) -> Option<Code> {
        match self {
            Fate::Completes => Some(Code::Ok),
            Fate::Silent | Fate::OutlivesLifetime => Some(Code::DeadlineExceeded),
            Fate::CapHolder | Fate::Drained => Some(Code::Unavailable),
            Fate::Rejected => Some(Code::ResourceExhausted),
            _ => None,
        }
    }

    /// Ends before the drain starts.
    fn ends_early(self) -> bool {
        !matches!(self, Fate::CapHolder | Fate::Drained)
    }
}

/// splitmix64: seeded, good enough to pick fates.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProxyMode {
    Forward,
    Freeze,
    Vanish,
}

/// A one-connection TCP proxy in front of `server`. Returns the address to
/// connect to, the switch, and (once connected) the proxy's outbound local
/// address: the peer the server sees.
async fn proxy(
    server: SocketAddr,
    tasks: &mut JoinSet<()>,
) -> (
    SocketAddr,
    watch::Sender<ProxyMode>,
    tokio::sync::oneshot::Receiver<SocketAddr>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let addr = listener.local_addr().expect("proxy addr");
    let (mode, watch_mode) = watch::channel(ProxyMode::Forward);
    let (peer_tx, peer_rx) = tokio::sync::oneshot::channel();
    tasks.spawn(async move {
        let Ok((inbound, _)) = listener.accept().await else {
            return;
        };
        drop(listener);
        let outbound = TcpStream::connect(server).await.expect("proxy connect");
        let _ = outbound.set_nodelay(true);
        let _ = inbound.set_nodelay(true);
        let _ = peer_tx.send(outbound.local_addr().expect("outbound addr"));
        let (in_read, in_write) = inbound.into_split();
        let (out_read, out_write) = outbound.into_split();
        // Both directions end together: when one side closes or the proxy
        // vanishes, every socket is dropped.
        tokio::select! {
            () = pipe(in_read, out_write, watch_mode.clone()) => {}
            () = pipe(out_read, in_write, watch_mode) => {}
        }
    });
    (addr, mode, peer_rx)
}

/// Copies `from` into `to` while the mode is `Forward`; stops moving bytes
/// (without closing) on `Freeze`; returns on `Vanish` or a closed socket.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<ProxyMode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let current = *mode.borrow_and_update();
        match current {
            ProxyMode::Vanish => return,
            ProxyMode::Freeze => {
                if mode.changed().await.is_err() {
                    return;
                }
            }
            ProxyMode::Forward => {
                let n = tokio::select! {
                    changed = mode.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        continue;
                    }
                    read = from.read(&mut buf) => match read {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    },
                };
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// One connection of a round: its proxy and the fates of its streams.
struct Connection {
    client: EchoClient<Channel>,
    mode: watch::Sender<ProxyMode>,
    /// The peer the server sees for this connection.
    peer: SocketAddr,
    fates: Vec<Fate>,
}

fn tagged<T>(message: T, fate: Fate) -> Request<T> {
    let mut request = Request::new(message);
    let tag = match fate {
        Fate::OutlivesLifetime => "lifetime",
        Fate::CapHolder | Fate::Rejected => "capped",
        _ => "plain",
    };
    request
        .metadata_mut()
        .insert("x-fate", tag.parse().expect("ascii"));
    request
}

fn busy(count: u32) -> StreamRequest {
    StreamRequest {
        count,
        interval_ms: BUSY_INTERVAL_MS,
        size: 8,
    }
}

/// Reads a stream to its end; the status code it ended with.
async fn read_to_end(mut stream: tonic::Streaming<common::echo::EchoReply>) -> Code {
    loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => return Code::Ok,
            Err(status) => return status.code(),
        }
    }
}

/// Opens one stream with its fate. Returns once the server has the stream
/// (response headers, or a refusal, are back) with a task that plays the
/// rest of the fate and yields the code the client saw, if it reads to the
/// end.
async fn open(
    mut client: EchoClient<Channel>,
    fate: Fate,
    streams: &mut JoinSet<(Fate, Option<Code>)>,
) {
    match fate {
        Fate::Completes => {
            let request = StreamRequest {
                count: 3,
                interval_ms: 0,
                size: 8,
            };
            let stream = client
                .server_stream(tagged(request, fate))
                .await
                .expect("stream opens")
                .into_inner();
            streams.spawn(async move { (fate, Some(read_to_end(stream).await)) });
        }
        Fate::Cancels | Fate::Vanishes => {
            let mut stream = client
                .server_stream(tagged(busy(0), fate))
                .await
                .expect("stream opens")
                .into_inner();
            stream.message().await.expect("first reply").expect("reply");
            if fate == Fate::Cancels {
                drop(stream);
                streams.spawn(async move { (fate, None) });
            } else {
                streams.spawn(async move {
                    // The proxy vanishes: whatever the client sees, it ends.
                    let _ = read_to_end(stream).await;
                    (fate, None)
                });
            }
        }
        Fate::Silent | Fate::HalfOpen => {
            let (tx, rx) = mpsc::channel::<EchoRequest>(4);
            let stream = client
                .bidi(tagged(ReceiverStream::new(rx), fate))
                .await
                .expect("stream opens")
                .into_inner();
            streams.spawn(async move {
                if fate == Fate::Silent {
                    let code = read_to_end(stream).await;
                    drop(tx);
                    return (fate, Some(code));
                }
                // Half-open: talks every interval until the proxy freezes;
                // then nothing moves and this task waits until aborted.
                let talk = async {
                    loop {
                        let message = EchoRequest {
                            message: "ping".into(),
                        };
                        if tx.send(message).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(BUSY_INTERVAL_MS.into())).await;
                    }
                };
                tokio::join!(talk, read_to_end(stream));
                (fate, None)
            });
        }
        Fate::OutlivesLifetime | Fate::CapHolder | Fate::Drained => {
            let stream = client
                .server_stream(tagged(busy(0), fate))
                .await
                .expect("stream opens")
                .into_inner();
            streams.spawn(async move { (fate, Some(read_to_end(stream).await)) });
        }
        Fate::StalledReader => {
            let request = StreamRequest {
                count: 0,
                interval_ms: 0,
                size: 16 * 1024,
            };
            let stream = client
                .server_stream(tagged(request, fate))
                .await
                .expect("stream opens")
                .into_inner();
            // Never read: kept until the round ends.
            streams.spawn(async move {
                std::future::pending::<()>().await;
                drop(stream);
                (fate, None)
            });
        }
        Fate::Rejected => {
            let refused = client.server_stream(tagged(busy(0), fate)).await;
            let code = match refused {
                Ok(_) => Code::Ok,
                Err(status) => status.code(),
            };
            streams.spawn(async move { (fate, Some(code)) });
        }
    }
}

/// Plans a round's connections: shared ones with a mix of fates (some with
/// a capped group), and connections of their own for stalled readers,
/// half-open and vanishing peers.
fn plan(rng: &mut Rng, scale: usize) -> Vec<Vec<Fate>> {
    let mixed = [
        Fate::Completes,
        Fate::Cancels,
        Fate::Silent,
        Fate::OutlivesLifetime,
        Fate::Drained,
    ];
    let mut connections = Vec::new();
    for _ in 0..12 * scale {
        let n = 20 + rng.below(40) as usize;
        let mut fates: Vec<Fate> = (0..n)
            .map(|_| mixed[rng.below(mixed.len() as u64) as usize])
            .collect();
        if rng.below(3) == 0 {
            fates.extend([Fate::CapHolder; CAP]);
            fates.extend(std::iter::repeat_n(
                Fate::Rejected,
                1 + rng.below(3) as usize,
            ));
        }
        connections.push(fates);
    }
    for _ in 0..3 * scale {
        connections.push(vec![Fate::StalledReader]);
        connections.push(vec![Fate::HalfOpen; 2 + rng.below(5) as usize]);
        connections.push(vec![Fate::Vanishes; 2 + rng.below(5) as usize]);
    }
    connections
}

/// What one round measured.
#[derive(Debug, Default)]
struct RoundReport {
    streams: usize,
    connections: usize,
    by_fate: BTreeMap<String, usize>,
}

/// Runs one round; panics (naming the seed) on any broken invariant.
async fn round(seed: u64, scale: usize) -> RoundReport {
    let mut rng = Rng(seed);
    let events: Arc<Mutex<Vec<EndEvent>>> = Arc::default();
    let drain = Drain::new().close_connections_after(Duration::from_millis(200));
    // Closes what hyper would keep open past the drain: connections of
    // frozen peers and of stalled readers.
    let connection_guard = ConnectionGuard::builder()
        .drain(&drain)
        .build()
        .expect("valid configuration");
    let guard = {
        let events = Arc::clone(&events);
        StreamGuardLayer::builder()
            .idle_timeout(IDLE)
            .max_streams(100_000)
            .max_streams_per_peer(100_000)
            .route_when(
                |r| r.headers().get("x-fate").is_some_and(|v| v == "lifetime"),
                RoutePolicy::new().max_lifetime(LIFETIME),
            )
            .route_when(
                |r| r.headers().get("x-fate").is_some_and(|v| v == "capped"),
                RoutePolicy::new().max_streams_per_connection(CAP),
            )
            .drain(&drain)
            .on_end(move |event| events.lock().unwrap().push(event.clone()))
            .build()
            .expect("valid configuration")
    };
    let service = EchoService::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server_addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(guard.clone().for_tonic())
            .add_service(EchoServer::new(service.clone()))
            .serve_with_incoming_shutdown(
                connection_guard.wrap_incoming(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                ),
                drain.started(),
            ),
    );

    let mut proxies = JoinSet::new();
    let mut connections = Vec::new();
    for fates in plan(&mut rng, scale) {
        let (addr, mode, peer) = proxy(server_addr, &mut proxies).await;
        let client = EchoClient::connect(format!("http://{addr}"))
            .await
            .expect("connect through the proxy");
        let peer = peer.await.expect("the proxy connected");
        connections.push(Connection {
            client,
            mode,
            peer,
            fates,
        });
    }

    // Open every stream (holders of a capped group before their rejected
    // followers), then play the fates that need the test's hand.
    // Client tasks: those that end before the drain, those the drain ends,
    // and those that never end by themselves (half-open, stalled).
    let (mut early, mut late_clients, mut hanging) =
        (JoinSet::new(), JoinSet::new(), JoinSet::new());
    for connection in &connections {
        for &fate in &connection.fates {
            let tasks = match fate {
                Fate::HalfOpen | Fate::StalledReader => &mut hanging,
                fate if fate.ends_early() => &mut early,
                _ => &mut late_clients,
            };
            open(connection.client.clone(), fate, tasks).await;
        }
    }
    for connection in &connections {
        match connection.fates.first() {
            Some(Fate::HalfOpen) => connection.mode.send_replace(ProxyMode::Freeze),
            Some(Fate::Vanishes) => connection.mode.send_replace(ProxyMode::Vanish),
            _ => ProxyMode::Forward,
        };
    }

    let connection_count = connections.len();
    let all: Vec<Fate> = connections.iter().flat_map(|c| c.fates.clone()).collect();
    let late = all.iter().filter(|f| !f.ends_early()).count();
    let fail = |what: &str| format!("CHAOS_SEED={seed}: {what}");
    // Every fate but the drain's plays out by itself within the lifetime
    // plus the timer's slack.
    let deadline = Instant::now() + LIFETIME + PATIENCE;
    while guard.active_streams() > late {
        assert!(
            Instant::now() < deadline,
            "{}",
            fail(&format!(
                "{} streams still open before the drain, {late} expected",
                guard.active_streams()
            ))
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every client whose stream ended before the drain saw its code (read
    // now: the drain closes connections soon after its grace).
    check_clients(&mut early, &fail).await;
    let report = timeout(GRACE + PATIENCE, drain.start(GRACE))
        .await
        .unwrap_or_else(|_| panic!("{}", fail("the drain did not finish")));
    timeout(PATIENCE, server)
        .await
        .unwrap_or_else(|_| panic!("{}", fail("the server did not stop after the drain")))
        .expect("server task")
        .expect("server");
    assert_eq!(report.cut() as usize, late, "{}", fail("drain cut count"));

    check_clients(&mut late_clients, &fail).await;
    hanging.shutdown().await;
    for connection in &connections {
        connection.mode.send_replace(ProxyMode::Vanish);
    }
    drop(
        connections
            .iter()
            .map(|c| c.client.clone())
            .collect::<Vec<_>>(),
    );

    // The server's view: one event per stream, with its fate's reason, per
    // connection.
    assert_eq!(
        guard.active_streams(),
        0,
        "{}",
        fail("active after the round")
    );
    let events = std::mem::take(&mut *events.lock().unwrap());
    assert_eq!(events.len(), all.len(), "{}", fail("one event per stream"));
    let mut ids: Vec<u64> = events.iter().map(|e| e.id().get()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), events.len(), "{}", fail("an event twice"));
    for connection in &connections {
        let mut expected: Vec<String> = connection
            .fates
            .iter()
            .map(|f| f.reason().to_string())
            .collect();
        let mut got: Vec<String> = events
            .iter()
            .filter(|e| e.peer() == Some(connection.peer))
            .map(|e| e.reason().to_string())
            .collect();
        expected.sort();
        got.sort();
        assert_eq!(
            got,
            expected,
            "{}",
            fail(&format!(
                "reasons on the connection of {:?}",
                connection.fates[0]
            ))
        );
    }
    let stats = guard.stats();
    assert_eq!(stats.active(), 0, "{}", fail("stats active"));
    assert_eq!(
        stats.ended_total(),
        all.len() as u64,
        "{}",
        fail("stats total")
    );
    assert!(
        guard.connection_streams().is_empty(),
        "{}",
        fail("cap slots")
    );
    assert!(guard.peer_streams().is_empty(), "{}", fail("peer slots"));

    drop(connections);
    proxies.shutdown().await;
    wait_until("every handler and producer has stopped", || {
        service.live_producers() == 0 && service.live_handlers() == 0
    })
    .await;
    wait_for_no_tasks().await;

    let mut report = RoundReport {
        streams: all.len(),
        connections: connection_count,
        ..RoundReport::default()
    };
    for fate in &all {
        *report.by_fate.entry(format!("{fate:?}")).or_default() += 1;
    }
    report
}

/// Waits for every client task of `tasks`; each that read its stream to the
/// end must have seen the code its fate implies.
async fn check_clients(tasks: &mut JoinSet<(Fate, Option<Code>)>, fail: &impl Fn(&str) -> String) {
    let outcomes = timeout(PATIENCE, async {
        let mut outcomes = Vec::new();
        while let Some(done) = tasks.join_next().await {
            outcomes.push(done.expect("client task"));
        }
        outcomes
    })
    .await
    .unwrap_or_else(|_| panic!("{}", fail("client tasks did not finish")));
    for (fate, code) in outcomes {
        if let (Some(expected), Some(code)) = (fate.client_code(), code) {
            assert_eq!(
                code,
                expected,
                "{}",
                fail(&format!("client code of {fate:?}"))
            );
        }
    }
}

fn seed() -> u64 {
    std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// Resident memory of this process, Linux only (0 elsewhere).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn print(label: &str, report: &RoundReport, seed: u64) {
    eprintln!(
        "{label} seed {seed}: {} streams on {} connections; {:?}; rss {} MiB",
        report.streams,
        report.connections,
        report.by_fate,
        rss_bytes() >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stream_is_accounted_for_exactly_once() {
    let seed = seed();
    eprintln!("chaos: CHAOS_SEED={seed}");
    let mut rss = Vec::new();
    for i in 0..3 {
        let report = round(seed.wrapping_add(i), 2).await;
        print(&format!("round {i}"), &report, seed.wrapping_add(i));
        rss.push(rss_bytes());
    }
    // After the first round has warmed up the allocator, later rounds reuse
    // its memory.
    let growth = rss[2].saturating_sub(rss[1]);
    assert!(
        growth < 16 << 20,
        "CHAOS_SEED={seed}: memory grew by {} KiB between rounds 2 and 3",
        growth >> 10
    );
}

/// The soak: rounds back to back for `CHAOS_SOAK_SECS` seconds (default
/// 600), with half as many streams again per round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a long soak: CHAOS_SOAK_SECS=600 cargo test --test chaos -- --ignored"]
async fn soak() {
    let seconds: u64 = std::env::var("CHAOS_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let seed = seed();
    eprintln!("soak: CHAOS_SEED={seed}, {seconds} s");
    let started = Instant::now();
    let end = started + Duration::from_secs(seconds);
    let mut rounds = 0u64;
    let mut streams = 0;
    // Resident memory once the allocator has warmed up (after the first
    // quarter of the soak; in the 10-minute soak it climbs for about 30
    // rounds, then stays flat), and at the end.
    let mut warm_rss = None;
    while Instant::now() < end {
        let report = round(seed.wrapping_add(rounds), 3).await;
        streams += report.streams;
        if warm_rss.is_none() && started.elapsed() * 4 >= Duration::from_secs(seconds) {
            warm_rss = Some(rss_bytes());
        }
        if rounds.is_multiple_of(10) {
            print(
                &format!("soak round {rounds}"),
                &report,
                seed.wrapping_add(rounds),
            );
        }
        rounds += 1;
    }
    let warm = warm_rss.unwrap_or_else(rss_bytes);
    let growth = rss_bytes().saturating_sub(warm);
    eprintln!(
        "soak: {rounds} rounds, {streams} streams; rss {} MiB after warm-up, grew {} KiB since",
        warm >> 20,
        growth >> 10
    );
    // A short soak ends before the warm-up does: nothing to judge.
    assert!(
        rounds < 120 || growth < 8 << 20,
        "CHAOS_SEED={seed}: memory grew by {} KiB after warm-up",
        growth >> 10
    );
}
