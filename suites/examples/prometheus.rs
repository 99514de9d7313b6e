//! The guard's metrics on a Prometheus `/metrics` endpoint, for the Grafana
//! dashboard in `suites/grafana/stream-guard.json`.
//!
//! ```text
//! cargo run -p stream-guard-suites --example prometheus -- \
//!     [--addr 127.0.0.1:50051] [--metrics-addr 127.0.0.1:9090]
//! ```
//!
//! It serves the Echo gRPC service of `proto/echo.proto` behind a
//! `ConnectionGuard` and a `StreamGuardLayer` with metrics on (idle timeout
//! 2 s, lifetime 30 s, 8 streams per connection), installs
//! metrics-exporter-prometheus's recorder (with histogram buckets for the
//! stream durations, so Grafana can compute percentiles), and answers
//! `GET /metrics` on the second address with what the recorder holds.
//! Put some traffic on it with the crate's client example
//! (`cargo run --example client -- --addr http://127.0.0.1:50051`), then:
//!
//! ```text
//! curl -s http://127.0.0.1:9090/metrics | grep stream_guard_
//! ```
//!
//! The dashboard's panels: active streams, stream ends per second by reason,
//! refusals per second by cap, stream duration percentiles (p50/p90/p99) by
//! route, active connections and connection closes by reason. Import it in
//! Grafana with a Prometheus data source that scrapes the `/metrics` above.
//! `suites/tests/prometheus.rs` runs this example's server against known
//! traffic, scrapes it and checks the counts and the dashboard's queries.

#[path = "../../examples/common/mod.rs"]
pub mod common;

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tonic::transport::{Server, server::TcpIncoming};
use tower_stream_guard::{ConnectionGuard, StreamGuardLayer};

use common::{EchoService, echo::echo_server::EchoServer};

/// Any error the example reports.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Bucket bounds, in seconds, of `stream_guard_stream_duration_seconds`:
/// from a quick unary call to the lifetime limit.
pub const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.025, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Installs the Prometheus recorder as the process's `metrics` recorder.
pub fn install_recorder() -> Result<PrometheusHandle, BoxError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("stream_guard_stream_duration_seconds".to_owned()),
            DURATION_BUCKETS,
        )?
        .install_recorder()?;
    Ok(handle)
}

/// The guards the example serves behind.
pub fn guards() -> Result<(StreamGuardLayer, ConnectionGuard), BoxError> {
    let streams = StreamGuardLayer::builder()
        .idle_timeout(Duration::from_secs(2))
        .max_lifetime(Duration::from_secs(30))
        .max_streams_per_connection(8)
        .metrics(true)
        .build()?;
    let connections = ConnectionGuard::builder().metrics(true).build()?;
    Ok((streams, connections))
}

/// Serves Echo on `grpc` behind the guards and `/metrics` on `metrics`,
/// until either fails.
pub async fn serve(
    grpc: TcpListener,
    metrics: TcpListener,
    handle: PrometheusHandle,
    (streams, connections): (StreamGuardLayer, ConnectionGuard),
) -> Result<(), BoxError> {
    let scrape = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move { handle.render() }
        }),
    );
    let echo = Server::builder()
        .layer(streams)
        .add_service(EchoServer::new(EchoService::new()))
        .serve_with_incoming(
            connections.wrap_incoming(TcpIncoming::from(grpc).with_nodelay(Some(true))),
        );
    tokio::select! {
        served = echo => served?,
        served = axum::serve(metrics, scrape) => served?,
    }
    Ok(())
}

fn parse_args() -> Result<(SocketAddr, SocketAddr), String> {
    let mut addr: SocketAddr = "127.0.0.1:50051".parse().expect("valid");
    let mut metrics_addr: SocketAddr = "127.0.0.1:9090".parse().expect("valid");
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let target = match flag.as_str() {
            "--addr" => &mut addr,
            "--metrics-addr" => &mut metrics_addr,
            other => return Err(format!("unknown argument {other:?}")),
        };
        let value = args.next().ok_or(format!("{flag} needs an address"))?;
        *target = value
            .parse()
            .map_err(|err| format!("{flag} {value:?}: {err}"))?;
    }
    Ok((addr, metrics_addr))
}

#[tokio::main]
async fn main() -> ExitCode {
    let (addr, metrics_addr) = match parse_args() {
        Ok(addrs) => addrs,
        Err(err) => {
            eprintln!("{err}\nusage: prometheus [--addr ADDR] [--metrics-addr ADDR]");
            return ExitCode::from(2);
        }
    };
    let run = async {
        let handle = install_recorder()?;
        let guards = guards()?;
        let grpc = TcpListener::bind(addr).await?;
        let metrics = TcpListener::bind(metrics_addr).await?;
        eprintln!(
            "Echo on {}, metrics on http://{}/metrics",
            grpc.local_addr()?,
            metrics.local_addr()?
        );
        serve(grpc, metrics, handle, guards).await
    };
    match run.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("prometheus example failed: {err}");
            ExitCode::FAILURE
        }
    }
}
