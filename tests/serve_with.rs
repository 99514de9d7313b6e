//! `ConnectionGuard::serve_connection_with`: the application's own
//! hyper-util builder, its settings seen on the wire; and HTTP/1.1
//! upgrades through both `serve_connection`s. Real sockets over loopback.

#![cfg(feature = "hyper")]

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};
use tower::Layer;
use tower_stream_guard::{ConnectionGuard, StreamGuardLayer, stream::RequestBody};

const PATIENCE: Duration = Duration::from_secs(5);

/// Answers `hello`, or upgrades a request that asks to and echoes what
/// comes over the upgraded connection.
async fn app(
    mut request: Request<RequestBody<hyper::body::Incoming>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if !request.headers().contains_key(header::UPGRADE) {
        return Ok(Response::new(Full::from("hello")));
    }
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut io = TokioIo::new(upgraded);
        let mut buf = [0_u8; 64];
        while let Ok(n @ 1..) = io.read(&mut buf).await {
            if io.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    });
    let mut response = Response::new(Full::default());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    response
        .headers_mut()
        .insert(header::UPGRADE, "echo".parse().unwrap());
    response
        .headers_mut()
        .insert(header::CONNECTION, "upgrade".parse().unwrap());
    Ok(response)
}

/// Serves with the default builder, or with `builder` when given.
async fn serve(builder: Option<auto::Builder<TokioExecutor>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    let connections = ConnectionGuard::builder().build().unwrap();
    let service = StreamGuardLayer::builder()
        .build()
        .unwrap()
        .layer(tower::service_fn(app));
    tokio::spawn(async move {
        while let Ok((io, _)) = listener.accept().await {
            let served = match &builder {
                Some(builder) => {
                    connections.serve_connection_with(builder.clone(), io, service.clone())
                }
                None => connections.serve_connection(io, service.clone()),
            };
            tokio::spawn(served);
        }
    });
    addr
}

async fn http1_get(addr: SocketAddr) -> Result<Bytes, hyper::Error> {
    let io = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(connection);
    let response = sender
        .send_request(Request::get("/").body(Empty::<Bytes>::new()).unwrap())
        .await?;
    Ok(response.into_body().collect().await?.to_bytes())
}

#[tokio::test]
async fn the_applications_builder_is_the_one_serving() {
    // The default builder speaks HTTP/1.1 too.
    let default = serve(None).await;
    assert_eq!(
        timeout(PATIENCE, http1_get(default))
            .await
            .unwrap()
            .unwrap(),
        "hello"
    );
    // An HTTP/2-only builder refuses it.
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder = builder.http2_only();
    let h2_only = serve(Some(builder)).await;
    let refused = timeout(PATIENCE, http1_get(h2_only)).await.unwrap();
    assert!(refused.is_err(), "HTTP/1.1 served: {refused:?}");
}

async fn upgrade_and_echo(addr: SocketAddr) {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0_u8; 1];
        timeout(PATIENCE, tcp.read_exact(&mut byte))
            .await
            .expect("the 101 in time")
            .expect("the server answers");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp.write_all(b"ping").await.unwrap();
    let mut echoed = [0_u8; 4];
    timeout(PATIENCE, tcp.read_exact(&mut echoed))
        .await
        .expect("the echo in time")
        .unwrap();
    assert_eq!(&echoed, b"ping");
}

#[tokio::test]
async fn both_serve_http1_upgrades() {
    upgrade_and_echo(serve(None).await).await;
    upgrade_and_echo(serve(Some(auto::Builder::new(TokioExecutor::new()))).await).await;
}
