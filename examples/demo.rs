//! A guided tour of `tower-stream-guard` in one self-contained run.
//!
//! ```text
//! cargo run --example demo
//! ```
//!
//! No arguments, no setup: the demo starts the Echo gRPC service (from
//! `examples/common`) on a loopback port behind a guard with short limits
//! (`idle_timeout` 1 s, `max_lifetime` 3 s), subscribes to the guard's end
//! events, and runs seven clients at once, each on its own TCP connection:
//!
//! | client | what it does | what the guard does |
//! |---|---|---|
//! | `well-behaved` | a unary call and a short server stream, read to the end | nothing: both end `completed` |
//! | `vanishing` | reads two messages of an endless stream, then drops the call and its connection | notices the reset: `cancelled`, producer task stopped |
//! | `silent-upload` | client-streaming: sends one message, then nothing, never half-closes | `idle_timeout` after 1 s; the client gets `DEADLINE_EXCEEDED` |
//! | `stalled-reader` | asks for a fast stream of 64 KiB messages and never reads it | `idle_timeout` after 1 s although hyper no longer polls the body |
//! | `outliver` | reads a slow endless stream, keeping it busy | `lifetime_exceeded` after 3 s; the client gets `DEADLINE_EXCEEDED` |
//! | `slow-reader` | asks for endless 64 KiB messages and reads one every 500 ms | `slow_reader` after about 1.5 s: under `min_response_rate` (512 KiB per 750 ms of data waiting for it; the first window passes on the burst that fills the flow-control window); the client gets `RESOURCE_EXHAUSTED` |
//! | `keep-alive-only` | subscribes to an SSE route (axum, beside the gRPC service) whose producer is dead: only keep-alive comments every 250 ms | `idle_timeout` after 1 s: the route's `Heartbeat::sse_comment()` says keep-alives are not activity |
//!
//! Every end event is printed as it arrives, one line each: stream id, client,
//! route, end reason, how long the stream lived, what moved each way and the
//! gRPC status it ended with. Each client prints what it saw. At the end the
//! demo checks that every stream produced the event it should, prints how many
//! streams ended for each reason, and as its last line `active streams: N`
//! (the guard's own count: 0 means nothing leaked). It takes about 3.5 s.

mod common;

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    process::ExitCode,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use axum::response::sse::{Event, KeepAlive, Sse};
use http_body_util::BodyExt;
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Notify, broadcast, mpsc, oneshot},
    time::{Instant, timeout, timeout_at},
};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{
    Status,
    transport::{Channel, Endpoint, Server, Uri},
};
use tower::service_fn;
use tower_stream_guard::{
    EndEvent, EndReason, Heartbeat, IdleDirection, RoutePolicy, StreamGuardLayer,
};

use common::EchoService;
use common::echo::{
    EchoReply, EchoRequest, StreamRequest, echo_client::EchoClient, echo_server::EchoServer,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Both directions silent this long ends a stream.
const IDLE_TIMEOUT: Duration = Duration::from_secs(1);
/// No stream lives longer than this.
const MAX_LIFETIME: Duration = Duration::from_secs(3);
/// A reader must take this many bytes for every [`RATE_WINDOW`] that data
/// waited for it.
const MIN_RATE_BYTES: u64 = 512 * 1024;
const RATE_WINDOW: Duration = Duration::from_millis(750);
/// How long to wait for missing end events once every client is done.
const EVENT_GRACE: Duration = Duration::from_secs(3);

const UNARY: &str = "/echo.Echo/Unary";
const SERVER_STREAM: &str = "/echo.Echo/ServerStream";
const CLIENT_STREAM: &str = "/echo.Echo/ClientStream";
/// A server-sent-events route (axum) beside the gRPC service.
const EVENTS: &str = "/events";

/// The demo's clients. Each one uses its own TCP connection, so the peer
/// address in an end event tells which client the stream belonged to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Scenario {
    WellBehaved,
    Vanishing,
    SilentUpload,
    StalledReader,
    Outliver,
    KeepAliveOnly,
    SlowReader,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::WellBehaved => "well-behaved",
            Scenario::Vanishing => "vanishing",
            Scenario::SilentUpload => "silent-upload",
            Scenario::StalledReader => "stalled-reader",
            Scenario::Outliver => "outliver",
            Scenario::KeepAliveOnly => "keep-alive-only",
            Scenario::SlowReader => "slow-reader",
        }
    }
}

/// Every client, in the order they are started.
const SCENARIOS: [Scenario; 7] = [
    Scenario::WellBehaved,
    Scenario::Vanishing,
    Scenario::SilentUpload,
    Scenario::StalledReader,
    Scenario::Outliver,
    Scenario::KeepAliveOnly,
    Scenario::SlowReader,
];

/// Every stream the demo opens, and how it should end.
const EXPECTED: [(Scenario, &str, EndReason); 8] = [
    (Scenario::WellBehaved, UNARY, EndReason::Completed),
    (Scenario::WellBehaved, SERVER_STREAM, EndReason::Completed),
    (Scenario::Vanishing, SERVER_STREAM, EndReason::Cancelled),
    (
        Scenario::SilentUpload,
        CLIENT_STREAM,
        EndReason::IdleTimeout(IdleDirection::Both),
    ),
    (
        Scenario::StalledReader,
        SERVER_STREAM,
        EndReason::IdleTimeout(IdleDirection::Both),
    ),
    (
        Scenario::Outliver,
        SERVER_STREAM,
        EndReason::LifetimeExceeded,
    ),
    (
        Scenario::KeepAliveOnly,
        EVENTS,
        EndReason::IdleTimeout(IdleDirection::Both),
    ),
    (Scenario::SlowReader, SERVER_STREAM, EndReason::SlowReader),
];

/// What the demo shares between the clients, the event printer and `main`.
struct Shared {
    start: Instant,
    /// Client-side local address of each connection -> its client.
    peers: Mutex<HashMap<SocketAddr, Scenario>>,
    /// End events received so far, with the client they belong to.
    events: Mutex<Vec<(Option<Scenario>, EndEvent)>>,
    arrived: Notify,
}

impl Shared {
    fn new() -> Self {
        Shared {
            start: Instant::now(),
            peers: Mutex::default(),
            events: Mutex::default(),
            arrived: Notify::new(),
        }
    }

    /// Prints one line prefixed with the time since the demo started.
    fn say(&self, what: &str, line: &str) {
        let elapsed = self.start.elapsed().as_secs_f64();
        println!("[{elapsed:5.2}s] {what:<6} {line}");
    }

    fn client(&self, scenario: Scenario, line: &str) {
        self.say("client", &format!("{:<15} {line}", scenario.name()));
    }

    fn scenario_of(&self, event: &EndEvent) -> Option<Scenario> {
        let peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        event.peer().and_then(|peer| peers.get(&peer).copied())
    }

    fn record(&self, scenario: Option<Scenario>, event: EndEvent) {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((scenario, event));
        self.arrived.notify_waiters();
    }

    fn find(&self, scenario: Scenario, path: &str) -> Option<EndEvent> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|(s, e)| *s == Some(scenario) && e.path() == path)
            .map(|(_, e)| e.clone())
    }

    /// Waits until the end event of `scenario`'s stream on `path` has arrived,
    /// or `deadline` passes.
    async fn wait_for(
        &self,
        scenario: Scenario,
        path: &str,
        deadline: Instant,
    ) -> Option<EndEvent> {
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(event) = self.find(scenario, path) {
                return Some(event);
            }
            if timeout_at(deadline, arrived).await.is_err() {
                return None;
            }
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("demo failed: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<ExitCode, BoxError> {
    let shared = Arc::new(Shared::new());

    let guard = StreamGuardLayer::builder()
        .idle_timeout(IDLE_TIMEOUT)
        .max_lifetime(MAX_LIFETIME)
        // SSE keep-alive comments flow to the client but do not count as
        // activity: a dead producer behind them is still idle.
        .route_prefix(
            EVENTS,
            RoutePolicy::new().heartbeat(Heartbeat::sse_comment()),
        )
        // A reader that takes less than 512 KiB per 750 ms of data waiting
        // for it holds the stream's memory for nothing.
        .min_response_rate(MIN_RATE_BYTES, RATE_WINDOW)
        .build()?;

    // Print every end event the moment it is emitted.
    let mut events = guard.subscribe();
    let printer = tokio::spawn({
        let shared = Arc::clone(&shared);
        async move {
            loop {
                match events.recv().await {
                    Ok(event) => {
                        let scenario = shared.scenario_of(&event);
                        shared.say("event", &event_line(scenario, &event));
                        shared.record(scenario, event);
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        shared.say("event", &format!("(missed {missed} events)"));
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    });

    // The guarded server, on a real loopback TCP port.
    let service = EchoService::new();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    // The Echo service, and beside it an SSE route whose producer is dead:
    // only axum's keep-alive comments (every 250 ms) ever flow.
    let routes = tonic::service::Routes::new(EchoServer::new(service.clone()))
        .into_axum_router()
        .route(
            EVENTS,
            axum::routing::get(|| async {
                let dead = futures_util::stream::pending::<Result<Event, Infallible>>();
                Sse::new(dead).keep_alive(KeepAlive::new().interval(Duration::from_millis(250)))
            }),
        );
    let mut server = tokio::spawn(
        Server::builder()
            .layer(guard.clone())
            .add_routes(routes.into())
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            }),
    );
    println!(
        "guarded Echo server on {addr}: idle_timeout {IDLE_TIMEOUT:?}, max_lifetime {MAX_LIFETIME:?}"
    );
    println!(
        "running {} clients at once, one connection each\n",
        SCENARIOS.len()
    );

    // All clients at once: the slowest (the lifetime) sets the pace.
    let mut clients = tokio::task::JoinSet::new();
    for scenario in SCENARIOS {
        let shared = Arc::clone(&shared);
        clients.spawn(async move {
            if let Err(err) = run_scenario(scenario, addr, &shared).await {
                shared.client(scenario, &format!("FAILED: {err}"));
            }
        });
    }
    while let Some(joined) = clients.join_next().await {
        joined?;
    }

    // Every stream must have produced its one end event.
    let deadline = Instant::now() + EVENT_GRACE;
    let mut problems = Vec::new();
    for (scenario, path, expected) in EXPECTED {
        match shared.wait_for(scenario, path, deadline).await {
            None => problems.push(format!(
                "MISSING: no end event for {} {path} within {} after the clients finished",
                scenario.name(),
                duration_text(EVENT_GRACE)
            )),
            Some(event) if event.reason() != expected => problems.push(format!(
                "UNEXPECTED: {} {path} ended {}, expected {}",
                scenario.name(),
                reason_text(event.reason()),
                reason_text(expected)
            )),
            Some(_) => {}
        }
    }

    println!();
    let events = shared
        .events
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    if events.len() > EXPECTED.len() {
        problems.push(format!(
            "UNEXPECTED: {} end events, expected {}",
            events.len(),
            EXPECTED.len()
        ));
    }
    if problems.is_empty() {
        println!(
            "all {} streams ended as expected, each with exactly one end event",
            EXPECTED.len()
        );
    }
    for problem in &problems {
        println!("{problem}");
    }

    println!("\nsummary: {} streams", events.len());
    for reason in [
        "completed",
        "cancelled",
        "idle_timeout",
        "lifetime_exceeded",
        "slow_reader",
        "error",
    ] {
        let count = events
            .iter()
            .filter(|(_, e)| e.reason().as_str() == reason)
            .count();
        println!("  {reason:<18} {count}");
    }
    // A producer stops at its next step after its stream ended: on a busy
    // machine give the last ones a moment.
    let settle = Instant::now() + Duration::from_secs(1);
    while (service.live_producers() > 0 || service.live_handlers() > 0) && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "server tasks still running: {} stream producers, {} client-stream handlers",
        service.live_producers(),
        service.live_handlers()
    );
    println!("active streams: {}", guard.active_streams());

    // Shut the server down so that the process exits.
    let _ = stop.send(());
    if timeout(Duration::from_secs(2), &mut server).await.is_err() {
        server.abort();
    }
    printer.abort();

    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Connects a client on its own TCP connection and remembers the connection's
/// local address, which the server reports as the peer in end events.
async fn connect(
    addr: SocketAddr,
    scenario: Scenario,
    shared: &Arc<Shared>,
) -> Result<EchoClient<Channel>, BoxError> {
    let shared = Arc::clone(shared);
    let connector = service_fn(move |_: Uri| {
        let shared = Arc::clone(&shared);
        async move {
            let tcp = TcpStream::connect(addr).await?;
            shared
                .peers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(tcp.local_addr()?, scenario);
            Ok::<_, std::io::Error>(TokioIo::new(tcp))
        }
    });
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_with_connector(connector)
        .await?;
    Ok(EchoClient::new(channel))
}

async fn run_scenario(
    scenario: Scenario,
    addr: SocketAddr,
    shared: &Arc<Shared>,
) -> Result<(), BoxError> {
    if scenario == Scenario::KeepAliveOnly {
        return keep_alive_only(addr, shared).await;
    }
    let client = connect(addr, scenario, shared).await?;
    match scenario {
        Scenario::WellBehaved => well_behaved(client, shared).await,
        Scenario::Vanishing => vanishing(client, shared).await,
        Scenario::SilentUpload => silent_upload(client, shared).await,
        Scenario::StalledReader => stalled_reader(client, shared).await,
        Scenario::Outliver => outliver(client, shared).await,
        Scenario::SlowReader => slow_reader(client, shared).await,
        Scenario::KeepAliveOnly => unreachable!("served over plain HTTP/2 above"),
    }
}

/// A unary call and a short server stream, both read to the end.
async fn well_behaved(mut client: EchoClient<Channel>, shared: &Shared) -> Result<(), BoxError> {
    let reply = client
        .unary(EchoRequest {
            message: "hello".into(),
        })
        .await?
        .into_inner();
    let mut stream = client
        .server_stream(StreamRequest {
            count: 5,
            interval_ms: 20,
            size: 1024,
        })
        .await?
        .into_inner();
    let mut read = 0;
    while stream.message().await?.is_some() {
        read += 1;
    }
    shared.client(
        Scenario::WellBehaved,
        &format!(
            "unary replied {:?}; server stream delivered {read}/5 messages and ended with OK",
            reply.message
        ),
    );
    Ok(())
}

/// Reads two messages of an endless stream, then vanishes.
async fn vanishing(mut client: EchoClient<Channel>, shared: &Shared) -> Result<(), BoxError> {
    let mut stream = client
        .server_stream(StreamRequest {
            count: 0,
            interval_ms: 100,
            size: 100,
        })
        .await?
        .into_inner();
    for _ in 0..2 {
        stream.message().await?;
    }
    drop(stream);
    drop(client);
    shared.client(
        Scenario::Vanishing,
        "read 2 messages of an endless stream, then dropped the call and its connection",
    );
    Ok(())
}

/// Client-streaming: one message, then silence, never half-closing.
async fn silent_upload(mut client: EchoClient<Channel>, shared: &Shared) -> Result<(), BoxError> {
    let (tx, rx) = mpsc::channel(1);
    tx.send(EchoRequest {
        message: "first and last".into(),
    })
    .await?;
    let started = Instant::now();
    // `tx` stays alive, so the request stream never ends.
    let result = timeout(
        MAX_LIFETIME + Duration::from_secs(2),
        client.client_stream(ReceiverStream::new(rx)),
    )
    .await;
    let line = match result {
        Err(_) => "no answer at all: the guard did not fire".to_string(),
        Ok(Ok(reply)) => format!(
            "unexpected success: {:?} messages counted",
            reply.into_inner().message
        ),
        Ok(Err(status)) => format!(
            "sent 1 message and went silent; after {} the call failed with {}",
            duration_text(started.elapsed()),
            status_text(&status)
        ),
    };
    drop(tx);
    shared.client(Scenario::SilentUpload, &line);
    Ok(())
}

/// Endless 64 KiB messages as fast as the reader takes them: for the
/// stalled and the slow reader.
fn endless_64k() -> StreamRequest {
    StreamRequest {
        count: 0,
        interval_ms: 0,
        size: 64 * 1024,
    }
}

/// Asks for a fast stream of 64 KiB messages and does not read it until the
/// guard has fired; then reads what was buffered to see how the stream ends.
async fn stalled_reader(mut client: EchoClient<Channel>, shared: &Shared) -> Result<(), BoxError> {
    let mut stream = client.server_stream(endless_64k()).await?.into_inner();
    shared.client(
        Scenario::StalledReader,
        "asked for endless 64 KiB messages and stopped reading (the stream stays open)",
    );
    let deadline = Instant::now() + MAX_LIFETIME + Duration::from_secs(2);
    if shared
        .wait_for(Scenario::StalledReader, SERVER_STREAM, deadline)
        .await
        .is_none()
    {
        shared.client(Scenario::StalledReader, "no end event while stalled");
        return Ok(());
    }
    // The guard fired without the response body being polled. If the reader
    // comes back, it gets what was in flight, then the guard's trailers.
    let drained = timeout(Duration::from_secs(3), read_to_end(&mut stream)).await;
    let line = match drained {
        Ok((read, end)) => {
            format!("after the guard fired, started reading: {read} buffered messages, then {end}")
        }
        Err(_) => "after the guard fired, started reading: the stream never ended".to_string(),
    };
    shared.client(Scenario::StalledReader, &line);
    Ok(())
}

/// Reads a slow endless stream until the maximum lifetime cuts it.
async fn outliver(mut client: EchoClient<Channel>, shared: &Shared) -> Result<(), BoxError> {
    let started = Instant::now();
    let mut stream = client
        .server_stream(StreamRequest {
            count: 0,
            interval_ms: 250,
            size: 16,
        })
        .await?
        .into_inner();
    let read_all = read_to_end(&mut stream);
    let line = match timeout(MAX_LIFETIME + Duration::from_secs(2), read_all).await {
        Ok((read, end)) => format!(
            "read {read} messages (one every 250ms) for {}, then {end}",
            duration_text(started.elapsed())
        ),
        Err(_) => "the stream outlived its maximum lifetime: the guard did not fire".to_string(),
    };
    shared.client(Scenario::Outliver, &line);
    Ok(())
}

/// Asks for endless 64 KiB messages and reads one every 500 ms: the stream
/// moves (no idle timeout), but far below the minimum rate.
async fn slow_reader(mut client: EchoClient<Channel>, shared: &Shared) -> Result<(), BoxError> {
    let started = Instant::now();
    let mut stream = client.server_stream(endless_64k()).await?.into_inner();
    // Slowly, until the guard has ended the stream; then what was in flight
    // (the flow-control window's worth) at once, to see how it ended.
    let deadline = Instant::now() + MAX_LIFETIME + Duration::from_secs(2);
    let mut read = 0_u32;
    let ended = shared.wait_for(Scenario::SlowReader, SERVER_STREAM, deadline);
    tokio::pin!(ended);
    loop {
        tokio::select! {
            event = &mut ended => {
                if event.is_none() {
                    shared.client(Scenario::SlowReader, "the slow reader was never ended");
                    return Ok(());
                }
                break;
            }
            () = tokio::time::sleep(Duration::from_millis(500)) => {
                if let Ok(Some(_)) = stream.message().await {
                    read += 1;
                }
            }
        }
    }
    let slow = started.elapsed();
    let rest = timeout(Duration::from_secs(3), read_to_end(&mut stream)).await;
    let line = match rest {
        Ok((buffered, end)) => format!(
            "read a 64 KiB message every 500ms ({read} in {}); after the guard fired, {buffered} buffered messages, then {end}",
            duration_text(slow)
        ),
        Err(_) => "after the guard fired, the stream never ended".to_string(),
    };
    shared.client(Scenario::SlowReader, &line);
    Ok(())
}

/// Subscribes to the SSE route, whose producer never sends an event: only
/// keep-alive comments arrive, and the guard ends the stream as idle.
async fn keep_alive_only(addr: SocketAddr, shared: &Arc<Shared>) -> Result<(), BoxError> {
    let tcp = TcpStream::connect(addr).await?;
    shared
        .peers
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(tcp.local_addr()?, Scenario::KeepAliveOnly);
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    let request = http::Request::get(format!("http://{addr}{EVENTS}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let started = Instant::now();
    let mut body = sender.send_request(request).await?.into_body();
    let mut comments = 0;
    let end = loop {
        match timeout(MAX_LIFETIME + Duration::from_secs(2), body.frame()).await {
            Ok(Some(Ok(frame))) if frame.data_ref().is_some_and(|data| data.starts_with(b":")) => {
                comments += 1;
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(err))) => break format!("the stream was reset ({err})"),
            Ok(None) => break "a clean end".to_string(),
            Err(_) => break "nothing: the keep-alives hid the dead producer".to_string(),
        }
    };
    let line = format!(
        "read {comments} keep-alive comments and no event for {}, then {end}",
        duration_text(started.elapsed())
    );
    shared.client(Scenario::KeepAliveOnly, &line);
    Ok(())
}

/// Reads a server stream to its end: how many messages, and how it ended.
async fn read_to_end(stream: &mut tonic::Streaming<EchoReply>) -> (u32, String) {
    let mut read = 0_u32;
    loop {
        match stream.message().await {
            Ok(Some(_)) => read += 1,
            Ok(None) => return (read, "a clean end (no error)".to_string()),
            Err(status) => return (read, status_text(&status)),
        }
    }
}

/// One end event as one line.
fn event_line(scenario: Option<Scenario>, event: &EndEvent) -> String {
    let request = event.request();
    let response = event.response();
    format!(
        "#{:<3} {:<15} {:<24} {:<20} after {:<8} req {} frames/{}  resp {} frames/{}  {}",
        event.id(),
        scenario.map_or("?", Scenario::name),
        event.path(),
        reason_text(event.reason()),
        duration_text(event.duration()),
        request.frames,
        bytes_text(request.bytes),
        response.frames,
        bytes_text(response.bytes),
        grpc_text(event.grpc_status()),
    )
}

fn reason_text(reason: EndReason) -> String {
    match reason.direction() {
        Some(direction) => format!("{} ({direction})", reason.as_str()),
        None => reason.as_str().to_string(),
    }
}

fn duration_text(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{:.1}ms", d.as_secs_f64() * 1000.0)
    } else {
        format!("{:.2}s", d.as_secs_f64())
    }
}

fn bytes_text(bytes: u64) -> String {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * 1024;
    let scaled = |unit: u64, name: &str| {
        let value = bytes as f64 / unit as f64;
        if bytes.is_multiple_of(unit) {
            format!("{value:.0} {name}")
        } else {
            format!("{value:.1} {name}")
        }
    };
    match bytes {
        b if b < KIB => format!("{b} B"),
        b if b < MIB => scaled(KIB, "KiB"),
        _ => scaled(MIB, "MiB"),
    }
}

fn grpc_text(status: Option<u32>) -> String {
    let Some(code) = status else {
        return "no grpc-status".to_string();
    };
    let name = match code {
        0 => " (OK)",
        1 => " (CANCELLED)",
        4 => " (DEADLINE_EXCEEDED)",
        13 => " (INTERNAL)",
        14 => " (UNAVAILABLE)",
        _ => "",
    };
    format!("grpc-status {code}{name}")
}

fn status_text(status: &Status) -> String {
    format!("{:?} \"{}\"", status.code(), status.message())
}
