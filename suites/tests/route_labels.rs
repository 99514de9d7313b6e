//! The `route` metric label stays bounded whatever peers send (issue 28):
//! thousands of made-up gRPC paths through a tonic server behind an auth
//! interceptor (answered `UNAUTHENTICATED` before routing), through an axum
//! router (answered `404` without a gRPC status), and through a catch-all
//! that answers `OK` to every path, add at most the documented number of
//! label values; a method the service really serves keeps its own.
//!
//! Every test runs with a recorder of its own (`recorder/mod.rs`).

#[path = "../../examples/common/mod.rs"]
mod common;

mod recorder;

use std::{net::SocketAddr, time::Duration};

use axum::{Router, http::HeaderMap};
use bytes::Bytes;
use common::{
    EchoService,
    echo::{EchoRequest, echo_client::EchoClient, echo_server::EchoServer},
};
use futures_util::{StreamExt, stream};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use recorder::{Seen, run};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Status, metadata::MetadataValue, service::InterceptorLayer};
use tower_stream_guard::{ConfigError, StreamGuardBuilder, StreamGuardLayer};

const ENDED: &str = "stream_guard_streams_ended_total";
const DURATION: &str = "stream_guard_stream_duration_seconds";

/// How many made-up paths each test sends.
const MADE_UP: usize = 2_000;

/// The documented default bound on the gRPC paths that become `route`
/// values (`StreamGuardBuilder::max_path_labels`).
const DEFAULT_PATH_LABELS: usize = 256;

/// The token the auth interceptor lets through.
const TOKEN: &str = "Bearer let-me-in";

/// A made-up method path, different for every `n`.
fn made_up(n: usize) -> String {
    format!("/made{n}.Up{}/Method{}", n * 7919 % 1000, n ^ 0x5a5a)
}

/// A guard with metrics on (`tune` adds settings) and a channel that hears
/// of each stream's end after its metrics were recorded (the end callback
/// runs after them).
fn guard_with_ends(
    tune: impl FnOnce(StreamGuardBuilder) -> StreamGuardBuilder,
) -> (StreamGuardLayer, mpsc::UnboundedReceiver<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let layer = tune(StreamGuardLayer::builder().metrics(true))
        .on_end(move |_| {
            let _ = tx.send(());
        })
        .build()
        .expect("valid configuration");
    (layer, rx)
}

/// Waits until `count` more streams have ended.
async fn ended(ends: &mut mpsc::UnboundedReceiver<()>, count: usize) {
    tokio::time::timeout(Duration::from_secs(60), async {
        for _ in 0..count {
            ends.recv().await.expect("the guard lives");
        }
    })
    .await
    .expect("every stream ended");
}

/// The [`MADE_UP`] paths.
fn made_up_paths() -> Vec<String> {
    (0..MADE_UP).map(made_up).collect()
}

/// Sends a gRPC call to each of `paths` over one HTTP/2 connection, 64 at
/// a time, and returns each answer's HTTP status and `grpc-status` (from
/// the head or the trailers).
async fn flood(addr: SocketAddr, paths: Vec<String>) -> Vec<(StatusCode, Option<String>)> {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    stream::iter(paths)
        .map(|path| {
            let mut sender = sender.clone();
            async move {
                let request = Request::post(path)
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                sender.ready().await.unwrap();
                let response = sender.send_request(request).await.unwrap();
                let status = response.status();
                let head = grpc_status(response.headers());
                let trailers = response
                    .into_body()
                    .collect()
                    .await
                    .unwrap()
                    .trailers()
                    .cloned();
                (
                    status,
                    head.or_else(|| trailers.as_ref().and_then(grpc_status)),
                )
            }
        })
        .buffer_unordered(64)
        .collect()
        .await
}

fn grpc_status(headers: &HeaderMap) -> Option<String> {
    headers
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned())
}

/// The `route` values of both metrics that carry the label; they must agree.
fn routes(seen: &Seen) -> Vec<String> {
    let routes = seen.label_values(ENDED, "route");
    assert_eq!(seen.label_values(DURATION, "route"), routes);
    routes
}

async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

#[test]
fn made_up_methods_refused_by_an_auth_interceptor_add_no_route_values() {
    run(false, |seen| async move {
        let (listener, addr) = bind().await;
        let (layer, mut ends) = guard_with_ends(|b| b);
        let auth = |request: tonic::Request<()>| match request.metadata().get("authorization") {
            Some(token) if token == TOKEN => Ok(request),
            _ => Err(Status::unauthenticated("who are you?")),
        };
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .layer(layer.clone())
                .layer(InterceptorLayer::new(auth))
                .add_service(EchoServer::new(EchoService::new()))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );

        // Control: a real method, called with the token, is served and
        // labelled by its path.
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let token: MetadataValue<_> = TOKEN.parse().unwrap();
        let mut client = EchoClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", token.clone());
            Ok(r)
        });
        client
            .unary(EchoRequest {
                message: "hi".into(),
            })
            .await
            .unwrap();
        drop(client);
        ended(&mut ends, 1).await;

        let answers = flood(addr, made_up_paths()).await;
        assert!(
            answers
                .iter()
                .all(|(_, code)| code.as_deref() == Some("16")),
            "the interceptor answers every made-up method: {:?}",
            &answers[..3]
        );
        ended(&mut ends, MADE_UP).await;

        let routes = routes(seen);
        assert_eq!(
            routes,
            ["/echo.Echo/Unary", "other"],
            "{} values",
            routes.len()
        );
        assert_eq!(
            seen.get(&format!(
                "{ENDED}{{direction=none,grpc_code=16,reason=completed,route=other}}"
            )),
            MADE_UP as f64
        );
        server.abort();
    });
}

#[test]
fn made_up_grpc_paths_an_axum_router_answers_404_add_no_route_values() {
    run(false, |seen| async move {
        let (listener, addr) = bind().await;
        let (layer, mut ends) = guard_with_ends(|b| b);
        // A gRPC service inside an axum router whose fallback says 404 (no
        // `grpc-status`), the guard around both.
        let app = tonic::service::Routes::new(EchoServer::new(EchoService::new()))
            .into_axum_router()
            .fallback(|| async { StatusCode::NOT_FOUND })
            .layer(layer.clone());
        let server = tokio::spawn(async move { axum::serve(listener, app).await });

        // Control: the served method is labelled by its path.
        let mut client = EchoClient::connect(format!("http://{addr}")).await.unwrap();
        client
            .unary(EchoRequest {
                message: "hi".into(),
            })
            .await
            .unwrap();
        drop(client);
        ended(&mut ends, 1).await;

        let answers = flood(addr, made_up_paths()).await;
        assert!(
            answers
                .iter()
                .all(|answer| *answer == (StatusCode::NOT_FOUND, None)),
            "the router answers 404 without a gRPC status: {:?}",
            &answers[..3]
        );
        ended(&mut ends, MADE_UP).await;

        let routes = routes(seen);
        assert_eq!(
            routes,
            ["/echo.Echo/Unary", "other"],
            "{} values",
            routes.len()
        );
        assert_eq!(
            seen.get(&format!(
                "{ENDED}{{direction=none,grpc_code=none,reason=completed,route=other}}"
            )),
            MADE_UP as f64
        );
        server.abort();
    });
}

/// A server that answers `OK` to every path: a gRPC trailers-only response
/// with `grpc-status: 0`.
fn catch_all(layer: &StreamGuardLayer) -> Router {
    Router::new()
        .fallback(|| async {
            (
                [("content-type", "application/grpc"), ("grpc-status", "0")],
                (),
            )
        })
        .layer(layer.clone())
}

#[test]
fn a_catch_all_that_answers_ok_adds_at_most_the_documented_bound_of_route_values() {
    run(false, |seen| async move {
        let (listener, addr) = bind().await;
        let (layer, mut ends) = guard_with_ends(|b| b);
        let app = catch_all(&layer);
        let server = tokio::spawn(async move { axum::serve(listener, app).await });

        let answers = flood(addr, made_up_paths()).await;
        assert!(
            answers
                .iter()
                .all(|answer| *answer == (StatusCode::OK, Some("0".to_owned()))),
            "{:?}",
            &answers[..3]
        );
        ended(&mut ends, MADE_UP).await;

        // The first paths to end OK take the table's places; the rest are
        // `other`.
        let routes = routes(seen);
        assert_eq!(
            routes.len(),
            DEFAULT_PATH_LABELS + 1,
            "{} values",
            routes.len()
        );
        assert!(routes.contains(&"other".to_owned()));
        assert_eq!(
            seen.get(&format!(
                "{ENDED}{{direction=none,grpc_code=0,reason=completed,route=other}}"
            )),
            (MADE_UP - DEFAULT_PATH_LABELS) as f64
        );

        // A path in the table keeps its value once the table is full: its
        // next call is counted under it and adds no value.
        let known = routes.iter().find(|r| *r != "other").unwrap().clone();
        let key = format!("{ENDED}{{direction=none,grpc_code=0,reason=completed,route={known}}}");
        let before = seen.get(&key);
        flood(addr, vec![known]).await;
        ended(&mut ends, 1).await;
        assert_eq!(seen.get(&key), before + 1.0);
        assert_eq!(self::routes(seen).len(), DEFAULT_PATH_LABELS + 1);
        server.abort();
    });
}

#[test]
fn with_no_path_labels_only_route_names_and_other_remain() {
    run(false, |seen| async move {
        let (listener, addr) = bind().await;
        let (layer, mut ends) = guard_with_ends(|b| b.max_path_labels(0));
        let app = catch_all(&layer);
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        flood(addr, made_up_paths()).await;
        ended(&mut ends, MADE_UP).await;
        assert_eq!(routes(seen), ["other"]);
        server.abort();
    });
}

#[test]
fn a_path_label_bound_above_the_table_maximum_is_refused() {
    let err = StreamGuardLayer::builder()
        .metrics(true)
        .max_path_labels(4_097)
        .build()
        .unwrap_err();
    assert_eq!(err, ConfigError::PathLabelsTooMany { value: 4_097 });
    assert!(
        err.to_string().starts_with("`max_path_labels` is 4097"),
        "{err}"
    );
    assert!(
        StreamGuardLayer::builder()
            .metrics(true)
            .max_path_labels(4_096)
            .build()
            .is_ok()
    );
}
