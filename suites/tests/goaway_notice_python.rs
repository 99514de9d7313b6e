//! The GOAWAY notice against a server we did not write: grpcio (Python over
//! gRPC's C core, `tests/python/feed_server.py`) stopping gracefully. The
//! client's stream is told while it still runs.
//!
//! Needs `python3` with `grpcio`; `.ci/run` installs it
//! (`python3 -m pip install grpcio`). Without it the test says so on stderr
//! and passes without checking anything, so that the README's test command
//! works on a machine with only the Rust toolchain; with `CI=true` (as
//! `.ci/run` sets it) it fails instead: CI cannot skip it.

#[path = "../../examples/common/mod.rs"]
mod common;

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    time::Duration,
};

use common::echo::{StreamRequest, echo_client::EchoClient};
use http::Uri;
use tokio::{net::TcpStream, time::timeout};
use tower_stream_guard::{
    StreamGuardLayer, StreamHandle,
    connection::{GoawayNotice, NoticeEvent},
};

const PATIENCE: Duration = Duration::from_secs(10);

fn grpcio_available() -> bool {
    Command::new("python3")
        .args(["-c", "import grpc"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Kills the server when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcio_server_stopping_gracefully_tells_the_client_stream() {
    if !grpcio_available() {
        // In CI the skip would hide that the test never ran: `.ci/run`
        // installs grpcio and sets CI, so a missing grpcio fails there.
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "python3 with grpcio is not installed, and CI=true forbids skipping this test \
             (.ci/run installs it with `python3 -m pip install grpcio`)"
        );
        eprintln!(
            "SKIPPED goaway_notice_python: python3 with grpcio is not installed \
             (python3 -m pip install grpcio)"
        );
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/feed_server.py");
    let mut child = Child(
        Command::new("python3")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the grpcio server"),
    );
    let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).expect("the port");
    let port: u16 = line.trim().parse().expect("a port number");

    let notice = GoawayNotice::new();
    let mut events = notice.subscribe();
    let connector = notice.connector(tower::service_fn(|uri: Uri| async move {
        TcpStream::connect(("127.0.0.1", uri.port_u16().unwrap_or(80))).await
    }));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_with_connector(connector)
        .await
        .expect("connect to grpcio");
    let guard = StreamGuardLayer::builder()
        .response_handle(true)
        .goaway_notice(&notice)
        .build()
        .unwrap();
    let mut client = EchoClient::new(tower::Layer::layer(&guard.for_tonic_channel(), channel));
    let response = client
        .server_stream(StreamRequest::default())
        .await
        .expect("call grpcio");
    let handle = response
        .extensions()
        .get::<StreamHandle>()
        .cloned()
        .unwrap();
    let mut stream = response.into_inner();
    let first = stream.message().await.unwrap().expect("a message");
    assert_eq!(first.message, "0");

    let mut stdin = child.0.stdin.take().unwrap();
    writeln!(stdin, "stop").unwrap();
    stdin.flush().unwrap();
    timeout(PATIENCE, handle.draining())
        .await
        .expect("grpcio's GOAWAY is heard");
    // grpcio lets the call run on within its grace.
    stream
        .message()
        .await
        .expect("still streaming")
        .expect("a message");
    let goaway = loop {
        match timeout(PATIENCE, events.recv()).await.unwrap().unwrap() {
            NoticeEvent::Goaway { goaway, .. } => break goaway,
            _ => continue,
        }
    };
    eprintln!("grpcio's GOAWAY: {goaway:?}");
    assert!(goaway.is_graceful(), "{goaway:?}");
}
