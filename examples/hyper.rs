//! The guards in a hand-written hyper-util accept loop (feature `hyper`).
//!
//! ```text
//! cargo run --example hyper --features hyper
//! ```
//!
//! A plain tower `service_fn` behind a [`StreamGuardLayer`], served by
//! [`ConnectionGuard::serve_connection`] on each accepted connection (HTTP/1
//! or HTTP/2). The connection guard gives each connection an id (the stream
//! guard's caps and events name it), sends GOAWAY at its maximum age and
//! closes it hard after a grace; a [`Drain`] bounds the shutdown.
//!
//! The example serves `/ticks` (a chunk every 100 ms, forever), has an HTTP/2
//! client read it, and shows what happens as the connection ages (GOAWAY at
//! 1 s, hard close at 1.5 s), then drains. Every stream end and connection
//! event is printed as a JSON line; it finishes by itself in about 2 seconds.

use std::{convert::Infallible, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, StreamBody, combinators::BoxBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    net::{TcpListener, TcpStream},
    time::Instant,
};
use tokio_stream::{StreamExt, wrappers::IntervalStream};
use tower::Layer;
use tower_stream_guard::{
    BoxError, ConnectionGuard, Drain, StreamGuardLayer, StreamHandle, stream::RequestBody,
};

type ResBody = BoxBody<Bytes, BoxError>;

/// The application: a tick every 100 ms until the stream ends.
async fn ticks(
    request: Request<RequestBody<hyper::body::Incoming>>,
) -> Result<Response<ResBody>, Infallible> {
    let handle = request.extensions().get::<StreamHandle>().cloned();
    let connection = handle.as_ref().and_then(|h| h.connection().map(|c| c.id()));
    let ticks =
        IntervalStream::new(tokio::time::interval(Duration::from_millis(100))).map(move |_| {
            Ok::<_, BoxError>(Frame::data(Bytes::from(format!(
                "tick on connection {connection:?}\n"
            ))))
        });
    Ok(Response::new(StreamBody::new(ticks).boxed()))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let drain = Drain::with_close_delay(Duration::from_millis(100));
    let guard = StreamGuardLayer::builder()
        .response_idle_timeout(Duration::from_secs(5))
        .max_streams_per_connection(16)
        .drain(&drain)
        .build()?;
    let connections = ConnectionGuard::builder()
        .max_age(Duration::from_secs(1))
        .max_age_grace(Duration::from_millis(500))
        .drain(&drain)
        .resolution(Duration::from_millis(10))
        .build()?;
    let mut stream_events = guard.subscribe();
    let mut connection_events = connections.subscribe();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Ok(event) = stream_events.recv() => println!("{}", event.to_json()),
                Ok(event) = connection_events.recv() => println!("{}", event.to_json()),
                else => return,
            }
        }
    });

    // The accept loop: one `serve_connection` per accepted connection.
    let service = guard.layer(tower::service_fn(ticks));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let accept = {
        let (connections, drain) = (connections.clone(), drain.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((io, _)) = accepted else { continue };
                        let (connections, service) = (connections.clone(), service.clone());
                        tokio::spawn(connections.serve_connection(io, service));
                    }
                    () = drain.started() => return,
                }
            }
        })
    };

    // An HTTP/2 client reads `/ticks` until the connection goes away.
    let start = Instant::now();
    let io = TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
    tokio::spawn(connection);
    let request = Request::get("http://example/ticks").body(Empty::<Bytes>::new())?;
    let mut body = sender.send_request(request).await?.into_body();
    let mut received = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(_) => received += 1,
            Err(err) => {
                println!(
                    "client: stream failed after {received} ticks, {} ms: {err}",
                    start.elapsed().as_millis()
                );
                break;
            }
        }
    }
    let late = Request::get("http://example/ticks").body(Empty::new())?;
    match sender.send_request(late).await {
        Ok(_) => println!("client: a new stream on the old connection was accepted"),
        Err(err) => println!("client: no new stream on the old connection: {err}"),
    }

    let report = drain.start(Duration::from_millis(200)).await;
    println!("{}", report.to_json());
    accept.await?;
    Ok(())
}
