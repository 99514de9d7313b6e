//! End to end over loopback: a real tonic server and client in one process,
//! with the full guard stack, without a guard, and with tower-http's body
//! timeout, in the same run.
//!
//! ```text
//! cargo bench -p stream-guard-suites --bench e2e                   # about a minute
//! ROUNDS=1 CALLS=2000 cargo bench -p stream-guard-suites --bench e2e   # a quick look
//! GUARD=idle,caps cargo bench -p stream-guard-suites --bench e2e       # part of the stack only
//! NAGLE=1 cargo bench -p stream-guard-suites --bench e2e               # without TCP_NODELAY
//! ```
//!
//! `GUARD` picks the guard's parts from `idle`, `lifetime`, `caps` and
//! `drain` (all by default). The server accepts with `TCP_NODELAY`, as
//! tonic's `Server::serve` does; `NAGLE=1` leaves Nagle's algorithm on.
//!
//! For each setup, in rounds that alternate between the setups, each round
//! starting with the next setup (so that drift in the machine's speed hits
//! them alike):
//!
//! - unary latency: `CALLS` calls one after another, p50 and p99;
//! - unary throughput: 16 concurrent callers, calls per second;
//! - bidi streaming: one call, `MESSAGES` messages pipelined both ways,
//!   messages per second.
//!
//! The median over the rounds is printed, with the median over the rounds
//! of the ratio to the unguarded server in the same round. The full guard
//! stack: idle timeout, request and response idle timeouts, lifetime, all
//! three caps, a drain and a subscriber draining the end events; on the
//! server only (the client is a bare channel).

use std::{net::SocketAddr, time::Duration};

#[path = "../../examples/common/mod.rs"]
mod common;

use common::{
    EchoService,
    echo::{EchoRequest, echo_client::EchoClient, echo_server::EchoServer},
};
use tokio::{net::TcpListener, sync::mpsc, time::Instant};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Server};
use tower_http::timeout::ResponseBodyTimeoutLayer;
use tower_stream_guard::{Drain, StreamGuardLayer};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    Bare,
    Guard,
    TowerHttp,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Bare => "no guard",
            Setup::Guard => "guard (full stack)",
            Setup::TowerHttp => "tower-http body timeout",
        }
    }
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn serve(setup: Setup) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    // As `Server::serve` does: TCP_NODELAY on accepted connections (with
    // Nagle's algorithm on, a response written in two pieces waits for the
    // client's delayed ACK).
    let incoming = if std::env::var("NAGLE").is_ok() {
        tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(false))
    } else {
        tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
    };
    let service = EchoServer::new(EchoService::new());
    match setup {
        Setup::Bare => {
            tokio::spawn(
                Server::builder()
                    .add_service(service)
                    .serve_with_incoming(incoming),
            );
        }
        Setup::Guard => {
            let drain = Drain::new();
            let parts =
                std::env::var("GUARD").unwrap_or_else(|_| "idle,lifetime,caps,drain".into());
            let mut builder = StreamGuardLayer::builder();
            if parts.contains("idle") {
                builder = builder
                    .idle_timeout(Duration::from_secs(60))
                    .request_idle_timeout(Duration::from_secs(60))
                    .response_idle_timeout(Duration::from_secs(60));
            }
            if parts.contains("lifetime") {
                builder = builder.max_lifetime(Duration::from_secs(600));
            }
            if parts.contains("caps") {
                builder = builder
                    .max_streams_per_connection(10_000)
                    .max_streams_per_peer(10_000)
                    .max_streams(100_000);
            }
            if parts.contains("drain") {
                builder = builder.drain(&drain);
            }
            let guard = builder.build().expect("valid configuration");
            let mut events = guard.subscribe();
            tokio::spawn(async move { while events.recv().await.is_ok() {} });
            tokio::spawn(
                Server::builder()
                    .layer(guard)
                    .add_service(service)
                    .serve_with_incoming(incoming),
            );
        }
        Setup::TowerHttp => {
            tokio::spawn(
                Server::builder()
                    .layer(ResponseBodyTimeoutLayer::new(Duration::from_secs(60)))
                    .add_service(service)
                    .serve_with_incoming(incoming),
            );
        }
    }
    addr
}

async fn client(addr: SocketAddr) -> EchoClient<Channel> {
    EchoClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
}

fn request() -> EchoRequest {
    EchoRequest {
        message: "ping".into(),
    }
}

/// (p50, p99) of `calls` sequential unary calls, in µs.
async fn unary_latency(client: &mut EchoClient<Channel>, calls: usize) -> (f64, f64) {
    let mut micros = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        client.unary(request()).await.expect("unary");
        micros.push(started.elapsed().as_secs_f64() * 1e6);
    }
    micros.sort_by(f64::total_cmp);
    (micros[calls / 2], micros[calls * 99 / 100])
}

/// Calls per second with 16 concurrent callers on one channel.
async fn unary_throughput(client: &EchoClient<Channel>, calls: usize) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                for _ in 0..calls / 16 {
                    client.unary(request()).await.expect("unary");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("caller");
    }
    (calls / 16 * 16) as f64 / started.elapsed().as_secs_f64()
}

/// Messages per second echoed through one bidi call.
async fn bidi_throughput(client: &mut EchoClient<Channel>, messages: usize) -> f64 {
    let (tx, rx) = mpsc::channel(64);
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        for _ in 0..messages {
            if tx.send(request()).await.is_err() {
                return;
            }
        }
    });
    let mut replies = client
        .bidi(ReceiverStream::new(rx))
        .await
        .expect("bidi")
        .into_inner();
    let mut received = 0;
    while received < messages {
        match replies.message().await {
            Ok(Some(_)) => received += 1,
            other => panic!("bidi stream ended early: {other:?}"),
        }
    }
    let rate = messages as f64 / started.elapsed().as_secs_f64();
    sender.await.expect("sender");
    rate
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rounds = env("ROUNDS", 3);
    let calls = env("CALLS", 5_000);
    let messages = env("MESSAGES", 50_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let setups = [Setup::Bare, Setup::Guard, Setup::TowerHttp];
        let mut clients = Vec::new();
        for setup in setups {
            let mut client = client(serve(setup).await).await;
            // Warm up: connection, buffers, the guard's timer task.
            unary_latency(&mut client, calls / 10).await;
            bidi_throughput(&mut client, messages / 10).await;
            clients.push(client);
        }
        // results[setup][figure][round]: p50, p99, calls/s, msgs/s.
        let mut results = vec![vec![Vec::new(); 4]; setups.len()];
        for round in 0..rounds {
            // Each round starts with another setup, so that none always runs
            // first (or right after the same neighbour).
            for step in 0..setups.len() {
                let index = (round + step) % setups.len();
                let (client, result) = (&mut clients[index], &mut results[index]);
                let (p50, p99) = unary_latency(client, calls).await;
                result[0].push(p50);
                result[1].push(p99);
                result[2].push(unary_throughput(client, calls).await);
                result[3].push(bidi_throughput(client, messages).await);
            }
        }
        // Per round, each setup's figure over the unguarded one of the same
        // round: drift in the machine's speed between rounds cancels out.
        let paired = |setup: usize, figure: usize| {
            median(
                (0..rounds)
                    .map(|round| results[setup][figure][round] / results[0][figure][round])
                    .collect(),
            )
        };
        println!(
            "e2e over loopback: {rounds} rounds, {calls} unary calls, {messages} bidi messages"
        );
        println!(
            "  medians over the rounds (in parentheses: the median per-round ratio to no guard)"
        );
        println!(
            "  {:<24} {:>16} {:>16} {:>18} {:>18}",
            "setup", "unary p50 µs", "unary p99 µs", "unary calls/s", "bidi msgs/s"
        );
        for (index, setup) in setups.iter().enumerate() {
            let m: Vec<f64> = (0..4).map(|f| median(results[index][f].clone())).collect();
            println!(
                "  {:<24} {:>8.1} ({:.3}) {:>8.1} ({:.3}) {:>10.0} ({:.3}) {:>10.0} ({:.3})",
                setup.name(),
                m[0],
                paired(index, 0),
                m[1],
                paired(index, 1),
                m[2],
                paired(index, 2),
                m[3],
                paired(index, 3),
            );
        }
    });
}
