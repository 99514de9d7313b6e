//! The processes of a scenario, as tests of this binary that the scenario
//! starts again inside its namespace (`--exact roles::NAME`). Each reads its
//! configuration from an environment variable, `key=value` pairs separated
//! by spaces, and returns at once when the variable is absent (as in a
//! plain `cargo test`). Each reports through `FAULT> kind json` lines on
//! stdout and stops by itself after `life_ms` (150 s by default) should
//! the scenario that started it be killed before it could kill it.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::StreamExt as _;
use http_body_util::BodyExt as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Endpoint, Server, server::TcpIncoming};
use tower_stream_guard::{ConnectionGuard, StreamGuardLayer, connection::GoawayNotice};

use super::lab::report;
use crate::common::{
    EchoService,
    echo::{EchoRequest, StreamRequest, echo_client::EchoClient, echo_server::EchoServer},
};

pub const TONIC_SERVER: (&str, &str) = ("roles::tonic_server", "SG_FAULTS_TONIC_SERVER");
pub const AXUM_SERVER: (&str, &str) = ("roles::axum_server", "SG_FAULTS_AXUM_SERVER");
pub const GRPC_CLIENT: (&str, &str) = ("roles::grpc_client", "SG_FAULTS_GRPC_CLIENT");
pub const H2_CLIENT: (&str, &str) = ("roles::h2_client", "SG_FAULTS_H2_CLIENT");

/// A role's configuration.
struct Config(HashMap<String, String>);

impl Config {
    fn from_env(var: &str) -> Option<Config> {
        let text = std::env::var(var).ok()?;
        let pairs = text
            .split_whitespace()
            .filter_map(|pair| pair.split_once('='));
        Some(Config(
            pairs.map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ))
    }

    fn str(&self, key: &str, default: &str) -> String {
        self.0
            .get(key)
            .cloned()
            .unwrap_or_else(|| default.to_string())
    }

    fn num(&self, key: &str, default: u64) -> u64 {
        self.0.get(key).map_or(default, |value| {
            value
                .parse()
                .unwrap_or_else(|_| panic!("{key}={value} is not a number"))
        })
    }

    fn millis(&self, key: &str, default: u64) -> Duration {
        Duration::from_millis(self.num(key, default))
    }

    /// `dead_peer`: `off` (no setting), `default` (the crate's default) or a
    /// number of milliseconds.
    fn dead_peer(&self) -> DeadPeer {
        DeadPeer::parse(&self.str("dead_peer", "default"))
    }

    /// Runs the role's future on a runtime of its own, bounded by `life_ms`.
    fn run(&self, role: impl Future<Output = ()>) {
        let life = self.millis("life_ms", 150_000);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            if tokio::time::timeout(life, role).await.is_err() {
                eprintln!("role stops after its life of {life:?}");
            }
        });
        // Connections still open must not keep the process alive.
        runtime.shutdown_background();
    }
}

/// A dead-peer setting: `off` (`None`), `default` (left unset), or a number
/// of milliseconds.
#[derive(Clone, Copy, Debug)]
enum DeadPeer {
    Off,
    Default,
    After(Duration),
}

impl DeadPeer {
    fn parse(value: &str) -> DeadPeer {
        match value {
            "off" => DeadPeer::Off,
            "default" => DeadPeer::Default,
            ms => DeadPeer::After(Duration::from_millis(ms.parse().expect("dead_peer in ms"))),
        }
    }
}

/// The connection guard every guarded server uses: the dead-peer setting
/// under test, nothing else, so no other limit closes connections.
fn connection_guard(dead_peer: DeadPeer) -> ConnectionGuard {
    let builder = ConnectionGuard::builder();
    let builder = match dead_peer {
        DeadPeer::Default => builder,
        DeadPeer::Off => builder.dead_peer_timeout(None),
        DeadPeer::After(timeout) => builder.dead_peer_timeout(Some(timeout)),
    };
    builder.build().expect("a valid connection guard")
}

/// The client's GOAWAY notice, whose connector sets the dead-peer options on
/// the connections it makes.
fn notice(dead_peer: DeadPeer) -> GoawayNotice {
    let notice = GoawayNotice::new();
    match dead_peer {
        DeadPeer::Default => notice,
        DeadPeer::Off => notice
            .with_dead_peer_timeout(None)
            .expect("a valid setting"),
        DeadPeer::After(timeout) => notice
            .with_dead_peer_timeout(Some(timeout))
            .expect("a valid setting"),
    }
}

/// The stream guard of the servers: an idle timeout (large unless the
/// scenario is about idle, so that it cannot mask a dead peer), and every
/// end reported on stdout as the crate writes it.
fn stream_guard(config: &Config) -> StreamGuardLayer {
    let guard = StreamGuardLayer::builder()
        .idle_timeout(config.millis("idle_ms", 30_000))
        .build()
        .expect("a valid stream guard");
    let mut ends = guard.subscribe();
    tokio::spawn(async move {
        while let Ok(event) = ends.recv().await {
            report("end", &event.to_json());
        }
    });
    guard
}

fn report_connections(connections: &ConnectionGuard) {
    let mut events = connections.subscribe();
    tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            report("conn", &event.to_json());
        }
    });
}

async fn listen() -> TcpListener {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listen on loopback");
    let port = listener.local_addr().expect("bound").port();
    report("listening", &format!(r#"{{"port":{port}}}"#));
    listener
}

// === the servers ===

/// The Echo gRPC service: `guard=crate` behind a `StreamGuardLayer` and a
/// `ConnectionGuard` (`dead_peer`, `idle_ms`), or `guard=bare`: tonic alone,
/// where the only sign of a stream's end is its producer task stopping
/// (reported as `producers {"live":N}` whenever the count changes).
#[test]
fn tonic_server() {
    let Some(config) = Config::from_env(TONIC_SERVER.1) else {
        return;
    };
    config.run(async {
        let service = EchoService::new();
        let listener = listen().await;
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        if config.str("guard", "crate") == "bare" {
            let watched = service.clone();
            tokio::spawn(async move {
                let mut last = 0;
                loop {
                    // A baseline's measurement, not a wait for a guard:
                    // plain tonic has no event to wait on.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let live = watched.live_producers();
                    if live != last {
                        report("producers", &format!(r#"{{"live":{live}}}"#));
                        last = live;
                    }
                }
            });
            let server = Server::builder().add_service(EchoServer::new(service));
            let _ = server.serve_with_incoming(incoming).await;
            return;
        }
        let connections = connection_guard(config.dead_peer());
        report_connections(&connections);
        let _ = Server::builder()
            .layer(stream_guard(&config))
            .add_service(EchoServer::new(service))
            .serve_with_incoming(connections.wrap_incoming(incoming))
            .await;
    });
}

/// An axum router with one streaming route, `GET /feed`: `chunk` bytes
/// every `interval_ms`, for ever, behind a `StreamGuardLayer`, served by
/// `axum::serve` over `ConnectionGuard::wrap_listener`.
#[test]
fn axum_server() {
    let Some(config) = Config::from_env(AXUM_SERVER.1) else {
        return;
    };
    config.run(async {
        let chunk = config.num("chunk", 5_000) as usize;
        let interval = config.millis("interval_ms", 100);
        let feed = move || async move {
            let ticks =
                tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(interval));
            let chunks = ticks.map(move |_| Ok::<_, Infallible>(Bytes::from(vec![b'x'; chunk])));
            axum::body::Body::from_stream(chunks)
        };
        let router = axum::Router::new()
            .route("/feed", axum::routing::get(feed))
            .layer(stream_guard(&config));
        let connections = connection_guard(config.dead_peer());
        report_connections(&connections);
        let listener = listen().await;
        // `axum::serve` itself, over the guard's listener: the connect
        // info carries each connection's handle to the stream guard.
        let app = router.into_make_service_with_connect_info::<
            tower_stream_guard::connection::GuardedConnectInfo<std::net::SocketAddr>,
        >();
        let _ = axum::serve(connections.wrap_listener(listener), app).await;
    });
}

// === the clients ===

/// A tonic client: `conns` connections (each its own `Channel`) to
/// `127.0.0.1:port`, each carrying `streams` calls of one kind (`call`):
///
/// - `server_stream`: asks for `size` bytes every `interval_ms`, for ever;
/// - `bidi_quiet`: sends one message, reports `quiet` once its echo is back,
///   then sends nothing more and waits for the call to end;
/// - `upload` (client-streaming): sends `size` bytes every `interval_ms`
///   until the call fails.
///
/// `notice=off|default|MS` connects through `GoawayNotice::connector` with
/// that dead-peer timeout; without it, a plain connector. Reports
/// `connected {"conn","port"}` per connection (its local port),
/// `progress {"counts":[..]}` every 250 ms (bytes received or sent per
/// stream) and `stream_end {"conn","stream","ok","error"}`.
#[test]
fn grpc_client() {
    let Some(config) = Config::from_env(GRPC_CLIENT.1) else {
        return;
    };
    config.run(async {
        let port = config.num("port", 0);
        let (conns, streams) = (config.num("conns", 1), config.num("streams", 1));
        let call = config.str("call", "server_stream");
        let size = config.num("size", 5_000) as u32;
        let interval = config.num("interval_ms", 100) as u32;
        let counts: Arc<Vec<AtomicU64>> =
            Arc::new((0..conns * streams).map(|_| AtomicU64::new(0)).collect());
        report_progress(Arc::clone(&counts));
        let mut calls = tokio::task::JoinSet::new();
        for conn in 0..conns {
            let channel = connect(&config, port, conn).await;
            for stream in 0..streams {
                let client = EchoClient::new(channel.clone());
                let count = Arc::clone(&counts);
                let call = call.clone();
                let index = (conn * streams + stream) as usize;
                calls.spawn(async move {
                    let count = &count[index];
                    let result = match call.as_str() {
                        "server_stream" => server_stream(client, size, interval, count).await,
                        "bidi_quiet" => bidi_quiet(client, conn, stream).await,
                        "upload" => upload(client, size, interval, count).await,
                        other => panic!("unknown call {other}"),
                    };
                    let (ok, error) = match result {
                        Ok(()) => (true, String::new()),
                        Err(status) => {
                            (false, format!("{:?}: {}", status.code(), status.message()))
                        }
                    };
                    let error = serde_json::Value::String(error);
                    report(
                        "stream_end",
                        &format!(
                            r#"{{"conn":{conn},"stream":{stream},"ok":{ok},"error":{error}}}"#
                        ),
                    );
                });
            }
        }
        while calls.join_next().await.is_some() {}
        // Let the last progress line out before the role returns.
        tokio::time::sleep(Duration::from_millis(300)).await;
    });
}

/// One connection, through the notice's connector when asked, reporting its
/// local port (the scenario's handle on it for iptables and ss).
async fn connect(config: &Config, port: u64, conn: u64) -> tonic::transport::Channel {
    let open = move |_uri: http::Uri| async move {
        let tcp = TcpStream::connect(("127.0.0.1", port as u16)).await?;
        tcp.set_nodelay(true)?;
        let local = tcp.local_addr()?.port();
        report("connected", &format!(r#"{{"conn":{conn},"port":{local}}}"#));
        Ok::<_, std::io::Error>(tcp)
    };
    let endpoint = Endpoint::from_shared(format!("http://127.0.0.1:{port}")).expect("a valid URI");
    let connected = match config.0.get("notice").map(String::as_str) {
        None => {
            // tonic's plain connectors yield hyper IO.
            let open = move |uri| {
                let connecting = open(uri);
                async move { connecting.await.map(TokioIo::new) }
            };
            endpoint
                .connect_with_connector(tower::service_fn(open))
                .await
        }
        Some(dead_peer) => {
            let connector = notice(DeadPeer::parse(dead_peer)).connector(tower::service_fn(open));
            endpoint.connect_with_connector(connector).await
        }
    };
    connected.expect("connect to the server")
}

fn report_progress(counts: Arc<Vec<AtomicU64>>) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_millis(250));
        loop {
            ticks.tick().await;
            let now: Vec<String> = counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed).to_string())
                .collect();
            report("progress", &format!(r#"{{"counts":[{}]}}"#, now.join(",")));
        }
    });
}

type Call = EchoClient<tonic::transport::Channel>;

async fn server_stream(
    mut client: Call,
    size: u32,
    interval_ms: u32,
    count: &AtomicU64,
) -> Result<(), tonic::Status> {
    let request = StreamRequest {
        count: 0,
        interval_ms,
        size,
    };
    let mut replies = client.server_stream(request).await?.into_inner();
    while let Some(reply) = replies.message().await? {
        count.fetch_add(reply.payload.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

async fn bidi_quiet(mut client: Call, conn: u64, stream: u64) -> Result<(), tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let _ = tx
        .send(EchoRequest {
            message: "hello".into(),
        })
        .await;
    let mut replies = client
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    replies.message().await?;
    report("quiet", &format!(r#"{{"conn":{conn},"stream":{stream}}}"#));
    // `tx` stays alive: the request stream stays open and says nothing.
    let next = replies.message().await;
    drop(tx);
    next.map(drop)
}

async fn upload(
    mut client: Call,
    size: u32,
    interval_ms: u32,
    count: &AtomicU64,
) -> Result<(), tonic::Status> {
    let message = "x".repeat(size as usize);
    let sent = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&sent);
    let ticks = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(
        Duration::from_millis(interval_ms.into()),
    ));
    let requests = ticks.map(move |_| {
        counted.fetch_add(message.len() as u64, Ordering::Relaxed);
        EchoRequest {
            message: message.clone(),
        }
    });
    let result = tokio::select! {
        result = client.client_stream(requests) => result.map(drop),
        // Copies what went into the call (not what the server took) into
        // the progress count.
        () = async { loop {
            count.store(sent.load(Ordering::Relaxed), Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(50)).await;
        } } => unreachable!(),
    };
    count.store(sent.load(Ordering::Relaxed), Ordering::Relaxed);
    result
}

/// A hyper HTTP/2 client for the axum server: one connection, one
/// `GET /feed`, reading the body until it fails. Reports as `grpc_client`.
#[test]
fn h2_client() {
    let Some(config) = Config::from_env(H2_CLIENT.1) else {
        return;
    };
    config.run(async {
        let port = config.num("port", 0) as u16;
        let counts = Arc::new(vec![AtomicU64::new(0)]);
        report_progress(Arc::clone(&counts));
        let result = async {
            let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
            tcp.set_nodelay(true)?;
            let local = tcp.local_addr()?.port();
            report("connected", &format!(r#"{{"conn":0,"port":{local}}}"#));
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                    .await?;
            tokio::spawn(connection);
            let request = http::Request::get(format!("http://127.0.0.1:{port}/feed"))
                .body(http_body_util::Empty::<Bytes>::new())?;
            let mut body = sender.send_request(request).await?.into_body();
            while let Some(frame) = body.frame().await {
                if let Some(data) = frame?.data_ref() {
                    counts[0].fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        }
        .await;
        let (ok, error) = match result {
            Ok(()) => (true, String::new()),
            Err(err) => (false, err.to_string()),
        };
        let error = serde_json::Value::String(error);
        report(
            "stream_end",
            &format!(r#"{{"conn":0,"stream":0,"ok":{ok},"error":{error}}}"#),
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    });
}
