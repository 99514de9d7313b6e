//! The `prometheus` example end to end: its server (Echo behind guards with
//! metrics on, the Prometheus recorder, `/metrics`) takes known traffic over
//! loopback, then `/metrics` is scraped like Prometheus would, and the counts
//! must be what the traffic implies. The Grafana dashboard's queries must
//! only name metrics the scrape shows.
//!
//! One test in this binary: the recorder is the process's.

#[allow(dead_code)]
#[path = "../examples/prometheus.rs"]
mod example;

use std::{collections::BTreeSet, time::Duration};

use example::common::echo::{EchoRequest, echo_client::EchoClient};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, transport::Channel};
use tower_stream_guard::EndReason;

/// `GET /metrics`, the body.
async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("response");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .expect("a body")
}

/// The sum of the samples of `name` whose labels include every one of
/// `labels` (`key="value"`).
fn sum(body: &str, name: &str, labels: &[&str]) -> f64 {
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            let ok = metric == name && labels.iter().all(|label| rest.contains(label));
            ok.then(|| value.parse::<f64>().expect("a number"))
        })
        .sum()
}

#[tokio::test(start_paused = true)]
async fn known_traffic_shows_in_the_scrape_and_the_dashboard_reads_it() {
    let handle = example::install_recorder().expect("the only recorder");
    let (streams, connections) = example::guards().expect("valid");
    let mut events = streams.subscribe();
    let mut connection_events = connections.subscribe();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, metrics_addr) = (grpc.local_addr().unwrap(), metrics.local_addr().unwrap());
    tokio::spawn(example::serve(
        grpc,
        metrics,
        handle,
        (streams.clone(), connections),
    ));

    let channel = Channel::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let mut client = EchoClient::new(channel.clone());
    let unary = || EchoRequest {
        message: "hi".into(),
    };

    // 3 unary calls: completed; one more on a connection that then closes.
    for _ in 0..3 {
        client.unary(unary()).await.expect("answered");
    }
    let brief = Channel::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    EchoClient::new(brief.clone())
        .unary(unary())
        .await
        .expect("answered");
    drop(brief);
    loop {
        let event = tokio::time::timeout(Duration::from_secs(60), connection_events.recv())
            .await
            .expect("the brief connection closes")
            .expect("no event lost");
        if event.end().is_some() {
            break;
        }
    }
    // 8 bidi calls fill the connection's 8 slots; a ninth call is refused;
    // then the 8 are dropped: cancelled.
    let mut open = Vec::new();
    for _ in 0..8 {
        let (send, receive) = mpsc::channel::<EchoRequest>(1);
        let response = client
            .bidi(ReceiverStream::new(receive))
            .await
            .expect("open");
        open.push((send, response));
    }
    let refused = client.unary(unary()).await.expect_err("over the cap");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    drop(open);
    // A client stream that sends one message and goes silent: idle timeout.
    let (send, receive) = mpsc::channel::<EchoRequest>(1);
    send.send(unary()).await.unwrap();
    let silent = client
        .client_stream(ReceiverStream::new(receive))
        .await
        .expect_err("cut");
    assert_eq!(silent.code(), Code::DeadlineExceeded);
    drop(send);

    let mut reasons = Vec::new();
    while reasons.len() < 14 {
        let event = tokio::time::timeout(Duration::from_secs(60), events.recv())
            .await
            .expect("every stream ends")
            .expect("no event lost");
        reasons.push(event.reason());
    }
    assert_eq!(streams.active_streams(), 0);
    let count = |reason: &str| reasons.iter().filter(|r| r.as_str() == reason).count();
    assert_eq!(
        (count("completed"), count("rejected"), count("cancelled")),
        (4, 1, 8),
        "{reasons:?}"
    );
    assert!(reasons.contains(&EndReason::IdleTimeout(
        tower_stream_guard::IdleDirection::Both
    )));

    let body = scrape(metrics_addr).await;
    let ended = "stream_guard_streams_ended_total";
    assert_eq!(
        sum(
            &body,
            ended,
            &[
                r#"reason="completed""#,
                r#"route="/echo.Echo/Unary""#,
                r#"grpc_code="0""#
            ]
        ),
        4.0,
        "{body}"
    );
    assert_eq!(sum(&body, ended, &[r#"reason="cancelled""#]), 8.0, "{body}");
    assert_eq!(
        sum(
            &body,
            ended,
            &[r#"reason="idle_timeout""#, r#"direction="both""#]
        ),
        1.0,
        "{body}"
    );
    assert_eq!(sum(&body, ended, &[r#"reason="rejected""#]), 1.0, "{body}");
    assert_eq!(sum(&body, ended, &[]), 14.0, "{body}");
    assert_eq!(
        sum(
            &body,
            "stream_guard_streams_rejected_total",
            &[r#"cap="per_connection""#]
        ),
        1.0,
        "{body}"
    );
    assert_eq!(sum(&body, "stream_guard_streams_active", &[]), 0.0);
    assert_eq!(
        sum(&body, "stream_guard_stream_duration_seconds_count", &[]),
        14.0,
        "{body}"
    );
    assert!(
        sum(
            &body,
            "stream_guard_stream_duration_seconds_bucket",
            &[r#"le="+Inf""#]
        ) == 14.0,
        "histogram buckets, not a summary: {body}"
    );
    assert_eq!(sum(&body, "stream_guard_connections_active", &[]), 1.0);
    assert_eq!(
        sum(&body, "stream_guard_connections_closed_total", &[]),
        1.0,
        "{body}"
    );

    // Every metric the dashboard queries is one the example exports.
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../grafana/stream-guard.json"))
            .expect("the dashboard is JSON");
    let mut queried = BTreeSet::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("a PromQL query");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("stream_guard_") {
                    queried.insert(word.to_owned());
                }
            }
        }
    }
    assert!(queried.len() >= 6, "{queried:?}");
    for metric in &queried {
        let exported = body.lines().any(|line| {
            line.starts_with(&format!("{metric}{{")) || line.starts_with(&format!("{metric} "))
        });
        assert!(
            exported,
            "the dashboard queries {metric}, which is not exported:\n{body}"
        );
    }
    drop(channel);
}
