//! What a `route_when` predicate sees of where a request came from: under a
//! `ConnectionGuard`, tonic carries the connection's handle inside its connect
//! info (`GuardedConnectInfo<TcpConnectInfo>`), and the guard unpacks it into
//! the request extensions as a `ConnectionHandle`. The predicate runs after
//! that, so a policy can be chosen by connection. A real tonic server and
//! client over loopback.

#[path = "../examples/common/mod.rs"]
mod common;

use std::sync::{Arc, Mutex, PoisonError};

use common::{
    EchoService,
    echo::{EchoRequest, echo_client::EchoClient, echo_server::EchoServer},
};
use tokio::net::TcpListener;
use tonic::transport::server::TcpConnectInfo;
use tower_stream_guard::{
    ConnectionGuard, ConnectionHandle, RoutePolicy, RouteRequest, StreamCap, StreamGuardLayer,
};

#[allow(dead_code)]
mod support;
use support::next_event;

/// What the predicate found in the extensions, per request: a
/// `ConnectionHandle`, and tonic's own `TcpConnectInfo`.
type Seen = Arc<Mutex<Vec<(bool, bool)>>>;

#[tokio::test]
async fn a_route_predicate_sees_the_connection_handle_under_tonic() {
    let seen = Seen::default();
    let saw = Arc::clone(&seen);
    let guard = StreamGuardLayer::builder()
        .route_when(
            move |request: &RouteRequest<'_>| {
                let extensions = request.extensions();
                let handle = extensions.get::<ConnectionHandle>().is_some();
                let info = extensions.get::<TcpConnectInfo>().is_some();
                saw.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((handle, info));
                handle
            },
            RoutePolicy::new().max_streams_per_connection(1),
        )
        .build()
        .unwrap();
    let mut events = guard.subscribe();
    let connections = ConnectionGuard::builder().build().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(guard.clone())
            .add_service(EchoServer::new(EchoService::new()))
            .serve_with_incoming(
                connections.wrap_incoming(tonic::transport::server::TcpIncoming::from(listener)),
            ),
    );
    let mut client = EchoClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let reply = client
        .unary(EchoRequest {
            message: "hi".into(),
        })
        .await;
    assert!(reply.is_ok(), "{reply:?}");
    let event = next_event(&mut events).await;
    assert!(event.connection().is_some(), "{event:?}");
    assert_eq!(
        seen.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_slice(),
        &[(true, true)],
        "the predicate saw (ConnectionHandle, TcpConnectInfo)"
    );
    // The route's cap counted the stream under the connection, and let it in.
    assert_eq!(guard.stats().rejected(StreamCap::PerConnection), 0);
    assert_eq!(
        guard
            .stats()
            .ended(tower_stream_guard::EndReason::Completed),
        1
    );
    server.abort();
}
