//! The stream handle as a disconnect callback.
//!
//! ```text
//! cargo run --example disconnect
//! ```
//!
//! A tonic server-streaming handler usually spawns a producer task that feeds
//! an `mpsc` channel. When the client goes away, tonic drops the receiver, but
//! nothing tells the producer: it finds out only when its next `send` fails.
//! With a slow producer (here one message every 3 s, standing in for polling a
//! database or waiting on an upstream feed) that is seconds of wasted work and
//! held resources per departed client (tonic issues #196, #377, #781, #2438).
//!
//! [`StreamHandle::run_until_cancelled`] stops its future the moment the
//! stream ends, whatever ended it. This example runs both producers behind the
//! same guard (no limits configured: it only hands out handles and end
//! events):
//!
//! - **plain**: `loop { send; sleep(interval) }`, stops when a send fails;
//! - **guarded**: the same loop under `handle.run_until_cancelled(..)`.
//!
//! For each, a client opens the stream, reads one message and disconnects.
//! The example prints how long each producer task kept running after its
//! client left: about the interval for the plain one, about nothing for the
//! guarded one. It finishes by itself in about 3 seconds.

mod common;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::{
    net::TcpListener,
    sync::{broadcast, mpsc, oneshot},
    time::{Instant, sleep, timeout},
};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming, transport::Server};
use tower_stream_guard::{StreamGuardLayer, StreamHandle, StreamId};

use common::echo::{
    EchoReply, EchoRequest, StreamRequest,
    echo_client::EchoClient,
    echo_server::{Echo, EchoServer},
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How often the producers send: long, so that the plain one's delay shows.
const INTERVAL: Duration = Duration::from_secs(3);

/// Request metadata key that picks the producer.
const PRODUCER_KEY: &str = "x-producer";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Producer {
    /// Stops when `send` fails.
    Plain,
    /// Also stops when the stream ends (`handle.run_until_cancelled`).
    Guarded,
}

impl Producer {
    fn name(self) -> &'static str {
        match self {
            Producer::Plain => "plain",
            Producer::Guarded => "guarded",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        [Producer::Plain, Producer::Guarded]
            .into_iter()
            .find(|p| p.name() == name)
    }
}

/// A producer task's last words: when and why it stopped.
struct Exit {
    producer: Producer,
    at: Instant,
    why: String,
}

/// The server side: only `ServerStream` is implemented, with the producer the
/// request's `x-producer` metadata names.
#[derive(Clone)]
struct Producers {
    exits: mpsc::UnboundedSender<Exit>,
    /// Which producer serves which stream, to label the guard's end events.
    streams: Arc<Mutex<HashMap<StreamId, Producer>>>,
}

fn tick(n: u64) -> Result<EchoReply, Status> {
    Ok(EchoReply {
        message: format!("tick {n}"),
        payload: Vec::new(),
    })
}

/// The usual pattern: nothing but a failing `send` stops it.
async fn plain_producer(tx: mpsc::Sender<Result<EchoReply, Status>>) -> String {
    let mut n = 0;
    loop {
        if tx.send(tick(n)).await.is_err() {
            return format!("its send of message {n} failed: the receiver was gone");
        }
        n += 1;
        sleep(INTERVAL).await;
    }
}

/// The same loop, run until the stream ends.
async fn guarded_producer(
    tx: mpsc::Sender<Result<EchoReply, Status>>,
    handle: StreamHandle,
) -> String {
    match handle.run_until_cancelled(plain_producer(tx)).await {
        Some(why) => why,
        // The stream has ended: `cancelled()` resolves at once, with why.
        None => format!(
            "handle.run_until_cancelled() saw the stream end: {}",
            handle.cancelled().await
        ),
    }
}

#[tonic::async_trait]
impl Echo for Producers {
    async fn unary(&self, _: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        Err(Status::unimplemented("only ServerStream is served here"))
    }

    type ServerStreamStream = ReceiverStream<Result<EchoReply, Status>>;

    async fn server_stream(
        &self,
        request: Request<StreamRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let producer = request
            .metadata()
            .get(PRODUCER_KEY)
            .and_then(|value| value.to_str().ok())
            .and_then(Producer::parse)
            .ok_or_else(|| Status::invalid_argument("x-producer must be `plain` or `guarded`"))?;
        let handle = request
            .extensions()
            .get::<StreamHandle>()
            .cloned()
            .ok_or_else(|| Status::internal("no StreamHandle: the guard layer is missing"))?;
        self.streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(handle.id(), producer);

        let (tx, rx) = mpsc::channel(4);
        let exits = self.exits.clone();
        tokio::spawn(async move {
            let why = match producer {
                Producer::Plain => plain_producer(tx).await,
                Producer::Guarded => guarded_producer(tx, handle).await,
            };
            let _ = exits.send(Exit {
                producer,
                at: Instant::now(),
                why,
            });
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn client_stream(
        &self,
        _: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        Err(Status::unimplemented("only ServerStream is served here"))
    }

    type BidiStream = ReceiverStream<Result<EchoReply, Status>>;

    async fn bidi(
        &self,
        _: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        Err(Status::unimplemented("only ServerStream is served here"))
    }
}

/// Opens a stream served by `producer`, reads one message, disconnects and
/// returns the moment it left.
async fn visit(addr: SocketAddr, producer: Producer) -> Result<Instant, BoxError> {
    let mut client = EchoClient::connect(format!("http://{addr}")).await?;
    let mut request = Request::new(StreamRequest::default());
    request
        .metadata_mut()
        .insert(PRODUCER_KEY, producer.name().parse()?);
    let mut stream = client.server_stream(request).await?.into_inner();
    let first = stream.message().await?.ok_or("the stream ended at once")?;
    // Disconnect: drop the call (the client resets the HTTP/2 stream) and the
    // connection.
    drop(stream);
    drop(client);
    let left = Instant::now();
    println!(
        "{:<8} client read {:?}, then disconnected",
        producer.name(),
        first.message
    );
    Ok(left)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // No limits: the guard only hands out handles and end events here.
    let guard = StreamGuardLayer::builder().build()?;
    let (exits, mut exited) = mpsc::unbounded_channel();
    let streams = Arc::new(Mutex::new(HashMap::new()));
    let service = Producers {
        exits,
        streams: Arc::clone(&streams),
    };

    let mut events = guard.subscribe();
    let printer = tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(event) => {
                    let producer = streams
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get(&event.id())
                        .map_or("?", |p| p.name());
                    println!(
                        "{producer:<8} end event: stream #{} {} {} after {}",
                        event.id(),
                        event.path(),
                        event.reason(),
                        duration_text(event.duration())
                    );
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let mut server = tokio::spawn(
        Server::builder()
            .layer(guard.clone())
            .add_service(EchoServer::new(service))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            }),
    );
    println!("server on {addr}; each producer sends one message every {INTERVAL:?}\n");

    // Both visits at once, so the whole run takes one interval.
    let (plain_left, guarded_left) =
        tokio::try_join!(visit(addr, Producer::Plain), visit(addr, Producer::Guarded))?;

    let mut results = Vec::new();
    while results.len() < 2 {
        match timeout(INTERVAL + Duration::from_secs(3), exited.recv()).await {
            Ok(Some(exit)) => results.push(exit),
            _ => {
                println!("a producer task is still running well after its client left");
                break;
            }
        }
    }
    results.sort_by_key(|exit| exit.producer != Producer::Plain);

    println!("\nhow long each producer task kept running after its client left:");
    for exit in &results {
        let left = match exit.producer {
            Producer::Plain => plain_left,
            Producer::Guarded => guarded_left,
        };
        let after = exit.at.saturating_duration_since(left);
        println!(
            "  {:<8} {:>8}  (stopped because {})",
            exit.producer.name(),
            duration_text(after),
            exit.why
        );
    }
    println!("active streams: {}", guard.active_streams());

    let _ = stop.send(());
    if timeout(Duration::from_secs(2), &mut server).await.is_err() {
        server.abort();
    }
    printer.abort();
    Ok(())
}

fn duration_text(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{:.1}ms", d.as_secs_f64() * 1000.0)
    } else {
        format!("{:.2}s", d.as_secs_f64())
    }
}
