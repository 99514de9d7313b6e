//! Make-before-break: a client hears that its server is draining (GOAWAY) and
//! moves its long-lived stream to another server before the old one is cut.
//!
//! ```text
//! cargo run --example make_before_break
//! ```
//!
//! Self-contained, like the demo. Two instances of a "feed" server (the Echo
//! service's `ServerStream`, whose replies here carry the sequence numbers of
//! one feed both instances follow, as replicas of a log would) run on
//! loopback behind guards with a drain each. The client reads the feed from
//! instance A through a tonic `Channel` whose connections a `GoawayNotice`
//! watches, behind a client guard tied to the notice. Then A drains with a
//! 5 s grace: it sends GOAWAY at once, and the client's
//! `StreamHandle::draining()` resolves. The client opens the replacement
//! stream on instance B while still reading A, switches over once B's first
//! message leaves no gap, skips what it already had, and lets A go, long
//! before A's grace would have cut it. The last line reports the real gap,
//! e.g. `messages lost: 0, duplicates skipped: 3, switch took 4.1 ms`.

mod common;

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use common::echo::{
    EchoReply, EchoRequest, StreamRequest,
    echo_client::EchoClient,
    echo_server::{Echo, EchoServer},
};
use http::Uri;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{broadcast, mpsc},
    time::Instant,
};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use tower_stream_guard::{
    Drain, StreamGuardLayer, StreamHandle,
    connection::GoawayNotice,
    stream::{StreamGuard, TonicBody},
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How often the feed publishes the next sequence number.
const TICK: Duration = Duration::from_millis(5);
/// The draining server's grace period.
const GRACE: Duration = Duration::from_secs(5);
/// How long the client reads before the drain, and after the switch.
const READ_FOR: Duration = Duration::from_millis(300);

/// One feed of sequence numbers, 0, 1, 2, ..., that every instance follows.
fn feed() -> broadcast::Sender<u64> {
    let (sender, _) = broadcast::channel(1024);
    let publisher = sender.clone();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(TICK);
        for seq in 0.. {
            ticker.tick().await;
            // No subscriber yet is fine: the feed goes on.
            let _ = publisher.send(seq);
        }
    });
    sender
}

/// A server instance: `ServerStream` relays the feed from where it is now.
#[derive(Clone)]
struct FeedServer {
    feed: broadcast::Sender<u64>,
}

#[tonic::async_trait]
impl Echo for FeedServer {
    async fn unary(&self, _: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        Err(Status::unimplemented("a feed only"))
    }

    type ServerStreamStream = ReceiverStream<Result<EchoReply, Status>>;

    async fn server_stream(
        &self,
        request: Request<StreamRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let handle = request.extensions().get::<StreamHandle>().cloned();
        let mut feed = self.feed.subscribe();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let relay = async {
                while let Ok(seq) = feed.recv().await {
                    let reply = EchoReply {
                        message: seq.to_string(),
                        payload: Vec::new(),
                    };
                    if tx.send(Ok(reply)).await.is_err() {
                        return;
                    }
                }
            };
            match handle {
                // Stops when the guard ends the stream (the drain's cut).
                Some(handle) => drop(handle.run_until_cancelled(relay).await),
                None => relay.await,
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn client_stream(
        &self,
        _: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        Err(Status::unimplemented("a feed only"))
    }

    type BidiStream = ReceiverStream<Result<EchoReply, Status>>;

    async fn bidi(
        &self,
        _: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        Err(Status::unimplemented("a feed only"))
    }
}

/// Starts an instance on loopback; it stops accepting and sends GOAWAY when
/// `drain` starts.
async fn instance(feed: &broadcast::Sender<u64>, drain: &Drain) -> Result<SocketAddr, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let guard = StreamGuardLayer::builder().drain(drain).build()?;
    let server = tonic::transport::Server::builder()
        .layer(guard)
        .add_service(EchoServer::new(FeedServer { feed: feed.clone() }))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), drain.started());
    tokio::spawn(server);
    Ok(addr)
}

type Client = EchoClient<StreamGuard<tonic::transport::Channel, TonicBody>>;

/// A client of `addr` whose connections `notice` watches.
async fn client(addr: SocketAddr, notice: &GoawayNotice) -> Result<Client, BoxError> {
    let connector = notice.connector(tower::service_fn(|uri: Uri| async move {
        let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
        let tcp = TcpStream::connect(authority).await?;
        tcp.set_nodelay(true)?;
        Ok::<_, std::io::Error>(tcp)
    }));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_with_connector(connector)
        .await?;
    let guard = StreamGuardLayer::builder()
        .response_handle(true)
        .goaway_notice(notice)
        .build()?;
    Ok(EchoClient::new(tower::Layer::layer(
        &guard.for_tonic_channel(),
        channel,
    )))
}

/// Opens the feed; the stream and its handle.
async fn subscribe(client: &mut Client) -> Result<(Streaming<EchoReply>, StreamHandle), BoxError> {
    let response = client
        .server_stream(StreamRequest {
            count: 0,
            interval_ms: 0,
            size: 0,
        })
        .await?;
    let handle = response
        .extensions()
        .get::<StreamHandle>()
        .cloned()
        .ok_or("the client guard puts a handle in the response")?;
    Ok((response.into_inner(), handle))
}

async fn next_seq(stream: &mut Streaming<EchoReply>) -> Result<u64, BoxError> {
    let reply = stream.message().await?.ok_or("the feed ended")?;
    Ok(reply.message.parse()?)
}

/// What the switch cost.
#[derive(Debug)]
pub struct Report {
    /// Sequence numbers the client never saw between its first and last.
    pub lost: u64,
    /// Messages of the new stream the client already had from the old one.
    pub duplicates: u64,
    /// From the notice to the first message used from the new stream.
    pub switch: Duration,
    /// From the drain's start to the notice.
    pub notice_latency: Duration,
    /// Messages used in all.
    pub received: u64,
}

/// The whole scenario; prints as it goes.
pub async fn run() -> Result<Report, BoxError> {
    let feed = feed();
    let (drain_a, drain_b) = (Drain::new(), Drain::new());
    let addr_a = instance(&feed, &drain_a).await?;
    let addr_b = instance(&feed, &drain_b).await?;
    println!("instance A on {addr_a}, instance B on {addr_b}");

    let (notice_a, notice_b) = (GoawayNotice::new(), GoawayNotice::new());
    let mut to_a = client(addr_a, &notice_a).await?;
    let mut to_b = client(addr_b, &notice_b).await?;

    let (mut old, handle) = subscribe(&mut to_a).await?;
    let mut consumed: Vec<u64> = Vec::new();
    let reading = Instant::now();
    while reading.elapsed() < READ_FOR {
        consumed.push(next_seq(&mut old).await?);
    }
    println!(
        "reading the feed from A: {} messages so far, last {}",
        consumed.len(),
        consumed.last().copied().unwrap_or_default()
    );

    // A drains: GOAWAY now, streams cut after the grace.
    let drain_started = Instant::now();
    let _report = drain_a.start(GRACE);
    let mut draining = std::pin::pin!(handle.draining());
    loop {
        tokio::select! {
            () = &mut draining => break,
            seq = next_seq(&mut old) => consumed.push(seq?),
        }
    }
    let noticed = Instant::now();
    let notice_latency = noticed - drain_started;
    println!(
        "A is draining (GOAWAY heard {:.1} ms after the drain began; {GRACE:?} before the cut): opening the replacement on B",
        notice_latency.as_secs_f64() * 1e3
    );

    // Make: open on B while A still delivers.
    let opening = subscribe(&mut to_b);
    let mut opening = std::pin::pin!(opening);
    let (mut new, _new_handle) = loop {
        tokio::select! {
            opened = &mut opening => break opened?,
            seq = next_seq(&mut old) => consumed.push(seq?),
        }
    };
    let first_new = next_seq(&mut new).await?;
    // Break only once the old stream has caught up to the new one's first
    // message: no gap.
    while consumed.last().is_none_or(|&last| last + 1 < first_new) {
        consumed.push(next_seq(&mut old).await?);
    }
    drop(old);
    let mut duplicates = 0;
    let last_old = consumed.last().copied().unwrap_or_default();
    let mut pending = Some(first_new);
    let mut switch = None;
    let after = Instant::now();
    while after.elapsed() < READ_FOR {
        let seq = match pending.take() {
            Some(seq) => seq,
            None => next_seq(&mut new).await?,
        };
        if seq <= last_old {
            duplicates += 1;
            continue;
        }
        switch.get_or_insert_with(|| noticed.elapsed());
        consumed.push(seq);
    }
    let switch = switch.ok_or("nothing new came from B")?;
    println!(
        "switched to B: A's last message {last_old}, B's first {first_new}; reading B until {}",
        consumed.last().copied().unwrap_or_default()
    );

    let (first, last) = (consumed[0], *consumed.last().unwrap_or(&0));
    let lost = (last - first + 1).saturating_sub(consumed.len() as u64);
    drain_b.start(Duration::ZERO).await;
    Ok(Report {
        lost,
        duplicates,
        switch,
        notice_latency,
        received: consumed.len() as u64,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(report) => {
            println!(
                "messages lost: {}, duplicates skipped: {}, switch took {:.1} ms",
                report.lost,
                report.duplicates,
                report.switch.as_secs_f64() * 1e3
            );
            if report.lost == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(err) => {
            eprintln!("make_before_break failed: {err}");
            ExitCode::FAILURE
        }
    }
}
