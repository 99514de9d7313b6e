//! Metrics (feature `metrics`): known traffic gives the expected counts and
//! labels, the `route` label stays bounded under made-up gRPC paths, and a
//! connection guard counts its connections.
//!
//! Every test runs with a recorder of its own (`recorder/mod.rs`).

#[path = "../../examples/common/mod.rs"]
mod common;

#[path = "../../tests/support/paused.rs"]
mod paused;

mod recorder;

use std::time::Duration;

use bytes::Bytes;
use common::{
    EchoService,
    echo::{EchoRequest, echo_client::EchoClient, echo_server::EchoServer},
};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use paused::{App, SECOND, call, guard, next_event, request};
use recorder::run;
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;
use tower::Layer;
use tower_stream_guard::{ConnectionGuard, EndReason, RoutePolicy, StreamGuardLayer};

const ENDED: &str = "stream_guard_streams_ended_total";
const ACTIVE: &str = "stream_guard_streams_active";
const DURATION: &str = "stream_guard_stream_duration_seconds";

#[test]
fn completed_idle_and_refused_streams_are_counted_with_their_labels() {
    run(true, |seen| async move {
        let (app, mut feeders) = App::new();
        let layer = guard(
            StreamGuardLayer::builder()
                .idle_timeout(2 * SECOND)
                .max_streams(2)
                .route("/named.Svc/Go", RoutePolicy::new().name("named"))
                .metrics(true),
        );
        let mut events = layer.subscribe();
        let mut svc = layer.layer(app.service());

        // Completes: a named route, not gRPC.
        let response = call(&mut svc, request("/named.Svc/Go", 1, false)).await;
        let feeder = feeders.recv().await.unwrap();
        assert_eq!(seen.get(&format!("{ACTIVE}{{}}")), 1.0);
        drop(feeder);
        response.into_body().collect().await.unwrap();
        assert_eq!(next_event(&mut events).await.reason(), EndReason::Completed);

        // Two idle streams fill the cap; a third is refused.
        let idle_a = call(&mut svc, request("/x.Svc/Idle", 1, true)).await;
        let _feeder_a = feeders.recv().await.unwrap();
        let idle_b = call(&mut svc, request("/made.Up/Path", 1, false)).await;
        let _feeder_b = feeders.recv().await.unwrap();
        let refused = call(&mut svc, request("/x.Svc/Idle", 1, true)).await;
        assert_eq!(refused.status(), StatusCode::OK); // gRPC: status in headers
        assert!(matches!(
            next_event(&mut events).await.reason(),
            EndReason::Rejected(_)
        ));
        // Two open: the refused one started and ended.
        assert_eq!(seen.get(&format!("{ACTIVE}{{}}")), 2.0);
        // Both idle streams end after the idle timeout of paused time.
        let bodies = tokio::spawn(async move {
            let _ = idle_a.into_body().collect().await;
            let _ = idle_b.into_body().collect().await;
        });
        for _ in 0..2 {
            assert!(matches!(
                next_event(&mut events).await.reason(),
                EndReason::IdleTimeout(_)
            ));
        }
        bodies.await.unwrap();

        let totals = seen.read();
        let ended = |labels: &str| {
            totals
                .get(&format!("{ENDED}{{{labels}}}"))
                .copied()
                .unwrap_or(0.0)
        };
        assert_eq!(
            ended("direction=none,grpc_code=none,reason=completed,route=named"),
            1.0,
            "{totals:#?}"
        );
        // The gRPC stream the service answered (headers without a status)
        // would be labelled by its path if it had completed; ended by the
        // guard after the answer, it still is: the service serves it.
        assert_eq!(
            ended("direction=both,grpc_code=4,reason=idle_timeout,route=/x.Svc/Idle"),
            1.0,
            "{totals:#?}"
        );
        // Not gRPC: never labelled by path.
        assert_eq!(
            ended("direction=both,grpc_code=none,reason=idle_timeout,route=other"),
            1.0,
            "{totals:#?}"
        );
        // Refused before the service answered, its path not kept yet (the
        // stream the service accepted was still open): `other`.
        assert_eq!(
            ended("direction=none,grpc_code=8,reason=rejected,route=other"),
            1.0,
            "{totals:#?}"
        );
        assert_eq!(
            totals.get("stream_guard_streams_rejected_total{cap=total}"),
            Some(&1.0),
            "{totals:#?}"
        );
        assert_eq!(
            totals.get(&format!("{DURATION}{{reason=idle_timeout,route=other}}")),
            Some(&1.0),
            "{totals:#?}"
        );
        assert_eq!(totals.get(&format!("{ACTIVE}{{}}")), Some(&0.0));
    });
}

#[test]
fn a_guard_without_metrics_records_nothing() {
    run(true, |seen| async move {
        let (app, mut feeders) = App::new();
        let layer = guard(StreamGuardLayer::builder().metrics(false));
        let mut svc = layer.layer(app.service());
        let response = call(&mut svc, request("/a", 1, false)).await;
        drop(feeders.recv().await.unwrap());
        response.into_body().collect().await.unwrap();
        assert!(seen.read().is_empty(), "{:#?}", seen.read());
    });
}

#[test]
fn made_up_grpc_paths_do_not_become_label_values() {
    run(false, |seen| async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let layer = guard(
            StreamGuardLayer::builder()
                .route("/echo.Echo/ServerStream", RoutePolicy::new().name("watch"))
                .metrics(true),
        );
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .layer(layer.clone())
                .add_service(EchoServer::new(EchoService::new()))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );

        // A real method, served: labelled by its path.
        let mut client = EchoClient::connect(format!("http://{addr}")).await.unwrap();
        client
            .unary(EchoRequest {
                message: "hi".into(),
            })
            .await
            .unwrap();
        drop(client);

        // 1,000 made-up methods over one HTTP/2 connection, answered with
        // UNIMPLEMENTED by tonic.
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        for n in 0..1_000u32 {
            let path = format!("/made{n}.Up{}/Method{}", n * 7919 % 1000, n ^ 0x5a5a);
            let request = Request::post(path)
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(Empty::<Bytes>::new())
                .unwrap();
            sender.ready().await.unwrap();
            let response = sender.send_request(request).await.unwrap();
            assert_eq!(
                response.headers().get("grpc-status").map(|v| v.as_bytes()),
                Some(&b"12"[..])
            );
            response.into_body().collect().await.unwrap();
        }
        tokio::time::timeout(Duration::from_secs(5), async {
            while layer.active_streams() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("every stream ended");

        let routes = seen.label_values(ENDED, "route");
        assert_eq!(routes, ["/echo.Echo/Unary", "other"], "{routes:?}");
        assert_eq!(
            seen.get(&format!(
                "{ENDED}{{direction=none,grpc_code=12,reason=completed,route=other}}"
            )),
            1000.0
        );
        assert_eq!(seen.label_values(DURATION, "route"), routes);
        assert_eq!(seen.get(&format!("{ACTIVE}{{}}")), 0.0);
        server.abort();
    });
}

#[test]
fn a_connection_guard_counts_its_connections() {
    run(false, |seen| async move {
        let connections = ConnectionGuard::builder().metrics(true).build().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();

        let _client = TcpStream::connect(addr).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let io = connections.wrap(tcp);
        assert_eq!(seen.get("stream_guard_connections_active{}"), 1.0);
        drop(io);

        let _client = TcpStream::connect(addr).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let io = connections.wrap(tcp);
        io.handle().close();
        drop(io);

        let totals = seen.read();
        assert_eq!(
            totals.get("stream_guard_connections_closed_total{reason=closed}"),
            Some(&1.0),
            "{totals:#?}"
        );
        assert_eq!(
            totals.get("stream_guard_connections_closed_total{reason=manual}"),
            Some(&1.0),
            "{totals:#?}"
        );
        assert_eq!(totals.get("stream_guard_connections_active{}"), Some(&0.0));
    });
}
