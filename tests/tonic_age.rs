//! Why `ConnectionGuard` has a maximum connection age of its own: tonic
//! 0.14's `Server::max_connection_age` sends GOAWAY at the age, but once
//! `max_connection_age_grace` is set it sends none at all: it waits for age
//! plus grace and then drops the connection, so clients learn nothing until
//! their streams break. A raw HTTP/2 client over loopback reads the frames
//! the server sends, under paused time, and notes when GOAWAY and the close
//! come.
//!
//! `pins_tonic_*` tests pin tonic's behaviour: a failure after a tonic
//! upgrade means tonic changed, read the test before touching the guard.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::Instant,
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

#[path = "../examples/common/mod.rs"]
mod common;
use common::{EchoService, echo::echo_server::EchoServer};

const AGE: Duration = Duration::from_secs(10);
const GRACE: Duration = Duration::from_secs(5);

/// What a connection's server sent, as seen by a client that opened no
/// stream: when GOAWAY came (if it did) and when the connection closed.
#[derive(Debug)]
struct Seen {
    goaway: Option<Duration>,
    closed: Duration,
}

/// Speaks just enough HTTP/2 (the preface, SETTINGS and PING answered) to
/// keep a connection open, and reads frame headers until the server closes
/// it.
/// Gives up (fails) after a minute of paused time without a close.
async fn watch(addr: std::net::SocketAddr) -> Seen {
    tokio::time::timeout(Duration::from_secs(60), frames(addr))
        .await
        .expect("the server closes the connection")
}

async fn frames(addr: std::net::SocketAddr) -> Seen {
    let started = Instant::now();
    let mut io = TcpStream::connect(addr).await.expect("connect");
    io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .expect("preface");
    let mut goaway = None;
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let read = io.read(&mut chunk).await.unwrap_or(0);
        if read == 0 {
            return Seen {
                goaway,
                closed: started.elapsed(),
            };
        }
        buffer.extend_from_slice(&chunk[..read]);
        while buffer.len() >= 9 {
            let length =
                usize::from(buffer[0]) << 16 | usize::from(buffer[1]) << 8 | usize::from(buffer[2]);
            if buffer.len() < 9 + length {
                break;
            }
            let (kind, flags) = (buffer[3], buffer[4]);
            match kind {
                // SETTINGS without ACK: acknowledge it.
                0x4 if flags & 0x1 == 0 => io
                    .write_all(b"\0\0\0\x04\x01\0\0\0\0")
                    .await
                    .expect("SETTINGS ACK"),
                // PING without ACK (a graceful close sends one): answer it.
                0x6 if flags & 0x1 == 0 && length == 8 => {
                    let mut pong = b"\0\0\x08\x06\x01\0\0\0\0".to_vec();
                    pong.extend_from_slice(&buffer[9..17]);
                    io.write_all(&pong).await.expect("PING ACK");
                }
                0x7 => goaway = goaway.or(Some(started.elapsed())),
                _ => {}
            }
            buffer.drain(..9 + length);
        }
    }
}

async fn serve_tonic(server: Server) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut server = server;
    let router = server.add_service(EchoServer::new(EchoService::new()));
    tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));
    addr
}

#[tokio::test(start_paused = true)]
async fn pins_tonic_max_connection_age_alone_sends_goaway_at_the_age() {
    let addr = serve_tonic(Server::builder().max_connection_age(AGE)).await;
    let seen = watch(addr).await;
    assert_eq!(seen.goaway, Some(AGE), "{seen:?}");
}

#[tokio::test(start_paused = true)]
async fn pins_tonic_max_connection_age_grace_skips_the_goaway_and_closes_hard() {
    let addr = serve_tonic(
        Server::builder()
            .max_connection_age(AGE)
            .max_connection_age_grace(GRACE),
    )
    .await;
    let seen = watch(addr).await;
    // If this starts failing, tonic has changed: revisit the README's
    // comparison and `ConnectionGuardBuilder::max_age`'s motivation.
    assert_eq!(seen.goaway, None, "{seen:?}");
    assert_eq!(seen.closed, AGE + GRACE, "{seen:?}");
}

/// The same Echo routes served through `ConnectionGuard::serve_connection`
/// with a maximum age and a grace: GOAWAY at the age.
#[cfg(feature = "hyper")]
#[tokio::test(start_paused = true)]
async fn connection_guard_sends_goaway_at_the_age_with_a_grace() {
    use tower_stream_guard::ConnectionGuard;

    let connections = ConnectionGuard::builder()
        .max_age(AGE)
        .max_age_grace(GRACE)
        // Exactly the age, as tonic's: the GOAWAY is timed against it.
        .max_age_jitter_percent(0)
        .build()
        .expect("valid");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let routes = tonic::service::Routes::new(EchoServer::new(EchoService::new()));
    tokio::spawn(async move {
        while let Ok((io, _)) = listener.accept().await {
            tokio::spawn(connections.serve_connection(io, routes.clone()));
        }
    });
    let seen = watch(addr).await;
    let goaway = seen.goaway.expect("a GOAWAY before the close");
    // The guard's timer ticks every 100 ms (its default resolution).
    assert!(
        goaway >= AGE && goaway <= AGE + Duration::from_millis(100),
        "{seen:?}"
    );
    assert!(seen.closed <= AGE + GRACE, "{seen:?}");
}
