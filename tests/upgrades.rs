//! Upgraded connections (WebSocket and any HTTP/1.1 `Upgrade`) are guarded
//! streams: the stream lives until the upgraded connection closes, its
//! handle with it; traffic either way counts as activity; the lifetime and
//! idle limits end it by closing the connection; caps are held until then;
//! one end event says how it ended. Through axum's `WebSocketUpgrade` under
//! `axum::serve(connections.wrap_listener(..))`, and hyper's
//! `upgrade::on` under `ConnectionGuard::serve_connection`, over real
//! loopback sockets; the client speaks raw bytes (a WebSocket handshake and
//! frames by hand, or the echo protocol's plain bytes).

#![cfg(all(feature = "axum", feature = "hyper"))]

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use axum::{
    Extension, Router,
    extract::ws::{Message, WebSocketUpgrade},
    response::Response as AxumResponse,
    routing::get,
};
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{broadcast, mpsc},
    time::{sleep, timeout},
};
use tower::Layer;
use tower_stream_guard::{
    ConnectionEnd, ConnectionEvent, ConnectionGuard, EndEvent, EndReason, IdleDirection,
    StreamGuardBuilder, StreamGuardLayer, StreamHandle, connection::GuardedConnectInfo,
    stream::RequestBody,
};

// Only some of the shared helpers are used here.
#[allow(dead_code)]
mod support;
use support::{PATIENCE, QUIET, SLACK, assert_no_more_events, next_event};

/// What an upgrade task tells the test.
#[derive(Debug, PartialEq)]
enum Seen {
    /// The upgrade completed; whether the stream's handle said ended then.
    Upgraded { handle_ended: bool },
    /// The echo returned; whether the handle said ended then.
    Finished { handle_ended: bool },
}

/// How the upgrade task runs its echo.
#[derive(Clone, Copy, Debug)]
enum Echo {
    /// Under the stream's handle (`run_until_cancelled`): the README's
    /// pattern.
    UnderHandle,
    /// Until the connection closes, whatever the handle says.
    Plain,
}

impl Echo {
    async fn run(self, handle: &StreamHandle, echo: impl Future<Output = ()>) {
        match self {
            Echo::UnderHandle => drop(handle.run_until_cancelled(echo).await),
            Echo::Plain => echo.await,
        }
    }
}

/// The two ways to serve an upgrade.
#[derive(Clone, Copy, Debug)]
enum Server {
    /// axum's `WebSocketUpgrade`, `axum::serve` over a guarded listener.
    Axum,
    /// hyper's `upgrade::on`, `ConnectionGuard::serve_connection`.
    Hyper,
}

const SERVERS: [Server; 2] = [Server::Axum, Server::Hyper];

/// A running server and what the test watches of it.
struct Fixture {
    server: Server,
    addr: SocketAddr,
    guard: StreamGuardLayer,
    events: broadcast::Receiver<EndEvent>,
    connections: broadcast::Receiver<ConnectionEvent>,
    seen: mpsc::UnboundedReceiver<Seen>,
}

impl Fixture {
    async fn start(server: Server, builder: StreamGuardBuilder, mode: Echo) -> Fixture {
        let guard = builder.build().expect("valid");
        let connections = ConnectionGuard::builder().build().expect("valid");
        let (events, conn_events) = (guard.subscribe(), connections.subscribe());
        let (tell, seen) = mpsc::unbounded_channel();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        match server {
            Server::Axum => {
                let app = Router::new()
                    .route("/", get(websocket))
                    .layer(Extension(tell))
                    .layer(Extension(mode))
                    .layer(guard.clone())
                    .into_make_service_with_connect_info::<GuardedConnectInfo<SocketAddr>>();
                tokio::spawn(
                    async move { axum::serve(connections.wrap_listener(listener), app).await },
                );
            }
            Server::Hyper => {
                let service = guard.layer(tower::service_fn(move |request| {
                    echo_upgrade(request, tell.clone(), mode)
                }));
                tokio::spawn(async move {
                    while let Ok((io, _)) = listener.accept().await {
                        tokio::spawn(connections.serve_connection(io, service.clone()));
                    }
                });
            }
        }
        Fixture {
            server,
            addr,
            guard,
            events,
            connections: conn_events,
            seen,
        }
    }

    async fn seen(&mut self) -> Seen {
        timeout(PATIENCE, self.seen.recv())
            .await
            .expect("the upgrade task reports in time")
            .expect("a report")
    }

    /// Upgrades a new connection; the client on it, or the status of the
    /// answer when it was no upgrade.
    async fn upgrade(&self) -> Result<Client, String> {
        Client::upgrade(self.server, self.addr).await
    }

    /// The next close event of a connection (open events are skipped).
    async fn next_close(&mut self) -> ConnectionEvent {
        loop {
            let event = timeout(PATIENCE, self.connections.recv())
                .await
                .expect("a connection event in time")
                .expect("no connection event missed");
            if event.end().is_some() {
                return event;
            }
        }
    }
}

/// axum: a WebSocket that echoes text and binary messages for as long as
/// its stream lives.
async fn websocket(
    upgrade: WebSocketUpgrade,
    Extension(handle): Extension<StreamHandle>,
    Extension(tell): Extension<mpsc::UnboundedSender<Seen>>,
    Extension(mode): Extension<Echo>,
) -> AxumResponse {
    upgrade.on_upgrade(move |mut socket| async move {
        let _ = tell.send(Seen::Upgraded {
            handle_ended: handle.is_ended(),
        });
        let echo = async {
            while let Some(Ok(message)) = socket.recv().await {
                match message {
                    Message::Text(_) | Message::Binary(_) => {
                        if socket.send(message).await.is_err() {
                            return;
                        }
                    }
                    Message::Close(_) => return,
                    Message::Ping(_) | Message::Pong(_) => {}
                }
            }
        };
        mode.run(&handle, echo).await;
        let _ = tell.send(Seen::Finished {
            handle_ended: handle.is_ended(),
        });
    })
}

/// hyper: upgrades to a protocol that echoes bytes, for as long as the
/// stream lives.
async fn echo_upgrade(
    mut request: Request<RequestBody<hyper::body::Incoming>>,
    tell: mpsc::UnboundedSender<Seen>,
    mode: Echo,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let handle = request
        .extensions()
        .get::<StreamHandle>()
        .cloned()
        .expect("the guard's handle");
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let _ = tell.send(Seen::Upgraded {
            handle_ended: handle.is_ended(),
        });
        let mut io = TokioIo::new(upgraded);
        let echo = async {
            let mut buf = [0_u8; 256];
            while let Ok(n @ 1..) = io.read(&mut buf).await {
                if io.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        };
        mode.run(&handle, echo).await;
        let _ = tell.send(Seen::Finished {
            handle_ended: handle.is_ended(),
        });
    });
    let mut response = Response::new(Full::default());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, "echo".parse().unwrap());
    headers.insert(header::CONNECTION, "upgrade".parse().unwrap());
    Ok(response)
}

/// A client on an upgraded connection, speaking WebSocket (masked frames
/// out, plain frames in, payloads under 126 bytes) or raw echo bytes.
struct Client {
    tcp: TcpStream,
    websocket: bool,
}

impl Client {
    async fn upgrade(server: Server, addr: SocketAddr) -> Result<Client, String> {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let request = match server {
            Server::Axum => {
                "GET / HTTP/1.1\r\nhost: test\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
                 sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            }
            Server::Hyper => {
                "GET / HTTP/1.1\r\nhost: test\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n"
            }
        };
        tcp.write_all(request.as_bytes()).await.expect("send");
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0_u8; 1];
            match timeout(PATIENCE, tcp.read(&mut byte)).await {
                Ok(Ok(1)) => head.push(byte[0]),
                Ok(_) => break,
                Err(_) => panic!("no answer in time"),
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        if !head.starts_with("HTTP/1.1 101") {
            return Err(head);
        }
        Ok(Client {
            tcp,
            websocket: matches!(server, Server::Axum),
        })
    }

    async fn send(&mut self, payload: &[u8]) {
        let bytes = if self.websocket {
            frame(0x1, payload)
        } else {
            payload.to_vec()
        };
        self.tcp.write_all(&bytes).await.expect("send");
    }

    /// The next message or bytes, `None` once the connection is closed (or
    /// a WebSocket close frame came); fails if nothing comes in time.
    async fn recv(&mut self) -> Option<Vec<u8>> {
        timeout(PATIENCE, self.read())
            .await
            .expect("something (or the close) in time")
    }

    async fn read(&mut self) -> Option<Vec<u8>> {
        if !self.websocket {
            let mut buf = [0_u8; 256];
            return match self.tcp.read(&mut buf).await {
                Ok(n @ 1..) => Some(buf[..n].to_vec()),
                _ => None,
            };
        }
        let mut head = [0_u8; 2];
        self.tcp.read_exact(&mut head).await.ok()?;
        let mut payload = vec![0_u8; usize::from(head[1] & 0x7f)];
        self.tcp.read_exact(&mut payload).await.ok()?;
        (head[0] & 0x0f != 0x8).then_some(payload)
    }

    /// Sends `ping` and reads it back.
    async fn echo(&mut self) {
        self.send(b"ping").await;
        assert_eq!(self.recv().await.as_deref(), Some(&b"ping"[..]));
    }

    /// Closes the way the protocol does: a WebSocket close frame, or the
    /// end of what the client sends; then reads until the server closes.
    async fn close(mut self) {
        if self.websocket {
            let close = frame(0x8, &[]);
            self.tcp.write_all(&close).await.expect("send the close");
        }
        self.tcp.shutdown().await.expect("shutdown");
        while self.recv().await.is_some() {}
    }
}

/// A masked client frame of `opcode` (FIN set).
fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut bytes = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    bytes.extend_from_slice(&mask);
    bytes.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handle_lives_while_the_upgraded_connection_is_open() {
    for server in SERVERS {
        let builder = StreamGuardLayer::builder();
        let mut fixture = Fixture::start(server, builder, Echo::UnderHandle).await;
        let mut client = fixture.upgrade().await.expect("upgraded");
        assert_eq!(
            fixture.seen().await,
            Seen::Upgraded {
                handle_ended: false
            },
            "{server:?}: the handle in the upgrade task"
        );
        // `run_until_cancelled` keeps the echo running while the socket is
        // open, and the stream is open and silent.
        for _ in 0..3 {
            client.echo().await;
            sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(fixture.guard.active_streams(), 1, "{server:?}");
        assert!(
            fixture.events.try_recv().is_err(),
            "{server:?}: no end event while the socket is open"
        );
        client.close().await;
        assert_eq!(
            fixture.seen().await,
            Seen::Finished {
                handle_ended: false
            }
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_upgrade_from_the_same_peer_is_refused_while_the_first_is_open() {
    for server in SERVERS {
        let builder = StreamGuardLayer::builder().max_streams_per_peer(1);
        let mut fixture = Fixture::start(server, builder, Echo::Plain).await;
        let mut first = fixture.upgrade().await.expect("upgraded");
        first.echo().await;
        let refused = fixture.upgrade().await.err();
        let refused = refused.unwrap_or_else(|| panic!("{server:?}: a second upgrade passed"));
        assert!(refused.starts_with("HTTP/1.1 503"), "{server:?}: {refused}");
        let event = next_event(&mut fixture.events).await;
        assert_eq!(event.reason().as_str(), "rejected", "{server:?}");
        first.echo().await;
        // The first closes: its slot is back.
        first.close().await;
        assert_eq!(
            next_event(&mut fixture.events).await.reason(),
            EndReason::Completed
        );
        let mut third = fixture
            .upgrade()
            .await
            .expect("upgraded once the slot is back");
        third.echo().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_lifetime_closes_the_upgraded_connection() {
    for server in SERVERS {
        let lifetime = Duration::from_millis(300);
        let builder = StreamGuardLayer::builder().max_lifetime(lifetime);
        let mut fixture = Fixture::start(server, builder, Echo::Plain).await;
        let mut client = fixture.upgrade().await.expect("upgraded");
        client.echo().await;
        // The client keeps talking; the lifetime cuts it all the same.
        let started = tokio::time::Instant::now();
        let cut = timeout(lifetime + SLACK, async {
            loop {
                client.send(b"ping").await;
                if client.recv().await.is_none() {
                    return;
                }
                sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            cut.is_ok(),
            "{server:?}: the connection outlived twice the lifetime"
        );
        assert!(started.elapsed() + Duration::from_millis(50) >= lifetime);
        let event = next_event(&mut fixture.events).await;
        assert_eq!(event.reason(), EndReason::LifetimeExceeded, "{server:?}");
        assert_eq!(event.limit(), Some(lifetime));
        assert_no_more_events(&mut fixture.events).await;
        assert_eq!(fixture.guard.active_streams(), 0, "{server:?}");
        assert_eq!(
            fixture.seen().await,
            Seen::Upgraded {
                handle_ended: false
            }
        );
        assert_eq!(fixture.seen().await, Seen::Finished { handle_ended: true });
        let closed = fixture.next_close().await;
        assert_eq!(
            closed.end().map(ConnectionEnd::as_str),
            Some("upgrade_ended"),
            "{server:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_silent_both_ways_ends_idle_and_traffic_keeps_it() {
    for server in SERVERS {
        let idle = Duration::from_millis(400);
        let builder = StreamGuardLayer::builder().idle_timeout(idle);
        let mut fixture = Fixture::start(server, builder, Echo::Plain).await;
        let mut client = fixture.upgrade().await.expect("upgraded");
        // Traffic for three times the idle timeout keeps it open.
        for _ in 0..12 {
            sleep(Duration::from_millis(100)).await;
            client.echo().await;
        }
        assert!(
            fixture.events.try_recv().is_err(),
            "{server:?}: ended while traffic flowed"
        );
        assert_eq!(fixture.guard.active_streams(), 1);
        // Then silence both ways: cut as idle, the client sees it closed.
        let silent = tokio::time::Instant::now();
        assert_eq!(client.recv().await, None, "{server:?}: closed");
        assert!(silent.elapsed() + Duration::from_millis(50) >= idle);
        let event = next_event(&mut fixture.events).await;
        assert_eq!(
            event.reason(),
            EndReason::IdleTimeout(IdleDirection::Both),
            "{server:?}"
        );
        assert_no_more_events(&mut fixture.events).await;
        assert_eq!(fixture.guard.active_streams(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_closing_ends_the_upgraded_stream_once() {
    for server in SERVERS {
        let mut fixture = Fixture::start(server, StreamGuardLayer::builder(), Echo::Plain).await;
        let mut client = fixture.upgrade().await.expect("upgraded");
        client.echo().await;
        sleep(QUIET).await;
        assert!(
            fixture.events.try_recv().is_err(),
            "{server:?}: ended before the client closed"
        );
        client.echo().await;
        client.close().await;
        let event = next_event(&mut fixture.events).await;
        assert_eq!(event.reason(), EndReason::Completed, "{server:?}");
        assert!(
            event.duration() >= QUIET,
            "{server:?}: {:?}",
            event.duration()
        );
        assert_no_more_events(&mut fixture.events).await;
        assert_eq!(fixture.guard.active_streams(), 0);
        let closed = fixture.next_close().await;
        assert_eq!(closed.end(), Some(ConnectionEnd::Closed));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_reset_ends_the_upgraded_stream_as_cancelled() {
    for server in SERVERS {
        let mut fixture = Fixture::start(server, StreamGuardLayer::builder(), Echo::Plain).await;
        let mut client = fixture.upgrade().await.expect("upgraded");
        client.echo().await;
        // A zero linger: the client's close is a reset (RST), which the
        // server's read fails on.
        socket2::SockRef::from(&client.tcp)
            .set_linger(Some(Duration::ZERO))
            .expect("linger");
        drop(client);
        let event = next_event(&mut fixture.events).await;
        assert_eq!(event.reason(), EndReason::Cancelled, "{server:?}");
        assert_no_more_events(&mut fixture.events).await;
        assert_eq!(fixture.guard.active_streams(), 0);
    }
}

/// Without a connection guard nothing tells when the upgraded connection
/// closes: the stream ends at the 101, as documented (a warning says so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_connection_guard_the_upgrade_ends_its_stream_at_the_101() {
    let guard = StreamGuardLayer::builder().build().expect("valid");
    let mut events = guard.subscribe();
    let (tell, mut seen) = mpsc::unbounded_channel();
    let app = Router::new()
        .route("/", get(websocket))
        .layer(Extension(tell))
        .layer(Extension(Echo::Plain))
        .layer(guard.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut client = Client::upgrade(Server::Axum, addr).await.expect("upgraded");
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Completed);
    assert_eq!(guard.active_streams(), 0);
    let upgraded = timeout(PATIENCE, seen.recv()).await.expect("in time");
    assert_eq!(upgraded, Some(Seen::Upgraded { handle_ended: true }));
    // The connection itself works, unguarded.
    client.echo().await;
    client.close().await;
    assert_no_more_events(&mut events).await;
}
