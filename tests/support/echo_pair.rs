//! A tonic echo server behind a guard that only watches (no limits, so a
//! test sees the server's side of each call end), and a tonic client to it
//! through a guarded `Channel`. Over loopback TCP.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Channel;
use tower::Layer;
use tower_stream_guard::{
    StreamGuardLayer,
    stream::{StreamGuard, TonicBody},
};

use crate::common::{
    EchoService,
    echo::{echo_client::EchoClient, echo_server::EchoServer},
};

/// The server's address and its watching guard.
pub async fn serve() -> (SocketAddr, StreamGuardLayer) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let guard = StreamGuardLayer::builder().build().unwrap();
    let router = tonic::transport::Server::builder()
        .layer(guard.clone())
        .add_service(EchoServer::new(EchoService::new()));
    tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));
    (addr, guard)
}

/// A tonic `Channel` behind a client's guard.
pub type GuardedChannel = StreamGuard<Channel, TonicBody>;

/// A client of the server at `addr`, through `guard`.
pub async fn guarded_client(
    addr: SocketAddr,
    guard: &StreamGuardLayer,
) -> EchoClient<GuardedChannel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    EchoClient::new(guard.clone().for_tonic_channel().layer(channel))
}

/// Reads `replies` until they fail, within [`PATIENCE`](crate::support::PATIENCE):
/// the status they failed with. Fails, saying `what` was expected, if they
/// end cleanly or nothing fails in time.
pub async fn status_at_end(
    replies: &mut tonic::Streaming<crate::common::echo::EchoReply>,
    what: &str,
) -> tonic::Status {
    let read = async {
        loop {
            match replies.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the replies ended cleanly: expected {what}"),
                Err(status) => return status,
            }
        }
    };
    tokio::time::timeout(crate::support::PATIENCE, read)
        .await
        .unwrap_or_else(|_| panic!("nothing failed in time: expected {what}"))
}
