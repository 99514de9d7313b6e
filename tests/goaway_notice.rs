//! The client hears of a server's drain: a tonic client whose `Channel`
//! connects through `GoawayNotice::connector`, behind a client guard with
//! `goaway_notice`, against a real tonic server over loopback that drains
//! (`serve_with_incoming_shutdown`: GOAWAY on every connection). The stream
//! open at the GOAWAY is told (`StreamHandle::draining`), while it still
//! runs; a stream started afterwards, on the new connection, is not.

#![cfg(feature = "tonic")]

#[path = "../examples/common/mod.rs"]
mod common;

use std::{net::SocketAddr, time::Duration};

use common::{
    EchoService,
    echo::{StreamRequest, echo_client::EchoClient, echo_server::EchoServer},
};
use http::Uri;
use tokio::{
    net::{TcpListener, TcpStream},
    time::{Instant, timeout},
};
use tokio_stream::wrappers::TcpListenerStream;
use tower_stream_guard::{
    Drain, StreamGuardLayer, StreamHandle,
    connection::{GoawayNotice, NoticeEvent},
    stream::{StreamGuard, TonicBody},
};

// Only some of the shared helpers are used here.
#[allow(dead_code)]
mod support;
use support::PATIENCE;

/// Serves Echo until `drain` starts (then GOAWAY), behind a guard that cuts
/// what is left at the end of the drain's grace.
async fn serve(drain: &Drain) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let guard = StreamGuardLayer::builder().drain(drain).build().unwrap();
    let router = tonic::transport::Server::builder()
        .layer(guard)
        .add_service(EchoServer::new(EchoService::new()));
    tokio::spawn(
        router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), drain.started()),
    );
    addr
}

/// A tonic client whose connections `notice` watches, behind a client guard
/// tied to it.
async fn client(addr: SocketAddr, notice: &GoawayNotice) -> EchoClient<Guarded> {
    let connector = notice.connector(tower::service_fn(|uri: Uri| async move {
        let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
        TcpStream::connect(authority).await
    }));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(connector)
        .await
        .expect("connect");
    let guard = StreamGuardLayer::builder()
        .response_handle(true)
        .goaway_notice(notice)
        .build()
        .unwrap();
    EchoClient::new(tower::Layer::layer(&guard.for_tonic_channel(), channel))
}

/// A tonic `Channel` behind a client guard.
type Guarded = StreamGuard<tonic::transport::Channel, TonicBody>;

fn endless() -> StreamRequest {
    StreamRequest {
        count: 0,
        interval_ms: 10,
        size: 8,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_server_tells_the_client_stream_while_it_still_runs() {
    let drain = Drain::new();
    let addr = serve(&drain).await;
    let notice = GoawayNotice::new();
    let mut events = notice.subscribe();
    let mut client = client(addr, &notice).await;

    let response = client.server_stream(endless()).await.expect("call");
    let handle = response
        .extensions()
        .get::<StreamHandle>()
        .cloned()
        .expect("the client guard's handle");
    let mut stream = response.into_inner();
    stream.message().await.expect("a message").expect("open");
    assert!(!handle.is_draining());
    let draining = handle.draining();

    let started = Instant::now();
    let _report = drain.start(Duration::from_secs(5));
    timeout(PATIENCE, draining)
        .await
        .expect("the client hears of the GOAWAY");
    let latency = started.elapsed();
    eprintln!("GOAWAY notice latency (drain start to draining()): {latency:?}");
    assert!(handle.is_draining());
    // The notice came while the stream still runs (the grace is 5 s).
    stream
        .message()
        .await
        .expect("still streaming after the notice")
        .expect("a message");
    assert!(!handle.is_ended());

    let mut goaway = None;
    while goaway.is_none() {
        match timeout(PATIENCE, events.recv()).await.unwrap().unwrap() {
            NoticeEvent::Goaway { goaway: frame, .. } => goaway = Some(frame),
            NoticeEvent::Opened { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let goaway = goaway.unwrap();
    assert!(goaway.is_graceful(), "{goaway:?}");
    assert!(notice.goaways() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_started_after_the_goaway_is_not_told() {
    // Two servers: the first drains, the channel's next connection goes to
    // the same address, where a second server now listens.
    let drain = Drain::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    let guard = StreamGuardLayer::builder().drain(&drain).build().unwrap();
    let first = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(guard)
            .add_service(EchoServer::new(EchoService::new()))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), drain.started()),
    );
    let notice = GoawayNotice::new();
    let mut client = client(addr, &notice).await;
    let old = client.server_stream(endless()).await.expect("call");
    let old_handle = old.extensions().get::<StreamHandle>().cloned().unwrap();

    let _report = drain.start(Duration::from_millis(200));
    timeout(PATIENCE, old_handle.draining()).await.unwrap();
    timeout(PATIENCE, first).await.unwrap().unwrap().unwrap();

    // The restarted server, on the same address.
    let listener = TcpListener::bind(addr).await.expect("rebind");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(EchoService::new()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let new = timeout(PATIENCE, async {
        loop {
            if let Ok(response) = client.server_stream(endless()).await {
                return response;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the channel reconnects");
    let new_handle = new.extensions().get::<StreamHandle>().cloned().unwrap();
    assert!(!new_handle.is_draining());
    assert!(old_handle.is_draining());
}

/// hyper-util's pooling client with the notice's connector: its HTTP/2
/// connection to a draining server reports the GOAWAY.
#[cfg(feature = "hyper")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hyper_util_client_connection_reports_the_goaway() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};

    let drain = Drain::new();
    let addr = serve(&drain).await;
    let notice = GoawayNotice::new();
    let mut events = notice.subscribe();
    // hyper-util wants an `Unpin` connecting future: box the async block.
    let connector = notice.connector(tower::service_fn(|uri: Uri| {
        Box::pin(async move {
            let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
            TcpStream::connect(authority).await
        })
    }));
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(connector);
    // Any request opens the connection (tonic answers an unknown path
    // with a gRPC status).
    let response = client
        .request(
            http::Request::post(format!("http://{addr}/echo.Echo/Unknown"))
                .header("content-type", "application/grpc")
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .expect("a response");
    let _ = response.into_body().collect().await;
    assert_eq!(notice.open_connections(), 1);

    let _report = drain.start(Duration::from_secs(5));
    let goaway = loop {
        match timeout(PATIENCE, events.recv()).await.unwrap().unwrap() {
            NoticeEvent::Goaway { goaway, .. } => break goaway,
            _ => continue,
        }
    };
    assert!(goaway.is_graceful());
}

/// A graceful drain sends two GOAWAYs (the first with the highest stream id,
/// the real last one a round trip later). Only a connection's first tells
/// streams: a stream started between the two (the replacement, on another
/// connection) must not be told by the second.
#[tokio::test]
async fn a_connections_second_goaway_tells_no_one() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];
    fn goaway(last: u8) -> [u8; 17] {
        [
            0, 0, 8, 7, 0, 0, 0, 0, 0, 0x7f, 0xff, 0xff, last, 0, 0, 0, 0,
        ]
    }
    let notice = GoawayNotice::new();
    let mut events = notice.subscribe();
    let (client, mut server) = tokio::io::duplex(1024);
    let mut old = notice.wrap(client);
    let mut read = [0u8; 64];

    server.write_all(&SETTINGS).await.unwrap();
    server.write_all(&goaway(0xff)).await.unwrap();
    let _ = old.read(&mut read).await.unwrap();
    assert_eq!(notice.goaways(), 1);
    // The replacement starts now: it has seen one connection go away.
    let replacement_told = notice.next_goaway();

    server.write_all(&goaway(3)).await.unwrap();
    let _ = old.read(&mut read).await.unwrap();
    assert_eq!(notice.goaways(), 1, "the same connection counts once");
    let told = futures_util::FutureExt::now_or_never(replacement_told);
    assert!(told.is_none(), "the second GOAWAY told a later stream");

    // Both frames are events.
    let mut frames = 0;
    while let Ok(event) = events.try_recv() {
        frames += usize::from(matches!(event, NoticeEvent::Goaway { .. }));
    }
    assert_eq!(frames, 2);
}

/// Two connections of one notice, a GOAWAY on the second: its events name
/// that connection, the notice counts one GOAWAY, and the open count follows
/// each connection's close.
#[tokio::test]
async fn a_goaway_on_one_of_two_connections_is_reported_for_that_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];
    const GOAWAY: [u8; 17] = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0];
    let notice = GoawayNotice::new();
    let mut events = notice.subscribe();
    let (first_client, mut first_server) = tokio::io::duplex(1024);
    let (second_client, mut second_server) = tokio::io::duplex(1024);
    let mut first = notice.wrap(first_client);
    let mut second = notice.wrap(second_client);
    assert_ne!(first.connection(), second.connection());
    assert_eq!(notice.open_connections(), 2);
    let mut read = [0u8; 64];

    first_server.write_all(&SETTINGS).await.unwrap();
    let _ = first.read(&mut read).await.unwrap();
    second_server.write_all(&SETTINGS).await.unwrap();
    second_server.write_all(&GOAWAY).await.unwrap();
    let _ = second.read(&mut read).await.unwrap();
    assert_eq!(notice.goaways(), 1);

    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        seen.push(event);
    }
    let opened: Vec<u64> = seen
        .iter()
        .filter(|event| matches!(event, NoticeEvent::Opened { .. }))
        .map(NoticeEvent::connection)
        .collect();
    assert_eq!(opened, [first.connection(), second.connection()]);
    let goaways: Vec<_> = seen
        .iter()
        .filter_map(|event| match event {
            NoticeEvent::Goaway { connection, goaway } => Some((*connection, goaway)),
            _ => None,
        })
        .collect();
    assert_eq!(goaways.len(), 1, "{seen:?}");
    assert_eq!(goaways[0].0, second.connection(), "{seen:?}");
    assert_eq!(goaways[0].1.last_stream_id(), 5);

    let second_id = second.connection();
    drop(second);
    assert_eq!(notice.open_connections(), 1);
    assert_eq!(
        events.try_recv().map(|event| event.connection()),
        Ok(second_id)
    );
    // The first connection still reads its frames, and counts no GOAWAY.
    first_server.write_all(&SETTINGS).await.unwrap();
    let _ = first.read(&mut read).await.unwrap();
    assert_eq!(notice.goaways(), 1);
    drop(first);
    assert_eq!(notice.open_connections(), 0);
}
