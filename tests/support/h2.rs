//! A hyper HTTP/2 server driven by `ConnectionGuard::serve_connection`
//! and hyper HTTP/2 clients, over loopback TCP, for the connection tests.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, StreamBody, combinators::BoxBody};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    net::{TcpListener, TcpStream},
    time::{Instant, timeout},
};
use tokio_stream::{StreamExt, wrappers::IntervalStream};
use tower::Layer;
use tower_stream_guard::{BoxError, ConnectionGuard, StreamGuardLayer, stream::RequestBody};

use super::support::PATIENCE;

pub type ResBody = BoxBody<Bytes, BoxError>;

/// An endless body: a chunk every 50 ms.
pub fn ticking() -> ResBody {
    let ticks = IntervalStream::new(tokio::time::interval(Duration::from_millis(50)))
        .map(|_| Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"tick"))));
    StreamBody::new(ticks).boxed()
}

pub async fn serve(connections: ConnectionGuard, guard: StreamGuardLayer) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let service = guard.layer(tower::service_fn(
        |_request: Request<RequestBody<hyper::body::Incoming>>| async {
            Ok::<_, Infallible>(Response::new(ticking()))
        },
    ));
    tokio::spawn(async move {
        while let Ok((io, _)) = listener.accept().await {
            let (connections, service) = (connections.clone(), service.clone());
            tokio::spawn(async move { connections.serve_connection(io, service).await });
        }
    });
    addr
}

pub async fn connect(addr: SocketAddr) -> SendRequest<Empty<Bytes>> {
    let io = TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    sender
}

pub async fn open(
    sender: &mut SendRequest<Empty<Bytes>>,
) -> Result<hyper::body::Incoming, hyper::Error> {
    let request = Request::get("http://test/stream")
        .body(Empty::new())
        .unwrap();
    Ok(sender.send_request(request).await?.into_body())
}

/// Sends requests until the server refuses new streams (GOAWAY) or
/// `PATIENCE` runs out; when that happened.
pub async fn goaway_seen(sender: &mut SendRequest<Empty<Bytes>>) -> Instant {
    timeout(PATIENCE, async {
        loop {
            match open(sender).await {
                Ok(body) => drop(body),
                Err(_) => return Instant::now(),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the server never refused new streams")
}
