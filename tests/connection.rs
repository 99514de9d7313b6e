//! The connection guard driving hyper-util connections itself (feature
//! `hyper`): GOAWAY at the maximum age, the hard close after its grace, and
//! GOAWAY when a drain begins. A hyper HTTP/2 client over loopback TCP.

#![cfg(feature = "hyper")]

use std::{net::SocketAddr, time::Duration};

use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    net::TcpStream,
    time::{Instant, timeout},
};
use tower_stream_guard::{ConnectionEnd, ConnectionGuard, Drain, EndReason, StreamGuardLayer};

// Only some of the shared helpers are used here.
#[allow(dead_code)]
mod support;
use support::{PATIENCE, SLACK};

#[path = "support/h2.rs"]
mod h2;
use h2::{connect, goaway_seen, open, serve};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_age_sends_goaway_first_and_closes_hard_after_the_grace() {
    let age = Duration::from_millis(300);
    let grace = Duration::from_millis(600);
    let connections = ConnectionGuard::builder()
        .max_age(age)
        .max_age_grace(grace)
        // Exactly the age: this test times the GOAWAY against it.
        .max_age_jitter_percent(0)
        .resolution(Duration::from_millis(10))
        .build()
        .unwrap();
    let mut conn_events = connections.subscribe();
    let guard = StreamGuardLayer::builder().build().unwrap();
    let mut events = guard.subscribe();
    let addr = serve(connections.clone(), guard.clone()).await;

    let opened = Instant::now();
    let mut sender = connect(addr).await;
    let mut in_flight = open(&mut sender).await.expect("first stream");
    in_flight.frame().await.unwrap().unwrap();

    let refused_at = goaway_seen(&mut sender).await;
    let goaway_after = refused_at - opened;
    assert!(
        goaway_after >= age,
        "GOAWAY before the age: {goaway_after:?}"
    );
    assert!(
        goaway_after < age + grace,
        "no GOAWAY before the hard close: {goaway_after:?}"
    );

    // The stream in flight goes on after the GOAWAY, until the hard close.
    in_flight
        .frame()
        .await
        .expect("still streaming after GOAWAY")
        .expect("a frame");
    let failed = timeout(PATIENCE, async {
        loop {
            match in_flight.frame().await {
                Some(Ok(_)) => {}
                _ => return Instant::now(),
            }
        }
    })
    .await
    .expect("the hard close ends the stream");
    let closed_after = failed - opened;
    assert!(
        closed_after >= age + grace,
        "closed early: {closed_after:?}"
    );
    assert!(
        closed_after < age + grace + SLACK,
        "closed late: {closed_after:?}"
    );

    let closed = closed(&mut conn_events).await;
    assert_eq!(closed.end(), Some(ConnectionEnd::MaxAge));
    // Every stream the guard saw ended (the in-flight one cancelled).
    loop {
        let event = support::next_event(&mut events).await;
        if event.reason() == EndReason::Cancelled && event.duration() > grace {
            break;
        }
    }
    assert_eq!(guard.active_streams(), 0);
    assert_eq!(connections.open_connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_sends_goaway_and_cuts_the_stream_at_the_end_of_its_grace() {
    let drain = Drain::with_close_delay(Duration::from_millis(200));
    let connections = ConnectionGuard::builder().drain(&drain).build().unwrap();
    let guard = StreamGuardLayer::builder().drain(&drain).build().unwrap();
    let addr = serve(connections.clone(), guard.clone()).await;

    let mut sender = connect(addr).await;
    let mut in_flight = open(&mut sender).await.expect("stream");
    in_flight.frame().await.unwrap().unwrap();

    let grace = Duration::from_millis(500);
    let started = Instant::now();
    let report = drain.start(grace);
    let refused_at = goaway_seen(&mut sender).await;
    assert!(refused_at - started < grace, "GOAWAY as the drain begins");
    let ended = timeout(PATIENCE, async {
        loop {
            match in_flight.frame().await {
                Some(Ok(frame)) if frame.is_data() => {}
                _ => return Instant::now(),
            }
        }
    })
    .await
    .expect("the drain ends the stream");
    let after = ended - started;
    assert!(
        after >= grace && after < grace + SLACK,
        "cut after {after:?}"
    );
    let report = report.await;
    assert_eq!(report.cut(), 1, "{report:?}");
    assert!(report.elapsed() < grace + Duration::from_millis(200) + SLACK);
}

// === Maximum age jitter (gRFC A9), under paused time ===

/// An accepted connection with no network behind it: its reads stay
/// pending until the guard closes it.
struct Quiet;

impl tower_stream_guard::connection::PeerOf for Quiet {
    fn peer(&self) -> Option<SocketAddr> {
        None
    }
}

impl tokio::io::AsyncRead for Quiet {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        _buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Pending
    }
}

/// When one connection was asked to go away and when it was closed hard,
/// counted from when it was wrapped.
#[derive(Clone, Copy, Debug)]
struct Aged {
    goaway: Duration,
    closed: Duration,
}

const MANY: usize = 200;
const AGE: Duration = Duration::from_secs(100);
/// The default resolution of a connection guard's timer: a GOAWAY or close
/// is seen at the first tick at or after its time.
const TICK: Duration = Duration::from_millis(100);

/// Wraps `MANY` connections at once and follows each to its hard close
/// (paused time: the runtime jumps from one timer tick to the next).
async fn age_out(connections: &ConnectionGuard) -> Vec<Aged> {
    use tokio::io::AsyncReadExt;

    let opened = Instant::now();
    let tasks: Vec<_> = (0..MANY)
        .map(|_| {
            let mut io = connections.wrap(Quiet);
            let goaway = io.handle().goaway();
            tokio::spawn(async move {
                goaway.await;
                let goaway = opened.elapsed();
                let err = io.read(&mut [0; 8]).await.expect_err("closed hard");
                assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted);
                Aged {
                    goaway,
                    closed: opened.elapsed(),
                }
            })
        })
        .collect();
    let mut aged = Vec::with_capacity(MANY);
    for task in tasks {
        aged.push(task.await.expect("the connection's task"));
    }
    aged
}

#[tokio::test(start_paused = true)]
async fn max_age_is_jittered_ten_percent_by_default() {
    let connections = ConnectionGuard::builder()
        .max_age(AGE)
        .build()
        .expect("valid");
    let aged = age_out(&connections).await;
    let goaways: Vec<_> = aged.iter().map(|a| a.goaway).collect();
    for goaway in &goaways {
        assert!(
            *goaway >= AGE * 9 / 10 && *goaway <= AGE * 11 / 10 + TICK,
            "GOAWAY outside 100 s ± 10%: {goaway:?}"
        );
    }
    let (min, max) = (goaways.iter().min().unwrap(), goaways.iter().max().unwrap());
    // 200 ages spread evenly over 20 s span nearly all of it; under 15 s
    // happens with a chance of about 200 × 0.75^199.
    assert!(*max - *min >= Duration::from_secs(15), "{min:?}..{max:?}");
    assert!(
        goaways.iter().any(|g| *g < AGE) && goaways.iter().any(|g| *g > AGE + TICK),
        "ages moved one way only: {min:?}..{max:?}"
    );
    let mut distinct = goaways.clone();
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() >= 50, "{} distinct instants", distinct.len());
}

#[tokio::test(start_paused = true)]
async fn max_age_jitter_percent_sets_the_spread() {
    let connections = ConnectionGuard::builder()
        .max_age(AGE)
        .max_age_jitter_percent(50)
        .build()
        .expect("valid");
    let aged = age_out(&connections).await;
    let goaways: Vec<_> = aged.iter().map(|a| a.goaway).collect();
    for goaway in &goaways {
        assert!(
            *goaway >= AGE / 2 && *goaway <= AGE * 3 / 2 + TICK,
            "GOAWAY outside 100 s ± 50%: {goaway:?}"
        );
    }
    let (min, max) = (goaways.iter().min().unwrap(), goaways.iter().max().unwrap());
    assert!(*max - *min >= Duration::from_secs(75), "{min:?}..{max:?}");
}

#[tokio::test(start_paused = true)]
async fn no_jitter_gives_every_connection_exactly_the_age() {
    let grace = Duration::from_secs(10);
    let connections = ConnectionGuard::builder()
        .max_age(AGE)
        .max_age_grace(grace)
        .max_age_jitter_percent(0)
        .build()
        .expect("valid");
    for aged in age_out(&connections).await {
        assert_eq!(aged.goaway, AGE, "{aged:?}");
        assert_eq!(aged.closed, AGE + grace, "{aged:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_hard_close_follows_each_connections_own_goaway_by_the_grace() {
    let grace = Duration::from_secs(10);
    let connections = ConnectionGuard::builder()
        .max_age(AGE)
        .max_age_grace(grace)
        .build()
        .expect("valid");
    let aged = age_out(&connections).await;
    for aged in &aged {
        // Both are seen at the first tick at or after their time.
        let between = aged.closed - aged.goaway;
        assert!(between + TICK > grace && between < grace + TICK, "{aged:?}");
    }
    let mut closes: Vec<_> = aged.iter().map(|a| a.closed).collect();
    closes.sort();
    closes.dedup();
    assert!(closes.len() >= 50, "hard closes bunched: {}", closes.len());
}

#[tokio::test(start_paused = true)]
async fn a_jittered_age_is_never_below_the_resolution() {
    let resolution = Duration::from_secs(1);
    let connections = ConnectionGuard::builder()
        .max_age(resolution)
        .max_age_jitter_percent(99)
        .resolution(resolution)
        .build()
        .expect("valid");
    // Opened half a tick after the timer started, so that an age below the
    // resolution would be seen a tick early rather than rounded up.
    let _first = connections.wrap(Quiet);
    tokio::task::yield_now().await;
    tokio::time::advance(resolution / 2).await;
    for aged in age_out(&connections).await {
        assert!(aged.goaway >= resolution, "{aged:?}");
    }
}

#[test]
fn build_refuses_a_jitter_of_a_hundred_percent_or_more() {
    use tower_stream_guard::ConfigError;

    for percent in [100, 101, u8::MAX] {
        let error = ConnectionGuard::builder()
            .max_age(AGE)
            .max_age_jitter_percent(percent)
            .build()
            .unwrap_err();
        assert_eq!(error, ConfigError::JitterTooLarge { percent });
        assert!(
            error
                .to_string()
                .starts_with(&format!("`max_age_jitter_percent` is {percent};")),
            "{error}"
        );
    }
    for percent in [0, 10, 99] {
        ConnectionGuard::builder()
            .max_age(AGE)
            .max_age_jitter_percent(percent)
            .build()
            .expect("below 100 is fine");
    }
    // Without a maximum age there is nothing to jitter: accepted, ignored.
    ConnectionGuard::builder()
        .max_age_jitter_percent(50)
        .build()
        .expect("jitter without max_age");
}

/// With the default zero `max_age_grace`, the GOAWAY asked for at the age
/// still reaches the client before the hard close (the close waits one
/// resolution): a `GoawayNotice` on the client counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_age_without_grace_still_sends_goaway_before_the_close() {
    let connections = ConnectionGuard::builder()
        .max_age(Duration::from_millis(300))
        .max_age_jitter_percent(0)
        .build()
        .unwrap();
    let mut conn_events = connections.subscribe();
    let guard = StreamGuardLayer::builder().build().unwrap();
    let addr = serve(connections.clone(), guard.clone()).await;

    let notice = tower_stream_guard::connection::GoawayNotice::new();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(notice.wrap(tcp)))
            .await
            .expect("HTTP/2 handshake");
    let driver = tokio::spawn(connection);
    let mut in_flight = open(&mut sender).await.expect("stream");
    in_flight.frame().await.unwrap().unwrap();

    let closed = closed(&mut conn_events).await;
    assert_eq!(closed.end(), Some(ConnectionEnd::MaxAge));
    // The client's connection task reads until the close: by its end it has
    // read whatever the server sent.
    let _ = timeout(PATIENCE, driver)
        .await
        .expect("the client sees the close");
    assert_eq!(notice.goaways(), 1, "no GOAWAY before the hard close");
}

/// A connection that closes gracefully after its max-age GOAWAY (here: the
/// client goes once told) is reported as closed for its age, not `closed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_close_after_the_max_age_goaway_says_max_age() {
    let connections = ConnectionGuard::builder()
        .max_age(Duration::from_millis(200))
        .max_age_grace(Duration::from_secs(30))
        .max_age_jitter_percent(0)
        .build()
        .unwrap();
    let mut conn_events = connections.subscribe();
    let guard = StreamGuardLayer::builder().build().unwrap();
    let addr = serve(connections.clone(), guard).await;
    let mut sender = connect(addr).await;
    // Short streams until refused: the GOAWAY came; nothing is left open,
    // so hyper closes the connection gracefully, long before the grace.
    goaway_seen(&mut sender).await;
    drop(sender);
    let closed = closed(&mut conn_events).await;
    assert_eq!(closed.end(), Some(ConnectionEnd::MaxAge));
    assert!(closed.duration() < Duration::from_secs(30), "{closed:?}");
}

// === Idle connections and drains: GOAWAY first, and the reason kept ===

/// The close event of the connection, skipping its open event.
async fn closed(
    events: &mut tokio::sync::broadcast::Receiver<tower_stream_guard::ConnectionEvent>,
) -> tower_stream_guard::ConnectionEvent {
    loop {
        let event = timeout(PATIENCE, events.recv()).await.unwrap().unwrap();
        if event.end().is_some() {
            return event;
        }
    }
}

/// gRFC A9's MAX_CONNECTION_IDLE: an idle connection gets a GOAWAY before it
/// closes, so its client knows not to start a stream on it; the close,
/// graceful or hard, says `idle`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_gets_goaway_before_it_closes() {
    let connections = ConnectionGuard::builder()
        .idle_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let mut conn_events = connections.subscribe();
    let guard = StreamGuardLayer::builder().build().unwrap();
    let addr = serve(connections.clone(), guard).await;

    let notice = tower_stream_guard::connection::GoawayNotice::new();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(notice.wrap(tcp)))
            .await
            .expect("HTTP/2 handshake");
    let driver = tokio::spawn(connection);
    // One short stream, then nothing.
    drop(open(&mut sender).await.expect("stream"));

    let closed = closed(&mut conn_events).await;
    assert_eq!(closed.end(), Some(ConnectionEnd::Idle));
    let _ = timeout(PATIENCE, driver)
        .await
        .expect("the client sees the close");
    assert_eq!(notice.goaways(), 1, "closed without a GOAWAY");
}

/// A connection that goes away gracefully once a drain's GOAWAY told it
/// to is reported `drained`, as one the drain closed hard would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_close_after_the_drains_goaway_says_drained() {
    let drain = Drain::new();
    let connections = ConnectionGuard::builder().drain(&drain).build().unwrap();
    let mut conn_events = connections.subscribe();
    let guard = StreamGuardLayer::builder().build().unwrap();
    let addr = serve(connections.clone(), guard).await;
    let mut sender = connect(addr).await;
    drop(open(&mut sender).await.expect("stream"));
    let report = drain.start(Duration::from_secs(30));
    // Nothing open: hyper closes the connection after its GOAWAY, long
    // before the drain's grace.
    goaway_seen(&mut sender).await;
    drop(sender);
    let closed = closed(&mut conn_events).await;
    assert_eq!(closed.end(), Some(ConnectionEnd::Drained));
    assert!(report.await.elapsed() < Duration::from_secs(30));
}
