//! Drains and the connection guard in front of a real tonic server, with real
//! tonic clients over loopback TCP: `serve_with_incoming_shutdown` returns
//! within the grace period plus a small bound even with hundreds of open
//! streams and peers that stopped reading; connections hyper would keep
//! forever are closed.
//!
//! `pins_tonic_*` tests pin tonic's behaviour: a failure after a tonic
//! upgrade means tonic changed, read the test before touching the guard.

#[path = "../examples/common/mod.rs"]
mod common;

use std::{net::SocketAddr, time::Duration};

use common::{
    EchoService,
    echo::{StreamRequest, echo_client::EchoClient, echo_server::EchoServer},
};
use tokio::{net::TcpListener, task::JoinHandle, time::Instant, time::timeout};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Streaming, transport::Channel};
use tower_stream_guard::{
    ConnectionEnd, ConnectionEvent, ConnectionGuard, Drain, EndReason, StreamGuardLayer,
};

mod support;
use support::{PATIENCE, SLACK, wait_for_no_tasks, wait_until};

type Server = JoinHandle<Result<(), tonic::transport::Error>>;

/// Serves the echo service behind `guard` on connections `connections` wraps,
/// until `drain` starts.
async fn serve(
    guard: StreamGuardLayer,
    connections: &ConnectionGuard,
    drain: &Drain,
) -> (SocketAddr, Server) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let router = tonic::transport::Server::builder()
        .layer(guard)
        .add_service(EchoServer::new(EchoService::new()));
    let server = tokio::spawn(router.serve_with_incoming_shutdown(
        connections.wrap_incoming(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
        ),
        drain.started(),
    ));
    (addr, server)
}

/// A client on a connection of its own.
async fn client(addr: SocketAddr) -> EchoClient<Channel> {
    EchoClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to the test server")
}

/// An endless server stream: small replies every 20 ms, or large ones as fast
/// as possible for a reader that will not read.
async fn open_stream(
    client: &mut EchoClient<Channel>,
    stalled: bool,
) -> Streaming<common::echo::EchoReply> {
    let request = if stalled {
        StreamRequest {
            count: 0,
            interval_ms: 0,
            size: 256 * 1024,
        }
    } else {
        StreamRequest {
            count: 0,
            interval_ms: 20,
            size: 8,
        }
    };
    client
        .server_stream(request)
        .await
        .expect("server_stream call")
        .into_inner()
}

/// Reads until the stream fails; the failure's code.
async fn read_to_end(mut stream: Streaming<common::echo::EchoReply>) -> Code {
    loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => return Code::Ok,
            Err(status) => return status.code(),
        }
    }
}

async fn closed_event(
    events: &mut tokio::sync::broadcast::Receiver<ConnectionEvent>,
) -> ConnectionEvent {
    loop {
        let event = timeout(PATIENCE, events.recv())
            .await
            .expect("a connection event within 5 s")
            .expect("no connection event missed");
        if event.end().is_some() {
            return event;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_shutdown_returns_within_grace_with_hundreds_of_open_streams() {
    const CLIENTS: usize = 4;
    const STREAMS_PER_CLIENT: usize = 50;
    const STALLED: usize = 6;
    let grace = Duration::from_secs(1);
    let drain = Drain::new();
    let guard = StreamGuardLayer::builder()
        .drain(&drain)
        .event_capacity(4096)
        .build()
        .unwrap();
    let connections = ConnectionGuard::builder().drain(&drain).build().unwrap();
    let (addr, server) = serve(guard.clone(), &connections, &drain).await;

    let mut readers = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let mut c = client(addr).await;
        for _ in 0..STREAMS_PER_CLIENT {
            let mut stream = open_stream(&mut c, false).await;
            // The stream is open: its first reply arrived.
            timeout(PATIENCE, stream.message())
                .await
                .expect("first reply in time")
                .expect("first reply ok");
            readers.push(tokio::spawn(read_to_end(stream)));
        }
        clients.push(c);
    }
    // Peers that stopped reading, each on a connection of its own (a stalled
    // stream also stalls its connection's window).
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        let mut c = client(addr).await;
        stalled.push(open_stream(&mut c, true).await);
        clients.push(c);
    }
    let total = CLIENTS * STREAMS_PER_CLIENT + STALLED;
    wait_until("every stream reached the guard", || {
        guard.active_streams() == total
    })
    .await;

    let started = Instant::now();
    let report = drain.start(grace);
    timeout(grace + SLACK * 2, server)
        .await
        .expect("serve_with_incoming_shutdown must return within grace plus a bound")
        .expect("server task")
        .expect("server");
    let took = started.elapsed();
    assert!(took >= grace, "returned before the grace ended: {took:?}");
    assert!(
        took < grace + drain_bound(),
        "returned {took:?} after the drain began"
    );

    let report = report.await;
    assert_eq!(report.open_at_start(), total as u64, "{report:?}");
    assert_eq!(report.cut(), total as u64, "{report:?}");
    assert_eq!(report.refused(), 0);
    assert_eq!(guard.stats().ended(EndReason::Drained), total as u64);
    assert_eq!(guard.active_streams(), 0);
    assert!(
        report.connections_closed() >= STALLED as u64,
        "stalled readers' connections are closed: {report:?}"
    );
    for reader in readers {
        let code = timeout(PATIENCE, reader)
            .await
            .expect("reader ends")
            .unwrap();
        assert_eq!(code, Code::Unavailable);
    }
    for stream in stalled {
        let code = timeout(PATIENCE, read_to_end(stream))
            .await
            .expect("a stalled reader's stream fails once its connection is closed");
        assert_ne!(code, Code::Ok);
    }
    drop(clients);
    wait_for_no_tasks().await;
}

/// How long after the grace period a drain may take: the default delay
/// before connections are closed (500 ms, as `Drain::new` documents), plus
/// slack for a loaded machine.
fn drain_bound() -> Duration {
    Duration::from_millis(500) + SLACK
}

/// The motivation: without the guard, one open stream keeps
/// `serve_with_shutdown` waiting well past any grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_tonic_serve_with_shutdown_without_the_guard_waits_on_an_open_stream() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (stop, signal) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(EchoService::new()))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                let _ = signal.await;
            }),
    );
    let mut c = client(addr).await;
    let mut stream = open_stream(&mut c, false).await;
    stream.message().await.expect("first reply").expect("open");
    let _ = stop.send(());
    let mut server = server;
    assert!(
        timeout(Duration::from_secs(2), &mut server).await.is_err(),
        "tonic finished its graceful shutdown with a stream still open"
    );
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_readers_connection_is_closed_after_idle_plus_grace() {
    let idle = Duration::from_millis(300);
    let grace = Duration::from_millis(300);
    let drain = Drain::new();
    let guard = StreamGuardLayer::builder()
        .response_idle_timeout(idle)
        .build()
        .unwrap();
    let connections = ConnectionGuard::builder()
        .stalled_grace(grace)
        .resolution(Duration::from_millis(20))
        .build()
        .unwrap();
    let mut conn_events = connections.subscribe();
    let mut events = guard.subscribe();
    let (addr, server) = serve(guard.clone(), &connections, &drain).await;

    let mut c = client(addr).await;
    let started = Instant::now();
    let stream = open_stream(&mut c, true).await;
    let event = support::next_event(&mut events).await;
    assert!(matches!(event.reason(), EndReason::IdleTimeout(_)));
    support::assert_no_more_events(&mut events).await;
    let closed = closed_event(&mut conn_events).await;
    let took = started.elapsed();
    assert_eq!(closed.end(), Some(ConnectionEnd::Stalled));
    assert_eq!(closed.streams(), 1);
    assert!(took >= idle + grace, "closed early: {took:?}");
    assert!(took < idle + grace + SLACK, "closed late: {took:?}");
    assert!(closed.to_json().contains(r#""reason":"stalled""#));
    let code = timeout(PATIENCE, read_to_end(stream))
        .await
        .expect("stream fails");
    assert_ne!(code, Code::Ok);
    assert_eq!(connections.open_connections(), 0);

    drop(c);
    let _ = drain.start(Duration::from_millis(100)).await;
    timeout(PATIENCE, server).await.unwrap().unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
    let idle = Duration::from_millis(300);
    let drain = Drain::new();
    let guard = StreamGuardLayer::builder().build().unwrap();
    let connections = ConnectionGuard::builder()
        .idle_timeout(idle)
        .resolution(Duration::from_millis(20))
        .build()
        .unwrap();
    let mut conn_events = connections.subscribe();
    let (addr, server) = serve(guard.clone(), &connections, &drain).await;

    let mut busy = client(addr).await;
    let mut stream = open_stream(&mut busy, false).await;
    stream.message().await.unwrap().unwrap();
    let mut quiet = client(addr).await;
    quiet
        .unary(common::echo::EchoRequest {
            message: "hi".into(),
        })
        .await
        .expect("unary call");
    let after_call = Instant::now();
    let closed = closed_event(&mut conn_events).await;
    assert_eq!(closed.end(), Some(ConnectionEnd::Idle));
    assert_eq!(closed.streams(), 1, "the quiet connection's one call");
    let took = after_call.elapsed();
    assert!(
        took >= idle - Duration::from_millis(50),
        "closed early: {took:?}"
    );
    // The busy connection's stream goes on.
    stream.message().await.expect("still open").expect("reply");
    assert_eq!(connections.open_connections(), 1);

    drop((stream, busy, quiet));
    let _ = drain.start(Duration::from_millis(100)).await;
    timeout(PATIENCE, server).await.unwrap().unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_carry_an_id_that_caps_and_events_name() {
    let drain = Drain::new();
    let guard = StreamGuardLayer::builder()
        .max_streams_per_connection(1)
        .build()
        .unwrap();
    let connections = ConnectionGuard::builder().build().unwrap();
    let mut conn_events = connections.subscribe();
    let mut events = guard.subscribe();
    let (addr, server) = serve(guard.clone(), &connections, &drain).await;

    let mut c = client(addr).await;
    let opened = timeout(PATIENCE, conn_events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(opened.end(), None);
    assert!(opened.peer().is_some());
    let _held = open_stream(&mut c, false).await;
    let refused = c
        .server_stream(StreamRequest {
            count: 0,
            interval_ms: 20,
            size: 8,
        })
        .await
        .expect_err("over the per-connection cap");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let event = support::next_event(&mut events).await;
    assert_eq!(
        event.connection(),
        Some(tower_stream_guard::ConnectionKey::from_id(opened.id()))
    );
    // tonic's remote address still reaches the event.
    assert_eq!(event.peer().map(|p| p.ip()), opened.peer().map(|p| p.ip()));

    drop((_held, c));
    let _ = drain.start(Duration::from_millis(100)).await;
    timeout(PATIENCE, server).await.unwrap().unwrap().unwrap();
}
