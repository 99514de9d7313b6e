//! Stream caps in front of a real tonic server, called by real tonic clients
//! over loopback TCP; and the motivation: tonic's own
//! `concurrency_limit_per_connection` does not bound open streams.
//!
//! `pins_tonic_*` tests pin tonic's behaviour: a failure after a tonic
//! upgrade means tonic changed, read the test before touching the guard.

#[path = "../examples/common/mod.rs"]
mod common;

use std::{net::SocketAddr, time::Duration};

use common::{
    EchoService,
    echo::{EchoReply, StreamRequest, echo_client::EchoClient, echo_server::EchoServer},
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle, time::timeout};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Status, Streaming, transport::Channel};
use tower_stream_guard::{EndReason, IdleDirection, RoutePolicy, StreamCap, StreamGuardLayer};

// Only some of the shared helpers are used here.
#[allow(dead_code)]
mod support;
use support::{PATIENCE, SLACK, next_event, wait_until};

struct TestServer {
    addr: SocketAddr,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl TestServer {
    /// A client on a connection of its own.
    async fn client(&self) -> EchoClient<Channel> {
        EchoClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect to the test server")
    }

    /// Graceful shutdown: fails if a stream is still open. Drop clients first.
    async fn stop(self) {
        let _ = self.shutdown.send(());
        timeout(PATIENCE, self.task)
            .await
            .expect("graceful shutdown in time: no stream left open")
            .expect("server task")
            .expect("server");
    }
}

async fn serve(builder: tonic::transport::Server, guard: Option<StreamGuardLayer>) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (shutdown, signal) = oneshot::channel::<()>();
    let incoming = TcpListenerStream::new(listener);
    let signal = async move {
        let _ = signal.await;
    };
    let mut builder = builder;
    let service = EchoServer::new(EchoService::new());
    let task = match guard {
        Some(guard) => tokio::spawn(
            builder
                .layer(guard)
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, signal),
        ),
        None => tokio::spawn(
            builder
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, signal),
        ),
    };
    TestServer {
        addr,
        shutdown,
        task,
    }
}

/// An endless server stream of small replies, 20 ms apart.
async fn endless(client: &mut EchoClient<Channel>) -> Result<Streaming<EchoReply>, Status> {
    let request = StreamRequest {
        count: 0,
        interval_ms: 20,
        size: 8,
    };
    Ok(client.server_stream(request).await?.into_inner())
}

/// The next reply, within patience.
async fn reply(stream: &mut Streaming<EchoReply>) -> EchoReply {
    timeout(PATIENCE, stream.message())
        .await
        .expect("a reply in time")
        .expect("a reply, not an error")
        .expect("the stream is open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_stream_on_a_connection_is_refused_with_resource_exhausted() {
    let guard = StreamGuardLayer::builder()
        .max_streams_per_connection(2)
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let server = serve(tonic::transport::Server::builder(), Some(guard.clone())).await;
    let mut client = server.client().await;

    let mut first = endless(&mut client).await.expect("first admitted");
    let mut second = endless(&mut client).await.expect("second admitted");
    reply(&mut first).await;
    reply(&mut second).await;
    let refused = endless(&mut client).await.expect_err("third refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("max_streams_per_connection"),
        "the message names the cap: {refused:?}"
    );
    let event = next_event(&mut events).await;
    assert_eq!(
        event.reason(),
        EndReason::Rejected(StreamCap::PerConnection)
    );
    assert_eq!(event.cap_limit(), Some(2));
    assert_eq!(event.grpc_status(), Some(8));
    assert_eq!(guard.connection_streams().len(), 1);
    assert_eq!(guard.connection_streams()[0].1, 2);

    // One of the two ends: a new stream is admitted on the same connection.
    drop(first);
    assert_eq!(next_event(&mut events).await.reason(), EndReason::Cancelled);
    let mut third = endless(&mut client)
        .await
        .expect("admitted once a slot is free");
    reply(&mut third).await;
    reply(&mut second).await;

    assert_eq!(guard.stats().rejected(StreamCap::PerConnection), 1);
    drop((second, third, client));
    wait_until("every stream ended", || guard.active_streams() == 0).await;
    assert!(guard.connection_streams().is_empty());
    server.stop().await;
}

/// Why the caps exist: tonic's `concurrency_limit_per_connection` is tower's
/// `ConcurrencyLimit`, whose permit is given back when the response headers
/// are ready. A streaming call holds no permit while it streams, so a limit
/// of 2 lets any number of endless streams through on one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_tonic_concurrency_limit_per_connection_admits_every_stream() {
    let server = serve(
        tonic::transport::Server::builder().concurrency_limit_per_connection(2),
        None,
    )
    .await;
    let mut client = server.client().await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut stream = endless(&mut client).await.expect("admitted");
        reply(&mut stream).await;
        streams.push(stream);
    }
    // All three stream at once.
    for stream in &mut streams {
        reply(stream).await;
    }
    drop((streams, client));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_and_total_caps_count_across_connections() {
    let guard = StreamGuardLayer::builder()
        .max_streams_per_peer(3)
        .max_streams(4)
        .track_connections(true)
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let server = serve(tonic::transport::Server::builder(), Some(guard.clone())).await;

    // Three connections from 127.0.0.1: the peer cap refuses the fourth
    // stream, whichever connection it comes on.
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(server.client().await);
    }
    let mut held = Vec::new();
    for client in &mut clients {
        held.push(endless(client).await.expect("under the peer cap"));
    }
    let refused = endless(&mut clients[0])
        .await
        .expect_err("over the peer cap");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("max_streams_per_peer"),
        "{refused:?}"
    );
    assert_eq!(
        next_event(&mut events).await.reason(),
        EndReason::Rejected(StreamCap::PerPeer)
    );
    assert_eq!(guard.peer_streams(), vec![([127, 0, 0, 1].into(), 3)]);
    assert_eq!(guard.connection_streams().len(), 3);

    // 127.0.0.2 is another peer, but the total cap of 4 is reached after one.
    let other = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .local_address(Some([127, 0, 0, 2].into()))
        .connect()
        .await
        .expect("connect from 127.0.0.2");
    let mut other = EchoClient::new(other);
    held.push(
        endless(&mut other)
            .await
            .expect("another peer, under the total"),
    );
    let refused = endless(&mut other).await.expect_err("over the total cap");
    assert!(refused.message().contains("max_streams"), "{refused:?}");
    assert_eq!(
        next_event(&mut events).await.reason(),
        EndReason::Rejected(StreamCap::Total)
    );

    drop((held, clients, other));
    wait_until("every stream ended", || guard.active_streams() == 0).await;
    assert!(guard.peer_streams().is_empty());
    let stats = guard.stats();
    assert_eq!(stats.rejected(StreamCap::PerPeer), 1);
    assert_eq!(stats.rejected(StreamCap::Total), 1);
    assert_eq!(stats.ended(EndReason::Cancelled), 4);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_gives_its_slot_back_when_the_guard_fires() {
    let idle = Duration::from_millis(300);
    let guard = StreamGuardLayer::builder()
        .response_idle_timeout(idle)
        .max_streams_per_connection(1)
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let server = serve(tonic::transport::Server::builder(), Some(guard.clone())).await;
    let mut stalled_client = server.client().await;
    let mut client = server.client().await;

    // Large replies as fast as possible, never read: hyper stops polling.
    let stalled = stalled_client
        .server_stream(StreamRequest {
            count: 0,
            interval_ms: 0,
            size: 256 * 1024,
        })
        .await
        .expect("admitted")
        .into_inner();
    let event = next_event(&mut events).await;
    assert_eq!(
        event.reason(),
        EndReason::IdleTimeout(IdleDirection::Response)
    );
    // Its slot is back although hyper still holds the HTTP/2 stream.
    let mut next = endless(&mut stalled_client).await.expect("slot given back");
    reply(&mut next).await;
    let mut elsewhere = endless(&mut client).await.expect("another connection");
    reply(&mut elsewhere).await;

    drop((stalled, next, elsewhere, stalled_client, client));
    wait_until("every stream ended", || guard.active_streams() == 0).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_policies_and_the_clients_grpc_timeout_apply_over_tonic() {
    let short = Duration::from_millis(300);
    let guard = StreamGuardLayer::builder()
        .max_lifetime(Duration::from_secs(60))
        .honor_grpc_timeout(true)
        .route(
            "/echo.Echo/ServerStream",
            RoutePolicy::new().max_streams_per_connection(1),
        )
        .route("/echo.Echo/Bidi", RoutePolicy::new().max_lifetime(short))
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let server = serve(tonic::transport::Server::builder(), Some(guard.clone())).await;
    let mut client = server.client().await;

    // The route's own cap: a second ServerStream is refused...
    let mut watch = endless(&mut client).await.expect("admitted");
    reply(&mut watch).await;
    let refused = endless(&mut client).await.expect_err("route cap");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(
        next_event(&mut events).await.reason(),
        EndReason::Rejected(StreamCap::PerConnection)
    );

    // ...while the Bidi route gets its short lifetime.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(common::echo::EchoRequest {
        message: "hi".into(),
    })
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let mut bidi = client
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("bidi call")
        .into_inner();
    let status = loop {
        match timeout(PATIENCE, bidi.message())
            .await
            .expect("ends in time")
        {
            Ok(Some(_)) => {}
            Ok(None) => panic!("bidi ended without the guard"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert!(status.message().contains("max_lifetime"), "{status:?}");
    let elapsed = started.elapsed();
    assert!(elapsed >= short && elapsed < short + SLACK, "{elapsed:?}");
    let event = next_event(&mut events).await;
    assert_eq!(event.path(), "/echo.Echo/Bidi");
    assert_eq!(event.limit(), Some(short));
    drop(tx);

    // The client's deadline shortens an endless stream's lifetime.
    drop(watch);
    assert_eq!(next_event(&mut events).await.reason(), EndReason::Cancelled);
    let mut request = tonic::Request::new(StreamRequest {
        count: 0,
        interval_ms: 20,
        size: 8,
    });
    request.set_timeout(Duration::from_millis(400));
    let stream = client.server_stream(request).await.expect("admitted");
    let status = timeout(PATIENCE, async {
        let mut stream = stream.into_inner();
        loop {
            if let Err(status) = stream.message().await {
                return status;
            }
        }
    })
    .await
    .expect("the client's deadline ends the stream");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::LifetimeExceeded);
    assert!(
        event
            .limit()
            .is_some_and(|limit| limit <= Duration::from_millis(400)),
        "the client's timeout (less what the request took to arrive): {event:?}"
    );

    drop(client);
    wait_until("every stream ended", || guard.active_streams() == 0).await;
    let stats = guard.stats();
    assert_eq!(stats.active(), 0);
    assert_eq!(stats.ended_total(), 4, "{}", stats.to_json());
    server.stop().await;
}
