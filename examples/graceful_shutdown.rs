//! A bounded graceful shutdown, seen from a handler.
//!
//! ```text
//! cargo run --example graceful_shutdown
//! ```
//!
//! A tonic server behind a guard with a [`Drain`], on connections a
//! [`ConnectionGuard`] wraps. Two clients watch a server stream:
//!
//! - **polite**: its handler selects on [`StreamHandle::draining`]; when the
//!   drain begins it sends a last message ("server draining, reconnect
//!   elsewhere") and ends its stream, well within the grace period;
//! - **oblivious**: its handler ignores the notice; when the grace period
//!   ends the guard cuts its stream with `UNAVAILABLE`.
//!
//! One second in, the example starts the drain (as `examples/server.rs` does
//! on SIGTERM or Ctrl-C) with a 2 s grace period. tonic's
//! `serve_with_incoming_shutdown` stops accepting at once and returns shortly
//! after the grace period, instead of waiting for the oblivious stream
//! forever. The example prints what each client saw, the end events and the
//! drain's report as JSON lines, and finishes by itself in about 3 seconds.

mod common;

use std::time::Duration;

use tokio::{
    net::TcpListener,
    sync::mpsc,
    time::{Instant, sleep},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request, Response, Status, Streaming,
    transport::{Server, server::TcpIncoming},
};
use tower_stream_guard::{ConnectionGuard, Drain, StreamGuardLayer, StreamHandle};

use common::echo::{
    EchoReply, EchoRequest, StreamRequest,
    echo_client::EchoClient,
    echo_server::{Echo, EchoServer},
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const GRACE: Duration = Duration::from_secs(2);

/// Only `ServerStream` is served; `x-polite: 1` picks the polite producer.
struct Watch;

fn reply(message: &str) -> Result<EchoReply, Status> {
    Ok(EchoReply {
        message: message.to_owned(),
        payload: Vec::new(),
    })
}

/// Sends a tick every 200 ms until its stream ends; a polite producer also
/// stops, with a last word, when the server begins to drain.
async fn produce(handle: StreamHandle, polite: bool, tx: mpsc::Sender<Result<EchoReply, Status>>) {
    let mut ticks = tokio::time::interval(Duration::from_millis(200));
    let draining = handle.draining();
    // The whole loop, sends included, stops when the stream ends.
    let work = async move {
        tokio::pin!(draining);
        loop {
            tokio::select! {
                () = &mut draining, if polite => {
                    let _ = tx.send(reply("server draining, reconnect elsewhere")).await;
                    return; // dropping `tx` ends the stream normally
                }
                _ = ticks.tick() => {
                    if tx.send(reply("tick")).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let _ = handle.run_until_cancelled(work).await;
}

#[tonic::async_trait]
impl Echo for Watch {
    async fn unary(&self, _: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        Err(Status::unimplemented("only ServerStream here"))
    }

    type ServerStreamStream = ReceiverStream<Result<EchoReply, Status>>;

    async fn server_stream(
        &self,
        request: Request<StreamRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let handle = request
            .extensions()
            .get::<StreamHandle>()
            .cloned()
            .ok_or_else(|| Status::internal("no stream guard in front of this service"))?;
        let polite = request.metadata().get("x-polite").is_some();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(produce(handle, polite, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn client_stream(
        &self,
        _: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        Err(Status::unimplemented("only ServerStream here"))
    }

    type BidiStream = ReceiverStream<Result<EchoReply, Status>>;

    async fn bidi(
        &self,
        _: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        Err(Status::unimplemented("only ServerStream here"))
    }
}

/// Watches one stream and says what it saw, with the time since `start`.
async fn watch(addr: std::net::SocketAddr, polite: bool, start: Instant) -> Result<(), BoxError> {
    let name = if polite { "polite" } else { "oblivious" };
    let mut client = EchoClient::connect(format!("http://{addr}")).await?;
    let mut request = Request::new(StreamRequest::default());
    if polite {
        request.metadata_mut().insert("x-polite", "1".parse()?);
    }
    let mut stream = client.server_stream(request).await?.into_inner();
    let mut ticks = 0;
    loop {
        let message = stream.message().await;
        let at = start.elapsed().as_millis();
        match message {
            Ok(Some(reply)) if reply.message == "tick" => ticks += 1,
            Ok(Some(reply)) => println!("{name:>9} client, {at:>5} ms: got {:?}", reply.message),
            Ok(None) => {
                println!("{name:>9} client, {at:>5} ms: stream ended normally after {ticks} ticks");
                return Ok(());
            }
            Err(status) => {
                println!(
                    "{name:>9} client, {at:>5} ms: {:?} {:?} after {ticks} ticks",
                    status.code(),
                    status.message()
                );
                return Ok(());
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let drain = Drain::new();
    let guard = StreamGuardLayer::builder()
        .idle_timeout(Duration::from_secs(60))
        .drain(&drain)
        .build()?;
    let connections = ConnectionGuard::builder().drain(&drain).build()?;
    let mut events = guard.subscribe();
    tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            println!("{}", event.to_json());
        }
    });

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(
        Server::builder()
            .layer(guard.clone())
            .add_service(EchoServer::new(Watch))
            .serve_with_incoming_shutdown(
                connections.wrap_incoming(TcpIncoming::from(listener).with_nodelay(Some(true))),
                drain.started(),
            ),
    );

    let start = Instant::now();
    let clients = [
        tokio::spawn(watch(addr, true, start)),
        tokio::spawn(watch(addr, false, start)),
    ];
    sleep(Duration::from_secs(1)).await;
    println!(
        "   server, {:>5} ms: draining, grace {GRACE:?}",
        start.elapsed().as_millis()
    );
    let report = drain.start(GRACE);
    server.await??;
    println!(
        "   server, {:>5} ms: serve_with_incoming_shutdown returned",
        start.elapsed().as_millis()
    );
    for client in clients {
        client.await??;
    }
    println!("{}", report.await.to_json());
    println!("active streams: {}", guard.active_streams());
    Ok(())
}
