//! The guard in front of a real tonic server, called by a real tonic client
//! over loopback TCP.
//!
//! Guard durations are short (a few hundred milliseconds); the tests wait for
//! the *end event* through the guard's subscription with a bounded timeout, and
//! poll the service's counters for a bounded time. No test sleeps to wait for
//! a guard. After each scenario: no stream is left active, the handler's
//! background work has ended, exactly one event per stream was emitted, and
//! the server shuts down gracefully (no stream left open).
//!
//! Where a test waits for the producer or echo task to stop after the guard
//! ended the stream, it uses `EchoService::stopping_only_on_the_handle()`:
//! those tasks ignore their channel closing, so only the `StreamHandle` can
//! stop them (the guard drops the response body as it ends a stream, which
//! would stop an ordinary producer by itself).

#[path = "../examples/common/mod.rs"]
mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use common::{
    EchoService,
    echo::{
        EchoReply, EchoRequest, StreamRequest, echo_client::EchoClient, echo_server::EchoServer,
    },
};
use tokio::{
    net::TcpListener,
    sync::{broadcast::error::TryRecvError, mpsc, oneshot},
    task::JoinHandle,
    time::timeout,
};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Code, Status, transport::Channel};
use tower::ServiceBuilder;
use tower_stream_guard::{EndReason, IdleDirection, StreamGuardLayer};

mod support;
use support::{PATIENCE, SLACK, assert_no_more_events, next_event, wait_for_no_tasks, wait_until};

struct TestServer {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl TestServer {
    async fn client(&self) -> EchoClient<Channel> {
        EchoClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect to the test server")
    }

    /// Shuts the server down gracefully; fails if it does not finish in time
    /// (graceful shutdown waits for every open stream) or if any task is left
    /// on the runtime afterwards. Call it after dropping the clients.
    async fn stop(mut self) {
        let _ = self.shutdown.take().expect("stopped once").send(());
        timeout(PATIENCE, &mut self.task)
            .await
            .expect("server did not shut down gracefully in time: a stream is still open")
            .expect("server task panicked")
            .expect("server failed");
        // Every task is gone: connection tasks, the producers and echo tasks,
        // the guard's timer task (it exits when it has no streams).
        wait_for_no_tasks().await;
    }
}

/// Serves a clone of `$svc` on 127.0.0.1:0 behind `$layer`.
macro_rules! serve {
    ($layer:expr, $svc:expr) => {{
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (shutdown, signal) = oneshot::channel::<()>();
        let router = tonic::transport::Server::builder()
            .layer($layer)
            .add_service(EchoServer::new($svc.clone()));
        let task = tokio::spawn(router.serve_with_incoming_shutdown(
            TcpListenerStream::new(listener),
            async move {
                let _ = signal.await;
            },
        ));
        TestServer {
            addr,
            shutdown: Some(shutdown),
            task,
        }
    }};
}

fn msg(text: &str) -> EchoRequest {
    EchoRequest {
        message: text.to_owned(),
    }
}

/// The bytes one reply takes on the wire: 5-byte gRPC frame header + message.
fn wire_len(reply: &EchoReply) -> u64 {
    5 + prost::Message::encoded_len(reply) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_server_stream_is_cancelled_and_its_producer_stops() {
    let guard = StreamGuardLayer::builder()
        .max_lifetime(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let svc = EchoService::stopping_only_on_the_handle();
    let server = serve!(guard.clone(), svc);
    let mut client = server.client().await;

    let mut stream = client
        .server_stream(StreamRequest {
            count: 0,
            interval_ms: 5,
            size: 8,
        })
        .await
        .expect("server_stream call")
        .into_inner();
    for expected in ["0", "1"] {
        let reply = timeout(PATIENCE, stream.message())
            .await
            .expect("reply in time")
            .expect("reply ok")
            .expect("stream open");
        assert_eq!(reply.message, expected);
    }
    assert_eq!(guard.active_streams(), 1);
    assert_eq!(svc.live_producers(), 1);
    drop(stream);

    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Cancelled);
    assert_eq!(event.path(), "/echo.Echo/ServerStream");
    assert!(event.response().frames >= 2, "{event:?}");
    assert_eq!(event.limit(), None);
    wait_until("the producer task has stopped", || {
        svc.live_producers() == 0
    })
    .await;
    assert_eq!(guard.active_streams(), 0);
    assert_no_more_events(&mut events).await;

    drop(client);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_stream_hits_request_idle_timeout() {
    let idle = Duration::from_millis(300);
    let guard = StreamGuardLayer::builder()
        .request_idle_timeout(idle)
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let svc = EchoService::new();
    let server = serve!(guard.clone(), svc);
    let mut client = server.client().await;

    // One message, then neither another message nor a half-close.
    let (tx, rx) = mpsc::channel(4);
    tx.send(msg("only")).await.unwrap();
    let started = Instant::now();
    let result = timeout(PATIENCE, client.client_stream(ReceiverStream::new(rx)))
        .await
        .expect("the call did not end in time");
    let status = result.expect_err("a silent client-streaming call must fail");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("request_idle_timeout"),
        "message should name the guard: {status:?}"
    );
    let elapsed = started.elapsed();
    assert!(elapsed >= idle, "fired early: {elapsed:?}");
    assert!(elapsed < idle + SLACK, "fired late: {elapsed:?}");

    let event = next_event(&mut events).await;
    assert_eq!(
        event.reason(),
        EndReason::IdleTimeout(IdleDirection::Request)
    );
    assert_eq!(event.grpc_status(), Some(4));
    assert_eq!(event.limit(), Some(idle));
    assert_eq!(event.request().frames, 1, "{event:?}");
    assert!(event.duration() >= idle, "{event:?}");
    wait_until("the client-stream handler has returned", || {
        svc.live_handlers() == 0
    })
    .await;
    assert_eq!(guard.active_streams(), 0);
    assert_no_more_events(&mut events).await;

    drop(tx);
    drop(client);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidi_echoes_then_silent_client_hits_idle_timeout() {
    let idle = Duration::from_millis(400);
    let guard = StreamGuardLayer::builder()
        .idle_timeout(idle)
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let svc = EchoService::stopping_only_on_the_handle();
    let server = serve!(guard.clone(), svc);
    let mut client = server.client().await;

    let (tx, rx) = mpsc::channel(4);
    let mut stream = client
        .bidi(ReceiverStream::new(rx))
        .await
        .expect("bidi call")
        .into_inner();
    let mut quiet_since = Instant::now();
    for text in ["a", "b"] {
        // Taken before the last message goes out: the stream's last activity
        // comes after it, so the guard cannot fire before `idle` from here.
        quiet_since = Instant::now();
        tx.send(msg(text)).await.unwrap();
        let reply = timeout(PATIENCE, stream.message())
            .await
            .expect("echo in time")
            .expect("echo ok")
            .expect("stream open");
        assert_eq!(reply.message, text);
    }
    assert_eq!(svc.live_handlers(), 1);

    // The client now goes silent without half-closing.
    let status = timeout(PATIENCE, stream.message())
        .await
        .expect("the idle guard did not end the stream in time")
        .expect_err("an idle bidi stream must end with an error");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("(idle_timeout)"),
        "message should name the guard: {status:?}"
    );
    let quiet = quiet_since.elapsed();
    assert!(quiet >= idle, "fired early: {quiet:?}");
    assert!(quiet < idle + SLACK, "fired late: {quiet:?}");

    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::IdleTimeout(IdleDirection::Both));
    assert_eq!(event.grpc_status(), Some(4));
    assert_eq!(event.request().frames, 2, "{event:?}");
    assert_eq!(event.response().frames, 2, "{event:?}");
    wait_until("the bidi echo task has stopped", || {
        svc.live_handlers() == 0
    })
    .await;
    assert_eq!(guard.active_streams(), 0);
    assert_no_more_events(&mut events).await;

    drop(tx);
    drop(stream);
    drop(client);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidi_kept_busy_outlives_idle_timeout_and_completes_on_half_close() {
    let idle = Duration::from_millis(400);
    let pace = Duration::from_millis(100);
    let rounds = 16; // 1.6 s: four idle periods
    let guard = StreamGuardLayer::builder()
        .idle_timeout(idle)
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let svc = EchoService::new();
    let server = serve!(guard.clone(), svc);
    let mut client = server.client().await;

    let (tx, rx) = mpsc::channel(4);
    let mut stream = client
        .bidi(ReceiverStream::new(rx))
        .await
        .expect("bidi call")
        .into_inner();
    let started = Instant::now();
    // The client's own pace: one message every 100 ms, well within the idle
    // period.
    let mut ticker = tokio::time::interval(pace);
    for i in 0..rounds {
        ticker.tick().await;
        let text = format!("m{i}");
        tx.send(msg(&text)).await.unwrap();
        let reply = timeout(PATIENCE, stream.message())
            .await
            .expect("echo in time")
            .unwrap_or_else(|status| panic!("busy stream was cut at round {i}: {status:?}"))
            .expect("stream open");
        assert_eq!(reply.message, text);
        assert!(
            matches!(events.try_recv(), Err(TryRecvError::Empty)),
            "a busy stream ended at round {i}"
        );
    }
    assert!(
        started.elapsed() >= idle * 3,
        "the stream did not outlive several idle periods: {:?}",
        started.elapsed()
    );
    assert_eq!(guard.active_streams(), 1);

    // Half-close: the echo task sees the end and the call completes.
    drop(tx);
    let end = timeout(PATIENCE, stream.message())
        .await
        .expect("the stream did not end after the half-close")
        .expect("a half-closed bidi stream ends cleanly");
    assert!(end.is_none(), "unexpected reply after half-close: {end:?}");

    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Completed);
    assert_eq!(event.grpc_status(), Some(0));
    let wire_bytes: u64 = (0..rounds)
        .map(|i| 5 + prost::Message::encoded_len(&msg(&format!("m{i}"))) as u64)
        .sum();
    // The half-close arrives as one more, empty, data frame: not counted.
    assert_eq!(event.request().frames, rounds, "{event:?}");
    assert_eq!(event.request().bytes, wire_bytes, "{event:?}");
    assert_eq!(event.response().frames, rounds, "{event:?}");
    assert_eq!(event.response().bytes, wire_bytes, "{event:?}");
    assert!(event.duration() >= idle * 3, "{event:?}");
    wait_until("the bidi echo task has stopped", || {
        svc.live_handlers() == 0
    })
    .await;
    assert_eq!(guard.active_streams(), 0);
    assert_no_more_events(&mut events).await;

    drop(stream);
    drop(client);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stream_with_only_response_traffic_is_not_idle_under_idle_timeout() {
    // `idle_timeout` watches both directions: a server stream whose request
    // ended long ago stays alive as long as replies keep flowing.
    let idle = Duration::from_millis(400);
    let count = 12; // one every 100 ms: three idle periods in all
    let guard = StreamGuardLayer::builder()
        .idle_timeout(idle)
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let svc = EchoService::new();
    let server = serve!(guard.clone(), svc);
    let mut client = server.client().await;

    let started = Instant::now();
    let mut stream = client
        .server_stream(StreamRequest {
            count,
            interval_ms: 100,
            size: 8,
        })
        .await
        .expect("server_stream call")
        .into_inner();
    let mut received = 0;
    let mut received_bytes = 0;
    loop {
        match timeout(PATIENCE, stream.message())
            .await
            .expect("reply or end in time")
        {
            Ok(Some(reply)) => {
                received += 1;
                received_bytes += wire_len(&reply);
            }
            Ok(None) => break,
            Err(status) => panic!("a busy server stream was cut after {received}: {status:?}"),
        }
    }
    assert_eq!(received, count);
    assert!(started.elapsed() >= idle * 2, "{:?}", started.elapsed());

    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Completed);
    assert_eq!(event.grpc_status(), Some(0));
    assert_eq!(event.response().bytes, received_bytes, "{event:?}");
    wait_until("the producer task has stopped", || {
        svc.live_producers() == 0
    })
    .await;
    assert_eq!(guard.active_streams(), 0);
    assert_no_more_events(&mut events).await;

    drop(stream);
    drop(client);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_reader_is_released_by_response_idle_timeout() {
    let idle = Duration::from_millis(300);
    let guard = StreamGuardLayer::builder()
        .response_idle_timeout(idle)
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let svc = EchoService::stopping_only_on_the_handle();
    let server = serve!(guard.clone(), svc);
    let mut client = server.client().await;

    // Large replies as fast as possible; the client never reads, so the
    // HTTP/2 window fills and hyper stops polling the response body.
    let started = Instant::now();
    let mut stream = client
        .server_stream(StreamRequest {
            count: 0,
            interval_ms: 0,
            size: 256 * 1024,
        })
        .await
        .expect("server_stream call")
        .into_inner();

    let event = next_event(&mut events).await;
    let waited = started.elapsed();
    assert_eq!(
        event.reason(),
        EndReason::IdleTimeout(IdleDirection::Response)
    );
    assert_eq!(event.grpc_status(), Some(4));
    assert!(event.duration() >= idle, "fired early: {event:?}");
    assert!(
        waited < idle + SLACK,
        "the guard fired late for a stalled reader: {waited:?}"
    );
    assert!(event.response().bytes > 0, "{event:?}");
    // While the client still holds its (unread) stream:
    wait_until("the producer task has stopped", || {
        svc.live_producers() == 0
    })
    .await;
    assert_eq!(guard.active_streams(), 0);
    assert_no_more_events(&mut events).await;

    // If the peer ever reads again it gets what was buffered, then the
    // guard's trailers.
    let mut received = 0_u64;
    let status = timeout(PATIENCE, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => received += 1,
                Ok(None) => panic!("stalled stream ended without an error"),
                Err(status) => break status,
            }
        }
    })
    .await
    .expect("the stalled stream did not end once the client read it");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("response_idle_timeout"),
        "{status:?}"
    );
    let sent_bytes = event.response().bytes;
    assert!(received > 0);
    assert!(
        received * (256 * 1024) <= sent_bytes,
        "received {received} replies, only {sent_bytes} bytes counted"
    );
    assert_no_more_events(&mut events).await;

    drop(stream);
    drop(client);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_lifetime_ends_a_server_stream_mid_flight() {
    let lifetime = Duration::from_millis(600);
    let guard = StreamGuardLayer::builder()
        .max_lifetime(lifetime)
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let svc = EchoService::stopping_only_on_the_handle();
    let server = serve!(guard.clone(), svc);
    let mut client = server.client().await;

    let started = Instant::now();
    let mut stream = client
        .server_stream(StreamRequest {
            count: 0,
            interval_ms: 20,
            size: 16,
        })
        .await
        .expect("server_stream call")
        .into_inner();
    let mut received = 0_u64;
    let mut received_bytes = 0_u64;
    let status = timeout(PATIENCE, async {
        loop {
            match stream.message().await {
                Ok(Some(reply)) => {
                    received += 1;
                    received_bytes += wire_len(&reply);
                }
                Ok(None) => panic!("an endless stream ended without an error"),
                Err(status) => break status,
            }
        }
    })
    .await
    .expect("the lifetime guard did not end the stream in time");
    let elapsed = started.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("max_lifetime"), "{status:?}");
    assert!(elapsed >= lifetime, "fired early: {elapsed:?}");
    assert!(elapsed < lifetime + SLACK, "fired late: {elapsed:?}");
    assert!(received >= 3, "only {received} replies before the end");

    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::LifetimeExceeded);
    assert_eq!(event.grpc_status(), Some(4));
    assert_eq!(event.limit(), Some(lifetime));
    assert!(event.duration() >= lifetime, "{event:?}");
    assert!(event.request().frames >= 1, "{event:?}");
    assert!(
        event.response().frames >= 1 && event.response().frames <= received,
        "{event:?}, received {received}"
    );
    assert_eq!(
        event.response().bytes,
        received_bytes,
        "bytes counted vs bytes the client decoded"
    );
    wait_until("the producer task has stopped", || {
        svc.live_producers() == 0
    })
    .await;
    assert_eq!(guard.active_streams(), 0);
    assert_no_more_events(&mut events).await;

    drop(stream);
    drop(client);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_lifetime_before_response_headers_gives_trailers_only_deadline_exceeded() {
    let lifetime = Duration::from_millis(300);
    let guard = StreamGuardLayer::builder()
        .max_lifetime(lifetime)
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let svc = EchoService::new();
    let server = serve!(guard.clone(), svc);
    let mut client = server.client().await;

    // The client never sends and never half-closes: the handler never answers.
    let (tx, rx) = mpsc::channel::<EchoRequest>(1);
    let started = Instant::now();
    let status: Status = timeout(PATIENCE, client.client_stream(ReceiverStream::new(rx)))
        .await
        .expect("the lifetime guard did not answer in time")
        .expect_err("the call must fail");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("max_lifetime"), "{status:?}");
    let elapsed = started.elapsed();
    assert!(elapsed >= lifetime, "fired early: {elapsed:?}");
    assert!(elapsed < lifetime + SLACK, "fired late: {elapsed:?}");

    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::LifetimeExceeded);
    assert_eq!(event.grpc_status(), Some(4));
    assert_eq!(event.request().frames, 0, "{event:?}");
    assert_eq!(event.response().frames, 0, "{event:?}");
    wait_until("the client-stream handler has been dropped", || {
        svc.live_handlers() == 0
    })
    .await;
    assert_eq!(guard.active_streams(), 0);
    assert_no_more_events(&mut events).await;

    drop(tx);
    drop(client);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_call_completes_with_status_ok_and_peer() {
    let guard = StreamGuardLayer::builder()
        .idle_timeout(Duration::from_secs(10))
        .max_lifetime(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let svc = EchoService::new();
    let server = serve!(guard.clone(), svc);
    let mut client = server.client().await;

    let reply = timeout(PATIENCE, client.unary(msg("hello")))
        .await
        .expect("unary call in time")
        .expect("unary call ok")
        .into_inner();
    assert_eq!(reply.message, "hello");

    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Completed);
    assert_eq!(event.grpc_status(), Some(0));
    assert_eq!(event.path(), "/echo.Echo/Unary");
    assert_eq!(event.method(), http::Method::POST);
    assert_eq!(event.limit(), None);
    assert!(event.request().frames >= 1, "{event:?}");
    assert_eq!(
        event.request().bytes,
        5 + prost::Message::encoded_len(&msg("hello")) as u64
    );
    assert!(event.response().frames >= 1, "{event:?}");
    assert_eq!(event.response().bytes, wire_len(&reply));
    let peer = event.peer().expect("peer address from TcpConnectInfo");
    assert!(peer.ip().is_loopback(), "{peer}");
    assert_ne!(peer.port(), 0);
    assert_ne!(peer, server.addr, "peer must be the client, not the server");
    assert_eq!(guard.active_streams(), 0);
    assert_no_more_events(&mut events).await;

    drop(client);
    server.stop().await;
}

/// Two guards nested in each other are independent: each enforces its own
/// limits and emits its own event per stream. The outer one (a request idle
/// timeout) ends stream A; the inner one (a lifetime) ends stream B, whose
/// guard-made trailers the outer one sees as the stream's normal end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_guards_each_enforce_their_own_limits_and_emit_their_own_events() {
    let idle = Duration::from_millis(300);
    let lifetime = Duration::from_millis(900);
    let outer = StreamGuardLayer::builder()
        .request_idle_timeout(idle)
        .build()
        .unwrap();
    let inner = StreamGuardLayer::builder()
        .max_lifetime(lifetime)
        .build()
        .unwrap();
    let mut outer_events = outer.subscribe();
    let mut inner_events = inner.subscribe();
    let svc = EchoService::stopping_only_on_the_handle();
    let layers = ServiceBuilder::new()
        .layer(outer.clone())
        .layer(inner.clone())
        .into_inner();
    let server = serve!(layers, svc);
    let mut client = server.client().await;

    // Stream A: a client-streaming call whose client goes silent; the outer
    // guard's idle timeout (300 ms) comes first.
    let (tx, rx) = mpsc::channel(4);
    tx.send(msg("one")).await.unwrap();
    let status = timeout(PATIENCE, client.client_stream(ReceiverStream::new(rx)))
        .await
        .expect("stream A did not end in time")
        .expect_err("stream A must fail");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("request_idle_timeout"),
        "{status:?}"
    );
    let a_outer = next_event(&mut outer_events).await;
    assert_eq!(
        a_outer.reason(),
        EndReason::IdleTimeout(IdleDirection::Request)
    );
    assert_eq!(a_outer.grpc_status(), Some(4));
    let a_inner = next_event(&mut inner_events).await;
    assert_eq!(a_inner.path(), "/echo.Echo/ClientStream");
    assert!(!a_inner.reason().is_guard(), "{a_inner:?}");
    assert_ne!(a_outer.id(), a_inner.id(), "each guard has its own record");
    drop(tx);

    // Stream B: a server stream the client reads; the inner guard's lifetime
    // ends it, and the outer guard sees trailers: a completed stream.
    let mut stream = client
        .server_stream(StreamRequest {
            count: 0,
            interval_ms: 20,
            size: 8,
        })
        .await
        .expect("server_stream call")
        .into_inner();
    let status = timeout(PATIENCE, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("an endless stream ended without an error"),
                Err(status) => break status,
            }
        }
    })
    .await
    .expect("stream B did not end in time");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("max_lifetime"), "{status:?}");
    let b_inner = next_event(&mut inner_events).await;
    assert_eq!(b_inner.reason(), EndReason::LifetimeExceeded);
    assert_eq!(b_inner.limit(), Some(lifetime));
    let b_outer = next_event(&mut outer_events).await;
    assert_eq!(b_outer.reason(), EndReason::Completed);
    assert_eq!(b_outer.grpc_status(), Some(4), "the inner guard's status");

    wait_until("handlers and producers have stopped", || {
        svc.live_handlers() == 0 && svc.live_producers() == 0
    })
    .await;
    assert_eq!(outer.active_streams(), 0);
    assert_eq!(inner.active_streams(), 0);
    assert_no_more_events(&mut outer_events).await;
    assert_no_more_events(&mut inner_events).await;

    drop(stream);
    drop(client);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_a_server_stream_too_slowly_ends_slow_reader() {
    // At least 8 MiB per 500 ms spent waiting on the client; the client
    // takes one 256 KiB reply every 200 ms (about 640 KiB per window, and
    // what its HTTP/2 windows buffer at the start).
    let window = Duration::from_millis(500);
    let guard = StreamGuardLayer::builder()
        .min_response_rate(8 << 20, window)
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let svc = EchoService::stopping_only_on_the_handle();
    let server = serve!(guard.clone(), svc);
    let mut client = server.client().await;

    let started = Instant::now();
    let mut stream = client
        .server_stream(StreamRequest {
            count: 0,
            interval_ms: 0,
            size: 256 * 1024,
        })
        .await
        .expect("server_stream call")
        .into_inner();
    let (hurry, mut told) = mpsc::channel::<()>(1);
    let reader = tokio::spawn(async move {
        let mut received = 0_u64;
        let status = loop {
            match stream.message().await {
                Ok(Some(_)) => received += 1,
                Ok(None) => panic!("a slow reader's stream ended without an error"),
                Err(status) => break status,
            }
            // Slow until the test has seen the end, then quick.
            let _ = timeout(Duration::from_millis(200), told.recv()).await;
        };
        (received, status)
    });

    let event = next_event(&mut events).await;
    let waited = started.elapsed();
    assert_eq!(event.reason(), EndReason::SlowReader, "{event:?}");
    assert_eq!(event.grpc_status(), Some(8), "{event:?}");
    assert_eq!(event.limit(), Some(window));
    assert!(event.duration() >= window, "fired early: {event:?}");
    assert!(waited < window + SLACK, "fired late: {waited:?}");
    assert!(event.response().bytes < 8 << 20, "{event:?}");
    let blocked = event.blocked_on_reader().expect("measured");
    assert!(
        blocked > window / 2 && blocked <= event.duration(),
        "blocked {blocked:?} of {:?}",
        event.duration()
    );
    assert!(event.to_json().contains(r#""reason":"slow_reader""#));

    // The client reads what was buffered, then the guard's status.
    drop(hurry);
    let (received, status) = timeout(PATIENCE + SLACK, reader)
        .await
        .expect("the slow reader got its status")
        .expect("reader task");
    assert!(received > 0);
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("min_response_rate"), "{status:?}");
    wait_until("the producer task has stopped", || {
        svc.live_producers() == 0
    })
    .await;
    assert_eq!(guard.active_streams(), 0);
    assert_no_more_events(&mut events).await;
    drop(client);
    server.stop().await;
}
